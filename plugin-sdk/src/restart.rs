//! Hot restart (docs/protocol-extensions.md §9): declaring that the plugin
//! can be restarted, attaching to a running VM as the plugin that replaces
//! another, and the crash-consistent checkpoint of the device state.
//!
//! ```no_run
//! use crosvm_plugin::{Checkpoint, Connection, RestartKind};
//! let conn = Connection::from_env()?;
//! let mut attached = conn.attach()?;          // before setting anything up
//! let checkpoint = match attached.take_checkpoint()? {
//!     Some(c) => c,                            // the crashed plugin's
//!     None => Checkpoint::new(4096)?,
//! };
//! let device_state = match attached.kind() {
//!     RestartKind::Fresh => None,              // set the machine up as usual
//!     RestartKind::Upgrade => Some(attached.state().to_vec()),
//!     RestartKind::Crash => checkpoint.load()?.map(|(_serial, blob)| blob),
//! };
//! conn.declare_restartable(Some(&checkpoint))?;
//! # drop(device_state);
//! # Ok::<(), crosvm_plugin::Error>(())
//! ```

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MFdFlags};
use plugin_proto::main_request;
use plugin_proto::main_response::{self, attach};
use plugin_proto::MainRequest;

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::objects::{IoEvent, IrqEvent, Memory};

/// Largest checkpoint payload [`Checkpoint::new`] accepts (the host takes
/// memfds up to 64 MiB: two slots and a header).
pub const CHECKPOINT_MAX: usize = 16 << 20;

/// Why this plugin runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKind {
    /// A fresh boot (or a host without hot restart): set the machine up.
    Fresh,
    /// It replaces a plugin on command; [`Attached::state`] is the old
    /// plugin's `SAVE_STATE` blob.
    Upgrade,
    /// It replaces a plugin that died; the state is in the checkpoint.
    Crash,
}

/// One object the previous plugin created, kept by the host.
#[derive(Debug)]
enum Kept {
    Memory { length: u64, fd: OwnedFd },
    IoEvent { fd: OwnedFd },
    IrqEvent { fd: OwnedFd },
}

/// What `Attach` answered: the kind of start, the state, the objects.
#[derive(Debug)]
pub struct Attached {
    kind: RestartKind,
    state: Vec<u8>,
    generation: u32,
    objects: BTreeMap<u32, Kept>,
    checkpoint: Option<OwnedFd>,
    conn: Connection,
}

impl Attached {
    pub fn kind(&self) -> RestartKind {
        self.kind
    }

    /// Whether this plugin replaces another (the VM runs already: do not
    /// create memory, reserve ranges or set routes again, and do not
    /// expect `Init` events).
    pub fn is_restart(&self) -> bool {
        self.kind != RestartKind::Fresh
    }

    /// `Upgrade`: the old plugin's device state.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// Restarts of this VM so far, this one included.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Ids of the objects the host kept.
    pub fn object_ids(&self) -> Vec<u32> {
        self.objects.keys().copied().collect()
    }

    /// The memory object `id`: a handle and its memfd (map it with
    /// [`crate::GuestRam::from_memfd`]).
    pub fn take_memory(&mut self, id: u32) -> Result<(Memory, OwnedFd)> {
        match self.objects.remove(&id) {
            Some(Kept::Memory { length, fd }) => Ok((Memory::adopt(&self.conn, id, length), fd)),
            other => self.not_kept(id, other, "memory"),
        }
    }

    /// The io event `id`.
    pub fn take_io_event(&mut self, id: u32) -> Result<IoEvent> {
        match self.objects.remove(&id) {
            Some(Kept::IoEvent { fd }) => Ok(IoEvent::adopt(&self.conn, id, fd)),
            other => self.not_kept(id, other, "io event"),
        }
    }

    /// The irq event `id`. The host keeps only its trigger: the resample
    /// eventfd of the handle is a new one that is never signalled.
    pub fn take_irq_event(&mut self, id: u32) -> Result<IrqEvent> {
        match self.objects.remove(&id) {
            Some(Kept::IrqEvent { fd }) => {
                let resample = nix::sys::eventfd::EventFd::from_flags(
                    nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
                )
                .map_err(|source| Error::Sys {
                    op: "take_irq_event: creating the resample eventfd",
                    source,
                })?;
                Ok(IrqEvent::adopt(&self.conn, id, fd, resample.into()))
            }
            other => self.not_kept(id, other, "irq event"),
        }
    }

    fn not_kept<T>(&mut self, id: u32, other: Option<Kept>, what: &'static str) -> Result<T> {
        if let Some(o) = other {
            self.objects.insert(id, o);
        }
        let _ = what;
        Err(Error::InvalidArgument(
            "the host kept no object of that id and kind",
        ))
    }

