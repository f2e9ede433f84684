//! The C API of `crosvm.h` (plugin API 0.22): a thin shim over the Rust SDK.
//!
//! Every function converts C arguments, calls the SDK, and converts the
//! result to `0` / `-errno` (or a descriptor). No protocol logic lives here.
//! Handles and pointers are not validated (docs/c-api.md §7): passing NULL or a
//! stale handle is undefined behaviour, as in the reference library.
//!
//! Where this library deliberately differs from the reference:
//! * failing system calls are reported as negative errno values (the
//!   reference returned them positive);
//! * `crosvm_create_io_event` with a NULL `datamatch` and a non-zero length
//!   matches any value (sent as length 0) instead of dereferencing NULL;
//! * a second successful `crosvm_connect` in one process fails with
//!   `-EBUSY` instead of giving the inherited socket a second owner;
//! * more than 16 vcpus are supported (chunked `GetVcpus` extension);
//! * if a create reply lacks its descriptors, the object is destroyed again
//!   before `-EPROTO` is returned (the reference left it on the VMM);
//! * `crosvm_vcpu_wait` returns `-ESHUTDOWN` (event not written) once the
//!   host stops the VM, instead of blocking until the plugin is killed, and
//!   `-EBUSY` when the previous event was not resumed, instead of blocking
//!   forever; `crosvm_vcpu_resume` after the shutdown returns `-ESHUTDOWN`;
//! * `crosvm_connect` also fetches a shutdown eventfd for the library's own
//!   use (one extra `GetShutdownEventfd` request);
//! * with `CROSVM_PLUGIN_LOG=debug` every failure's text (request,
//!   arguments, errno name) is printed to stderr.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_ioapic_state, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs,
};

use crate::error::{Error, Result};
use crate::objects::{DestroyInPlace, IoEvent, IrqEvent, Memory};
use crate::types::{
    ipv4_to_wire, AddressSpace, CallHint, Datamatch, HintDetail, IrqRoute, IrqRouteKind,
    MAX_HINT_DETAIL_COUNT,
};
use crate::vcpu::{VcpuEvent, VcpuGuard, VcpuSlot};
use crate::Connection;

mod restart;
mod tracker;
pub use restart::{crosvm_attached, crosvm_checkpoint};
pub use tracker::crosvm_write_tracker;

/// `CROSVM_MAX_HINT_COUNT`.
pub const CROSVM_MAX_HINT_COUNT: u32 = 1;
/// `CROSVM_HINT_ON_WRITE`.
pub const CROSVM_HINT_ON_WRITE: u16 = 0x1;

/// `CROSVM_IRQ_ROUTE_IRQCHIP`.
pub const CROSVM_IRQ_ROUTE_IRQCHIP: u32 = 0;
/// `CROSVM_IRQ_ROUTE_MSI`.
pub const CROSVM_IRQ_ROUTE_MSI: u32 = 1;

/// `crosvm_vcpu_event_kind` values.
pub const CROSVM_VCPU_EVENT_KIND_INIT: u32 = 0;
pub const CROSVM_VCPU_EVENT_KIND_IO_ACCESS: u32 = 1;
pub const CROSVM_VCPU_EVENT_KIND_PAUSED: u32 = 2;
pub const CROSVM_VCPU_EVENT_KIND_HYPERV_HCALL: u32 = 3;
pub const CROSVM_VCPU_EVENT_KIND_HYPERV_SYNIC: u32 = 4;
/// Extension (`crosvm_ext.h`): a batch of coalesced writes.
pub const CROSVM_VCPU_EVENT_KIND_COALESCED_WRITES: u32 = 1000;

// ---------------------------------------------------------------------------
// Opaque handles.

/// `struct crosvm`: one main connection.
pub struct crosvm {
    conn: Connection,
}

/// `struct crosvm_io`.
pub struct crosvm_io {
    io: IoEvent,
}

/// `struct crosvm_memory`.
pub struct crosvm_memory {
    mem: Memory,
}

/// `struct crosvm_irq`.
pub struct crosvm_irq {
    irq: IrqEvent,
}

/// `struct crosvm_vcpu`: an entry of the shared vcpu table (library-owned).
#[repr(transparent)]
pub struct crosvm_vcpu(VcpuSlot);

// ---------------------------------------------------------------------------
// Structures with the exact layouts of docs/c-api.md §6.

