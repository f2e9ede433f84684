//! `counter`: a long-running machine with a power button, managed over the
//! control socket (docs/protocol-extensions.md §5).
//!
//! The guest (64-bit long mode: under nested KVM such as PVM only long
//! mode runs natively, real and protected mode code may be emulated one
//! instruction at a time) adds 1 to a 32-bit counter in guest memory in a
//! tight loop and, every 2^24 TSC cycles (a few ms), reads the machine's
//! status port: a few hundred exits a second keep it cheap for the host. When the
//! status shows the power button, it writes the shutdown port and halts.
//!
//! The plugin opens its control channel and answers
//! * `powerbtn`: presses the power button (the guest shuts down cleanly;
//!   the plugin prints `guest shut down cleanly` and exits 0);
//! * `plugin count`: `{"count": N}`, read from guest memory;
//! * anything else: refused (`ENOTSUP` for `sleepbtn`, `EINVAL` for an
//!   unknown name).
//!
//! It prints `count N` every 500 ms. If the host stops the VM (`vmm stop`,
//! SIGTERM) it prints where the counter got to and exits 0 as well.
//!
//! `counter [POWERBTN_MS]`: with an argument, the plugin presses its own
//! power button after that many milliseconds (0, the default: never), the
//! same path a forwarded `powerbtn` takes; the tests use it on hosts
//! without a control socket.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crosvm_plugin::machine::{enter_long_mode, SYSTEM_TABLES_SIZE};
use crosvm_plugin::{AddressSpace, Connection, ControlKind, GuestRam, VcpuEvent};
use iced_x86::code_asm::*;
use plugin_examples::{exit_with, parse_args, require_vcpus, Result};

/// Reads the machine status: bit 0 = the power button was pressed.
const STATUS_PORT: u64 = 0x510;
const STATUS_POWER_BUTTON: u8 = 1;
/// A write stops the machine.
const SHUTDOWN_PORT: u64 = 0x501;
const CODE: u64 = 0x1000;
/// The guest's 32-bit counter.
const COUNTER: u64 = 0x3000;
const STACK: u64 = 0x7000;
/// The GDT and page tables the SDK writes for long mode.
const TABLES: u64 = 0x8000;
const RAM_SIZE: u64 = 0x10000;
const _: () = assert!(TABLES + SYSTEM_TABLES_SIZE <= RAM_SIZE);
/// The guest reads the status port when this many TSC cycles passed since
/// the last read (a few ms: a few hundred exits a second, whatever the
/// speed of the vcpu).
const POLL_CYCLES: i32 = 1 << 24;
/// Increments between two looks at the TSC.
const TSC_CHECK_EVERY: u32 = 1 << 10;
const REPORT_EVERY: Duration = Duration::from_millis(500);

fn guest_code() -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(64)?;
    let mut outer = a.create_label();
    let mut inner = a.create_label();
    let mut off = a.create_label();
    a.xor(eax, eax)?;
    a.mov(dword_ptr(COUNTER as u32), eax)?;
    // rdi: the TSC at the last poll.
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(rdi, rax)?;
    a.set_label(&mut outer)?;
    a.mov(ecx, TSC_CHECK_EVERY)?;
    a.set_label(&mut inner)?;
    a.add(dword_ptr(COUNTER as u32), 1)?;
    a.dec(ecx)?;
    a.jnz(inner)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(rbx, rax)?;
    a.sub(rbx, rdi)?;
    a.cmp(rbx, POLL_CYCLES)?;
    a.jb(outer)?;
    a.mov(rdi, rax)?;
    a.mov(dx, STATUS_PORT as u32)?;
    a.in_(al, dx)?;
    a.test(al, STATUS_POWER_BUTTON as u32)?;
    a.jz(outer)?;
    a.set_label(&mut off)?;
    a.mov(dx, SHUTDOWN_PORT as u32)?;
    a.out(dx, al)?;
    a.hlt()?;
    a.jmp(off)?;
    Ok(a.assemble(CODE)?)
}

