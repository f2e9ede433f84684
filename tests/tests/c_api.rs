//! The C API (`crosvm.h` + `libcrosvm_plugin.so`) on real guests: C test
//! plugins from `tests/c/capi_*.c`, compiled with `cc` at test time, run
//! under `vmm --disable-sandbox`. Each plugin checks every result itself and
//! exits non-zero with a message on stderr on any failure.
//!
//! Function groups (docs/c-api.md §11) per plugin:
//! * `capi_vm`: connections, capability/CPU queries, network, VM state,
//!   identity map, interrupts (routing, set_irq), argument checks of
//!   reservations, hints and objects, start, the shutdown eventfd.
//! * `capi_vcpu`: every vcpu state set, MSRs, CPUID, vcpu capabilities,
//!   Hyper-V CPUID, call hints and the register cache.
//! * `capi_io`: io events, memory (dirty log, read-only), reservations
//!   (sync, async, unreserve), irq events with resample, set_irq, MSI.
//! * `capi_pause`: pause_vcpus (before start and while running), vcpu
//!   wait/resume with three vcpus, application processor MP state.
//! * `capi_restart` (`crosvm_ext.h`): io and irq events taken over by the
//!   plugin that replaces a crashed one, the write tracker's writes, and
//!   their bad arguments (NULL, unknown ids, ids of another kind).

use std::path::PathBuf;

use e2e_tests::{compile_c, repo_root, run_vmm, TempDir, VmmRun};

/// Compiles `tests/c/<name>.c` and runs it with `vmm_args`.
fn run_c(name: &str, vmm_args: &[&str], plugin_args: &[&str]) -> VmmRun {
    let tmp = TempDir::new(name);
    let source: PathBuf = repo_root().join("tests/c").join(format!("{name}.c"));
    let exe = compile_c(&source, &tmp.0.join(name));
    let mut args = vec!["--disable-sandbox"];
    args.extend_from_slice(vmm_args);
    run_vmm(&args, &exe, plugin_args)
}

fn assert_passed(r: &VmmRun, name: &str) {
    r.assert_success();
    assert!(
        r.stdout.contains(&format!("{name}: all checks passed")),
        "{r:#?}"
    );
}

#[test]
fn c_vm_level_functions() {
    // Ends with the guest's triple fault: the plugin exits 0 only once the
    // VMM has signalled the shutdown eventfd.
    let r = run_c("capi_vm", &[], &[]);
    assert_passed(&r, "capi_vm");
}

#[test]
fn c_net_config_with_a_real_tap() {
    if !e2e_tests::require_taps() {
        return;
    }
    let r = run_c("capi_vm", &e2e_tests::TAP_ARGS, &["tap"]);
    assert_passed(&r, "capi_vm");
}

#[test]
fn c_vcpu_state_msrs_cpuid_hints_and_register_cache() {
    // The plugin proves that a getter is answered from the register cache by
    // counting its vcpu thread's write() calls (one per request to the VMM),
    // which only the pipe channel makes: pin it. The cache itself does not
    // depend on the transport.
    let r = run_c("capi_vcpu", &["--no-fast-channel"], &[]);
    assert_passed(&r, "capi_vcpu");
}

#[test]
fn c_objects_reservations_and_interrupts() {
    let r = run_c("capi_io", &[], &[]);
    assert_passed(&r, "capi_io");
}

#[test]
fn c_pause_vcpus_before_start_and_while_running() {
    let r = run_c("capi_pause", &["--cpus", "3"], &[]);
    assert_passed(&r, "capi_pause");
}

#[test]
fn c_restart_takes_over_io_and_irq_events_and_refuses_bad_arguments() {
    // Generation 0 aborts at the guest's first exit; generation 1 takes
    // its objects over and finishes the guest.
    let r = run_c("capi_restart", &["--on-plugin-crash", "restart:1"], &[]);
    assert_passed(&r, "capi_restart");
    assert!(
        r.stderr
            .contains("capi_restart: generation 0 crashes at exit 1"),
        "{r:#?}"
    );
    assert!(r.stderr.contains("capi_restart: kind 2"), "{r:#?}");
}
