//! The plugin's jail, built by vmm itself (no minijail): new user, PID,
//! mount, network, IPC, UTS and cgroup namespaces; a tmpfs root with only
//! what the plugin needs bind-mounted in; no capabilities; no_new_privs;
//! resource limits; and a seccomp filter whose violations the host learns
//! about (and names) through a seccomp user-notification listener.
//!
//! Processes: the host clones the jail's **init** (PID 1 of the new PID
//! namespace) which builds the jail and forks the **plugin** (PID 2). Init
//! only reaps, forwards termination signals to the plugin, and passes the
//! plugin's wait status to the host when it ends; the plugin thus has
//! ordinary signal semantics (not those of a PID 1) and the host reports
//! its real exit status or signal. Killing init kills everything in the
//! namespace.
//!
//! Start-up handshake over a SOCK_SEQPACKET control socket:
//! 1. host: clone init; write its uid/gid maps; send "go";
//! 2. init: mounts, pivot_root, host name, ids, rlimits, descriptors,
//!    capabilities, no_new_privs; fork the plugin;
//! 3. plugin: install the filter (with a listener) and send the listener
//!    plus the read end of an exec-status pipe to the host; execve;
//! 4. host: the filter reports that execve; the host lets it (only it) run
//!    and reads the exec-status pipe: EOF means the exec succeeded.

pub mod caps;
pub mod child;
pub mod gate;
pub mod libs;
pub mod mounts;
pub mod netns;
pub mod policy;
pub mod seccomp;
pub mod syscalls;

use std::ffi::{c_char, CString};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use crate::config::{GidMap, JailConfig};
use crate::launch::Launch;

/// `RLIMIT_NOFILE` in the jail (as crosvm), capped by the host's hard limit.
pub const NOFILE_LIMIT: u64 = 32768;
/// Tasks (processes and threads) in the jail: `RLIMIT_NPROC` and, where
/// the kernel has it per namespace, `kernel.pid_max`.
pub const TASK_LIMIT: u64 = 1024;
/// How long the jail may take to start before the host gives up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack of the init process (a clone of the host running `child.rs`).
const INIT_STACK: usize = 256 << 10;

