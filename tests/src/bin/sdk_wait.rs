//! Test plugin for the SDK's wait() diagnostics on real guests:
//!
//! * `shutdown`: the guest halts with interrupts off (no exit ever reaches
//!   the plugin); the plugin says `running` and blocks in `wait()` (no
//!   watcher thread); the test then stops `vmm` with SIGTERM and the wait
//!   must return `VcpuEvent::Shutdown`;
//! * `owed`: a second `wait()` at `Init` must fail naming the pending
//!   event, and an overlapping reservation must name the request.
//!
//! * `protected` / `long`: the SDK's mode helpers put the vcpu into 32-bit
//!   protected or 64-bit long mode; the guest computes a value only that
//!   mode gives and writes it to the done port.
//!
//! Prints `sdk_wait: ...` lines the tests check; exits 1 on any surprise.

use crosvm_plugin::{machine, Error, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::assemble16;

#[path = "../plugin_boot.rs"]
mod boot;

use boot::{CODE, DONE_PORT};

fn fail(msg: String) -> ! {
    boot::fail("sdk_wait", msg)
}

fn ok<T>(what: &str, r: Result<T, Error>) -> T {
    boot::ok("sdk_wait", what, r)
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let code = match mode.as_str() {
        // Halted in the kernel for good: nothing reaches the plugin.
        "shutdown" => assemble16(CODE, |a| {
            let mut top = a.create_label();
            a.cli()?;
            a.set_label(&mut top)?;
            a.hlt()?;
            a.jmp(top)
        }),
        "owed" => assemble16(CODE, |a| {
            a.mov(dx, u32::from(DONE_PORT))?;
            a.out(dx, al)?;
            a.hlt()
        }),
        "protected" | "long" => {
            let bits = if mode == "long" { 64 } else { 32 };
            (|| {
                let mut a = CodeAssembler::new(bits)?;
                if bits == 64 {
                    // 0x1_0000_0002 >> 32 == 1: needs 64-bit registers.
                    a.mov(rax, 0x1_0000_0002u64)?;
                    a.shr(rax, 32)?;
                    // A store and load through the identity-mapped pages.
                    a.mov(rbx, 0x3000u64)?;
                    a.mov(qword_ptr(rbx), rax)?;
                    a.mov(rax, qword_ptr(rbx))?;
                } else {
                    a.mov(eax, 0x1234_5678u32)?;
                }
                a.mov(dx, u32::from(DONE_PORT))?;
                a.out(dx, eax)?;
                a.hlt()?;
                a.assemble(CODE)
            })()
            .map_err(plugin_examples::ExampleError::from)
        }
        _ => fail(format!(
            "usage: sdk_wait shutdown|owed|protected|long (got {mode:?})"
        )),
    }
    .unwrap_or_else(|e| fail(format!("assembling: {e}")));

    let booted = boot::boot("sdk_wait", &code, mode == "owed");
    let mut v = booted.vcpu.lock();
    boot::expect_init("sdk_wait", v.wait());
    if mode == "owed" {
        match v.wait() {
            Err(e @ Error::ResumeOwed { .. }) => println!("sdk_wait: {e}"),
            other => fail(format!("second wait gave {other:?}")),
        }
    }
    let setup = match mode.as_str() {
        "protected" => {
            machine::enter_protected_mode(&mut v, &booted.ram, 0, 0x8000, CODE as u32, 0x7000)
        }
        "long" => machine::enter_long_mode(&mut v, &booted.ram, 0, 0x8000, CODE, 0x7000),
        _ => machine::enter_real_mode(&mut v, CODE as u16, 0x8000),
    };
    ok("mode set-up", setup);
    ok("resume", v.resume());
    if mode == "shutdown" {
        use std::io::Write;
        println!("sdk_wait: running");
        let _ = std::io::stdout().flush();
    }
    match ok("wait", v.wait()) {
        VcpuEvent::Shutdown if mode == "shutdown" => {
            println!("sdk_wait: shutdown event reached vcpu 0");
            // Sticky, and needs no resume.
            if ok("wait again", v.wait()) != VcpuEvent::Shutdown {
                fail("a second wait after shutdown was not Shutdown".into());
            }
        }
        VcpuEvent::Io { address, .. } if mode == "owed" && address == u64::from(DONE_PORT) => {
            println!("sdk_wait: guest reached the done port");
        }
        VcpuEvent::Io { address, data, .. } if address == u64::from(DONE_PORT) => {
            let value = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
            let expected = if mode == "long" { 1 } else { 0x1234_5678 };
            if value != expected {
                fail(format!(
                    "{mode} mode guest wrote {value:#x}, expected {expected:#x}"
                ));
            }
            let sregs = ok("get_sregs", v.get_sregs());
            let long = sregs.efer & (1 << 10) != 0 && sregs.cs.l == 1;
            let protected = sregs.cr0 & 1 == 1 && sregs.cs.db == 1;
            if (mode == "long" && !long) || (mode == "protected" && (!protected || long)) {
                fail(format!(
                    "{mode}: cr0 {:#x} efer {:#x} cs.l {} cs.db {}",
                    sregs.cr0, sregs.efer, sregs.cs.l, sregs.cs.db
                ));
            }
            println!("sdk_wait: {mode} mode guest wrote {value:#x}");
            ok("resume", v.resume());
        }
        other => fail(format!("unexpected event {other:?}")),
    }
    drop(v);
    boot::leave(booted)
}
