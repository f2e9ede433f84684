//! The plugin jail (the default mode): every example and test plugin runs
//! jailed; malicious plugins (`evil`) are stopped and reported; the jail's
//! options (mounts, gid maps, seccomp policies, log mode) do what they say.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e_tests::{bin, compile_c, processes_matching, repo_root, run_vmm, TempDir, VmmRun};

/// `evil` exits with this when the kernel refused its attack with an errno.
const BLOCKED: i32 = 7;

fn marker(tag: &str) -> String {
    format!("evil-{tag}-{}", std::process::id())
}

/// Runs `evil SCENARIO ARGS... MARKER` jailed and checks that nothing it
/// started outlives vmm.
fn evil(vmm_args: &[&str], scenario: &str, args: &[&str]) -> VmmRun {
    let m = marker(scenario);
    let mut plugin_args = vec![scenario];
    plugin_args.extend_from_slice(args);
    plugin_args.push(&m);
    let r = run_vmm(vmm_args, &bin("evil"), &plugin_args);
    assert!(
        processes_matching(&m).is_empty(),
        "a process of the `{scenario}` plugin outlived vmm"
    );
    r
}

/// The host exited 1 (not killed) after stopping the plugin for `syscall`.
fn assert_stopped_by_seccomp(r: &VmmRun, syscall: &str) {
    assert_eq!(r.code, Some(1), "{r:#?}");
    let expected = format!("the plugin was stopped by the seccomp filter: it called `{syscall}`");
    assert!(r.stderr.contains(&expected), "{r:#?}");
}

/// The attack failed with `errno` inside the jail; the host reports the
/// plugin's exit status.
fn assert_blocked(r: &VmmRun, what: &str, errno: &str) {
    assert_eq!(r.code, Some(1), "{r:#?}");
    let line = format!("plugin: evil: {what}: blocked: {errno}");
    assert!(r.stderr.contains(&line), "{r:#?}");
    assert!(
        r.stderr
            .contains(&format!("the plugin exited with status {BLOCKED}")),
        "{r:#?}"
    );
}

// ---- every plugin runs jailed ----

#[test]
fn hello_runs_jailed() {
    let r = run_vmm(&[], &bin("hello"), &[]);
    r.assert_success();
    assert_eq!(r.stdout, "Hello from the guest\n");
}

#[test]
fn adder_runs_jailed() {
    let r = run_vmm(&[], &bin("adder"), &["1000", "337"]);
    r.assert_success();
    assert!(r.stdout.contains("1000 + 337 = 1337"), "{r:#?}");
}

#[test]
fn adder_in_c_runs_jailed() {
    let r = run_vmm(&[], &bin("adder_c"), &["4000000000", "294967295"]);
    r.assert_success();
    assert!(
        r.stdout.contains("4000000000 + 294967295 = 4294967295"),
        "{r:#?}"
    );
}

#[test]
fn raw_protocol_smoke_and_errnos_run_jailed() {
    let r = run_vmm(&[], &bin("rawplug"), &["smoke"]);
    r.assert_success();
    assert!(r.stdout.contains("guest said: ok"), "{r:#?}");
    let r = run_vmm(&[], &bin("rawplug"), &["errnos"]);
    r.assert_success();
    assert!(r.stdout.contains("errnos ok"), "{r:#?}");
}

fn multi_vcpu_jailed(n: &str) {
    let r = run_vmm(&["--cpus", n], &bin("multi_io"), &["300"]);
    r.assert_success();
    let expected = format!("vcpus={n} writes={}", 300 * n.parse::<usize>().unwrap());
    assert!(r.stdout.contains(&expected), "{r:#?}");
    assert!(r.stdout.contains("wrong_ids=0"), "{r:#?}");
}

#[test]
fn two_vcpus_run_jailed() {
    multi_vcpu_jailed("2");
}

#[test]
fn four_vcpus_run_jailed() {
    multi_vcpu_jailed("4");
}

#[test]
fn c_plugin_linked_against_the_shared_library_runs_jailed() {
    // Its libcrosvm_plugin.so (found through RUNPATH), libc and loader are
    // bound into the jail without the user listing them.
    let tmp = TempDir::new("c-smoke-jailed");
    let exe = compile_c(&repo_root().join("tests/c/smoke.c"), &tmp.0.join("smoke"));
    let r = run_vmm(&[], &exe, &[]);
    r.assert_success();
    assert!(r.stdout.contains("C smoke test passed"), "{r:#?}");
}

