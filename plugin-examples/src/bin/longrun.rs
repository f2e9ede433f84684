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
//! binaries apart.

use std::sync::{Arc, Mutex, MutexGuard};

use crosvm_plugin::{
    AddressSpace, Checkpoint, Connection, ControlKind, DeviceState, RestartKind, VcpuEvent,
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

/// Serves the control channel: `SAVE_STATE` from the device, `state` as
/// JSON. A host without the channel only means no snapshots.
fn serve_control(conn: &Connection, device: &Arc<Mutex<Device>>) {
    let control = match conn.control_channel() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("longrun: no control channel ({e}): snapshots are not possible");
            return;
        }
    };
    let shared = device.clone();
    let served = control.spawn_handler_with_state(device.clone(), move |cmd| match &cmd.kind {
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

fn run(rounds: u32) -> Result<u64> {
    let conn = Connection::from_env()?;
    require_vcpus(&conn, "longrun", 1);
    let mut attached = conn.attach()?;
    eprintln!(
        "longrun build {}, generation {}",
        std::hint::black_box(BUILD_MARK),
        attached.generation()
    );
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
    if let Err(e) = conn.declare_restartable(Some(&checkpoint)) {
        eprintln!("longrun: no hot restart ({e})");
    }
    match conn.restore_state()? {
        // A snapshot taken without device state: the device starts afresh.
        Some(blob) if blob.is_empty() => {
            eprintln!("longrun: restoring a snapshot without device state")
        }
        Some(blob) => {
            lock(&device).restore(&blob)?;
            eprintln!(
                "longrun: restoring a snapshot, device state {}",
                lock(&device).to_json()
            );
        }
        None => {}
    }
    serve_control(&conn, &device);

    conn.start()?;
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
                commit(&mut checkpoint, &v, &device)?;
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
        commit(&mut checkpoint, &v, &device)?;
        v.resume()?;
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