/// `struct crosvm_net_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct crosvm_net_config {
    pub tap_fd: c_int,
    pub host_ip: u32,
    pub netmask: u32,
    pub host_mac_address: [u8; 6],
    pub _padding: [u8; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct crosvm_irq_route_irqchip {
    pub irqchip: u32,
    pub pin: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct crosvm_irq_route_msi {
    pub address: u64,
    pub data: u32,
    pub _reserved: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union crosvm_irq_route_union {
    pub irqchip: crosvm_irq_route_irqchip,
    pub msi: crosvm_irq_route_msi,
    pub _reserved: [u8; 16],
}

/// `struct crosvm_irq_route`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct crosvm_irq_route {
    pub irq_id: u32,
    pub kind: u32,
    pub route: crosvm_irq_route_union,
}

/// `struct crosvm_hint_detail` (C `bool` members are read as bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct crosvm_hint_detail {
    pub match_rax: u8,
    pub match_rbx: u8,
    pub match_rcx: u8,
    pub match_rdx: u8,
    pub _reserved: [u8; 4],
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub send_sregs: u8,
    pub send_debugregs: u8,
    pub _reserved2: [u8; 6],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union crosvm_hint_details {
    pub details: *const crosvm_hint_detail,
    pub _reserved2: u64,
}

/// `struct crosvm_hint`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct crosvm_hint {
    pub hint_version: u32,
    pub _reserved: u32,
    pub address_space: u32,
    pub address_flags: u16,
    pub details_count: u16,
    pub address: u64,
    pub details: crosvm_hint_details,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct crosvm_io_access {
    pub address_space: u32,
    pub _padding: [u8; 4],
    pub address: u64,
    pub data: *mut u8,
    pub length: u32,
    pub is_write: u8,
    pub no_resume: u8,
    pub _reserved: [u8; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct crosvm_hyperv_call {
    pub input: u64,
    pub result: *mut u64,
    pub params: [u64; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct crosvm_hyperv_synic {
    pub msr: u32,
    pub _reserved: u32,
    pub control: u64,
    pub evt_page: u64,
    pub msg_page: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union crosvm_vcpu_event_union {
    pub io_access: crosvm_io_access,
    pub user: *mut c_void,
    pub hyperv_call: crosvm_hyperv_call,
    pub hyperv_synic: crosvm_hyperv_synic,
    pub coalesced_writes: crosvm_coalesced_writes,
    pub _reserved: [u8; 64],
}

/// `struct crosvm_coalesced_writes` of `crosvm_ext.h`: the union member of
/// a `CROSVM_VCPU_EVENT_KIND_COALESCED_WRITES` event.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct crosvm_coalesced_writes {
    /// `count` writes, oldest first, valid until the next wait.
    pub writes: *const crate::CoalescedWrite,
    pub count: u32,
    pub _reserved: u32,
}

/// `struct crosvm_vcpu_event`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct crosvm_vcpu_event {
    pub kind: u32,
    pub _padding: [u8; 4],
    pub event: crosvm_vcpu_event_union,
}

macro_rules! assert_layout {
    ($ty:ty, size $size:expr, align $align:expr, { $($($field:ident).+ = $off:expr),* $(,)? }) => {
        const _: () = {
            assert!(std::mem::size_of::<$ty>() == $size);
            assert!(std::mem::align_of::<$ty>() == $align);
            $(assert!(std::mem::offset_of!($ty, $($field).+) == $off);)*
        };
    };
}

assert_layout!(crosvm_net_config, size 20, align 4, {
    tap_fd = 0, host_ip = 4, netmask = 8, host_mac_address = 12, _padding = 18,
});
assert_layout!(crosvm_irq_route, size 24, align 8, {
    irq_id = 0, kind = 4, route = 8,
});
assert_layout!(crosvm_irq_route_irqchip, size 8, align 4, { irqchip = 0, pin = 4 });
assert_layout!(crosvm_irq_route_msi, size 16, align 8, { address = 0, data = 8, _reserved = 12 });
assert_layout!(crosvm_hint_detail, size 48, align 8, {
    match_rax = 0, match_rbx = 1, match_rcx = 2, match_rdx = 3, _reserved = 4,
    rax = 8, rbx = 16, rcx = 24, rdx = 32, send_sregs = 40, send_debugregs = 41,
    _reserved2 = 42,
});
assert_layout!(crosvm_hint, size 32, align 8, {
    hint_version = 0, _reserved = 4, address_space = 8, address_flags = 12,
    details_count = 14, address = 16, details = 24,
});
assert_layout!(crosvm_vcpu_event, size 72, align 8, { kind = 0, _padding = 4, event = 8 });
assert_layout!(crosvm_io_access, size 32, align 8, {
    address_space = 0, _padding = 4, address = 8, data = 16, length = 24,
    is_write = 28, no_resume = 29, _reserved = 30,
});
assert_layout!(crosvm_hyperv_call, size 32, align 8, { input = 0, result = 8, params = 16 });
assert_layout!(crosvm_hyperv_synic, size 32, align 8, {
    msr = 0, _reserved = 4, control = 8, evt_page = 16, msg_page = 24,
});
assert_layout!(crosvm_vcpu_event_union, size 64, align 8, {});

// ---------------------------------------------------------------------------
// Helpers.

/// Runs `f`, turning a panic into `-EIO` so no unwind crosses the FFI edge.
fn ffi(f: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(-libc::EIO)
}

/// Environment variable that makes the C API print each error's text to
/// stderr (`CROSVM_PLUGIN_LOG=debug`) before returning its `-errno`.
pub const LOG_ENV: &str = "CROSVM_PLUGIN_LOG";

fn debug_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os(LOG_ENV).is_some_and(|v| v == "debug" || v == "trace"))
}

/// The C API's error exit: `-errno`, and at debug level the whole error
/// text (operation, arguments, cause) on stderr in one write.
fn fail(e: &crate::Error) -> c_int {
    if debug_enabled() {
        let mut line = format!("crosvm_plugin: debug: {e}");
        let mut cur = std::error::Error::source(e);
        while let Some(s) = cur {
            line.push_str(": ");
            line.push_str(&s.to_string());
            cur = s.source();
        }
        line.push_str(&format!(" (returning -{})\n", e.errno()));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
    -e.errno()
}

fn status(result: Result<()>) -> c_int {
    match result {
        Ok(()) => 0,
        Err(e) => fail(&e),
    }
}

/// Writes `value` to `out` on success.
unsafe fn output<T>(result: Result<T>, out: *mut T) -> c_int {
    match result {
        Ok(v) => {
            // SAFETY: the caller passes a valid, writable out-pointer (C API
            // contract); `write` does not drop the uninitialized old value.
            unsafe { out.write(v) };
            0
        }
        Err(e) => fail(&e),
    }
}

/// A slice over a C array; `len` 0 accepts NULL.
unsafe fn c_slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: the caller guarantees `ptr` points to `len` readable,
        // initialized elements that outlive the returned slice.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The list-query contract: `*out_count` always written (0 on error, else
/// the count returned), more entries than `capacity` → `-E2BIG`.
unsafe fn fill_list<T: Copy>(
    result: Result<Vec<T>>,
    capacity: u32,
    out: *mut T,
    out_count: *mut u32,
) -> c_int {
    match result {
        Err(e) => {
            // SAFETY: valid out-pointer per the C API contract.
            unsafe { out_count.write(0) };
            fail(&e)
        }
        Ok(list) => {
            // SAFETY: valid out-pointer per the C API contract.
            unsafe { out_count.write(count_u32(list.len())) };
            if list.len() > capacity as usize {
                return -libc::E2BIG;
            }
            if !list.is_empty() {
                // SAFETY: `out` has room for `capacity` >= `list.len()`
                // elements (C API contract) and cannot overlap our Vec.
                unsafe { std::ptr::copy_nonoverlapping(list.as_ptr(), out, list.len()) };
            }
            0
        }
    }
}

unsafe fn conn<'a>(c: *const crosvm) -> &'a Connection {
    // SAFETY: the caller passes a live handle from crosvm_connect /
    // crosvm_new_connection (C API contract).
    unsafe { &(*c).conn }
}

unsafe fn vcpu<'a>(v: *const crosvm_vcpu) -> VcpuGuard<'a> {
    // SAFETY: the caller passes a handle from crosvm_get_vcpu; the table it
    // points into lives as long as any connection sharing it.
    unsafe { (*v).0.lock() }
}

fn space(raw: u32) -> Result<AddressSpace> {
    AddressSpace::from_raw(raw)
}

// ---------------------------------------------------------------------------
// Connections.

#[no_mangle]
pub unsafe extern "C" fn crosvm_connect(out: *mut *mut crosvm) -> c_int {
    ffi(|| match Connection::from_env() {
        Ok(conn) => {
            // SAFETY: valid out-pointer per the C API contract.
            unsafe { out.write(Box::into_raw(Box::new(crosvm { conn }))) };
            0
        }
        Err(e) => fail(&e),
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_new_connection(self_: *mut crosvm, out: *mut *mut crosvm) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract.
    ffi(|| unsafe {
        let result = conn(self_)
            .new_connection()
            .map(|conn| Box::into_raw(Box::new(crosvm { conn })));
        output(result, out)
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_destroy_connection(self_: *mut *mut crosvm) -> c_int {
    ffi(|| {
        // SAFETY: `*self_` came from Box::into_raw in this module and is not
        // used by the caller afterwards (we clear it).
        unsafe {
            drop(Box::from_raw(*self_));
            *self_ = std::ptr::null_mut();
        }
        0
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_shutdown_eventfd(self_: *mut crosvm) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| match unsafe { conn(self_) }.get_shutdown_eventfd() {
        Ok(fd) => fd.into_raw_fd(),
        Err(e) => fail(&e),
    })
}

// ---------------------------------------------------------------------------
// Capability and CPU queries.

#[no_mangle]
pub unsafe extern "C" fn crosvm_check_extension(
    self_: *mut crosvm,
    extension: u32,
    has_extension: *mut bool,
) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract.
    ffi(|| unsafe { output(conn(self_).check_extension(extension), has_extension) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_enable_capability(
    _self: *mut crosvm,
    _capability: u32,
    _flags: u32,
    _args: *mut u64,
) -> c_int {
    // VM-level capabilities are not supported (nothing is sent).
    -libc::EINVAL
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_supported_cpuid(
    self_: *mut crosvm,
    entry_count: u32,
    entries: *mut kvm_cpuid_entry2,
    out_count: *mut u32,
) -> c_int {
    // SAFETY: handle and arrays valid per the C API contract.
    ffi(|| unsafe {
        fill_list(
            conn(self_).get_supported_cpuid(),
            entry_count,
            entries,
            out_count,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_emulated_cpuid(
    self_: *mut crosvm,
    entry_count: u32,
    entries: *mut kvm_cpuid_entry2,
    out_count: *mut u32,
) -> c_int {
    // SAFETY: handle and arrays valid per the C API contract.
    ffi(|| unsafe {
        fill_list(
            conn(self_).get_emulated_cpuid(),
            entry_count,
            entries,
            out_count,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_hyperv_cpuid(
    vcpu_: *mut crosvm_vcpu,
    entry_count: u32,
    entries: *mut kvm_cpuid_entry2,
    out_count: *mut u32,
) -> c_int {
    // SAFETY: handle and arrays valid per the C API contract.
    ffi(|| unsafe {
        let result = vcpu(vcpu_).get_hyperv_cpuid();
        fill_list(result, entry_count, entries, out_count)
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_msr_index_list(
    self_: *mut crosvm,
    entry_count: u32,
    msr_indices: *mut u32,
    out_count: *mut u32,
) -> c_int {
    // SAFETY: handle and arrays valid per the C API contract.
    ffi(|| unsafe {
        fill_list(
            conn(self_).get_msr_index_list(),
            entry_count,
            msr_indices,
            out_count,
        )
    })
}

// ---------------------------------------------------------------------------
// Network.

#[no_mangle]
pub unsafe extern "C" fn crosvm_net_get_config(
    self_: *mut crosvm,
    config: *mut crosvm_net_config,
) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract.
    ffi(|| unsafe {
        let result = conn(self_).get_net_config().map(|c| crosvm_net_config {
            tap_fd: c.tap.into_raw_fd(),
            host_ip: ipv4_to_wire(c.host_ip),
            netmask: ipv4_to_wire(c.netmask),
            host_mac_address: c.host_mac,
            _padding: [0; 2],
        });
        output(result, config)
    })
}

// ---------------------------------------------------------------------------
// Reservations and hints.

#[no_mangle]
pub unsafe extern "C" fn crosvm_reserve_range(
    self_: *mut crosvm,
    space_: u32,
    start: u64,
    length: u64,
) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe {
        status(space(space_).and_then(|s| conn(self_).reserve_range(s, start, length)))
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_reserve_async_write_range(
    self_: *mut crosvm,
    space_: u32,
    start: u64,
    length: u64,
) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe {
        status(space(space_).and_then(|s| conn(self_).reserve_async_write_range(s, start, length)))
    })
}

/// Extension (`crosvm_ext.h`, docs/protocol-extensions.md §4).
#[no_mangle]
pub unsafe extern "C" fn crosvm_reserve_coalesced_range(
    self_: *mut crosvm,
    space_: u32,
    start: u64,
    length: u64,
) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe {
        status(space(space_).and_then(|s| conn(self_).reserve_coalesced_range(s, start, length)))
    })
}

/// Validates `hint` (docs/c-api.md §8.4) and converts it.
unsafe fn call_hint(hint: &crosvm_hint) -> Result<CallHint> {
    if hint.hint_version != 0 || hint._reserved != 0 {
        return Err(Error::InvalidArgument(
            "hint version and reserved field must be 0",
        ));
    }
    if hint.address == 0 {
        return Err(Error::InvalidArgument("hint address must be non-zero"));
    }
    if hint.address_flags != 0 && hint.address_flags != CROSVM_HINT_ON_WRITE {
        return Err(Error::InvalidArgument("unknown hint address flags"));
    }
    if usize::from(hint.details_count) > MAX_HINT_DETAIL_COUNT {
        return Err(Error::InvalidArgument("too many hint details"));
    }
    let space = AddressSpace::from_raw(hint.address_space)?;
    // SAFETY: `details` points to `details_count` entries (C API contract);
    // reading the pointer member of the union is what the C code set.
    let details = unsafe { c_slice(hint.details.details, usize::from(hint.details_count)) };
    Ok(CallHint {
        space,
        address: hint.address,
        on_write: hint.address_flags == CROSVM_HINT_ON_WRITE,
        details: details
            .iter()
            .map(|d| HintDetail {
                match_rax: d.match_rax != 0,
                match_rbx: d.match_rbx != 0,
                match_rcx: d.match_rcx != 0,
                match_rdx: d.match_rdx != 0,
                rax: d.rax,
                rbx: d.rbx,
                rcx: d.rcx,
                rdx: d.rdx,
                send_sregs: d.send_sregs != 0,
                send_debugregs: d.send_debugregs != 0,
            })
            .collect(),
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_set_hypercall_hint(
    self_: *mut crosvm,
    hints_count: u32,
    hints: *const crosvm_hint,
) -> c_int {
    // SAFETY: handle and `hints` (when hints_count > 0) valid per the C API
    // contract.
    ffi(|| unsafe {
        if hints_count == 0 {
            return status(conn(self_).clear_call_hint());
        }
        if hints_count > CROSVM_MAX_HINT_COUNT {
            return -libc::EINVAL;
        }
        status(call_hint(&*hints).and_then(|h| conn(self_).set_call_hint(&h)))
    })
}

// ---------------------------------------------------------------------------
// Interrupts.

#[no_mangle]
pub unsafe extern "C" fn crosvm_set_irq(self_: *mut crosvm, irq_id: u32, active: bool) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe { status(conn(self_).set_irq(irq_id, active)) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_set_irq_routing(
    self_: *mut crosvm,
    route_count: u32,
    routes: *const crosvm_irq_route,
) -> c_int {
    // SAFETY: handle and `routes` array valid per the C API contract; the
    // union member read is the one selected by `kind`.
    ffi(|| unsafe {
        let routes = c_slice(routes, route_count as usize);
        let converted: Result<Vec<IrqRoute>> = routes
            .iter()
            .map(|r| {
                let kind = match r.kind {
                    CROSVM_IRQ_ROUTE_IRQCHIP => IrqRouteKind::Irqchip {
                        irqchip: r.route.irqchip.irqchip,
                        pin: r.route.irqchip.pin,
                    },
                    CROSVM_IRQ_ROUTE_MSI => IrqRouteKind::Msi {
                        address: r.route.msi.address,
                        data: r.route.msi.data,
                    },
                    _ => return Err(Error::InvalidArgument("unknown irq route kind")),
                };
                Ok(IrqRoute {
                    irq_id: r.irq_id,
                    kind,
                })
            })
            .collect();
        status(converted.and_then(|r| conn(self_).set_irq_routing(&r)))
    })
}

// ---------------------------------------------------------------------------
// VM-wide state.

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_pic_state(
    self_: *mut crosvm,
    primary: bool,
    state: *mut kvm_pic_state,
) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract.
    ffi(|| unsafe { output(conn(self_).get_pic_state(primary), state) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_set_pic_state(
    self_: *mut crosvm,
    primary: bool,
    state: *const kvm_pic_state,
) -> c_int {
    // SAFETY: handle and in-pointer valid per the C API contract.
    ffi(|| unsafe { status(conn(self_).set_pic_state(primary, &*state)) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_ioapic_state(
    self_: *mut crosvm,
    state: *mut kvm_ioapic_state,
) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract.
    ffi(|| unsafe { output(conn(self_).get_ioapic_state(), state) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_set_ioapic_state(
    self_: *mut crosvm,
    state: *const kvm_ioapic_state,
) -> c_int {
    // SAFETY: handle and in-pointer valid per the C API contract.
    ffi(|| unsafe { status(conn(self_).set_ioapic_state(&*state)) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_pit_state(
    self_: *mut crosvm,
    state: *mut kvm_pit_state2,
) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract.
    ffi(|| unsafe { output(conn(self_).get_pit_state(), state) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_set_pit_state(
    self_: *mut crosvm,
    state: *const kvm_pit_state2,
) -> c_int {
    // SAFETY: handle and in-pointer valid per the C API contract.
    ffi(|| unsafe { status(conn(self_).set_pit_state(&*state)) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_clock(self_: *mut crosvm, clock: *mut kvm_clock_data) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract.
    ffi(|| unsafe { output(conn(self_).get_clock(), clock) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_set_clock(
    self_: *mut crosvm,
    clock: *const kvm_clock_data,
) -> c_int {
    // SAFETY: handle and in-pointer valid per the C API contract.
    ffi(|| unsafe { status(conn(self_).set_clock(&*clock)) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_set_identity_map_addr(self_: *mut crosvm, addr: u32) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe { status(conn(self_).set_identity_map_addr(addr)) })
}

// ---------------------------------------------------------------------------
// Run control.

#[no_mangle]
pub unsafe extern "C" fn crosvm_pause_vcpus(
    self_: *mut crosvm,
    cpu_mask: u64,
    user: *mut c_void,
) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe { status(conn(self_).pause_vcpus(cpu_mask, user as usize as u64)) })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_start(self_: *mut crosvm) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe { status(conn(self_).start()) })
}

// ---------------------------------------------------------------------------
// Objects.

#[no_mangle]
pub unsafe extern "C" fn crosvm_create_io_event(
    self_: *mut crosvm,
    space_: u32,
    addr: u64,
    length: u32,
    datamatch: *const u8,
    out: *mut *mut crosvm_io,
) -> c_int {
    // SAFETY: handle, out-pointer and (for a valid non-zero length and
    // non-NULL pointer) `length` readable datamatch bytes per the C API.
    ffi(|| unsafe {
        let matcher = match length {
            1 | 2 | 4 | 8 if !datamatch.is_null() => {
                let mut bytes = [0u8; 8];
                std::ptr::copy_nonoverlapping(datamatch, bytes.as_mut_ptr(), length as usize);
                Datamatch::from_raw(length, u64::from_le_bytes(bytes))
            }
            // NULL datamatch means "any value", expressible only as length 0.
            1 | 2 | 4 | 8 => Ok(Datamatch::Any),
            other => Datamatch::from_raw(other, 0),
        };
        let result = matcher
            .and_then(|m| space(space_).map(|s| (s, m)))
            .and_then(|(s, m)| conn(self_).create_io_event(s, addr, m))
            .map(|io| Box::into_raw(Box::new(crosvm_io { io: io.detach() })));
        output(result, out)
    })
}

/// Shared body of the destroy functions of handles that own nothing in
/// the host (attach answers, checkpoints, write trackers): frees the handle
/// behind `*handle`, if any, and sets `*handle` to NULL. A NULL `handle` is
/// `-EINVAL`.
///
/// # Safety
/// `handle` is NULL or points to NULL or to a live handle that came from
/// `Box::into_raw` (the C API contract); it is taken once.
pub(crate) unsafe fn free_handle<T>(handle: *mut *mut T) -> c_int {
    if handle.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: per this function's contract; the pointer is swapped for NULL
    // before the box is freed, so it is freed once.
    ffi(|| unsafe {
        let p = handle.replace(std::ptr::null_mut());
        if !p.is_null() {
            drop(Box::from_raw(p));
        }
        0
    })
}

/// Shared body of the three destroy functions: destroys the object behind
/// `*handle` through `self_`, and on success frees the handle and sets
/// `*handle` to NULL; on failure the handle is left intact.
///
/// # Safety
/// `self_` is a live connection, `handle` points to a live handle that came
/// from `Box::into_raw` (the C API contract).
unsafe fn destroy_handle<T, O: DestroyInPlace>(
    self_: *mut crosvm,
    handle: *mut *mut T,
    object: impl FnOnce(&mut T) -> &mut O,
) -> c_int {
    // SAFETY: per this function's contract; the box is only freed after a
    // successful destroy, and nothing else refers to it.
    ffi(|| unsafe {
        match object(&mut **handle).destroy_in_place(conn(self_)) {
            Ok(()) => {
                drop(Box::from_raw(*handle));
                *handle = std::ptr::null_mut();
                0
            }
            Err(e) => fail(&e),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_destroy_io_event(
    self_: *mut crosvm,
    io: *mut *mut crosvm_io,
) -> c_int {
    // SAFETY: handles valid per the C API contract.
    unsafe { destroy_handle(self_, io, |h: &mut crosvm_io| &mut h.io) }
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_io_event_fd(io: *mut crosvm_io) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe { (*io).io.fd().as_raw_fd() })
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn crosvm_create_memory(
    self_: *mut crosvm,
    fd: c_int,
    offset: u64,
    length: u64,
    start: u64,
    read_only: bool,
    dirty_log: bool,
    out: *mut *mut crosvm_memory,
) -> c_int {
    if fd < 0 {
        // Argument checks first, as the SDK would do them before sending.
        let aligned =
            offset.is_multiple_of(crate::PAGE_SIZE) && length.is_multiple_of(crate::PAGE_SIZE);
        return if aligned { -libc::EBADF } else { -libc::EINVAL };
    }
    // SAFETY: handle and out-pointer valid per the C API contract; `fd` is
    // non-negative and the caller keeps it open during the call.
    ffi(|| unsafe {
        let memfd = BorrowedFd::borrow_raw(fd);
        let result = conn(self_)
            .create_memory(memfd, offset, length, start, read_only, dirty_log)
            .map(|mem| Box::into_raw(Box::new(crosvm_memory { mem: mem.detach() })));
        output(result, out)
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_destroy_memory(
    self_: *mut crosvm,
    mem: *mut *mut crosvm_memory,
) -> c_int {
    // SAFETY: handles valid per the C API contract.
    unsafe { destroy_handle(self_, mem, |h: &mut crosvm_memory| &mut h.mem) }
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_memory_get_dirty_log(
    self_: *mut crosvm,
    mem: *mut crosvm_memory,
    log: *mut u8,
) -> c_int {
    // SAFETY: handles valid and `log` has room for the bitmap (whose length
    // the SDK checked against the region size) per the C API contract.
    ffi(|| unsafe {
        match conn(self_).get_dirty_log(&(*mem).mem) {
            Ok(bitmap) => {
                std::ptr::copy_nonoverlapping(bitmap.as_ptr(), log, bitmap.len());
                0
            }
            Err(e) => fail(&e),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_create_irq_event(
    self_: *mut crosvm,
    irq_id: u32,
    out: *mut *mut crosvm_irq,
) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract.
    ffi(|| unsafe {
        let result = conn(self_)
            .create_irq_event(irq_id)
            .map(|irq| Box::into_raw(Box::new(crosvm_irq { irq: irq.detach() })));
        output(result, out)
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_destroy_irq_event(
    self_: *mut crosvm,
    irq: *mut *mut crosvm_irq,
) -> c_int {
    // SAFETY: handles valid per the C API contract.
    unsafe { destroy_handle(self_, irq, |h: &mut crosvm_irq| &mut h.irq) }
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_irq_event_get_fd(irq: *const crosvm_irq) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe { (*irq).irq.fd().as_raw_fd() })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_irq_event_get_resample_fd(irq: *const crosvm_irq) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe { (*irq).irq.resample_fd().as_raw_fd() })
}

// ---------------------------------------------------------------------------
// Vcpus.

#[no_mangle]
pub unsafe extern "C" fn crosvm_get_vcpu(
    self_: *mut crosvm,
    cpu_id: u32,
    out: *mut *mut crosvm_vcpu,
) -> c_int {
    // SAFETY: handle and out-pointer valid per the C API contract. The slot
    // lives in the shared table, which outlives every connection using it,
    // and `crosvm_vcpu` is a transparent wrapper of the slot.
    ffi(|| unsafe {
        let result = conn(self_)
            .vcpu_slot(cpu_id)
            .map(|slot| (slot as *const VcpuSlot).cast::<crosvm_vcpu>().cast_mut());
        output(result, out)
    })
}

/// What `crosvm_vcpu_wait` writes, captured while the event borrows the
/// vcpu.
enum Filled {
    Init,
    Io {
        space: u32,
        address: u64,
        length: u32,
        is_write: bool,
        no_resume: bool,
    },
    Paused(u64),
    HypervCall {
        input: u64,
        params: [u64; 2],
    },
    Synic(crosvm_hyperv_synic),
    Coalesced(crosvm_coalesced_writes),
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_vcpu_wait(
    vcpu_: *mut crosvm_vcpu,
    event: *mut crosvm_vcpu_event,
) -> c_int {
    // SAFETY: vcpu handle and event out-pointer valid per the C API
    // contract. Only the members listed in docs/c-api.md §9.4 are written.
    ffi(|| unsafe {
        let mut guard = vcpu(vcpu_);
        let filled = match guard.wait() {
            Ok(VcpuEvent::Init) => Filled::Init,
            Ok(VcpuEvent::Io {
                space,
                address,
                is_write,
                no_resume,
                data,
            }) => Filled::Io {
                space: space.to_raw(),
                address,
                length: count_u32(data.len()),
                is_write,
                no_resume,
            },
            Ok(VcpuEvent::Paused { user }) => Filled::Paused(user),
            Ok(VcpuEvent::HypervCall { input, params }) => Filled::HypervCall { input, params },
            Ok(VcpuEvent::HypervSynic {
                msr,
                control,
                evt_page,
                msg_page,
            }) => Filled::Synic(crosvm_hyperv_synic {
                msr,
                _reserved: 0,
                control,
                evt_page,
                msg_page,
            }),
            Ok(VcpuEvent::CoalescedWrites(writes)) => Filled::Coalesced(crosvm_coalesced_writes {
                writes: writes.as_ptr(),
                count: count_u32(writes.len()),
                _reserved: 0,
            }),
            // No event to fill: the caller sees -ESHUTDOWN and stops.
            Ok(VcpuEvent::Shutdown) => {
                return fail(&crate::Error::Shutdown {
                    op: "crosvm_vcpu_wait",
                })
            }
            Err(e) => return fail(&e),
        };
        let data = guard.event_data_ptr();
        let ev = &mut *event;
        match filled {
            Filled::Init => ev.kind = CROSVM_VCPU_EVENT_KIND_INIT,
            Filled::Io {
                space,
                address,
                length,
                is_write,
                no_resume,
            } => {
                ev.kind = CROSVM_VCPU_EVENT_KIND_IO_ACCESS;
                ev.event.io_access = crosvm_io_access {
                    address_space: space,
                    _padding: [0; 4],
                    address,
                    data,
                    length,
                    is_write: is_write.into(),
                    no_resume: no_resume.into(),
                    _reserved: [0; 2],
                };
            }
            Filled::Paused(user) => {
                ev.kind = CROSVM_VCPU_EVENT_KIND_PAUSED;
                ev.event.user = user as usize as *mut c_void;
            }
            Filled::HypervCall { input, params } => {
                ev.kind = CROSVM_VCPU_EVENT_KIND_HYPERV_HCALL;
                ev.event.hyperv_call = crosvm_hyperv_call {
                    input,
                    result: data.cast::<u64>(),
                    params,
                };
            }
            Filled::Synic(synic) => {
                ev.kind = CROSVM_VCPU_EVENT_KIND_HYPERV_SYNIC;
                ev.event.hyperv_synic = synic;
            }
            Filled::Coalesced(c) => {
                ev.kind = CROSVM_VCPU_EVENT_KIND_COALESCED_WRITES;
                ev.event.coalesced_writes = c;
            }
        }
        0
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_vcpu_resume(vcpu_: *mut crosvm_vcpu) -> c_int {
    // SAFETY: live vcpu handle per the C API contract.
    ffi(|| unsafe { status(vcpu(vcpu_).resume()) })
}

macro_rules! vcpu_cached_accessors {
    ($get:ident, $set:ident, $ty:ty, $sdk_get:ident, $sdk_set:ident) => {
        #[no_mangle]
        pub unsafe extern "C" fn $get(vcpu_: *mut crosvm_vcpu, out: *mut $ty) -> c_int {
            // SAFETY: vcpu handle and out-pointer valid per the C API contract.
            ffi(|| unsafe { output(vcpu(vcpu_).$sdk_get(), out) })
        }

        #[no_mangle]
        pub unsafe extern "C" fn $set(vcpu_: *mut crosvm_vcpu, value: *const $ty) -> c_int {
            // SAFETY: vcpu handle and in-pointer valid per the C API contract.
            ffi(|| unsafe {
                vcpu(vcpu_).$sdk_set(&*value);
                0
            })
        }
    };
}

macro_rules! vcpu_accessors {
    ($get:ident, $set:ident, $ty:ty, $sdk_get:ident, $sdk_set:ident) => {
        #[no_mangle]
        pub unsafe extern "C" fn $get(vcpu_: *mut crosvm_vcpu, out: *mut $ty) -> c_int {
            // SAFETY: vcpu handle and out-pointer valid per the C API contract.
            ffi(|| unsafe { output(vcpu(vcpu_).$sdk_get(), out) })
        }

        #[no_mangle]
        pub unsafe extern "C" fn $set(vcpu_: *mut crosvm_vcpu, value: *const $ty) -> c_int {
            // SAFETY: vcpu handle and in-pointer valid per the C API contract.
            ffi(|| unsafe { status(vcpu(vcpu_).$sdk_set(&*value)) })
        }
    };
}

vcpu_cached_accessors!(
    crosvm_vcpu_get_regs,
    crosvm_vcpu_set_regs,
    kvm_regs,
    get_regs,
    set_regs
);
vcpu_cached_accessors!(
    crosvm_vcpu_get_sregs,
    crosvm_vcpu_set_sregs,
    kvm_sregs,
    get_sregs,
    set_sregs
);
vcpu_cached_accessors!(
    crosvm_vcpu_get_debugregs,
    crosvm_vcpu_set_debugregs,
    kvm_debugregs,
    get_debugregs,
    set_debugregs
);
vcpu_accessors!(
    crosvm_vcpu_get_fpu,
    crosvm_vcpu_set_fpu,
    kvm_fpu,
    get_fpu,
    set_fpu
);
vcpu_accessors!(
    crosvm_vcpu_get_xcrs,
    crosvm_vcpu_set_xcrs,
    kvm_xcrs,
    get_xcrs,
    set_xcrs
);
vcpu_accessors!(
    crosvm_vcpu_get_lapic_state,
    crosvm_vcpu_set_lapic_state,
    kvm_lapic_state,
    get_lapic_state,
    set_lapic_state
);
vcpu_accessors!(
    crosvm_vcpu_get_mp_state,
    crosvm_vcpu_set_mp_state,
    kvm_mp_state,
    get_mp_state,
    set_mp_state
);
vcpu_accessors!(
    crosvm_vcpu_get_vcpu_events,
    crosvm_vcpu_set_vcpu_events,
    kvm_vcpu_events,
    get_vcpu_events,
    set_vcpu_events
);

#[no_mangle]
pub unsafe extern "C" fn crosvm_vcpu_get_msrs(
    vcpu_: *mut crosvm_vcpu,
    msr_count: u32,
    msr_entries: *mut kvm_msr_entry,
    out_count: *mut u32,
) -> c_int {
    // SAFETY: vcpu handle, `msr_entries` (msr_count elements) and
    // `out_count` valid per the C API contract.
    ffi(|| unsafe {
        let indices: Vec<u32> = c_slice(msr_entries.cast_const(), msr_count as usize)
            .iter()
            .map(|e| e.index)
            .collect();
        match vcpu(vcpu_).get_msrs(&indices) {
            Err(e) => {
                out_count.write(0);
                fail(&e)
            }
            Ok(values) => {
                out_count.write(count_u32(values.len()));
                if values.len() > indices.len() {
                    return -libc::E2BIG;
                }
                for (i, value) in values.into_iter().enumerate() {
                    (*msr_entries.add(i)).data = value;
                }
                0
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_vcpu_set_msrs(
    vcpu_: *mut crosvm_vcpu,
    msr_count: u32,
    msr_entries: *const kvm_msr_entry,
) -> c_int {
    // SAFETY: vcpu handle and `msr_entries` valid per the C API contract.
    ffi(|| unsafe {
        let entries = c_slice(msr_entries, msr_count as usize);
        status(vcpu(vcpu_).set_msrs(entries))
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_vcpu_set_cpuid(
    vcpu_: *mut crosvm_vcpu,
    cpuid_count: u32,
    cpuid_entries: *const kvm_cpuid_entry2,
) -> c_int {
    // SAFETY: vcpu handle and `cpuid_entries` valid per the C API contract.
    ffi(|| unsafe {
        let entries = c_slice(cpuid_entries, cpuid_count as usize);
        status(vcpu(vcpu_).set_cpuid(entries))
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_vcpu_enable_capability(
    vcpu_: *mut crosvm_vcpu,
    capability: u32,
    flags: u32,
    args: *mut u64,
) -> c_int {
    // SAFETY: vcpu handle valid; `args` points to four readable values
    // whenever `flags` is 0 (C API contract), and is not read otherwise.
    ffi(|| unsafe {
        let args = if flags == 0 {
            std::ptr::read_unaligned(args.cast::<[u64; 4]>())
        } else {
            [0; 4]
        };
        status(vcpu(vcpu_).enable_capability(capability, flags, args))
    })
}

// ---------------------------------------------------------------------------
// Extension (`crosvm_ext.h`, docs/protocol-extensions.md §5): the control
// channel, a thin shim over `crate::ControlChannel`.

/// `CROSVM_CONTROL_*` command kinds.
pub const CROSVM_CONTROL_CUSTOM: u32 = 0;
pub const CROSVM_CONTROL_POWER_BUTTON: u32 = 1;
pub const CROSVM_CONTROL_SLEEP_BUTTON: u32 = 2;
/// §6: reply with the device state (`crosvm_control_reply_state`).
pub const CROSVM_CONTROL_SAVE_STATE: u32 = 3;
/// §6: the snapshot is done, the vcpus run again (no reply).
pub const CROSVM_CONTROL_RESUMED: u32 = 4;
/// A kind this library does not know (a newer host): refuse it `-ENOTSUP`.
pub const CROSVM_CONTROL_UNKNOWN: u32 = 0xffff_ffff;
/// Extension (§8): `DIRTY_PAGES`, answered with
/// `crosvm_control_reply_dirty_pages`.
pub const CROSVM_CONTROL_DIRTY_PAGES: u32 = 5;

/// `struct crosvm_control`: the plugin's end of the control channel and the
/// strings of the last command received (the C caller's pointers point
/// into them until the next receive or the close).
pub struct crosvm_control {
    chan: crate::ControlChannel,
    last: std::sync::Mutex<(std::ffi::CString, std::ffi::CString)>,
}

/// `struct crosvm_control_command`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct crosvm_control_command {
    pub id: u64,
    pub kind: u32,
    pub args_len: u32,
    pub name: *const std::ffi::c_char,
    pub args: *const std::ffi::c_char,
}

/// A C string of `bytes` up to its first NUL.
fn c_string(mut bytes: Vec<u8>) -> std::ffi::CString {
    if let Some(nul) = bytes.iter().position(|&b| b == 0) {
        bytes.truncate(nul);
    }
    std::ffi::CString::new(bytes).unwrap_or_default()
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_control_open(
    self_: *mut crosvm,
    out: *mut *mut crosvm_control,
) -> c_int {
    // SAFETY: live handle and out-pointer per the C API contract.
    ffi(|| unsafe {
        let result = conn(self_).control_channel().map(|chan| {
            Box::into_raw(Box::new(crosvm_control {
                chan,
                last: Default::default(),
            }))
        });
        output(result, out)
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_control_fd(self_: *mut crosvm_control) -> c_int {
    // SAFETY: live handle per the C API contract.
    ffi(|| unsafe { (*self_).chan.fd().as_raw_fd() })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_control_recv(
    self_: *mut crosvm_control,
    cmd: *mut crosvm_control_command,
) -> c_int {
    // SAFETY: live handle and out-pointer per the C API contract.
    ffi(|| unsafe {
        let ctl = &*self_;
        let command = match ctl.chan.recv() {
            Ok(Some(c)) => c,
            Ok(None) => return -libc::ESHUTDOWN,
            Err(e) => return fail(&e),
        };
        let (kind, name) = match command.kind {
            crate::ControlKind::PowerButton => (CROSVM_CONTROL_POWER_BUTTON, Vec::new()),
            crate::ControlKind::SleepButton => (CROSVM_CONTROL_SLEEP_BUTTON, Vec::new()),
            crate::ControlKind::Custom(n) => (CROSVM_CONTROL_CUSTOM, n.into_bytes()),
            crate::ControlKind::SaveState => (CROSVM_CONTROL_SAVE_STATE, Vec::new()),
            crate::ControlKind::Resumed => (CROSVM_CONTROL_RESUMED, Vec::new()),
            crate::ControlKind::DirtyPages => (CROSVM_CONTROL_DIRTY_PAGES, Vec::new()),
            _ => (CROSVM_CONTROL_UNKNOWN, Vec::new()),
        };
        let mut last = ctl.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = (c_string(name), c_string(command.args));
        cmd.write(crosvm_control_command {
            id: command.id,
            kind,
            args_len: count_u32(last.1.as_bytes().len()),
            name: last.0.as_ptr(),
            args: last.1.as_ptr(),
        });
        0
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_control_reply(
    self_: *mut crosvm_control,
    id: u64,
    json: *const std::ffi::c_char,
) -> c_int {
    // SAFETY: live handle and, unless NULL, a NUL-terminated string per the
    // C API contract.
    ffi(|| unsafe {
        let bytes = if json.is_null() {
            &[][..]
        } else {
            std::ffi::CStr::from_ptr(json).to_bytes()
        };
        status((*self_).chan.reply_ok(id, bytes))
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_control_reply_error(
    self_: *mut crosvm_control,
    id: u64,
    errno_value: c_int,
    message: *const std::ffi::c_char,
) -> c_int {
    // SAFETY: live handle and, unless NULL, a NUL-terminated string per the
    // C API contract.
    ffi(|| unsafe {
        let text = if message.is_null() {
            std::borrow::Cow::Borrowed("")
        } else {
            std::ffi::CStr::from_ptr(message).to_string_lossy()
        };
        status((*self_).chan.reply_error(id, errno_value, &text))
    })
}

/// Extension (§6): answers `SAVE_STATE` command `id` with `len` bytes of
/// device state at `state` (NULL allowed when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn crosvm_control_reply_state(
    self_: *mut crosvm_control,
    id: u64,
    state: *const std::ffi::c_void,
    len: usize,
) -> c_int {
    if len > crate::DEVICE_STATE_MAX {
        return -libc::EINVAL;
    }
    // SAFETY: live handle, and `state` points to `len` readable bytes (C
    // API contract; checked bounded above).
    ffi(|| unsafe {
        let blob = c_slice(state.cast::<u8>(), len);
        status((*self_).chan.reply_state(id, blob))
    })
}

/// Extension (§8): answers `DIRTY_PAGES` command `id` with `count`
/// guest-physical page addresses at `pages` (NULL allowed when `count` is
/// 0) the plugin wrote since the previous one.
#[no_mangle]
pub unsafe extern "C" fn crosvm_control_reply_dirty_pages(
    self_: *mut crosvm_control,
    id: u64,
    pages: *const u64,
    count: usize,
) -> c_int {
    if count > crate::DIRTY_PAGES_MAX {
        return -libc::EINVAL;
    }
    // SAFETY: live handle, and `pages` points to `count` readable u64s (C
    // API contract; bounded above).
    ffi(|| unsafe {
        let p = c_slice(pages, count);
        status((*self_).chan.reply_dirty_pages(id, p))
    })
}

/// Extension (§6): `GetRestoreState`. 0 and `*out_len = 0` on a fresh boot
/// (or from a host without the extension); 1 when restoring, with
/// `*out_len` the blob's size and the blob copied to `buf` if `len` is
/// enough, else `-E2BIG` (`*out_len` still says how much is needed; `buf`
/// may be NULL to ask only). `*out_len` is 0 after any other failure.
#[no_mangle]
pub unsafe extern "C" fn crosvm_get_restore_state(
    self_: *mut crosvm,
    buf: *mut std::ffi::c_void,
    len: usize,
    out_len: *mut usize,
) -> c_int {
    // SAFETY: live handle, `out_len` writable and `buf` writable for `len`
    // bytes (C API contract).
    ffi(|| unsafe {
        match conn(self_).restore_state() {
            Err(e) => {
                out_len.write(0);
                fail(&e)
            }
            Ok(None) => {
                out_len.write(0);
                0
            }
            Ok(Some(blob)) => {
                out_len.write(blob.len());
                if blob.len() > len {
                    return -libc::E2BIG;
                }
                if !blob.is_empty() {
                    // SAFETY: `buf` has room for `len` >= `blob.len()` bytes
                    // and cannot overlap our Vec.
                    std::ptr::copy_nonoverlapping(blob.as_ptr(), buf.cast::<u8>(), blob.len());
                }
                1
            }
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn crosvm_control_close(self_: *mut *mut crosvm_control) -> c_int {
    ffi(|| {
        // SAFETY: `*self_` came from Box::into_raw in crosvm_control_open and
        // is not used by the caller afterwards (we clear it).
        unsafe {
            if !(*self_).is_null() {
                drop(Box::from_raw(*self_));
            }
            *self_ = std::ptr::null_mut();
        }
        0
    })
}

const _: () = assert!(std::mem::size_of::<crosvm_control_command>() == 32);

/// Extension (§7): `SnapshotInMemory`. 0 with `*out_bytes` (if not NULL)
/// the bytes of guest memory copied, or `-errno` (`-EBUSY`: a vcpu runs).
#[no_mangle]
pub unsafe extern "C" fn crosvm_snapshot_in_memory(
    self_: *mut crosvm,
    out_bytes: *mut u64,
) -> c_int {
    // SAFETY: live handle; `out_bytes` NULL or writable (C API contract).
    ffi(|| unsafe {
        match conn(self_).snapshot_in_memory() {
            Ok(n) => {
                if !out_bytes.is_null() {
                    out_bytes.write(n);
                }
                0
            }
            Err(e) => fail(&e),
        }
    })
}

/// Extension (§7): `ResetToSnapshot` with the `count` guest-physical page
/// addresses at `pages` the plugin wrote itself (NULL with 0: none). 0
/// with `*out_pages` (if not NULL) the pages copied back, or `-errno`
/// (`-ENOENT`: no snapshot; `-EINVAL`: an address in no region, or more
/// than 20,000 pages).
#[no_mangle]
pub unsafe extern "C" fn crosvm_reset_to_snapshot(
    self_: *mut crosvm,
    pages: *const u64,
    count: usize,
    out_pages: *mut u64,
) -> c_int {
    if count > crate::RESET_MAX_PAGES {
        return -libc::EINVAL;
    }
    // SAFETY: live handle; `pages` points to `count` readable addresses
    // (bounded above) and `out_pages` is NULL or writable (C API contract).
    ffi(|| unsafe {
        match conn(self_).reset(c_slice(pages, count)) {
            Ok(n) => {
                if !out_pages.is_null() {
                    out_pages.write(n);
                }
                0
            }
            Err(e) => fail(&e),
        }
    })
}

#[cfg(test)]
mod control_tests {
    use std::ffi::CStr;
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
    use plugin_proto::control_command::Kind;
    use plugin_proto::protobuf::{EnumOrUnknown, Message};
    use plugin_proto::{ControlCommand, ControlReply};

    use super::*;

    /// A C handle over one end of a socketpair; the other end plays the host.
    fn handle() -> (*mut crosvm_control, OwnedFd) {
        let (host, plugin) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let ctl = Box::into_raw(Box::new(crosvm_control {
            chan: crate::ControlChannel::from_fd(plugin),
            last: Default::default(),
        }));
        (ctl, host)
    }

    fn host_send(host: &OwnedFd, id: u64, kind: Kind, name: &str, json: &[u8]) {
        let cmd = ControlCommand {
            id,
            kind: EnumOrUnknown::new(kind),
            name: name.into(),
            json: json.to_vec(),
            ..Default::default()
        };
        send(
            host.as_raw_fd(),
            &cmd.write_to_bytes().unwrap(),
            MsgFlags::empty(),
        )
        .unwrap();
    }

    fn host_recv(host: &OwnedFd) -> ControlReply {
        let mut buf = vec![0u8; 0x10000];
        let n = recv(host.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        ControlReply::parse_from_bytes(&buf[..n]).unwrap()
    }

    #[test]
    fn c_write_tracker_answers_dirty_pages_and_checks_its_arguments() {
        use super::tracker::*;
        let (mut ctl, host) = handle();
        let mut ram = vec![0u8; 0x3000];
        let mut t: *mut crosvm_write_tracker = std::ptr::null_mut();
        // SAFETY: the handles are live (from `handle` and
        // crosvm_write_tracker_new), the buffers are locals of the lengths
        // given; NULLs are what is tested.
        unsafe {
            assert_eq!(
                crosvm_write_tracker_new(std::ptr::null_mut()),
                -libc::EINVAL
            );
            assert_eq!(crosvm_write_tracker_new(&mut t), 0);
            let v = 0xdead_beef_u32.to_le_bytes();
            // Guest-physical 0x10_0ffe: across the page boundary.
            let dst = ram.as_mut_ptr().add(0xffe).cast();
            assert_eq!(
                crosvm_write_tracker_write(t, dst, 0x10_0ffe, v.as_ptr().cast(), 4),
                0
            );
            assert_eq!(&ram[0xffe..0x1002], &v);
            assert_eq!(crosvm_write_tracker_mark(t, 0x20_0000, 1), 0);
            assert_eq!(crosvm_write_tracker_mark(t, 0x10_1000, 0), 0);
            host_send(&host, 30, Kind::DIRTY_PAGES, "", b"");
            let mut cmd = std::mem::zeroed::<crosvm_control_command>();
            assert_eq!(crosvm_control_recv(ctl, &mut cmd), 0);
            assert_eq!((cmd.id, cmd.kind), (30, CROSVM_CONTROL_DIRTY_PAGES));
            assert_eq!(crosvm_control_reply_tracked_pages(ctl, 30, t), 0);
            let r = host_recv(&host);
            assert_eq!((r.id, r.errno), (30, 0));
            assert_eq!(r.dirty_pages, [0x10_0000, 0x10_1000, 0x20_0000]);
            // Taken: the next answer has none.
            assert_eq!(crosvm_control_reply_tracked_pages(ctl, 31, t), 0);
            assert!(host_recv(&host).dirty_pages.is_empty());

            // Bad arguments: an errno, nothing written, nothing noted.
            let null = std::ptr::null_mut();
            assert_eq!(crosvm_write_tracker_mark(null, 0, 1), -libc::EINVAL);
            assert_eq!(
                crosvm_write_tracker_write(t, null.cast(), 0, v.as_ptr().cast(), 4),
                -libc::EINVAL
            );
            assert_eq!(
                crosvm_write_tracker_write(t, dst, 0, std::ptr::null(), 4),
                -libc::EINVAL
            );
            assert_eq!(
                crosvm_write_tracker_write(t, dst, u64::MAX - 1, v.as_ptr().cast(), 4),
                -libc::EINVAL
            );
            assert_eq!(
                crosvm_write_tracker_write(t, null.cast(), 0, std::ptr::null(), 0),
                0
            );
            assert_eq!(
                crosvm_control_reply_tracked_pages(null.cast(), 32, t),
                -libc::EINVAL
            );
            assert_eq!(
                crosvm_control_reply_tracked_pages(ctl, 32, null),
                -libc::EINVAL
            );

            // A reply that cannot be sent keeps the pages.
            assert_eq!(crosvm_write_tracker_mark(t, 0x5000, 1), 0);
            drop(host);
            assert!(crosvm_control_reply_tracked_pages(ctl, 33, t) < 0);
            assert_eq!((*t).0.take(), [0x5000]);

            assert_eq!(
                crosvm_write_tracker_destroy(std::ptr::null_mut()),
                -libc::EINVAL
            );
            assert_eq!(crosvm_write_tracker_destroy(&mut t), 0);
            assert!(t.is_null());
            assert_eq!(crosvm_write_tracker_destroy(&mut t), 0);
            assert_eq!(crosvm_control_close(&mut ctl), 0);
        }
    }

    #[test]
    fn c_shim_receives_commands_and_sends_replies() {
        let (mut ctl, host) = handle();
        // SAFETY: `ctl` is a live handle from `handle`, the out-pointers
        // point to locals, the strings are NUL-terminated literals.
        unsafe {
            assert!(crosvm_control_fd(ctl) >= 0);
            host_send(&host, 5, Kind::CUSTOM, "count", br#"{"a":1}"#);
            let mut cmd = std::mem::zeroed::<crosvm_control_command>();
            assert_eq!(crosvm_control_recv(ctl, &mut cmd), 0);
            assert_eq!(cmd.id, 5);
            assert_eq!(cmd.kind, CROSVM_CONTROL_CUSTOM);
            assert_eq!(CStr::from_ptr(cmd.name).to_str().unwrap(), "count");
            assert_eq!(CStr::from_ptr(cmd.args).to_bytes(), br#"{"a":1}"#);
            assert_eq!(cmd.args_len, 7);
            assert_eq!(crosvm_control_reply(ctl, 5, c"{\"count\": 3}".as_ptr()), 0);
            let r = host_recv(&host);
            assert_eq!((r.id, r.errno, &r.json[..]), (5, 0, &b"{\"count\": 3}"[..]));

            host_send(&host, 6, Kind::POWER_BUTTON, "", b"");
            assert_eq!(crosvm_control_recv(ctl, &mut cmd), 0);
            assert_eq!(cmd.kind, CROSVM_CONTROL_POWER_BUTTON);
            assert_eq!(CStr::from_ptr(cmd.name).to_bytes(), b"");
            assert_eq!(CStr::from_ptr(cmd.args).to_bytes(), b"null");
            assert_eq!(crosvm_control_reply(ctl, 6, std::ptr::null()), 0);
            assert_eq!(host_recv(&host).json, b"");

            host_send(&host, 7, Kind::SLEEP_BUTTON, "", b"");
            assert_eq!(crosvm_control_recv(ctl, &mut cmd), 0);
            assert_eq!(cmd.kind, CROSVM_CONTROL_SLEEP_BUTTON);
            assert_eq!(
                crosvm_control_reply_error(ctl, 7, libc::ENOTSUP, c"no".as_ptr()),
                0
            );
            let r = host_recv(&host);
            assert_eq!(
                (r.id, r.errno, r.message.as_str()),
                (7, libc::ENOTSUP, "no")
            );
            assert_eq!(
                crosvm_control_reply_error(ctl, 7, 0, std::ptr::null()),
                -libc::EINVAL
            );

            // A kind from a newer host, a name with a NUL in it.
            let mut raw = ControlCommand {
                id: 8,
                name: "a\0b".into(),
                ..Default::default()
            };
            raw.kind = EnumOrUnknown::from_i32(9);
            send(
                host.as_raw_fd(),
                &raw.write_to_bytes().unwrap(),
                MsgFlags::empty(),
            )
            .unwrap();
            assert_eq!(crosvm_control_recv(ctl, &mut cmd), 0);
            assert_eq!(cmd.kind, CROSVM_CONTROL_UNKNOWN);

            // Snapshot kinds (§6): SAVE_STATE answered with the state.
            host_send(&host, 20, Kind::SAVE_STATE, "", b"");
            assert_eq!(crosvm_control_recv(ctl, &mut cmd), 0);
            assert_eq!((cmd.id, cmd.kind), (20, CROSVM_CONTROL_SAVE_STATE));
            let state = [1u8, 2, 3, 0, 5];
            assert_eq!(
                crosvm_control_reply_state(ctl, 20, state.as_ptr().cast(), state.len()),
                0
            );
            let r = host_recv(&host);
            assert_eq!((r.id, r.errno, &r.state[..]), (20, 0, &state[..]));
            assert_eq!(crosvm_control_reply_state(ctl, 20, std::ptr::null(), 0), 0);
            assert!(host_recv(&host).state.is_empty());
            assert_eq!(
                crosvm_control_reply_state(ctl, 20, std::ptr::null(), crate::DEVICE_STATE_MAX + 1),
                -libc::EINVAL
            );
            host_send(&host, 21, Kind::RESUMED, "", b"");
            assert_eq!(crosvm_control_recv(ctl, &mut cmd), 0);
            assert_eq!((cmd.id, cmd.kind), (21, CROSVM_CONTROL_RESUMED));

            // Garbage from the host is an error, not a crash.
            send(host.as_raw_fd(), &[0x0a, 0x7f], MsgFlags::empty()).unwrap();
            assert!(crosvm_control_recv(ctl, &mut cmd) < 0);

            drop(host);
            assert_eq!(crosvm_control_recv(ctl, &mut cmd), -libc::ESHUTDOWN);
            assert_eq!(crosvm_control_close(&mut ctl), 0);
            assert!(ctl.is_null());
        }
    }
}