#[test]
fn statically_linked_plugins_are_jailed_too() {
    let tmp = TempDir::new("static");
    let exe = tmp.0.join("static_probe");
    let built = e2e_tests::cc::CBuild::c()
        .flags(["-static", "-O1"])
        .source(&repo_root().join("tests/c/static_probe.c"))
        .output(&exe)
        .try_run();
    if let Err(e) = &built {
        eprintln!("{e}");
    }
    if !e2e_tests::require(built.is_ok(), "a static libc (libc.a, from libc6-dev)") {
        return;
    }
    let r = run_vmm(&[], &exe, &[]);
    assert!(
        r.stdout.contains(&format!(
            "static probe {}\nopen /dev/kvm: No such file or directory\n",
            exe.display()
        )),
        "{r:#?}"
    );
    assert_stopped_by_seccomp(&r, "socket");
    assert!(!r.stdout.contains("socket returned"), "{r:#?}");
}

#[test]
fn jailed_plugin_keeps_ordinary_signal_semantics() {
    // The plugin is not PID 1 (an init reaps it), so raise(SIGSEGV) kills
    // it and the host reports the signal.
    let r = run_vmm(&[], &bin("rawplug"), &["segv-in-io"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .contains("killed by signal SIGSEGV (segmentation fault)"),
        "{r:#?}"
    );
}

#[test]
fn jailed_hung_plugin_is_killed_with_its_namespace() {
    let m = marker("hang");
    let r = run_vmm(&[], &bin("rawplug"), &["hang-after-shutdown", &m]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("did not exit within"), "{r:#?}");
    assert!(processes_matching(&m).is_empty(), "the plugin outlived vmm");
}

#[test]
fn argv0_is_the_plugin_path_in_both_modes() {
    let plugin = bin("evil");
    let p = plugin.to_str().unwrap();
    let expected = format!("argv={p}|argv|one two|-x\n");
    for mode in [&[][..], &["--disable-sandbox"][..]] {
        let r = run_vmm(mode, &plugin, &["argv", "one two", "-x"]);
        r.assert_success();
        assert_eq!(r.stdout, expected, "{mode:?}");
    }
}

// ---- malicious plugins ----

#[test]
fn opening_dev_kvm_fails() {
    let r = evil(&[], "kvm", &[]);
    assert_blocked(&r, "open /dev/kvm", "ENOENT");
}

#[test]
fn host_files_outside_the_jail_are_invisible() {
    let tmp = TempDir::new("secret");
    let secret = tmp.0.join("secret.txt");
    std::fs::write(&secret, "host secret").unwrap();
    let path = secret.to_str().unwrap();
    let r = evil(&[], "read", &[path]);
    assert_blocked(&r, &format!("read {path}"), "ENOENT");
    assert!(!r.stdout.contains("host secret") && !r.stderr.contains("host secret"));
}

#[test]
fn network_sockets_are_stopped() {
    let r = evil(&[], "net", &[]);
    assert_stopped_by_seccomp(&r, "socket");
}

/// `netns=...` and `devices=...` of an `evil netns` run.
fn netns_probe(vmm_args: &[&str], tag: &str) -> (String, String) {
    let m = marker(tag);
    let r = run_vmm(vmm_args, &bin("evil"), &["netns", &m]);
    assert!(processes_matching(&m).is_empty(), "the plugin outlived vmm");
    r.assert_success();
    let value = |key: &str| {
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {r:#?}"))
            .to_string()
    };
    (value("netns="), value("devices="))
}

/// Whether `lo` is up in the network namespace at `path` (joined by a
/// helper thread of this test, which needs root).
fn loopback_up_in(path: &str) -> bool {
    let path = path.to_string();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the namespace");
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        let names: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(names, ["lo"], "the shared namespace has more than lo");
        // SAFETY: a socket for one SIOCGIFFLAGS ioctl on a zeroed ifreq
        // naming lo; closed below.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            assert!(s >= 0, "socket");
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (d, c) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
                *d = *c as libc::c_char;
            }
            assert_eq!(
                libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr),
                0,
                "SIOCGIFFLAGS"
            );
            libc::close(s);
            (ifr.ifr_ifru.ifru_flags as i32 & libc::IFF_UP) != 0
        }
    })
    .join()
    .expect("the namespace probe thread")
}

