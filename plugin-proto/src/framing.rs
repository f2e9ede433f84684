//! Framing for the two transports of the protocol.
//!
//! * Main connections are `SOCK_SEQPACKET` sockets: one packet is one
//!   serialized message, descriptors ride along as `SCM_RIGHTS`.
//! * Vcpu channels are pipe pairs: requests (plugin → host) are bare messages,
//!   one `write()` each; responses (host → plugin) are prefixed with a
//!   protobuf varint length and written with a single `write()` each.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use protobuf::Message;

/// Size of the buffer a receiver uses for one main-connection packet and for
/// one read of a vcpu pipe (the pipe capacity the host requests, too).
pub const MAX_MESSAGE_SIZE: usize = 0x40000;

/// Buffer size the reference host used for one `MainRequest`. Every host must
/// accept at least this much.
pub const MIN_MAIN_REQUEST_SIZE: usize = 4096;

/// Largest number of descriptors the kernel passes in one `sendmsg`
/// (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("sending a packet failed")]
    Send(#[source] Errno),
    #[error("receiving a packet failed")]
    Recv(#[source] Errno),
    #[error("the packet was larger than the {0}-byte receive buffer")]
    Truncated(usize),
    #[error("writing to the vcpu pipe failed")]
    Write(#[source] Errno),
    #[error("short write to the vcpu pipe ({written} of {len} bytes)")]
    ShortWrite { written: usize, len: usize },
    #[error("reading from the vcpu pipe failed")]
    Read(#[source] Errno),
    #[error("the peer closed the channel")]
    Closed,
    #[error("a length prefix on the vcpu channel is malformed")]
    BadPrefix,
    #[error("a framed message of {0} bytes exceeds the {MAX_MESSAGE_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("protobuf encoding failed")]
    Encode(#[source] protobuf::Error),
    #[error("protobuf decoding failed")]
    Decode(#[source] protobuf::Error),
    #[error("a length-delimited field claims {claimed} bytes but only {left} follow")]
    BadLength { claimed: u64, left: usize },
    #[error("the message ends in the middle of a field")]
    Incomplete,
    #[error("a varint in the message is longer than 10 bytes")]
    BadVarint,
}

impl FramingError {
    /// The errno a C caller should see for this error.
    pub fn errno(&self) -> Errno {
        match self {
            FramingError::Send(e)
            | FramingError::Recv(e)
            | FramingError::Write(e)
            | FramingError::Read(e) => *e,
            FramingError::ShortWrite { .. } => Errno::EIO,
            FramingError::Truncated(_) | FramingError::TooLarge(_) => Errno::EMSGSIZE,
            // The reference client reports EOF, undecodable replies and
            // partial frames as EINVAL.
            FramingError::Closed
            | FramingError::BadPrefix
            | FramingError::Decode(_)
            | FramingError::BadLength { .. }
            | FramingError::Incomplete
            | FramingError::BadVarint => Errno::EINVAL,
            FramingError::Encode(_) => Errno::EINVAL,
        }
    }
}

pub type Result<T> = std::result::Result<T, FramingError>;

/// A received main-connection packet.
#[derive(Debug)]
pub struct Packet {
    /// Number of payload bytes placed at the start of the caller's buffer.
    pub len: usize,
    /// Descriptors received with it, owned (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The sender attached more descriptors than `max_fds`; the kernel closed
    /// the excess.
    pub fds_truncated: bool,
}

/// Sends one packet with `fds` attached as `SCM_RIGHTS`.
pub fn send_packet(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
    let iov = [IoSlice::new(bytes)];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(FramingError::Send(e)),
        }
    }
}

/// Serializes `msg` into `scratch` (reused between calls) and sends it.
pub fn send_message<M: Message>(
    sock: BorrowedFd<'_>,
    msg: &M,
    fds: &[BorrowedFd<'_>],
    scratch: &mut Vec<u8>,
) -> Result<()> {
    scratch.clear();
    msg.write_to_vec(scratch).map_err(FramingError::Encode)?;
    send_packet(sock, scratch, fds)
}

/// Space in bytes of a control buffer able to carry `n` descriptors.
pub fn cmsg_space_for_fds(n: usize) -> usize {
    let payload = u32::try_from(n * std::mem::size_of::<RawFd>()).unwrap_or(u32::MAX);
    // SAFETY: CMSG_SPACE is a pure arithmetic macro over its argument.
    unsafe { libc::CMSG_SPACE(payload) as usize }
}

/// Control-buffer size that holds every descriptor one packet can carry, so
/// the kernel never truncates (and silently drops) any of them.
pub fn full_cmsg_space() -> usize {
    cmsg_space_for_fds(SCM_MAX_FD)
}

/// Receives one packet into `buf` (its whole length is offered), keeping up to
/// `max_fds` descriptors (extra ones are closed and `fds_truncated` is set). A
/// 0-byte packet with no descriptors means the peer closed the connection and
/// is reported as [`FramingError::Closed`].
pub fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> Result<Packet> {
    let mut cmsg_buf = vec![0u8; full_cmsg_space()];
    recv_packet_with(sock, buf, &mut cmsg_buf, max_fds)
}

/// Like [`recv_packet`] but with a caller-provided control buffer of at least
/// [`full_cmsg_space`] bytes, so a receive loop need not allocate.
pub fn recv_packet_with(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg_buf: &mut [u8],
    max_fds: usize,
) -> Result<Packet> {
    if cmsg_buf.len() < full_cmsg_space() {
        return Err(FramingError::Recv(Errno::ENOBUFS));
    }
    let buf_len = buf.len();
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut *cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(FramingError::Recv(e)),
        }
    };
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(FramingError::Recv)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our table for this
                // message; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let fds_truncated = fds.len() > max_fds;
    fds.truncate(max_fds);
    let len = msg.bytes;
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(FramingError::Truncated(buf_len));
    }
    if len == 0 && fds.is_empty() && !fds_truncated {
        return Err(FramingError::Closed);
    }
    Ok(Packet {
        len,
        fds,
        fds_truncated,
    })
}

/// Writes all of `bytes` with one `write()` (pipe writes up to `PIPE_BUF` are
/// atomic; larger ones are still one call, the reader copes with pieces).
pub fn write_all_once(fd: BorrowedFd<'_>, bytes: &[u8]) -> Result<()> {
    loop {
        match nix::unistd::write(fd, bytes) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(FramingError::ShortWrite {
                    written: n,
                    len: bytes.len(),
                })
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(FramingError::Write(e)),
        }
    }
}

