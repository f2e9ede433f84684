//! Test plugin: the Rust SDK (`crosvm_plugin`) on real guests, one mode per
//! function group, mirroring the C plugins in `tests/c/capi_*.c`:
//!
//! * `sdk_api vm [tap]`: connections, queries (checked against /dev/kvm),
//!   net config, VM state, identity map, interrupts, argument errors,
//!   object ids shared across connections, start, the shutdown eventfd;
//! * `sdk_api vcpu`: every vcpu state set, MSRs, CPUID, capabilities, call
//!   hints and the register cache, observed by the guest where possible;
//! * `sdk_api io`: io events, memory (dirty log, read-only), sync and async
//!   reservations, irq events with resample, set_irq, MSI;
//! * `sdk_api pause` (3 vcpus): pause before start and while running.
//!
//! Every check failure is printed (`file:line: check failed: ...`); the
//! plugin exits 0 and prints `sdk_api MODE: all checks passed` only if none
//! failed. The process always ends with `exit`, never by dropping guest
//! memory or objects while vcpus may run.

use std::sync::atomic::{AtomicUsize, Ordering};

static FAILURES: AtomicUsize = AtomicUsize::new(0);

/// Records a failed check.
fn fail(file: &str, line: u32, what: &str) {
    FAILURES.fetch_add(1, Ordering::SeqCst);
    eprintln!("{file}:{line}: check failed: {what}");
}

/// `check!(cond)`: records a failure when `cond` is false.
macro_rules! check {
    ($cond:expr) => {
        if !$cond {
            $crate::fail(file!(), line!(), stringify!($cond));
        }
    };
}

/// `check_eq!(got, want)`: equality, printing both on failure.
macro_rules! check_eq {
    ($got:expr, $want:expr) => {{
        let (got, want) = (&$got, &$want);
        if got != want {
            $crate::fail(
                file!(),
                line!(),
                &format!(
                    "{} == {} ({:x?} != {:x?})",
                    stringify!($got),
                    stringify!($want),
                    got,
                    want
                ),
            );
        }
    }};
}

/// `ok!(result)`: the value, or `None` after recording the error.
macro_rules! ok {
    ($r:expr) => {
        match $r {
            Ok(v) => Some(v),
            Err(e) => {
                $crate::fail(file!(), line!(), &format!("{} failed: {e}", stringify!($r)));
                None
            }
        }
    };
}

/// `check_errno!(result, ERRNO)`: the call must fail with exactly `ERRNO`.
macro_rules! check_errno {
    ($r:expr, $errno:expr) => {
        match $r {
            Ok(_) => $crate::fail(
                file!(),
                line!(),
                &format!("{} succeeded, expected errno {}", stringify!($r), $errno),
            ),
            Err(e) if e.errno() == $errno => {}
            Err(e) => $crate::fail(
                file!(),
                line!(),
                &format!(
                    "{} failed with errno {} ({e}), expected {}",
                    stringify!($r),
                    e.errno(),
                    $errno
                ),
            ),
        }
    };
}

/// `require!(result)`: the value, or the plugin ends with status 1.
macro_rules! require {
    ($r:expr) => {
        match $r {
            Ok(v) => v,
            Err(e) => {
                $crate::fail(file!(), line!(), &format!("{} failed: {e}", stringify!($r)));
                eprintln!("giving up after a required step");
                std::process::exit(1);
            }
        }
    };
}

mod guest;
mod io;
mod pause;
mod vcpu;
mod vm;

/// Ends the plugin: status 0 only if no check failed.
fn finish(name: &str) -> ! {
    let failures = FAILURES.load(Ordering::SeqCst);
    if failures > 0 {
        eprintln!("{name}: {failures} check(s) failed");
        std::process::exit(1);
    }
    println!("{name}: all checks passed");
    std::process::exit(0);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("vm") => vm::run(args.get(1).map(String::as_str) == Some("tap")),
        Some("vcpu") => vcpu::run(),
        Some("io") => io::run(),
        Some("pause") => pause::run(),
        _ => {
            eprintln!("usage: sdk_api vm [tap] | vcpu | io | pause");
            std::process::exit(2);
        }
    }
}
