//! The live-migration stream of vmm (docs/migration-stream.md): what a
//! source `vmm` sends a target `vmm --incoming` over one byte stream (a
//! unix or TCP socket), and the replies that come back.
//!
//! Trust boundary: every byte from the peer is hostile. Every length is
//! checked against its bound before anything is allocated, frames must
//! come in the documented order, page frames must land inside the regions
//! the header announced, and an unknown frame kind is an error naming it.
//!
//! ```text
//! source -> target:  "VMMMIGR\0" u32-version
//!                    Header  (Pages* RoundEnd)*  Pages*  State  End
//! target -> source:  Receiving (its plugin set up memory: pages go in)
//! target -> source:  Ready | Error
//! source -> target:  Commit
//! target -> source:  Done | Error
//! ```
//!
//! Every frame is `u8 kind, u32 length (LE), payload`; integers are
//! little-endian. [`plan`] holds the pre-copy round logic, plain code
//! tested without KVM.

use std::io::{Read, Write};

use vmm_snapshot::{Records, RecordsError};

pub mod plan;

/// The stream's first eight bytes.
pub const MAGIC: &[u8; 8] = b"VMMMIGR\0";
/// The stream version this build writes and reads.
pub const VERSION: u32 = 1;
/// Guest page size of the page frames.
pub const PAGE: usize = 4096;
/// Most pages in one `Pages` frame (1 MiB of data).
pub const MAX_FRAME_PAGES: u32 = 256;
/// Most memory regions a header may announce.
pub const MAX_REGIONS: usize = 256;
/// Most vcpus a header may announce.
pub const MAX_VCPUS: u32 = 4096;
/// Largest header payload.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest `State` payload: VM records, every vcpu's records, the
/// plugin's device state (at most 16 MiB of it).
pub const MAX_STATE: usize = 64 << 20;
/// Longest `Error` message.
pub const MAX_MESSAGE: usize = 4096;

const PAGES_HEAD: usize = 4 + 8 + 4;

/// Frame kinds.
pub mod kind {
    pub const HEADER: u8 = 1;
    pub const PAGES: u8 = 2;
    pub const ROUND_END: u8 = 3;
    pub const STATE: u8 = 4;
    pub const END: u8 = 5;
    pub const READY: u8 = 0x81;
    pub const ERROR: u8 = 0x82;
    pub const COMMIT: u8 = 0x83;
    pub const DONE: u8 = 0x84;
    pub const RECEIVING: u8 = 0x85;
}

/// Why a stream or reply could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the peer closed the connection {during}")]
    Closed { during: &'static str },
    #[error("the peer is not a vmm migration source (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("the stream is version {found}; this vmm reads version {VERSION}")]
    Version { found: u32 },
    #[error("unknown frame kind {kind:#04x} at byte {offset}")]
    UnknownFrame { kind: u8, offset: u64 },
    #[error("{frame} frame of {len} bytes at byte {offset} (at most {max})")]
    TooLong {
        frame: &'static str,
        len: u64,
        max: u64,
        offset: u64,
    },
    #[error("malformed {frame} frame at byte {offset}: {why}")]
    Malformed {
        frame: &'static str,
        offset: u64,
        why: String,
    },
    #[error("{frame} frame at byte {offset} out of order: {why}")]
    Order {
        frame: &'static str,
        offset: u64,
        why: String,
    },
    #[error("the stream's checksum is {actual:#010x}, its End frame says {expected:#010x}")]
    Crc { expected: u32, actual: u32 },
    #[error("the peer reported an error: {0}")]
    Peer(String),
    #[error("expected {expected}, the peer sent {got}")]
    UnexpectedReply {
        expected: &'static str,
        got: &'static str,
    },
    #[error("the {what} records are malformed")]
    Records {
        what: String,
        #[source]
        source: RecordsError,
    },
}

type Result<T> = std::result::Result<T, StreamError>;

/// `TooLong` unless a `frame` of `len` bytes at byte `offset` is within `max`.
fn within(frame: &'static str, len: usize, max: usize, offset: u64) -> Result<()> {
    if len > max {
        return Err(StreamError::TooLong {
            frame,
            len: len as u64,
            max: max as u64,
            offset,
        });
    }
    Ok(())
}

