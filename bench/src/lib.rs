//! Exit-path benchmark pieces shared by the orchestrator (`vmm-bench`) and
//! the benchmark plugin.

pub mod floor;
pub mod guest;

/// CPU time (user + system, ms) so far of `who`: `libc::RUSAGE_SELF`, or
/// `libc::RUSAGE_CHILDREN` (every child reaped so far, with the children
/// it reaped: vmm reaps the jail's init, init reaps the plugin, so a vmm's
/// whole tree is in it).
pub fn cpu_ms(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the callers pass a valid selector.
    unsafe { libc::getrusage(who, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}
