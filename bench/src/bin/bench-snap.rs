//! The snapshot benchmark's plugin (`vmm-bench --only snapshot`,
//! `bench/src/snapshot.rs`): `bench-snap SIZE_MIB FILL`.
//!
//! Sets up `SIZE_MIB` MiB of guest RAM at guest address 0 and fills it
//! before `Start` according to `FILL`:
//! - `full`: every byte of every page non-zero (the worst case: nothing is
//!   skipped as sparse);
//! - `half`: every page is touched (allocated in the memfd, so the writer
//!   must read and scan it) and a pseudo-random half of them holds data,
//!   the other half zeros;
//! - `restore`: nothing (run under `vmm --restore`: the host loads memory).
//!
//! The guest (16-bit real mode) writes to `DONE_PORT` in a loop, forever
//! (an exit every few instructions: on this nested KVM real-mode code is
//! emulated, so a long count-down between exits would delay the first exit
//! after a restore by up to a second). On the first port exit the
//! plugin prints `bench-snap: running exit_ns=T` (CLOCK_MONOTONIC) and
//! keeps resuming; under `restore` it prints `RESULT exit_ns=T
//! restoring=B` for the first exit after the restore and exits 0.

use std::io::Write;

use crosvm_plugin::{AddressSpace, Connection, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{enter_real_mode, GuestRam};
use vmm_bench::guest::{CODE, DONE_PORT};

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-snap: {msg}");
    std::process::exit(1);
}

const PAGE: usize = 4096;
/// Bytes written per `GuestRam::write` while filling.
const CHUNK: usize = 1 << 20;

/// Whether page `index` holds data in the `half` fill (a fixed hash of
/// the index: the same pages every run).
pub fn half_has_data(index: u64) -> bool {
    (index.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 63) == 1
}

/// Fills `ram`; returns the pages that hold data.
fn fill(ram: &GuestRam, half: bool) -> u64 {
    let mut chunk = vec![0u8; CHUNK];
    let mut data = 0u64;
    let mut at = 0u64;
    while at < ram.size() {
        let n = (CHUNK as u64).min(ram.size() - at) as usize;
        for (i, page) in chunk[..n].chunks_mut(PAGE).enumerate() {
            let index = at / PAGE as u64 + i as u64;
            if half && !half_has_data(index) {
                page.fill(0);
                continue;
            }
            data += 1;
            // Non-zero everywhere, different per page.
            let seed = (index as u8) | 1;
            for (j, b) in page.iter_mut().enumerate() {
                *b = seed.wrapping_add(j as u8) | 0x80;
            }
        }
        ram.write(at, &chunk[..n])
            .unwrap_or_else(|e| fail(&format!("fill at {at:#x}: {e}")));
        at += n as u64;
    }
    data
}

fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).expect("16-bit assembler");
    let build = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        let mut top = a.create_label();
        a.mov(dx, u32::from(DONE_PORT))?;
        a.set_label(&mut top)?;
        a.out(dx, al)?;
        a.inc(al)?;
        a.jmp(top)?;
        Ok(())
    };
    build(&mut a).expect("assemble the guest");
    a.assemble(CODE).expect("assemble the guest")
}

fn main() {
    let usage = "usage: bench-snap SIZE_MIB full|half|restore";
    let mut args = std::env::args().skip(1);
    let mib: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| fail(usage));
    let mode = args.next().unwrap_or_else(|| fail(usage));
    if !["full", "half", "restore"].contains(&mode.as_str()) {
        fail(usage);
    }
    let conn = Connection::from_env().unwrap_or_else(|e| fail(&format!("connect: {e}")));
    let ram = GuestRam::new(mib << 20).unwrap_or_else(|e| fail(&format!("ram: {e}")));
    let restoring = conn
        .restore_state()
        .unwrap_or_else(|e| fail(&format!("restore state: {e}")))
        .is_some();
    if restoring != (mode == "restore") {
        fail(&format!("mode {mode} but restoring={restoring}"));
    }
    if !restoring {
        let data = fill(&ram, mode == "half");
        ram.write(CODE, &guest())
            .unwrap_or_else(|e| fail(&format!("code: {e}")));
        eprintln!(
            "bench-snap: {data} of {} pages hold data",
            ram.size() / 4096
        );
    }
    let _mem = ram
        .map(&conn)
        .unwrap_or_else(|e| fail(&format!("map: {e}")));
    conn.reserve_range(AddressSpace::IoPort, u64::from(DONE_PORT), 1)
        .unwrap_or_else(|e| fail(&format!("reserve: {e}")));
    let vcpu = conn.vcpu(0).unwrap_or_else(|e| fail(&format!("vcpu: {e}")));
    conn.start()
        .unwrap_or_else(|e| fail(&format!("start: {e}")));
    let mut v = vcpu.lock();
    let mut announced = false;
    loop {
        match v.wait().unwrap_or_else(|e| fail(&format!("wait: {e}"))) {
            VcpuEvent::Init => enter_real_mode(&mut v, CODE as u16, 0x8000)
                .unwrap_or_else(|e| fail(&format!("{e}"))),
            VcpuEvent::Io { .. } if !announced => {
                let now = monotonic_ns();
                announced = true;
                if restoring {
                    println!("RESULT exit_ns={now} restoring={restoring}");
                    let _ = std::io::stdout().flush();
                    std::process::exit(0);
                }
                println!("bench-snap: running exit_ns={now}");
                let _ = std::io::stdout().flush();
            }
            VcpuEvent::Io { .. } => {}
            VcpuEvent::Shutdown => std::process::exit(0),
            other => fail(&format!("unexpected event {other:?}")),
        }
        v.resume().unwrap_or_else(|e| fail(&format!("resume: {e}")));
    }
}