/// A guest memory region as the source has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
}

impl Region {
    /// Pages in the region (a partial last page counts).
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(PAGE as u64)
    }
}

/// The first frame: what the target must check before it starts anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub vcpus: u32,
    pub regions: Vec<Region>,
    /// Facts about the source as snapshot records: `cpuid` (vcpu 0's
    /// CPUID as set, the snapshot's encoding), `vmm` (its version).
    pub facts: Records,
}

/// The machine's state, sent once every vcpu is parked.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub vm: Records,
    pub vcpus: Vec<Records>,
    /// The plugin's device state (empty: none).
    pub device: Vec<u8>,
}

/// One frame of the source's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Header(Header),
    /// `count` pages of region `region` from page `first_page` on.
    Pages {
        region: u32,
        first_page: u64,
        count: u32,
        data: Vec<u8>,
    },
    RoundEnd {
        round: u32,
        pages: u64,
    },
    State(State),
    End {
        crc: u32,
    },
}

impl Frame {
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Header(_) => "Header",
            Frame::Pages { .. } => "Pages",
            Frame::RoundEnd { .. } => "RoundEnd",
            Frame::State(_) => "State",
            Frame::End { .. } => "End",
        }
    }
}

/// A reply (target to source, or the source's `Commit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The target's plugin set up its memory; the pages go straight in.
    Receiving,
    Ready,
    Error(String),
    Commit,
    Done,
}

impl Reply {
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Receiving => "Receiving",
            Reply::Ready => "Ready",
            Reply::Error(_) => "Error",
            Reply::Commit => "Commit",
            Reply::Done => "Done",
        }
    }
}

fn kind_name(k: u8) -> Option<&'static str> {
    Some(match k {
        kind::HEADER => "Header",
        kind::PAGES => "Pages",
        kind::ROUND_END => "RoundEnd",
        kind::STATE => "State",
        kind::END => "End",
        kind::READY => "Ready",
        kind::ERROR => "Error",
        kind::COMMIT => "Commit",
        kind::DONE => "Done",
        kind::RECEIVING => "Receiving",
        _ => return None,
    })
}

fn max_len(k: u8) -> usize {
    match k {
        kind::HEADER => MAX_HEADER,
        kind::PAGES => PAGES_HEAD + MAX_FRAME_PAGES as usize * PAGE,
        kind::ROUND_END => 12,
        kind::STATE => MAX_STATE,
        kind::END => 4,
        kind::ERROR => MAX_MESSAGE,
        _ => 0,
    }
}