    /// The checkpoint memfd the host kept (`Crash`, or an `Upgrade` of a
    /// plugin that declared one), ready for [`Checkpoint::load`] and for
    /// further commits.
    pub fn take_checkpoint(&mut self) -> Result<Option<Checkpoint>> {
        self.checkpoint
            .take()
            .map(Checkpoint::from_memfd)
            .transpose()
    }
}

impl Connection {
    /// `Attach`: whether this plugin replaces another, and what it takes
    /// over. A host without hot restart (`ENOTTY`, `ENOTSUP`) and a fresh
    /// boot give [`RestartKind::Fresh`]. Call it before creating anything:
    /// it adjusts the object ids and the vcpu channels (no `Init` comes on
    /// a restart; the exit serials continue).
    pub fn attach(&self) -> Result<Attached> {
        const OP: &str = "attach";
        let mut req = MainRequest::new();
        req.set_attach(main_request::Attach::new());
        let result = self.transact_chunked(OP, &req, |resp| match &resp.message {
            Some(main_response::Message::Attach(a)) => {
                let fds = a.objects.len() + usize::from(a.has_checkpoint);
                Ok(fds)
            }
            _ => Err(Error::Protocol("attach reply lacks its member")),
        });
        let (resp, fds) = match result {
            Ok(r) => r,
            Err(e) if matches!(e.host_errno(), Some(libc::ENOTTY | libc::ENOTSUP)) => {
                return Ok(Attached {
                    kind: RestartKind::Fresh,
                    state: Vec::new(),
                    generation: 0,
                    objects: BTreeMap::new(),
                    checkpoint: None,
                    conn: self.clone(),
                })
            }
            Err(e) => return Err(e),
        };
        let Some(main_response::Message::Attach(a)) = resp.message else {
            return Err(Error::Protocol("attach reply lacks its member"));
        };
        let kind = match a.kind.enum_value() {
            Ok(attach::Kind::NONE) => RestartKind::Fresh,
            Ok(attach::Kind::UPGRADE) => RestartKind::Upgrade,
            Ok(attach::Kind::CRASH) => RestartKind::Crash,
            Err(_) => return Err(Error::Protocol("attach: unknown kind")),
        };
        if kind != RestartKind::Fresh {
            if a.vcpu_count as usize != self.vcpu_count()
                || a.delivered.len() != self.vcpu_count()
                || a.redelivered.len() != self.vcpu_count()
            {
                return Err(Error::Protocol(
                    "attach: the vcpu count does not match the vcpu table",
                ));
            }
            for (i, (&d, &r)) in a.delivered.iter().zip(&a.redelivered).enumerate() {
                let serial = d
                    .checked_sub(u64::from(r))
                    .ok_or(Error::Protocol("attach: a re-delivered exit with serial 0"))?;
                self.vcpu_slot(i as u32)?.take_over(serial);
            }
        }
        let mut fds = fds.into_iter();
        let mut objects = BTreeMap::new();
        for o in &a.objects {
            let fd = fds
                .next()
                .ok_or(Error::Protocol("attach: fewer descriptors than objects"))?;
            self.shared().taken_up_to(o.id);
            let kept = match o.kind.enum_value() {
                Ok(attach::object::Kind::MEMORY) => Kept::Memory {
                    length: o.length,
                    fd,
                },
                Ok(attach::object::Kind::IO_EVENT) => Kept::IoEvent { fd },
                Ok(attach::object::Kind::IRQ_EVENT) => Kept::IrqEvent { fd },
                Err(_) => return Err(Error::Protocol("attach: unknown object kind")),
            };
            objects.insert(o.id, kept);
        }
        let checkpoint = if a.has_checkpoint { fds.next() } else { None };
        Ok(Attached {
            kind,
            state: a.state,
            generation: a.generation,
            objects,
            checkpoint,
            conn: self.clone(),
        })
    }

    /// `DeclareRestartable`: this plugin may be replaced (`upgrade`) and,
    /// with `--on-plugin-crash restart`, restarted after a crash; the host
    /// keeps `checkpoint`'s memfd for the next plugin. An old host answers
    /// `ENOTTY` (the error is returned; the plugin runs without restart).
    pub fn declare_restartable(&self, checkpoint: Option<&Checkpoint>) -> Result<()> {
        let mut req = MainRequest::new();
        req.set_declare_restartable(main_request::DeclareRestartable::new());
        match checkpoint {
            Some(c) => self.transact("declare_restartable", &req, &[c.fd.as_fd()]),
            None => self.transact("declare_restartable", &req, &[]),
        }
        .map(drop)
    }
}

