//! The `longrun` example machine (the machine snapshot, migration and hot
//! restart are checked with): jailed, it prints `progress K` for every
//! round and a `result=` that matches an independent model of its guest
//! computation, so guest memory, registers and the plugin's device state
//! all took part.

use e2e_tests::{bin, run_vmm};

/// The guest's computation and the plugin's accumulator, re-implemented.
fn model(rounds: u32) -> u64 {
    let mut buf: Vec<u32> = (0..4096u32).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
    let (mut x, mut step, mut acc) = (0x1234_5678u32, 0u32, 0u64);
    for _ in 0..rounds {
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let idx = (x & 4095) as usize;
            buf[idx] ^= x.wrapping_add(step);
            step = step.wrapping_add(1);
            if step & 63 == 0 {
                acc =
                    (acc.rotate_left(7) ^ u64::from(buf[idx])).wrapping_mul(0x0000_0100_0000_01b3);
                x ^= (acc >> 16) as u32;
                if x == 0 {
                    x = 1;
                }
            }
        }
    }
    let fold = buf
        .iter()
        .fold(0u32, |f, v| f.rotate_left(5).wrapping_add(*v));
    acc ^ (u64::from(fold) << 32 | u64::from(x))
}

#[test]
fn longrun_reports_progress_and_the_modelled_result() {
    for rounds in [1u32, 4] {
        let r = run_vmm(&[], &bin("longrun"), &[&rounds.to_string()]);
        r.assert_success();
        let progress: Vec<&str> = r
            .stdout
            .lines()
            .filter(|l| l.starts_with("progress "))
            .collect();
        let want: Vec<String> = (1..=rounds).map(|k| format!("progress {k}")).collect();
        assert_eq!(progress, want, "{r:#?}");
        let last = r.stdout.lines().last().unwrap_or_default();
        assert_eq!(last, format!("result={:#018x}", model(rounds)), "{r:#?}");
        let ticks: u64 = r
            .stderr
            .split("longrun: ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no tick count: {r:#?}"));
        assert!(ticks > 0, "the PIT interrupted the computation: {r:#?}");
    }
}

#[test]
fn longrun_refuses_a_bad_round_count() {
    let r = run_vmm(&[], &bin("longrun"), &["0"]);
    assert_ne!(r.code, Some(0), "{r:#?}");
    assert!(r.stderr.contains("N must be"), "{r:#?}");
}
