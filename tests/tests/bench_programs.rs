//! The benchmark's own programs work: `bench-jail-floor` (the plugin in
//! vmm's jail and nothing else, bench/src/bin/bench-jail-floor.rs) really
//! starts the plugin jailed, counts its CPU, and refuses what it does not
//! know. (The numbers themselves are the benchmark's, never asserted.)

use std::process::Command;

use e2e_tests::{bin, require};

fn jail_floor(without: &str, starts: &str) -> (Option<i32>, String, String) {
    let out = Command::new(bin("bench-jail-floor"))
        .arg(starts)
        .arg(bin("bench-plugin"))
        .args(["trivial", "1"])
        .env("JAIL_FLOOR_WITHOUT", without)
        .output()
        .expect("run bench-jail-floor");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each start runs the plugin to its connect, which fails (it gets no
/// socket): one such message per start, plus the warm-up start.
#[test]
fn the_jail_floor_runs_the_plugin_jailed_each_time_and_reports_its_cpu() {
    if !require(
        nix::unistd::geteuid().is_root(),
        "root (vmm's jail as root)",
    ) {
        return;
    }
    for without in ["", "mounts", "seccomp", "caps", "mounts,namespaces"] {
        let (code, stdout, stderr) = jail_floor(without, "3");
        assert_eq!(code, Some(0), "without={without:?}: {stdout}{stderr}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with("JAILFLOOR starts=3 cpu_ms="))
            .unwrap_or_else(|| panic!("without={without:?}: no JAILFLOOR line in {stdout:?}"));
        let ms: f64 = line.rsplit('=').next().unwrap().parse().expect("cpu_ms");
        assert!(ms > 0.0, "without={without:?}: {line}");
        let connects = stderr
            .matches("the CROSVM_SOCKET environment variable is not set")
            .count();
        assert_eq!(connects, 4, "without={without:?}: {stderr}");
    }
}

#[test]
fn the_jail_floor_refuses_an_unknown_part_naming_it() {
    let (code, stdout, stderr) = jail_floor("mounts,everything", "1");
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains("unknown part \"everything\""),
        "{stdout}{stderr}"
    );
    let (code, _, stderr) = jail_floor("namespaces", "1");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("namespaces needs mounts too"), "{stderr}");
}
