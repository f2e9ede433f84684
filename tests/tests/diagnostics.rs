//! The host's diagnostics (issue 14) on real guests under a jailed `vmm`:
//! refused requests logged with their reason, unreserved accesses logged
//! once per address, a KVM internal error named with its suberror and rip
//! as the run's headline, the stuck-vcpu and start-barrier warnings.

use e2e_tests::{bin, run_vmm, VmmRun};

fn count(r: &VmmRun, needle: &str) -> usize {
    r.stderr.matches(needle).count()
}

#[test]
fn refused_request_and_unreserved_accesses_are_logged_with_their_cause() {
    let r = run_vmm(&["--log-level", "debug"], &bin("diag"), &["unreserved"]);
    r.assert_success();
    assert!(
        r.stderr.contains(
            "main[0]: reserve_range(IoPort, 0x500, 4) refused: EPERM: overlaps the reserved range 0x501..0x502"
        ),
        "{r:#?}"
    );
    assert!(r.stdout.contains("diag: overlap refused"), "{r:#?}");
    // Each address once, though the guest accessed each twice.
    for (line, n) in [
        ("guest write to port 0x80 (1 bytes) is not in a reserved range: the write is dropped", 1),
        ("guest read of port 0x81 (1 bytes) is not in a reserved range: the read returns 0", 1),
        ("guest read of MMIO address 0x20000 (1 bytes) is not in a reserved range: the read returns 0", 1),
    ] {
        assert_eq!(count(&r, line), n, "`{line}`: {r:#?}");
    }
    assert!(
        r.stderr.contains("[vmm WARN] vcpu 0: guest read of MMIO"),
        "{r:#?}"
    );
    // The unreserved MMIO read gave the guest 0.
    assert!(
        r.stdout.contains("diag: guest wrote 0x0 to the done port"),
        "{r:#?}"
    );
}

#[test]
fn kvm_internal_error_names_the_vcpu_suberror_and_rip() {
    let r = run_vmm(&[], &bin("diag"), &["internal"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains(
            "vmm: error: vcpu 0 stopped the VM: KVM internal error (suberror 1: emulation failure) at rip 0x1000, exit data ["
        ),
        "{r:#?}"
    );
    assert!(
        r.stderr
            .contains("[vmm ERROR] vcpu 0: KVM internal error (suberror 1"),
        "{r:#?}"
    );
    // The plugin's wait got the shutdown; the headline is the vcpu, not
    // what the plugin did next.
    assert!(
        r.stdout.contains("diag: shutdown after the failure"),
        "{r:#?}"
    );
    assert!(!r.stderr.contains("vmm: error: the plugin"), "{r:#?}");
}

#[test]
fn a_vcpu_whose_exit_is_never_resumed_is_reported_stuck() {
    let r = run_vmm(&[], &bin("diag"), &["stuck"]);
    r.assert_success();
    assert!(r.stdout.contains("diag: leaving without resume"), "{r:#?}");
    assert_eq!(
        count(
            &r,
            "[vmm WARN] vcpu 0 is stuck: the plugin has not resumed the write to port 0x501 for 5s"
        ),
        1,
        "{r:#?}"
    );
}

#[test]
fn the_start_barrier_names_the_vcpu_that_never_finished_init() {
    let r = run_vmm(&["--cpus", "2"], &bin("diag"), &["barrier"]);
    r.assert_success();
    assert!(
        r.stderr.contains(
            "[vmm WARN] waiting for vcpu 1 to finish Init for 5s: its plugin thread has not called wait()"
        ),
        "{r:#?}"
    );
    assert!(
        r.stderr
            .contains("the start barrier: no vcpu runs until every vcpu has finished Init"),
        "{r:#?}"
    );
    assert!(!r.stderr.contains("waiting for vcpu 0"), "{r:#?}");
}

/// Every option `vmm --help` lists is in the README's command-line table
/// and the other way round; the table is one block (a blank line would end
/// it, and the rows after it would not render).
#[test]
fn readme_option_table_and_help_name_the_same_options() {
    use std::collections::BTreeSet;
    fn options(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            let long = word.starts_with("--")
                && word.len() > 2
                && word[2..]
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-');
            let short = word.len() == 2
                && word.starts_with('-')
                && word[1..].chars().all(|c| c.is_ascii_alphabetic());
            if long || short {
                out.insert(word.to_string());
            }
        }
        out
    }
    let help = std::process::Command::new(bin("vmm"))
        .arg("--help")
        .output()
        .expect("vmm --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let mut from_help = BTreeSet::new();
    for line in help.lines() {
        let line = line.trim_start();
        if line.starts_with('-') {
            // `-c, --cpus <SPEC>   description`: the names before the text.
            let names = line.split("  ").next().unwrap_or_default();
            from_help.extend(options(names));
        }
    }
    from_help.remove("-h");
    from_help.remove("--help");
    from_help.remove("-V");
    from_help.remove("--version");

    let readme = std::fs::read_to_string(e2e_tests::repo_root().join("README.md")).expect("README");
    let table: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| option | meaning |"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(table.len() > 2, "the README has no option table");
    let mut from_readme = BTreeSet::new();
    for row in &table[2..] {
        let first = row.split(" | ").next().unwrap_or_default();
        from_readme.extend(options(first));
    }
    assert_eq!(
        from_help, from_readme,
        "README option table vs vmm --help (left: --help, right: README)"
    );
    // Each short option goes with the same long one in both.
    for (short, long) in [("-m", "--mem"), ("-c", "--cpus"), ("-p", "--params")] {
        assert!(
            help.lines()
                .any(|l| l.contains(&format!("{short}, {long}"))),
            "{short} is not {long} in --help"
        );
        assert!(
            table.iter().any(|r| r.contains(short) && r.contains(long)),
            "{short} is not {long} in the README"
        );
    }
}

#[test]
fn a_bad_log_level_lists_the_valid_ones() {
    let out = std::process::Command::new(bin("vmm"))
        .args(["--log-level", "verbose", "--plugin", "/bin/true"])
        .output()
        .expect("vmm");
    assert_eq!(out.status.code(), Some(35));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("valid levels are off, error, warn, info, debug, trace"),
        "{err}"
    );
}

