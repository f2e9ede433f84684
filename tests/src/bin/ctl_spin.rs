//! Test plugin for the control socket (tests/tests/control.rs): a guest
//! that never ends on its own and makes visible progress, one port exit
//! after another (`out` to the done port in a loop), each resumed by the
//! plugin. vmm's `status` counts them per vcpu.
//!
//! Argument: `DELAY_MS` (default 0), how long to wait before starting the
//! VM (so tests can send commands while it is `starting`). Prints
//! `ctl_spin: running` once the vcpu ran; exits 0 when vmm shuts the VM
//! down (the vcpu's `Shutdown` event), 1 on any surprise.

use std::io::Write;

use crosvm_plugin::{machine, Error, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::assemble16;

#[path = "../plugin_boot.rs"]
mod boot;

use boot::{CODE, DONE_PORT};

fn ok<T>(what: &str, r: Result<T, Error>) -> T {
    boot::ok("ctl_spin", what, r)
}

fn main() {
    let delay: u64 = match std::env::args().nth(1) {
        None => 0,
        Some(a) => a.parse().unwrap_or_else(|_| {
            boot::fail(
                "ctl_spin",
                format!("usage: ctl_spin [DELAY_MS] (got {a:?})"),
            )
        }),
    };
    let code = assemble16(CODE, |a| {
        let mut top = a.create_label();
        a.mov(dx, u32::from(DONE_PORT))?;
        a.set_label(&mut top)?;
        a.out(dx, al)?;
        a.inc(al)?;
        a.jmp(top)
    })
    .unwrap_or_else(|e| boot::fail("ctl_spin", format!("assembling: {e}")));
    std::thread::sleep(std::time::Duration::from_millis(delay));
    let booted = boot::boot("ctl_spin", &code, false);
    let mut v = booted.vcpu.lock();
    boot::expect_init("ctl_spin", v.wait());
    ok(
        "real mode",
        machine::enter_real_mode(&mut v, CODE as u16, 0x8000),
    );
    ok("resume", v.resume());
    let mut announced = false;
    loop {
        match ok("wait", v.wait()) {
            VcpuEvent::Io { address, .. } if address == u64::from(DONE_PORT) => {
                if !announced {
                    announced = true;
                    println!("ctl_spin: running");
                    let _ = std::io::stdout().flush();
                }
                ok("resume", v.resume());
            }
            VcpuEvent::Shutdown => {
                println!("ctl_spin: shutdown");
                let _ = std::io::stdout().flush();
                break;
            }
            other => boot::fail("ctl_spin", format!("unexpected event {other:?}")),
        }
    }
    drop(v);
    boot::leave(booted)
}
