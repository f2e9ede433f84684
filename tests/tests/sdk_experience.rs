//! The plugin author's experience (issue 14), on real guests under a jailed
//! `vmm`: shutdown reaching a vcpu blocked in `wait()` (Rust and C, both
//! vcpu transports), the pending-resume error, host errors that name the
//! request.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_tests::{bin, compile_c, repo_root, run_vmm, wait_guarded, TempDir, VmmRun};

/// Runs `vmm [args] --plugin PLUGIN --plugin-args MODE`, waits until the
/// plugin prints a line ending in `running` (its vcpu thread is then about
/// to block in wait), stops `vmm` with SIGTERM, and returns the whole run.
fn run_until_running_then_sigterm(args: &[&str], plugin: &Path, mode: &str) -> VmmRun {
    let mut child = Command::new(bin("vmm"))
        .args(args)
        .arg("--plugin")
        .arg(plugin)
        .arg("--plugin-args")
        .arg(mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut err = child.stderr.take().expect("stderr");
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("stdout");
    let t_out = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.ends_with("running") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let running = rx.recv_timeout(Duration::from_secs(30)).is_ok();
    if running {
        // Give the vcpu thread time to enter its wait (a signal sent
        // earlier is as valid: the wait then sees the shutdown at once).
        std::thread::sleep(Duration::from_millis(200));
    }
    // Our own child, by pid.
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let Some(status) = wait_guarded(&mut child, Duration::from_secs(30)) else {
        panic!("vmm did not stop within 30 s of SIGTERM");
    };
    let r = VmmRun {
        code: status.code(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    };
    assert!(running, "the plugin never reported running: {r:#?}");
    r
}

fn assert_plugin_exited_by_itself(r: &VmmRun) {
    // vmm reports the interruption, but the plugin was not killed: it left
    // on its own after its wait returned the shutdown.
    assert!(
        r.stderr.contains("vmm: error: stopped by SIGTERM"),
        "{r:#?}"
    );
    assert!(!r.stderr.contains("killed"), "{r:#?}");
    assert!(!r.stderr.contains("FAILED"), "{r:#?}");
}

#[test]
fn shutdown_reaches_a_rust_vcpu_blocked_in_wait_fast_channel() {
    let r = run_until_running_then_sigterm(&[], &bin("sdk_wait"), "shutdown");
    assert!(
        r.stdout.contains("sdk_wait: shutdown event reached vcpu 0"),
        "{r:#?}"
    );
    assert_plugin_exited_by_itself(&r);
}

#[test]
fn shutdown_reaches_a_rust_vcpu_blocked_in_wait_pipes() {
    let r = run_until_running_then_sigterm(&["--no-fast-channel"], &bin("sdk_wait"), "shutdown");
    assert!(
        r.stdout.contains("sdk_wait: shutdown event reached vcpu 0"),
        "{r:#?}"
    );
    assert_plugin_exited_by_itself(&r);
}

fn c_sdk_wait(tmp: &TempDir) -> std::path::PathBuf {
    compile_c(
        &repo_root().join("tests/c/sdk_wait.c"),
        &tmp.0.join("sdk_wait_c"),
    )
}

#[test]
fn shutdown_reaches_a_c_vcpu_blocked_in_wait_as_eshutdown() {
    let tmp = TempDir::new("sdk-wait-c");
    let plugin = c_sdk_wait(&tmp);
    for args in [&[][..], &["--no-fast-channel"][..]] {
        let r = run_until_running_then_sigterm(args, &plugin, "shutdown");
        assert!(
            r.stdout
                .contains("sdk_wait_c: wait with a resume owed: -EBUSY"),
            "{r:#?}"
        );
        assert!(
            r.stdout
                .contains("sdk_wait_c: shutdown reached vcpu 0: -ESHUTDOWN"),
            "{args:?}: {r:#?}"
        );
        assert_plugin_exited_by_itself(&r);
    }
}

#[test]
fn wait_with_a_resume_owed_names_the_pending_event() {
    let r = run_vmm(&[], &bin("sdk_wait"), &["owed"]);
    r.assert_success();
    assert!(
        r.stdout
            .contains("sdk_wait: wait() on vcpu 0 while a resume is still owed for its Init event"),
        "{r:#?}"
    );
    assert!(
        r.stdout.contains("sdk_wait: guest reached the done port"),
        "{r:#?}"
    );
}

#[test]
fn host_refusals_name_the_request_and_its_arguments() {
    let r = run_vmm(&[], &bin("sdk_wait"), &["owed"]);
    r.assert_success();
    assert!(
        r.stdout.contains(
            "sdk_wait: overlap refused: reserve_range(IoPort, 0x500, 4): EPERM: Operation not permitted"
        ),
        "{r:#?}"
    );
}

#[test]
fn c_api_prints_error_text_at_debug_level() {
    let tmp = TempDir::new("sdk-wait-c-log");
    let plugin = c_sdk_wait(&tmp);
    let r = run_until_running_then_sigterm(
        &["--plugin-env", "CROSVM_PLUGIN_LOG=debug"],
        &plugin,
        "shutdown",
    );
    assert!(
        r.stderr.contains(
            "crosvm_plugin: debug: wait() on vcpu 0 while a resume is still owed for its Init event"
        ),
        "{r:#?}"
    );
    assert!(r.stderr.contains("(returning -16)"), "{r:#?}");
}

#[test]
fn tutorial_plugins_run() {
    for name in ["tutorial", "tutorial_c"] {
        let r = run_vmm(&[], &bin(name), &[]);
        r.assert_success();
        assert_eq!(
            r.stdout, "guest counted 1\nguest counted 2\nguest counted 3\nguest is done\n",
            "{name}: {r:#?}"
        );
        // One vcpu only, and it says so instead of hanging.
        let r = run_vmm(&["--cpus", "2"], &bin(name), &[]);
        assert_eq!(r.code, Some(1), "{name}: {r:#?}");
        assert!(r.stderr.contains("run vmm without --cpus"), "{r:#?}");
    }
}

fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .args(args)
        .arg("crosvm_plugin")
        .output()
        .expect("pkg-config is required by this test (.ci/run installs it)");
    assert!(
        out.status.success(),
        "pkg-config {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn cc(args: &[String]) {
    let out = Command::new("cc").args(args).output().expect("run cc");
    assert!(
        out.status.success(),
        "cc {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_then_build_a_c_plugin_with_pkg_config_dynamic_and_static() {
    let tmp = TempDir::new("install");
    let prefix = tmp.0.join("prefix");
    // The suite built everything already; install.sh only copies.
    let out = Command::new(repo_root().join("scripts/install.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .arg("--no-build")
        .env(
            "CARGO_TARGET_DIR",
            e2e_tests::target_dir().parent().unwrap(),
        )
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "include/crosvm.h",
        "lib/libcrosvm_plugin.so",
        "lib/libcrosvm_plugin.a",
        "lib/pkgconfig/crosvm_plugin.pc",
        "bin/vmm",
    ] {
        assert!(prefix.join(f).is_file(), "{f} is not installed");
    }
    // The shared library carries its soname.
    let dynamic = Command::new("readelf")
        .arg("-d")
        .arg(prefix.join("lib/libcrosvm_plugin.so"))
        .output()
        .expect("readelf");
    assert!(
        String::from_utf8_lossy(&dynamic.stdout).contains("Library soname: [libcrosvm_plugin.so]"),
        "{}",
        String::from_utf8_lossy(&dynamic.stdout)
    );

    let source = repo_root()
        .join("plugin-examples/c/tutorial.c")
        .display()
        .to_string();
    let vmm = prefix.join("bin/vmm");
    let expected = "guest counted 1\nguest counted 2\nguest counted 3\nguest is done\n";

    // Dynamic: cc $(pkg-config --cflags --libs crosvm_plugin).
    let dyn_exe = tmp.0.join("tutorial_dyn").display().to_string();
    let mut args = vec!["-o".to_owned(), dyn_exe.clone(), source.clone()];
    args.extend(pkg_config(&prefix, &["--cflags", "--libs"]));
    cc(&args);
    // Static: cc -static $(pkg-config --static --cflags --libs crosvm_plugin).
    let static_exe = tmp.0.join("tutorial_static").display().to_string();
    let mut args = vec![
        "-static".to_owned(),
        "-o".to_owned(),
        static_exe.clone(),
        source.clone(),
    ];
    args.extend(pkg_config(&prefix, &["--static", "--cflags", "--libs"]));
    cc(&args);
    // And the plain static line of the README.
    let plain_exe = tmp.0.join("tutorial_plain").display().to_string();
    cc(&[
        "-static".to_owned(),
        "-pthread".to_owned(),
        format!("-I{}", prefix.join("include").display()),
        "-o".to_owned(),
        plain_exe.clone(),
        source,
        prefix.join("lib/libcrosvm_plugin.a").display().to_string(),
    ]);

    for exe in [&dyn_exe, &static_exe, &plain_exe] {
        let mut cmd = Command::new(&vmm);
        // As a user's shell would run it. (The test runner's
        // LD_LIBRARY_PATH points at target/: the jail lists the plugin's
        // libraries with vmm's environment, so it would bind the build
        // tree's copy while the jailed plugin, without that variable,
        // looks in its RUNPATH: a jail finding reported to the lead.)
        cmd.env_remove("LD_LIBRARY_PATH");
        cmd.arg("--plugin").arg(exe);
        let r = e2e_tests::run_command(cmd);
        r.assert_success();
        assert_eq!(r.stdout, expected, "{exe}: {r:#?}");
    }
    let file = Command::new("file").arg(&static_exe).output();
    if let Ok(f) = file {
        let text = String::from_utf8_lossy(&f.stdout);
        assert!(text.contains("statically linked"), "{text}");
    }
}

#[test]
fn examples_validate_their_arguments_and_vcpu_count() {
    // (example, plugin arguments, vmm options, expected stderr)
    let cases: &[(&str, &[&str], &[&str], &str)] = &[
        ("adder", &["abc"], &[], "usage: vmm --plugin adder"),
        ("adder", &["1", "x"], &[], "bad argument \"x\""),
        ("adder_c", &["abc"], &[], "usage: vmm --plugin adder_c"),
        ("adder_c", &["1", "-2"], &[], "must be two u32 numbers"),
        ("hello", &["x"], &[], "usage: vmm --plugin hello"),
        ("pc-timer", &["0"], &[], "TICKS must be at least 1"),
        ("multi-vcpu", &["z"], &[], "usage: vmm --plugin multi-vcpu"),
        ("hello", &[], &["--cpus", "2"], "run vmm with --cpus 1"),
        ("adder", &[], &["--cpus", "2"], "run vmm with --cpus 1"),
        ("adder_c", &[], &["--cpus", "2"], "run vmm without --cpus"),
        ("pc-timer", &[], &["--cpus", "2"], "run vmm with --cpus 1"),
    ];
    for (name, args, opts, expected) in cases {
        let r = run_vmm(opts, &bin(name), args);
        assert_eq!(r.code, Some(1), "{name} {args:?} {opts:?}: {r:#?}");
        assert!(r.stdout.is_empty(), "{name} computed something: {r:#?}");
        assert!(r.stderr.contains(expected), "{name} {args:?}: {r:#?}");
    }
    // The multi-vcpu example is the one that runs on several vcpus.
    let r = run_vmm(&["--cpus", "2"], &bin("multi-vcpu"), &["2"]);
    r.assert_success();
    assert!(
        r.stdout.contains("round 2: all 2 vcpus paused and resumed"),
        "{r:#?}"
    );
}

#[test]
fn mode_helpers_run_protected_and_long_mode_guests() {
    for (mode, value) in [("protected", "0x12345678"), ("long", "0x1")] {
        let r = run_vmm(&[], &bin("sdk_wait"), &[mode]);
        r.assert_success();
        assert!(
            r.stdout
                .contains(&format!("sdk_wait: {mode} mode guest wrote {value}")),
            "{r:#?}"
        );
    }
}
