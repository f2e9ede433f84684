//! Test plugin: every vcpu runs the same guest loop concurrently, writing its
//! own id (set in RAX at Init) to port 0x700 `ITERATIONS` times, then to the
//! done port 0x701. The plugin checks each vcpu's writes and that the vcpus
//! interleaved. `multi_io ITERATIONS`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crosvm_plugin::{AddressSpace, Connection, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{
    assemble16, enter_real_mode, exit_on_host_shutdown, exit_with, GuestRam, Result,
};

const DATA_PORT: u64 = 0x700;
const DONE_PORT: u64 = 0x701;
const CODE: u64 = 0x1000;

fn guest_code(iterations: u16) -> Result<Vec<u8>> {
    assemble16(CODE, |a| {
        let mut again = a.create_label();
        a.mov(cx, u32::from(iterations))?;
        a.mov(dx, DATA_PORT as u32)?;
        a.set_label(&mut again)?;
        a.out(dx, eax)?;
        a.dec(cx)?;
        a.jnz(again)?;
        a.mov(dx, DONE_PORT as u32)?;
        a.out(dx, eax)?;
        a.hlt()?;
        Ok(())
    })
}

fn main() {
    let iterations: u16 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    if let Err(e) = run(iterations) {
        exit_with(&e);
    }
}

fn run(iterations: u16) -> Result<()> {
    let conn = Connection::from_env()?;
    exit_on_host_shutdown(&conn)?;
    let ram = GuestRam::new(0x10000)?;
    ram.write(CODE, &guest_code(iterations)?)?;
    let _mem = ram.map(&conn)?;
    conn.reserve_range(AddressSpace::IoPort, DATA_PORT, 2)?;

    let n = conn.vcpu_count();
    // Global order of data events: which vcpu produced each one.
    let log = Arc::new(Mutex::new(Vec::<u32>::new()));
    let bad = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for id in 0..n as u32 {
        let vcpu = conn.vcpu(id)?;
        let log = Arc::clone(&log);
        let bad = Arc::clone(&bad);
        workers.push(std::thread::spawn(move || -> Result<u32> {
            let mut v = vcpu.lock();
            let mut count = 0;
            loop {
                match v.wait()? {
                    VcpuEvent::Init => {
                        enter_real_mode(&mut v, CODE as u16, 0x8000)?;
                        let mut regs = v.get_regs()?;
                        regs.rax = u64::from(id);
                        v.set_regs(&regs);
                    }
                    VcpuEvent::Io {
                        address: DONE_PORT, ..
                    } => return Ok(count),
                    VcpuEvent::Io {
                        address: DATA_PORT,
                        data,
                        ..
                    } => {
                        let who = <[u8; 4]>::try_from(data)
                            .map(u32::from_le_bytes)
                            .unwrap_or(u32::MAX);
                        if who != id {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                        count += 1;
                        log.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                    }
                    _ => {}
                }
                v.resume()?;
            }
        }));
    }
    conn.start()?;
    let mut ok = true;
    for (id, w) in workers.into_iter().enumerate() {
        match w.join() {
            Ok(Ok(count)) if count == u32::from(iterations) => {}
            Ok(Ok(count)) => {
                eprintln!("vcpu {id}: {count} writes, expected {iterations}");
                ok = false;
            }
            Ok(Err(e)) => exit_with(&e),
            Err(_) => {
                eprintln!("vcpu {id}: worker panicked");
                ok = false;
            }
        }
    }
    let log = log.lock().unwrap_or_else(|p| p.into_inner());
    let switches = log.windows(2).filter(|w| w[0] != w[1]).count();
    let wrong = bad.load(Ordering::Relaxed);
    println!(
        "vcpus={n} writes={} interleavings={switches} wrong_ids={wrong}",
        log.len()
    );
    if !ok || wrong != 0 || (n > 1 && switches == 0) {
        std::process::exit(1);
    }
    Ok(())
}
