//! Fast reset (issue 12, docs/protocol-extensions.md §7), end to end and
//! jailed: the `fuzz-reset` harness resets its machine after every input
//! and verifies each reset (registers back at the snapshot, every scratch
//! page and the input page as at snapshot time, the next input hashed
//! right), and `reset_probe` makes the requests the host must refuse.

use std::time::Duration;

use e2e_tests::{bin, run_vmm, run_vmm_with_guard};

/// The `resets=N` count of a fuzz-reset run.
fn resets(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("resets="))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resets= line in {stdout:?}"))
}

/// The bar: 100,000 resets, each verified by the plugin (a
/// mismatch ends it with status 1). About 25 s on the nested development
/// machine with an idle second core; the guard is generous for a busy one.
#[test]
fn fuzz_reset_100k_verified_resets_jailed() {
    let r = run_vmm_with_guard(
        &[],
        &bin("fuzz-reset"),
        &["100001", "1"],
        Duration::from_secs(300),
    );
    r.assert_success();
    assert_eq!(resets(&r.stdout), 100_000, "{r:#?}");
    assert!(r.stderr.contains("jailed"), "{r:#?}");
}

/// Many dirty pages per run: 16 and all 256 scratch pages come back.
#[test]
fn fuzz_reset_restores_many_dirty_pages() {
    for pages in ["16", "256"] {
        let r = run_vmm(&[], &bin("fuzz-reset"), &["300", pages]);
        r.assert_success();
        assert_eq!(resets(&r.stdout), 299, "{r:#?}");
        assert!(r.stdout.contains(&format!("pages={pages} ")), "{r:#?}");
    }
}

/// Bad arguments are a usage error, nothing runs.
#[test]
fn fuzz_reset_refuses_bad_arguments() {
    for args in [&["100", "0"][..], &["100", "257"], &["1"], &["x"]] {
        let r = run_vmm(&[], &bin("fuzz-reset"), args);
        assert!(!r.success(), "{args:?}: {r:#?}");
        assert!(!r.stdout.contains("resets="), "{args:?}: {r:#?}");
    }
}

/// Before Start: EINVAL; no snapshot: ENOENT; a page outside guest memory:
/// EINVAL and guest memory unchanged; a vcpu inside KVM_RUN: EBUSY. A
/// reset copies back the page the plugin wrote.
#[test]
fn reset_refusals_and_plugin_pages() {
    let r = run_vmm(&[], &bin("reset_probe"), &[]);
    r.assert_success();
    for line in [
        "reset_probe: snapshot before start: EINVAL",
        "reset_probe: reset before start: EINVAL",
        "reset_probe: reset without a snapshot: ENOENT",
        "reset_probe: snapshot: 65536 bytes",
        "reset_probe: reset with a page outside guest memory: EINVAL",
        "reset_probe: reset: the FPU state is back",
        "reset_probe: reset: 1 pages, the plugin's page is back",
        "reset_probe: snapshot while the vcpu runs: EBUSY",
        "reset_probe: reset while the vcpu runs: EBUSY",
        "reset_probe: done",
    ] {
        assert!(r.stdout.contains(line), "missing {line:?}: {r:#?}");
    }
}
