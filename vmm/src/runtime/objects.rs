//! Host-side state that main requests change: the object table (id → memory
//! slot / ioeventfd / irqfd), the reserved address ranges and the call hint.
//!
//! Reservations and the hint are read by every vcpu on every exit. The main
//! thread owns the authoritative copy and, after each change, publishes an
//! immutable [`ExitConfig`] snapshot; a vcpu re-reads the snapshot only when the
//! generation counter moved, so an exit costs one atomic load, never a lock.
//! The reservations are a persistent tree ([`range_tree`]): publishing a
//! snapshot shares it, and the next change copies one path, O(log n), so
//! reserving n ranges costs O(n log n), not the O(n²) of copying every range
//! on every change.

mod range_tree;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use nix::errno::Errno;
use vm_memory::mmap::MmapRegion;
use vmm_sys_util::eventfd::EventFd;

use crate::limits;
use crate::vm::Space;
use range_tree::RangeTree;

/// A request the host refuses: the errno the plugin gets on the wire, and
/// the reason the host logs (which argument, why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{errno:?}: {reason}")]
pub struct Refused {
    pub errno: Errno,
    pub reason: String,
}

impl Refused {
    pub fn new(errno: Errno, reason: impl Into<String>) -> Self {
        Refused {
            errno,
            reason: reason.into(),
        }
    }
}

/// An errno from a lower layer (KVM, a system call): its description is the
/// reason.
impl From<Errno> for Refused {
    fn from(errno: Errno) -> Self {
        Refused {
            errno,
            reason: errno.desc().to_string(),
        }
    }
}

impl PartialEq<Errno> for Refused {
    fn eq(&self, other: &Errno) -> bool {
        self.errno == *other
    }
}

/// A live object created by `Create`.
pub enum Object {
    IoEvent {
        evt: EventFd,
        space: Space,
        address: u64,
        length: u32,
        datamatch: u64,
    },
    Memory {
        slot: u32,
        start: u64,
        length: u64,
        dirty_log: bool,
        /// Keeps the host mapping alive while KVM uses it.
        mapping: MmapRegion<()>,
    },
    IrqEvent {
        trigger: EventFd,
        gsi: u32,
    },
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::IoEvent { .. } => "io_event",
            Object::Memory { .. } => "memory",
            Object::IrqEvent { .. } => "irq_event",
        }
    }
}

/// All objects of the VM, keyed by the plugin-chosen id (one id space for all
/// kinds and all connections).
#[derive(Default)]
pub struct ObjectTable {
    objects: HashMap<u32, Object>,
    used_slots: BTreeSet<u32>,
}

impl ObjectTable {
    pub fn contains(&self, id: u32) -> bool {
        self.objects.contains_key(&id)
    }

    pub fn get(&self, id: u32) -> Option<&Object> {
        self.objects.get(&id)
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Inserts under a free id; the caller checked `contains` and the limit.
    pub fn insert(&mut self, id: u32, obj: Object) {
        if let Object::Memory { slot, .. } = &obj {
            self.used_slots.insert(*slot);
        }
        self.objects.insert(id, obj);
    }

    pub fn remove(&mut self, id: u32) -> Option<Object> {
        let obj = self.objects.remove(&id)?;
        if let Object::Memory { slot, .. } = &obj {
            self.used_slots.remove(slot);
        }
        Some(obj)
    }

    /// Lowest memory slot number not in use, below `max`.
    pub fn free_slot(&self, max: u32) -> Option<u32> {
        (0..max).find(|s| !self.used_slots.contains(s))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u32, &Object)> {
        self.objects.iter()
    }
}

/// One reserved range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub length: u64,
    pub async_write: bool,
    /// Writes are coalesced by KVM (docs/protocol-extensions.md §4); such a
    /// range is also `async_write` (reads are not reported).
    pub coalesced: bool,
}

/// The reserved ranges of both address spaces. Cloning is O(1).
#[derive(Debug, Clone, Default)]
pub struct Reservations {
    ioport: RangeTree,
    mmio: RangeTree,
}

impl Reservations {
    fn map(&self, space: Space) -> &RangeTree {
        match space {
            Space::Ioport => &self.ioport,
            Space::Mmio => &self.mmio,
        }
    }

    fn map_mut(&mut self, space: Space) -> &mut RangeTree {
        match space {
            Space::Ioport => &mut self.ioport,
            Space::Mmio => &mut self.mmio,
        }
    }

    pub fn len(&self) -> usize {
        self.ioport.len() + self.mmio.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ioport.is_empty() && self.mmio.is_empty()
    }

    /// Reserves `[start, start + length)`; every overlap with an existing
    /// range is refused with `EPERM` (docs/host-behaviour.md §9;
    /// quirk 2 of docs/differences-from-crosvm.md fixed).
    pub fn reserve(
        &mut self,
        space: Space,
        start: u64,
        length: u64,
        async_write: bool,
    ) -> Result<(), Refused> {
        self.insert(
            space,
            Range {
                start,
                length,
                async_write,
                coalesced: false,
            },
        )
    }

