//! A malicious plugin: `evil SCENARIO [ARGS]` tries one thing a jailed
//! plugin must not be able to do. Outcomes the tests check:
//!
//! * stopped by the seccomp filter: the host kills it mid-call and names
//!   the system call (this process prints nothing more);
//! * refused by the kernel with an errno: prints
//!   `evil: WHAT: blocked: ERRNO` on stderr and exits with [`BLOCKED`];
//! * succeeded: prints `evil: WHAT: SUCCEEDED` and exits with [`ESCAPED`].
//!
//! A few scenarios are not attacks but probes of the jail (`ids`, `files`,
//! `argv`, `sleep`, `netns`, `abstract-listen`), exiting 0 when all went
//! as expected.

use std::ffi::CString;
use std::io::Write;

use nix::errno::Errno;

/// Exit status when the attack failed with an errno.
const BLOCKED: i32 = 7;
/// Exit status when the attack worked.
const ESCAPED: i32 = 66;

fn outcome(what: &str, r: Result<(), Errno>) -> ! {
    match r {
        Ok(()) => {
            eprintln!("evil: {what}: SUCCEEDED");
            std::process::exit(ESCAPED)
        }
        Err(e) => {
            eprintln!("evil: {what}: blocked: {e}");
            std::process::exit(BLOCKED)
        }
    }
}

