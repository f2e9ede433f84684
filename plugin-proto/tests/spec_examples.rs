//! Conformance: the hex examples of docs/wire-protocol.md §10, both directions,
//! plus framing round trips over real sockets and pipes.

use std::os::fd::AsFd;

use plugin_proto::framing::{self, FrameReader};
use plugin_proto::protobuf::Message;
use plugin_proto::*;

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn check<M: Message + PartialEq + std::fmt::Debug>(msg: M, bytes: &str) {
    let expected = hex(bytes);
    assert_eq!(msg.write_to_bytes().unwrap(), expected, "encode {msg:?}");
    assert_eq!(
        M::parse_from_bytes(&expected).unwrap(),
        msg,
        "decode {bytes}"
    );
}

#[test]
fn main_request_examples() {
    let mut r = MainRequest::new();
    r.set_get_vcpus(Default::default());
    check(r, "8a 01 00");

    let mut r = MainRequest::new();
    r.set_start(Default::default());
    check(r, "92 01 00");

    let mut rr = main_request::ReserveRange::new();
    rr.space = AddressSpace::IOPORT.into();
    rr.start = 0x3f8;
    rr.length = 1;
    let mut r = MainRequest::new();
    r.set_reserve_range(rr);
    check(r, "52 05 10 f8 07 18 01");

    let mut mem = main_request::create::Memory::new();
    mem.offset = 0x1000;
    mem.start = 0x1000;
    mem.length = 0x1000;
    let mut c = main_request::Create::new();
    c.id = 0;
    c.set_memory(mem);
    let mut r = MainRequest::new();
    r.set_create(c);
    check(r, "0a 0b 1a 09 08 80 20 10 80 20 18 80 20");
}

#[test]
fn main_response_examples() {
    let mut r = MainResponse::new();
    r.set_get_vcpus(Default::default());
    check(r, "92 01 00");

    let mut r = MainResponse::new();
    r.set_start(Default::default());
    check(r.clone(), "9a 01 00");
    r.errno = 22;
    check(r, "08 2c 9a 01 00");

    let mut nc = main_response::GetNetConfig::new();
    nc.host_mac_address = vec![0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a];
    nc.host_ipv4_address = u32::from_le_bytes([100, 115, 92, 5]);
    nc.netmask = u32::from_le_bytes([255, 255, 255, 252]);
    assert_eq!(nc.host_ipv4_address, 0x055C7364);
    assert_eq!(nc.netmask, 0xFCFFFFFF);
    let mut r = MainResponse::new();
    r.set_get_net_config(nc);
    check(
        r,
        "52 12 0a 06 de 21 e8 47 6b 6a 15 64 73 5c 05 1d ff ff ff fc",
    );
}

#[test]
fn vcpu_examples() {
    let mut r = VcpuRequest::new();
    r.set_wait(Default::default());
    check(r, "0a 00");

    let mut r = VcpuRequest::new();
    r.set_shutdown(Default::default());
    check(r, "42 00");

    let mut w = vcpu_response::Wait::new();
    w.set_init(Default::default());
    let mut r = VcpuResponse::new();
    r.set_wait(w);
    let mut framed = Vec::new();
    framing::encode_delimited(&r, &mut framed).unwrap();
    assert_eq!(framed, hex("04 12 02 0a 00"));

    let mut io = vcpu_response::wait::Io::new();
    io.space = AddressSpace::IOPORT.into();
    io.address = 0x3f8;
    io.is_write = true;
    io.data = vec![9];
    let mut w = vcpu_response::Wait::new();
    w.set_io(io);
    let mut r = VcpuResponse::new();
    r.set_wait(w);
    framing::encode_delimited(&r, &mut framed).unwrap();
    assert_eq!(framed, hex("0c 12 0a 12 08 10 f8 07 18 01 2a 01 09"));
}

#[test]
fn unknown_request_member_decodes_as_none() {
    // Field 77 (unknown) as an empty message: must decode with no member set.
    let r = MainRequest::parse_from_bytes(&hex("ea 04 00")).unwrap();
    assert!(r.message.is_none());
}

