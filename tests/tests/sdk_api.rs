//! The Rust SDK (`crosvm_plugin`) on real guests: the `sdk_api` test plugin
//! (`tests/src/bin/sdk_api/`) run under `vmm --disable-sandbox`, one mode per
//! function group, mirroring the C plugins of `c_api.rs`. The plugin checks
//! every result itself and exits non-zero with messages on any failure.

use e2e_tests::{bin, run_vmm, VmmRun};

fn run_mode(mode: &str, vmm_args: &[&str], extra: &[&str]) -> VmmRun {
    let mut args = vec!["--disable-sandbox"];
    args.extend_from_slice(vmm_args);
    let mut plugin_args = vec![mode];
    plugin_args.extend_from_slice(extra);
    let r = run_vmm(&args, &bin("sdk_api"), &plugin_args);
    r.assert_success();
    assert!(
        r.stdout
            .contains(&format!("sdk_api {mode}: all checks passed")),
        "{r:#?}"
    );
    r
}

#[test]
fn sdk_vm_level_functions() {
    // Ends with the guest's triple fault: the plugin exits 0 only once the
    // VMM has signalled the shutdown eventfd.
    run_mode("vm", &[], &[]);
}

#[test]
fn sdk_net_config_with_a_real_tap() {
    if !e2e_tests::require_taps() {
        return;
    }
    run_mode("vm", &e2e_tests::TAP_ARGS, &["tap"]);
}

#[test]
fn sdk_vcpu_state_msrs_cpuid_hints_and_register_cache() {
    // Pipes pinned: the cache checks count write() calls (see c_api.rs).
    run_mode("vcpu", &["--no-fast-channel"], &[]);
}

#[test]
fn sdk_objects_reservations_and_interrupts() {
    run_mode("io", &[], &[]);
}

#[test]
fn sdk_pause_vcpus_before_start_and_while_running() {
    run_mode("pause", &["--cpus", "3"], &[]);
}
