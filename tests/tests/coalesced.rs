//! Coalesced write ranges (docs/protocol-extensions.md §4) on real KVM,
//! with the plugin jailed (the default): a guest loop of 1,000,000 writes to
//! a coalesced port or MMIO dword, interleaved with synchronous exits, every
//! write accounted for and in order, before each synchronous exit that
//! follows it; the tail that only the host's timer drain can deliver; with
//! the other core idle and busy; and the errnos of bad reservations.

use std::process::{Child, Command};

use e2e_tests::{bin, run_vmm};

const WRITES: &str = "1000000";

/// A process spinning on a CPU for as long as it lives (killed on drop, by
/// its own pid).
struct Spinner(Child);

impl Spinner {
    fn start() -> Spinner {
        Spinner(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("start a spinning shell"),
        )
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn check(mode: &str) {
    let r = run_vmm(&[], &bin("coalesced"), &[mode, WRITES]);
    r.assert_success();
    assert!(r.stderr.contains("jailed"), "{r:#?}");
    assert!(
        r.stdout.contains(&format!(
            "writes=1000005 expected=1000005 sync_exits={} ",
            1_000_000 / 997
        )),
        "{r:#?}"
    );
    assert!(r.stdout.contains("problems=0"), "{r:#?}");
}

#[test]
fn a_million_port_writes_arrive_in_order_idle() {
    check("pio");
}

#[test]
fn a_million_mmio_writes_arrive_in_order_idle() {
    check("mmio");
}

#[test]
fn a_million_port_writes_arrive_in_order_with_the_other_core_busy() {
    let _spin = Spinner::start();
    check("pio");
}

#[test]
fn a_million_mmio_writes_arrive_in_order_with_the_other_core_busy() {
    let _spin = Spinner::start();
    check("mmio");
}

#[test]
fn writes_arrive_in_batches_over_the_pipes_too() {
    let r = run_vmm(
        &["--no-fast-channel"],
        &bin("coalesced"),
        &["pio", "100000"],
    );
    r.assert_success();
    assert!(r.stderr.contains("on pipe channels"), "{r:#?}");
    assert!(r.stdout.contains("writes=100005 expected=100005"), "{r:#?}");
    assert!(r.stdout.contains("problems=0"), "{r:#?}");
}

#[test]
fn bad_coalesced_reservations_are_errnos() {
    // Overlaps (with coalesced and plain ranges, ioeventfds either way
    // round), zero length, too long, past port 0xffff, wrapping, too many.
    let r = run_vmm(&[], &bin("coalesced"), &["errors"]);
    r.assert_success();
    assert!(r.stdout.contains("errors: ok"), "{r:#?}");
}