/// Errors building the jail or starting the plugin in it.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot execute {path}")]
    Executable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find what {path} needs to run in the jail")]
    Libs {
        path: PathBuf,
        #[source]
        source: libs::LibsError,
    },
    #[error("cannot create the jail's root directory")]
    TempRoot(#[source] Errno),
    #[error("bad jail mount")]
    Mounts(#[source] mounts::MountError),
    #[error("cannot build the seccomp filter")]
    Seccomp(#[source] seccomp::SeccompError),
    #[error("{0} contains a NUL byte")]
    Nul(String),
    #[error("cannot create {what}")]
    Resource {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot create the jail's namespaces (are user namespaces allowed?)")]
    Clone(#[source] Errno),
    #[error("cannot write {file} for the jail (extra gid maps need CAP_SETGID)")]
    IdMap {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the jail failed to {stage}")]
    Setup {
        stage: String,
        #[source]
        source: Errno,
    },
    #[error("the jail's init process ended during start-up")]
    InitDied,
    #[error("the jail did not start within {0:?}")]
    Timeout(Duration),
    #[error("cannot talk to the jail")]
    Control(#[source] Errno),
    #[error("the plugin was stopped by the seccomp filter before it started: it called {0}")]
    EarlyViolation(String),
    #[error("cannot start the plugin under its seccomp filter")]
    Listener(#[source] seccomp::SeccompError),
    #[error("cannot leave the jail's shared network namespace")]
    Netns(#[source] netns::NetnsError),
    #[error("cannot execute {path} in the jail")]
    Exec {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// The default jail root: an empty directory removed when the plugin is
/// gone (its contents are hidden by the tmpfs anyway).
#[derive(Debug)]
struct TempRoot(PathBuf);

impl TempRoot {
    fn create() -> Result<TempRoot, JailError> {
        let template = std::env::temp_dir().join("vmm-jail-root.XXXXXX");
        nix::unistd::mkdtemp(&template)
            .map(TempRoot)
            .map_err(JailError::TempRoot)
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            debug!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// The directory every jail's root tmpfs is mounted on by default.
pub const SHARED_ROOT: &str = "/run/vmm/jail-root";

/// [`SHARED_ROOT`], if it is (or can be made) a directory of vmm's user
/// that nobody else can write (in [`netns::RUN_DIR`], checked by the caller).
fn shared_root() -> Option<PathBuf> {
    match netns::private_dir(SHARED_ROOT) {
        Ok(()) => Some(PathBuf::from(SHARED_ROOT)),
        Err(e) => {
            debug!("jail root under $TMPDIR: {}", crate::error_chain(&e));
            None
        }
    }
}

/// A running jail, held by the host while the plugin lives.
#[derive(Debug)]
pub struct Jailed {
    listener: seccomp::Listener,
    ctl: OwnedFd,
    /// The plugin process (host PID namespace), for reports.
    pub plugin_pid: u32,
    log_failures: bool,
    logged: usize,
    /// Until the plugin's first request: start-up calls are allowed.
    startup: bool,
    _root: Option<TempRoot>,
}

/// At most this many violations are logged with `--seccomp-log-failures`.
const MAX_LOGGED: usize = 1000;

impl Jailed {
    /// The seccomp listener, to be watched for readability.
    pub fn seccomp_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// The plugin has sent its first request: its `main` runs, so the
    /// start-up calls allowed on top of the policy are dropped.
    pub fn end_startup(&mut self) {
        if self.startup {
            debug!("seccomp: the plugin connected; start-up calls are no longer allowed");
            self.startup = false;
        }
    }

    /// Handles a readable listener (see `gate.rs`). Returns the description
    /// of a system call that must stop the plugin; with
    /// `--seccomp-log-failures` a policy violation is logged and allowed
    /// instead (an exec never is).
    pub fn on_seccomp(&mut self) -> Option<String> {
        let n = match self.listener.recv() {
            Ok(n) => n,
            Err(e) => {
                // The caller died meanwhile (ENOENT), or nothing was there.
                debug!("seccomp listener: {}", crate::error_chain(&e));
                return None;
            }
        };
        let (verdict, why) = gate::decide(&n, self.startup, || {
            gate::read_exec_facts(n.pid, n.args[4] as u32 as i32)
        });
        let answered = match verdict {
            gate::Verdict::Allow if self.listener.id_valid(n.id) => self.listener.allow(n.id),
            gate::Verdict::Allow => return None,
            gate::Verdict::Fail(errno) => {
                if self.logged < MAX_LOGGED {
                    warn!(
                        "seccomp: refused {} ({}): {}",
                        why.unwrap_or("the call"),
                        Errno::from_raw(errno),
                        n.describe()
                    );
                    self.logged += 1;
                }
                self.listener.fail(n.id, errno)
            }
            gate::Verdict::Forbidden => return Some(n.describe()),
            gate::Verdict::Violation if !self.log_failures => return Some(n.describe()),
            gate::Verdict::Violation => {
                let what = n.describe();
                if self.logged < MAX_LOGGED {
                    warn!("seccomp: the plugin called {what}; allowed (--seccomp-log-failures)");
                } else if self.logged == MAX_LOGGED {
                    warn!("seccomp: further violations are not logged");
                }
                self.logged += 1;
                self.listener.allow(n.id)
            }
        };
        if let Err(e) = answered {
            debug!("seccomp listener: {}", crate::error_chain(&e));
        }
        None
    }

    /// The plugin's wait status, as init reported it before exiting.
    pub fn plugin_status(&self) -> Option<i32> {
        let mut buf = [0u8; 64];
        loop {
            match nix::sys::socket::recv(self.ctl.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    if let Some((child::KIND_STATUS, _, status)) = child::parse_record(&buf[..n]) {
                        return Some(status);
                    }
                    if n == 0 {
                        return None;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Kills and reaps init after a failed start.
struct InitGuard(Option<Pid>);

impl Drop for InitGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

fn cstring(s: &[u8], what: &str) -> Result<CString, JailError> {
    CString::new(s).map_err(|_| JailError::Nul(what.to_string()))
}

/// Starts the plugin in a new jail. Returns init's pid (the host's child)
/// and the jail handle.
pub fn spawn(config: &JailConfig, launch: Launch<'_>) -> Result<(Pid, Jailed), JailError> {
    let started = Instant::now();
    let exe = launch
        .path
        .canonicalize()
        .map_err(|source| JailError::Executable {
            path: launch.path.to_path_buf(),
            source,
        })?;
    // The per-boot state (library cache, shared root) is under RUN_DIR.
    let run_dir = netns::private_dir(netns::RUN_DIR)
        .map_err(|e| debug!("jail: no {}: {}", netns::RUN_DIR, crate::error_chain(&e)))
        .is_ok();
    let cache = run_dir.then_some(Path::new(libs::CACHE_DIR));
    let needed =
        libs::needed_files_cached(&exe, launch.env, cache).map_err(|source| JailError::Libs {
            path: exe.clone(),
            source,
        })?;
    let libs_listed = started.elapsed();
    let (root, temp_root) = match &config.root {
        Some(r) => {
            mounts::check_root(r).map_err(JailError::Mounts)?;
            (r.clone(), None)
        }
        // Every jail mounts its tmpfs on the same directory, each in its
        // own mount namespace (no mkdir and rmdir per VM); a new one under
        // $TMPDIR when /run/vmm cannot be had (not root).
        None => match run_dir.then(shared_root).flatten() {
            Some(r) => (r, None),
            None => {
                let t = TempRoot::create()?;
                (t.0.clone(), Some(t))
            }
        },
    };
    let mut files = needed;
    files.push(exe.clone());
    let binds = mounts::binds(&files, &config.mounts).map_err(JailError::Mounts)?;
    let plan =
        mounts::MountPlan::new(&root, &binds, TASK_LIMIT as u32).map_err(JailError::Mounts)?;

    let (host_ctl, jail_ctl) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|source| JailError::Resource {
        what: "the jail's control socket",
        source,
    })?;
    let filter =
        seccomp::build(&config.policy, jail_ctl.as_raw_fd()).map_err(JailError::Seccomp)?;
    let null = nix::fcntl::open(
        c"/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| JailError::Resource {
        what: "/dev/null for the plugin's stdin",
        source,
    })?;

    // argv[0] is the plugin path as given (as in the unjailed mode); the
    // environment is what the command line asked for plus CROSVM_SOCKET.
    let socket_fd = launch.socket.as_raw_fd();
    let exe_c = cstring(exe.as_os_str().as_bytes(), "the plugin path")?;
    let mut args = vec![cstring(
        launch.path.as_os_str().as_bytes(),
        "the plugin path",
    )?];
    for a in launch.args {
        args.push(cstring(a.as_bytes(), "a plugin argument")?);
    }
    let mut env = Vec::new();
    for (k, v) in launch.env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env.push(cstring(&kv, "an environment variable")?);
    }
    env.push(cstring(
        format!("CROSVM_SOCKET={socket_fd}").as_bytes(),
        "CROSVM_SOCKET",
    )?);
    let argv: Vec<*const c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const c_char> = env
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let hard_nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(NOFILE_LIMIT);
    let ctx = child::Context {
        plan: &plan,
        ctl: jail_ctl.as_raw_fd(),
        host_ctl: host_ctl.as_raw_fd(),
        socket: socket_fd,
        stdout: launch.stdout.as_raw_fd(),
        stderr: launch.stderr.as_raw_fd(),
        null: null.as_raw_fd(),
        nofile: NOFILE_LIMIT.min(hard_nofile),
        nproc: TASK_LIMIT,
        filter: &filter,
        exe: &exe_c,
        argv: &argv,
        envp: &envp,
    };
    let prepared = started.elapsed();

    // A plugin that can never create a socket joins the shared empty
    // network namespace (netns.rs: why that keeps it isolated); any other,
    // or when that namespace cannot be had, gets one of its own.
    let shared_net = netns::may_share(config)
        .then(|| netns::shared_empty().and_then(|ns| netns::Entered::enter(ns.as_fd())))
        .and_then(|r| {
            r.map_err(|e| {
                debug!(
                    "jail: a network namespace of its own: {}",
                    crate::error_chain(&e)
                )
            })
            .ok()
        });
    let mut stack = vec![0u8; INIT_STACK];
    let mut flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    if shared_net.is_none() {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    let net_kind = if shared_net.is_some() {
        "shared"
    } else {
        "own"
    };
    // SAFETY: the child runs `child::init_main` on its own stack in a copy
    // of this address space; that code only makes system calls on data
    // prepared above (no allocation, no locks), then execs or exits.
    let init = unsafe {
        nix::sched::clone(
            Box::new(|| child::init_main(&ctx)),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(JailError::Clone)?;
    let mut guard = InitGuard(Some(init));
    if let Some(entered) = shared_net {
        entered.leave().map_err(JailError::Netns)?;
    }
    drop(jail_ctl);
    drop(null);
    drop(launch.stdout);
    drop(launch.stderr);

    write_id_maps(init, &config.gid_maps)?;
    let mapped = started.elapsed();
    nix::sys::socket::send(host_ctl.as_raw_fd(), b"g", MsgFlags::empty())
        .map_err(JailError::Control)?;

    // The plugin's hand-over: the listener and the exec-status pipe.
    let deadline = started + START_TIMEOUT;
    wait_readable(host_ctl.as_fd(), deadline)?;
    let (listener, exec_status) = receive_handoff(&host_ctl, &plan)?;
    let listener = seccomp::Listener::new(listener);

    // The first notification must be the plugin's execve.
    wait_readable(listener.as_fd(), deadline)?;
    let n = listener.recv().map_err(JailError::Listener)?;
    if n.nr != libc::SYS_execve as i32 {
        return Err(JailError::EarlyViolation(n.describe()));
    }
    listener.allow(n.id).map_err(JailError::Listener)?;
    let plugin_pid = n.pid;

    // EOF: the exec happened (the pipe is close-on-exec, so this comes
    // before any call of the new program); 4 bytes: the exec's errno. A
    // failed exec's report (write, exit) may itself be stopped by a user
    // policy: that is still vmm's code, let it run.
    loop {
        if wait_either(exec_status.as_fd(), listener.as_fd(), deadline)? {
            let mut errno = [0u8; 4];
            match nix::unistd::read(&exec_status, &mut errno) {
                Ok(0) => break,
                Ok(_) => {
                    return Err(JailError::Exec {
                        path: exe,
                        source: Errno::from_raw(i32::from_le_bytes(errno)),
                    })
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(JailError::Control(e)),
            }
        }
        let n = listener.recv().map_err(JailError::Listener)?;
        listener.allow(n.id).map_err(JailError::Listener)?;
    }
    debug!(
        "jail ready in {:?} (listing libraries {libs_listed:?}, preparing {prepared:?}, \
         mapping ids {mapped:?}; {net_kind} network namespace); plugin pid {plugin_pid}",
        started.elapsed()
    );
    guard.0 = None;
    Ok((
        init,
        Jailed {
            listener,
            ctl: host_ctl,
            plugin_pid,
            log_failures: config.log_failures,
            logged: 0,
            startup: true,
            _root: temp_root,
        },
    ))
}

/// uid 0 and gid 0 inside are the host's effective ids; extra gid lines
/// follow. `setgroups` is denied.
fn write_id_maps(pid: Pid, gid_maps: &[GidMap]) -> Result<(), JailError> {
    let write = |file: &'static str, text: &str| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/{file}"))
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|source| JailError::IdMap { file, source })
    };
    let (uid_map, gid_map) = id_maps(
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
        gid_maps,
    );
    write("setgroups", "deny")?;
    write("uid_map", &uid_map)?;
    write("gid_map", &gid_map)
}

/// The contents of uid_map and gid_map.
pub fn id_maps(euid: u32, egid: u32, gid_maps: &[GidMap]) -> (String, String) {
    let uid_map = format!("0 {euid} 1\n");
    let mut gid_map = format!("0 {egid} 1\n");
    for g in gid_maps {
        gid_map.push_str(&format!("{} {} {}\n", g.inner, g.outer, g.count));
    }
    (uid_map, gid_map)
}

fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> Result<(), JailError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(JailError::Timeout(START_TIMEOUT));
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(JailError::Control(e)),
        }
    }
}

/// Waits until `first` or `second` is readable; true if `first` is.
fn wait_either(
    first: BorrowedFd<'_>,
    second: BorrowedFd<'_>,
    deadline: Instant,
) -> Result<bool, JailError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(JailError::Timeout(START_TIMEOUT));
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [
            PollFd::new(first, PollFlags::POLLIN),
            PollFd::new(second, PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {
                let ready = |f: &PollFd<'_>| {
                    f.revents()
                        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP))
                };
                if ready(&fds[0]) {
                    return Ok(true);
                }
                if ready(&fds[1]) {
                    return Ok(false);
                }
                // Only an error condition on the listener: the plugin is
                // gone without an exec report.
                return Err(JailError::InitDied);
            }
            Err(e) => return Err(JailError::Control(e)),
        }
    }
}

/// Reads the plugin's hand-over, or the error the jail reported instead.
fn receive_handoff(
    ctl: &OwnedFd,
    plan: &mounts::MountPlan,
) -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut buf = [0u8; 64];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        ctl.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(JailError::Control)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(JailError::Control)? {
        if let ControlMessageOwned::ScmRights(r) = c {
            // SAFETY: the kernel just installed these descriptors for us.
            fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let len = msg.bytes;
    match child::parse_record(&buf[..len]) {
        Some((child::KIND_HANDOFF, _, _)) if fds.len() == 2 => {
            let mut it = fds.into_iter();
            match (it.next(), it.next()) {
                (Some(l), Some(p)) => Ok((l, p)),
                _ => Err(JailError::InitDied),
            }
        }
        Some((child::KIND_ERROR, stage, errno)) => Err(JailError::Setup {
            stage: describe_stage(stage, plan),
            source: Errno::from_raw(errno),
        }),
        _ => Err(JailError::InitDied),
    }
}

fn describe_stage(stage: u32, plan: &mounts::MountPlan) -> String {
    if stage >= child::STAGE_BASE {
        child::STAGES
            .get((stage - child::STAGE_BASE) as usize)
            .map_or_else(|| format!("start (stage {stage})"), |s| s.to_string())
    } else {
        plan.descriptions
            .get(stage as usize)
            .cloned()
            .unwrap_or_else(|| format!("mount (step {stage})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_map_contents() {
        let (u, g) = id_maps(
            1000,
            100,
            &[
                GidMap {
                    inner: 1,
                    outer: 2,
                    count: 3,
                },
                GidMap {
                    inner: 10,
                    outer: 10,
                    count: 1,
                },
            ],
        );
        assert_eq!(u, "0 1000 1\n");
        assert_eq!(g, "0 100 1\n1 2 3\n10 10 1\n");
        let (_, g) = id_maps(0, 0, &[]);
        assert_eq!(g, "0 0 1\n");
    }

    #[test]
    fn stages_are_described() {
        let plan = mounts::MountPlan::new(Path::new("/R"), &[], 1024).unwrap();
        assert_eq!(describe_stage(1, &plan), "mount the jail's tmpfs on /R");
        assert_eq!(
            describe_stage(child::STAGE_BASE + 6, &plan),
            "drop the jail's capabilities"
        );
        assert!(describe_stage(child::STAGE_BASE + 99, &plan).contains("stage"));
    }
}
