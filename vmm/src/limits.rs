//! Bounds on everything a plugin can make the host allocate or hold. Each
//! limit is answered with an errno when exceeded; README.md lists them.

/// Largest main request packet accepted (bytes). The reference host took only
/// 4096 (quirk 5 of docs/differences-from-crosvm.md); large `SetIrqRouting` tables need more.
pub const MAX_MAIN_REQUEST: usize = plugin_proto::framing::MAX_MESSAGE_SIZE;

/// Live objects (memory, io events, irq events) at once → `ENOSPC`.
pub const MAX_OBJECTS: usize = 4096;

/// Reserved ranges, both spaces together → `ENOSPC`.
pub const MAX_RESERVED_RANGES: usize = 16384;

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
