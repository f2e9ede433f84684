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
//!
//! Snapshots (docs/protocol-extensions.md §6): the device state (the
//! accumulator and the pieces of the result seen so far) lives behind a
//! mutex the vcpu thread and the control thread share; the control thread
//! answers `SAVE_STATE` with it, and the custom command `state` with it as
//! JSON (`vmm ctl S plugin state`). Under `vmm --restore DIR` the plugin
//! sets its machine up as on a fresh boot, loads the device state from
//! the snapshot before `Start`, and the host puts memory and the vcpu back:
//! the output continues with the next `progress` line and ends with the
//! same `result=`. `c/longrun.c` (`longrun_c`) is the same machine in C.
//!
//! Live migration (§8): `longrun N load` adds a writing load of the
//! plugin's own: a thread writes its sequence number into pages of an
//! extra memory region (at [`LOAD_GPA`]) through the SDK's
//! [`WriteTracker`], which answers the host's `DIRTY_PAGES` and freezes
//! the writer between `SAVE_STATE` and `RESUMED`. The load's state (its
//! sequence number and what it last wrote to each page) is part of the
//! device state. The writer starts at the vcpu's `Init`; a restored or
//! migrated load first checks every page holds what its state says the
//! load last wrote there (a write the source did not report would be
//! stale: the check at the end cannot see it, the writer rewrites every
//! page), and at the end every page is checked again (else exit 1 naming
//! the page). The result stays a function of `N`. (`longrun_c N load` is
//! the same load in C.)
//!
//! Hot restart (docs/protocol-extensions.md §9): the plugin declares it can
//! be restarted and commits its device state to a checkpoint (the SDK's
//! [`Checkpoint`]) at every exit, with the exit's serial, before resuming
//! it. A plugin started to replace it (`vmm ctl S upgrade`, or after a
//! crash under `--on-plugin-crash restart`) takes over guest memory and
//! the vcpu, loads the device from the old plugin's `SAVE_STATE` blob or
//! the checkpoint, and skips the side effects of an exit the checkpoint
//! already covers (one the old plugin applied but did not resume before it
//! died). The guest ends with the same `result=`. Each build prints its
//! build mark (`longrun build ...` on stderr): tests patch it to tell
//! binaries apart. Only the plain machine (no `load`, no `mem=`) declares
//! itself restartable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crosvm_plugin::{
    AddressSpace, Checkpoint, Connection, ControlKind, DeviceState, RestartKind, VcpuEvent,
    WriteTracker,
};
use plugin_examples::longrun::*;
use plugin_examples::{
    enter_real_mode, exit_with, parse_args, pc_irq_routes, require_vcpus, GuestRam, Result,
};