/// Writes a bare vcpu request (plugin → host): serialized into `scratch`,
/// sent with one `write()`.
pub fn write_vcpu_request<M: Message>(
    fd: BorrowedFd<'_>,
    msg: &M,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    scratch.clear();
    msg.write_to_vec(scratch).map_err(FramingError::Encode)?;
    write_all_once(fd, scratch)
}

/// Writes a length-delimited vcpu response (host → plugin) with one `write()`.
pub fn write_vcpu_response<M: Message>(
    fd: BorrowedFd<'_>,
    msg: &M,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    encode_delimited(msg, scratch)?;
    write_all_once(fd, scratch)
}

/// Encodes `msg` with its varint length prefix into `out` (cleared first).
pub fn encode_delimited<M: Message>(msg: &M, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    msg.write_length_delimited_to_vec(out)
        .map_err(FramingError::Encode)
}

/// Appends `v` as a protobuf varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Bytes `v` takes as a varint.
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Decodes a protobuf varint at the start of `buf`: `Some((value, prefix_len))`
/// or `None` when more bytes are needed. Over-long varints are an error.
pub fn decode_varint(buf: &[u8]) -> Result<Option<(u64, usize)>> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate() {
        if i == 10 || (i == 9 && *byte > 1) {
            return Err(FramingError::BadPrefix);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Ok(None)
}

/// Skips one field body of wire type `wire` at the start of `buf` (whose key
/// was already read); returns the rest, the body of a length-delimited field,
/// or `None` for wire types left to the protobuf decoder (groups, invalid).
fn skip_field(buf: &[u8], wire: u64) -> Result<Option<(&[u8], &[u8])>> {
    let need = |n: usize| {
        if buf.len() >= n {
            Ok(Some((&buf[n..], &buf[..0])))
        } else {
            Err(FramingError::Incomplete)
        }
    };
    match wire {
        0 => match decode_varint(buf).map_err(|_| FramingError::BadVarint)? {
            Some((_, n)) => Ok(Some((&buf[n..], &buf[..0]))),
            None => Err(FramingError::Incomplete),
        },
        1 => need(8),
        5 => need(4),
        2 => {
            let (len, n) = decode_varint(buf)
                .map_err(|_| FramingError::BadVarint)?
                .ok_or(FramingError::Incomplete)?;
            let rest = &buf[n..];
            if len > rest.len() as u64 {
                return Err(FramingError::BadLength {
                    claimed: len,
                    left: rest.len(),
                });
            }
            let (body, rest) = rest.split_at(len as usize);
            Ok(Some((rest, body)))
        }
        _ => Ok(None),
    }
}

/// Checks the framing of a serialized message before it is decoded: every
/// field at the top level (and inside the length-delimited top-level fields
/// numbered in `nested`) is complete and no length prefix claims more bytes
/// than follow.
///
/// rust-protobuf is lenient on both counts when decoding a whole buffer: a
/// message cut inside a nested message decodes as if the nested message
/// ended there, and a packed repeated field reserves room for the number of
/// elements its length *claims* (up to 10 million) before the bytes are
/// checked. A host must not act on a truncated request, nor let a 10-byte
/// request make it allocate 40 MB.
pub fn check_lengths(buf: &[u8], nested: &[u64]) -> Result<()> {
    let mut rest = buf;
    while !rest.is_empty() {
        let (key, n) = decode_varint(rest)
            .map_err(|_| FramingError::BadVarint)?
            .ok_or(FramingError::Incomplete)?;
        let Some((after, body)) = skip_field(&rest[n..], key & 7)? else {
            // Groups and invalid wire types: the decoder decides.
            return Ok(());
        };
        if key & 7 == 2 && nested.contains(&(key >> 3)) {
            check_lengths(body, &[])?;
        }
        rest = after;
    }
    Ok(())
}

/// Reads one bare request from a vcpu request pipe: a single `read()` into
/// `buf` (at least [`MAX_MESSAGE_SIZE`] long) holds exactly one message.
pub fn read_vcpu_request(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(0) => return Err(FramingError::Closed),
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(FramingError::Read(e)),
        }
    }
}

