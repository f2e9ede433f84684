//! Start-up shared by the small SDK test plugins (`diag`, `sdk_wait`):
//! included with `#[path]` by each binary.
//!
//! One vcpu, 64 KiB of guest RAM holding `code` at [`CODE`], the done port
//! reserved; optionally an overlapping reservation that must be refused
//! (its error is printed for the tests). Every failure ends the plugin with
//! `NAME: FAILED: ...` and exit status 1.

use crosvm_plugin::{AddressSpace, Connection, Error, GuestRam, Memory, Vcpu, VcpuEvent};

pub const CODE: u64 = 0x1000;
pub const DONE_PORT: u16 = 0x501;

pub fn fail(name: &str, msg: String) -> ! {
    eprintln!("{name}: FAILED: {msg}");
    std::process::exit(1);
}

pub fn ok<T>(name: &str, what: &str, r: Result<T, Error>) -> T {
    r.unwrap_or_else(|e| fail(name, format!("{what}: {e}")))
}

/// The machine, started: keep it alive while the vcpu runs.
pub struct Booted {
    pub vcpu: Vcpu,
    _mem: Memory,
    /// Guest RAM, for plugins that set up page tables and the like (not
    /// every including binary reads it).
    #[allow(dead_code)]
    pub ram: GuestRam,
    _conn: Connection,
}

/// Builds the machine and starts it (the vcpu's `Init` is still to come).
pub fn boot(name: &str, code: &[u8], probe_overlap: bool) -> Booted {
    let conn = ok(name, "connect", Connection::from_env());
    let ram = ok(name, "guest RAM", GuestRam::new(0x10000));
    ok(name, "loading code", ram.write(CODE, code));
    let mem = ok(name, "registering RAM", ram.register(&conn, 0));
    ok(
        name,
        "reserve",
        conn.reserve_range(AddressSpace::IoPort, u64::from(DONE_PORT), 1),
    );
    if probe_overlap {
        match conn.reserve_range(AddressSpace::IoPort, 0x500, 4) {
            Err(e) => println!("{name}: overlap refused: {e}"),
            Ok(()) => fail(name, "an overlapping reservation was accepted".into()),
        }
    }
    let vcpu = ok(name, "vcpu 0", conn.vcpu(0));
    ok(name, "start", conn.start());
    Booted {
        vcpu,
        ram,
        _mem: mem,
        _conn: conn,
    }
}

/// Ends the plugin with status 0 without running destructors: dropping the
/// guest RAM's `Memory` would remove the memory slot while the guest may
/// still be executing from it (after its last resume it goes on to `hlt`),
/// which KVM reports as an internal error. vmm tears the VM down when the
/// plugin exits.
pub fn leave(booted: Booted) -> ! {
    std::mem::forget(booted);
    std::process::exit(0)
}

/// The first event must be `Init`.
pub fn expect_init(name: &str, event: Result<VcpuEvent<'_>, Error>) {
    match ok(name, "first wait", event) {
        VcpuEvent::Init => {}
        other => fail(name, format!("first event is {other:?}")),
    }
}
