//! `multi-vcpu`: every vcpu runs guest code concurrently — a loop that counts
//! in EAX and never exits to the host. The plugin pauses all vcpus several
//! times (`pause_vcpus`), reads each one's counter while it is stopped,
//! resumes it, and checks that every vcpu made progress between pauses.
//! `multi-vcpu [ROUNDS]` (default 5); run with `vmm --cpus N`.

use std::sync::mpsc;
use std::time::Duration;

use crosvm_plugin::{Connection, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{
    assemble16, enter_real_mode, exit_with, parse_args, ExampleError, GuestRam, Result,
};

const CODE: u64 = 0x1000;

fn guest_code() -> Result<Vec<u8>> {
    assemble16(CODE, |a| {
        let mut spin = a.create_label();
        a.xor(eax, eax)?;
        a.set_label(&mut spin)?;
        a.inc(eax)?;
        a.jmp(spin)?;
        Ok(())
    })
}

/// One pause observed by a vcpu thread: (vcpu, round, counter).
type Report = (u32, u64, u64);

fn run(rounds: u64) -> Result<std::convert::Infallible> {
    let conn = Connection::from_env()?;
    let ram = GuestRam::new(0x10000)?;
    ram.write(CODE, &guest_code()?)?;
    let _mem = ram.map(&conn)?;

    let n = conn.vcpu_count() as u32;
    if n > 64 {
        eprintln!(
            "multi-vcpu: only the first 64 vcpus can be paused; run vmm with --cpus 64 or fewer"
        );
        std::process::exit(2);
    }
    let (tx, rx) = mpsc::channel::<Report>();
    for id in 0..n {
        let vcpu = conn.vcpu(id)?;
        let tx = tx.clone();
        std::thread::spawn(move || -> Result<()> {
            let mut v = vcpu.lock();
            loop {
                match v.wait()? {
                    VcpuEvent::Init => enter_real_mode(&mut v, CODE as u16, 0x8000)?,
                    VcpuEvent::Paused { user } => {
                        let regs = v.get_regs()?;
                        let _ = tx.send((id, user, regs.rax & 0xffff_ffff));
                    }
                    VcpuEvent::Shutdown => {
                        // No watcher thread: the blocked wait itself learns it.
                        eprintln!("multi-vcpu: vcpu {id}: {}", ExampleError::Stopped);
                        std::process::exit(1);
                    }
                    _ => {}
                }
                v.resume()?;
            }
        });
    }
    conn.start()?;

    let paused = n.min(64);
    let mask = if paused == 64 {
        u64::MAX
    } else {
        (1u64 << paused) - 1
    };
    let mut last = vec![0u64; paused as usize];
    // The requested rounds, then more (bounded) until every vcpu has run at
    // least once: on a loaded machine a vcpu thread may not have been
    // scheduled yet.
    let mut round = 0;
    while round < rounds || (last.contains(&0) && round < rounds + 200) {
        round += 1;
        std::thread::sleep(Duration::from_millis(20));
        conn.pause_vcpus(mask, round)?;
        let mut seen = 0;
        while seen < paused {
            let (id, user, count) = rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| plugin_examples::ExampleError::Sys(nix::errno::Errno::ETIMEDOUT))?;
            if user != round {
                continue;
            }
            let id = id as usize;
            // The counter only grows (32 vcpus on 2 cores may not all have
            // run between two pauses; overall progress is checked below).
            if count < last[id] {
                eprintln!(
                    "multi-vcpu: vcpu {id} went backwards ({} -> {count})",
                    last[id]
                );
                std::process::exit(1);
            }
            last[id] = count;
            seen += 1;
        }
        if round <= rounds {
            println!("round {round}: all {paused} vcpus paused and resumed; counters {last:?}");
        }
    }
    if let Some(id) = last.iter().position(|&c| c == 0) {
        eprintln!("multi-vcpu: vcpu {id} never ran");
        std::process::exit(1);
    }
    // Exit while the vcpus still run: dropping the guest memory first would
    // pull it out from under them.
    std::process::exit(0);
}

fn main() {
    let rounds =
        parse_args::<u64>("multi-vcpu", "[--cpus N] [--plugin-args ROUNDS]", 1).map_or(5, |a| a[0]);
    let Err(e) = run(rounds);
    exit_with(&e);
}
