//! The benchmark's Rust SDK plugin. `bench-plugin MODE ITERATIONS` runs the
//! benchmark guest and prints one line:
//! `RESULT exits=N secs=S init_ns=T rss_anon_kb=A rss_file_kb=F rss_shmem_kb=M
//! main_ns=T connected_ns=T exit_ns=T done_ns=T`
//! (`init_ns`: CLOCK_MONOTONIC when vcpu 0 reported Init; the RSS values are
//! the host's, read from /proc/<parent>/status when the run is done (under
//! the jail the parent is the jail's init); `main_ns`: entering `main`,
//! `connected_ns`: the connection adopted, `exit_ns`: vcpu 0's first IO
//! exit, `done_ns`: its done exit, all CLOCK_MONOTONIC).
//!
//! Modes: `pio`, `mmio-write`, `mmio-read`, `async` (posted writes to an
//! async-write range), `ioeventfd` (writes signal an eventfd in the kernel),
//! `pio2` (two vcpus, run with `vmm --cpus 2`), `trivial` (one exit),
//! `reserve` (ITERATIONS is the number of ranges the host ends up with:
//! besides the guest's two ports, reserves that many minus two MMIO ranges
//! one request at a time, in a scattered order, then runs the trivial guest;
//! `exits` is the number of ranges and `secs` the time the requests took),
//! `hold` (the trivial guest, then the plugin waits 500 ms, or the third
//! argument's milliseconds, before it exits,
//! so that the benchmark can read the processes' memory).

use std::os::fd::AsFd;
use std::time::Instant;

use crosvm_plugin::{AddressSpace, Connection, Datamatch, VcpuEvent};
use plugin_examples::{enter_real_mode, GuestRam};
use vmm_bench::guest::{loop_code, Access, CODE, DONE_PORT, LOOP_PORT, MMIO_ADDR, RAM_SIZE};

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn host_rss() -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", nix::unistd::getppid()))
        .unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:"), field("RssShmem:"))
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-plugin: {msg}");
    std::process::exit(1);
}

