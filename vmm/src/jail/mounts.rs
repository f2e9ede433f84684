//! The jail's file system: a plan of mount operations built by the host
//! (where allocation and error formatting are fine) and carried out by the
//! jail's init process, which only makes system calls.
//!
//! Layout: a 64 MiB tmpfs (nosuid, nodev, noexec) on the root directory R,
//! read-only `/proc`, `/dev/{full,null,urandom,zero}`, the plugin binary, its
//! dynamic loader, its shared libraries and `/etc/ld.so.cache` bound
//! read-only at their host paths, then every `--plugin-mount`. Then
//! `pivot_root` into R.
//!
//! Every mount point is created in the tmpfs *before* the first bind mount,
//! so nothing is ever created through a bind mount in a host directory.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::sys::statvfs::{statvfs, FsFlags};

use crate::config::BindMount;

/// Size of the jail's root tmpfs.
pub const ROOT_TMPFS_SIZE: u64 = 64 << 20;

/// Device nodes every plugin gets (writable: docs/host-behaviour.md §5.2).
pub const DEVICES: &[&str] = &["/dev/full", "/dev/null", "/dev/urandom", "/dev/zero"];

/// Errors planning the mounts (host side).
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("the jail root {0} must be an absolute path")]
    RootNotAbsolute(PathBuf),
    #[error("the jail root {path} is not a usable directory")]
    RootNotDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount destination {0} must be an absolute path without `..`")]
    BadDestination(PathBuf),
    #[error("cannot inspect the mount source {path}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the mount flags of {path}")]
    SourceFlags {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("path {0} contains a NUL byte")]
    Nul(PathBuf),
}

/// One bind mount into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub src: PathBuf,
    /// Path inside the jail.
    pub dst: PathBuf,
    pub writable: bool,
    /// Device nodes stay usable (no `nodev`).
    pub devices: bool,
    pub dir: bool,
}

/// One step of the plan, ready for the child (paths already prefixed by R).
#[derive(Debug)]
pub enum Op {
    /// Make every mount private so nothing propagates back to the host.
    MakePrivate,
    /// The tmpfs on R.
    Tmpfs {
        target: CString,
        data: CString,
    },
    Mkdir {
        path: CString,
    },
    /// Empty file as the mount point of a file bind mount.
    Touch {
        path: CString,
    },
    /// `/proc`, writable until `ProcReadOnly`.
    Proc {
        target: CString,
    },
    /// Best effort: this PID namespace's `kernel.pid_max` (Linux ≥ 6.14).
    PidMax {
        path: CString,
        value: CString,
    },
    ProcReadOnly {
        target: CString,
    },
    /// Bind then remount with `flags` (which include the source's locked
    /// flags, as a user namespace requires).
    Bind {
        src: CString,
        dst: CString,
        recursive: bool,
        flags: MsFlags,
    },
    /// `pivot_root` into R and drop the old root.
    PivotRoot {
        root: CString,
    },
}

/// All the steps, and for each a description for error messages.
#[derive(Debug)]
pub struct MountPlan {
    pub ops: Vec<Op>,
    pub descriptions: Vec<String>,
}

fn cstr(p: &Path) -> Result<CString, MountError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| MountError::Nul(p.to_path_buf()))
}

/// `dst` inside `root`; `dst` must be absolute without `..`.
fn inside(root: &Path, dst: &Path) -> Result<PathBuf, MountError> {
    if !dst.is_absolute() || dst.components().any(|c| c == Component::ParentDir) {
        return Err(MountError::BadDestination(dst.to_path_buf()));
    }
    Ok(root.join(dst.strip_prefix("/").unwrap_or(dst)))
}

/// Checks the jail root (absolute, an existing directory).
pub fn check_root(root: &Path) -> Result<(), MountError> {
    if !root.is_absolute() {
        return Err(MountError::RootNotAbsolute(root.to_path_buf()));
    }
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(MountError::RootNotDirectory {
            path: root.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        }),
        Err(source) => Err(MountError::RootNotDirectory {
            path: root.to_path_buf(),
            source,
        }),
    }
}

