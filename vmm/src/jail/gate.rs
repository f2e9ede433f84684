//! What vmm does with a system call the plugin's filter hands to it (see
//! `seccomp.rs`): plain decisions over the notification and a few facts
//! about the calling process, tested without a jail.
//!
//! * `execve`/`execveat` after the plugin has started: always stopped, also
//!   with `--seccomp-log-failures` (the one exec that starts the plugin is
//!   let through by `spawn` before any of this applies).
//! * `mmap` with `PROT_EXEC`: never writable, never shared, never
//!   anonymous; only a private mapping of a file on a read-only, exec-able
//!   mount that is not shmem (so never a memfd), and only while the process
//!   has one thread (the calling thread is blocked, so nobody can swap the
//!   descriptor between this check and the mapping). That is what the
//!   dynamic loader does; anything else fails with `EACCES`.
//! * **Start-up calls**: until the plugin sends its first request on the
//!   plugin socket (`crosvm_connect` is called from `main`), the calls the
//!   dynamic loader, libc and Rust's runtime make before `main` are allowed
//!   on top of any policy, so policies written for minijail (which applied
//!   them after start-up) work unchanged. Afterwards only the policy counts.
//! * Everything else the policy forbids stops the plugin, or with
//!   `--seccomp-log-failures` is logged and allowed.

use std::os::fd::AsRawFd;

use super::seccomp::Notification;

/// The host's answer to one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the call run.
    Allow,
    /// Fail it with this errno (the plugin sees an ordinary error).
    Fail(i32),
    /// Stop the plugin (or, in log mode, log it and let it run).
    Violation,
    /// Stop the plugin, also in log mode.
    Forbidden,
}

/// Facts about the mapped file of an executable `mmap`, read by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecFile {
    /// shmem (memfd, tmpfs) or hugetlbfs.
    pub shmem: bool,
    pub read_only_mount: bool,
    pub noexec_mount: bool,
}

/// Why an executable mapping is refused, or `None` if it may be made.
pub fn exec_mapping_refusal(
    args: &[u64; 6],
    threads: Option<u32>,
    file: Option<ExecFile>,
) -> Option<&'static str> {
    let prot = args[2] as u32 as i32;
    let flags = args[3] as u32 as i32;
    let fd = args[4] as u32 as i32;
    if prot & libc::PROT_WRITE != 0 {
        return Some("writable and executable");
    }
    if flags & libc::MAP_TYPE != libc::MAP_PRIVATE {
        return Some("a shared executable mapping");
    }
    if flags & libc::MAP_ANONYMOUS != 0 || fd < 0 {
        return Some("anonymous executable memory");
    }
    if threads != Some(1) {
        return Some("an executable mapping made while the process has several threads");
    }
    match file {
        None => Some("an executable mapping of a descriptor vmm cannot inspect"),
        Some(f) if f.shmem => Some("an executable mapping of a memfd or shared memory"),
        Some(f) if f.noexec_mount => Some("an executable mapping from a noexec mount"),
        Some(f) if !f.read_only_mount => Some("an executable mapping of a writable file"),
        Some(_) => None,
    }
}

/// Whether a call is one the loader, libc or Rust's runtime make before
/// `main`, allowed during start-up on top of the policy. (Executable
/// mappings never get here: they are decided above.)
pub fn is_startup_call(nr: i64, args: &[u64; 6]) -> bool {
    let arg = |i: usize| args[i];
    match nr {
        libc::SYS_openat => arg(2) as i32 & libc::O_ACCMODE == libc::O_RDONLY,
        libc::SYS_prlimit64 => arg(2) == 0,
        libc::SYS_mmap | libc::SYS_mprotect => arg(2) as i32 & libc::PROT_EXEC == 0,
        libc::SYS_newfstatat
        | libc::SYS_fstat
        | libc::SYS_statx
        | libc::SYS_pread64
        | libc::SYS_read
        | libc::SYS_lseek
        | libc::SYS_close
        | libc::SYS_access
        | libc::SYS_faccessat
        | libc::SYS_faccessat2
        | libc::SYS_readlink
        | libc::SYS_getrandom
        | libc::SYS_brk
        | libc::SYS_munmap
        | libc::SYS_arch_prctl
        | libc::SYS_set_tid_address
        | libc::SYS_set_robust_list
        | libc::SYS_rseq
        | libc::SYS_sigaltstack
        | libc::SYS_rt_sigaction
        | libc::SYS_rt_sigprocmask
        | libc::SYS_poll
        | libc::SYS_sched_getaffinity
        | libc::SYS_futex
        | libc::SYS_gettid
        | libc::SYS_getpid => true,
        _ => false,
    }
}