/// Writes the source's stream; keeps the checksum the `End` frame carries.
pub struct Writer<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the magic and version.
    pub fn new(mut out: W) -> Result<Writer<W>> {
        let mut crc = crc32fast::Hasher::new();
        let mut pre = [0u8; 12];
        pre[..8].copy_from_slice(MAGIC);
        pre[8..].copy_from_slice(&VERSION.to_le_bytes());
        out.write_all(&pre).map_err(io("send the stream's magic"))?;
        crc.update(&pre);
        Ok(Writer {
            out,
            crc,
            bytes: 12,
        })
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn frame(&mut self, k: u8, parts: &[&[u8]]) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len <= max_len(k));
        let mut head = [0u8; 5];
        head[0] = k;
        head[1..].copy_from_slice(&(len as u32).to_le_bytes());
        self.out.write_all(&head).map_err(io("send a frame"))?;
        self.crc.update(&head);
        for p in parts {
            self.out.write_all(p).map_err(io("send a frame"))?;
            self.crc.update(p);
        }
        self.bytes += 5 + len as u64;
        Ok(())
    }

    pub fn header(&mut self, h: &Header) -> Result<()> {
        let mut b = Vec::new();
        b.extend_from_slice(&h.vcpus.to_le_bytes());
        b.extend_from_slice(&(h.regions.len() as u32).to_le_bytes());
        for r in &h.regions {
            b.extend_from_slice(&r.gpa.to_le_bytes());
            b.extend_from_slice(&r.size.to_le_bytes());
        }
        b.extend_from_slice(&h.facts.encode());
        within("Header", b.len(), MAX_HEADER, self.bytes)?;
        self.frame(kind::HEADER, &[&b])
    }

    /// `data`: whole pages, at most [`MAX_FRAME_PAGES`] of them.
    pub fn pages(&mut self, region: u32, first_page: u64, data: &[u8]) -> Result<()> {
        let count = data.len() / PAGE;
        assert!(
            data.len().is_multiple_of(PAGE) && count <= MAX_FRAME_PAGES as usize,
            "a Pages frame carries whole pages, at most MAX_FRAME_PAGES"
        );
        let mut head = [0u8; PAGES_HEAD];
        head[..4].copy_from_slice(&region.to_le_bytes());
        head[4..12].copy_from_slice(&first_page.to_le_bytes());
        head[12..].copy_from_slice(&(count as u32).to_le_bytes());
        self.frame(kind::PAGES, &[&head, data])
    }

    pub fn round_end(&mut self, round: u32, pages: u64) -> Result<()> {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&round.to_le_bytes());
        b[4..].copy_from_slice(&pages.to_le_bytes());
        self.frame(kind::ROUND_END, &[&b])
    }

    pub fn state(&mut self, s: &State) -> Result<()> {
        let mut b = Vec::new();
        b.extend_from_slice(&(s.vcpus.len() as u32).to_le_bytes());
        let blob = |b: &mut Vec<u8>, bytes: &[u8]| {
            b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            b.extend_from_slice(bytes);
        };
        blob(&mut b, &s.vm.encode());
        for v in &s.vcpus {
            blob(&mut b, &v.encode());
        }
        blob(&mut b, &s.device);
        within("State", b.len(), MAX_STATE, self.bytes)?;
        self.frame(kind::STATE, &[&b])
    }

    /// The `End` frame with the checksum of every byte before it.
    pub fn end(&mut self) -> Result<()> {
        let crc = self.crc.clone().finalize();
        self.frame(kind::END, &[&crc.to_le_bytes()])?;
        self.flush()
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(io("send the stream"))
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    move |source| StreamError::Io { what, source }
}

/// Reads exactly `buf.len()` bytes; end of file is [`StreamError::Closed`].
fn read_exact(r: &mut impl Read, buf: &mut [u8], during: &'static str) -> Result<()> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(StreamError::Closed { during })
        }
        Err(source) => Err(StreamError::Io {
            what: "read the migration stream",
            source,
        }),
    }
}

/// Bytes of a frame's payload read ahead of what has arrived: the buffer
/// grows by at most this much per read.
const READ_STEP: usize = 1 << 20;

/// Reads the payload of `len` bytes (already checked against its frame's
/// bound) of the frame `frame` at `offset`, growing the buffer only as the bytes arrive: a peer that
/// announces a large frame and sends little costs at most [`READ_STEP`]
/// beyond what it sent, not the announced length.
fn read_payload(
    r: &mut impl Read,
    len: usize,
    frame: &'static str,
    offset: u64,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < len {
        let start = out.len();
        let n = (len - start).min(READ_STEP);
        out.try_reserve(n).map_err(|_| StreamError::Malformed {
            frame,
            offset,
            why: format!("no memory for {len} bytes"),
        })?;
        out.resize(start + n, 0);
        read_exact(r, &mut out[start..], "in the middle of a frame")?;
    }
    Ok(out)
}

/// Where the reader is in the stream's grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Header,
    Pages,
    End,
    Finished,
}

/// Reads and checks the source's stream (see the module docs).
pub struct Reader<R: Read> {
    input: R,
    crc: crc32fast::Hasher,
    offset: u64,
    stage: Stage,
    regions: Vec<Region>,
    vcpus: u32,
    last_round: Option<u32>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

impl<R: Read> Reader<R> {
    /// Reads and checks the magic and the version.
    pub fn new(mut input: R) -> Result<Reader<R>> {
        let mut pre = [0u8; 12];
        read_exact(
            &mut input,
            &mut pre[..8],
            "before sending the stream's magic",
        )?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&pre[..8]);
        if &magic != MAGIC {
            return Err(StreamError::BadMagic(magic));
        }
        read_exact(
            &mut input,
            &mut pre[8..],
            "before sending the stream's version",
        )?;
        let found = u32_at(&pre, 8);
        if found != VERSION {
            return Err(StreamError::Version { found });
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&pre);
        Ok(Reader {
            input,
            crc,
            offset: 12,
            stage: Stage::Header,
            regions: Vec::new(),
            vcpus: 0,
            last_round: None,
        })
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }

