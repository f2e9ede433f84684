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