    /// Reserves `[start, start + length)` as a coalesced range (checked as
    /// [`Reservations::reserve`]).
    pub fn reserve_coalesced(
        &mut self,
        space: Space,
        start: u64,
        length: u64,
    ) -> Result<(), Refused> {
        self.insert(
            space,
            Range {
                start,
                length,
                async_write: true,
                coalesced: true,
            },
        )
    }

    fn insert(&mut self, space: Space, range: Range) -> Result<(), Refused> {
        let Range { start, length, .. } = range;
        if length == 0 {
            return Err(Refused::new(Errno::EINVAL, "the length is 0"));
        }
        let overlap = |r: Range| {
            Refused::new(
                Errno::EPERM,
                format!(
                    "overlaps the reserved range {:#x}..{:#x}",
                    r.start,
                    r.start.saturating_add(r.length)
                ),
            )
        };
        if let Some(r) = self.lookup(space, start) {
            return Err(overlap(r));
        }
        let end = start.checked_add(length).ok_or_else(|| {
            Refused::new(
                Errno::EINVAL,
                format!("{start:#x} + {length:#x} wraps around the address space"),
            )
        })?;
        if let Some(r) = self.map(space).at_or_after(start).filter(|r| r.start < end) {
            return Err(overlap(r));
        }
        if self.len() >= limits::MAX_RESERVED_RANGES {
            return Err(Refused::new(
                Errno::ENOSPC,
                format!(
                    "the VM already has {} reserved ranges (the limit)",
                    limits::MAX_RESERVED_RANGES
                ),
            ));
        }
        let fresh = self.map_mut(space).insert(range);
        debug_assert!(fresh, "lookup found no range at the start");
        Ok(())
    }

    /// Removes the range that starts exactly at `start` (either kind).
    pub fn unreserve(&mut self, space: Space, start: u64) -> Result<(), Refused> {
        if self.map_mut(space).remove(start) {
            Ok(())
        } else {
            Err(Refused::new(
                Errno::ENOENT,
                format!("no reserved range starts at {start:#x}"),
            ))
        }
    }

    /// The range that starts exactly at `start`, if any.
    pub fn starting_at(&self, space: Space, start: u64) -> Option<Range> {
        self.lookup(space, start).filter(|r| r.start == start)
    }

    /// The first range that overlaps `[start, start + length)`, if any.
    pub fn overlapping(&self, space: Space, start: u64, length: u64) -> Option<Range> {
        let end = start.saturating_add(length.max(1));
        self.lookup(space, start)
            .or_else(|| self.map(space).at_or_after(start).filter(|r| r.start < end))
    }

    /// The range containing `addr`, if any.
    pub fn lookup(&self, space: Space, addr: u64) -> Option<Range> {
        let r = self.map(space).at_or_before(addr)?;
        (addr - r.start < r.length).then_some(r)
    }

    pub fn ranges(&self, space: Space) -> impl Iterator<Item = &Range> {
        self.map(space).iter()
    }
}

/// One register-match entry of a call hint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegHint {
    pub rax: Option<u64>,
    pub rbx: Option<u64>,
    pub rcx: Option<u64>,
    pub rdx: Option<u64>,
    pub send_sregs: bool,
    pub send_debugregs: bool,
}

impl RegHint {
    /// Whether every enabled comparison holds.
    pub fn matches(&self, rax: u64, rbx: u64, rcx: u64, rdx: u64) -> bool {
        self.rax.is_none_or(|v| v == rax)
            && self.rbx.is_none_or(|v| v == rbx)
            && self.rcx.is_none_or(|v| v == rcx)
            && self.rdx.is_none_or(|v| v == rdx)
    }
}

/// The single global call hint (`SetCallHint`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallHint {
    pub space: Option<Space>,
    pub address: u64,
    pub on_write: bool,
    pub hints: Vec<RegHint>,
}

impl CallHint {
    pub fn applies(&self, space: Space, address: u64, is_write: bool) -> bool {
        self.address != 0
            && self.space == Some(space)
            && self.address == address
            && self.on_write == is_write
    }
}

/// What a vcpu needs to route an exit: an immutable snapshot.
#[derive(Debug, Clone, Default)]
pub struct ExitConfig {
    pub reservations: Reservations,
    pub hint: CallHint,
    /// A coalesced range was registered at some point: the vcpus drain the
    /// coalesced ring (stays set, so writes still in the ring after an
    /// unreserve are delivered).
    pub coalesced: bool,
}

/// Shared between the main thread (writer) and vcpu threads (readers).
#[derive(Default)]
pub struct SharedExitConfig {
    generation: AtomicU64,
    current: RwLock<Arc<ExitConfig>>,
}

