//! Checks of both framing decoders against naive reference decoders: the
//! seqpacket receive (`recv_packet_with`) over a real socket pair with real
//! descriptors, and the vcpu stream splitter (`FrameReader`, `decode_varint`).

use std::os::fd::{AsFd, OwnedFd};

use arbitrary::{Arbitrary, Unstructured};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};
use plugin_proto::framing::{
    decode_varint, encode_delimited, full_cmsg_space, recv_packet_with, send_packet, FrameReader,
    FramingError, MAX_MESSAGE_SIZE,
};
use plugin_proto::protobuf::Message;
use plugin_proto::VcpuResponse;

use super::gen::ExitShape;
use super::{invariant, make_fds, open_fd_count, ModelError};
use vmm::limits;
use vmm::record::FdKind;

/// The obvious varint decoder: `Err` for more than 10 bytes or a value over
/// 64 bits, `Ok(None)` when incomplete.
fn reference_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, ()> {
    let mut v: u128 = 0;
    for (i, b) in buf.iter().enumerate() {
        if i >= 10 {
            return Err(());
        }
        v |= u128::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u64::try_from(v).map(|v| Some((v, i + 1))).map_err(|_| ());
        }
    }
    if buf.len() >= 10 {
        return Err(());
    }
    Ok(None)
}

/// Splits `stream` into frames the naive way: complete frame bodies, then
/// whether the stream is broken (bad prefix or oversized frame).
fn reference_frames(mut stream: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut out = Vec::new();
    loop {
        match reference_varint(stream) {
            Err(()) => return (out, true),
            Ok(None) => return (out, false),
            Ok(Some((len, n))) => {
                if len > (MAX_MESSAGE_SIZE - 10) as u64 {
                    return (out, true);
                }
                let len = len as usize;
                if stream.len() - n < len {
                    return (out, false);
                }
                out.push(&stream[n..n + len]);
                stream = &stream[n + len..];
            }
        }
    }
}

/// Feeds `stream` to a `FrameReader` in pieces cut at `cuts` and compares
/// every popped frame with the reference split.
fn frames_match(stream: &[u8], cuts: &[u16]) -> Result<usize, ModelError> {
    let (want, broken) = reference_frames(stream);
    let mut reader = FrameReader::new();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut err = false;
    let mut pos = 0;
    let mut cut_iter = cuts.iter().cycle();
    'feed: while pos < stream.len() {
        let step = cut_iter
            .next()
            .map_or(stream.len(), |c| usize::from(*c).max(1))
            .min(stream.len() - pos);
        if reader.push_bytes(&stream[pos..pos + step]).is_err() {
            err = true;
            break;
        }
        pos += step;
        loop {
            match reader.pop_frame() {
                Ok(Some(body)) => got.push(body.to_vec()),
                Ok(None) => break,
                Err(_) => {
                    err = true;
                    break 'feed;
                }
            }
        }
    }
    if got.len() > want.len() || got.iter().zip(&want).any(|(g, w)| g.as_slice() != *w) {
        return Err(invariant(
            "FrameReader frames differ from the reference split",
        ));
    }
    if !err && got.len() != want.len() {
        return Err(invariant("FrameReader lost complete frames"));
    }
    if err && !broken {
        return Err(invariant("FrameReader failed on a well-formed stream"));
    }
    if broken && !err && got.len() == want.len() && pos == stream.len() {
        return Err(invariant("FrameReader accepted a broken stream"));
    }
    Ok(got.len())
}

