//! The jail's floor: what starting a plugin program in a jail with the
//! properties of vmm's costs when nothing else runs. A bare program starts
//! the plugin in the same namespaces (user, PID, mount, IPC, UTS, cgroup),
//! with vmm's own mount plan (tmpfs root, `/proc`, devices, the plugin,
//! its loader and libraries bound read-only, `pivot_root`), ids 0, no
//! capabilities and locked secure bits, `no_new_privs`, and vmm's built-in
//! seccomp filter with its listener, whose notifications (the `execve` and
//! the loader's executable mappings) this program answers "continue".
//! Left out, so that this is a floor: vmm itself, the VM, the jail's init
//! (the plugin is PID 1 of its namespace), the network namespace (vmm
//! joins a shared one), resource limits, the exec gate's checks and the
//! plugin's protocol: the plugin gets no socket and ends at its connect.
//!
//! `bench-jail-floor N PLUGIN [ARGS...]` starts it N times one after the
//! other and prints `JAILFLOOR starts=N cpu_ms=X`: CPU per start (this
//! process's user + system time and that of its reaped children, divided
//! by N; this program's own start-up, the library list, the mount plan and
//! the compiled filter are paid once for all N, where vmm pays ~0.1 ms for
//! them per VM). `JAIL_FLOOR_WITHOUT` leaves parts out (see [`Without`]).
//! Needs root (vmm's jail is built the same way only as root); otherwise
//! it prints `JAILFLOOR skipped: WHY` and exits 2.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::waitpid;
use vmm::config::PolicySource;
use vmm::jail::{caps, libs, mounts, seccomp};

/// CPU time (ms) of this process and of its reaped children so far.
fn cpu_ms() -> f64 {
    vmm_bench::cpu_ms(libc::RUSAGE_SELF) + vmm_bench::cpu_ms(libc::RUSAGE_CHILDREN)
}

/// Parts of the jail that `JAIL_FLOOR_WITHOUT` (comma-separated) leaves
/// out, to take its cost apart: `mounts` (the mount plan and
/// `pivot_root`), `seccomp` (the filter and its listener), `caps`
/// (secure bits, capabilities, `no_new_privs`), `namespaces` (every
/// namespace but the user namespace, which the mounts need).
#[derive(Default, Clone, Copy)]
struct Without {
    mounts: bool,
    seccomp: bool,
    caps: bool,
    namespaces: bool,
}

impl Without {
    fn from_env() -> Result<Without, String> {
        let mut w = Without::default();
        let text = std::env::var("JAIL_FLOOR_WITHOUT").unwrap_or_default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            match part {
                "mounts" => w.mounts = true,
                "seccomp" => w.seccomp = true,
                "caps" => w.caps = true,
                "namespaces" => w.namespaces = true,
                other => return Err(format!("JAIL_FLOOR_WITHOUT: unknown part {other:?}")),
            }
        }
        if w.namespaces && !w.mounts {
            return Err("JAIL_FLOOR_WITHOUT: namespaces needs mounts too".into());
        }
        Ok(w)
    }
}

/// What the jailed process needs, prepared before the clone.
struct Prepared {
    without: Without,
    plan: mounts::MountPlan,
    filter: seccompiler::BpfProgram,
    exe: CString,
    argv: Vec<CString>,
}

fn prepare(exe: &Path, args: &[String], ctl: RawFd, without: Without) -> Result<Prepared, String> {
    let mut files = libs::needed_files_cached(exe, &[], Some(Path::new(libs::CACHE_DIR)))
        .map_err(|e| format!("the plugin's libraries: {e}"))?;
    files.push(exe.to_path_buf());
    let binds = mounts::binds(&files, &[]).map_err(|e| format!("bind mounts: {e}"))?;
    let root = PathBuf::from(vmm::jail::SHARED_ROOT);
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let plan = mounts::MountPlan::new(&root, &binds, vmm::jail::TASK_LIMIT as u32)
        .map_err(|e| format!("mount plan: {e}"))?;
    let filter =
        seccomp::build(&PolicySource::BuiltIn, ctl).map_err(|e| format!("seccomp filter: {e}"))?;
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| "a NUL byte in an argument".to_string());
    let mut argv = vec![cstr(exe.as_os_str().as_bytes())?];
    for a in args {
        argv.push(cstr(a.as_bytes())?);
    }
    Ok(Prepared {
        without,
        plan,
        filter,
        exe: cstr(exe.as_os_str().as_bytes())?,
        argv,
    })
}