#[test]
fn plugins_that_cannot_make_sockets_share_one_empty_network_namespace() {
    let host = std::fs::read_link("/proc/self/ns/net").unwrap();
    let host = host.display().to_string();
    // Two VMs at once with the built-in policy (no socket calls).
    let other = std::thread::spawn(|| netns_probe(&[], "netns-b"));
    let (a, devices) = netns_probe(&[], "netns-a");
    let (b, _) = other.join().unwrap();
    assert_ne!(a, host, "the plugin is in the host's network namespace");
    assert_eq!(devices, "lo", "{devices}");
    if nix::unistd::geteuid().as_raw() != 0 {
        e2e_tests::skip("joining the shared network namespace needs root: each jail has its own");
        assert_ne!(a, b);
        return;
    }
    assert_eq!(
        a, b,
        "two socketless plugins are not in the shared namespace"
    );
    let shared = std::fs::metadata(vmm::jail::netns::NETNS_PATH).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(a, format!("net:[{}]", shared.ino()), "{a}");
    // It stays as created: only lo, and lo down (a plugin has no
    // capability over it and no socket to ask with).
    assert!(!loopback_up_in(vmm::jail::netns::NETNS_PATH));
    // In log mode a stopped `socket` would run: a namespace of its own.
    let (logged, devices) = netns_probe(&["--seccomp-log-failures"], "netns-log");
    assert_ne!(logged, a);
    assert_ne!(logged, host);
    assert_eq!(devices, "lo", "{devices}");
}

#[test]
fn plugins_that_may_make_sockets_cannot_reach_each_other() {
    // The attack a shared namespace would allow: one plugin listens on an
    // abstract Unix socket name (scoped by the network namespace), another
    // connects. With a policy that allows sockets each jail must have a
    // namespace of its own, so the connection is refused.
    let tmp = TempDir::new("socket-policy");
    let builtin = std::fs::read_to_string(repo_root().join("vmm/src/jail/plugin.policy")).unwrap();
    std::fs::write(
        tmp.0.join("plugin.policy"),
        format!("{builtin}\nsocket: 1\nbind: 1\nlisten: 1\nconnect: 1\n"),
    )
    .unwrap();
    let dir = tmp.0.to_str().unwrap().to_string();
    let name = marker("abstract");
    let listen = |jail: &[&str]| {
        let mut cmd = std::process::Command::new(bin("vmm"));
        cmd.args(jail)
            .arg("--plugin")
            .arg(bin("evil"))
            .args(["--plugin-args", "abstract-listen", &name, "20000"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vmm");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "listening", "the listener did not start");
        child
    };
    let connect = |jail: &[&str]| {
        let mut cmd = std::process::Command::new(bin("vmm"));
        cmd.args(jail).arg("--plugin").arg(bin("evil")).args([
            "--plugin-args",
            "abstract-connect",
            &name,
        ]);
        e2e_tests::run_command(cmd)
    };
    // The attack works where nothing separates the two (so this test would
    // see a shared namespace)...
    let mut l = listen(&["--disable-sandbox"]);
    let r = connect(&["--disable-sandbox"]);
    let _ = l.kill();
    let _ = l.wait();
    assert!(r.stderr.contains("SUCCEEDED"), "{r:#?}");
    // ...and fails between jails whose policy allows sockets.
    let jail = ["--seccomp-policy-dir", dir.as_str()];
    let mut l = listen(&jail);
    let r = connect(&jail);
    let _ = l.kill();
    let _ = l.wait();
    assert_blocked(&r, &format!("connect to @{name}"), "ECONNREFUSED");
    // With the built-in policy neither could make the socket at all.
    let r = evil(&[], "abstract-connect", &[&name]);
    assert_stopped_by_seccomp(&r, "socket");
}

#[test]
fn ptrace_of_a_host_process_is_stopped() {
    let pid = std::process::id().to_string();
    let r = evil(&[], "ptrace", &[&pid]);
    assert_stopped_by_seccomp(&r, "ptrace");
}

#[test]
fn signalling_a_host_process_is_stopped() {
    let pid = std::process::id().to_string();
    let r = evil(&[], "kill", &[&pid]);
    assert_stopped_by_seccomp(&r, "kill");
}

#[test]
fn exec_of_a_shell_is_stopped() {
    let r = evil(&[], "exec", &[]);
    assert_stopped_by_seccomp(&r, "execve");
    assert!(!r.stdout.contains("pwned"));
}

#[test]
fn proc_sys_is_read_only() {
    let r = evil(&[], "proc-sys", &[]);
    assert_blocked(&r, "write /proc/sys/vm/overcommit_memory", "EROFS");
}

#[test]
fn writable_executable_memory_is_refused() {
    // vmm decides executable memory itself (before any policy): refused
    // with EACCES, also when the policy only logs.
    for mode in [&[][..], &["--seccomp-log-failures"][..]] {
        let r = evil(mode, "wx", &[]);
        assert_blocked(&r, "mmap writable+executable memory", "EACCES");
        let r = evil(mode, "wx-mprotect", &[]);
        assert_blocked(&r, "mprotect memory writable+executable", "EACCES");
    }
}

#[test]
fn system_calls_of_another_architecture_are_stopped() {
    let r = evil(&[], "int80", &[]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains(
            "the plugin was stopped by the seccomp filter: it called a 32-bit (i386) system \
             call, number 20"
        ),
        "{r:#?}"
    );
}

#[test]
fn fork_bomb_is_stopped_at_the_first_fork() {
    let r = evil(&[], "fork-bomb", &[]);
    assert_stopped_by_seccomp(&r, "clone");
}

/// Kernels from 6.14 have a pid_max per PID namespace, which the jail
/// sets; a non-root host is limited by RLIMIT_NPROC as well.
fn task_limit_enforced() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 14) || nix::unistd::geteuid().as_raw() != 0
}

