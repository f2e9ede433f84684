//! Parser for seccomp policies in minijail's text syntax (crosvm's
//! `plugin.policy` files), producing the rules `seccomp.rs` compiles.
//!
//! Supported forms, one per line (`#` starts a comment):
//!
//! ```text
//! read: 1                                    # always allowed
//! clone3: return ENOSYS                      # answered with an errno, not run
//! clone: arg0 & CLONE_THREAD                 # any of the mask's bits set
//! mmap: arg2 in ~PROT_EXEC || arg2 in ~PROT_WRITE   # only bits of the mask set
//! prctl: arg0 == PR_SET_NAME
//! prlimit64: arg2 == 0 && arg3 != 0
//! @frequency ./plugin.frequency               # ignored
//! ```
//!
//! Operators: `==`, `!=`, `<`, `<=`, `>`, `>=` (unsigned, 64-bit), `&`
//! (`argN & M`: at least one bit of M is set) and `in` (`argN in M`: no bit
//! outside M is set). Values are numbers (decimal, `0x` hex, `0` octal) or
//! named constants, combined with `|` and optionally negated with `~`.
//! Conditions combine with `&&` (binds tighter) and `||`. Several lines for
//! the same system call are alternatives. Anything not allowed kills.

use std::collections::BTreeMap;

use super::syscalls;

/// Errors parsing a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A line that does not parse, and why.
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
}

/// How an argument is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `(arg & mask) == value`.
    MaskedEq(u64),
}

/// One comparison of one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    pub arg: u8,
    pub op: Op,
    pub value: u64,
}

/// What a policy says about one system call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Allowed whatever the arguments.
    Always,
    /// Allowed when one of the alternatives (each a conjunction) matches.
    When(Vec<Vec<Cond>>),
    /// Not run; the caller gets this errno.
    Errno(u32),
}

/// A parsed policy: system call number → rule.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policy {
    pub rules: BTreeMap<i64, Rule>,
}

/// Alternatives one condition expands to (for `&` with several bits).
const MAX_ALTERNATIVES: usize = 64;

/// Parses a whole policy file.
pub fn parse(text: &str) -> Result<Policy, PolicyError> {
    let mut policy = Policy::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| PolicyError::Line { line, message };
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if let Some(directive) = content.strip_prefix('@') {
            if directive.starts_with("frequency") {
                continue;
            }
            return Err(err(format!(
                "`@{directive}` is not supported (only @frequency, which is ignored)"
            )));
        }
        let (name, action) = content
            .split_once(':')
            .ok_or_else(|| err(format!("`{content}` is not `syscall: action`")))?;
        let name = name.trim();
        let nr =
            syscalls::number(name).ok_or_else(|| err(format!("unknown system call `{name}`")))?;
        let rule = parse_action(action.trim()).map_err(err)?;
        let merged = match (policy.rules.remove(&nr), rule) {
            (None, r) => r,
            (Some(Rule::Always), Rule::When(_)) | (Some(Rule::When(_)), Rule::Always) => {
                Rule::Always
            }
            (Some(Rule::Always), Rule::Always) => Rule::Always,
            (Some(Rule::When(mut a)), Rule::When(b)) => {
                a.extend(b);
                Rule::When(a)
            }
            (Some(_), _) => {
                return Err(err(format!(
                    "`{name}` is both answered with an errno and allowed"
                )))
            }
        };
        policy.rules.insert(nr, merged);
    }
    Ok(policy)
}

