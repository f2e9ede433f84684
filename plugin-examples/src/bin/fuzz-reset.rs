//! `fuzz-reset`: a tiny snapshot-fuzzing harness on fast reset
//! (docs/protocol-extensions.md §7).
//!
//! The guest (32-bit protected mode, paging off) announces it is ready
//! (`out READY_PORT`): the plugin takes the in-memory snapshot there. The
//! guest then hashes the 16 input dwords the plugin wrote into guest memory
//! (FNV-1a style, over dwords), writes `hash + i` into the first dword of
//! each of `PAGES` scratch pages, and reports the hash (`out DONE_PORT`).
//! The plugin checks the hash against its Rust model and the first and
//! last scratch page, resets the machine (`Connection::reset` with the
//! pages it wrote itself: the input page), checks the reset (the vcpu's
//! registers equal those at the snapshot, every scratch page the guest
//! wrote holds its snapshot-time pattern again, the input reads back as at
//! snapshot time), writes the next input and resumes: the guest starts
//! over from the snapshot point.
//!
//! `fuzz-reset ITERATIONS [PAGES]` (PAGES 1..=256, default 1) runs
//! ITERATIONS inputs (each followed by a reset) and prints
//! `resets=N pages=P seconds=S resets_per_s=R`. Any mismatch ends it with
//! status 1 naming the iteration and what differed.

use std::time::Instant;

use crosvm_plugin::machine::{enter_protected_mode, SYSTEM_TABLES_SIZE};
use crosvm_plugin::{AddressSpace, Connection, DirtyPages, GuestRam, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{exit_with, require_vcpus, ExampleError, Result};

const READY_PORT: u64 = 0x600;
const DONE_PORT: u64 = 0x604;
const MEM_SIZE: u64 = 0x20_0000;
const CODE: u64 = 0x1000;
const TABLES: u64 = 0x4000;
/// The input page: dword 0 = scratch pages to write (set once, before the
/// snapshot), dwords 2..18 = the input the plugin writes per run.
const INPUT: u64 = 0x8000;
const INPUT_DATA: u64 = INPUT + 8;
const INPUT_DWORDS: usize = 16;
const STACK: u32 = 0x1_0000;
const SCRATCH: u64 = 0x10_0000;
const PAGE: u64 = 0x1000;
const MAX_PAGES: u32 = 256;
// The system tables end before the input page.
const _: () = assert!(TABLES + SYSTEM_TABLES_SIZE <= INPUT);

/// The guest's computation, in Rust.
fn model(input: &[u32; INPUT_DWORDS]) -> u32 {
    input
        .iter()
        .fold(0x811c_9dc5u32, |h, &d| (h ^ d).wrapping_mul(0x0100_0193))
}

/// What each scratch page's first dword holds at the snapshot.
fn pattern(i: u32) -> u32 {
    0xa5a5_0000 | i
}

fn guest() -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(32)?;
    let mut hash = a.create_label();
    let mut scratch = a.create_label();
    let mut done = a.create_label();
    a.mov(edx, READY_PORT as u32)?;
    a.out(dx, al)?;
    a.mov(eax, 0x811c_9dc5u32)?;
    a.xor(ebx, ebx)?;
    a.set_label(&mut hash)?;
    a.xor(eax, dword_ptr(ebx * 4 + INPUT_DATA as i32))?;
    a.imul_3(eax, eax, 0x0100_0193)?;
    a.inc(ebx)?;
    a.cmp(ebx, INPUT_DWORDS as i32)?;
    a.jb(hash)?;
    a.mov(ecx, dword_ptr(INPUT as i32))?;
    a.mov(edi, SCRATCH as u32)?;
    a.xor(ebx, ebx)?;
    a.set_label(&mut scratch)?;
    a.cmp(ebx, ecx)?;
    a.jae(done)?;
    a.lea(edx, eax + ebx)?;
    a.mov(dword_ptr(edi), edx)?;
    a.add(edi, PAGE as i32)?;
    a.inc(ebx)?;
    a.jmp(scratch)?;
    a.set_label(&mut done)?;
    a.mov(edx, DONE_PORT as u32)?;
    a.out(dx, eax)?;
    a.hlt()?;
    Ok(a.assemble(CODE)?)
}

/// xorshift64*: the inputs.
struct Inputs(u64);

impl Inputs {
    fn next(&mut self) -> [u32; INPUT_DWORDS] {
        let mut out = [0u32; INPUT_DWORDS];
        for d in &mut out {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *d = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32;
        }
        out
    }
}

fn fail(iteration: u64, what: String) -> ExampleError {
    eprintln!("fuzz-reset: iteration {iteration}: {what}");
    std::process::exit(1);
}