fn dword(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn lock(device: &Mutex<Device>) -> MutexGuard<'_, Device> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// Guest-physical address of the load's region.
const LOAD_GPA: u64 = 0x10_0000;
/// Pages the load writes.
const LOAD_PAGES: usize = 64;
/// Pause between two writes of the load (about 5,000 writes a second).
const LOAD_PAUSE: Duration = Duration::from_micros(200);

/// The load's state: its sequence number and what it last wrote to each
/// page.
struct Load {
    seq: u64,
    last: [u64; LOAD_PAGES],
}

impl Load {
    const LEN: usize = 8 + 8 * LOAD_PAGES;

    fn save(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        for v in self.last {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn restore(blob: &[u8]) -> Load {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&blob[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let mut last = [0u64; LOAD_PAGES];
        for (p, v) in last.iter_mut().enumerate() {
            *v = word(p + 1);
        }
        Load { seq: word(0), last }
    }

    /// The page write number `seq` goes to (a fixed scatter).
    fn page(seq: u64) -> usize {
        (seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % LOAD_PAGES
    }
}

/// The whole device state: the accumulator device, and the load's when
/// there is one (appended, so snapshots without a load stay as they were).
struct Machine {
    device: Arc<Mutex<Device>>,
    load: Option<Arc<Mutex<Load>>>,
}

impl DeviceState for Machine {
    fn save(&self) -> Vec<u8> {
        let mut out = lock(&self.device).save();
        if let Some(l) = &self.load {
            l.lock().unwrap_or_else(|e| e.into_inner()).save(&mut out);
        }
        out
    }

    fn restore(&mut self, blob: &[u8]) -> crosvm_plugin::Result<()> {
        let (dev, rest) = blob.split_at(blob.len().min(STATE_LEN));
        lock(&self.device).restore(dev)?;
        match (&self.load, rest.len()) {
            (None, 0) => Ok(()),
            (Some(l), Load::LEN) => {
                *l.lock().unwrap_or_else(|e| e.into_inner()) = Load::restore(rest);
                Ok(())
            }
            (Some(_), 0) => Err(crosvm_plugin::Error::BadDeviceState(
                "longrun: the saved machine had no load (run without `load`)".into(),
            )),
            (_, n) => Err(crosvm_plugin::Error::BadDeviceState(format!(
                "longrun: {n} bytes of load state, expected {} (with `load`) or none",
                Load::LEN
            ))),
        }
    }
}

/// Serves the control channel: `SAVE_STATE` from the device, `state` as
/// JSON, `DIRTY_PAGES` from the tracker. A host without the channel only
/// means no snapshots.
fn serve_control(
    conn: &Connection,
    device: &Arc<Mutex<Device>>,
    machine: Machine,
    tracker: Arc<WriteTracker>,
) {
    let control = match conn.control_channel() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("longrun: no control channel ({e}): snapshots are not possible");
            return;
        }
    };
    let shared = device.clone();
    let machine = Arc::new(Mutex::new(machine));
    let served = control.spawn_handler_tracked(machine, tracker, move |cmd| match &cmd.kind {
        ControlKind::Custom(name) if name == "state" => Ok(lock(&shared).to_json().into_bytes()),
        ControlKind::Resumed => Ok(Vec::new()),
        _ => Err((
            libc::ENOTSUP,
            "longrun knows only the command `state`".into(),
        )),
    });
    if let Err(e) = served {
        eprintln!("longrun: cannot serve the control channel ({e}): snapshots are not possible");
    }
}

/// This build's mark, printed at start (tests patch the digits in a copy
/// of the binary to get "a changed version").
static BUILD_MARK: &str = "longrun-build-00000001";

/// A replacing plugin: guest memory from the host, the device from the
/// old plugin's blob (upgrade) or the checkpoint (crash). Returns the RAM,
/// its memory handle, and the exit serial the device state covers.
fn take_over(
    attached: &mut crosvm_plugin::Attached,
    checkpoint: &Checkpoint,
    device: &Mutex<Device>,
    seen: u64,
) -> Result<(GuestRam, crosvm_plugin::Memory, u64)> {
    let mut memory = None;
    for id in attached.object_ids() {
        if let Ok(m) = attached.take_memory(id) {
            memory = Some(m);
            break;
        }
    }
    let Some((mem, fd)) = memory else {
        eprintln!("longrun: the host kept no guest memory for the restarted plugin");
        std::process::exit(1);
    };
    let ram = GuestRam::from_memfd(fd)?;
    let covered = match attached.kind() {
        RestartKind::Upgrade => {
            lock(device).restore(attached.state())?;
            seen
        }
        _ => match checkpoint.load()? {
            Some((serial, blob)) => {
                lock(device).restore(&blob)?;
                serial
            }
            None => 0,
        },
    };
    // The checkpoint is written before every resume: it covers every exit
    // the guest saw answered (`seen`), and at most the one re-delivered.
    if covered < seen || covered > seen + 1 {
        eprintln!(
            "longrun: the device state covers exit {covered}, but the guest saw {seen} exits \
             answered: it does not match the guest"
        );
        std::process::exit(1);
    }
    Ok((ram, mem, covered))
}

/// The load's writer: until `stop`, its next sequence number into its
/// next page, through the tracker.
fn spawn_load(
    ram: Arc<crosvm_plugin::GuestRam>,
    load: Arc<Mutex<Load>>,
    tracker: Arc<WriteTracker>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<crosvm_plugin::Result<()>> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            {
                let g = tracker.hold();
                let mut l = load.lock().unwrap_or_else(|e| e.into_inner());
                l.seq += 1;
                let seq = l.seq;
                let page = Load::page(seq);
                let offset = page as u64 * 4096;
                ram.write(offset, &seq.to_le_bytes())?;
                g.mark(LOAD_GPA + offset, 8);
                l.last[page] = seq;
            }
            std::thread::sleep(LOAD_PAUSE);
        }
        Ok(())
    })
}

/// Checks every load page holds what the load last wrote there (the
/// writer not running); exits 1 naming the page otherwise.
fn check_load(ram: &crosvm_plugin::GuestRam, l: &Load, when: &str) -> Result<()> {
    for (p, &want) in l.last.iter().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&ram.read(p as u64 * 4096, 8)?);
        let got = u64::from_le_bytes(b);
        if got != want {
            eprintln!(
                "longrun: {when}, load page {p} (guest {:#x}) holds {got:#x}, the load last wrote {want:#x} there",
                LOAD_GPA + p as u64 * 4096
            );
            std::process::exit(1);
        }
    }
    eprintln!(
        "longrun: {when}, load: {} writes, every page holds its last",
        l.seq
    );
    Ok(())
}

/// Guest-physical address of the `mem=MIB` region.
const EXTRA_GPA: u64 = 0x1000_0000;