    /// Whether the `End` frame was read (and checked).
    pub fn finished(&self) -> bool {
        self.stage == Stage::Finished
    }

    /// The next frame, checked against the header and the grammar.
    pub fn next_frame(&mut self) -> Result<Frame> {
        let at = self.offset;
        if self.stage == Stage::Finished {
            return Err(StreamError::Order {
                frame: "any",
                offset: at,
                why: "the stream already ended".into(),
            });
        }
        let mut head = [0u8; 5];
        read_exact(&mut self.input, &mut head, "in the middle of the stream")?;
        let k = head[0];
        let len = u32_at(&head, 1) as usize;
        let name = match kind_name(k) {
            Some(n) if k < 0x80 => n,
            _ => {
                return Err(StreamError::UnknownFrame {
                    kind: k,
                    offset: at,
                })
            }
        };
        within(name, len, max_len(k), at)?;
        let order = |why: &str| StreamError::Order {
            frame: name,
            offset: at,
            why: why.into(),
        };
        match (self.stage, k) {
            (Stage::Header, kind::HEADER) => {}
            (Stage::Header, _) => return Err(order("the stream must begin with its Header")),
            (_, kind::HEADER) => return Err(order("a second Header")),
            (Stage::Pages, kind::END) => return Err(order("End before State")),
            (Stage::End, kind::END) => {}
            (Stage::End, _) => return Err(order("only End may follow State")),
            _ => {}
        }
        let expected_crc = self.crc.clone().finalize();
        self.crc.update(&head);
        let mut payload = read_payload(&mut self.input, len, name, at)?;
        if k != kind::END {
            self.crc.update(&payload);
        }
        self.offset += 5 + len as u64;
        let bad = |why: String| StreamError::Malformed {
            frame: name,
            offset: at,
            why,
        };
        let frame = match k {
            kind::HEADER => {
                let h = parse_header(&payload).map_err(bad)?;
                self.regions = h.regions.clone();
                self.vcpus = h.vcpus;
                self.stage = Stage::Pages;
                Frame::Header(h)
            }
            kind::PAGES => {
                if len < PAGES_HEAD {
                    return Err(bad(format!("{len} bytes, shorter than its head")));
                }
                let region = u32_at(&payload, 0);
                let first_page = u64_at(&payload, 4);
                let count = u32_at(&payload, 12);
                if count == 0 || count > MAX_FRAME_PAGES {
                    return Err(bad(format!(
                        "{count} pages (1 to {MAX_FRAME_PAGES} per frame)"
                    )));
                }
                if len != PAGES_HEAD + count as usize * PAGE {
                    return Err(bad(format!(
                        "{count} pages need {} bytes of data, the frame has {}",
                        count as usize * PAGE,
                        len - PAGES_HEAD
                    )));
                }
                let Some(r) = self.regions.get(region as usize) else {
                    return Err(bad(format!(
                        "region {region} (the header announced {})",
                        self.regions.len()
                    )));
                };
                if first_page
                    .checked_add(u64::from(count))
                    .is_none_or(|end| end > r.pages())
                {
                    return Err(bad(format!(
                        "pages {first_page}+{count} are outside region {region} ({} pages)",
                        r.pages()
                    )));
                }
                payload.drain(..PAGES_HEAD);
                Frame::Pages {
                    region,
                    first_page,
                    count,
                    data: payload,
                }
            }
            kind::ROUND_END => {
                if len != 12 {
                    return Err(bad(format!("{len} bytes, expected 12")));
                }
                let round = u32_at(&payload, 0);
                if self.last_round.is_some_and(|r| round <= r) {
                    return Err(order("round numbers must increase"));
                }
                self.last_round = Some(round);
                Frame::RoundEnd {
                    round,
                    pages: u64_at(&payload, 4),
                }
            }
            kind::STATE => {
                let s = parse_state(&payload).map_err(bad)?;
                if s.vcpus.len() != self.vcpus as usize {
                    return Err(bad(format!(
                        "state for {} vcpus, the header announced {}",
                        s.vcpus.len(),
                        self.vcpus
                    )));
                }
                self.stage = Stage::End;
                Frame::State(s)
            }
            kind::END => {
                if len != 4 {
                    return Err(bad(format!("{len} bytes, expected 4")));
                }
                let crc = u32_at(&payload, 0);
                if crc != expected_crc {
                    return Err(StreamError::Crc {
                        expected: crc,
                        actual: expected_crc,
                    });
                }
                self.stage = Stage::Finished;
                Frame::End { crc }
            }
            _ => {
                return Err(StreamError::UnknownFrame {
                    kind: k,
                    offset: at,
                })
            }
        };
        Ok(frame)
    }
}

