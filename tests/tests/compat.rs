//! Issue 9: crosvm-era C plugins (`tests/c/crosvm_*.c`, written only
//! against crosvm.h) run unchanged inside the jail, under a minimal policy
//! in that era's style (`tests/c/crosvm_policy/plugin.policy`, only what
//! `main` calls: the loader's start-up calls are vmm's to allow) and under
//! the built-in one, started the way crosvm was:
//! `vmm run -c 1 --seccomp-policy-dir DIR --plugin BIN`.

use std::path::PathBuf;
use std::process::Command;

use e2e_tests::{bin, compile_c, repo_root, run_command, TempDir, VmmRun};

fn policy_dir() -> String {
    repo_root()
        .join("tests/c/crosvm_policy")
        .to_string_lossy()
        .into_owned()
}

/// Compiles `tests/c/<name>.c`, then runs `vmm run -c 1 [POLICY] EXTRA
/// --plugin EXE [--plugin-args ARGS]` for both policies.
fn run_both(name: &str, extra: &[&str], plugin_args: &[&str]) -> Vec<VmmRun> {
    let tmp = TempDir::new(name);
    let source: PathBuf = repo_root().join("tests/c").join(format!("{name}.c"));
    let exe = compile_c(&source, &tmp.0.join(name));
    let dir = policy_dir();
    let mut runs = Vec::new();
    for policy in [&["--seccomp-policy-dir", dir.as_str()][..], &[][..]] {
        let mut cmd = Command::new(bin("vmm"));
        cmd.args(["run", "-c", "1"])
            .args(policy)
            .args(extra)
            .arg("--plugin")
            .arg(&exe);
        if !plugin_args.is_empty() {
            cmd.arg("--plugin-args").args(plugin_args);
        }
        let r = run_command(cmd);
        assert!(
            r.success() && r.stdout.contains(&format!("{name}: all checks passed")),
            "{name} with {policy:?}: {r:#?}"
        );
        runs.push(r);
    }
    runs
}

#[test]
fn crosvm_plugin_async_writes_ioeventfd_irqfd_dirty_log_jailed() {
    run_both("crosvm_devices", &[], &[]);
}

#[test]
fn crosvm_plugin_msr_cpuid_state_round_trips_and_eventfd_pause_jailed() {
    run_both("crosvm_state", &[], &[]);
}

#[test]
fn crosvm_plugin_tap_net_config_jailed() {
    if !e2e_tests::require_taps() {
        return;
    }
    run_both("crosvm_state", &e2e_tests::TAP_ARGS, &["tap"]);
}

#[test]
fn era_policy_without_start_up_calls_still_stops_forbidden_calls() {
    // The start-up allowance ends with the first request: a call the policy
    // does not list (here `eventfd2`, made after connecting) still stops
    // the plugin.
    let tmp = TempDir::new("era-policy");
    let dir = tmp.0.to_str().unwrap();
    let policy = std::fs::read_to_string(repo_root().join("tests/c/crosvm_policy/plugin.policy"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("eventfd2:"))
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    std::fs::write(tmp.0.join("plugin.policy"), policy).unwrap();
    let source = repo_root().join("tests/c/crosvm_state.c");
    let exe = compile_c(&source, &tmp.0.join("crosvm_state"));
    let mut cmd = Command::new(bin("vmm"));
    cmd.args(["run", "-c", "1", "--seccomp-policy-dir", dir, "--plugin"])
        .arg(&exe);
    let r = run_command(cmd);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .contains("the plugin was stopped by the seccomp filter: it called `eventfd2`"),
        "{r:#?}"
    );
}

#[test]
fn plugin_args_repeat_and_vmm_options_after_them_are_honoured() {
    // `evil argv` prints its argv; --disable-sandbox after the plugin's
    // arguments is vmm's (the plugin sees the host's pid namespace: its
    // pid is not 2), and `--` passes words that look like vmm options.
    let mut cmd = Command::new(bin("vmm"));
    cmd.args(["run", "--plugin"])
        .arg(bin("evil"))
        .args(["--plugin-args", "argv", "A", "--plugin-args", "B"])
        .args(["-c", "1", "--", "--cpus", "2"]);
    let r = run_command(cmd);
    r.assert_success();
    assert!(r.stdout.contains("|argv|A|B|--cpus|2\n"), "{r:#?}");
}