/// Splits the stream of a vcpu response pipe into messages. Several framed
/// responses may arrive in one read; a response split across reads is
/// reassembled (the reference client rejected that case, which a host writing
/// each response in one `write()` never produces).
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader {
            buf: vec![0; MAX_MESSAGE_SIZE],
            start: 0,
            end: 0,
        }
    }

    /// True when a complete or partial message is already buffered.
    pub fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    /// If a complete frame is buffered, returns its body's bounds.
    fn buffered_frame(&self) -> Result<Option<(usize, usize)>> {
        let avail = &self.buf[self.start..self.end];
        match decode_varint(avail)? {
            None => Ok(None),
            Some((len, prefix)) => {
                let len = usize::try_from(len).map_err(|_| FramingError::TooLarge(usize::MAX))?;
                if len > MAX_MESSAGE_SIZE - 10 {
                    return Err(FramingError::TooLarge(len));
                }
                if avail.len() - prefix >= len {
                    let body = self.start + prefix;
                    Ok(Some((body, body + len)))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Returns the next message body, reading from `fd` as needed.
    pub fn next_frame(&mut self, fd: BorrowedFd<'_>) -> Result<&[u8]> {
        loop {
            if let Some((body, end)) = self.buffered_frame()? {
                self.start = end;
                return Ok(&self.buf[body..end]);
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = loop {
                match nix::unistd::read(fd, &mut self.buf[self.end..]) {
                    Ok(n) => break n,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(FramingError::Read(e)),
                }
            };
            if n == 0 {
                return Err(FramingError::Closed);
            }
            self.end += n;
        }
    }

    /// Feeds bytes obtained elsewhere (tests, fuzzing) and pops complete
    /// frames without any I/O: `Ok(None)` when no full frame is buffered.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if bytes.len() > self.buf.len() - self.end {
            return Err(FramingError::TooLarge(self.end + bytes.len()));
        }
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
        Ok(())
    }

    /// Pops the next complete buffered frame, if any.
    pub fn pop_frame(&mut self) -> Result<Option<&[u8]>> {
        match self.buffered_frame()? {
            Some((body, end)) => {
                self.start = end;
                Ok(Some(&self.buf[body..end]))
            }
            None => Ok(None),
        }
    }
}