fn parse_header(b: &[u8]) -> std::result::Result<Header, String> {
    if b.len() < 8 {
        return Err(format!("{} bytes, shorter than its head", b.len()));
    }
    let vcpus = u32_at(b, 0);
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(format!("{vcpus} vcpus (1 to {MAX_VCPUS})"));
    }
    let n = u32_at(b, 4) as usize;
    if n > MAX_REGIONS {
        return Err(format!("{n} regions (at most {MAX_REGIONS})"));
    }
    let end = 8 + n * 16;
    if b.len() < end {
        return Err(format!(
            "{n} regions need {end} bytes, the frame has {}",
            b.len()
        ));
    }
    let mut regions = Vec::with_capacity(n);
    for i in 0..n {
        let r = Region {
            gpa: u64_at(b, 8 + i * 16),
            size: u64_at(b, 16 + i * 16),
        };
        if r.size == 0 || r.gpa.checked_add(r.size).is_none() {
            return Err(format!(
                "region {i} at {:#x} of {:#x} bytes is empty or wraps",
                r.gpa, r.size
            ));
        }
        if !r.gpa.is_multiple_of(PAGE as u64) {
            return Err(format!("region {i} at {:#x} is not page-aligned", r.gpa));
        }
        if let Some(j) = regions
            .iter()
            .position(|o: &Region| r.gpa < o.gpa + o.size && o.gpa < r.gpa + r.size)
        {
            return Err(format!("region {i} overlaps region {j}"));
        }
        regions.push(r);
    }
    let facts = Records::decode(&b[end..]).map_err(|e| format!("its facts: {e}"))?;
    Ok(Header {
        vcpus,
        regions,
        facts,
    })
}

fn parse_state(b: &[u8]) -> std::result::Result<State, String> {
    if b.len() < 4 {
        return Err("cut short before the vcpu count".into());
    }
    let n = u32_at(b, 0);
    if n == 0 || n > MAX_VCPUS {
        return Err(format!("{n} vcpus (1 to {MAX_VCPUS})"));
    }
    let mut at = 4usize;
    let mut take = |what: String| -> std::result::Result<&[u8], String> {
        if b.len() - at < 4 {
            return Err(format!("cut short before {what}"));
        }
        let len = u32_at(b, at) as usize;
        at += 4;
        if b.len() - at < len {
            return Err(format!("{what} of {len} bytes runs past the frame"));
        }
        let s = &b[at..at + len];
        at += len;
        Ok(s)
    };
    let vm = Records::decode(take("the VM records".into())?)
        .map_err(|e| format!("the VM records: {e}"))?;
    let mut vcpus = Vec::with_capacity(n.min(64) as usize);
    for i in 0..n {
        let r = Records::decode(take(format!("vcpu {i}'s records"))?)
            .map_err(|e| format!("vcpu {i}'s records: {e}"))?;
        vcpus.push(r);
    }
    let device = take("the device state".into())?.to_vec();
    if at != b.len() {
        return Err(format!("{} bytes after the device state", b.len() - at));
    }
    Ok(State { vm, vcpus, device })
}

