//! The example machines run real guests under `vmm` on /dev/kvm.

use e2e_tests::{bin, run_vmm};

#[test]
fn hello_prints_from_the_guest() {
    let r = run_vmm(&["--disable-sandbox"], &bin("hello"), &[]);
    r.assert_success();
    assert_eq!(r.stdout, "Hello from the guest\n");
}

#[test]
fn adder_checks_the_guest_sum() {
    let r = run_vmm(&["--disable-sandbox"], &bin("adder"), &["1000", "337"]);
    r.assert_success();
    assert!(r.stdout.contains("1000 + 337 = 1337"), "{r:#?}");
}

#[test]
fn adder_in_c_checks_the_guest_sum() {
    let r = run_vmm(
        &["--disable-sandbox"],
        &bin("adder_c"),
        &["4000000000", "294967295"],
    );
    r.assert_success();
    assert!(
        r.stdout.contains("4000000000 + 294967295 = 4294967295"),
        "{r:#?}"
    );
}
