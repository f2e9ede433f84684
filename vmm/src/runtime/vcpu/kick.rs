//! The kick signal: how the main thread stops a vcpu thread in any phase.
//! The handler sets `immediate_exit` in the thread's `kvm_run` (so a
//! `KVM_RUN` about to start returns at once) and, being installed without
//! `SA_RESTART`, interrupts a blocking channel read or write.

use std::cell::Cell;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use nix::errno::Errno;

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick handler.
    pub(super) static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
    /// This thread's kick counter (`VcpuControl::kicks`), for the handler.
    pub(super) static KICKS: Cell<*const AtomicU64> = const { Cell::new(std::ptr::null()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is set by this thread to its own kvm_run mapping
        // and cleared before that mapping is dropped; a volatile byte store is
        // async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
    let k = KICKS.with(|c| c.get());
    if !k.is_null() {
        // SAFETY: set by this thread to the counter of its `VcpuControl`,
        // which its `Arc` keeps alive, and cleared before that `Arc` is
        // dropped; atomic operations are async-signal-safe.
        unsafe { (*k).fetch_add(1, Ordering::SeqCst) };
        // Whatever the main thread stored before it read the old count
        // (a host pause) is visible to this thread from here on.
        fence(Ordering::SeqCst);
    }
}

/// The signal used to kick vcpu threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), Errno> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| Errno::from_raw(e.errno()))
}
