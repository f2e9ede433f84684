//! One empty network namespace shared by the jails whose plugins cannot
//! create a socket, instead of a new one per VM.
//!
//! Creating and destroying a network namespace is the dearest part of a
//! jail when many VMs start at once (the kernel serializes both: the
//! namespace's loopback device, its sysctl tables, and the destruction in
//! a work queue). A plugin that has no socket of its own cannot see or use
//! its network namespace at all: the descriptors vmm gives it (the plugin
//! socket, the channels, taps) belong to the namespace they were created
//! in, the host's. So such plugins may share one namespace with nothing in
//! it, created once per boot by the first vmm that needs it and kept by a
//! bind mount at [`NETNS_PATH`] (`/run` is a tmpfs: it is gone at reboot).
//!
//! The isolation argument (also in docs/architecture.md, "Jail: what is
//! shared between VMs"):
//!
//! * The namespace is used only when the plugin's seccomp filter stops
//!   `socket`, `socketpair` and `io_uring_setup` (the built-in policy, or
//!   a minijail policy that does not allow them; never with
//!   `--seccomp-log-failures`, never with a JSON policy, which vmm does not
//!   inspect): then no process in it has ever had a socket of the
//!   namespace, so there is nothing in it to reach — no abstract Unix
//!   socket names, no loopback traffic, no netlink.
//! * It is owned by vmm's own user namespace (checked on every use), in
//!   which a jailed plugin has no capability: it cannot bring `lo` up, add
//!   a device or change a sysctl, so it stays as created (only a down `lo`)
//!   even if a later plugin could make sockets.
//! * The bind mount lives in a directory that must belong to vmm's
//!   effective user and be writable by nobody else (checked on every use):
//!   only that user (root) can replace it.
//!
//! Joining a namespace not owned by the jail's user namespace needs
//! `CAP_SYS_ADMIN` in vmm's (so: root, before the host drops its
//! capabilities). When anything here fails, the jail gets a namespace of
//! its own, as before: the sharing only saves time.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;

use crate::config::{JailConfig, PolicySource};

/// vmm's directory for state kept across VMs (per boot: `/run` is a tmpfs).
pub const RUN_DIR: &str = "/run/vmm";
/// The shared empty network namespace (an nsfs bind mount).
pub const NETNS_PATH: &str = "/run/vmm/empty-net";
const LOCK_PATH: &str = "/run/vmm/empty-net.lock";

/// Errors finding or creating the shared namespace (each is only logged:
/// the jail then gets a namespace of its own).
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{path} is not a directory of this user writable by nobody else")]
    UnsafeDir { path: String },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {what}")]
    Sys {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("{path} is not a network namespace owned by vmm's user namespace")]
    NotOurs { path: String },
    #[error("the thread creating the shared network namespace panicked")]
    Thread,
}

/// System calls whose being allowed gives the plugin a socket of its own
/// network namespace (`io_uring` can create sockets with
/// `IORING_OP_SOCKET`).
pub const SOCKET_CALLS: [i64; 3] = [
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_io_uring_setup,
];

/// Whether a plugin jailed with `config` can never create a socket, so
/// that it may join the shared empty network namespace.
pub fn may_share(config: &JailConfig) -> bool {
    if config.log_failures {
        return false; // violations run
    }
    let text = match &config.policy {
        PolicySource::BuiltIn => super::seccomp::BUILTIN_POLICY.to_string(),
        PolicySource::Minijail(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(_) => return false,
        },
        // A seccompiler JSON filter is not inspected here.
        PolicySource::Json(_) => return false,
    };
    match super::policy::parse(&text) {
        Ok(p) => policy_denies_sockets(&p),
        Err(_) => false,
    }
}

/// True if none of [`SOCKET_CALLS`] can run under `policy` (each absent,
/// hence stopped by the filter, or answered with an errno).
pub fn policy_denies_sockets(policy: &super::policy::Policy) -> bool {
    SOCKET_CALLS.iter().all(|nr| {
        matches!(
            policy.rules.get(nr),
            None | Some(super::policy::Rule::Errno(_))
        )
    })
}

fn io_err(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> NetnsError {
    let path = path.to_string();
    move |source| NetnsError::Io { what, path, source }
}

/// Creates `dir` (mode 0700) if needed and checks that it belongs to the
/// effective user and nobody else can write to it. Not a symbolic link.
pub fn private_dir(dir: &str) -> Result<(), NetnsError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("create", dir)(e)),
    }
    let m = std::fs::symlink_metadata(dir).map_err(io_err("inspect", dir))?;
    if !m.file_type().is_dir()
        || m.uid() != nix::unistd::geteuid().as_raw()
        || m.mode() & 0o022 != 0
    {
        return Err(NetnsError::UnsafeDir {
            path: dir.to_string(),
        });
    }
    Ok(())
}

/// Opens the shared namespace, creating it on first use.
pub fn shared_empty() -> Result<OwnedFd, NetnsError> {
    shared_empty_at(RUN_DIR, NETNS_PATH, LOCK_PATH)
}

fn shared_empty_at(dir: &str, path: &str, lock: &str) -> Result<OwnedFd, NetnsError> {
    private_dir(dir)?;
    if let Ok(fd) = open_checked(path) {
        return Ok(fd);
    }
    // First use (or a mount that went away): create it, one vmm at a time.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(lock)
        .map_err(io_err("open", lock))?;
    let _locked =
        Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, source)| NetnsError::Sys {
            what: "lock the shared network namespace",
            source,
        })?;
    if let Ok(fd) = open_checked(path) {
        return Ok(fd);
    }
    create(path)?;
    open_checked(path)
}