/// The jailed process (a copy of this single-threaded program): waits for
/// its id maps, builds the jail, hands the listener over, execs.
fn jailed(p: &Prepared, ctl: RawFd) -> isize {
    let mut go = [0u8; 1];
    // SAFETY: reading into a valid one-byte buffer from our socket.
    if unsafe { libc::read(ctl, go.as_mut_ptr().cast(), 1) } != 1 {
        return 10;
    }
    for i in 0..p.plan.ops.len() {
        if !p.without.mounts && p.plan.execute(i).is_err() {
            return 11;
        }
    }
    if !p.without.namespaces && nix::unistd::sethostname("vmm-plugin").is_err() {
        return 12;
    }
    for nr in [libc::SYS_setresgid, libc::SYS_setresuid] {
        // SAFETY: setresgid/setresuid with integer arguments.
        if unsafe { libc::syscall(nr, 0, 0, 0) } != 0 {
            return 13;
        }
    }
    if !p.without.caps
        && (caps::lock_secure_bits()
            .and_then(|()| caps::drop_all())
            .is_err()
            || nix::sys::prctl::set_no_new_privs().is_err())
    {
        return 14;
    }
    let argv: Vec<*const libc::c_char> = p
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    if p.without.seccomp {
        // Tell the parent there is no listener, then exec.
        let iov = [std::io::IoSlice::new(b"n")];
        if sendmsg::<()>(ctl, &iov, &[], MsgFlags::empty(), None).is_err() {
            return 17;
        }
        // SAFETY: NUL-terminated path, NULL-terminated argv and envp.
        unsafe { libc::execve(p.exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        return 18;
    }
    let Ok(listener) = vmm::jail::child::install_filter(&p.filter) else {
        return 16;
    };
    let fds = [listener.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"l")];
    // The filter's prologue allows this sendmsg on the control socket.
    if sendmsg::<()>(
        ctl,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .is_err()
    {
        return 17;
    }
    // SAFETY: NUL-terminated path, NULL-terminated argv and envp.
    unsafe { libc::execve(p.exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    18
}

/// The jailed process's end of the control socket has this number in every
/// start, so that the filter (which names it) is compiled once.
const JAIL_CTL: RawFd = 200;

/// One jailed start, to the plugin's end.
fn once(p: &Prepared, stack: &mut [u8]) -> Result<(), String> {
    let without = p.without;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {e}"))?;
    // SAFETY: dup3 onto a number this program does not otherwise use.
    if unsafe { libc::dup3(theirs.as_raw_fd(), JAIL_CTL, libc::O_CLOEXEC) } != JAIL_CTL {
        return Err(format!("dup3: {}", Errno::last()));
    }
    drop(theirs);
    // SAFETY: dup3 just made JAIL_CTL ours.
    let theirs = unsafe { OwnedFd::from_raw_fd(JAIL_CTL) };
    let ctl = JAIL_CTL;
    let mut flags = CloneFlags::CLONE_NEWUSER;
    if !without.namespaces {
        flags |= CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP;
    }
    // SAFETY: the child runs `jailed` in a copy of this single-threaded
    // process on its own stack, then execs or exits.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| jailed(p, ctl)),
            stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| format!("clone: {e}"))?;
    drop(theirs);
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let (uid_map, gid_map) = vmm::jail::id_maps(uid, gid, &[]);
    for (file, text) in [
        ("setgroups", "deny"),
        ("uid_map", uid_map.as_str()),
        ("gid_map", gid_map.as_str()),
    ] {
        std::fs::write(format!("/proc/{pid}/{file}"), text)
            .map_err(|e| format!("writing {file}: {e}"))?;
    }
    nix::unistd::write(&ours, b"g").map_err(|e| format!("go: {e}"))?;

    let mut buf = [0u8; 8];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        ours.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receiving the listener: {e}"))?;
    let mut listener = None;
    for c in msg.cmsgs().map_err(|e| format!("cmsgs: {e}"))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                listener = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let Some(listener) = listener.map(seccomp::Listener::new) else {
        let status = waitpid(pid, None).map_err(|e| format!("waitpid: {e}"))?;
        if without.seccomp && msg.bytes == 1 && buf[0] == b'n' {
            return Ok(());
        }
        return Err(format!(
            "the jailed process failed before its exec: {status:?}"
        ));
    };
    // Every notification is let through; the listener hangs up when the
    // plugin (the filter's last user) is gone.
    loop {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(10_000u16)) {
            Ok(0) => return Err("the jailed plugin did not end within 10 s".into()),
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.contains(PollFlags::POLLIN) {
            if let Ok(n) = listener.recv() {
                let _ = listener.allow(n.id);
            }
        } else {
            break;
        }
    }
    waitpid(pid, None).map_err(|e| format!("waitpid: {e}"))?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(n), Some(plugin)) = (
        args.first().and_then(|n| n.parse::<usize>().ok()),
        args.get(1),
    ) else {
        eprintln!("usage: bench-jail-floor N PLUGIN [ARGS...]");
        std::process::exit(2);
    };
    let without = match Without::from_env() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("bench-jail-floor: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("JAILFLOOR skipped: needs root, as vmm's jail does to be built this way");
        std::process::exit(2);
    }
    let exe = match Path::new(plugin).canonicalize() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench-jail-floor: {plugin}: {e}");
            std::process::exit(1);
        }
    };
    let rest = &args[2..];
    let p = match prepare(&exe, rest, JAIL_CTL, without) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench-jail-floor: {e}");
            std::process::exit(2);
        }
    };
    let mut stack = vec![0u8; 256 << 10];
    // One start first: the library cache and the page cache are warm for
    // vmm's runs too.
    if let Err(e) = once(&p, &mut stack) {
        println!("JAILFLOOR skipped: {e}");
        std::process::exit(2);
    }
    let cpu0 = cpu_ms();
    for _ in 0..n {
        if let Err(e) = once(&p, &mut stack) {
            eprintln!("bench-jail-floor: {e}");
            std::process::exit(1);
        }
    }
    println!(
        "JAILFLOOR starts={n} cpu_ms={:.3}",
        (cpu_ms() - cpu0) / n as f64
    );
}
