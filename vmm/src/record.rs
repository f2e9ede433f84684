//! Recording what a plugin sends, for fuzzing seeds and regression replays.
//!
//! When the environment variable (documented in `vmm --help`)
//! `VMM_RECORD_DIR` names a directory, the host appends every main request
//! packet to `DIR/main-<pid>.session` and every vcpu request and delivered wait
//! reason to `DIR/vcpu<id>-<pid>.session`. When it is unset, the only cost on
//! the request paths is one atomic load ([`recorder`]).
//!
//! A session file is a sequence of records, the input format of the fuzz
//! targets and of the `vmm-model` crate's harnesses:
//!
//! ```text
//! kind: u8 | fd_kind: u8 | fd_arg: u16 LE | len: u16 LE | payload[len]
//! ```
//!
//! `fd_kind`/`fd_arg` describe the descriptors attached to a main request
//! ([`FdKind`]); replays make fresh descriptors of that kind. Unknown kinds
//! wrap around, so every byte string is a valid session.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::stat::{fstat, SFlag};
use plugin_proto::protobuf::Message;
use plugin_proto::vcpu_response;

/// The environment variable that turns recording on.
pub const RECORD_DIR_ENV: &str = "VMM_RECORD_DIR";

/// Bytes before each record's payload.
pub const HEADER_LEN: usize = 6;

/// Largest payload a record carries (longer packets are cut).
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// What a record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A main request packet, raw bytes.
    MainRequest,
    /// A vcpu request as read from the request pipe, raw bytes.
    VcpuRequest,
    /// A wait reason the host delivered (a serialized `VcpuResponse.Wait`).
    VcpuExit,
    /// A main request generated from the payload with `arbitrary`.
    MainStructured,
    /// A vcpu request generated from the payload with `arbitrary`.
    VcpuStructured,
    /// The plugin closed one of its extra main connections.
    CloseConnection,
    /// A wait reason generated from the payload with `arbitrary`.
    VcpuExitStructured,
}

impl RecordKind {
    const ALL: [RecordKind; 7] = [
        RecordKind::MainRequest,
        RecordKind::VcpuRequest,
        RecordKind::VcpuExit,
        RecordKind::MainStructured,
        RecordKind::VcpuStructured,
        RecordKind::CloseConnection,
        RecordKind::VcpuExitStructured,
    ];

    pub fn from_byte(b: u8) -> RecordKind {
        Self::ALL[usize::from(b) % Self::ALL.len()]
    }

    pub fn to_byte(self) -> u8 {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }
}

/// The descriptors attached to a main request, as a replay recreates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    None,
    /// A memfd of `arg` pages sealed with `F_SEAL_SHRINK`.
    SealedMemfd,
    /// A memfd of `arg` pages without seals.
    UnsealedMemfd,
    /// A memfd of `arg` pages sealed against shrinking and writing.
    WriteSealedMemfd,
    Pipe,
    EventFd,
    /// A regular file (not a memfd): no seals.
    RegularFile,
    Socket,
    /// `arg` descriptors (at least 2): more than the host accepts.
    Many,
}

impl FdKind {
    const ALL: [FdKind; 9] = [
        FdKind::None,
        FdKind::SealedMemfd,
        FdKind::UnsealedMemfd,
        FdKind::WriteSealedMemfd,
        FdKind::Pipe,
        FdKind::EventFd,
        FdKind::RegularFile,
        FdKind::Socket,
        FdKind::Many,
    ];

    pub fn from_byte(b: u8) -> FdKind {
        Self::ALL[usize::from(b) % Self::ALL.len()]
    }

    pub fn to_byte(self) -> u8 {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }
}

/// One record of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub fd_kind: FdKind,
    pub fd_arg: u16,
    pub payload: &'a [u8],
}

/// Splits a session into records; a truncated last record keeps what is
/// there, a trailing partial header is ignored.
pub fn records(mut data: &[u8]) -> impl Iterator<Item = Record<'_>> {
    std::iter::from_fn(move || {
        if data.len() < HEADER_LEN {
            return None;
        }
        let kind = RecordKind::from_byte(data[0]);
        let fd_kind = FdKind::from_byte(data[1]);
        let fd_arg = u16::from_le_bytes([data[2], data[3]]);
        let len = usize::from(u16::from_le_bytes([data[4], data[5]]));
        let rest = &data[HEADER_LEN..];
        let (payload, tail) = rest.split_at(len.min(rest.len()));
        data = tail;
        Some(Record {
            kind,
            fd_kind,
            fd_arg,
            payload,
        })
    })
}