/// Stream framing: `decode_varint` against the reference, `FrameReader` on
/// raw bytes, and a round trip of well-formed responses cut at random
/// places. Returns the number of frames decoded.
pub fn check_stream(data: &[u8]) -> Result<usize, ModelError> {
    // decode_varint on every suffix start of the first bytes.
    for start in 0..data.len().min(16) {
        let d = &data[start..];
        let got = decode_varint(d);
        let want = reference_varint(d);
        match (got, want) {
            (Ok(g), Ok(w)) if g == w => {}
            (Err(_), Err(())) => {}
            (g, w) => {
                return Err(invariant(format!(
                    "decode_varint({:02x?}) = {g:?}, reference {w:?}",
                    &d[..d.len().min(11)]
                )))
            }
        }
    }
    let mut u = Unstructured::new(data);
    let cuts: Vec<u16> = (0..u.int_in_range(1..=6).unwrap_or(1))
        .map(|_| u.int_in_range(1..=600).unwrap_or(1))
        .collect();
    let mut frames = frames_match(data, &cuts)?;
    // Round trip of real responses.
    let exits: Vec<ExitShape> = Vec::arbitrary(&mut u).unwrap_or_default();
    let mut stream = Vec::new();
    let mut msgs = Vec::new();
    let mut buf = Vec::new();
    for e in exits.iter().take(64) {
        let mut r = VcpuResponse::new();
        r.set_wait(e.to_wait());
        encode_delimited(&r, &mut buf).map_err(|e| invariant(format!("encode: {e}")))?;
        stream.extend_from_slice(&buf);
        msgs.push(r);
    }
    let mut reader = FrameReader::new();
    let mut got = Vec::new();
    let mut pos = 0;
    let mut cut_iter = cuts.iter().cycle();
    while pos < stream.len() {
        let step = usize::from(*cut_iter.next().unwrap_or(&1)).min(stream.len() - pos);
        reader
            .push_bytes(&stream[pos..pos + step])
            .map_err(|e| invariant(format!("push_bytes on a good stream: {e}")))?;
        pos += step;
        while let Some(body) = reader
            .pop_frame()
            .map_err(|e| invariant(format!("pop_frame on a good stream: {e}")))?
        {
            got.push(
                VcpuResponse::parse_from_bytes(body)
                    .map_err(|e| invariant(format!("frame does not decode: {e}")))?,
            );
        }
    }
    if got != msgs || reader.has_buffered() {
        return Err(invariant("responses did not survive framing"));
    }
    frames += got.len();
    Ok(frames)
}

/// One packet for the seqpacket check.
#[derive(Debug)]
struct PacketSpec {
    len: usize,
    fill: u8,
    fds: FdKind,
    count: usize,
}

impl<'a> Arbitrary<'a> for PacketSpec {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = match u.int_in_range(0..=63)? {
            0..=3 => 0,
            4 => limits::MAX_MAIN_REQUEST,
            5 => limits::MAX_MAIN_REQUEST + 1,
            6..=9 => u.int_in_range(4000..=4200)?,
            _ => u.int_in_range(1..=300)?,
        };
        let count = match u.int_in_range(0..=63)? {
            0..=15 => 0,
            16..=23 => u.int_in_range(2..=8)?,
            24 => plugin_proto::framing::SCM_MAX_FD,
            _ => 1,
        };
        Ok(PacketSpec {
            len,
            fill: u.arbitrary()?,
            fds: FdKind::from_byte(u.int_in_range(0..=7)?),
            count,
        })
    }
}

fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    match (
        nix::sys::stat::fstat(a.as_fd()),
        nix::sys::stat::fstat(b.as_fd()),
    ) {
        (Ok(x), Ok(y)) => x.st_dev == y.st_dev && x.st_ino == y.st_ino,
        _ => false,
    }
}

/// Seqpacket receive: packets of various sizes (up to one past the host's
/// limit) with zero, one, several or `SCM_MAX_FD` descriptors, received as
/// the host does (one descriptor kept). Checks lengths, truncation, the kept
/// descriptor's identity, and that no descriptor leaks. Returns the number
/// of packets received.
pub fn check_seqpacket(data: &[u8]) -> Result<usize, ModelError> {
    let before = open_fd_count();
    let n = seqpacket_round(data)?;
    let after = open_fd_count();
    if before != after {
        return Err(invariant(format!(
            "descriptor leak in seqpacket receive: {before} before, {after} after"
        )));
    }
    Ok(n)
}

