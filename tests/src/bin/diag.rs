//! Test plugin for the host's diagnostics (issue 14) on real guests:
//!
//! * `unreserved`: an overlapping reservation is refused (the host logs the
//!   reason at debug); the guest writes port 0x80 twice, reads port 0x81
//!   and MMIO 0x20000 (twice each, all unreserved), then writes what the
//!   MMIO read gave to the done port;
//! * `internal`: `Init` sets only `rip` (the vcpu stays in reset state, so
//!   it fetches from unbacked memory at `0xffff0000 + rip`): KVM reports an
//!   internal error, and the plugin's wait gets the shutdown;
//! * `stuck`: the plugin takes the done port's exit and never resumes it,
//!   for longer than the host's stuck warning delay;
//! * `barrier`: run with `--cpus 2`; only vcpu 0 is given its `Init`.
//!
//! Prints `diag: ...` lines the tests check; exits 1 on any surprise.

use std::time::Duration;

use crosvm_plugin::{Error, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::assemble16;

#[path = "../plugin_boot.rs"]
mod boot;

use boot::{CODE, DONE_PORT};
/// Longer than the host's stuck delay (5 s) plus its sampling period.
const LINGER: Duration = Duration::from_millis(6500);

fn fail(msg: String) -> ! {
    boot::fail("diag", msg)
}

fn ok<T>(what: &str, r: Result<T, Error>) -> T {
    boot::ok("diag", what, r)
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let code = match mode.as_str() {
        "unreserved" => assemble16(CODE, |a| {
            a.mov(al, 7)?;
            a.out(0x80, al)?;
            a.out(0x80, al)?;
            a.in_(al, 0x81)?;
            a.in_(al, 0x81)?;
            a.mov(ax, 0x2000)?;
            a.mov(ds, ax)?;
            a.mov(al, 0x55)?;
            a.mov(al, byte_ptr(0))?;
            a.mov(al, byte_ptr(0))?;
            a.mov(dx, u32::from(DONE_PORT))?;
            a.out(dx, al)?;
            a.hlt()
        }),
        "internal" | "stuck" | "barrier" => assemble16(CODE, |a| {
            a.mov(dx, u32::from(DONE_PORT))?;
            a.out(dx, al)?;
            a.hlt()
        }),
        _ => fail(format!(
            "usage: diag unreserved|internal|stuck|barrier (got {mode:?})"
        )),
    }
    .unwrap_or_else(|e| fail(format!("assembling: {e}")));

    let booted = boot::boot("diag", &code, mode == "unreserved");
    let mut v = booted.vcpu.lock();
    boot::expect_init("diag", v.wait());
    if mode == "internal" {
        // The mistake the old crate-level example made: only rip is set.
        let mut regs = ok("get_regs", v.get_regs());
        regs.rip = CODE;
        v.set_regs(&regs);
    } else {
        ok(
            "real mode",
            crosvm_plugin::machine::enter_real_mode(&mut v, CODE as u16, 0x8000),
        );
    }
    ok("resume", v.resume());
    if mode == "barrier" {
        // vcpu 1 never gets its Init: nothing runs, and the host must say
        // why.
        std::thread::sleep(LINGER);
        println!("diag: leaving with vcpu 1 never initialised");
        return;
    }
    match ok("wait", v.wait()) {
        VcpuEvent::Shutdown if mode == "internal" => println!("diag: shutdown after the failure"),
        VcpuEvent::Io { address, data, .. } if address == u64::from(DONE_PORT) => {
            println!("diag: guest wrote {:#x} to the done port", data[0]);
            if mode == "stuck" {
                // Never resumed: the host must say so.
                std::thread::sleep(LINGER);
                println!("diag: leaving without resume");
            }
        }
        other => fail(format!("unexpected event {other:?}")),
    }
    drop(v);
    boot::leave(booted)
}