fn dword(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn write_input(ram: &GuestRam, dirty: &mut DirtyPages, input: &[u32; INPUT_DWORDS]) -> Result<()> {
    let bytes: Vec<u8> = input.iter().flat_map(|d| d.to_le_bytes()).collect();
    Ok(dirty.write(ram, 0, INPUT_DATA, &bytes)?)
}

fn run(iterations: u64, pages: u32) -> Result<(u64, u64, f64)> {
    let conn = Connection::from_env()?;
    require_vcpus(&conn, "fuzz-reset", 1);
    let ram = GuestRam::new(MEM_SIZE)?;
    ram.write(CODE, &guest()?)?;
    ram.write(INPUT, &pages.to_le_bytes())?;
    for i in 0..MAX_PAGES {
        ram.write(SCRATCH + u64::from(i) * PAGE, &pattern(i).to_le_bytes())?;
    }
    let _mem = ram.register(&conn, 0)?;
    conn.reserve_range(AddressSpace::IoPort, READY_PORT, 1)?;
    conn.reserve_range(AddressSpace::IoPort, DONE_PORT, 4)?;
    let vcpu = conn.vcpu(0)?;
    conn.start()?;
    let mut v = vcpu.lock();
    let mut inputs = Inputs(0x9e37_79b9_7f4a_7c15);
    let mut dirty = DirtyPages::new();
    let mut input = [0u32; INPUT_DWORDS];
    let mut snapshot_regs = None;
    let mut done = 0u64;
    // READY exits after a reset (the guest re-ran the snapshot's `out`).
    let mut replays = 0u64;
    let mut started = Instant::now();
    loop {
        match v.wait()? {
            VcpuEvent::Init => {
                enter_protected_mode(&mut v, &ram, 0, TABLES, CODE as u32, STACK)?;
            }
            VcpuEvent::Io {
                address: READY_PORT,
                ..
            } => {
                // The first time: the snapshot point. Later (a kernel that
                // completes the `out` only at the next entry re-runs it
                // after a reset): the input is already there.
                if snapshot_regs.is_some() {
                    replays += 1;
                } else {
                    snapshot_regs = Some(v.get_regs()?);
                    conn.snapshot_in_memory()?;
                    input = inputs.next();
                    write_input(&ram, &mut dirty, &input)?;
                    started = Instant::now();
                }
            }
            VcpuEvent::Io {
                address: DONE_PORT,
                data,
                ..
            } => {
                let got = dword(data);
                let want = model(&input);
                if got != want {
                    return Err(fail(done, format!("hash {got:#x}, model says {want:#x}")));
                }
                for i in [0, pages - 1] {
                    let at = SCRATCH + u64::from(i) * PAGE;
                    let w = ram.read_u32(at)?;
                    if w != want.wrapping_add(i) {
                        return Err(fail(done, format!("scratch page {i} holds {w:#x}")));
                    }
                }
                done += 1;
                if done == iterations {
                    break;
                }
                conn.reset(&dirty.take())?;
                let regs = v.get_regs()?;
                let Some(r0) = &snapshot_regs else {
                    return Err(fail(done, "DONE before READY".into()));
                };
                let now = [
                    regs.rax,
                    regs.rbx,
                    regs.rcx,
                    regs.rdx,
                    regs.rsi,
                    regs.rdi,
                    regs.rsp,
                    regs.rbp,
                    regs.rip,
                    regs.rflags,
                ];
                let then = [
                    r0.rax, r0.rbx, r0.rcx, r0.rdx, r0.rsi, r0.rdi, r0.rsp, r0.rbp, r0.rip,
                    r0.rflags,
                ];
                if now != then {
                    return Err(fail(
                        done,
                        format!("registers after reset {now:x?}, at the snapshot {then:x?}"),
                    ));
                }
                for i in 0..pages {
                    let w = ram.read_u32(SCRATCH + u64::from(i) * PAGE)?;
                    if w != pattern(i) {
                        return Err(fail(
                            done,
                            format!(
                                "after reset scratch page {i} holds {w:#x}, not {:#x}",
                                pattern(i)
                            ),
                        ));
                    }
                }
                for k in 0..INPUT_DWORDS as u64 {
                    let w = ram.read_u32(INPUT_DATA + 4 * k)?;
                    if w != 0 {
                        return Err(fail(
                            done,
                            format!("after reset input dword {k} holds {w:#x}"),
                        ));
                    }
                }
                input = inputs.next();
                write_input(&ram, &mut dirty, &input)?;
            }
            VcpuEvent::Shutdown => return Err(ExampleError::Stopped),
            _ => {}
        }
        v.resume()?;
    }
    Ok((done - 1, replays, started.elapsed().as_secs_f64()))
}

fn main() {
    let usage =
        "--plugin-args ITERATIONS [PAGES]   (PAGES 1..=256 scratch pages per run, default 1)";
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse().unwrap_or_else(|_| {
                plugin_examples::usage_error("fuzz-reset", usage, &format!("bad argument {a:?}"))
            })
        })
        .collect();
    if args.len() > 2 {
        plugin_examples::usage_error("fuzz-reset", usage, "at most two arguments");
    }
    let iterations = args.first().copied().unwrap_or(1000);
    let pages = args.get(1).copied().unwrap_or(1);
    if iterations < 2 {
        plugin_examples::usage_error("fuzz-reset", usage, "ITERATIONS must be at least 2");
    }
    if !(1..=u64::from(MAX_PAGES)).contains(&pages) {
        plugin_examples::usage_error("fuzz-reset", usage, "PAGES must be 1..=256");
    }
    match run(iterations, pages as u32) {
        Ok((resets, replays, secs)) => println!(
            "resets={resets} pages={pages} replays={replays} seconds={secs:.3} resets_per_s={:.0}",
            resets as f64 / secs.max(1e-9)
        ),
        Err(e) => exit_with(&e),
    }
}
