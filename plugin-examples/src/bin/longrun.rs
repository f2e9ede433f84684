//! `longrun`: a long deterministic computation whose result depends on
//! guest memory, guest registers and a device that keeps its state inside
//! the plugin, while PIT timer interrupts keep arriving. It is the machine
//! the snapshot, migration and hot-restart work is checked with: losing
//! memory, vcpu state or device state changes the result.
//!
//! The guest (16-bit real mode, 32-bit registers) runs `N` rounds
//! (`longrun [N]`, default 20) of 4,096 steps. Each step advances a
//! xorshift32 state `x`, and mixes `x` plus the step number into one of
//! 4,096 dwords of a buffer in guest memory. Every 64th step it writes that
//! dword to the accumulator device and mixes the device's answer back into
//! `x`. After each round it reports the round number (`progress K`); at the
//! end it folds the buffer and reports the fold and `x`. The plugin prints
//! `result=0x<16 hex digits>`: the device's accumulator mixed with both,
//! a value that depends only on `N`.
//!
//! The IRQ0 handler only counts ticks (in memory the computation never
//! reads), so the timer does not change the result; the count goes to
//! stderr.
//!
//! The rounds are short because guest instructions are slow on some hosts:
//! on a nested (PVM) KVM, real- and long-mode code without paravirtual
//! support is emulated at about 0.5-1 µs per instruction, so a round takes
//! tens of milliseconds there and well under one on bare metal.

