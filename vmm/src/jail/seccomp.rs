//! The plugin's seccomp filter: compiled with seccompiler from the built-in
//! policy, a minijail `.policy` file or a seccompiler JSON file, then
//! completed by vmm:
//!
//! * a short prologue decides `execve`/`execveat` (always reported to the
//!   host, which lets exactly one `execve` through: the one that starts the
//!   plugin), the `return ERRNO` lines of minijail policies, and the
//!   `sendmsg` on the jail's control socket that hands the listener over;
//! * every "kill" the policy returns becomes `SECCOMP_RET_USER_NOTIF`: the
//!   offending thread blocks, the host reads the system call from the
//!   listener descriptor, names it, and kills the plugin (or, with
//!   `--seccomp-log-failures`, logs it and lets it run).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::policy::{self, Cond, Op, Policy, Rule};
use super::syscalls;
use crate::config::PolicySource;

/// The built-in policy (minijail syntax).
pub const BUILTIN_POLICY: &str = include_str!("plugin.policy");

/// Errors building the filter or talking to the listener.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot read the seccomp policy {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad seccomp policy {path}")]
    Policy {
        path: PathBuf,
        #[source]
        source: policy::PolicyError,
    },
    #[error("cannot compile the seccomp policy {path}")]
    Compile {
        path: PathBuf,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot compile the seccomp policy {path}")]
    Backend {
        path: PathBuf,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error(
        "the seccomp policy {path} defines {count} filters and none is named `plugin`; \
         name the plugin's filter `plugin`"
    )]
    WhichFilter { path: PathBuf, count: usize },
    #[error("the seccomp filter is too long ({0} instructions; the kernel takes 4096)")]
    TooLong(usize),
    #[error("the seccomp policy has too many `return ERRNO` lines ({0}; at most 100)")]
    TooManyErrnos(usize),
    #[error("cannot {what} on the seccomp listener")]
    Listener {
        what: &'static str,
        #[source]
        source: Errno,
    },
}

pub(crate) const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const SECCOMP_DATA_ARG0: u32 = 16;
/// Low 32 bits of the third argument (little endian).
const SECCOMP_DATA_ARG2: u32 = 16 + 2 * 8;
const JSET: u32 = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;

/// System calls whose PROT_EXEC form vmm decides, and how.
const EXEC_GATES: &[(i64, u32)] = &[
    (libc::SYS_mmap, libc::SECCOMP_RET_USER_NOTIF),
    (
        libc::SYS_mprotect,
        libc::SECCOMP_RET_ERRNO | libc::EACCES as u32,
    ),
    (
        libc::SYS_pkey_mprotect,
        libc::SECCOMP_RET_ERRNO | libc::EACCES as u32,
    ),
];
/// Instructions of the clone gate in [`finish`].
const CLONE_GATE_LEN: usize = 6;
const BPF_MAXINSNS: usize = 4096;

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

const LD_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const RET: u32 = libc::BPF_RET | libc::BPF_K;

/// Compiles the policy into the program the plugin's process installs.
/// `ctl_fd` is the jail's control socket (the one `sendmsg` allowed before
/// the policy applies).
pub fn build(source: &PolicySource, ctl_fd: RawFd) -> Result<BpfProgram, SeccompError> {
    let path = source.display();
    let (program, errnos) = match source {
        PolicySource::BuiltIn => compile_policy(&path, BUILTIN_POLICY)?,
        PolicySource::Minijail(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| SeccompError::Read {
                path: p.clone(),
                source,
            })?;
            compile_policy(&path, &text)?
        }
        PolicySource::Json(p) => (compile_json(p)?, BTreeMap::new()),
    };
    finish(program, &errnos, ctl_fd)
}