/// Ctrl-C on a VM whose plugin hangs (it holds an exit and ignores the
/// shutdown): the headline is the interruption, then what followed.
#[test]
fn sigint_on_a_hung_vm_says_interrupted() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin("vmm"))
        .args(["--plugin"])
        .arg(bin("diag"))
        .args(["--plugin-args", "stuck"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let reached = lines.any(|l| l.is_ok_and(|l| l.contains("to the done port")));
    // Our own child, by pid.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let output = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(reached, "the guest never reached the done port: {stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("vmm: error: interrupted by SIGINT; then "),
        "{stderr}"
    );
    assert!(!stderr.contains("vmm: error: the plugin"), "{stderr}");
}

#[test]
fn the_start_line_names_the_plugins_real_pid() {
    // Jailed and not: the pid in the INFO line is the plugin process itself
    // as the host sees it (jailed: the jail's init is its parent, and the
    // plugin is pid 2 in the jail's own pid namespace).
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    for jailed in [true, false] {
        let mut cmd = Command::new(bin("vmm"));
        cmd.args(["--log-level", "info"]);
        if !jailed {
            cmd.arg("--disable-sandbox");
        }
        let mut child = cmd
            .arg("--plugin")
            .arg(bin("evil"))
            .args(["--plugin-args", "sleep", "20000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let err = child.stderr.take().expect("stderr");
        let line = BufReader::new(err)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("started plugin"))
            .expect("a start line");
        let pid: u32 = line
            .split("(pid ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        // Our own child, by pid.
        let vmm = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(vmm, nix::sys::signal::Signal::SIGTERM);
        let _ = child.wait();
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        assert!(
            String::from_utf8_lossy(argv0).ends_with("evil"),
            "{line}: pid {pid} is {:?}",
            String::from_utf8_lossy(&cmdline)
        );
        let nspid = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>();
        if jailed {
            assert!(line.contains("jailed; jail init pid"), "{line}");
            assert_eq!(nspid.last(), Some(&"2"), "{line}: {status}");
        } else {
            assert_eq!(nspid.len(), 1, "{line}: {status}");
        }
    }
}