use crosvm_plugin::{AddressSpace, Connection, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{
    assemble16, enter_real_mode, exit_with, parse_args, pc_irq_routes, require_vcpus, GuestRam,
    Result,
};

/// The accumulator device: a write mixes a dword in, a read returns a dword
/// of the accumulator.
const ACC_PORT: u64 = 0x620;
/// `out` of the finished round number.
const PROGRESS_PORT: u64 = 0x624;
/// `out` of the buffer fold, then of `x` at `RESULT_PORT + 4`.
const RESULT_PORT: u64 = 0x628;
const SHUTDOWN_PORT: u64 = 0x501;

const MEM_SIZE: u64 = 0x10000;
const CODE: u64 = 0x1000;
const HANDLER: u64 = 0x1800;
/// Timer ticks counted by the IRQ0 handler (never read by the computation).
const TICKS: u64 = 0x3000;
/// The round counter and the number of rounds `N` (written by the plugin).
const ROUND: u64 = 0x3010;
const ROUNDS: u64 = 0x3014;
/// The 4,096-dword buffer.
const BUF: u64 = 0x4000;
const BUF_DWORDS: u32 = 4096;
const STEPS_PER_ROUND: u32 = 4096;
const STACK: u16 = 0xfff0;
/// PIT input clock / 1193 ≈ 1 kHz.
const PIT_DIVISOR: u16 = 1193;
/// Offset of LVT LINT0 in the local APIC register page, and ExtINT mode.
const APIC_LVT0: usize = 0x350;
const LVT_EXTINT: u32 = 0x700;

/// The guest's main program.
pub fn guest_main() -> Result<Vec<u8>> {
    assemble16(CODE, |a| {
        let mut fill = a.create_label();
        let mut round = a.create_label();
        let mut step = a.create_label();
        let mut no_device = a.create_label();
        let mut fold = a.create_label();
        a.cli()?;
        // IVT entry 8 (IRQ0 at PIC base 8) -> 0000:HANDLER.
        a.mov(word_ptr(8 * 4), HANDLER as u32)?;
        a.mov(word_ptr(8 * 4 + 2), 0u32)?;
        // Master PIC: base 8, slave on 2, 8086 mode, only IRQ0 unmasked;
        // slave PIC: base 0x70, all masked.
        for (port, value) in [
            (0x20u32, 0x11u32),
            (0x21, 0x08),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xfe),
            (0xa0, 0x11),
            (0xa1, 0x70),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0xa1, 0xff),
        ] {
            a.mov(al, value)?;
            a.out(port, al)?;
        }
        // PIT channel 0: lobyte/hibyte, mode 2 (rate generator), ~1 kHz.
        a.mov(al, 0x34u32)?;
        a.out(0x43u32, al)?;
        a.mov(al, u32::from(PIT_DIVISOR & 0xff))?;
        a.out(0x40u32, al)?;
        a.mov(al, u32::from(PIT_DIVISOR >> 8))?;
        a.out(0x40u32, al)?;
        a.sti()?;

        // buf[i] = i * golden ratio.
        a.xor(ebx, ebx)?;
        a.set_label(&mut fill)?;
        a.imul_3(eax, ebx, 0x9e37_79b9u32 as i32)?;
        a.mov(dword_ptr(ebx * 4 + BUF as i32), eax)?;
        a.inc(ebx)?;
        a.cmp(ebx, BUF_DWORDS as i32)?;
        a.jb(fill)?;

        a.mov(esi, 0x1234_5678u32 as i32)?; // x
        a.xor(edi, edi)?; // step number
        a.mov(dword_ptr(ROUND as i32), 0)?;
        a.set_label(&mut round)?;
        a.mov(ecx, STEPS_PER_ROUND as i32)?;
        a.set_label(&mut step)?;
        // x ^= x << 13; x ^= x >> 17; x ^= x << 5
        a.mov(eax, esi)?;
        a.shl(eax, 13)?;
        a.xor(esi, eax)?;
        a.mov(eax, esi)?;
        a.shr(eax, 17)?;
        a.xor(esi, eax)?;
        a.mov(eax, esi)?;
        a.shl(eax, 5)?;
        a.xor(esi, eax)?;
        // buf[x & 4095] ^= x + step
        a.mov(ebx, esi)?;
        a.and(ebx, (BUF_DWORDS - 1) as i32)?;
        a.mov(eax, esi)?;
        a.add(eax, edi)?;
        a.xor(dword_ptr(ebx * 4 + BUF as i32), eax)?;
        a.inc(edi)?;
        // Every 64th step: the dword goes to the device, its answer into x.
        a.test(edi, 63)?;
        a.jnz(no_device)?;
        a.mov(eax, dword_ptr(ebx * 4 + BUF as i32))?;
        a.mov(dx, ACC_PORT as u32)?;
        a.out(dx, eax)?;
        a.in_(eax, dx)?;
        a.xor(esi, eax)?;
        a.jnz(no_device)?; // xorshift must never hold 0
        a.mov(esi, 1)?;
        a.set_label(&mut no_device)?;
        a.dec(ecx)?;
        a.jnz(step)?;
        // Round done.
        a.mov(eax, dword_ptr(ROUND as i32))?;
        a.inc(eax)?;
        a.mov(dword_ptr(ROUND as i32), eax)?;
        a.mov(dx, PROGRESS_PORT as u32)?;
        a.out(dx, eax)?;
        a.cmp(eax, dword_ptr(ROUNDS as i32))?;
        a.jb(round)?;

        // Fold the buffer (order-dependent) and report it and x.
        a.xor(eax, eax)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut fold)?;
        a.rol(eax, 5)?;
        a.add(eax, dword_ptr(ebx * 4 + BUF as i32))?;
        a.inc(ebx)?;
        a.cmp(ebx, BUF_DWORDS as i32)?;
        a.jb(fold)?;
        a.mov(dx, RESULT_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(eax, esi)?;
        a.mov(dx, (RESULT_PORT + 4) as u32)?;
        a.out(dx, eax)?;
        a.cli()?;
        a.mov(dx, SHUTDOWN_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    })
}

/// The IRQ0 handler: counts a tick, acknowledges the PIC.
pub fn guest_handler() -> Result<Vec<u8>> {
    assemble16(HANDLER, |a| {
        a.push(ax)?;
        a.inc(dword_ptr(TICKS as i32))?;
        a.mov(al, 0x20u32)?; // non-specific EOI
        a.out(0x20u32, al)?;
        a.pop(ax)?;
        a.iret()?;
        Ok(())
    })
}