fn parse_action(action: &str) -> Result<Rule, String> {
    if action == "1" {
        return Ok(Rule::Always);
    }
    if let Some(errno) = action.strip_prefix("return") {
        let v = parse_value(errno.trim())?;
        return u32::try_from(v)
            .ok()
            .filter(|&e| e > 0 && e < 4096)
            .map(Rule::Errno)
            .ok_or_else(|| format!("`{}` is not an errno", errno.trim()));
    }
    if action.contains(';') {
        return Err(format!(
            "`{action}`: `EXPR; return ERRNO` is not supported; use `return ERRNO` alone"
        ));
    }
    let tokens = tokenize(action)?;
    let mut alternatives = Vec::new();
    for conj in tokens.split(|t| t == "||") {
        // Each conjunction is a product of per-atom alternatives.
        let mut product: Vec<Vec<Cond>> = vec![Vec::new()];
        for atom in conj.split(|t| t == "&&") {
            let choices = parse_atom(atom)?;
            let mut next = Vec::new();
            for prefix in &product {
                for c in &choices {
                    let mut v = prefix.clone();
                    v.push(*c);
                    next.push(v);
                }
            }
            if next.len() > MAX_ALTERNATIVES {
                return Err(format!("`{action}` expands to too many alternatives"));
            }
            product = next;
        }
        alternatives.extend(product);
    }
    if alternatives.is_empty() {
        return Err(format!("`{action}` can never be true"));
    }
    Ok(Rule::When(alternatives))
}

/// Splits an expression into identifiers/numbers and operators.
fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(s[start..i].to_string());
        } else {
            let two = s.get(i..i + 2).unwrap_or("");
            let op = match two {
                "||" | "&&" | "==" | "!=" | "<=" | ">=" => two,
                _ => match c {
                    b'<' => "<",
                    b'>' => ">",
                    b'&' => "&",
                    b'|' => "|",
                    b'~' => "~",
                    _ => return Err(format!("unexpected `{}` in `{s}`", c as char)),
                },
            };
            out.push(op.to_string());
            i += op.len();
        }
    }
    Ok(out)
}

/// `argN OP VALUE` → the alternatives it stands for.
fn parse_atom(tokens: &[String]) -> Result<Vec<Cond>, String> {
    let text = tokens.join(" ");
    let (arg, rest) = tokens
        .split_first()
        .ok_or_else(|| "empty condition".to_string())?;
    let arg: u8 = arg
        .strip_prefix("arg")
        .and_then(|n| n.parse().ok())
        .filter(|&n| n < 6)
        .ok_or_else(|| format!("`{text}`: expected arg0 .. arg5"))?;
    let (op, value) = rest
        .split_first()
        .ok_or_else(|| format!("`{text}`: missing operator"))?;
    if value.is_empty() {
        return Err(format!("`{text}`: missing value"));
    }
    let value = parse_value(&value.join(" "))?;
    let cond = |op, value| Cond { arg, op, value };
    Ok(match op.as_str() {
        "==" => vec![cond(Op::Eq, value)],
        "!=" => vec![cond(Op::Ne, value)],
        "<" => vec![cond(Op::Lt, value)],
        "<=" => vec![cond(Op::Le, value)],
        ">" => vec![cond(Op::Gt, value)],
        ">=" => vec![cond(Op::Ge, value)],
        // Any bit of the mask: one alternative per bit.
        "&" => (0..64)
            .map(|b| 1u64 << b)
            .filter(|bit| value & bit != 0)
            .map(|bit| cond(Op::MaskedEq(bit), bit))
            .collect(),
        "in" => vec![cond(Op::MaskedEq(!value), 0)],
        other => return Err(format!("`{text}`: unknown operator `{other}`")),
    })
}

/// `[~]TERM | [~]TERM ...` where TERM is a number or a named constant.
fn parse_value(s: &str) -> Result<u64, String> {
    let mut acc = 0u64;
    for part in s.split('|') {
        let part: String = part.split_whitespace().collect();
        let (negate, term) = match part.strip_prefix('~') {
            Some(t) => (true, t),
            None => (false, part.as_str()),
        };
        let v = parse_number(term)
            .or_else(|| constant(term))
            .ok_or_else(|| format!("`{term}` is not a number or a known constant"))?;
        acc |= if negate { !v } else { v };
    }
    Ok(acc)
}