fn run(rounds: u32, with_load: bool, extra_mib: u64) -> Result<u64> {
    let conn = Connection::from_env()?;
    require_vcpus(&conn, "longrun", 1);
    let mut attached = conn.attach()?;
    eprintln!(
        "longrun build {}, generation {}",
        std::hint::black_box(BUILD_MARK),
        attached.generation()
    );
    // Only the plain machine takes part in hot restart: a replacing plugin
    // takes over one memory region and the accumulator's state.
    let restartable = !with_load && extra_mib == 0;
    if attached.is_restart() && !restartable {
        eprintln!("longrun: `load` and `mem=` machines cannot be restarted");
        std::process::exit(1);
    }
    let checkpoint = attached.take_checkpoint()?;
    let mut checkpoint = match checkpoint {
        Some(c) => c,
        None => Checkpoint::new(64)?,
    };
    let vcpu = conn.vcpu(0)?;
    let device = Arc::new(Mutex::new(Device::default()));
    // Exits up to this serial are in the device state already.
    let mut covered = 0;
    let (ram, _mem) = if attached.is_restart() {
        let seen = vcpu.lock().serial();
        let (ram, mem, c) = take_over(&mut attached, &checkpoint, &device, seen)?;
        covered = c;
        eprintln!(
            "longrun: took over the running VM ({:?}), device state {}, exits {seen} answered, \
             {covered} in the state",
            attached.kind(),
            lock(&device).to_json()
        );
        (ram, mem)
    } else {
        let ram = GuestRam::new(MEM_SIZE)?;
        ram.write(CODE, &guest_main()?)?;
        ram.write(HANDLER, &guest_handler()?)?;
        ram.write(ROUNDS, &rounds.to_le_bytes())?;
        let mem = ram.map(&conn)?;
        conn.reserve_range(AddressSpace::IoPort, ACC_PORT, 4)?;
        conn.reserve_range(AddressSpace::IoPort, PROGRESS_PORT, 4)?;
        conn.reserve_range(AddressSpace::IoPort, RESULT_PORT, 8)?;
        conn.reserve_range(AddressSpace::IoPort, SHUTDOWN_PORT, 1)?;
        conn.set_irq_routing(&pc_irq_routes())?;
        (ram, mem)
    };
    if restartable {
        if let Err(e) = conn.declare_restartable(Some(&checkpoint)) {
            eprintln!("longrun: no hot restart ({e})");
        }
    }
    // The load's region exists before the restore state is asked for (a
    // migration's memory arrives first).
    let load_ram = if with_load {
        let r = Arc::new(crosvm_plugin::GuestRam::new((LOAD_PAGES * 4096) as u64)?);
        Some((r.register(&conn, LOAD_GPA)?, r))
    } else {
        None
    };

    // `mem=MIB`: memory the guest never reads, one word written per page
    // (so each page is data a migration or snapshot must move).
    let _extra = if extra_mib > 0 {
        let r = crosvm_plugin::GuestRam::new(extra_mib << 20)?;
        // Before the restore state is asked for: a restore or a migration
        // writes every page of it again.
        for page in 0..(extra_mib << 20) / 4096 {
            r.write(page * 4096, &(page + 1).to_le_bytes())?;
        }
        Some((r.register(&conn, EXTRA_GPA)?, r))
    } else {
        None
    };

    let load = with_load.then(|| {
        Arc::new(Mutex::new(Load {
            seq: 0,
            last: [0; LOAD_PAGES],
        }))
    });
    let mut machine = Machine {
        device: device.clone(),
        load: load.clone(),
    };
    // The load's state came with a restored device state: its pages are
    // checked against it before the writer runs again.
    let mut state_restored = false;
    match conn.restore_state()? {
        // A snapshot taken without device state: the device starts afresh.
        Some(blob) if blob.is_empty() => {
            eprintln!("longrun: restoring a snapshot without device state")
        }
        Some(blob) => {
            machine.restore(&blob)?;
            state_restored = true;
            eprintln!(
                "longrun: restoring a snapshot, device state {}",
                lock(&device).to_json()
            );
        }
        None => {}
    }
    let tracker = Arc::new(WriteTracker::new());
    serve_control(&conn, &device, machine, tracker.clone());

    conn.start()?;
    let stop = Arc::new(AtomicBool::new(false));
    // The writer starts at the vcpu's Init: memory is back by then (a
    // migration's before the restore state was answered, a snapshot's
    // after Start, before the vcpu exists).
    let mut writer = None;
    let mut v = vcpu.lock();
    loop {
        let before = v.serial();
        let event = v.wait()?;
        // An exit the device state already has (the old plugin applied it
        // and died before resuming it): answer it without its effects. (An
        // exit that needs a resume has the serial after `before`.)
        let replay = event.needs_resume() && before < covered;
        let event = if replay {
            match event {
                VcpuEvent::Io {
                    address: ACC_PORT,
                    is_write: false,
                    ..
                } => {
                    let answer = lock(&device).read();
                    v.resume_io_read(&answer.to_le_bytes())?;
                    continue;
                }
                VcpuEvent::Io {
                    address: SHUTDOWN_PORT,
                    ..
                } => break,
                _ => {
                    v.resume()?;
                    continue;
                }
            }
        } else {
            event
        };
        match event {
            VcpuEvent::Init => {
                enter_real_mode(&mut v, CODE as u16, STACK)?;
                plugin_examples::route_pic_to_lapic(&mut v)?;
                if let (None, Some((_, r)), Some(l)) = (&writer, &load_ram, &load) {
                    // A restored load: every write its state accounts for is
                    // in the pages, before the writer overwrites any again
                    // (the check at the end cannot see a lost write).
                    if state_restored {
                        check_load(r, &l.lock().unwrap_or_else(|e| e.into_inner()), "restored")?;
                    }
                    writer = Some(spawn_load(
                        r.clone(),
                        l.clone(),
                        tracker.clone(),
                        stop.clone(),
                    ));
                }
            }
            VcpuEvent::Io {
                address: ACC_PORT,
                is_write: true,
                data,
                ..
            } => lock(&device).write(dword(data)),
            VcpuEvent::Io {
                address: ACC_PORT,
                is_write: false,
                ..
            } => {
                if restartable {
                    commit(&mut checkpoint, &v, &device)?;
                }
                let answer = lock(&device).read();
                v.resume_io_read(&answer.to_le_bytes())?;
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
            } => lock(&device).fold = Some(dword(data)),
            VcpuEvent::Io { address, data, .. } if address == RESULT_PORT + 4 => {
                lock(&device).x = Some(dword(data))
            }
            VcpuEvent::Io {
                address: SHUTDOWN_PORT,
                ..
            } => break,
            VcpuEvent::Shutdown => return Err(plugin_examples::ExampleError::Stopped),
            _ => {}
        }
        if restartable {
            commit(&mut checkpoint, &v, &device)?;
        }
        v.resume()?;
    }
    stop.store(true, Ordering::Relaxed);
    if let (Some(w), Some((_, r)), Some(l)) = (writer, &load_ram, &load) {
        match w.join() {
            Ok(r) => r?,
            Err(_) => {
                eprintln!("longrun: the load's writer panicked");
                std::process::exit(1);
            }
        }
        check_load(
            r,
            &l.lock().unwrap_or_else(|e| e.into_inner()),
            "at the end",
        )?;
    }
    let ticks = dword(&ram.read(TICKS, 4)?);
    eprintln!("longrun: {ticks} timer interrupts arrived during the run");
    let Some(result) = lock(&device).result() else {
        eprintln!("longrun: the guest stopped without reporting its result");
        std::process::exit(1);
    };
    Ok(result)
}

