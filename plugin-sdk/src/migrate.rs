//! Live migration (docs/protocol-extensions.md §8): KVM's dirty log sees
//! the guest's writes into guest memory but not the plugin's own. A
//! plugin that writes guest memory itself (a device doing DMA, a writer
//! thread) does it through a [`WriteTracker`], and its control handler
//! answers the host's `DIRTY_PAGES` from it
//! ([`crate::ControlChannel::spawn_handler_tracked`]).
//!
//! The tracker also freezes the plugin's writes between `SAVE_STATE` and
//! `RESUMED`: once the device state is taken, no write may land in guest
//! memory that the state does not account for. A writer blocks in
//! [`WriteTracker::write`] (or [`WriteTracker::hold`]) while frozen.
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use crosvm_plugin::{Connection, GuestRam, WriteTracker};
//!
//! let conn = Connection::from_env()?;
//! let ram = GuestRam::new(0x10000)?;
//! let tracker = Arc::new(WriteTracker::new());
//! // Another thread: guest memory at guest-physical 0x100000.
//! tracker.write(&ram, 0x10_0000, 0x40, b"written by the plugin")?;
//! # Ok::<(), crosvm_plugin::Error>(())
//! ```

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::machine::GuestRam;
use crate::objects::PAGE_SIZE;
use crate::Result;

#[derive(Debug, Default)]
struct Inner {
    pages: BTreeSet<u64>,
    frozen: bool,
    holders: usize,
}

/// The pages the plugin wrote since the host last asked, and the freeze.
/// `Send + Sync`: share it (`Arc`) between the writers and the control
/// handler.
#[derive(Debug, Default)]
pub struct WriteTracker {
    inner: Mutex<Inner>,
    cond: Condvar,
}

/// While held, the tracker cannot freeze: the writes made and marked under
/// it complete before a `SAVE_STATE` is answered.
pub struct WriteGuard<'a> {
    tracker: &'a WriteTracker,
}

impl WriteGuard<'_> {
    /// Notes a write of `len` bytes at guest-physical `gpa`.
    pub fn mark(&self, gpa: u64, len: usize) {
        self.tracker.mark(gpa, len);
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let mut i = self.tracker.lock();
        i.holders -= 1;
        drop(i);
        self.tracker.cond.notify_all();
    }
}

fn pages_of(gpa: u64, len: usize) -> impl Iterator<Item = u64> {
    let first = gpa & !(PAGE_SIZE - 1);
    let last = gpa.saturating_add((len as u64).max(1) - 1) & !(PAGE_SIZE - 1);
    let n = if len == 0 {
        0
    } else {
        (last - first) / PAGE_SIZE + 1
    };
    (0..n).map(move |k| first + k * PAGE_SIZE)
}

impl WriteTracker {
    pub fn new() -> WriteTracker {
        WriteTracker::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a write of `len` bytes at guest-physical `gpa` (made some
    /// other way; does not wait for a freeze to end).
    pub fn mark(&self, gpa: u64, len: usize) {
        let mut i = self.lock();
        i.pages.extend(pages_of(gpa, len));
    }

    /// Waits while frozen, then keeps the tracker from freezing until the
    /// guard drops: for a write and the device-state update that goes
    /// with it.
    pub fn hold(&self) -> WriteGuard<'_> {
        let mut i = self.lock();
        while i.frozen {
            i = self.cond.wait(i).unwrap_or_else(|e| e.into_inner());
        }
        i.holders += 1;
        WriteGuard { tracker: self }
    }

    /// Writes `bytes` at offset `offset` of `ram`, registered at
    /// guest-physical `base`, and notes the pages (waits while frozen).
    pub fn write(&self, ram: &GuestRam, base: u64, offset: u64, bytes: &[u8]) -> Result<()> {
        let g = self.hold();
        ram.write(offset, bytes)?;
        g.mark(base.saturating_add(offset), bytes.len());
        Ok(())
    }

    /// The pages noted since the last call (sorted, each once).
    pub fn take(&self) -> Vec<u64> {
        let mut i = self.lock();
        std::mem::take(&mut i.pages).into_iter().collect()
    }

    /// Stops the writers: returns once no [`WriteGuard`] is held; later
    /// writes wait for [`Self::thaw`].
    pub fn freeze(&self) {
        let mut i = self.lock();
        i.frozen = true;
        while i.holders > 0 {
            i = self.cond.wait(i).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets the writers go again.
    pub fn thaw(&self) {
        self.lock().frozen = false;
        self.cond.notify_all();
    }

    pub fn is_frozen(&self) -> bool {
        self.lock().frozen
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn marks_each_page_once_and_take_forgets() {
        let t = WriteTracker::new();
        t.mark(0x1ffe, 4);
        t.mark(0x2000, 1);
        t.mark(0x5000, 0);
        t.mark(0x9000, 0x2001);
        assert_eq!(t.take(), vec![0x1000, 0x2000, 0x9000, 0xa000, 0xb000]);
        assert!(t.take().is_empty());
        t.mark(u64::MAX - 1, 8);
        assert_eq!(t.take(), vec![!0xfffu64]);
    }

    #[test]
    fn a_freeze_waits_for_holders_and_stops_writers_until_thawed() {
        let t = Arc::new(WriteTracker::new());
        let writes = Arc::new(AtomicU64::new(0));
        let writer = {
            let (t, writes) = (t.clone(), writes.clone());
            std::thread::spawn(move || {
                for k in 0..200u64 {
                    let g = t.hold();
                    g.mark(k * 4096, 1);
                    writes.fetch_add(1, Ordering::SeqCst);
                    drop(g);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(5));
        t.freeze();
        let at_freeze = writes.load(Ordering::SeqCst);
        let marked = t.take().len() as u64;
        assert_eq!(marked, at_freeze, "every write before the freeze is marked");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            writes.load(Ordering::SeqCst),
            at_freeze,
            "a write went through a freeze"
        );
        assert!(t.is_frozen());
        t.thaw();
        writer.join().unwrap();
        assert_eq!(writes.load(Ordering::SeqCst), 200);
    }
}