#[test]
fn fork_bomb_is_contained_even_when_seccomp_only_logs() {
    if !e2e_tests::require(
        task_limit_enforced(),
        "a kernel with a per-namespace pid_max (6.14 or later) for a root host",
    ) {
        return;
    }
    let r = evil(&["--seccomp-log-failures"], "fork-bomb", &[]);
    assert_blocked(&r, "fork bomb", "EAGAIN");
    let forked: u32 = r
        .stderr
        .split("evil: forked ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("fork count");
    assert!(forked < 1024, "{forked} processes");
}

// ---- what the plugin sees ----

#[test]
fn plugin_is_root_inside_and_the_host_user_outside() {
    let euid = nix::unistd::geteuid().as_raw();
    let egid = nix::unistd::getegid().as_raw();
    let mut args = vec![];
    if euid == 0 {
        // Extra gid lines need a privileged host.
        args = vec!["--plugin-gid-map", "5:5:2"];
    }
    let r = run_vmm(&args, &bin("evil"), &["ids"]);
    r.assert_success();
    assert!(r.stdout.contains("uid=0 euid=0 gid=0 egid=0"), "{r:#?}");
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let uid_line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("uid_map:"))
        .unwrap();
    assert_eq!(squash(&uid_line["uid_map:".len()..]), format!("0 {euid} 1"));
    let gid_line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("gid_map:"))
        .unwrap();
    let gids = squash(&gid_line["gid_map:".len()..].replace('|', " "));
    if euid == 0 {
        assert_eq!(gids, format!("0 {egid} 1 5 5 2"));
    } else {
        assert_eq!(gids, format!("0 {egid} 1"));
    }
    // The plugin is PID 2 of its own PID namespace (init is PID 1).
    assert!(r.stdout.contains("pid=2"), "{r:#?}");
}

