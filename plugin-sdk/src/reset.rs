//! Fast reset (docs/protocol-extensions.md §7): an in-memory snapshot the
//! host holds, and the reset to it that rewrites only the pages dirtied
//! since. KVM's dirty log sees the guest's writes; the plugin's own writes
//! into guest memory it reports itself, with [`DirtyPages`].
//!
//! Both calls are for a plugin whose vcpus are all stopped in its hands
//! (each waiting in an exit for its resume, or paused): typically the
//! single-vcpu fuzzing loop, from the exit handler.

use plugin_proto::{main_request, main_response, MainRequest};

use crate::machine::GuestRam;
use crate::objects::PAGE_SIZE;
use crate::{Connection, Error, Result};

/// Most plugin-written pages one reset names: the request must fit one
/// main-socket packet (a packed page address takes at most 10 bytes).
pub const RESET_MAX_PAGES: usize = 20_000;

impl Connection {
    /// `SnapshotInMemory`: the host captures VM and vcpu state and a
    /// private copy of all guest memory, and turns dirty logging on for
    /// every region. Returns the bytes of guest memory copied. `EBUSY`
    /// when a vcpu is running; `ENOTSUP` from a host without the extension.
    pub fn snapshot_in_memory(&self) -> Result<u64> {
        const OP: &str = "snapshot_in_memory";
        let mut req = MainRequest::new();
        req.set_snapshot_in_memory(main_request::SnapshotInMemory::new());
        let (resp, _) = self.transact(OP, &req, &[])?;
        match resp.message {
            Some(main_response::Message::SnapshotInMemory(r)) => Ok(r.bytes),
            _ => Err(Error::Protocol("snapshot_in_memory reply lacks its member")),
        }
    }

    /// `ResetToSnapshot`: puts guest memory (the pages KVM logged dirty
    /// and `plugin_pages`, guest-physical addresses the plugin wrote
    /// itself), VM and vcpu state back as [`Connection::snapshot_in_memory`]
    /// found them. Returns the pages copied back. `ENOENT` without a
    /// snapshot, `EBUSY` when a vcpu is running, `EINVAL` for an address
    /// in no region (nothing is changed then); more than [`RESET_MAX_PAGES`]
    /// pages: [`Error::InvalidArgument`].
    pub fn reset(&self, plugin_pages: &[u64]) -> Result<u64> {
        const OP: &str = "reset_to_snapshot";
        if plugin_pages.len() > RESET_MAX_PAGES {
            return Err(Error::InvalidArgument(
                "reset: more plugin-written pages than RESET_MAX_PAGES",
            ));
        }
        let mut req = MainRequest::new();
        req.mut_reset_to_snapshot().plugin_dirty_pages = plugin_pages.to_vec();
        let (resp, _) = self.transact(OP, &req, &[])?;
        match resp.message {
            Some(main_response::Message::ResetToSnapshot(r)) => Ok(r.pages),
            _ => Err(Error::Protocol("reset_to_snapshot reply lacks its member")),
        }
    }
}

/// The guest pages the plugin wrote since the last reset, for
/// [`Connection::reset`]: write guest memory through
/// [`DirtyPages::write`] (or note writes made otherwise with
/// [`DirtyPages::mark`]) and hand [`DirtyPages::take`] to the reset.
#[derive(Debug, Default, Clone)]
pub struct DirtyPages {
    pages: Vec<u64>,
}

impl DirtyPages {
    pub fn new() -> DirtyPages {
        DirtyPages::default()
    }

    /// Notes a write of `len` bytes at guest-physical `gpa`.
    pub fn mark(&mut self, gpa: u64, len: usize) {
        if len == 0 {
            return;
        }
        let first = gpa & !(PAGE_SIZE - 1);
        let last = gpa.saturating_add(len as u64 - 1) & !(PAGE_SIZE - 1);
        let mut p = first;
        loop {
            if self.pages.last() != Some(&p) {
                self.pages.push(p);
            }
            if p >= last {
                break;
            }
            p += PAGE_SIZE;
        }
    }

    /// Writes `bytes` at offset `offset` of `ram`, registered at
    /// guest-physical `base`, and notes the pages.
    pub fn write(&mut self, ram: &GuestRam, base: u64, offset: u64, bytes: &[u8]) -> Result<()> {
        ram.write(offset, bytes)?;
        self.mark(base.saturating_add(offset), bytes.len());
        Ok(())
    }

    /// The pages noted (each once, sorted), and forgets them.
    pub fn take(&mut self) -> Vec<u64> {
        let mut v = std::mem::take(&mut self.pages);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Pages noted so far (a page written twice may count twice).
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_page_a_write_touches_once() {
        let mut d = DirtyPages::new();
        d.mark(0x1ffe, 4);
        d.mark(0x2000, 1);
        d.mark(0x5000, 0);
        d.mark(0x9000, 0x2001);
        assert_eq!(d.take(), vec![0x1000, 0x2000, 0x9000, 0xa000, 0xb000]);
        assert!(d.is_empty());
        d.mark(u64::MAX - 1, 8);
        assert_eq!(d.take(), vec![!0xfffu64]);
    }
}
