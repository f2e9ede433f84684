//! `hello`: a serial-console machine. The guest prints a greeting through a
//! 16550-style UART at port 0x3f8 (polling the line status register like a
//! real driver) and stops the machine by writing to a shutdown port. The
//! plugin copies what the guest transmits to its own stdout.

use std::io::Write;

use crosvm_plugin::{AddressSpace, Connection, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{
    assemble16, enter_real_mode, exit_with, parse_args, require_vcpus, ExampleError, GuestRam,
    Result,
};

const UART_BASE: u64 = 0x3f8;
const UART_THR: u64 = UART_BASE; // transmit holding register (write)
const UART_LSR: u64 = UART_BASE + 5; // line status register (read)
const LSR_THR_EMPTY: u8 = 0x60; // THR empty + transmitter idle
const SHUTDOWN_PORT: u64 = 0x501;
const CODE: u64 = 0x1000;
const MESSAGE: u64 = 0x2000;

fn guest_code() -> Result<Vec<u8>> {
    assemble16(CODE, |a| {
        let mut next = a.create_label();
        let mut wait_thr = a.create_label();
        let mut done = a.create_label();
        a.mov(si, MESSAGE as u32)?;
        a.set_label(&mut next)?;
        a.lodsb()?;
        a.test(al, al)?;
        a.jz(done)?;
        a.mov(bl, al)?;
        a.set_label(&mut wait_thr)?;
        a.mov(dx, UART_LSR as u32)?;
        a.in_(al, dx)?;
        a.test(al, 0x20)?;
        a.jz(wait_thr)?;
        a.mov(dx, UART_THR as u32)?;
        a.mov(al, bl)?;
        a.out(dx, al)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.mov(dx, SHUTDOWN_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    })
}

fn run() -> Result<()> {
    let conn = Connection::from_env()?;
    require_vcpus(&conn, "hello", 1);

    let ram = GuestRam::new(0x10000)?;
    ram.write(CODE, &guest_code()?)?;
    ram.write(MESSAGE, b"Hello from the guest\n\0")?;
    let _mem = ram.map(&conn)?;
    conn.reserve_range(AddressSpace::IoPort, UART_BASE, 8)?;
    conn.reserve_range(AddressSpace::IoPort, SHUTDOWN_PORT, 1)?;

    let vcpu = conn.vcpu(0)?;
    conn.start()?;
    let mut v = vcpu.lock();
    let mut stdout = std::io::stdout();
    loop {
        match v.wait()? {
            VcpuEvent::Init => enter_real_mode(&mut v, CODE as u16, 0x8000)?,
            VcpuEvent::Io {
                address: SHUTDOWN_PORT,
                ..
            } => return Ok(()),
            VcpuEvent::Io {
                address: UART_THR,
                is_write: true,
                data,
                ..
            } => {
                let _ = stdout.write_all(data);
                let _ = stdout.flush();
            }
            VcpuEvent::Io {
                address: UART_LSR,
                is_write: false,
                ..
            } => {
                v.resume_io_read(&[LSR_THR_EMPTY])?;
                continue;
            }
            // Other UART registers read as 0 and ignore writes.
            VcpuEvent::Shutdown => return Err(ExampleError::Stopped),
            _ => {}
        }
        v.resume()?;
    }
}

fn main() {
    let _ = parse_args::<String>("hello", "   (no arguments; one vcpu)", 0);
    if let Err(e) = run() {
        exit_with(&e);
    }
}
