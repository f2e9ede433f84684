//! `adder`: the guest reads two numbers from ports the plugin serves, adds
//! them and writes the sum; the plugin checks it. `adder [A B]`.

use crosvm_plugin::{AddressSpace, Connection, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{
    assemble16, enter_real_mode, exit_with, parse_args, require_vcpus, ExampleError, GuestRam,
    Result,
};

const PORT_A: u64 = 0x600;
const PORT_B: u64 = 0x601;
const PORT_SUM: u64 = 0x602;
const SHUTDOWN_PORT: u64 = 0x501;
const CODE: u64 = 0x1000;

fn guest_code() -> Result<Vec<u8>> {
    assemble16(CODE, |a| {
        a.mov(dx, PORT_A as u32)?;
        a.in_(eax, dx)?;
        a.mov(ebx, eax)?;
        a.mov(dx, PORT_B as u32)?;
        a.in_(eax, dx)?;
        a.add(eax, ebx)?;
        a.mov(dx, PORT_SUM as u32)?;
        a.out(dx, eax)?;
        a.mov(dx, SHUTDOWN_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    })
}

fn run(x: u32, y: u32) -> Result<Option<u32>> {
    let conn = Connection::from_env()?;
    require_vcpus(&conn, "adder", 1);
    let ram = GuestRam::new(0x10000)?;
    ram.write(CODE, &guest_code()?)?;
    let _mem = ram.map(&conn)?;
    conn.reserve_range(AddressSpace::IoPort, PORT_A, 3)?;
    conn.reserve_range(AddressSpace::IoPort, SHUTDOWN_PORT, 1)?;

    let vcpu = conn.vcpu(0)?;
    conn.start()?;
    let mut v = vcpu.lock();
    let mut sum = None;
    loop {
        match v.wait()? {
            VcpuEvent::Init => enter_real_mode(&mut v, CODE as u16, 0x8000)?,
            VcpuEvent::Io {
                address: SHUTDOWN_PORT,
                ..
            } => return Ok(sum),
            VcpuEvent::Io {
                address,
                is_write: false,
                ..
            } => {
                let value = if address == PORT_A { x } else { y };
                v.resume_io_read(&value.to_le_bytes())?;
                continue;
            }
            VcpuEvent::Io {
                address: PORT_SUM,
                data,
                ..
            } => {
                sum = <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes);
            }
            VcpuEvent::Shutdown => return Err(ExampleError::Stopped),
            _ => {}
        }
        v.resume()?;
    }
}

fn main() {
    let (x, y) = parse_args::<u32>(
        "adder",
        "[--plugin-args A B]   (two u32 numbers; default 40 2)",
        2,
    )
    .map_or((40, 2), |a| (a[0], a[1]));
    match run(x, y) {
        Ok(Some(sum)) if sum == x.wrapping_add(y) => {
            println!("{x} + {y} = {sum} (computed by the guest)")
        }
        Ok(other) => {
            eprintln!(
                "adder: the guest reported {other:?}, expected {}",
                x.wrapping_add(y)
            );
            std::process::exit(1);
        }
        Err(e) => exit_with(&e),
    }
}