/// The accumulator device: the plugin's own state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Accumulator {
    pub acc: u64,
}

impl Accumulator {
    pub fn write(&mut self, v: u32) {
        self.acc = (self.acc.rotate_left(7) ^ u64::from(v)).wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub fn read(&self) -> u32 {
        (self.acc >> 16) as u32
    }
}

fn dword(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn run(rounds: u32) -> Result<u64> {
    let conn = Connection::from_env()?;
    require_vcpus(&conn, "longrun", 1);
    let ram = GuestRam::new(MEM_SIZE)?;
    ram.write(CODE, &guest_main()?)?;
    ram.write(HANDLER, &guest_handler()?)?;
    ram.write(ROUNDS, &rounds.to_le_bytes())?;
    let _mem = ram.map(&conn)?;
    conn.reserve_range(AddressSpace::IoPort, ACC_PORT, 4)?;
    conn.reserve_range(AddressSpace::IoPort, PROGRESS_PORT, 4)?;
    conn.reserve_range(AddressSpace::IoPort, RESULT_PORT, 8)?;
    conn.reserve_range(AddressSpace::IoPort, SHUTDOWN_PORT, 1)?;
    conn.set_irq_routing(&pc_irq_routes())?;

    let vcpu = conn.vcpu(0)?;
    conn.start()?;
    let mut v = vcpu.lock();
    let mut device = Accumulator::default();
    let (mut fold, mut x) = (None, None);
    loop {
        match v.wait()? {
            VcpuEvent::Init => {
                enter_real_mode(&mut v, CODE as u16, STACK)?;
                let mut lapic = v.get_lapic_state()?;
                for (i, b) in LVT_EXTINT.to_le_bytes().iter().enumerate() {
                    lapic.regs[APIC_LVT0 + i] = *b as _;
                }
                v.set_lapic_state(&lapic)?;
            }
            VcpuEvent::Io {
                address: ACC_PORT,
                is_write: true,
                data,
                ..
            } => device.write(dword(data)),
            VcpuEvent::Io {
                address: ACC_PORT,
                is_write: false,
                ..
            } => {
                v.resume_io_read(&device.read().to_le_bytes())?;
                continue;
            }
            VcpuEvent::Io {
                address: PROGRESS_PORT,
                data,
                ..
            } => println!("progress {}", dword(data)),
            VcpuEvent::Io {
                address: RESULT_PORT,
                data,
                ..
            } => fold = Some(dword(data)),
            VcpuEvent::Io { address, data, .. } if address == RESULT_PORT + 4 => {
                x = Some(dword(data))
            }
            VcpuEvent::Io {
                address: SHUTDOWN_PORT,
                ..
            } => break,
            VcpuEvent::Shutdown => return Err(plugin_examples::ExampleError::Stopped),
            _ => {}
        }
        v.resume()?;
    }
    let ticks = dword(&ram.read(TICKS, 4)?);
    eprintln!("longrun: {ticks} timer interrupts arrived during the run");
    let (Some(fold), Some(x)) = (fold, x) else {
        eprintln!("longrun: the guest stopped without reporting its result");
        std::process::exit(1);
    };
    Ok(device.acc ^ (u64::from(fold) << 32 | u64::from(x)))
}

fn main() {
    let usage = "[--plugin-args N]   (rounds of 4,096 steps, 1..=100000; default 20)";
    let rounds = parse_args::<u32>("longrun", usage, 1).map_or(20, |a| a[0]);
    if !(1..=100_000).contains(&rounds) {
        plugin_examples::usage_error("longrun", usage, "N must be 1..=100000");
    }
    match run(rounds) {
        Ok(result) => println!("result={result:#018x}"),
        Err(e) => exit_with(&e),
    }
}
