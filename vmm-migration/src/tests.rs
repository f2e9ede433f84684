use super::*;

fn header() -> Header {
    let mut facts = Records::new();
    facts.push("cpuid", vec![1, 2, 3]).unwrap();
    Header {
        vcpus: 1,
        regions: vec![
            Region {
                gpa: 0,
                size: 0x10000,
            },
            Region {
                gpa: 0x10_0000,
                size: 0x3000,
            },
        ],
        facts,
    }
}

fn state() -> State {
    let mut vm = Records::new();
    vm.push("pit", vec![7; 16]).unwrap();
    let mut v = Records::new();
    v.push("regs", vec![9; 8]).unwrap();
    State {
        vm,
        vcpus: vec![v],
        device: b"device".to_vec(),
    }
}

/// A whole valid stream.
pub(crate) fn sample() -> Vec<u8> {
    let mut w = Writer::new(Vec::new()).unwrap();
    w.header(&header()).unwrap();
    w.pages(0, 1, &vec![0xaa; 2 * PAGE]).unwrap();
    w.round_end(0, 2).unwrap();
    w.pages(1, 2, &vec![0xbb; PAGE]).unwrap();
    w.round_end(1, 1).unwrap();
    w.pages(0, 0, &vec![0xcc; PAGE]).unwrap();
    w.state(&state()).unwrap();
    w.end().unwrap();
    std::mem::take(w.get_mut())
}

#[test]
fn a_stream_round_trips() {
    let bytes = sample();
    let mut r = Reader::new(&bytes[..]).unwrap();
    assert_eq!(r.next_frame().unwrap(), Frame::Header(header()));
    match r.next_frame().unwrap() {
        Frame::Pages {
            region: 0,
            first_page: 1,
            count: 2,
            data,
        } => assert_eq!(data, vec![0xaa; 2 * PAGE]),
        f => panic!("{f:?}"),
    }
    assert_eq!(
        r.next_frame().unwrap(),
        Frame::RoundEnd { round: 0, pages: 2 }
    );
    for _ in 0..3 {
        r.next_frame().unwrap();
    }
    assert_eq!(r.next_frame().unwrap(), Frame::State(state()));
    assert!(matches!(r.next_frame().unwrap(), Frame::End { .. }));
    assert!(r.finished());
    let s = parse_stream(&bytes).unwrap();
    assert_eq!((s.vcpus, s.regions, s.pages, s.rounds), (1, 2, 4, 2));
}

fn error(bytes: &[u8]) -> String {
    parse_stream(bytes).unwrap_err().to_string()
}

#[test]
fn garbage_and_a_wrong_version_are_named() {
    let e = error(b"GET / HTTP/1.1\r\n\r\n");
    assert!(e.contains("bad magic"), "{e}");
    let mut b = sample();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = error(&b);
    assert!(e.contains("version 2") && e.contains("version 1"), "{e}");
    let e = error(&b[..5]);
    assert!(e.contains("closed"), "{e}");
}

#[test]
fn every_cut_of_a_stream_is_an_error_and_no_panic() {
    let b = sample();
    for n in 0..b.len() {
        assert!(parse_stream(&b[..n]).is_err(), "a stream cut at {n} parsed");
    }
}

#[test]
fn a_flipped_byte_is_an_error() {
    let b = sample();
    // Each byte of page data (checked only by the checksum) and a few
    // structural bytes.
    for at in [12 + 5 + 30, 200, 5000, b.len() - 10] {
        let mut c = b.clone();
        c[at] ^= 0x40;
        assert!(
            parse_stream(&c).is_err(),
            "flipping byte {at} went unnoticed"
        );
    }
}

#[test]
fn an_unknown_frame_is_named() {
    let mut b = sample()[..12].to_vec();
    b.extend_from_slice(&[0x42, 0, 0, 0, 0]);
    let e = error(&b);
    assert!(e.contains("unknown frame kind 0x42 at byte 12"), "{e}");
}

#[test]
fn lengths_are_checked_before_allocation() {
    let mut b = sample()[..12].to_vec();
    b.push(kind::STATE);
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = error(&b);
    assert!(e.contains("State frame of 4294967295 bytes"), "{e}");
    let mut b = sample()[..12].to_vec();
    b.push(kind::HEADER);
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = error(&b);
    assert!(e.contains("regions (at most 256)"), "{e}");
}