#[test]
fn plugin_mounts_are_read_only_or_writable_as_asked() {
    let tmp = TempDir::new("mounts");
    let ro = tmp.0.join("ro.txt");
    let rw = tmp.0.join("rw.txt");
    std::fs::write(&ro, "hello from the host\n").unwrap();
    std::fs::write(&rw, "").unwrap();
    let list = tmp.0.join("mounts.list");
    std::fs::write(
        &list,
        format!("# writable\n{}:/data/rw.txt:true\n", rw.display()),
    )
    .unwrap();
    let ro_spec = format!("{}:/data/ro.txt", ro.display());
    let r = run_vmm(
        &[
            "--plugin-mount",
            &ro_spec,
            "--plugin-mount-file",
            list.to_str().unwrap(),
        ],
        &bin("evil"),
        &["files", "/data/ro.txt", "/data/rw.txt"],
    );
    r.assert_success();
    assert!(
        r.stdout
            .contains("read-only file says: hello from the host"),
        "{r:#?}"
    );
    assert!(
        r.stdout
            .contains("writing the read-only file: Read-only file system"),
        "{r:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(&rw).unwrap(),
        "written by the plugin\n"
    );
    assert_eq!(
        std::fs::read_to_string(&ro).unwrap(),
        "hello from the host\n"
    );
}

#[test]
fn host_drops_its_capabilities_once_the_jail_is_built() {
    let mut cmd = std::process::Command::new(bin("vmm"));
    cmd.arg("--plugin")
        .arg(bin("evil"))
        .args(["--plugin-args", "sleep", "2000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dropped = false;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let status = std::fs::read_to_string(&status_file).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .map(|l| l[name.len()..].trim().to_string())
        };
        if field("CapEff:").as_deref() == Some("0000000000000000")
            && field("CapPrm:").as_deref() == Some("0000000000000000")
            && field("CapBnd:").as_deref() == Some("0000000000000000")
        {
            dropped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = child.wait().unwrap();
    assert!(dropped, "vmm kept capabilities while the plugin ran");
    assert!(status.success());
}

// ---- seccomp policies ----

#[test]
fn json_policy_replaces_the_builtin_filter() {
    let tmp = TempDir::new("json-policy");
    let policy = tmp.0.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"plugin": {"mismatch_action": "allow", "match_action": "kill_process",
            "filter": [{"syscall": "socket"}, {"syscall": "getppid"}]}}"#,
    )
    .unwrap();
    let p = policy.to_str().unwrap();
    // A deny-list: the plugin runs; executable memory is vmm's to decide
    // whatever the policy says, so W+X memory is still refused...
    let r = run_vmm(&["--seccomp-policy", p], &bin("rawplug"), &["smoke"]);
    r.assert_success();
    let r = evil(&["--seccomp-policy", p], "wx", &[]);
    assert_blocked(&r, "mmap writable+executable memory", "EACCES");
    // A process sharing the descriptor table (not a thread) is refused
    // whatever the policy says: it could swap a descriptor while vmm checks
    // an executable mmap.
    let r = evil(&["--seccomp-policy", p], "clone-files", &[]);
    assert_blocked(&r, "clone sharing the descriptor table", "EPERM");
    // ...and its kill is reported like the built-in filter's.
    let r = evil(&["--seccomp-policy", p], "net", &[]);
    assert_stopped_by_seccomp(&r, "socket");
    // Whatever the policy says, only the plugin's own execve runs.
    let r = evil(&["--seccomp-policy", p], "exec", &[]);
    assert_stopped_by_seccomp(&r, "execve");

    // An errno action answers instead of stopping.
    std::fs::write(
        &policy,
        r#"{"plugin": {"mismatch_action": "allow", "match_action": {"errno": 13},
            "filter": [{"syscall": "socket"}]}}"#,
    )
    .unwrap();
    let r = evil(&["--seccomp-policy", p], "net", &[]);
    assert_blocked(&r, "connect to 127.0.0.1:22", "EACCES");
}