/// The binds every plugin gets plus the user's, in mount order: devices,
/// then `files` (binary, loader, libraries; read-only, deduplicated), then
/// the user's `--plugin-mount`s in order.
pub fn binds(files: &[PathBuf], user: &[BindMount]) -> Result<Vec<Bind>, MountError> {
    let mut out = Vec::new();
    for d in DEVICES {
        out.push(Bind {
            src: PathBuf::from(d),
            dst: PathBuf::from(d),
            writable: true,
            devices: true,
            dir: false,
        });
    }
    let mut seen = BTreeSet::new();
    for f in files {
        if !seen.insert(f.clone()) {
            continue;
        }
        out.push(Bind {
            src: f.clone(),
            dst: f.clone(),
            writable: false,
            devices: false,
            dir: false,
        });
    }
    for m in user {
        let meta = std::fs::metadata(&m.src).map_err(|source| MountError::Source {
            path: m.src.clone(),
            source,
        })?;
        out.push(Bind {
            src: m.src.clone(),
            dst: m.dst.clone(),
            writable: m.writable,
            devices: true,
            dir: meta.is_dir(),
        });
    }
    Ok(out)
}

/// Flags a remount must keep because the source mount has them (a user
/// namespace may not clear them).
fn locked_flags(src: &Path) -> Result<MsFlags, MountError> {
    let st = statvfs(src).map_err(|source| MountError::SourceFlags {
        path: src.to_path_buf(),
        source,
    })?;
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) {
            out |= ms;
        }
    }
    Ok(out)
}

impl MountPlan {
    /// Plans the jail rooted at `root` with `binds` (see [`binds`]).
    pub fn new(root: &Path, binds: &[Bind], pid_max: u32) -> Result<MountPlan, MountError> {
        let mut plan = MountPlan {
            ops: Vec::new(),
            descriptions: Vec::new(),
        };
        let root_c = cstr(root)?;
        plan.push(Op::MakePrivate, "make the jail's mounts private".into());
        plan.push(
            Op::Tmpfs {
                target: root_c.clone(),
                data: CString::new(format!("size={ROOT_TMPFS_SIZE},mode=0755"))
                    .map_err(|_| MountError::Nul(root.to_path_buf()))?,
            },
            format!("mount the jail's tmpfs on {}", root.display()),
        );

        // Mount points first: directories (parents before children), then
        // empty files.
        let mut dirs: Vec<PathBuf> = vec![PathBuf::from("/proc")];
        let mut files: Vec<PathBuf> = Vec::new();
        for b in binds {
            inside(root, &b.dst)?;
            let mut parent = b.dst.parent();
            while let Some(p) = parent {
                if p != Path::new("/") {
                    dirs.push(p.to_path_buf());
                }
                parent = p.parent();
            }
            if b.dir {
                dirs.push(b.dst.clone());
            } else {
                files.push(b.dst.clone());
            }
        }
        // Sorting puts every parent before its children.
        let dirs: BTreeSet<PathBuf> = dirs.into_iter().collect();
        for d in &dirs {
            plan.push(
                Op::Mkdir {
                    path: cstr(&inside(root, d)?)?,
                },
                format!("create the directory {} in the jail", d.display()),
            );
        }
        let files: BTreeSet<PathBuf> = files.into_iter().filter(|f| !dirs.contains(f)).collect();
        for f in &files {
            plan.push(
                Op::Touch {
                    path: cstr(&inside(root, f)?)?,
                },
                format!("create the mount point {} in the jail", f.display()),
            );
        }

        let proc_c = cstr(&root.join("proc"))?;
        plan.push(
            Op::Proc {
                target: proc_c.clone(),
            },
            "mount /proc in the jail".into(),
        );
        plan.push(
            Op::PidMax {
                path: cstr(&root.join("proc/sys/kernel/pid_max"))?,
                value: CString::new(pid_max.to_string())
                    .map_err(|_| MountError::Nul(root.to_path_buf()))?,
            },
            "limit the jail's pid_max".into(),
        );
        plan.push(
            Op::ProcReadOnly { target: proc_c },
            "make /proc read-only in the jail".into(),
        );

        for b in binds {
            let mut flags = locked_flags(&b.src)? | MsFlags::MS_NOSUID;
            if !b.writable {
                flags |= MsFlags::MS_RDONLY;
            }
            if !b.devices {
                flags |= MsFlags::MS_NODEV;
            }
            plan.push(
                Op::Bind {
                    src: cstr(&b.src)?,
                    dst: cstr(&inside(root, &b.dst)?)?,
                    recursive: b.dir,
                    flags,
                },
                format!(
                    "bind {} to {} ({}) in the jail",
                    b.src.display(),
                    b.dst.display(),
                    if b.writable { "writable" } else { "read-only" }
                ),
            );
        }
        plan.push(
            Op::PivotRoot { root: root_c },
            format!("pivot_root into {}", root.display()),
        );
        Ok(plan)
    }