#[test]
fn unpacked_repeated_fields_are_accepted() {
    // GetMsrs{entry_indices: [0x10, 0x174]} in unpacked form (tag 0x08 per item).
    let bytes = hex("2a 05 08 10 08 f4 02");
    let r = VcpuRequest::parse_from_bytes(&bytes).unwrap();
    assert_eq!(r.get_msrs().entry_indices, vec![0x10, 0x174]);
}

#[test]
fn seqpacket_round_trip_with_fds() {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let efd = nix::sys::eventfd::EventFd::new().unwrap();
    let mut r = MainRequest::new();
    r.set_get_shutdown_eventfd(Default::default());
    let mut scratch = Vec::new();
    framing::send_message(a.as_fd(), &r, &[efd.as_fd(), efd.as_fd()], &mut scratch).unwrap();
    let mut buf = vec![0; framing::MAX_MESSAGE_SIZE];
    let p = framing::recv_packet(b.as_fd(), &mut buf, 4).unwrap();
    assert_eq!(p.fds.len(), 2);
    assert!(!p.fds_truncated);
    assert_eq!(MainRequest::parse_from_bytes(&buf[..p.len]).unwrap(), r);

    // More descriptors than the receiver accepts: flagged, excess closed.
    let fds: Vec<_> = (0..5).map(|_| efd.as_fd()).collect();
    framing::send_message(a.as_fd(), &r, &fds, &mut scratch).unwrap();
    let p = framing::recv_packet(b.as_fd(), &mut buf, 2).unwrap();
    assert!(p.fds_truncated);
    assert_eq!(p.fds.len(), 2);

    // An oversized packet is reported, not silently cut.
    framing::send_packet(a.as_fd(), &vec![0u8; 8192], &[]).unwrap();
    let err = framing::recv_packet(b.as_fd(), &mut buf[..4096], 1).unwrap_err();
    assert!(matches!(err, framing::FramingError::Truncated(4096)));

    drop(a);
    assert!(matches!(
        framing::recv_packet(b.as_fd(), &mut buf, 1).unwrap_err(),
        framing::FramingError::Closed
    ));
}

#[test]
fn pipe_frames_several_per_read_and_split() {
    let (rx, tx) = nix::unistd::pipe().unwrap();
    let mut scratch = Vec::new();
    for user in [1u64, 2, 3] {
        let mut u = vcpu_response::wait::User::new();
        u.user = user;
        let mut w = vcpu_response::Wait::new();
        w.set_user(u);
        let mut r = VcpuResponse::new();
        r.set_wait(w);
        framing::write_vcpu_response(tx.as_fd(), &r, &mut scratch).unwrap();
    }
    let mut reader = FrameReader::new();
    for user in [1u64, 2, 3] {
        let body = reader.next_frame(rx.as_fd()).unwrap();
        let r = VcpuResponse::parse_from_bytes(body).unwrap();
        assert_eq!(r.wait().user().user, user);
    }
    assert!(!reader.has_buffered());

    // A frame delivered in two pieces is reassembled.
    let mut r = VcpuResponse::new();
    r.errno = 71;
    let mut framed = Vec::new();
    framing::encode_delimited(&r, &mut framed).unwrap();
    let mut reader = FrameReader::new();
    reader.push_bytes(&framed[..1]).unwrap();
    assert!(reader.pop_frame().unwrap().is_none());
    reader.push_bytes(&framed[1..]).unwrap();
    let body = reader.pop_frame().unwrap().unwrap().to_vec();
    assert_eq!(VcpuResponse::parse_from_bytes(&body).unwrap().errno, 71);

    drop(tx);
    assert!(matches!(
        reader.next_frame(rx.as_fd()).unwrap_err(),
        framing::FramingError::Closed
    ));
}

#[test]
fn varint_limits() {
    assert_eq!(framing::decode_varint(&[0x80]).unwrap(), None);
    assert_eq!(
        framing::decode_varint(&[0xac, 0x02]).unwrap(),
        Some((300, 2))
    );
    assert!(framing::decode_varint(&[0xff; 11]).is_err());
    let mut reader = FrameReader::new();
    // A prefix announcing a frame larger than the buffer is refused.
    reader.push_bytes(&[0xff, 0xff, 0xff, 0x7f]).unwrap();
    assert!(reader.pop_frame().is_err());
}