/// Appends one record to `out`.
pub fn encode_record(
    out: &mut Vec<u8>,
    kind: RecordKind,
    fd_kind: FdKind,
    fd_arg: u16,
    payload: &[u8],
) {
    let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
    out.push(kind.to_byte());
    out.push(fd_kind.to_byte());
    out.extend_from_slice(&fd_arg.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Describes received descriptors the way a replay can recreate them.
pub fn classify_fds(fds: &[OwnedFd], truncated: bool) -> (FdKind, u16) {
    if fds.len() > 1 || truncated {
        let n = if truncated { fds.len() + 1 } else { fds.len() };
        return (FdKind::Many, u16::try_from(n).unwrap_or(u16::MAX));
    }
    let Some(fd) = fds.first() else {
        return (FdKind::None, 0);
    };
    let Ok(st) = fstat(fd.as_fd()) else {
        return (FdKind::None, 0);
    };
    let pages = u16::try_from((st.st_size.max(0) as u64).div_ceil(4096)).unwrap_or(u16::MAX);
    if let Ok(seals) = fcntl(fd, FcntlArg::F_GET_SEALS) {
        let seals = SealFlag::from_bits_truncate(seals);
        let kind = if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            FdKind::UnsealedMemfd
        } else if seals.contains(SealFlag::F_SEAL_WRITE) {
            FdKind::WriteSealedMemfd
        } else {
            FdKind::SealedMemfd
        };
        return (kind, pages);
    }
    let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    let kind = if fmt == SFlag::S_IFIFO {
        FdKind::Pipe
    } else if fmt == SFlag::S_IFSOCK {
        FdKind::Socket
    } else if fmt == SFlag::S_IFREG {
        FdKind::RegularFile
    } else {
        FdKind::EventFd
    };
    (kind, 0)
}

/// Appends records to the session files of one run.
pub struct Recorder {
    dir: PathBuf,
    main: Mutex<Option<File>>,
    vcpus: Mutex<HashMap<u32, File>>,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

/// The active recorder, if recording was turned on.
#[inline]
pub fn recorder() -> Option<&'static Recorder> {
    RECORDER.get()
}

/// Turns recording on when `VMM_RECORD_DIR` is set. Failures are only
/// logged: recording is a debugging aid.
pub fn init_from_env() {
    let Some(dir) = std::env::var_os(RECORD_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        log::warn!("cannot record into {}: {e}", dir.display());
        return;
    }
    log::info!("recording plugin requests into {}", dir.display());
    let _ = RECORDER.set(Recorder {
        dir,
        main: Mutex::new(None),
        vcpus: Mutex::new(HashMap::new()),
    });
}

fn open_session(dir: &Path, name: &str) -> Option<File> {
    let path = dir.join(format!("{name}-{}.session", std::process::id()));
    match File::options().create(true).append(true).open(&path) {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!("cannot record into {}: {e}", path.display());
            None
        }
    }
}

impl Recorder {
    fn append(file: &mut File, kind: RecordKind, fd_kind: FdKind, fd_arg: u16, payload: &[u8]) {
        let mut rec = Vec::with_capacity(HEADER_LEN + payload.len());
        encode_record(&mut rec, kind, fd_kind, fd_arg, payload);
        if let Err(e) = file.write_all(&rec) {
            log::warn!("recording failed: {e}");
        }
    }

    fn main_record(&self, kind: RecordKind, fd_kind: FdKind, fd_arg: u16, payload: &[u8]) {
        let mut main = self.main.lock().unwrap_or_else(|p| p.into_inner());
        if main.is_none() {
            *main = open_session(&self.dir, "main");
        }
        if let Some(f) = main.as_mut() {
            Self::append(f, kind, fd_kind, fd_arg, payload);
        }
    }

    /// A main request packet and its descriptors.
    pub fn main_request(&self, bytes: &[u8], fds: &[OwnedFd], truncated: bool) {
        let (fd_kind, fd_arg) = classify_fds(fds, truncated);
        self.main_record(RecordKind::MainRequest, fd_kind, fd_arg, bytes);
    }

    /// The plugin closed a main connection.
    pub fn connection_closed(&self) {
        self.main_record(RecordKind::CloseConnection, FdKind::None, 0, &[]);
    }

    fn vcpu_record(&self, id: u32, kind: RecordKind, payload: &[u8]) {
        let mut vcpus = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        let file = match vcpus.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                match open_session(&self.dir, &format!("vcpu{id}")) {
                    Some(f) => e.insert(f),
                    None => return,
                }
            }
        };
        Self::append(file, kind, FdKind::None, 0, payload);
    }

    /// A vcpu request as read from the pipe.
    pub fn vcpu_request(&self, id: u32, bytes: &[u8]) {
        self.vcpu_record(id, RecordKind::VcpuRequest, bytes);
    }

    /// A wait reason about to be delivered.
    pub fn vcpu_exit(&self, id: u32, wait: &vcpu_response::Wait) {
        if let Ok(bytes) = wait.write_to_bytes() {
            self.vcpu_record(id, RecordKind::VcpuExit, &bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_tolerate_garbage() {
        let mut s = Vec::new();
        encode_record(
            &mut s,
            RecordKind::MainRequest,
            FdKind::SealedMemfd,
            16,
            b"\x8a\x01\x00",
        );
        encode_record(&mut s, RecordKind::VcpuExit, FdKind::None, 0, b"");
        let r: Vec<_> = records(&s).collect();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].kind, RecordKind::MainRequest);
        assert_eq!(r[0].fd_kind, FdKind::SealedMemfd);
        assert_eq!(r[0].fd_arg, 16);
        assert_eq!(r[0].payload, b"\x8a\x01\x00");
        assert_eq!(r[1].kind, RecordKind::VcpuExit);
        // A truncated record keeps what is there; kinds wrap around.
        let r: Vec<_> = records(&[200, 200, 0, 0, 9, 0, 1, 2]).collect();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].payload, &[1, 2]);
        assert_eq!(records(&[1, 2, 3]).count(), 0);
    }
}
