//! Helpers shared by the modes: waiting for expected vcpu events, guest
//! memory, and counting the requests a vcpu thread sends.

use crosvm_plugin::{AddressSpace, VcpuEvent, VcpuGuard};
use plugin_examples::GuestRam;

/// Little-endian value of io data.
pub fn le(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | (u64::from(*b) << (8 * i)))
}

/// Waits for the next event; any error ends the plugin.
pub fn next<'a>(v: &'a mut VcpuGuard<'_>) -> VcpuEvent<'a> {
    let id = v.id();
    match v.wait() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("vcpu {id}: wait failed: {e}");
            std::process::exit(1);
        }
    }
}

/// Waits for a synchronous io event at `address`; anything else ends the
/// plugin (every event of these guests is predictable). Returns the data.
pub fn expect_io(
    v: &mut VcpuGuard<'_>,
    space: AddressSpace,
    address: u64,
    is_write: bool,
) -> Vec<u8> {
    let id = v.id();
    match next(v) {
        VcpuEvent::Io {
            space: s,
            address: a,
            is_write: w,
            no_resume: false,
            data,
        } if s == space && a == address && w == is_write => data.to_vec(),
        other => {
            eprintln!(
                "vcpu {id}: expected a synchronous io {} at {space:?} {address:#x}, got {other:x?}",
                if is_write { "write" } else { "read" }
            );
            std::process::exit(1);
        }
    }
}

/// Resumes; a failure ends the plugin.
pub fn resume(v: &mut VcpuGuard<'_>) {
    if let Err(e) = v.resume() {
        eprintln!("vcpu {}: resume failed: {e}", v.id());
        std::process::exit(1);
    }
}

/// Real-mode interrupt vector `vector` -> 0000:handler.
pub fn set_ivt(ram: &GuestRam, vector: u64, handler: u16) {
    let [lo, hi] = handler.to_le_bytes();
    if let Err(e) = ram.write(vector * 4, &[lo, hi, 0, 0]) {
        eprintln!("writing the interrupt table failed: {e}");
        std::process::exit(1);
    }
}

/// One guest byte (the guest may be changing it).
pub fn guest_byte(ram: &GuestRam, addr: u64) -> u8 {
    ram.read(addr, 1)
        .ok()
        .and_then(|b| b.first().copied())
        .unwrap_or(0)
}

/// Polls guest byte `addr` until it equals `value`; false after 10 s (this
/// only bounds a hang, it measures nothing).
pub fn wait_guest_byte(ram: &GuestRam, addr: u64, value: u8) -> bool {
    for _ in 0..10_000 {
        if guest_byte(ram, addr) == value {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    false
}

/// Write system calls made so far by the calling thread
/// (`/proc/thread-self/io`). Every request the SDK sends to the VMM is one
/// write; an answer from the register cache is none.
pub fn thread_syscw() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/io").unwrap_or_default();
    match text
        .lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
    {
        Some(n) => n,
        None => {
            eprintln!("cannot read syscw from /proc/thread-self/io");
            std::process::exit(1);
        }
    }
}

/// Number of requests (write syscalls) `f` sends, and its result.
pub fn requests<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = thread_syscw();
    let r = f();
    (thread_syscw() - before, r)
}