/// The guest's counter, read from guest memory (in one access: never torn).
fn count(ram: &GuestRam) -> Result<u32> {
    Ok(ram.read_u32(COUNTER)?)
}

/// Serves the control channel: the power button and `plugin count`.
fn serve_control(conn: &Connection, ram: Arc<GuestRam>, power: Arc<AtomicBool>) -> Result<()> {
    let control = match conn.control_channel() {
        Ok(c) => c,
        // An older host: the machine runs without management.
        Err(e) => {
            eprintln!("counter: no control channel ({e}); running without one");
            return Ok(());
        }
    };
    control.spawn_handler(move |cmd| match &cmd.kind {
        ControlKind::PowerButton => {
            power.store(true, Ordering::SeqCst);
            println!("power button pressed");
            Ok(b"null".to_vec())
        }
        ControlKind::Custom(name) if name == "count" => match count(&ram) {
            Ok(n) => Ok(format!("{{\"count\": {n}}}").into_bytes()),
            Err(e) => Err((libc::EIO, format!("cannot read the counter: {e}"))),
        },
        ControlKind::SleepButton => Err((libc::ENOTSUP, "this machine has no sleep button".into())),
        ControlKind::Custom(name) => Err((
            libc::EINVAL,
            format!("unknown command {name:?}; this machine knows \"count\""),
        )),
        _ => Err((libc::ENOTSUP, "unknown kind of command".into())),
    })?;
    Ok(())
}

fn run(powerbtn_ms: u64) -> Result<()> {
    let conn = Connection::from_env()?;
    require_vcpus(&conn, "counter", 1);

    let ram = Arc::new(GuestRam::new(RAM_SIZE)?);
    ram.write(CODE, &guest_code()?)?;
    let _mem = ram.register(&conn, 0)?;
    conn.reserve_range(AddressSpace::IoPort, STATUS_PORT, 1)?;
    conn.reserve_range(AddressSpace::IoPort, SHUTDOWN_PORT, 1)?;

    let power = Arc::new(AtomicBool::new(false));
    serve_control(&conn, Arc::clone(&ram), Arc::clone(&power))?;
    {
        let ram = Arc::clone(&ram);
        std::thread::Builder::new()
            .name("reporter".into())
            .spawn(move || loop {
                std::thread::sleep(REPORT_EVERY);
                if let Ok(n) = count(&ram) {
                    println!("count {n}");
                }
            })
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)))?;
    }
    if powerbtn_ms > 0 {
        let power = Arc::clone(&power);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(powerbtn_ms));
            println!("power button pressed");
            power.store(true, Ordering::SeqCst);
        });
    }

    let vcpu = conn.vcpu(0)?;
    conn.start()?;
    let mut v = vcpu.lock();
    loop {
        match v.wait()? {
            VcpuEvent::Init => enter_long_mode(&mut v, &ram, 0, TABLES, CODE, STACK)?,
            VcpuEvent::Io {
                address: STATUS_PORT,
                is_write: false,
                ..
            } => {
                let status = if power.load(Ordering::SeqCst) {
                    STATUS_POWER_BUTTON
                } else {
                    0
                };
                v.resume_io_read(&[status])?;
                continue;
            }
            VcpuEvent::Io {
                address: SHUTDOWN_PORT,
                ..
            } => {
                println!("guest shut down cleanly at count {}", count(&ram)?);
                return Ok(());
            }
            VcpuEvent::Shutdown => {
                // The host stopped the VM (`vmm stop`, SIGTERM): an orderly
                // end for this machine too.
                println!("the host stopped the VM at count {}", count(&ram)?);
                return Ok(());
            }
            _ => {}
        }
        v.resume()?;
    }
}

fn main() {
    let usage = "[POWERBTN_MS]   (press the power button after POWERBTN_MS ms; 0: never; one vcpu)";
    let ms = parse_args::<u64>("counter", usage, 1).map_or(0, |a| a[0]);
    if let Err(e) = run(ms) {
        exit_with(&e);
    }
}
