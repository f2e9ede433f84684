//! Shared pieces of the example machines: guest RAM from a sealed memfd,
//! real-mode vcpu setup, a runtime x86 assembler, argument and vcpu-count
//! checks, and (for test plugins) a shutdown watcher.

pub mod longrun;

use std::ffi::{c_char, c_int, CString};
use std::os::fd::BorrowedFd;

use crosvm_plugin::{Connection, VcpuGuard};
use iced_x86::code_asm::CodeAssembler;

/// Errors of the example helpers.
#[derive(Debug)]
pub enum ExampleError {
    Sys(nix::errno::Errno),
    Plugin(crosvm_plugin::Error),
    Asm(iced_x86::IcedError),
    /// The host stopped the VM (`VcpuEvent::Shutdown`) before the guest
    /// finished.
    Stopped,
}

impl std::fmt::Display for ExampleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExampleError::Sys(e) => write!(f, "system call failed: {e}"),
            ExampleError::Plugin(e) => write!(f, "plugin API call failed: {e}"),
            ExampleError::Asm(e) => write!(f, "assembling guest code failed: {e}"),
            ExampleError::Stopped => {
                f.write_str("the host stopped the VM before the guest finished")
            }
        }
    }
}

impl std::error::Error for ExampleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExampleError::Sys(e) => Some(e),
            ExampleError::Plugin(e) => Some(e),
            ExampleError::Asm(e) => Some(e),
            ExampleError::Stopped => None,
        }
    }
}

impl From<nix::errno::Errno> for ExampleError {
    fn from(e: nix::errno::Errno) -> Self {
        ExampleError::Sys(e)
    }
}

impl From<crosvm_plugin::Error> for ExampleError {
    fn from(e: crosvm_plugin::Error) -> Self {
        ExampleError::Plugin(e)
    }
}

impl From<iced_x86::IcedError> for ExampleError {
    fn from(e: iced_x86::IcedError) -> Self {
        ExampleError::Asm(e)
    }
}

pub type Result<T> = std::result::Result<T, ExampleError>;

/// Guest RAM for the examples: the SDK's [`crosvm_plugin::GuestRam`]
/// (a sealed memfd, mapped here) with the examples' error type.
pub struct GuestRam(crosvm_plugin::GuestRam);

impl GuestRam {
    pub fn new(size: u64) -> Result<GuestRam> {
        Ok(GuestRam(crosvm_plugin::GuestRam::new(size)?))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.fd()
    }

    pub fn size(&self) -> u64 {
        self.0.size()
    }

    /// Copies `bytes` to guest-physical `gpa` (RAM starts at guest address 0).
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<()> {
        Ok(self.0.write(gpa, bytes)?)
    }

    /// Reads `len` bytes at guest-physical `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        Ok(self.0.read(gpa, len)?)
    }

    /// Maps a guest RAM memfd the host kept for a restarted plugin.
    pub fn from_memfd(fd: std::os::fd::OwnedFd) -> Result<GuestRam> {
        Ok(GuestRam(crosvm_plugin::GuestRam::from_memfd(fd)?))
    }

    /// Maps the whole RAM at guest address 0 through `conn`.
    pub fn map(&self, conn: &Connection) -> Result<crosvm_plugin::Memory> {
        Ok(self.0.register(conn, 0)?)
    }
}

/// Puts a vcpu (in its Init event) into 16-bit real mode at `0:ip`, with the
/// stack at `0:sp`, and makes it runnable (the SDK's
/// [`crosvm_plugin::machine::enter_real_mode`]).
pub fn enter_real_mode(v: &mut VcpuGuard<'_>, ip: u16, sp: u16) -> Result<()> {
    Ok(crosvm_plugin::machine::enter_real_mode(v, ip, sp)?)
}

/// The PC's standard GSI wiring: ISA IRQs 0-7 on the master PIC, 8-15 on
/// the slave, and every one also on the IOAPIC, with the timer (IRQ 0) on
/// IOAPIC pin 2.
pub fn pc_irq_routes() -> Vec<crosvm_plugin::IrqRoute> {
    use crosvm_plugin::kvm_bindings::{
        KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    };
    use crosvm_plugin::{IrqRoute, IrqRouteKind};
    let route = |irq_id, irqchip, pin| IrqRoute {
        irq_id,
        kind: IrqRouteKind::Irqchip { irqchip, pin },
    };
    (0..16u32)
        .flat_map(|irq| {
            let pic = if irq < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            let ioapic_pin = if irq == 0 { 2 } else { irq };
            [
                route(irq, pic, irq & 7),
                route(irq, KVM_IRQCHIP_IOAPIC, ioapic_pin),
            ]
        })
        .collect()
}

/// Offset of LVT LINT0 in the local APIC register page.
const APIC_LVT0: usize = 0x350;
/// LVT delivery mode ExtINT, unmasked.
const LVT_EXTINT: u32 = 0x700;

