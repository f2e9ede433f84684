//! Bounds on everything a plugin can make the host allocate or hold. Each
//! limit is answered with an errno when exceeded; README.md lists them.

/// Largest main request packet accepted (bytes). The reference host took only
/// 4096 (quirk 5 of docs/differences-from-crosvm.md); large `SetIrqRouting` tables need more.
pub const MAX_MAIN_REQUEST: usize = plugin_proto::framing::MAX_MESSAGE_SIZE;

/// Live objects (memory, io events, irq events) at once → `ENOSPC`.
pub const MAX_OBJECTS: usize = 4096;

/// Reserved ranges, both spaces together → `ENOSPC`.
pub const MAX_RESERVED_RANGES: usize = 16384;

/// Coalesced ranges at once → `ENOSPC`. Each is a device on KVM's io bus,
/// which holds at most 1000 of them together with the ioeventfds.
pub const MAX_COALESCED_RANGES: usize = 64;

/// Register-match entries in one call hint → `E2BIG`.
pub const MAX_CALL_HINT_DETAILS: usize = 256;

/// Routes in one `SetIrqRouting` (KVM's own maximum) → `E2BIG`.
pub const MAX_IRQ_ROUTES: usize = 4096;

/// Main connections served at once → `EMFILE` on `NewConnection`.
pub const MAX_CONNECTIONS: usize = 1024;

/// MSRs in one `GetMsrs` / `SetMsrs` → `E2BIG`.
pub const MAX_MSR_ENTRIES: usize = 256;

/// Bytes of one dirty bitmap → `E2BIG` (when a dirty-logged region is
/// created, and in `MemoryDirtyLog`). The bitmap is sized by the region (one
/// bit per 4 KiB page; KVM allocates two of them for the slot), so without
/// a bound a plugin-chosen region length decides the allocation; this one
/// covers dirty-logged regions up to 6 GiB and keeps the reply sendable on a
/// default socket buffer (and within the client's 256 KiB receive buffer).
pub const MAX_DIRTY_BITMAP: usize = 0x30000;

/// CPUID entries in one `SetCpuid` → `E2BIG`.
pub const MAX_CPUID_ENTRIES: usize = 256;

/// Consecutive unhandled KVM exits before a vcpu thread gives up.
pub const MAX_CONSECUTIVE_UNKNOWN_EXITS: u32 = 10_000;

/// Longest line of plugin stderr kept before it is logged anyway (bytes).
pub const MAX_STDERR_LINE: usize = 4096;

/// Bounds on guest memory (`CreateMemory` beyond them → `ENOMEM`): the
/// total of all registered regions, and the length of one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMemoryLimits {
    pub total: u64,
    pub per_slot: u64,
}

impl GuestMemoryLimits {
    /// The default: the host's physical RAM, for the total and for one
    /// region (a guest larger than the host is never legitimate, and KVM's
    /// per-page metadata for it is charged to vmm). Falls back to
    /// [`FALLBACK_GUEST_MEMORY`] when the host cannot be asked.
    pub fn from_host() -> Self {
        let total = host_physical_memory().unwrap_or(FALLBACK_GUEST_MEMORY);
        GuestMemoryLimits {
            total,
            per_slot: total,
        }
    }

    /// Both bounds at `bytes` (`--max-guest-memory`).
    pub fn at_most(bytes: u64) -> Self {
        GuestMemoryLimits {
            total: bytes,
            per_slot: bytes,
        }
    }

    /// Whether a region of `length` bytes may be added to `registered`.
    pub fn allows(&self, registered: u64, length: u64) -> bool {
        length <= self.per_slot
            && registered
                .checked_add(length)
                .is_some_and(|t| t <= self.total)
    }
}

/// Guest memory bound when the host's RAM size is unknown: 16 GiB.
pub const FALLBACK_GUEST_MEMORY: u64 = 16 << 30;

/// Physical RAM of the host in bytes (`_SC_PHYS_PAGES` × page size).
pub fn host_physical_memory() -> Option<u64> {
    let pages = nix::unistd::sysconf(nix::unistd::SysconfVar::_PHYS_PAGES).ok()??;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    u64::try_from(pages)
        .ok()?
        .checked_mul(u64::try_from(page).ok()?)
}

/// Descriptors the host may have in flight to the plugin (sent in replies
/// the plugin has not received yet) beyond one `GetVcpus` reply: the kernel
/// counts them against a per-uid limit shared by every process of the uid
/// (`ETOOMANYREFS` for all of them once it is reached), so a plugin that
/// never reads its replies must not hold more than this.
pub const FDS_IN_FLIGHT_BASE: usize = 32;

/// Budget of descriptors in flight for a VM of `vcpus` vcpus: room for one
/// `GetVcpus` reply (3 per vcpu) plus [`FDS_IN_FLIGHT_BASE`].
pub fn fds_in_flight_budget(vcpus: usize) -> usize {
    FDS_IN_FLIGHT_BASE + 3 * vcpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_bounds_total_and_per_slot() {
        let l = GuestMemoryLimits {
            total: 100,
            per_slot: 60,
        };
        assert!(l.allows(0, 60));
        assert!(!l.allows(0, 61));
        assert!(l.allows(40, 60));
        assert!(!l.allows(41, 60));
        assert!(!l.allows(u64::MAX, 1));
        let host = GuestMemoryLimits::from_host();
        assert!(host.total >= 64 << 20 && host.per_slot == host.total);
    }
}
