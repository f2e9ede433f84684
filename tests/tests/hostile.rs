//! Plugins that attack the host or its neighbours (issue 9), jailed as by
//! default: each test makes the attack with a `rawplug` scenario and shows
//! the host holding; the plugins that linger are then ended by SIGTERM to
//! `vmm`, which must exit within 2 s leaving no process behind.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e_tests::{bin, processes_matching, run_vmm, wait_guarded, TempDir};

/// A `vmm` running a lingering `rawplug` scenario, its stdout read line by
/// line.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    marker: String,
    stderr: std::thread::JoinHandle<String>,
}

fn start(vmm_args: &[&str], scenario: &[&str], tag: &str) -> Running {
    let marker = format!("hostile-{tag}-{}", std::process::id());
    let mut cmd = Command::new(bin("vmm"));
    cmd.args(vmm_args)
        .arg("--plugin")
        .arg(bin("rawplug"))
        .arg("--plugin-args")
        .args(scenario)
        .arg(&marker)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start vmm");
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Running {
        child,
        lines,
        marker,
        stderr,
    }
}

impl Running {
    /// Waits (at most 30 s) for a stdout line containing `what`.
    fn wait_line(&mut self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("vmm never printed `{what}`");
    }

    /// SIGTERM to vmm: it must exit within 2 s with status 1, and nothing
    /// of the plugin may remain. Returns vmm's stderr.
    fn terminate(mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let t = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let Some(status) = wait_guarded(&mut self.child, Duration::from_secs(10)) else {
            panic!("vmm ignored SIGTERM for 10 s");
        };
        let took = t.elapsed();
        let stderr = self.stderr.join().unwrap_or_default();
        assert!(
            took < Duration::from_secs(2),
            "vmm took {took:?} to end after SIGTERM: {stderr}"
        );
        assert_eq!(status.code(), Some(1), "{stderr}");
        // The plugin ignores the shutdown: it is killed after the grace.
        assert!(stderr.contains("vmm: error: "), "{stderr}");
        assert!(
            processes_matching(&self.marker).is_empty(),
            "a plugin process outlived vmm"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    }
}

#[test]
fn shutdown_eventfd_at_its_maximum_never_blocks_shutdown_after_start() {
    let mut r = start(&[], &["shutdown-max", "start"], "max-start");
    r.wait_line("shutdown eventfd at its maximum, started");
    r.terminate();
}

#[test]
fn shutdown_eventfd_at_its_maximum_then_last_connection_closed() {
    let marker = format!("hostile-max-close-{}", std::process::id());
    let t = Instant::now();
    let r = run_vmm(&[], &bin("rawplug"), &["shutdown-max", "close", &marker]);
    // Abandoned before Start: killed after the 1 s grace, never stuck on
    // the eventfd write.
    assert!(t.elapsed() < Duration::from_secs(10), "{r:#?}");
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .contains("closed every connection before starting the VM"),
        "{r:#?}"
    );
    assert!(processes_matching(&marker).is_empty());
}

#[test]
fn plugin_stdout_is_a_forwarded_pipe_not_vmms_stdout() {
    let dir = TempDir::new("stdout-probe");
    let path = dir.0.join("out.txt");
    std::fs::write(&path, "PRECIOUS\n").unwrap();
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    let flags_before = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).unwrap();
    let marker = format!("hostile-stdout-{}", std::process::id());
    let out = Command::new(bin("vmm"))
        .arg("--plugin")
        .arg(bin("rawplug"))
        .arg("--plugin-args")
        .args(["stdout-probe", &marker])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(Stdio::piped())
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let text = std::fs::read_to_string(&path).unwrap();
    // Not truncated; what the plugin wrote through /proc/self/fd/1 went
    // into its own pipe and arrives after the earlier output, in order.
    assert!(
        text.starts_with("PRECIOUS\n"),
        "the file was reached: {text:?}"
    );
    let probe = text.find("fd 1 is a pipe").unwrap_or(usize::MAX);
    assert!(
        text.find("OVERWRITTEN").is_none_or(|i| i > probe),
        "the file was reached: {text:?}"
    );
    assert!(text.contains("rawplug: fd 1 is a pipe: true"), "{text:?}");
    // Control characters arrive escaped, visibly.
    assert!(
        text.contains("rawplug: red\\x0d\\x1b[31mALERT\\x1b[0m\\x07 done\n"),
        "{text:?}"
    );
    assert!(!text.contains('\x1b') && !text.contains('\r'), "{text:?}");
    assert!(
        stderr.contains("plugin: rawplug: err\\x0d\\x1b[2Kfake prefix\\x7f"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\x1b') && !stderr.contains('\r'),
        "{stderr}"
    );
    // The plugin's F_SETFL did not reach vmm's (the shell's) description.
    let flags_after = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).unwrap();
    assert_eq!(flags_before, flags_after);
    assert!(file.as_raw_fd() > 2);
}

#[test]
fn plugin_stdout_is_a_pipe_unjailed_too() {
    let marker = format!("hostile-stdout-u-{}", std::process::id());
    let r = run_vmm(
        &["--disable-sandbox"],
        &bin("rawplug"),
        &["stdout-probe", &marker],
    );
    r.assert_success();
    assert!(r.stdout.contains("rawplug: fd 1 is a pipe: true"), "{r:#?}");
    assert!(r.stdout.contains("\\x1b[31mALERT"), "{r:#?}");
}

#[test]
fn set_irq_beyond_the_routing_table_is_einval() {
    let marker = format!("hostile-irq-{}", std::process::id());
    let r = run_vmm(&[], &bin("rawplug"), &["irq-range", &marker]);
    r.assert_success();
    assert!(r.stdout.contains("irq range ok"), "{r:#?}");
}

#[test]
fn guest_memory_is_bounded_by_the_option() {
    let marker = format!("hostile-mem-{}", std::process::id());
    let r = run_vmm(
        &["--max-guest-memory", "64M"],
        &bin("rawplug"),
        &["memory-bounds", "64M", &marker],
    );
    r.assert_success();
    assert!(r.stdout.contains("memory bounds ok"), "{r:#?}");
}

#[test]
fn huge_sparse_regions_are_refused_by_the_default_bound() {
    let marker = format!("hostile-mem-d-{}", std::process::id());
    let r = run_vmm(&[], &bin("rawplug"), &["memory-bounds", "default", &marker]);
    r.assert_success();
    assert!(r.stdout.contains("memory bounds ok"), "{r:#?}");
    eprintln!("{}", r.stdout);
}

#[test]
fn descriptor_flood_cannot_stop_a_second_vm_of_the_same_uid() {
    let mut hostile = start(&["--cpus", "2"], &["fd-flood", "64", "400"], "fd-flood");
    let line = hostile.wait_line("rawplug: flooded");
    // 2 vcpus: budget 32 + 3 * 2 = 38 descriptors, 6 per GetVcpus reply.
    let count = |what: &str| -> usize {
        line.split(what)
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{what}` in {line}"))
    };
    assert!(
        count("fds ") <= 38,
        "the host kept sending descriptors: {line}"
    );
    assert!(count("refused ") > 0, "nothing was refused: {line}");
    // While the hostile plugin holds everything it got, another VM starts
    // and runs (its jail hand-over and GetVcpus pass descriptors).
    let r = run_vmm(&[], &bin("hello"), &[]);
    r.assert_success();
    assert!(r.stdout.contains("Hello from the guest"), "{r:#?}");
    hostile.terminate();
}