#[test]
fn minijail_policy_from_the_policy_dir() {
    let tmp = TempDir::new("minijail-policy");
    let builtin = std::fs::read_to_string(repo_root().join("vmm/src/jail/plugin.policy")).unwrap();
    let dir = tmp.0.to_str().unwrap();
    // No plugin.policy in the directory: the built-in policy applies.
    let r = run_vmm(&["--seccomp-policy-dir", dir], &bin("hello"), &[]);
    r.assert_success();
    // The built-in policy as a file works for every kind of plugin...
    std::fs::write(tmp.0.join("plugin.policy"), &builtin).unwrap();
    let r = run_vmm(&["--seccomp-policy-dir", dir], &bin("hello"), &[]);
    r.assert_success();
    let r = run_vmm(
        &["--seccomp-policy-dir", dir, "--cpus", "2"],
        &bin("multi_io"),
        &["50"],
    );
    r.assert_success();
    // ...and taking a call away from it stops a plugin that makes it.
    let without_getuid: String = builtin
        .lines()
        .filter(|l| !l.starts_with("getuid:"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(tmp.0.join("plugin.policy"), without_getuid).unwrap();
    let r = evil(&["--seccomp-policy-dir", dir], "ids", &[]);
    assert_stopped_by_seccomp(&r, "getuid");
    // A bad policy is a start-up error naming the file and line.
    std::fs::write(tmp.0.join("plugin.policy"), "read: 1\nwrite: arg0 >> 1\n").unwrap();
    let r = run_vmm(&["--seccomp-policy-dir", dir], &bin("hello"), &[]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("plugin.policy") && r.stderr.contains("line 2"),
        "{r:#?}"
    );
}

#[test]
fn log_failures_logs_and_lets_the_call_run() {
    let r = evil(&["--seccomp-log-failures"], "net", &[]);
    // socket ran; connect found no network in the jail's namespace.
    assert_blocked(&r, "connect to 127.0.0.1:22", "ENETUNREACH");
    assert!(
        r.stderr.contains(
            "seccomp: the plugin called `socket` (system call 41) with arguments (0x2, 0x1"
        ) && r.stderr.contains("allowed (--seccomp-log-failures)"),
        "{r:#?}"
    );
    assert!(
        !r.stderr.contains("stopped by the seccomp filter"),
        "{r:#?}"
    );
}

// ---- jail configuration errors ----

#[test]
fn jail_configuration_errors_are_clear() {
    let r = run_vmm(&["--plugin-root", "/no/such/root"], &bin("hello"), &[]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .contains("the jail root /no/such/root is not a usable directory"),
        "{r:#?}"
    );
    let r = run_vmm(&[], Path::new("/nonexistent/plugin"), &[]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("cannot execute /nonexistent/plugin"),
        "{r:#?}"
    );
    let r = run_vmm(&[], Path::new("/etc/hostname"), &[]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .contains("is not a 64-bit little-endian ELF executable"),
        "{r:#?}"
    );
}

#[test]
fn jail_setup_failures_name_the_step() {
    let tmp = TempDir::new("setup-failure");
    let scratch = tmp.0.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    // The second mount point would have to be created inside the host
    // directory bound by the first: vmm never creates anything there, so
    // that bind fails, and the step is named.
    let first = format!("{}:/scratch:true", scratch.display());
    let r = run_vmm(
        &[
            "--plugin-mount",
            &first,
            "--plugin-mount",
            "/dev/null:/scratch/sub/null",
        ],
        &bin("hello"),
        &[],
    );
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains(
            "the jail failed to bind /dev/null to /scratch/sub/null (read-only) in the jail: \
             ENOENT"
        ),
        "{r:#?}"
    );
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);

    // An exec that fails inside the jail is reported with its errno.
    let copy = tmp.0.join("not-executable");
    std::fs::copy(bin("evil"), &copy).unwrap();
    let mut perm = std::fs::metadata(&copy).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&copy, perm).unwrap();
    let r = run_vmm(&[], &copy, &["ids"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains(&format!(
            "cannot execute {} in the jail: EACCES",
            copy.display()
        )),
        "{r:#?}"
    );
}

#[test]
fn explicit_plugin_root_is_used_as_the_jail_root() {
    let tmp = TempDir::new("plugin-root");
    let r = run_vmm(
        &["--plugin-root", tmp.0.to_str().unwrap()],
        &bin("hello"),
        &[],
    );
    r.assert_success();
    // The tmpfs covered it: nothing was written into the host directory.
    assert_eq!(std::fs::read_dir(&tmp.0).unwrap().count(), 0);
}

// ---- issue 9: executable memory from memfds, the exec gate in log mode ----

