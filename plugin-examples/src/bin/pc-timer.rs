//! `pc-timer`: a PC-style timer machine. The guest programs the in-kernel
//! PIT (channel 0, ~1 kHz) and the in-kernel PIC, sleeps with `hlt` between
//! interrupts, counts timer interrupts in its IRQ0 handler and, after
//! `TICKS` of them (`pc-timer [TICKS]`, default 50), reports the count
//! through a port. The plugin sets the GSI routes (GSI 0 → PIC master pin 0
//! and IOAPIC pin 2) and puts the local APIC's LINT0 in ExtINT mode so PIC
//! interrupts reach the vcpu.

use crosvm_plugin::{AddressSpace, Connection, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{
    assemble16, enter_real_mode, exit_with, parse_args, pc_irq_routes, require_vcpus, ExampleError,
    GuestRam, Result,
};

const REPORT_PORT: u64 = 0x610;
const SHUTDOWN_PORT: u64 = 0x501;
const CODE: u64 = 0x1000;
const HANDLER: u64 = 0x1400;
const COUNTER: u64 = 0x3000;
/// PIT input clock / 1193 ≈ 1 kHz.
const PIT_DIVISOR: u16 = 1193;

fn guest_main(ticks: u16) -> Result<Vec<u8>> {
    assemble16(CODE, |a| {
        let mut wait = a.create_label();
        a.cli()?;
        // IVT entry 8 (IRQ0 at PIC base 8) -> 0000:HANDLER.
        a.mov(word_ptr(8 * 4), HANDLER as u32)?;
        a.mov(word_ptr(8 * 4 + 2), 0u32)?;
        a.mov(word_ptr(COUNTER), 0u32)?;
        // The PICs (IRQ0 only, at vector 8) and the PIT at ~1 kHz.
        plugin_examples::asm_pic_and_pit(a, PIT_DIVISOR)?;
        a.sti()?;
        a.set_label(&mut wait)?;
        a.hlt()?;
        a.cmp(word_ptr(COUNTER), u32::from(ticks))?;
        a.jb(wait)?;
        a.cli()?;
        a.mov(ax, word_ptr(COUNTER))?;
        a.mov(dx, REPORT_PORT as u32)?;
        a.out(dx, ax)?;
        a.mov(dx, SHUTDOWN_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    })
}

fn guest_handler() -> Result<Vec<u8>> {
    assemble16(HANDLER, |a| {
        a.push(ax)?;
        a.inc(word_ptr(COUNTER))?;
        a.mov(al, 0x20u32)?; // non-specific EOI
        a.out(0x20u32, al)?;
        a.pop(ax)?;
        a.iret()?;
        Ok(())
    })
}

fn run(ticks: u16) -> Result<u16> {
    let conn = Connection::from_env()?;
    require_vcpus(&conn, "pc-timer", 1);
    let ram = GuestRam::new(0x10000)?;
    ram.write(CODE, &guest_main(ticks)?)?;
    ram.write(HANDLER, &guest_handler()?)?;
    let _mem = ram.map(&conn)?;
    conn.reserve_range(AddressSpace::IoPort, REPORT_PORT, 1)?;
    conn.reserve_range(AddressSpace::IoPort, SHUTDOWN_PORT, 1)?;

    // The PC's standard wiring: ISA IRQs 0-7 on the master PIC, 8-15 on the
    // slave, all also on the IOAPIC, with the timer on IOAPIC pin 2.
    let routes = pc_irq_routes();
    conn.set_irq_routing(&routes)?;

    let vcpu = conn.vcpu(0)?;
    conn.start()?;
    let mut v = vcpu.lock();
    let mut reported = None;
    loop {
        match v.wait()? {
            VcpuEvent::Init => {
                enter_real_mode(&mut v, CODE as u16, 0x8000)?;
                plugin_examples::route_pic_to_lapic(&mut v)?;
            }
            VcpuEvent::Io {
                address: REPORT_PORT,
                data,
                ..
            } => {
                reported = <[u8; 2]>::try_from(data).ok().map(u16::from_le_bytes);
            }
            VcpuEvent::Io {
                address: SHUTDOWN_PORT,
                ..
            } => break,
            VcpuEvent::Shutdown => return Err(ExampleError::Stopped),
            _ => {}
        }
        v.resume()?;
    }
    let pit = conn.get_pit_state()?;
    println!(
        "PIT channel 0: mode {}, count {}",
        pit.channels[0].mode, pit.channels[0].count
    );
    reported.ok_or(plugin_examples::ExampleError::Sys(
        nix::errno::Errno::EPROTO,
    ))
}

fn main() {
    let usage = "[--plugin-args TICKS]   (timer interrupts to count, 1..=65535; default 50)";
    let ticks = parse_args::<u16>("pc-timer", usage, 1).map_or(50, |a| a[0]);
    if ticks == 0 {
        plugin_examples::usage_error("pc-timer", usage, "TICKS must be at least 1");
    }
    match run(ticks) {
        Ok(count) if count >= ticks => println!("the guest counted {count} timer interrupts"),
        Ok(count) => {
            eprintln!("pc-timer: the guest reported {count} interrupts, expected {ticks}");
            std::process::exit(1);
        }
        Err(e) => exit_with(&e),
    }
}