/// Writes a reply (or the source's `Commit`).
pub fn write_reply(out: &mut impl Write, r: &Reply) -> Result<()> {
    let (k, payload): (u8, &[u8]) = match r {
        Reply::Receiving => (kind::RECEIVING, &[]),
        Reply::Ready => (kind::READY, &[]),
        Reply::Commit => (kind::COMMIT, &[]),
        Reply::Done => (kind::DONE, &[]),
        Reply::Error(m) => {
            let mut cut = m.len().min(MAX_MESSAGE);
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            (kind::ERROR, &m.as_bytes()[..cut])
        }
    };
    let mut b = Vec::with_capacity(5 + payload.len());
    b.push(k);
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    out.write_all(&b).map_err(io("send a reply"))?;
    out.flush().map_err(io("send a reply"))
}

/// Reads one reply.
pub fn read_reply(input: &mut impl Read) -> Result<Reply> {
    let mut head = [0u8; 5];
    read_exact(input, &mut head, "before replying")?;
    let len = u32_at(&head, 1) as usize;
    let name = match kind_name(head[0]) {
        Some(n) if head[0] >= 0x80 => n,
        _ => {
            return Err(StreamError::UnknownFrame {
                kind: head[0],
                offset: 0,
            })
        }
    };
    within(name, len, max_len(head[0]), 0)?;
    let mut payload = vec![0u8; len];
    read_exact(input, &mut payload, "in the middle of a reply")?;
    Ok(match head[0] {
        kind::READY => Reply::Ready,
        kind::COMMIT => Reply::Commit,
        kind::DONE => Reply::Done,
        kind::RECEIVING => Reply::Receiving,
        _ => Reply::Error(String::from_utf8_lossy(&payload).into_owned()),
    })
}

/// Reads a reply and insists on `want` (an `Error` reply is
/// [`StreamError::Peer`]).
pub fn expect_reply(input: &mut impl Read, want: Reply) -> Result<()> {
    match read_reply(input)? {
        Reply::Error(m) => Err(StreamError::Peer(m)),
        r if r == want => Ok(()),
        r => Err(StreamError::UnexpectedReply {
            expected: want.name(),
            got: r.name(),
        }),
    }
}

/// What a whole stream held (for the fuzz target and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub vcpus: u32,
    pub regions: usize,
    pub pages: u64,
    pub rounds: u32,
    pub device_bytes: usize,
}

/// Reads a whole stream from `bytes` and checks it, up to its `End`.
pub fn parse_stream(bytes: &[u8]) -> Result<Summary> {
    let mut r = Reader::new(bytes)?;
    let mut s = Summary::default();
    loop {
        match r.next_frame()? {
            Frame::Header(h) => {
                s.vcpus = h.vcpus;
                s.regions = h.regions.len();
            }
            Frame::Pages { count, .. } => s.pages += u64::from(count),
            Frame::RoundEnd { .. } => s.rounds += 1,
            Frame::State(st) => s.device_bytes = st.device.len(),
            Frame::End { .. } => return Ok(s),
        }
    }
}

#[cfg(test)]
mod tests;

/// The fuzz target's body (fuzz/fuzz_targets/migration_stream.rs; the
/// committed inputs are replayed by vmm-model's fuzz_replay test): byte 0
/// picks the stream (even) or reply (odd) parser. Whatever parses as a
/// stream must also parse after being written again.
pub fn fuzz_one(data: &[u8]) {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 1 {
        let _ = read_reply(&mut &rest[..]);
        return;
    }
    let Ok(mut r) = Reader::new(rest) else {
        return;
    };
    let mut w = Writer::new(Vec::new()).expect("writing to memory");
    while let Ok(f) = r.next_frame() {
        match &f {
            Frame::Header(h) => w.header(h).expect("a parsed header re-encodes"),
            Frame::Pages {
                region,
                first_page,
                data,
                ..
            } => w.pages(*region, *first_page, data).expect("re-encodes"),
            Frame::RoundEnd { round, pages } => w.round_end(*round, *pages).expect("re-encodes"),
            Frame::State(s) => w.state(s).expect("re-encodes"),
            Frame::End { .. } => {
                w.end().expect("re-encodes");
                parse_stream(w.get_mut()).expect("a re-written stream parses");
                return;
            }
        }
    }
}