#[test]
fn pages_outside_the_announced_regions_are_refused() {
    let mut w = Writer::new(Vec::new()).unwrap();
    w.header(&header()).unwrap();
    w.pages(1, 2, &vec![0; 2 * PAGE]).unwrap();
    let e = error(w.get_mut());
    assert!(e.contains("outside region 1 (3 pages)"), "{e}");
    let mut w = Writer::new(Vec::new()).unwrap();
    w.header(&header()).unwrap();
    w.pages(2, 0, &vec![0; PAGE]).unwrap();
    let e = error(w.get_mut());
    assert!(e.contains("region 2 (the header announced 2)"), "{e}");
}

#[test]
fn frames_out_of_order_are_refused() {
    let mut w = Writer::new(Vec::new()).unwrap();
    w.pages(0, 0, &vec![0; PAGE]).unwrap();
    let e = error(w.get_mut());
    assert!(e.contains("must begin with its Header"), "{e}");
    let mut w = Writer::new(Vec::new()).unwrap();
    w.header(&header()).unwrap();
    w.end().unwrap();
    let e = error(w.get_mut());
    assert!(e.contains("End before State"), "{e}");
    let mut w = Writer::new(Vec::new()).unwrap();
    w.header(&header()).unwrap();
    w.round_end(3, 0).unwrap();
    w.round_end(3, 0).unwrap();
    let e = error(w.get_mut());
    assert!(e.contains("round numbers must increase"), "{e}");
    let mut w = Writer::new(Vec::new()).unwrap();
    w.header(&header()).unwrap();
    let mut s = state();
    s.vcpus.push(Records::new());
    w.state(&s).unwrap();
    let e = error(w.get_mut());
    assert!(
        e.contains("state for 2 vcpus, the header announced 1"),
        "{e}"
    );
}

#[test]
fn replies_round_trip_and_errors_carry_the_message() {
    let mut b = Vec::new();
    for r in [
        Reply::Receiving,
        Reply::Ready,
        Reply::Commit,
        Reply::Done,
        Reply::Error("no region at 0x0".into()),
    ] {
        write_reply(&mut b, &r).unwrap();
    }
    let mut s = &b[..];
    expect_reply(&mut s, Reply::Receiving).unwrap();
    expect_reply(&mut s, Reply::Ready).unwrap();
    assert_eq!(read_reply(&mut s).unwrap(), Reply::Commit);
    let e = expect_reply(&mut s, Reply::Ready).unwrap_err().to_string();
    assert!(e.contains("expected Ready, the peer sent Done"), "{e}");
    let e = expect_reply(&mut s, Reply::Done).unwrap_err().to_string();
    assert!(e.contains("no region at 0x0"), "{e}");
    let e = read_reply(&mut &[kind::HEADER, 0, 0, 0, 0][..])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown frame kind 0x01"), "{e}");
}

/// Writes the fuzz seeds (`MIGRATION_WRITE_SEEDS=DIR cargo test -p
/// vmm-migration write_seeds`); otherwise checks that the sample stream
/// survives the fuzz body.
#[test]
fn write_seeds() {
    let b = sample();
    let mut seeds = vec![("stream_valid", [&[0u8][..], &b].concat())];
    seeds.push(("stream_cut", [&[0u8][..], &b[..b.len() / 2]].concat()));
    let mut v2 = b.clone();
    v2[8] = 2;
    seeds.push(("stream_version2", [&[0u8][..], &v2].concat()));
    let mut reply = vec![1u8];
    write_reply(&mut reply, &Reply::Error("bad".into())).unwrap();
    write_reply(&mut reply, &Reply::Ready).unwrap();
    seeds.push(("reply_error", reply));
    for (_, s) in &seeds {
        fuzz_one(s);
    }
    if let Ok(dir) = std::env::var("MIGRATION_WRITE_SEEDS") {
        for (name, s) in &seeds {
            std::fs::write(std::path::Path::new(&dir).join(name), s).unwrap();
        }
    }
}