    fn push(&mut self, op: Op, description: String) {
        self.ops.push(op);
        self.descriptions.push(description);
    }

    /// Carries out step `i` (in the jail's init process: no allocation).
    pub fn execute(&self, i: usize) -> Result<(), Errno> {
        let none: Option<&'static CStr> = None;
        match &self.ops[i] {
            Op::MakePrivate => nix::mount::mount(
                none,
                c"/",
                none,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                none,
            ),
            Op::Tmpfs { target, data } => nix::mount::mount(
                Some(c"tmpfs"),
                target.as_c_str(),
                Some(c"tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(data.as_c_str()),
            ),
            Op::Mkdir { path } => {
                match nix::unistd::mkdir(path.as_c_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Op::Touch { path } => nix::fcntl::open(
                path.as_c_str(),
                nix::fcntl::OFlag::O_CREAT
                    | nix::fcntl::OFlag::O_WRONLY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .map(drop),
            Op::Proc { target } => nix::mount::mount(
                Some(c"proc"),
                target.as_c_str(),
                Some(c"proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                none,
            ),
            Op::PidMax { path, value } => {
                // Only kernels with per-namespace pid_max have it writable.
                if let Ok(fd) = nix::fcntl::open(
                    path.as_c_str(),
                    nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    let _ = nix::unistd::write(&fd, value.as_bytes());
                }
                Ok(())
            }
            Op::ProcReadOnly { target } => nix::mount::mount(
                none,
                target.as_c_str(),
                none,
                MsFlags::MS_REMOUNT
                    | MsFlags::MS_BIND
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                none,
            ),
            Op::Bind {
                src,
                dst,
                recursive,
                flags,
            } => {
                let mut bind = MsFlags::MS_BIND;
                if *recursive {
                    bind |= MsFlags::MS_REC;
                }
                nix::mount::mount(Some(src.as_c_str()), dst.as_c_str(), none, bind, none)?;
                nix::mount::mount(
                    none,
                    dst.as_c_str(),
                    none,
                    MsFlags::MS_REMOUNT | MsFlags::MS_BIND | *flags,
                    none,
                )
            }
            Op::PivotRoot { root } => {
                nix::unistd::chdir(root.as_c_str())?;
                nix::unistd::pivot_root(c".", c".")?;
                nix::mount::umount2(c".", MntFlags::MNT_DETACH)?;
                nix::unistd::chdir(c"/")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(src: &str, dst: &str, writable: bool) -> BindMount {
        BindMount {
            src: PathBuf::from(src),
            dst: PathBuf::from(dst),
            writable,
        }
    }

    fn describe(plan: &MountPlan) -> Vec<String> {
        plan.ops
            .iter()
            .map(|op| match op {
                Op::MakePrivate => "private".into(),
                Op::Tmpfs { target, .. } => format!("tmpfs {}", target.to_str().unwrap()),
                Op::Mkdir { path } => format!("mkdir {}", path.to_str().unwrap()),
                Op::Touch { path } => format!("touch {}", path.to_str().unwrap()),
                Op::Proc { .. } => "proc".into(),
                Op::PidMax { .. } => "pid_max".into(),
                Op::ProcReadOnly { .. } => "proc ro".into(),
                Op::Bind {
                    src,
                    dst,
                    recursive,
                    flags,
                } => format!(
                    "bind {} {}{}{}{}",
                    src.to_str().unwrap(),
                    dst.to_str().unwrap(),
                    if *recursive { " rec" } else { "" },
                    if flags.contains(MsFlags::MS_RDONLY) {
                        " ro"
                    } else {
                        " rw"
                    },
                    if flags.contains(MsFlags::MS_NODEV) {
                        " nodev"
                    } else {
                        ""
                    },
                ),
                Op::PivotRoot { root } => format!("pivot {}", root.to_str().unwrap()),
            })
            .collect()
    }

    #[test]
    fn plan_order_and_mount_points() {
        let tmp = std::env::temp_dir();
        let tmp_s = tmp.to_str().unwrap().trim_end_matches('/').to_string();
        let files = [
            PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            PathBuf::from("/bin/true"),
            PathBuf::from("/bin/true"),
        ];
        let b = binds(
            &files,
            &[
                user("/dev/null", "/data/null", false),
                user(&tmp_s, "/scratch", true),
            ],
        )
        .unwrap();
        // Devices, deduplicated files, then the user's mounts.
        assert_eq!(b.len(), 4 + 2 + 2);
        let plan = MountPlan::new(Path::new("/R"), &b, 1024).unwrap();
        assert_eq!(plan.ops.len(), plan.descriptions.len());
        let d = describe(&plan);
        let expected_head = [
            "private",
            "tmpfs /R",
            "mkdir /R/bin",
            "mkdir /R/data",
            "mkdir /R/dev",
            "mkdir /R/lib64",
            "mkdir /R/proc",
            "mkdir /R/scratch",
            "touch /R/bin/true",
            "touch /R/data/null",
            "touch /R/dev/full",
            "touch /R/dev/null",
            "touch /R/dev/urandom",
            "touch /R/dev/zero",
            "touch /R/lib64/ld-linux-x86-64.so.2",
            "proc",
            "pid_max",
            "proc ro",
        ];
        assert_eq!(&d[..expected_head.len()], &expected_head);
        let rest = &d[expected_head.len()..];
        assert_eq!(rest[0], "bind /dev/full /R/dev/full rw");
        assert_eq!(rest[1], "bind /dev/null /R/dev/null rw");
        assert_eq!(
            rest[4],
            "bind /lib64/ld-linux-x86-64.so.2 /R/lib64/ld-linux-x86-64.so.2 ro nodev"
        );
        assert_eq!(rest[5], "bind /bin/true /R/bin/true ro nodev");
        assert_eq!(rest[6], "bind /dev/null /R/data/null ro");
        assert_eq!(rest[7], format!("bind {tmp_s} /R/scratch rec rw"));
        assert_eq!(rest[8], "pivot /R");
        assert_eq!(rest.len(), 9);
    }

    #[test]
    fn nested_destinations_get_all_parents() {
        let b = binds(&[], &[user("/dev/zero", "/a/b/c/zero", true)]).unwrap();
        let plan = MountPlan::new(Path::new("/R"), &b, 1024).unwrap();
        let d = describe(&plan);
        let a = d.iter().position(|s| s == "mkdir /R/a").unwrap();
        let ab = d.iter().position(|s| s == "mkdir /R/a/b").unwrap();
        let abc = d.iter().position(|s| s == "mkdir /R/a/b/c").unwrap();
        let t = d.iter().position(|s| s == "touch /R/a/b/c/zero").unwrap();
        let bind = d
            .iter()
            .position(|s| s.starts_with("bind /dev/zero /R/a/b/c/zero"))
            .unwrap();
        assert!(a < ab && ab < abc && abc < t && t < bind);
    }

    #[test]
    fn bad_destinations_and_roots() {
        let b = binds(&[], &[user("/dev/zero", "/a/../../etc/x", true)]).unwrap();
        assert!(matches!(
            MountPlan::new(Path::new("/R"), &b, 1024),
            Err(MountError::BadDestination(_))
        ));
        assert!(matches!(
            check_root(Path::new("relative")),
            Err(MountError::RootNotAbsolute(_))
        ));
        assert!(check_root(Path::new("/dev/null")).is_err());
        assert!(check_root(Path::new("/no/such/dir")).is_err());
        assert!(check_root(&std::env::temp_dir()).is_ok());
    }
}