/// "VMMCKPT1": the checkpoint memfd's header.
const MAGIC: u64 = u64::from_le_bytes(*b"VMMCKPT1");
/// Header: magic, capacity (u64 each), then padding to 64 bytes.
const HEADER: u64 = 64;
/// A slot's head: sequence, serial (u64), length, CRC (u32), reserved.
const SLOT_HEAD: u64 = 32;

/// The crash-consistent checkpoint of a plugin's device state: a memfd the
/// host keeps across a crash, two slots (double buffer), each with a
/// sequence number, the exit serial it covers and a CRC-32. A commit
/// writes the older slot and, last, its sequence number; a crash in the
/// middle leaves the other slot intact. Written with `pwrite`, so the
/// plugin never maps memory another process may change.
#[derive(Debug)]
pub struct Checkpoint {
    fd: OwnedFd,
    capacity: u64,
    seq: u64,
}

fn sys(op: &'static str) -> impl FnOnce(Errno) -> Error {
    move |source| Error::Sys { op, source }
}

fn pread_exact(fd: &OwnedFd, buf: &mut [u8], at: u64) -> Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = nix::sys::uio::pread(fd, &mut buf[off..], (at + off as u64) as i64)
            .map_err(sys("reading the checkpoint"))?;
        if n == 0 {
            return Err(Error::BadCheckpoint(
                "the memfd is shorter than its header says".into(),
            ));
        }
        off += n;
    }
    Ok(())
}

fn pwrite_all(fd: &OwnedFd, buf: &[u8], at: u64) -> Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let n = nix::sys::uio::pwrite(fd, &buf[off..], (at + off as u64) as i64)
            .map_err(sys("writing the checkpoint"))?;
        off += n;
    }
    Ok(())
}

fn crc(seq: u64, serial: u64, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&serial.to_le_bytes());
    h.update(&(data.len() as u32).to_le_bytes());
    h.update(data);
    h.finalize()
}

impl Checkpoint {
    /// A new checkpoint memfd for blobs of at most `capacity` bytes.
    pub fn new(capacity: usize) -> Result<Checkpoint> {
        if capacity == 0 || capacity > CHECKPOINT_MAX {
            return Err(Error::InvalidArgument(
                "checkpoint capacity must be 1..=CHECKPOINT_MAX",
            ));
        }
        let fd = memfd_create(
            c"crosvm-checkpoint",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(sys("creating the checkpoint memfd"))?;
        let cap = capacity as u64;
        let size = HEADER + 2 * (SLOT_HEAD + cap);
        nix::unistd::ftruncate(&fd, size as i64).map_err(sys("sizing the checkpoint memfd"))?;
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&MAGIC.to_le_bytes());
        head[8..].copy_from_slice(&cap.to_le_bytes());
        pwrite_all(&fd, &head, 0)?;
        Ok(Checkpoint {
            fd,
            capacity: cap,
            seq: 0,
        })
    }

    /// Adopts a checkpoint memfd (from [`Attached::take_checkpoint`]); its
    /// header is checked, its slots by [`Self::load`].
    pub fn from_memfd(fd: OwnedFd) -> Result<Checkpoint> {
        let st = nix::sys::stat::fstat(&fd).map_err(sys("sizing the checkpoint memfd"))?;
        let mut head = [0u8; 16];
        pread_exact(&fd, &mut head, 0)?;
        let magic = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let cap = u64::from_le_bytes(head[8..].try_into().unwrap_or_default());
        if magic != MAGIC {
            return Err(Error::BadCheckpoint(format!("bad magic {magic:#018x}")));
        }
        let need = cap
            .checked_mul(2)
            .and_then(|c| c.checked_add(HEADER + 2 * SLOT_HEAD))
            .filter(|_| cap > 0 && cap <= CHECKPOINT_MAX as u64);
        match need {
            Some(n) if n <= st.st_size as u64 => {}
            _ => {
                return Err(Error::BadCheckpoint(format!(
                    "capacity {cap} does not fit the {}-byte memfd",
                    st.st_size
                )))
            }
        }
        let mut c = Checkpoint {
            fd,
            capacity: cap,
            seq: 0,
        };
        c.seq = c.slots()?.iter().map(|s| s.0).max().unwrap_or(0);
        Ok(c)
    }

