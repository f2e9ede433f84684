//! `tutorial`: "your first plugin" (docs/tutorial.md), in Rust.
//!
//! A counter device: each guest read of port 0x100 returns the next number;
//! the guest echoes it to port 0x101, which the plugin prints, until 3; then
//! it writes to port 0x102 and the plugin stops the machine. One vcpu.

use crosvm_plugin::{machine, AddressSpace, Connection, GuestRam, VcpuEvent};

const COUNTER_PORT: u64 = 0x100; // read: next number
const ECHO_PORT: u64 = 0x101; // write: the plugin prints it
const DONE_PORT: u64 = 0x102; // write: stop
const CODE: u64 = 0x1000;

/// 16-bit real-mode guest code, loaded at 0x1000.
const GUEST_CODE: &[u8] = &[
    0xba, 0x00, 0x01, // again: mov dx, 0x100
    0xec, //                    in al, dx       ; ask the counter
    0xba, 0x01, 0x01, //        mov dx, 0x101
    0xee, //                    out dx, al      ; echo it
    0x3c, 0x03, //              cmp al, 3
    0x72, 0xf4, //              jb again
    0xba, 0x02, 0x01, //        mov dx, 0x102
    0xee, //                    out dx, al      ; done
    0xf4, //                    hlt
];

fn run() -> crosvm_plugin::Result<()> {
    let conn = Connection::from_env()?;
    if conn.vcpu_count() != 1 {
        eprintln!("tutorial: this machine has one vcpu; run vmm without --cpus");
        std::process::exit(2);
    }

    // Guest RAM: a sealed memfd, mapped here and registered at address 0.
    let ram = GuestRam::new(0x10000)?;
    ram.write(CODE, GUEST_CODE)?;
    let _ram_slot = ram.register(&conn, 0)?;

    // The three ports stop the vcpu and come to us as `Io` events.
    conn.reserve_range(AddressSpace::IoPort, COUNTER_PORT, 3)?;

    let vcpu = conn.vcpu(0)?;
    conn.start()?;
    let mut v = vcpu.lock();
    let mut counter = 0u8;
    loop {
        match v.wait()? {
            // The vcpu starts in reset state (CS base 0xffff0000): put it
            // in real mode at 0:0x1000 with every segment at 0.
            VcpuEvent::Init => machine::enter_real_mode(&mut v, CODE as u16, 0x8000)?,
            VcpuEvent::Io {
                address: COUNTER_PORT,
                is_write: false,
                ..
            } => {
                counter += 1;
                v.resume_io_read(&[counter])?;
                continue;
            }
            VcpuEvent::Io {
                address: ECHO_PORT,
                data,
                ..
            } => println!("guest counted {}", data[0]),
            VcpuEvent::Io {
                address: DONE_PORT, ..
            } => {
                println!("guest is done");
                return Ok(()); // the VM stops when the plugin exits
            }
            VcpuEvent::Shutdown => {
                eprintln!("tutorial: the VM was stopped before the guest finished");
                std::process::exit(1);
            }
            _ => {}
        }
        v.resume()?;
    }
}

fn main() {
    if std::env::args().len() > 1 {
        eprintln!("usage: vmm --plugin tutorial   (the tutorial machine takes no arguments)");
        std::process::exit(2);
    }
    if let Err(e) = run() {
        eprintln!("tutorial: {e}");
        std::process::exit(1);
    }
}