/// Reserves `count` one-byte MMIO ranges, 16 bytes apart, in a scattered
/// order (a fixed odd stride through the slots, a permutation when `count` is
/// a power of two); returns the seconds they took.
fn reserve_many(conn: &Connection, count: u32) -> f64 {
    const BASE: u64 = 0x1_0000_0000;
    let slots = u64::from(count.next_power_of_two());
    let start = Instant::now();
    let mut done = 0;
    let mut i = 0u64;
    while done < count {
        let slot = (i * 7919) % slots;
        i += 1;
        if slot >= u64::from(count) {
            continue;
        }
        conn.reserve_range(AddressSpace::Mmio, BASE + slot * 16, 1)
            .unwrap_or_else(|e| fail(&format!("reserve range {done}: {e}")));
        done += 1;
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    let main_ns = monotonic_ns();
    let mut args = std::env::args().skip(1);
    let mode = args
        .next()
        .unwrap_or_else(|| fail("usage: bench-plugin MODE ITERATIONS"));
    let iterations: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let ranges = iterations;
    let (access, iterations) = match mode.as_str() {
        "mmio-write" => (Access::MmioWrite, iterations),
        "mmio-read" => (Access::MmioRead, iterations),
        "trivial" | "reserve" | "hold" => (Access::PortOut, 1),
        "pio" | "async" | "coalesced" | "ioeventfd" | "pio2" => (Access::PortOut, iterations),
        other => fail(&format!("unknown mode {other}")),
    };
    let conn = Connection::from_env().unwrap_or_else(|e| fail(&format!("connect: {e}")));
    let connected_ns = monotonic_ns();
    let ram = GuestRam::new(RAM_SIZE).unwrap_or_else(|e| fail(&format!("ram: {e}")));
    ram.write(CODE, &loop_code(access, iterations))
        .unwrap_or_else(|e| fail(&format!("{e}")));
    let _mem = ram
        .map(&conn)
        .unwrap_or_else(|e| fail(&format!("map: {e}")));
    let port = u64::from(LOOP_PORT);
    let mut io_event = None;
    let reserve = match mode.as_str() {
        "async" => conn.reserve_async_write_range(AddressSpace::IoPort, port, 1),
        "coalesced" => conn.reserve_coalesced_range(AddressSpace::IoPort, port, 1),
        "ioeventfd" => {
            io_event = Some(
                conn.create_io_event(AddressSpace::IoPort, port, Datamatch::Any)
                    .unwrap_or_else(|e| fail(&format!("io event: {e}"))),
            );
            Ok(())
        }
        "mmio-write" | "mmio-read" => conn.reserve_range(AddressSpace::Mmio, MMIO_ADDR, 1),
        _ => conn.reserve_range(AddressSpace::IoPort, port, 1),
    };
    reserve.unwrap_or_else(|e| fail(&format!("reserve: {e}")));
    conn.reserve_range(AddressSpace::IoPort, u64::from(DONE_PORT), 1)
        .unwrap_or_else(|e| fail(&format!("reserve: {e}")));

    let reserved = (mode == "reserve").then(|| reserve_many(&conn, ranges.saturating_sub(2)));

    let n = conn.vcpu_count() as u32;
    let mut workers = Vec::new();
    for id in 0..n {
        let vcpu = conn
            .vcpu(id)
            .unwrap_or_else(|e| fail(&format!("vcpu: {e}")));
        workers.push(std::thread::spawn(move || {
            let mut v = vcpu.lock();
            let mut exits = 0u64;
            let mut init_ns = 0;
            let mut exit_ns = 0;
            let mut start = None;
            loop {
                let ev = v.wait().unwrap_or_else(|e| fail(&format!("wait: {e}")));
                if exit_ns == 0 && matches!(ev, VcpuEvent::Io { .. }) {
                    exit_ns = monotonic_ns();
                }
                match ev {
                    VcpuEvent::Init => {
                        init_ns = monotonic_ns();
                        enter_real_mode(&mut v, CODE as u16, 0x8000)
                            .unwrap_or_else(|e| fail(&format!("{e}")));
                        start = Some(Instant::now());
                    }
                    VcpuEvent::Io { address, .. } if address == u64::from(DONE_PORT) => {
                        let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
                        return (exits, secs, init_ns, exit_ns, monotonic_ns());
                    }
                    VcpuEvent::Io {
                        no_resume: true, ..
                    } => {
                        exits += 1;
                        continue;
                    }
                    VcpuEvent::CoalescedWrites(ws) => {
                        exits += ws.len() as u64;
                        continue;
                    }
                    VcpuEvent::Io {
                        is_write: false, ..
                    } => {
                        exits += 1;
                        v.resume_io_read(&[0])
                            .unwrap_or_else(|e| fail(&format!("resume: {e}")));
                        continue;
                    }
                    VcpuEvent::Io { .. } => exits += 1,
                    _ => {}
                }
                v.resume().unwrap_or_else(|e| fail(&format!("resume: {e}")));
            }
        }));
    }
    conn.start()
        .unwrap_or_else(|e| fail(&format!("start: {e}")));
    let results: Vec<(u64, f64, u64, u64, u64)> = workers
        .into_iter()
        .map(|w| w.join().unwrap_or_else(|_| fail("vcpu thread panicked")))
        .collect();
    let (anon, file, shmem) = host_rss();
    let mut exits: u64 = results.iter().map(|r| r.0).sum();
    let mut secs = results.iter().map(|r| r.1).fold(0.0, f64::max);
    if let Some(reserve_secs) = reserved {
        exits = u64::from(ranges);
        secs = reserve_secs;
    }
    if let Some(evt) = &io_event {
        let mut buf = [0u8; 8];
        if nix::unistd::read(evt.fd().as_fd(), &mut buf).is_ok() {
            exits = u64::from_ne_bytes(buf);
        }
    }
    println!(
        "RESULT exits={exits} secs={secs:.6} init_ns={} rss_anon_kb={anon} rss_file_kb={file} rss_shmem_kb={shmem} \
         main_ns={main_ns} connected_ns={connected_ns} exit_ns={} done_ns={}",
        results[0].2, results[0].3, results[0].4
    );
    if mode == "hold" {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::thread::sleep(std::time::Duration::from_millis(hold_ms()));
    }
    // Leave while the vcpus are stopped in their done exits.
    std::process::exit(0);
}

/// `hold [VCPUS [MS]]`: how long to hold (default 500 ms).
fn hold_ms() -> u64 {
    std::env::args()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}