#[test]
fn code_from_a_memfd_never_runs() {
    // Written into a memfd and mapped executable (private), or one memfd
    // mapped writable and executable: refused, in log mode too, under the
    // built-in policy and under a policy that allows every mmap.
    let tmp = TempDir::new("memfd-exec");
    let policy = tmp.0.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"plugin": {"mismatch_action": "allow", "match_action": "kill_process",
            "filter": [{"syscall": "socket"}]}}"#,
    )
    .unwrap();
    let p = policy.to_str().unwrap();
    for mode in [
        &[][..],
        &["--seccomp-log-failures"][..],
        &["--seccomp-policy", p][..],
    ] {
        let r = evil(mode, "memfd-exec", &[]);
        assert_blocked(&r, "run code from a memfd", "EACCES");
        assert!(!r.stderr.contains("memfd code returned"), "{r:#?}");
        assert!(
            r.stderr
                .contains("refused an executable mapping of a memfd or shared memory"),
            "{r:#?}"
        );
        let r = evil(mode, "memfd-rw-rx", &[]);
        assert_blocked(&r, "map a memfd writable and executable", "EACCES");
    }
    // Unjailed nothing stops it: the test makes the attack for real.
    let r = evil(&["--disable-sandbox"], "memfd-exec", &[]);
    assert!(r.stderr.contains("memfd code returned 42"), "{r:#?}");
}

#[test]
fn log_mode_keeps_the_exec_gate() {
    let r = evil(&["--seccomp-log-failures"], "exec", &[]);
    assert_stopped_by_seccomp(&r, "execve");
    assert!(!r.stdout.contains("pwned"), "{r:#?}");
}

#[test]
fn a_rust_panic_is_reported_as_a_panic() {
    // With and without RUST_BACKTRACE (whose backtrace calls getcwd), jailed
    // and not.
    for mode in [
        &[][..],
        &["--plugin-env", "RUST_BACKTRACE=1"][..],
        &["--plugin-env", "RUST_BACKTRACE=full"][..],
        &["--disable-sandbox", "--plugin-env", "RUST_BACKTRACE=1"][..],
    ] {
        let r = evil(mode, "panic", &[]);
        assert_eq!(r.code, Some(1), "{r:#?}");
        assert!(
            r.stderr.contains("vmm: error: the plugin panicked: ")
                && r.stderr.contains("evil panics on purpose (evil-panic-"),
            "{mode:?}: {r:#?}"
        );
        assert!(!r.stderr.contains("seccomp filter"), "{r:#?}");
        // The panic message reaches vmm's error line escaped.
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with("vmm: error: the plugin panicked: "))
            .unwrap();
        assert!(line.contains(r"\x1b[2K\x0dforged"), "{line:?}");
        assert!(
            !r.stderr.contains('\x1b') && !r.stderr.contains('\r'),
            "{r:#?}"
        );
    }
}

#[test]
fn the_environment_is_minimal_unless_named() {
    // vmm's own environment has HOME, PATH, ... and a secret; the plugin
    // sees only CROSVM_SOCKET and what --plugin-env names.
    for mode in [&[][..], &["--disable-sandbox"][..]] {
        let run = |extra: &[&str]| {
            let mut args: Vec<&str> = mode.to_vec();
            args.extend_from_slice(extra);
            let mut cmd = std::process::Command::new(bin("vmm"));
            cmd.args(&args)
                .arg("--plugin")
                .arg(bin("evil"))
                .args(["--plugin-args", "env", "x"])
                .env("VMM_TEST_SECRET", "hunter2")
                .env("VMM_TEST_NAMED", "named-value");
            e2e_tests::run_command(cmd)
        };
        let r = run(&[]);
        r.assert_success();
        let vars: Vec<&str> = r
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix("env: "))
            .collect();
        assert_eq!(vars.len(), 1, "{r:#?}");
        assert!(vars[0].starts_with("CROSVM_SOCKET="), "{r:#?}");
        let r = run(&[
            "--plugin-env",
            "VMM_TEST_NAMED",
            "--plugin-env",
            "LANG=C.UTF-8",
        ]);
        r.assert_success();
        assert!(
            r.stdout.contains("env: VMM_TEST_NAMED=named-value\n"),
            "{r:#?}"
        );
        assert!(r.stdout.contains("env: LANG=C.UTF-8\n"), "{r:#?}");
        assert!(!r.stdout.contains("hunter2"), "{r:#?}");
    }
}