fn io(r: std::io::Result<()>) -> Result<(), Errno> {
    r.map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

fn arg(args: &[String], i: usize, what: &str) -> String {
    args.get(i)
        .cloned()
        .unwrap_or_else(|| panic!("missing argument: {what}"))
}

/// A memfd holding `mov eax, 42; ret` in its first page.
fn memfd_with_code() -> i32 {
    // SAFETY: memfd_create with a valid name; write and ftruncate on it.
    unsafe {
        let fd = libc::memfd_create(c"evil-code".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create: {}", Errno::last());
        let code = [0xb8u8, 42, 0, 0, 0, 0xc3];
        assert_eq!(libc::write(fd, code.as_ptr().cast(), code.len()), 6);
        assert_eq!(libc::ftruncate(fd, 4096), 0);
        fd
    }
}

/// A Unix stream socket bound to (`listen`) or connected to the abstract
/// name `name`.
fn abstract_socket(name: &str, listen: bool) -> Result<std::os::fd::OwnedFd, Errno> {
    use std::os::fd::FromRawFd;
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    let bytes = name.as_bytes();
    assert!(bytes.len() < addr.sun_path.len() - 1, "name too long");
    for (d, s) in addr.sun_path[1..].iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + 1 + bytes.len()) as u32;
    // SAFETY: socket/bind/listen/connect on a descriptor owned here, with
    // a valid address of `len` bytes.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(Errno::last());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(s);
        let a = &addr as *const libc::sockaddr_un as *const libc::sockaddr;
        let rc = if listen {
            if libc::bind(s, a, len) < 0 {
                -1
            } else {
                libc::listen(s, 4)
            }
        } else {
            libc::connect(s, a, len)
        };
        if rc < 0 {
            return Err(Errno::last());
        }
        Ok(fd)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scenario = arg(&args, 1, "scenario");
    match scenario.as_str() {
        "kvm" => outcome(
            "open /dev/kvm",
            io(std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .map(drop)),
        ),
        "read" => {
            let path = arg(&args, 2, "file");
            outcome(&format!("read {path}"), io(std::fs::read(&path).map(drop)))
        }
        "net" => {
            // SAFETY: plain socket/connect calls on values owned here.
            let r = unsafe {
                let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if s < 0 {
                    Err(Errno::last())
                } else {
                    let addr = libc::sockaddr_in {
                        sin_family: libc::AF_INET as u16,
                        sin_port: 22u16.to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    let rc = libc::connect(
                        s,
                        &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    );
                    if rc < 0 {
                        Err(Errno::last())
                    } else {
                        Ok(())
                    }
                }
            };
            outcome("connect to 127.0.0.1:22", r)
        }
        "ptrace" => {
            let pid: i32 = arg(&args, 2, "pid").parse().expect("pid");
            // SAFETY: PTRACE_ATTACH with integer arguments.
            let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
            outcome(
                &format!("ptrace pid {pid}"),
                if rc < 0 { Err(Errno::last()) } else { Ok(()) },
            )
        }
        "kill" => {
            let pid: i32 = arg(&args, 2, "pid").parse().expect("pid");
            outcome(
                &format!("kill pid {pid}"),
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL),
            )
        }
        "exec" => {
            let sh = CString::new("/bin/sh").expect("cstring");
            let argv = [
                CString::new("sh").expect("cstring"),
                CString::new("-c").expect("cstring"),
                CString::new("echo pwned").expect("cstring"),
            ];
            let r = nix::unistd::execv(&sh, &argv).map(drop);
            outcome("execve /bin/sh", r)
        }
        "proc-sys" => outcome(
            "write /proc/sys/vm/overcommit_memory",
            io(std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/sys/vm/overcommit_memory")
                .and_then(|mut f| f.write_all(b"1"))),
        ),
        "wx" => {
            // SAFETY: an anonymous mapping; nothing is done with it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            outcome(
                "mmap writable+executable memory",
                if p == libc::MAP_FAILED {
                    Err(Errno::last())
                } else {
                    Ok(())
                },
            )
        }
        "clone-files" => {
            // A child sharing the descriptor table without being a thread
            // (it could swap a descriptor while vmm inspects an executable
            // mmap). The raw system call: the child, if one were made,
            // exits at once.
            // SAFETY: clone without CLONE_VM and a null stack gives the
            // child its own copy of this address space (like fork); it
            // only calls _exit.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_FILES | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if r == 0 {
                // SAFETY: the child leaves at once.
                unsafe { libc::_exit(0) };
            }
            outcome(
                "clone sharing the descriptor table",
                if r < 0 { Err(Errno::last()) } else { Ok(()) },
            )
        }
        "wx-mprotect" => {
            // SAFETY: an anonymous mapping, then a protection change on it.
            let r = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
                if p == libc::MAP_FAILED || libc::mprotect(p, 4096, rwx) < 0 {
                    Err(Errno::last())
                } else {
                    Ok(())
                }
            };
            outcome("mprotect memory writable+executable", r)
        }
        // Code written into a memfd, then mapped executable (private), run.
        "memfd-exec" => {
            let fd = memfd_with_code();
            // SAFETY: a new private mapping of the memfd; called only if the
            // kernel mapped it, and it holds `mov eax, 42; ret`.
            let r = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE,
                    fd,
                    0,
                );
                if p == libc::MAP_FAILED {
                    Err(Errno::last())
                } else {
                    let f: extern "C" fn() -> i32 = std::mem::transmute(p);
                    eprintln!("evil: memfd code returned {}", f());
                    Ok(())
                }
            };
            outcome("run code from a memfd", r)
        }
        // One memfd mapped writable and executable at two addresses: code
        // rewritable live.
        "memfd-rw-rx" => {
            let fd = memfd_with_code();
            // SAFETY: two new shared mappings of the memfd; nothing is run.
            let r = unsafe {
                let rw = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                let rx = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                if rw == libc::MAP_FAILED || rx == libc::MAP_FAILED {
                    Err(Errno::last())
                } else {
                    Ok(())
                }
            };
            outcome("map a memfd writable and executable", r)
        }
        // A Rust panic (the host must report it as one).
        "panic" => {
            let m = arg(&args, 2, "marker");
            // The message carries terminal controls: vmm's own error line
            // must show them escaped.
            panic!("evil panics on purpose ({m})\x1b[2K\rforged");
        }
        "fork-bomb" => {
            // Forks until the kernel refuses; children wait forever.
            let mut forked = 0u32;
            loop {
                // SAFETY: the child only calls pause and never returns.
                match unsafe { libc::fork() } {
                    0 => loop {
                        // SAFETY: pause has no arguments.
                        unsafe { libc::pause() };
                    },
                    -1 => {
                        let e = Errno::last();
                        eprintln!("evil: forked {forked} processes");
                        outcome("fork bomb", Err(e))
                    }
                    _ => forked += 1,
                }
                // Far above the jail's task limit; a bound for this test
                // machine should the limit not hold.
                if forked >= 3000 {
                    outcome("fork bomb", Ok(()))
                }
            }
        }
        "ids" => {
            let map = |f: &str| std::fs::read_to_string(f).unwrap_or_else(|e| format!("{f}: {e}"));
            println!(
                "uid={} euid={} gid={} egid={}",
                nix::unistd::getuid(),
                nix::unistd::geteuid(),
                nix::unistd::getgid(),
                nix::unistd::getegid()
            );
            print!("uid_map:{}", map("/proc/self/uid_map"));
            print!("gid_map:{}", map("/proc/self/gid_map").replace('\n', "|"));
            println!();
            println!("pid={}", std::process::id());
        }
        "files" => {
            let ro = arg(&args, 2, "read-only file");
            let rw = arg(&args, 3, "writable file");
            let text = std::fs::read_to_string(&ro).expect("read the read-only file");
            println!("read-only file says: {}", text.trim());
            match std::fs::OpenOptions::new().append(true).open(&ro) {
                Ok(_) => outcome(&format!("write {ro}"), Ok(())),
                Err(e) => println!("writing the read-only file: {e}"),
            }
            std::fs::OpenOptions::new()
                .append(true)
                .open(&rw)
                .and_then(|mut f| f.write_all(b"written by the plugin\n"))
                .expect("write the writable file");
            println!("wrote the writable file");
        }
        "int80" => {
            // The 32-bit system call entry (i386 getpid), a classic way
            // around filters written for x86-64 numbers.
            let mut rax: u64 = 20;
            // SAFETY: `int 0x80` with eax = 20 (getpid) touches no memory;
            // the 32-bit ABI clobbers only eax and the flags.
            unsafe { std::arch::asm!("int 0x80", inout("rax") rax) };
            outcome(&format!("i386 getpid returned {rax}"), Ok(()))
        }
        "argv" => println!("argv={}", args.join("|")),
        "env" => {
            for (k, v) in std::env::vars_os() {
                println!("env: {}={}", k.to_string_lossy(), v.to_string_lossy());
            }
        }
        "sleep" => {
            let ms: u64 = arg(&args, 2, "milliseconds").parse().expect("ms");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        "netns" => {
            // Which network namespace this is and what devices it has.
            let ns = std::fs::read_link("/proc/self/ns/net")
                .map(|p| p.display().to_string())
                .unwrap_or_else(|e| format!("unreadable: {e}"));
            println!("netns={ns}");
            let dev = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
            let names: Vec<&str> = dev
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(str::trim)
                .collect();
            println!("devices={}", names.join(","));
        }
        "abstract-listen" => {
            // Listens on an abstract Unix socket name (scoped by the network
            // namespace) for a while, for another plugin to reach.
            let name = arg(&args, 2, "name");
            let ms: u64 = arg(&args, 3, "milliseconds").parse().expect("ms");
            match abstract_socket(&name, true) {
                Ok(_fd) => {
                    println!("listening");
                    std::io::stdout().flush().expect("flush");
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                Err(e) => outcome(&format!("listen on @{name}"), Err(e)),
            }
        }
        "abstract-connect" => {
            let name = arg(&args, 2, "name");
            outcome(
                &format!("connect to @{name}"),
                abstract_socket(&name, false).map(drop),
            )
        }
        other => panic!("unknown scenario {other}"),
    }
}
