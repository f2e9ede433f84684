//! `reset_probe`: fast reset's refusals (docs/protocol-extensions.md §7),
//! each printed as `reset_probe: WHAT: ERRNO` for the tests:
//! before `Start` (EINVAL), a reset without a snapshot (ENOENT), a page in
//! no memory region (EINVAL, and nothing changed), a vcpu inside KVM_RUN
//! (EBUSY); and that a reset copies back a page the plugin wrote itself
//! and puts back the x87/SSE state the plugin changed.

use crosvm_plugin::machine::enter_real_mode;
use crosvm_plugin::{AddressSpace, Connection, DirtyPages, Error, GuestRam, VcpuEvent};
use iced_x86::code_asm::*;

const NAME: &str = "reset_probe";
const CODE: u64 = 0x1000;
const PORT: u64 = 0x501;
const DATA: u64 = 0x2000;

fn fail(msg: String) -> ! {
    eprintln!("{NAME}: FAILED: {msg}");
    std::process::exit(1);
}

fn ok<T>(what: &str, r: Result<T, Error>) -> T {
    r.unwrap_or_else(|e| fail(format!("{what}: {e}")))
}

/// Prints the errno a refused call got; an accepted one fails the probe.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, Error>) {
    match r {
        Ok(v) => fail(format!("{what} was accepted: {v:?}")),
        Err(e) => {
            let n = e
                .host_errno()
                .unwrap_or_else(|| fail(format!("{what}: {e}")));
            println!("{NAME}: {what}: {}", nix::errno::Errno::from_raw(n));
        }
    }
}

fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap_or_else(|e| fail(e.to_string()));
    let build = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        let mut spin = a.create_label();
        a.mov(dx, PORT as u32)?;
        a.out(dx, al)?;
        a.set_label(&mut spin)?;
        a.jmp(spin)?;
        Ok(())
    };
    build(&mut a).unwrap_or_else(|e| fail(e.to_string()));
    a.assemble(CODE).unwrap_or_else(|e| fail(e.to_string()))
}

fn main() {
    let conn = ok("connect", Connection::from_env());
    let ram = ok("guest RAM", GuestRam::new(0x10000));
    ok("code", ram.write(CODE, &guest()));
    ok("data", ram.write(DATA, &0x1234_5678u32.to_le_bytes()));
    let mem = ok("memory", ram.register(&conn, 0));
    ok("reserve", conn.reserve_range(AddressSpace::IoPort, PORT, 1));
    refused("snapshot before start", conn.snapshot_in_memory());
    refused("reset before start", conn.reset(&[]));
    let vcpu = ok("vcpu", conn.vcpu(0));
    ok("start", conn.start());
    let mut v = vcpu.lock();
    match ok("first wait", v.wait()) {
        VcpuEvent::Init => ok("real mode", enter_real_mode(&mut v, CODE as u16, 0x8000)),
        other => fail(format!("first event is {other:?}")),
    }
    ok("resume init", v.resume());
    match ok("second wait", v.wait()) {
        VcpuEvent::Io { address: PORT, .. } => {}
        other => fail(format!("second event is {other:?}")),
    }
    refused("reset without a snapshot", conn.reset(&[]));
    let bytes = ok("snapshot", conn.snapshot_in_memory());
    println!("{NAME}: snapshot: {bytes} bytes");
    let mut dirty = DirtyPages::new();
    ok("plugin write", dirty.write(&ram, 0, DATA, &[0xee; 8]));
    let mut pages = dirty.take();
    pages.push(0x4000_0000);
    refused("reset with a page outside guest memory", conn.reset(&pages));
    if ok("read", ram.read_u32(DATA)) != 0xeeee_eeee {
        fail("a refused reset changed guest memory".into());
    }
    pages.pop();
    // The x87/SSE state changed after the snapshot comes back too (the
    // reset sets it from the XSAVE image, not with KVM_SET_FPU).
    let fpu = ok("get fpu", v.get_fpu());
    let mut changed = fpu;
    changed.fcw = 0x027f;
    changed.xmm[0] = [0xab; 16];
    changed.xmm[15] = [0x5c; 16];
    // An 80-bit register: the upper six bytes are not state.
    changed.fpr[0] = [
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0, 0, 0, 0, 0, 0,
    ];
    ok("set fpu", v.set_fpu(&changed));
    let now = ok("get fpu", v.get_fpu());
    if (now.fcw, now.xmm, now.fpr[0]) != (0x027f, changed.xmm, changed.fpr[0]) {
        fail(format!(
            "the changed FPU state did not take: fcw {:#x} xmm0 {:x?} st0 {:x?}",
            now.fcw, now.xmm[0], now.fpr[0]
        ));
    }
    let copied = ok("reset", conn.reset(&pages));
    let back = ok("get fpu", v.get_fpu());
    if (back.fcw, back.xmm, back.fpr) != (fpu.fcw, fpu.xmm, fpu.fpr) {
        fail(format!(
            "the FPU state changed after the snapshot survived the reset: fcw {:#x} xmm0 {:x?}",
            back.fcw, back.xmm[0]
        ));
    }
    println!("{NAME}: reset: the FPU state is back");
    let back = ok("read", ram.read_u32(DATA));
    if back != 0x1234_5678 {
        fail(format!("the plugin's write survived the reset: {back:#x}"));
    }
    println!("{NAME}: reset: {copied} pages, the plugin's page is back");
    ok("resume", v.resume());
    // The guest spins inside KVM_RUN now.
    std::thread::sleep(std::time::Duration::from_millis(50));
    refused("snapshot while the vcpu runs", conn.snapshot_in_memory());
    refused("reset while the vcpu runs", conn.reset(&[]));
    println!("{NAME}: done");
    // The guest still runs from this memory: let vmm tear the VM down.
    std::mem::forget(v);
    std::mem::forget((mem, vcpu, ram, conn));
    std::process::exit(0);
}
