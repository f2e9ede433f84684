//! Issue-3 machines and host features: the PC timer, pausing many vcpus,
//! 32-vcpu machines (more descriptors than the old client took), tap devices.

use e2e_tests::{bin, run_vmm};

#[test]
fn pc_timer_counts_pit_interrupts() {
    let r = run_vmm(&["--disable-sandbox"], &bin("pc-timer"), &["30"]);
    r.assert_success();
    assert!(
        r.stdout.contains("the guest counted 30 timer interrupts"),
        "{r:#?}"
    );
    assert!(
        r.stdout.contains("PIT channel 0: mode 2, count 1193"),
        "{r:#?}"
    );
}

#[test]
fn multi_vcpu_pause_and_resume_four() {
    let r = run_vmm(
        &["--disable-sandbox", "--cpus", "4"],
        &bin("multi-vcpu"),
        &["3"],
    );
    r.assert_success();
    assert!(
        r.stdout.contains("round 3: all 4 vcpus paused and resumed"),
        "{r:#?}"
    );
}

#[test]
fn thirty_two_vcpus_pause_and_resume() {
    let r = run_vmm(
        &["--disable-sandbox", "--cpus", "32"],
        &bin("multi-vcpu"),
        &["2"],
    );
    r.assert_success();
    assert!(
        r.stdout
            .contains("round 2: all 32 vcpus paused and resumed"),
        "{r:#?}"
    );
}

#[test]
fn thirty_two_vcpus_all_take_io_exits() {
    let r = run_vmm(
        &["--disable-sandbox", "--cpus", "32"],
        &bin("multi_io"),
        &["50"],
    );
    r.assert_success();
    assert!(r.stdout.contains("vcpus=32 writes=1600"), "{r:#?}");
    assert!(r.stdout.contains("wrong_ids=0"), "{r:#?}");
}

#[test]
fn more_vcpus_than_kvm_allows_is_refused() {
    let r = run_vmm(
        &["--disable-sandbox", "--cpus", "100000"],
        &bin("hello"),
        &[],
    );
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("vcpus requested but KVM allows at most"),
        "{r:#?}"
    );
}

#[test]
fn net_config_without_tap_is_enodata() {
    let r = run_vmm(&["--disable-sandbox"], &bin("netcheck"), &[]);
    r.assert_success();
    assert!(r.stdout.contains("net errno=61"), "{r:#?}");
}

#[test]
fn net_config_describes_a_real_tap() {
    if !e2e_tests::require_taps() {
        return;
    }
    let r = run_vmm(
        &[&["--disable-sandbox"][..], &e2e_tests::TAP_ARGS[..]].concat(),
        &bin("netcheck"),
        &[],
    );
    r.assert_success();
    assert!(
        r.stdout
            .contains("net ip=100.115.92.5 mask=255.255.255.252 mac=de:21:e8:47:6b:6a tap_ok=true"),
        "{r:#?}"
    );
}

#[test]
fn incomplete_net_triple_is_an_error() {
    let r = run_vmm(
        &["--disable-sandbox", "--host-ip", "100.115.92.5"],
        &bin("netcheck"),
        &[],
    );
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("--netmask is missing"), "{r:#?}");
}