/// Opens `path` and checks that it is a network namespace owned by this
/// process's user namespace.
fn open_checked(path: &str) -> Result<OwnedFd, NetnsError> {
    let fd = nix::fcntl::open(
        Path::new(path),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", path)(e.into()))?;
    let not_ours = || NetnsError::NotOurs {
        path: path.to_string(),
    };
    let fs = nix::sys::statfs::fstatfs(&fd).map_err(|_| not_ours())?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(not_ours());
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the type.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(not_ours());
    }
    // SAFETY: NS_GET_USERNS returns a new descriptor (or -1).
    let owner = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_USERNS as _) };
    if owner < 0 {
        return Err(not_ours());
    }
    // SAFETY: the kernel just returned this new descriptor.
    let owner = unsafe { OwnedFd::from_raw_fd(owner) };
    let owner = nix::sys::stat::fstat(&owner).map_err(|_| not_ours())?;
    let ours = nix::sys::stat::stat("/proc/self/ns/user").map_err(|_| not_ours())?;
    if (owner.st_dev, owner.st_ino) != (ours.st_dev, ours.st_ino) {
        return Err(not_ours());
    }
    Ok(fd)
}

/// Creates a new empty network namespace on a helper thread (the only
/// thread whose namespace changes) and bind-mounts it at `path`.
fn create(path: &str) -> Result<(), NetnsError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("create", path))?;
    let target = CString::new(path).map_err(|_| NetnsError::NotOurs {
        path: path.to_string(),
    })?;
    std::thread::spawn(move || -> Result<(), NetnsError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Sys {
            what: "create the shared network namespace",
            source,
        })?;
        nix::mount::mount(
            Some(c"/proc/thread-self/ns/net"),
            target.as_c_str(),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NetnsError::Sys {
            what: "bind-mount the shared network namespace",
            source,
        })
    })
    .join()
    .map_err(|_| NetnsError::Thread)?
}

/// The calling thread in another network namespace until [`Entered::leave`]
/// (a clone made meanwhile starts in it). Dropping it without `leave`
/// also goes back, ignoring errors.
pub struct Entered {
    home: Option<OwnedFd>,
}

impl Entered {
    /// Moves the calling thread into `ns`.
    pub fn enter(ns: BorrowedFd<'_>) -> Result<Entered, NetnsError> {
        let home = nix::fcntl::open(
            c"/proc/thread-self/ns/net",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| NetnsError::Sys {
            what: "open this thread's network namespace",
            source,
        })?;
        nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Sys {
            what: "join the shared network namespace",
            source,
        })?;
        Ok(Entered { home: Some(home) })
    }

    /// Moves the thread back to where it was.
    pub fn leave(mut self) -> Result<(), NetnsError> {
        self.go_home()
    }

    fn go_home(&mut self) -> Result<(), NetnsError> {
        match self.home.take() {
            Some(home) => {
                nix::sched::setns(home.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetnsError::Sys {
                        what: "return to vmm's network namespace",
                        source,
                    }
                })
            }
            None => Ok(()),
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = self.go_home() {
            log::error!("{}", crate::error_chain(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::policy;

    #[test]
    fn builtin_policy_gives_no_socket() {
        let p = policy::parse(crate::jail::seccomp::BUILTIN_POLICY).unwrap();
        assert!(policy_denies_sockets(&p));
    }

    #[test]
    fn policies_that_allow_a_socket_are_recognised() {
        for (text, denies) in [
            ("read: 1\n", true),
            ("socket: return 1\nsocketpair: return 13\n", true),
            ("socket: 1\n", false),
            ("socket: arg0 == 1\n", false),
            ("socketpair: 1\n", false),
            ("io_uring_setup: 1\n", false),
        ] {
            let p = policy::parse(text).unwrap();
            assert_eq!(policy_denies_sockets(&p), denies, "{text}");
        }
    }

    fn config(policy: PolicySource, log_failures: bool) -> JailConfig {
        JailConfig {
            root: None,
            mounts: Vec::new(),
            gid_maps: Vec::new(),
            policy,
            log_failures,
        }
    }

    #[test]
    fn sharing_needs_a_known_socketless_policy_without_log_mode() {
        assert!(may_share(&config(PolicySource::BuiltIn, false)));
        assert!(!may_share(&config(PolicySource::BuiltIn, true)));
        assert!(!may_share(&config(
            PolicySource::Json("/nonexistent.json".into()),
            false
        )));
        assert!(!may_share(&config(
            PolicySource::Minijail("/nonexistent.policy".into()),
            false
        )));
    }

    #[test]
    fn unsafe_directories_are_refused() {
        let dir = std::env::temp_dir().join(format!("vmm-netns-test-{}", std::process::id()));
        let d = dir.to_str().unwrap().to_string();
        private_dir(&d).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        assert!(matches!(private_dir(&d), Err(NetnsError::UnsafeDir { .. })));
        // A plain file where the namespace should be is not taken for one.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let f = dir.join("ns");
        std::fs::write(&f, b"").unwrap();
        assert!(matches!(
            open_checked(f.to_str().unwrap()),
            Err(NetnsError::NotOurs { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