fn seqpacket_round(data: &[u8]) -> Result<usize, ModelError> {
    let sys = |what: &'static str| move |source: Errno| ModelError::Sys { what, source };
    let mut u = Unstructured::new(data);
    let (host, plugin) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(sys("socketpair"))?;
    // Let the sender emit packets past the host's limit.
    setsockopt(
        &plugin,
        sockopt::SndBuf,
        &(2 * limits::MAX_MAIN_REQUEST + 4096),
    )
    .map_err(sys("SO_SNDBUF"))?;
    thread_local! {
        static BUFS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = std::cell::RefCell::new((
            vec![0u8; limits::MAX_MAIN_REQUEST],
            vec![0u8; full_cmsg_space()],
        ));
    }
    BUFS.with(|b| {
        let (buf, cmsg) = &mut *b.borrow_mut();
        seqpacket_packets(&mut u, host, plugin, buf, cmsg)
    })
}

fn seqpacket_packets(
    u: &mut Unstructured<'_>,
    host: OwnedFd,
    plugin: OwnedFd,
    buf: &mut [u8],
    cmsg: &mut [u8],
) -> Result<usize, ModelError> {
    let mut received = 0;
    let packets = u.int_in_range(1..=6).unwrap_or(1);
    for _ in 0..packets {
        let Ok(spec) = PacketSpec::arbitrary(u) else {
            break;
        };
        let payload = vec![spec.fill; spec.len];
        let mut fds: Vec<OwnedFd> = Vec::new();
        if spec.count > 0 {
            let kind = if spec.fds == FdKind::None {
                FdKind::EventFd
            } else {
                spec.fds
            };
            let (first, _) = make_fds(kind, 1)?;
            fds.extend(first);
            while fds.len() < spec.count {
                let dup = fds[0].try_clone().map_err(|_| ModelError::Sys {
                    what: "dup",
                    source: Errno::EMFILE,
                })?;
                fds.push(dup);
            }
        }
        let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
        match send_packet(plugin.as_fd(), &payload, &borrowed) {
            Ok(()) => {}
            // The queue is full or the packet is too big for the socket:
            // nothing was sent.
            Err(FramingError::Send(Errno::EAGAIN | Errno::EMSGSIZE | Errno::ENOBUFS)) => continue,
            Err(e) => return Err(invariant(format!("send failed: {e}"))),
        }
        let got = recv_packet_with(host.as_fd(), buf, cmsg, 1);
        received += 1;
        match got {
            Err(FramingError::Truncated(n)) => {
                if spec.len <= buf.len() || n != buf.len() {
                    return Err(invariant(format!("{} bytes reported truncated", spec.len)));
                }
            }
            Err(FramingError::Closed) => {
                if spec.len != 0 || spec.count != 0 {
                    return Err(invariant(
                        "a packet was taken for the end of the connection",
                    ));
                }
            }
            Err(e) => return Err(invariant(format!("recv failed: {e}"))),
            Ok(p) => {
                if spec.len > buf.len() {
                    return Err(invariant("an oversized packet was not reported"));
                }
                if p.len != spec.len || buf[..p.len].iter().any(|b| *b != spec.fill) {
                    return Err(invariant("payload differs"));
                }
                if p.fds.len() != spec.count.min(1) || p.fds_truncated != (spec.count > 1) {
                    return Err(invariant(format!(
                        "{} descriptors sent, {} kept, truncated {}",
                        spec.count,
                        p.fds.len(),
                        p.fds_truncated
                    )));
                }
                if let (Some(a), Some(b)) = (p.fds.first(), fds.first()) {
                    if !same_file(a, b) {
                        return Err(invariant("the kept descriptor is not the one sent"));
                    }
                }
            }
        }
    }
    // Nothing more queued: the non-blocking receive says so.
    match recv_packet_with(host.as_fd(), buf, cmsg, 1) {
        Err(FramingError::Recv(Errno::EAGAIN)) => {}
        other => return Err(invariant(format!("empty queue gave {other:?}"))),
    }
    drop(plugin);
    match recv_packet_with(host.as_fd(), buf, cmsg, 1) {
        Err(FramingError::Closed) => {}
        other => return Err(invariant(format!("closed peer gave {other:?}"))),
    }
    Ok(received)
}