/// The device state as of the current exit, before it is resumed.
fn commit(
    checkpoint: &mut Checkpoint,
    v: &crosvm_plugin::VcpuGuard<'_>,
    device: &Mutex<Device>,
) -> Result<()> {
    let blob = lock(device).save();
    Ok(checkpoint.commit(v.serial(), &blob)?)
}

fn main() {
    let usage = "[--plugin-args N [load] [mem=MIB]]   (rounds of 4,096 steps, 1..=100000; \
                 default 20; load: a writing load of the plugin's own; mem=MIB: that much more \
                 guest memory, 1..=4096, filled before the start)";
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut with_load = false;
    let mut extra_mib = 0u64;
    for a in args.iter().skip(1) {
        match a.strip_prefix("mem=").map(str::parse::<u64>) {
            _ if a == "load" => with_load = true,
            Some(Ok(m)) if (1..=4096).contains(&m) => extra_mib = m,
            _ => plugin_examples::usage_error("longrun", usage, &format!("bad argument {a:?}")),
        }
    }
    let rounds = if args.len() > 1 {
        args[0].parse::<u32>().unwrap_or_else(|_| {
            plugin_examples::usage_error("longrun", usage, &format!("bad argument {:?}", args[0]))
        })
    } else {
        parse_args::<u32>("longrun", usage, 1).map_or(20, |a| a[0])
    };
    if !(1..=100_000).contains(&rounds) {
        plugin_examples::usage_error("longrun", usage, "N must be 1..=100000");
    }
    match run(rounds, with_load, extra_mib) {
        Ok(result) => println!("result={result:#018x}"),
        Err(e) => exit_with(&e),
    }
}