/// Minijail text → seccompiler program (kill on mismatch) + errno lines.
fn compile_policy(
    path: &Path,
    text: &str,
) -> Result<(BpfProgram, BTreeMap<i64, u32>), SeccompError> {
    let parsed: Policy = policy::parse(text).map_err(|source| SeccompError::Policy {
        path: path.to_path_buf(),
        source,
    })?;
    let backend = |source| SeccompError::Backend {
        path: path.to_path_buf(),
        source,
    };
    let mut rules = BTreeMap::new();
    let mut errnos = BTreeMap::new();
    for (nr, rule) in with_modern_aliases(parsed.rules) {
        if nr == libc::SYS_execve || nr == libc::SYS_execveat {
            continue; // decided by the prologue
        }
        match rule {
            Rule::Always => {
                rules.insert(nr, Vec::new());
            }
            Rule::Errno(e) => {
                errnos.insert(nr, e);
            }
            Rule::When(alternatives) => {
                let mut out = Vec::with_capacity(alternatives.len());
                for conj in alternatives {
                    let conds = conj
                        .iter()
                        .map(condition)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(backend)?;
                    out.push(SeccompRule::new(conds).map_err(backend)?);
                }
                rules.insert(nr, out);
            }
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(backend)?;
    let program: BpfProgram = filter.try_into().map_err(backend)?;
    Ok((program, errnos))
}

/// Policies of the crosvm era name `stat`, `lstat` and `fstat`; since 2.33
/// glibc makes all three with `newfstatat` (fstat as `newfstatat(fd, "",
/// buf, AT_EMPTY_PATH)`). A policy that allows the old call allows its
/// modern spelling, unless it says something about `newfstatat` itself.
pub fn with_modern_aliases(mut rules: BTreeMap<i64, Rule>) -> BTreeMap<i64, Rule> {
    if rules.contains_key(&libc::SYS_newfstatat) {
        return rules;
    }
    let allowed = |nr: i64| matches!(rules.get(&nr), Some(Rule::Always));
    if allowed(libc::SYS_stat) || allowed(libc::SYS_lstat) {
        rules.insert(libc::SYS_newfstatat, Rule::Always);
    } else if allowed(libc::SYS_fstat) {
        let empty_path = libc::AT_EMPTY_PATH as u64;
        rules.insert(
            libc::SYS_newfstatat,
            Rule::When(vec![vec![Cond {
                arg: 3,
                op: Op::MaskedEq(empty_path),
                value: empty_path,
            }]]),
        );
    }
    rules
}

fn condition(c: &Cond) -> Result<SeccompCondition, seccompiler::BackendError> {
    let op = match c.op {
        Op::Eq => SeccompCmpOp::Eq,
        Op::Ne => SeccompCmpOp::Ne,
        Op::Lt => SeccompCmpOp::Lt,
        Op::Le => SeccompCmpOp::Le,
        Op::Gt => SeccompCmpOp::Gt,
        Op::Ge => SeccompCmpOp::Ge,
        Op::MaskedEq(m) => SeccompCmpOp::MaskedEq(m),
    };
    SeccompCondition::new(c.arg, SeccompCmpArgLen::Qword, op, c.value)
}

/// seccompiler JSON → program: the filter named `plugin`, or the only one.
fn compile_json(path: &Path) -> Result<BpfProgram, SeccompError> {
    let file = std::fs::File::open(path).map_err(|source| SeccompError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut map = seccompiler::compile_from_json(std::io::BufReader::new(file), TargetArch::x86_64)
        .map_err(|source| SeccompError::Compile {
            path: path.to_path_buf(),
            source,
        })?;
    if let Some(p) = map.remove("plugin") {
        return Ok(p);
    }
    let count = map.len();
    match map.into_values().next() {
        Some(p) if count == 1 => Ok(p),
        _ => Err(SeccompError::WhichFilter {
            path: path.to_path_buf(),
            count,
        }),
    }
}

/// Prepends vmm's prologue and turns the policy's kills into notifications.
fn finish(
    mut program: BpfProgram,
    errnos: &BTreeMap<i64, u32>,
    ctl_fd: RawFd,
) -> Result<BpfProgram, SeccompError> {
    for insn in &mut program {
        let action = insn.k & libc::SECCOMP_RET_ACTION_FULL;
        if u32::from(insn.code) == RET
            && (action == libc::SECCOMP_RET_KILL_PROCESS || action == libc::SECCOMP_RET_KILL_THREAD)
        {
            insn.k = libc::SECCOMP_RET_USER_NOTIF;
        }
    }
    let mut decided: Vec<(i64, u32)> = vec![
        (libc::SYS_execve, libc::SECCOMP_RET_USER_NOTIF),
        (libc::SYS_execveat, libc::SECCOMP_RET_USER_NOTIF),
        // clone3's flags are in memory, out of the filter's reach, so it can
        // never be allowed (glibc falls back to clone): see the clone gate.
        (
            libc::SYS_clone3,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
    ];
    decided.extend(
        errnos
            .iter()
            .map(|(&nr, &e)| (nr, libc::SECCOMP_RET_ERRNO | (e & libc::SECCOMP_RET_DATA))),
    );
    if decided.len() > 100 {
        return Err(SeccompError::TooManyErrnos(decided.len() - 3));
    }
    // Instructions after the arch check, up to the policy's own program.
    let after_arch = 1 + 2 * decided.len() + 5 * EXEC_GATES.len() + CLONE_GATE_LEN + 4;
    let mut out = Vec::with_capacity(program.len() + after_arch + 2);
    out.push(stmt(LD_ABS, SECCOMP_DATA_ARCH));
    // Another architecture: straight to the policy, whose own check kills.
    out.push(jump(JEQ, AUDIT_ARCH_X86_64, 0, after_arch as u8));
    out.push(stmt(LD_ABS, SECCOMP_DATA_NR));
    for (nr, ret) in &decided {
        out.push(jump(JEQ, *nr as u32, 0, 1));
        out.push(stmt(RET, *ret));
    }
    // Executable memory, before any policy can allow it: `mmap` with
    // PROT_EXEC goes to vmm (which lets only the loader's private mappings
    // of read-only files through, never a memfd), `mprotect` and
    // `pkey_mprotect` with PROT_EXEC fail. Each gate: not this call → skip
    // to the reload of the number; PROT_EXEC (low word of arg2) → return.
    for (nr, ret) in EXEC_GATES {
        out.push(jump(JEQ, *nr as u32, 0, 3));
        out.push(stmt(LD_ABS, SECCOMP_DATA_ARG2));
        out.push(jump(JSET, libc::PROT_EXEC as u32, 0, 1));
        out.push(stmt(RET, *ret));
        out.push(stmt(LD_ABS, SECCOMP_DATA_NR));
    }
    // A process that shares the descriptor table without being a thread
    // (clone with CLONE_FILES but not CLONE_THREAD) could swap a descriptor
    // while vmm inspects an executable mmap, which it checks only while the
    // caller has one thread: refused whatever the policy says.
    out.push(jump(JEQ, libc::SYS_clone as u32, 0, 4));
    out.push(stmt(LD_ABS, SECCOMP_DATA_ARG0));
    out.push(jump(JSET, libc::CLONE_THREAD as u32, 2, 0));
    out.push(jump(JSET, libc::CLONE_FILES as u32, 0, 1));
    out.push(stmt(RET, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
    out.push(stmt(LD_ABS, SECCOMP_DATA_NR));
    // sendmsg on the control socket: the listener hand-over, made after the
    // filter is installed and before the plugin runs.
    out.push(jump(JEQ, libc::SYS_sendmsg as u32, 0, 3));
    out.push(stmt(LD_ABS, SECCOMP_DATA_ARG0));
    out.push(jump(JEQ, ctl_fd as u32, 0, 1));
    out.push(stmt(RET, libc::SECCOMP_RET_ALLOW));
    out.extend(program);
    if out.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLong(out.len()));
    }
    Ok(out)
}

/// One system call stopped by the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub id: u64,
    /// Thread id in the host's PID namespace.
    pub pid: u32,
    pub nr: i32,
    pub arch: u32,
    pub args: [u64; 6],
}

impl Notification {
    /// "`name` (system call N) with arguments (…)".
    pub fn describe(&self) -> String {
        let nr = self.nr;
        let call = match (self.arch, syscalls::name(nr.into())) {
            (AUDIT_ARCH_X86_64, Some(name)) => format!("`{name}` (system call {nr})"),
            (AUDIT_ARCH_X86_64, None) => format!("an unknown system call (number {nr:#x})"),
            (AUDIT_ARCH_I386, _) => format!("a 32-bit (i386) system call, number {nr}"),
            (arch, _) => format!("a system call of architecture {arch:#x}, number {nr}"),
        };
        let args: Vec<String> = self.args.iter().map(|a| format!("{a:#x}")).collect();
        format!("{call} with arguments ({})", args.join(", "))
    }
}

/// The host's end of the plugin's filter.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    /// Buffer size the kernel wants for `struct seccomp_notif`.
    notif_size: usize,
}

impl Listener {
    pub fn new(fd: OwnedFd) -> Listener {
        let mut sizes = libc::seccomp_notif_sizes {
            seccomp_notif: 0,
            seccomp_notif_resp: 0,
            seccomp_data: 0,
        };
        // SAFETY: SECCOMP_GET_NOTIF_SIZES writes one seccomp_notif_sizes into
        // the valid, exclusively borrowed struct.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_GET_NOTIF_SIZES,
                0,
                &mut sizes as *mut libc::seccomp_notif_sizes,
            )
        };
        let ours = std::mem::size_of::<libc::seccomp_notif>();
        let notif_size = if rc == 0 {
            ours.max(usize::from(sizes.seccomp_notif))
        } else {
            ours
        };
        Listener { fd, notif_size }
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads one pending notification (blocks if there is none).
    pub fn recv(&self) -> Result<Notification, SeccompError> {
        // u64 elements keep the buffer aligned for seccomp_notif.
        let mut buf = vec![0u64; self.notif_size.div_ceil(8)];
        loop {
            // SAFETY: the buffer is zeroed (as the kernel requires), at least
            // as large as the kernel's struct seccomp_notif, and aligned.
            let rc = unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    libc::SECCOMP_IOCTL_NOTIF_RECV,
                    buf.as_mut_ptr(),
                )
            };
            if rc == 0 {
                break;
            }
            match Errno::last() {
                Errno::EINTR => buf.fill(0),
                e => {
                    return Err(SeccompError::Listener {
                        what: "receive a notification",
                        source: e,
                    })
                }
            }
        }
        // SAFETY: the kernel filled a seccomp_notif at the start of the
        // aligned buffer, which is at least that large.
        let n: libc::seccomp_notif =
            unsafe { std::ptr::read(buf.as_ptr() as *const libc::seccomp_notif) };
        Ok(Notification {
            id: n.id,
            pid: n.pid,
            nr: n.data.nr,
            arch: n.data.arch,
            args: n.data.args,
        })
    }

    /// Whether the stopped call is still waiting (its thread did not die,
    /// so facts read about it from /proc are about the same process).
    pub fn id_valid(&self, id: u64) -> bool {
        let mut id = id;
        // SAFETY: SECCOMP_IOCTL_NOTIF_ID_VALID reads one u64.
        unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
                &mut id as *mut u64,
            ) == 0
        }
    }

    /// Lets the stopped system call run.
    pub fn allow(&self, id: u64) -> Result<(), SeccompError> {
        self.respond(id, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32, 0)
    }

    /// Fails the stopped system call with `errno`.
    pub fn fail(&self, id: u64, errno: i32) -> Result<(), SeccompError> {
        self.respond(id, 0, -errno)
    }

    fn respond(&self, id: u64, flags: u32, error: i32) -> Result<(), SeccompError> {
        let mut resp = libc::seccomp_notif_resp {
            id,
            val: 0,
            error,
            flags,
        };
        // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one seccomp_notif_resp from
        // the valid struct.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &mut resp as *mut libc::seccomp_notif_resp,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(SeccompError::Listener {
                what: "answer a notification",
                source: Errno::last(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_compiles_with_prologue() {
        let p = build(&PolicySource::BuiltIn, 7).unwrap();
        assert!(p.len() < BPF_MAXINSNS);
        assert_eq!(u32::from(p[0].code), LD_ABS);
        assert_eq!(p[0].k, SECCOMP_DATA_ARCH);
        // execve and execveat are reported; clone3 gets ENOSYS.
        let rets: Vec<u32> = p
            .iter()
            .filter(|i| u32::from(i.code) == RET)
            .map(|i| i.k)
            .collect();
        assert!(rets.contains(&(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32)));
        assert!(rets.contains(&libc::SECCOMP_RET_USER_NOTIF));
        // No kill is left: every violation is reported to the host.
        assert!(!rets
            .iter()
            .any(|k| k & libc::SECCOMP_RET_ACTION_FULL == libc::SECCOMP_RET_KILL_PROCESS));
        // The arch jump lands on the policy's first instruction.
        let policy_start = 2 + p[1].jf as usize;
        assert_eq!(u32::from(p[policy_start].code), LD_ABS);
        assert_eq!(p[policy_start].k, SECCOMP_DATA_ARCH);
        assert_eq!(u32::from(p[policy_start - 1].code), RET);
        assert_eq!(p[policy_start - 1].k, libc::SECCOMP_RET_ALLOW);
        assert_eq!(p[policy_start - 2].k, 7);
    }

    #[test]
    fn json_picks_the_plugin_filter() {
        let dir = std::env::temp_dir().join(format!("vmm-seccomp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.json");
        std::fs::write(
            &f,
            r#"{"plugin": {"mismatch_action": "allow", "match_action": "kill_process",
                "filter": [{"syscall": "socket"}]},
               "other": {"mismatch_action": "allow", "match_action": "trap", "filter": []}}"#,
        )
        .unwrap();
        let p = build(&PolicySource::Json(f.clone()), 3).unwrap();
        assert!(p
            .iter()
            .any(|i| u32::from(i.code) == RET && i.k == libc::SECCOMP_RET_USER_NOTIF));
        std::fs::write(
            &f,
            r#"{"a": {"mismatch_action": "allow", "match_action": "trap", "filter": []},
               "b": {"mismatch_action": "allow", "match_action": "trap", "filter": []}}"#,
        )
        .unwrap();
        let e = build(&PolicySource::Json(f.clone()), 3).unwrap_err();
        assert!(e.to_string().contains("none is named `plugin`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn policy_errors_name_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("vmm-seccomp-test2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("plugin.policy");
        std::fs::write(&f, "read: 1\nwrite: arg0 ==\n").unwrap();
        assert_eq!(
            PolicySource::from_options(None, Some(&dir)),
            PolicySource::Minijail(f.clone())
        );
        let e = build(&PolicySource::Minijail(f), 3).unwrap_err();
        let chain = crate::error_chain(&e);
        assert!(
            chain.contains("plugin.policy") && chain.contains("line 2"),
            "{chain}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            PolicySource::from_options(None, Some(&dir)),
            PolicySource::BuiltIn
        );
    }

    #[test]
    fn notification_names_the_call() {
        let n = Notification {
            id: 1,
            pid: 2,
            nr: libc::SYS_socket as i32,
            arch: AUDIT_ARCH_X86_64,
            args: [2, 1, 0, 0, 0, 0],
        };
        assert!(n
            .describe()
            .starts_with("`socket` (system call 41) with arguments (0x2, 0x1"));
        let i386 = Notification {
            arch: AUDIT_ARCH_I386,
            nr: 20,
            ..n.clone()
        };
        assert!(i386
            .describe()
            .starts_with("a 32-bit (i386) system call, number 20 with"));
        let unknown = Notification {
            nr: 0x4000_0001,
            ..n
        };
        assert!(unknown
            .describe()
            .starts_with("an unknown system call (number 0x40000001)"));
    }
}