/// Puts the vcpu's local APIC LINT0 in ExtINT mode, so that interrupts of
/// the in-kernel PIC reach the vcpu (what a PC's firmware does).
pub fn route_pic_to_lapic(v: &mut VcpuGuard<'_>) -> Result<()> {
    let mut lapic = v.get_lapic_state()?;
    for (i, b) in LVT_EXTINT.to_le_bytes().iter().enumerate() {
        lapic.regs[APIC_LVT0 + i] = *b as _;
    }
    Ok(v.set_lapic_state(&lapic)?)
}

/// Emits the PC's interrupt set-up in guest code: the master PIC at vector
/// base 8 (slave on IRQ 2, 8086 mode, only IRQ0 unmasked), the slave PIC at
/// base 0x70 (all masked), PIT channel 0 as a rate generator (mode 2) with
/// `pit_divisor` (1193 ≈ 1 kHz); interrupts stay disabled.
pub fn asm_pic_and_pit(
    a: &mut CodeAssembler,
    pit_divisor: u16,
) -> std::result::Result<(), iced_x86::IcedError> {
    use iced_x86::code_asm::al;
    for (port, value) in [
        (0x20u32, 0x11u32),
        (0x21, 0x08),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xfe),
        (0xa0, 0x11),
        (0xa1, 0x70),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0xa1, 0xff),
    ] {
        a.mov(al, value)?;
        a.out(port, al)?;
    }
    a.mov(al, 0x34u32)?;
    a.out(0x43u32, al)?;
    a.mov(al, u32::from(pit_divisor & 0xff))?;
    a.out(0x40u32, al)?;
    a.mov(al, u32::from(pit_divisor >> 8))?;
    a.out(0x40u32, al)?;
    Ok(())
}

/// Assembles 16-bit code for load address `base`.
pub fn assemble16(
    base: u64,
    build: impl FnOnce(&mut CodeAssembler) -> std::result::Result<(), iced_x86::IcedError>,
) -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(16)?;
    build(&mut a)?;
    Ok(a.assemble(base)?)
}

/// Prints `NAME: PROBLEM` and the usage line, and exits with status 2.
pub fn usage_error(name: &str, usage: &str, problem: &str) -> ! {
    eprintln!("{name}: {problem}\nusage: vmm --plugin {name} {usage}");
    std::process::exit(2);
}

/// The plugin's arguments parsed as `T`: none (the defaults are used), or
/// exactly `count`; anything else prints the usage and exits.
pub fn parse_args<T: std::str::FromStr>(name: &str, usage: &str, count: usize) -> Option<Vec<T>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        usage_error(name, usage, "help requested");
    }
    if args.is_empty() {
        return None;
    }
    if args.len() != count {
        usage_error(
            name,
            usage,
            &format!("expected {count} argument(s), got {}", args.len()),
        );
    }
    Some(
        args.iter()
            .map(|a| {
                a.parse()
                    .unwrap_or_else(|_| usage_error(name, usage, &format!("bad argument {a:?}")))
            })
            .collect(),
    )
}

/// Refuses (status 2, with a message) to run on more vcpus than the machine
/// drives: a vcpu nobody waits on would hold every other vcpu at the start
/// barrier forever.
pub fn require_vcpus(conn: &Connection, name: &str, max: usize) {
    let n = conn.vcpu_count();
    if n > max {
        eprintln!(
            "{name}: this machine drives {max} vcpu(s) but the VM has {n}; run vmm with --cpus {max} (or without --cpus)"
        );
        std::process::exit(2);
    }
}

/// Exits the process with status 1 when the host signals shutdown (for
/// instance because a vcpu stopped unexpectedly), so the machine never
/// outlives its VM.
pub fn exit_on_host_shutdown(conn: &Connection) -> Result<()> {
    let fd = conn.get_shutdown_eventfd()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 8];
        if nix::unistd::read(&fd, &mut buf).is_ok() {
            eprintln!("the host is shutting the VM down");
            std::process::exit(1);
        }
    });
    Ok(())
}

/// Prints an error with its whole source chain and exits with status 1.
pub fn exit_with(e: &dyn std::error::Error) -> ! {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// The `main` of a C machine: `int NAME(int argc, char **argv)`.
pub type CMain = unsafe extern "C" fn(c_int, *const *const c_char) -> c_int;

/// Runs a C machine's `main` (compiled by the build script against
/// `crosvm.h`) with this process's arguments and exits with its status.
pub fn run_c_main(main: CMain) -> ! {
    let args: Vec<CString> = std::env::args()
        .map(|a| CString::new(a).unwrap_or_default())
        .collect();
    let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let argc = c_int::try_from(args.len()).unwrap_or(c_int::MAX);
    // SAFETY: argv holds `argc` valid NUL-terminated strings (kept alive by
    // `args`) followed by NULL, as C's main expects; `main` is a C main
    // function of the examples' archive.
    let code = unsafe { main(argc, argv.as_ptr()) };
    std::process::exit(code);
}
