//! End-to-end behaviour of the host with purpose-built plugins: protocol
//! round trips, errnos for bad requests, crashes, hangs, concurrency, and the
//! C API compiled with `cc` at test time.

use std::time::Instant;

use e2e_tests::{bin, compile_c, processes_matching, repo_root, run_vmm, TempDir};

#[test]
fn raw_protocol_smoke() {
    let r = run_vmm(&["--disable-sandbox"], &bin("rawplug"), &["smoke"]);
    r.assert_success();
    assert!(r.stdout.contains("guest said: ok"), "{r:#?}");
}

#[test]
fn bad_requests_get_errnos() {
    let r = run_vmm(&["--disable-sandbox"], &bin("rawplug"), &["errnos"]);
    r.assert_success();
    assert!(r.stdout.contains("errnos ok"), "{r:#?}");
}

#[test]
fn plugin_crash_in_io_exit_ends_vm_with_message() {
    let r = run_vmm(&["--disable-sandbox"], &bin("rawplug"), &["segv-in-io"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .contains("killed by signal SIGSEGV (segmentation fault)"),
        "{r:#?}"
    );
    // The plugin's stderr is forwarded line by line.
    assert!(
        r.stderr
            .contains("plugin: rawplug: crashing in the middle of an IO exit"),
        "{r:#?}"
    );
}

#[test]
fn plugin_exit_status_is_reflected() {
    let r = run_vmm(&["--disable-sandbox"], &bin("rawplug"), &["exit-early"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("the plugin exited with status 3"),
        "{r:#?}"
    );
}

#[test]
fn plugin_exiting_before_first_wait_does_not_hang_the_host() {
    // The reference host hung forever here (docs/differences-from-crosvm.md, quirk 14).
    let r = run_vmm(
        &["--disable-sandbox"],
        &bin("rawplug"),
        &["exit-after-start"],
    );
    r.assert_success();
}

#[test]
fn hung_plugin_is_killed_after_the_grace_period() {
    let marker = format!("hang-marker-{}", std::process::id());
    let started = Instant::now();
    let r = run_vmm(
        &["--disable-sandbox"],
        &bin("rawplug"),
        &["hang-after-shutdown", &marker],
    );
    let elapsed = started.elapsed();
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("did not exit within"), "{r:#?}");
    assert!(
        processes_matching(&marker).is_empty(),
        "the plugin outlived vmm"
    );
    eprintln!("hung plugin handled in {elapsed:?}");
}

#[test]
fn plugin_closing_its_socket_and_lingering_is_killed() {
    let marker = format!("linger-marker-{}", std::process::id());
    let r = run_vmm(
        &["--disable-sandbox"],
        &bin("rawplug"),
        &["close-and-linger", &marker],
    );
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .contains("closed every connection before starting the VM"),
        "{r:#?}"
    );
    assert!(
        processes_matching(&marker).is_empty(),
        "the plugin outlived vmm"
    );
}

fn multi_vcpu(n: &str) {
    let r = run_vmm(
        &["--disable-sandbox", "--cpus", n],
        &bin("multi_io"),
        &["300"],
    );
    r.assert_success();
    let expected = format!("vcpus={n} writes={}", 300 * n.parse::<usize>().unwrap());
    assert!(r.stdout.contains(&expected), "{r:#?}");
    assert!(r.stdout.contains("wrong_ids=0"), "{r:#?}");
}

#[test]
fn two_vcpus_exit_concurrently() {
    multi_vcpu("2");
}

#[test]
fn four_vcpus_exit_concurrently() {
    multi_vcpu("4");
}

#[test]
fn c_plugin_compiled_against_header_runs() {
    let tmp = TempDir::new("c-smoke");
    let exe = compile_c(&repo_root().join("tests/c/smoke.c"), &tmp.0.join("smoke"));
    let r = run_vmm(&["--disable-sandbox"], &exe, &[]);
    r.assert_success();
    assert!(r.stdout.contains("C smoke test passed"), "{r:#?}");
}

#[test]
fn cli_help_and_parse_errors() {
    let out = std::process::Command::new(bin("vmm"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--plugin",
        "--plugin-args",
        "--params",
        "--cpus",
        "--disable-sandbox",
        "--plugin-mount",
        "--net",
    ] {
        assert!(help.contains(opt), "--help does not explain {opt}");
    }
    let out = std::process::Command::new(bin("vmm"))
        .args(["--plugin", "/bin/true", "--cpus", "zero"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(35));
    let out = std::process::Command::new(bin("vmm"))
        .args(["--plugin", "/bin/true", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(35));
}

#[test]
fn plugin_arguments_keep_spaces() {
    let r = run_vmm(
        &["--disable-sandbox", "-p", "first arg"],
        std::path::Path::new("/bin/echo"),
        &["second arg", "--third"],
    );
    r.assert_success();
    assert_eq!(r.stdout, "first arg second arg --third\n");
}

#[test]
fn missing_plugin_is_a_clear_error() {
    let r = run_vmm(
        &["--disable-sandbox"],
        std::path::Path::new("/nonexistent/plugin"),
        &[],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("cannot execute /nonexistent/plugin"),
        "{r:#?}"
    );
}