/// Decides a notification. `exec_facts` is asked only for an executable
/// `mmap`: (threads of the calling process, facts about the file).
pub fn decide(
    n: &Notification,
    startup: bool,
    exec_facts: impl FnOnce() -> (Option<u32>, Option<ExecFile>),
) -> (Verdict, Option<&'static str>) {
    let nr = i64::from(n.nr);
    if n.arch != super::seccomp::AUDIT_ARCH_X86_64 {
        return (Verdict::Violation, None);
    }
    if nr == libc::SYS_execve || nr == libc::SYS_execveat {
        return (Verdict::Forbidden, None);
    }
    if nr == libc::SYS_mmap && n.args[2] as i32 & libc::PROT_EXEC != 0 {
        let (threads, file) = exec_facts();
        return match exec_mapping_refusal(&n.args, threads, file) {
            None => (Verdict::Allow, None),
            Some(why) => (Verdict::Fail(libc::EACCES), Some(why)),
        };
    }
    if startup && is_startup_call(nr, &n.args) {
        return (Verdict::Allow, None);
    }
    (Verdict::Violation, None)
}

/// Reads the facts for an executable `mmap` of thread `tid`'s descriptor
/// `fd` from /proc (the host may: the jail's user namespace is its own).
pub fn read_exec_facts(tid: u32, fd: i32) -> (Option<u32>, Option<ExecFile>) {
    let threads = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        });
    let file = (|| {
        let path = format!("/proc/{tid}/fd/{fd}");
        // O_PATH: nothing is opened for reading; the open file is the same
        // one the descriptor refers to.
        let f = nix::fcntl::open(
            path.as_str(),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()?;
        let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
        // SAFETY: fstatfs writes one statfs into the valid buffer.
        if unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: fstatfs succeeded and filled the struct.
        let st = unsafe { st.assume_init() };
        let mut vst = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: fstatvfs writes one statvfs into the valid buffer.
        if unsafe { libc::fstatvfs(f.as_raw_fd(), vst.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: fstatvfs succeeded and filled the struct.
        let flags = unsafe { vst.assume_init() }.f_flag;
        Some(ExecFile {
            shmem: st.f_type == libc::TMPFS_MAGIC || st.f_type == libc::HUGETLBFS_MAGIC,
            read_only_mount: flags & libc::ST_RDONLY != 0,
            noexec_mount: flags & libc::ST_NOEXEC != 0,
        })
    })();
    (threads, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mmap(prot: i32, flags: i32, fd: i32) -> Notification {
        Notification {
            id: 1,
            pid: 2,
            nr: libc::SYS_mmap as i32,
            arch: super::super::seccomp::AUDIT_ARCH_X86_64,
            args: [0, 4096, prot as u64, flags as u64, fd as u32 as u64, 0],
        }
    }

    const LIB: ExecFile = ExecFile {
        shmem: false,
        read_only_mount: true,
        noexec_mount: false,
    };

    #[test]
    fn the_loaders_mappings_are_allowed() {
        let n = mmap(libc::PROT_READ | libc::PROT_EXEC, libc::MAP_PRIVATE, 3);
        assert_eq!(decide(&n, false, || (Some(1), Some(LIB))).0, Verdict::Allow);
    }

    #[test]
    fn memfd_and_other_executable_memory_is_refused() {
        let rx = libc::PROT_READ | libc::PROT_EXEC;
        let refused = |n: &Notification, facts: (Option<u32>, Option<ExecFile>)| {
            decide(n, true, || facts).0 == Verdict::Fail(libc::EACCES)
        };
        let memfd = ExecFile {
            shmem: true,
            read_only_mount: false,
            noexec_mount: false,
        };
        assert!(refused(
            &mmap(rx, libc::MAP_PRIVATE, 3),
            (Some(1), Some(memfd))
        ));
        assert!(refused(
            &mmap(rx, libc::MAP_SHARED, 3),
            (Some(1), Some(LIB))
        ));
        assert!(refused(
            &mmap(rx | libc::PROT_WRITE, libc::MAP_PRIVATE, 3),
            (Some(1), Some(LIB))
        ));
        assert!(refused(
            &mmap(rx, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            (Some(1), Some(LIB))
        ));
        assert!(refused(
            &mmap(rx, libc::MAP_PRIVATE, 3),
            (Some(2), Some(LIB))
        ));
        assert!(refused(&mmap(rx, libc::MAP_PRIVATE, 3), (Some(1), None)));
        let writable = ExecFile {
            read_only_mount: false,
            ..LIB
        };
        assert!(refused(
            &mmap(rx, libc::MAP_PRIVATE, 3),
            (Some(1), Some(writable))
        ));
    }

    #[test]
    fn exec_is_forbidden_and_startup_calls_end() {
        let mut n = mmap(libc::PROT_READ, libc::MAP_PRIVATE, 3);
        n.nr = libc::SYS_execve as i32;
        assert_eq!(decide(&n, true, || (None, None)).0, Verdict::Forbidden);
        n.nr = libc::SYS_newfstatat as i32;
        assert_eq!(decide(&n, true, || (None, None)).0, Verdict::Allow);
        assert_eq!(decide(&n, false, || (None, None)).0, Verdict::Violation);
        n.nr = libc::SYS_socket as i32;
        assert_eq!(decide(&n, true, || (None, None)).0, Verdict::Violation);
        n.nr = libc::SYS_openat as i32;
        n.args[2] = libc::O_RDWR as u64;
        assert_eq!(decide(&n, true, || (None, None)).0, Verdict::Violation);
    }
}