impl SharedExitConfig {
    /// Replaces the snapshot; vcpus see it on their next exit.
    pub fn publish(&self, config: ExitConfig) {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        *cur = Arc::new(config);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn load(&self) -> (u64, Arc<ExitConfig>) {
        // Read the generation first: a publish racing with us makes the cached
        // generation stale, so the next exit reloads.
        let generation = self.generation.load(Ordering::Acquire);
        let cur = self.current.read().unwrap_or_else(|p| p.into_inner());
        (generation, Arc::clone(&cur))
    }
}

/// A vcpu's cached view of the shared snapshot.
pub struct ExitConfigReader {
    shared: Arc<SharedExitConfig>,
    generation: u64,
    cached: Arc<ExitConfig>,
}

impl ExitConfigReader {
    pub fn new(shared: Arc<SharedExitConfig>) -> Self {
        let (generation, cached) = shared.load();
        ExitConfigReader {
            shared,
            generation,
            cached,
        }
    }

    /// The current snapshot (refreshed only when it changed).
    pub fn get(&mut self) -> &ExitConfig {
        if self.shared.generation.load(Ordering::Acquire) != self.generation {
            let (generation, cached) = self.shared.load();
            self.generation = generation;
            self.cached = cached;
        }
        &self.cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_reserve_sequence() {
        // docs/host-behaviour.md §9 sequence (length 0 is an error at this level).
        let mut r = Reservations::default();
        let s = Space::Ioport;
        assert!(r.reserve(s, 0x10, 0, false).is_err());
        assert_eq!(r.reserve(s, 0x10, 0x10, false), Ok(()));
        assert!(r.reserve(s, 0x0f, 0x10, false).is_err());
        assert!(r.reserve(s, 0x10, 0x10, false).is_err());
        assert!(r.reserve(s, 0x10, 0x15, false).is_err());
        assert!(r.reserve(s, 0x12, 0x15, false).is_err());
        assert!(r.reserve(s, 0x12, 0x01, false).is_err());
        assert!(r.reserve(s, 0x0, 0x20, false).is_err());
        assert_eq!(r.reserve(s, 0x20, 0x05, false), Ok(()));
        assert_eq!(r.reserve(s, 0x25, 0x05, false), Ok(()));
        assert_eq!(r.reserve(s, 0x0, 0x10, false), Ok(()));
    }

    #[test]
    fn overlap_on_last_address_is_refused() {
        // Quirk 2 (docs/differences-from-crosvm.md): the reference accepted a range whose last address is an
        // existing range's first address.
        let mut r = Reservations::default();
        r.reserve(Space::Mmio, 0x1000, 0x10, false).unwrap();
        assert_eq!(
            r.reserve(Space::Mmio, 0xff1, 0x10, false),
            Err(Refused::new(
                Errno::EPERM,
                "overlaps the reserved range 0x1000..0x1010"
            ))
        );
        assert_eq!(r.reserve(Space::Mmio, 0xff0, 0x10, false), Ok(()));
    }

    #[test]
    fn wrapping_range_is_einval_and_spaces_are_independent() {
        let mut r = Reservations::default();
        assert_eq!(
            r.reserve(Space::Mmio, u64::MAX, 2, false)
                .map_err(|e| e.errno),
            Err(Errno::EINVAL)
        );
        r.reserve(Space::Ioport, 0x3f8, 8, false).unwrap();
        r.reserve(Space::Mmio, 0x3f8, 8, true).unwrap();
        assert!(!r.lookup(Space::Ioport, 0x3ff).unwrap().async_write);
        assert!(r.lookup(Space::Mmio, 0x3ff).unwrap().async_write);
        assert!(r.lookup(Space::Ioport, 0x400).is_none());
        assert!(r.lookup(Space::Ioport, 0x3f7).is_none());
        assert_eq!(
            r.unreserve(Space::Ioport, 0x3f9).map_err(|e| e.errno),
            Err(Errno::ENOENT)
        );
        assert_eq!(r.unreserve(Space::Ioport, 0x3f8), Ok(()));
        assert!(r.lookup(Space::Ioport, 0x3f8).is_none());
    }

    #[test]
    fn snapshot_reader_sees_updates() {
        let shared = Arc::new(SharedExitConfig::default());
        let mut reader = ExitConfigReader::new(Arc::clone(&shared));
        assert!(reader.get().reservations.is_empty());
        let mut cfg = ExitConfig::default();
        cfg.reservations
            .reserve(Space::Ioport, 1, 1, false)
            .unwrap();
        shared.publish(cfg);
        assert_eq!(reader.get().reservations.len(), 1);
    }

    #[test]
    fn reg_hint_matching() {
        let any = RegHint::default();
        assert!(any.matches(1, 2, 3, 4));
        let h = RegHint {
            rax: Some(1),
            rdx: Some(4),
            ..Default::default()
        };
        assert!(h.matches(1, 0, 0, 4));
        assert!(!h.matches(1, 0, 0, 5));
    }
}