    /// The memfd (the host keeps a copy after `declare_restartable`).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn slot_at(&self, i: u64) -> u64 {
        HEADER + i * (SLOT_HEAD + self.capacity)
    }

    /// Both slots' (seq, serial, len, crc) heads.
    fn slots(&self) -> Result<[(u64, u64, u32, u32); 2]> {
        let mut out = [(0, 0, 0, 0); 2];
        for (i, o) in out.iter_mut().enumerate() {
            let mut h = [0u8; SLOT_HEAD as usize];
            pread_exact(&self.fd, &mut h, self.slot_at(i as u64))?;
            let u64_at = |k: usize| u64::from_le_bytes(h[k..k + 8].try_into().unwrap_or_default());
            let u32_at = |k: usize| u32::from_le_bytes(h[k..k + 4].try_into().unwrap_or_default());
            *o = (u64_at(0), u64_at(8), u32_at(16), u32_at(20));
        }
        Ok(out)
    }

    /// Writes `blob` (the device state covering exits up to `serial`) as
    /// the newest checkpoint. Commit before resuming the exit that changed
    /// the state: a crash before the commit re-delivers the exit to a state
    /// without it, a crash after it re-delivers it to a state that has it
    /// (the serial tells).
    pub fn commit(&mut self, serial: u64, blob: &[u8]) -> Result<()> {
        if blob.len() as u64 > self.capacity {
            return Err(Error::InvalidArgument(
                "checkpoint blob larger than the checkpoint's capacity",
            ));
        }
        let seq = self.seq + 1;
        let at = self.slot_at(seq % 2);
        // Body and head except the sequence first, the sequence last: a
        // torn commit keeps the slot's old sequence and fails its CRC.
        pwrite_all(&self.fd, blob, at + SLOT_HEAD)?;
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&serial.to_le_bytes());
        h[8..12].copy_from_slice(&(blob.len() as u32).to_le_bytes());
        h[12..16].copy_from_slice(&crc(seq, serial, blob).to_le_bytes());
        pwrite_all(&self.fd, &h, at + 8)?;
        pwrite_all(&self.fd, &seq.to_le_bytes(), at)?;
        self.seq = seq;
        Ok(())
    }

    /// The newest intact checkpoint: `(serial, blob)`; `None` if nothing
    /// was ever committed; [`Error::BadCheckpoint`] if no slot is intact.
    pub fn load(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let slots = self.slots()?;
        if slots.iter().all(|s| *s == (0, 0, 0, 0)) {
            return Ok(None);
        }
        let mut order = [0usize, 1];
        order.sort_by_key(|&i| std::cmp::Reverse(slots[i].0));
        let mut why = Vec::new();
        for i in order {
            let (seq, serial, len, sum) = slots[i];
            if seq == 0 {
                continue;
            }
            if u64::from(len) > self.capacity {
                why.push(format!(
                    "slot {i}: length {len} over the capacity {}",
                    self.capacity
                ));
                continue;
            }
            let mut blob = vec![0; len as usize];
            pread_exact(&self.fd, &mut blob, self.slot_at(i as u64) + SLOT_HEAD)?;
            if crc(seq, serial, &blob) != sum {
                why.push(format!("slot {i} (sequence {seq}): CRC mismatch"));
                continue;
            }
            return Ok(Some((serial, blob)));
        }
        Err(Error::BadCheckpoint(if why.is_empty() {
            "no slot was committed".into()
        } else {
            why.join("; ")
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_alternate_and_load_the_newest() {
        let mut c = Checkpoint::new(64).unwrap();
        assert!(c.load().unwrap().is_none());
        c.commit(1, b"one").unwrap();
        assert_eq!(c.load().unwrap(), Some((1, b"one".to_vec())));
        c.commit(7, b"seven").unwrap();
        assert_eq!(c.load().unwrap(), Some((7, b"seven".to_vec())));
        let again = Checkpoint::from_memfd(c.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(again.load().unwrap(), Some((7, b"seven".to_vec())));
        assert!(matches!(
            c.commit(8, &[0; 65]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_torn_newest_slot_falls_back_and_garbage_is_an_error() {
        let mut c = Checkpoint::new(16).unwrap();
        c.commit(1, b"old").unwrap();
        c.commit(2, b"new").unwrap();
        // Tear the newest slot's body (slot 0 holds sequence 2).
        pwrite_all(&c.fd, b"X", c.slot_at(0) + SLOT_HEAD).unwrap();
        assert_eq!(c.load().unwrap(), Some((1, b"old".to_vec())));
        pwrite_all(&c.fd, b"Y", c.slot_at(1) + SLOT_HEAD).unwrap();
        let e = c.load().unwrap_err();
        assert!(matches!(e, Error::BadCheckpoint(_)), "{e}");
        assert!(e.to_string().contains("CRC"), "{e}");
        pwrite_all(&c.fd, b"garbage!", 0).unwrap();
        let e = Checkpoint::from_memfd(c.fd().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