fn parse_number(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// Named constants a policy may use (values from libc).
fn constant(name: &str) -> Option<u64> {
    macro_rules! consts {
        ($($c:ident),* $(,)?) => {
            match name {
                $(stringify!($c) => Some(libc::$c as u64),)*
                _ => None,
            }
        };
    }
    consts!(
        PROT_NONE,
        PROT_READ,
        PROT_WRITE,
        PROT_EXEC,
        MAP_SHARED,
        MAP_PRIVATE,
        MAP_FIXED,
        MAP_ANONYMOUS,
        MAP_NORESERVE,
        MAP_STACK,
        MAP_POPULATE,
        MAP_FIXED_NOREPLACE,
        MAP_GROWSDOWN,
        O_RDONLY,
        O_WRONLY,
        O_RDWR,
        O_CREAT,
        O_EXCL,
        O_TRUNC,
        O_APPEND,
        O_NONBLOCK,
        O_CLOEXEC,
        O_DIRECTORY,
        O_NOFOLLOW,
        O_PATH,
        CLONE_VM,
        CLONE_FS,
        CLONE_FILES,
        CLONE_SIGHAND,
        CLONE_THREAD,
        CLONE_SYSVSEM,
        CLONE_SETTLS,
        CLONE_PARENT_SETTID,
        CLONE_CHILD_CLEARTID,
        CLONE_CHILD_SETTID,
        CLONE_VFORK,
        CLONE_NEWUSER,
        CLONE_NEWNS,
        CLONE_NEWPID,
        CLONE_NEWNET,
        F_DUPFD,
        F_DUPFD_CLOEXEC,
        F_GETFD,
        F_SETFD,
        F_GETFL,
        F_SETFL,
        F_ADD_SEALS,
        F_GET_SEALS,
        FUTEX_WAIT,
        FUTEX_WAKE,
        FUTEX_PRIVATE_FLAG,
        FUTEX_WAIT_BITSET,
        FUTEX_WAKE_BITSET,
        PR_SET_NAME,
        PR_GET_NAME,
        PR_SET_VMA,
        PR_SET_NO_NEW_PRIVS,
        AF_UNIX,
        AF_INET,
        AF_INET6,
        SOCK_STREAM,
        SOCK_DGRAM,
        SOCK_SEQPACKET,
        SOCK_CLOEXEC,
        SOCK_NONBLOCK,
        MFD_CLOEXEC,
        MFD_ALLOW_SEALING,
        EFD_CLOEXEC,
        EFD_NONBLOCK,
        TCGETS,
        FIONBIO,
        FIOCLEX,
        TUNGETFEATURES,
        MADV_DONTNEED,
        MADV_FREE,
        EPERM,
        ENOENT,
        EINTR,
        EIO,
        EBADF,
        EAGAIN,
        ENOMEM,
        EACCES,
        EFAULT,
        EINVAL,
        ENOSYS,
        ENOTTY,
        EROFS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nr(name: &str) -> i64 {
        syscalls::number(name).unwrap()
    }

    #[test]
    fn unconditional_errno_and_comments() {
        let p = parse(
            "# header\n\nread: 1\n  write : 1 # trailing\nclone3: return ENOSYS\n\
             @frequency ./x.frequency\nuname: return 1\n",
        )
        .unwrap();
        assert_eq!(p.rules[&nr("read")], Rule::Always);
        assert_eq!(p.rules[&nr("write")], Rule::Always);
        assert_eq!(p.rules[&nr("clone3")], Rule::Errno(libc::ENOSYS as u32));
        assert_eq!(p.rules[&nr("uname")], Rule::Errno(1));
        assert_eq!(p.rules.len(), 4);
    }

    #[test]
    fn comparisons_and_connectives() {
        let p = parse(
            "prlimit64: arg2 == 0 && arg3 != 0\n\
             ioctl: arg1 == TCGETS || arg1 == 0x800454CF\n\
             lseek: arg2 <= 2 && arg1 < 10 && arg0 > 2 && arg0 >= 3\n",
        )
        .unwrap();
        assert_eq!(
            p.rules[&nr("prlimit64")],
            Rule::When(vec![vec![
                Cond {
                    arg: 2,
                    op: Op::Eq,
                    value: 0
                },
                Cond {
                    arg: 3,
                    op: Op::Ne,
                    value: 0
                },
            ]])
        );
        assert_eq!(
            p.rules[&nr("ioctl")],
            Rule::When(vec![
                vec![Cond {
                    arg: 1,
                    op: Op::Eq,
                    value: libc::TCGETS
                }],
                vec![Cond {
                    arg: 1,
                    op: Op::Eq,
                    value: 0x8004_54cf
                }],
            ])
        );
        let Rule::When(alts) = &p.rules[&nr("lseek")] else {
            panic!()
        };
        assert_eq!(
            alts[0].iter().map(|c| c.op).collect::<Vec<_>>(),
            vec![Op::Le, Op::Lt, Op::Gt, Op::Ge]
        );
    }

    #[test]
    fn masks() {
        let p = parse(
            "clone: arg0 & 0x00010000\n\
             mmap: arg2 in ~PROT_EXEC || arg2 in ~PROT_WRITE\n\
             futex: arg1 & 0x3 && arg0 != 0\n",
        )
        .unwrap();
        assert_eq!(
            p.rules[&nr("clone")],
            Rule::When(vec![vec![Cond {
                arg: 0,
                op: Op::MaskedEq(0x10000),
                value: 0x10000
            }]])
        );
        assert_eq!(
            p.rules[&nr("mmap")],
            Rule::When(vec![
                vec![Cond {
                    arg: 2,
                    op: Op::MaskedEq(libc::PROT_EXEC as u64),
                    value: 0
                }],
                vec![Cond {
                    arg: 2,
                    op: Op::MaskedEq(libc::PROT_WRITE as u64),
                    value: 0
                }],
            ])
        );
        // A two-bit mask is two alternatives, each with the second atom.
        let Rule::When(alts) = &p.rules[&nr("futex")] else {
            panic!()
        };
        assert_eq!(alts.len(), 2);
        assert_eq!(alts[0][0].op, Op::MaskedEq(1));
        assert_eq!(alts[1][0].op, Op::MaskedEq(2));
        assert!(alts.iter().all(|a| a[1]
            == Cond {
                arg: 0,
                op: Op::Ne,
                value: 0
            }));
    }

    #[test]
    fn values() {
        assert_eq!(parse_value("PROT_READ|PROT_WRITE"), Ok(3));
        assert_eq!(parse_value("0x10 | 010 | 1"), Ok(0x19));
        assert_eq!(parse_value("~0"), Ok(u64::MAX));
        assert!(parse_value("NOT_A_CONSTANT").is_err());
    }

    #[test]
    fn repeated_lines_are_alternatives() {
        let p =
            parse("ioctl: arg1 == 1\nioctl: arg1 == 2\nopenat: arg2 == 0\nopenat: 1\n").unwrap();
        let Rule::When(alts) = &p.rules[&nr("ioctl")] else {
            panic!()
        };
        assert_eq!(alts.len(), 2);
        assert_eq!(p.rules[&nr("openat")], Rule::Always);
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line, needle) in [
            (
                "read: 1\nbogus_call: 1\n",
                2,
                "unknown system call `bogus_call`",
            ),
            ("read 1\n", 1, "is not `syscall: action`"),
            ("read: arg9 == 1\n", 1, "arg0 .. arg5"),
            ("read: arg0 ==\n", 1, "missing value"),
            ("read: arg0 === 1\n", 1, "unexpected `=`"),
            ("read: arg0 ?? 1\n", 1, "unexpected `?`"),
            ("read: arg0 == FOO\n", 1, "`FOO` is not a number"),
            ("read: arg0 == 1; return EPERM\n", 1, "not supported"),
            ("read: return 0\n", 1, "is not an errno"),
            ("@include other.policy\n", 1, "not supported"),
            ("read: arg0 & 0\n", 1, "can never be true"),
            ("read: 1\nread: return EPERM\n", 2, "both"),
        ] {
            let e = parse(text).unwrap_err();
            let PolicyError::Line { line: at, .. } = &e;
            assert_eq!(*at, line, "{text}: {e}");
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn builtin_policy_parses() {
        let p = parse(include_str!("plugin.policy")).unwrap();
        assert!(p.rules.contains_key(&nr("sendmsg")));
        assert!(!p.rules.contains_key(&nr("socket")));
        assert!(!p.rules.contains_key(&nr("ptrace")));
    }
}
