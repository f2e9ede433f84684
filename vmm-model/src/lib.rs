//! An in-memory model of the hypervisor surface ([`Vm`], [`Vcpu`]) and of the
//! host resources ([`HostServices`]), with invariant checks, plus harnesses
//! that drive the real request handlers with hostile input. Used by the fuzz
//! targets (`fuzz/`), the deterministic fuzz smoke tests and the regression
//! replays.
//!
//! The model follows KVM's rules where the handlers depend on them (memory
//! slots must be page aligned and must not overlap: `EINVAL`/`EEXIST`;
//! ioeventfd collisions: `EEXIST`; an eventfd is an irqfd at most once:
//! `EBUSY`), and records as a *violation* everything that would be a host
//! bug rather than a plugin error: removing a slot or unregistering an event
//! that was never installed, a state image of the wrong size reaching the
//! hypervisor, an unbounded list or bitmap, a memory slot whose host range is
//! not mapped.

pub mod control_harness;
pub mod framing_harness;
pub mod gen;
pub mod main_harness;
pub mod rng;
pub mod run;
pub mod vcpu_harness;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use vmm_sys_util::eventfd::EventFd;

use vmm::limits;
use vmm::record::FdKind;
use vmm::runtime::main_handler::{dirty_bitmap_len, HostServices, NetConfig};
use vmm::vm::{
    CoalescedRing, CoalescedWrite, Cpuid, IrqRoute, Result, Space, Vcpu, VcpuStateKind, Vm,
    VmStateKind,
};

pub use framing_harness::{check_seqpacket, check_stream};
pub use main_harness::MainHarness;
pub use vcpu_harness::VcpuHarness;

/// A failed check of the model or the harnesses.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invariant violated: {0}")]
    Invariant(String),
    #[error("the model broke KVM's contract: {0}")]
    Contract(String),
    #[error("{what} failed")]
    Sys {
        what: &'static str,
        #[source]
        source: Errno,
    },
}

/// Shorthand for an invariant failure.
pub fn invariant(msg: impl Into<String>) -> ModelError {
    ModelError::Invariant(msg.into())
}

fn sys(what: &'static str) -> impl FnOnce(Errno) -> ModelError {
    move |source| ModelError::Sys { what, source }
}

const PAGE: u64 = 4096;
/// KVM's `KVM_MAX_IRQ_ROUTES` (also the largest GSI + 1).
const KVM_MAX_IRQ_ROUTES: usize = 4096;
/// KVM's `NR_IOBUS_DEVS`: io devices per bus.
const KVM_IOBUS_DEVS: usize = 1000;
/// KVM's `KVM_MEM_MAX_NR_PAGES`.
const KVM_MEM_MAX_PAGES: u64 = (1 << 31) - 1;

/// One installed memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
    pub read_only: bool,
    pub dirty_log: bool,
}

/// One ioeventfd registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoReg {
    pub fd: RawFd,
    pub space: Space,
    pub addr: u64,
    pub len: u32,
    pub datamatch: u64,
}

/// One irqfd registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqReg {
    pub trigger: RawFd,
    pub gsi: u32,
}

#[derive(Default)]
struct VmModel {
    slots: BTreeMap<u32, Slot>,
    ioevents: Vec<IoReg>,
    irqfds: Vec<IrqReg>,
    /// Coalesced zones (space, address, length).
    coalesced: Vec<(Space, u64, u32)>,
    routes: Vec<IrqRoute>,
    state: [Option<Vec<u8>>; 5],
    identity_map: Option<u64>,
    vcpus_created: bool,
    violations: Vec<String>,
}

/// The VM model.
pub struct ModelVm {
    max_slots: u32,
    inner: RefCell<VmModel>,
}

fn vm_state_index(set: VmStateKind) -> usize {
    match set {
        VmStateKind::Pic0 => 0,
        VmStateKind::Pic1 => 1,
        VmStateKind::Ioapic => 2,
        VmStateKind::Pit => 3,
        VmStateKind::Clock => 4,
    }
}

/// Whether `[addr, addr + len)` is mapped in this process (`mincore` fails
/// with `ENOMEM` on unmapped pages). Long ranges are probed at both ends.
pub fn is_mapped(addr: u64, len: u64) -> bool {
    if !addr.is_multiple_of(PAGE) || len == 0 {
        return false;
    }
    let probe = |a: u64, l: u64| {
        let mut vec = [0u8; 64];
        if l.div_ceil(PAGE) > vec.len() as u64 {
            return false;
        }
        // SAFETY: mincore only reads the page tables of the given range and
        // writes one byte per page into `vec`, which has room for them all
        // (checked above).
        unsafe { libc::mincore(a as *mut libc::c_void, l as usize, vec.as_mut_ptr()) == 0 }
    };
    let chunk = 64 * PAGE;
    if len <= chunk {
        probe(addr, len)
    } else {
        probe(addr, chunk) && probe((addr + len - 1) & !(PAGE - 1), PAGE)
    }
}

impl ModelVm {
    /// A VM with room for `max_slots` memory slots.
    pub fn new(max_slots: u32) -> ModelVm {
        ModelVm {
            max_slots,
            inner: RefCell::new(VmModel::default()),
        }
    }

    fn violation(&self, msg: String) {
        self.inner.borrow_mut().violations.push(msg);
    }

    /// The main loop creates the vcpus after `Start`.
    pub fn set_vcpus_created(&self) {
        self.inner.borrow_mut().vcpus_created = true;
    }

    pub fn slots(&self) -> BTreeMap<u32, Slot> {
        self.inner.borrow().slots.clone()
    }

    pub fn ioevents(&self) -> Vec<IoReg> {
        self.inner.borrow().ioevents.clone()
    }

    /// The coalesced zones registered now (space, address, length).
    pub fn coalesced(&self) -> Vec<(Space, u64, u32)> {
        self.inner.borrow().coalesced.clone()
    }

    pub fn irqfds(&self) -> Vec<IrqReg> {
        self.inner.borrow().irqfds.clone()
    }

    pub fn routes(&self) -> Vec<IrqRoute> {
        self.inner.borrow().routes.clone()
    }

    pub fn identity_map(&self) -> Option<u64> {
        self.inner.borrow().identity_map
    }

    /// Host bugs observed so far.
    pub fn violations(&self) -> Vec<String> {
        self.inner.borrow().violations.clone()
    }

    /// The model's own consistency: slots aligned and disjoint, host ranges
    /// still mapped, registrations within KVM's limits, no violation.
    pub fn check(&self) -> std::result::Result<(), ModelError> {
        let m = self.inner.borrow();
        if let Some(v) = m.violations.first() {
            return Err(ModelError::Contract(v.clone()));
        }
        let mut prev: Option<(u32, &Slot)> = None;
        let mut by_addr: Vec<(u32, &Slot)> = m.slots.iter().map(|(k, v)| (*k, v)).collect();
        by_addr.sort_by_key(|(_, s)| s.guest_addr);
        for (id, s) in by_addr {
            if !s.guest_addr.is_multiple_of(PAGE) || !s.size.is_multiple_of(PAGE) || s.size == 0 {
                return Err(invariant(format!("slot {id} is not page aligned: {s:?}")));
            }
            if let Some((pid, p)) = prev {
                if p.guest_addr + p.size > s.guest_addr {
                    return Err(invariant(format!("slots {pid} and {id} overlap")));
                }
            }
            if !is_mapped(s.host_addr, s.size) {
                return Err(invariant(format!(
                    "slot {id}: host range {:#x}+{:#x} is no longer mapped",
                    s.host_addr, s.size
                )));
            }
            prev = Some((id, s));
        }
        if m.slots.len() > self.max_slots as usize {
            return Err(invariant("more slots than the VM supports"));
        }
        if m.routes.len() > KVM_MAX_IRQ_ROUTES {
            return Err(invariant("routing table larger than KVM allows"));
        }
        Ok(())
    }
}

fn fd_is_open(fd: RawFd) -> bool {
    // No `BorrowedFd` here: the descriptor may well be closed, which is the
    // question. `F_GETFD` on a bare number only reads the descriptor table.
    // SAFETY: fcntl(F_GETFD) takes no pointer and changes nothing; any
    // integer is a valid argument (a closed one yields EBADF).
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

impl Vm for ModelVm {
    fn check_extension(&self, cap: u32) -> i32 {
        match cap % 4 {
            0 => 0,
            1 => 1,
            2 => 8,
            _ => -1,
        }
    }

    fn supported_cpuid(&self) -> Result<Vec<Cpuid>> {
        Ok((0..8)
            .map(|f| Cpuid {
                function: f,
                index: if f % 2 == 0 { f } else { 0 },
                flags: if f % 2 == 0 {
                    kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: f * 3,
                ..Default::default()
            })
            .collect())
    }

    fn emulated_cpuid(&self) -> Result<Vec<Cpuid>> {
        Ok(vec![Cpuid {
            function: 0x4000_0000,
            ..Default::default()
        }])
    }

    fn msr_index_list(&self) -> Result<Vec<u32>> {
        Ok(vec![0x10, 0x1b, 0xc000_0080, 0xc000_0100])
    }

    unsafe fn add_memory_slot(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        read_only: bool,
        dirty_log: bool,
    ) -> Result<()> {
        // The contract: the host range is mapped and stays mapped until the
        // slot is removed (checked again by `check`).
        if !is_mapped(host_addr, size.max(1)) {
            self.violation(format!(
                "slot {slot}: host range {host_addr:#x}+{size:#x} is not mapped"
            ));
            return Err(Errno::EFAULT);
        }
        if !size.is_multiple_of(PAGE)
            || !guest_addr.is_multiple_of(PAGE)
            || !host_addr.is_multiple_of(PAGE)
            || size == 0
        {
            return Err(Errno::EINVAL);
        }
        if dirty_log && dirty_bitmap_len(size) > limits::MAX_DIRTY_BITMAP {
            self.violation(format!(
                "a dirty-logged slot of {size:#x} bytes: KVM would allocate its bitmaps"
            ));
            return Err(Errno::E2BIG);
        }
        if slot >= self.max_slots {
            self.violation(format!("slot {slot} is beyond the VM's {}", self.max_slots));
            return Err(Errno::EINVAL);
        }
        if guest_addr.checked_add(size).is_none() || size / PAGE > KVM_MEM_MAX_PAGES {
            return Err(Errno::EINVAL);
        }
        let mut m = self.inner.borrow_mut();
        if m.slots.contains_key(&slot) {
            m.violations
                .push(format!("slot {slot} installed while still in use"));
            return Err(Errno::EEXIST);
        }
        let end = guest_addr + size;
        if m.slots
            .values()
            .any(|s| guest_addr < s.guest_addr + s.size && s.guest_addr < end)
        {
            return Err(Errno::EEXIST);
        }
        m.slots.insert(
            slot,
            Slot {
                guest_addr,
                size,
                host_addr,
                read_only,
                dirty_log,
            },
        );
        Ok(())
    }

    fn remove_memory_slot(&self, slot: u32, guest_addr: u64) -> Result<()> {
        let mut m = self.inner.borrow_mut();
        match m.slots.get(&slot) {
            Some(s) if s.guest_addr == guest_addr => {
                m.slots.remove(&slot);
                Ok(())
            }
            Some(_) => {
                m.violations
                    .push(format!("slot {slot} removed at the wrong address"));
                Err(Errno::EINVAL)
            }
            None => {
                m.violations
                    .push(format!("slot {slot} removed but not installed"));
                Err(Errno::EINVAL)
            }
        }
    }

    fn register_ioevent(
        &self,
        evt: &EventFd,
        space: Space,
        addr: u64,
        len: u32,
        datamatch: u64,
    ) -> Result<()> {
        if !matches!(len, 0 | 1 | 2 | 4 | 8) {
            self.violation(format!("ioevent length {len} reached the VM"));
            return Err(Errno::EINVAL);
        }
        if addr.checked_add(u64::from(len)).is_none() {
            return Err(Errno::EINVAL);
        }
        if len != 0 && len < 8 && datamatch >> (8 * len) != 0 {
            self.violation(format!(
                "datamatch {datamatch:#x} wider than the {len}-byte access"
            ));
        }
        let mut m = self.inner.borrow_mut();
        let collides = m.ioevents.iter().any(|r| {
            r.space == space
                && r.addr == addr
                && (r.len == 0 || len == 0 || (r.len == len && r.datamatch == datamatch))
        });
        if collides {
            return Err(Errno::EEXIST);
        }
        if m.ioevents.iter().filter(|r| r.space == space).count() >= KVM_IOBUS_DEVS {
            return Err(Errno::ENOSPC);
        }
        m.ioevents.push(IoReg {
            fd: evt.as_raw_fd(),
            space,
            addr,
            len,
            datamatch,
        });
        Ok(())
    }

    fn unregister_ioevent(
        &self,
        evt: &EventFd,
        space: Space,
        addr: u64,
        len: u32,
        datamatch: u64,
    ) -> Result<()> {
        let reg = IoReg {
            fd: evt.as_raw_fd(),
            space,
            addr,
            len,
            datamatch,
        };
        let mut m = self.inner.borrow_mut();
        match m.ioevents.iter().position(|r| *r == reg) {
            Some(i) => {
                m.ioevents.remove(i);
                Ok(())
            }
            None => {
                m.violations
                    .push(format!("unregistering an unknown ioevent {reg:?}"));
                Err(Errno::ENOENT)
            }
        }
    }

    fn register_irqfd(&self, trigger: &EventFd, resample: &EventFd, gsi: u32) -> Result<()> {
        if !fd_is_open(resample.as_raw_fd()) {
            self.violation("irqfd resample descriptor is closed".into());
            return Err(Errno::EBADF);
        }
        let mut m = self.inner.borrow_mut();
        if m.irqfds.iter().any(|r| r.trigger == trigger.as_raw_fd()) {
            return Err(Errno::EBUSY);
        }
        m.irqfds.push(IrqReg {
            trigger: trigger.as_raw_fd(),
            gsi,
        });
        Ok(())
    }

    fn unregister_irqfd(&self, trigger: &EventFd, gsi: u32) -> Result<()> {
        let reg = IrqReg {
            trigger: trigger.as_raw_fd(),
            gsi,
        };
        let mut m = self.inner.borrow_mut();
        match m.irqfds.iter().position(|r| *r == reg) {
            Some(i) => {
                m.irqfds.remove(i);
                Ok(())
            }
            None => {
                m.violations
                    .push(format!("unregistering an unknown irqfd {reg:?}"));
                // KVM itself ignores this silently.
                Ok(())
            }
        }
    }

    fn set_irq_line(&self, irq: u32, _active: bool) -> Result<()> {
        if irq as usize >= KVM_MAX_IRQ_ROUTES {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()> {
        if routes.len() > limits::MAX_IRQ_ROUTES {
            self.violation(format!(
                "{} routes reached the VM (limit {})",
                routes.len(),
                limits::MAX_IRQ_ROUTES
            ));
        }
        if routes.len() > KVM_MAX_IRQ_ROUTES {
            return Err(Errno::EINVAL);
        }
        for r in routes {
            match *r {
                IrqRoute::Irqchip { gsi, chip, pin } => {
                    let pins = match chip {
                        0 | 1 => 8,
                        2 => 24,
                        _ => return Err(Errno::EINVAL),
                    };
                    if gsi as usize >= KVM_MAX_IRQ_ROUTES || pin >= pins {
                        return Err(Errno::EINVAL);
                    }
                }
                IrqRoute::Msi { gsi, .. } => {
                    if gsi as usize >= KVM_MAX_IRQ_ROUTES {
                        return Err(Errno::EINVAL);
                    }
                }
            }
        }
        self.inner.borrow_mut().routes = routes.to_vec();
        Ok(())
    }

    fn get_state(&self, set: VmStateKind) -> Result<Vec<u8>> {
        Ok(self.inner.borrow().state[vm_state_index(set)]
            .clone()
            .unwrap_or_else(|| vec![0; set.size()]))
    }

    fn set_state(&self, set: VmStateKind, image: &[u8]) -> Result<()> {
        if image.len() != set.size() {
            self.violation(format!(
                "{set:?} image of {} bytes reached the VM",
                image.len()
            ));
            return Err(Errno::EINVAL);
        }
        // KVM rejects clock flags it does not know (the first u32 after the
        // 64-bit clock value).
        if set == VmStateKind::Clock && image[8..12] != [0; 4] {
            return Err(Errno::EINVAL);
        }
        self.inner.borrow_mut().state[vm_state_index(set)] = Some(image.to_vec());
        Ok(())
    }

    fn set_identity_map_addr(&self, addr: u64) -> Result<()> {
        let mut m = self.inner.borrow_mut();
        if m.vcpus_created {
            return Err(Errno::EINVAL);
        }
        m.identity_map = Some(addr);
        Ok(())
    }

    fn get_dirty_log(&self, slot: u32, size: u64, bitmap_len: usize) -> Result<Vec<u8>> {
        let m = self.inner.borrow();
        let Some(s) = m.slots.get(&slot) else {
            drop(m);
            self.violation(format!("dirty log of slot {slot}, which is not installed"));
            return Err(Errno::ENOENT);
        };
        if s.size != size || bitmap_len != dirty_bitmap_len(size) {
            let msg = format!("dirty log of slot {slot} with a wrong size");
            drop(m);
            self.violation(msg);
            return Err(Errno::EINVAL);
        }
        if bitmap_len > limits::MAX_DIRTY_BITMAP {
            let msg = format!("a {bitmap_len}-byte dirty bitmap was allocated");
            drop(m);
            self.violation(msg);
            return Err(Errno::E2BIG);
        }
        if !s.dirty_log {
            return Err(Errno::ENOENT);
        }
        let mut bitmap = vec![0u8; bitmap_len];
        if let Some(b) = bitmap.first_mut() {
            *b = 1;
        }
        Ok(bitmap)
    }

    fn max_memory_slots(&self) -> u32 {
        self.max_slots
    }

    fn register_coalesced(&self, space: Space, addr: u64, len: u32) -> Result<()> {
        let end = addr.checked_add(u64::from(len));
        if len == 0 || end.is_none() {
            self.violation(format!("coalesced zone {addr:#x}+{len:#x} reached the VM"));
            return Err(Errno::EINVAL);
        }
        let end = end.unwrap_or(u64::MAX);
        let mut m = self.inner.borrow_mut();
        let overlaps = |a: u64, l: u64| a < end && addr < a.saturating_add(l.max(1));
        if m.coalesced
            .iter()
            .any(|&(s, a, l)| s == space && overlaps(a, u64::from(l)))
        {
            drop(m);
            self.violation(format!(
                "coalesced zone {addr:#x}+{len:#x} overlaps another"
            ));
            return Err(Errno::EEXIST);
        }
        if m.ioevents
            .iter()
            .any(|r| r.space == space && overlaps(r.addr, u64::from(r.len)))
        {
            drop(m);
            self.violation(format!(
                "coalesced zone {addr:#x}+{len:#x} overlaps an ioeventfd"
            ));
            return Err(Errno::EEXIST);
        }
        if m.coalesced.len() + m.ioevents.len() >= KVM_IOBUS_DEVS {
            return Err(Errno::ENOSPC);
        }
        m.coalesced.push((space, addr, len));
        Ok(())
    }

    fn unregister_coalesced(&self, space: Space, addr: u64, len: u32) -> Result<()> {
        let mut m = self.inner.borrow_mut();
        match m.coalesced.iter().position(|&z| z == (space, addr, len)) {
            Some(i) => {
                m.coalesced.remove(i);
                Ok(())
            }
            None => {
                drop(m);
                self.violation(format!(
                    "unregistering the unknown coalesced zone {addr:#x}+{len:#x}"
                ));
                Err(Errno::ENOENT)
            }
        }
    }
}

/// A coalesced ring in memory: the writes a test puts in, taken in order.
#[derive(Debug, Default)]
pub struct ModelRing(
    pub std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<CoalescedWrite>>>,
);

impl CoalescedRing for ModelRing {
    fn pop(&mut self) -> Option<CoalescedWrite> {
        self.0.lock().ok()?.pop_front()
    }
}

#[derive(Default)]
struct VcpuModel {
    state: [Option<Vec<u8>>; 8],
    msrs: BTreeMap<u32, u64>,
    cpuid: Vec<Cpuid>,
    caps: Vec<u32>,
    /// Every `set_state`, in order (the deferred-register order is checked).
    set_log: Vec<VcpuStateKind>,
    violations: Vec<String>,
}

/// The vcpu model.
#[derive(Default)]
pub struct ModelVcpu {
    inner: RefCell<VcpuModel>,
}

fn vcpu_state_index(set: VcpuStateKind) -> usize {
    match set {
        VcpuStateKind::Regs => 0,
        VcpuStateKind::Sregs => 1,
        VcpuStateKind::Fpu => 2,
        VcpuStateKind::Debugregs => 3,
        VcpuStateKind::Lapic => 4,
        VcpuStateKind::Mp => 5,
        VcpuStateKind::Xcregs => 6,
        VcpuStateKind::Events => 7,
    }
}

/// MSRs the model knows; KVM stops at the first one it cannot handle.
fn msr_known(index: u32) -> bool {
    index < 0x2000 || (0xc000_0000..0xc000_2000).contains(&index)
}

impl ModelVcpu {
    fn violation(&self, msg: String) {
        self.inner.borrow_mut().violations.push(msg);
    }

    /// The stored image of `set` (zeros if never set).
    pub fn image(&self, set: VcpuStateKind) -> Vec<u8> {
        self.inner.borrow().state[vcpu_state_index(set)]
            .clone()
            .unwrap_or_else(|| vec![0; set.size()])
    }

    /// Takes the log of `set_state` calls.
    pub fn take_set_log(&self) -> Vec<VcpuStateKind> {
        std::mem::take(&mut self.inner.borrow_mut().set_log)
    }

    pub fn check(&self) -> std::result::Result<(), ModelError> {
        let m = self.inner.borrow();
        if let Some(v) = m.violations.first() {
            return Err(ModelError::Contract(v.clone()));
        }
        for (i, img) in m.state.iter().enumerate() {
            if let Some(img) = img {
                let set = VcpuStateKind::from_wire(i as i32).expect("8 sets");
                if img.len() != set.size() {
                    return Err(invariant(format!("{set:?} stored with a wrong size")));
                }
            }
        }
        if m.cpuid.len() > limits::MAX_CPUID_ENTRIES {
            return Err(invariant("CPUID table beyond its limit"));
        }
        Ok(())
    }
}

impl Vcpu for ModelVcpu {
    fn get_state(&self, set: VcpuStateKind) -> Result<Vec<u8>> {
        Ok(self.image(set))
    }

    fn set_state(&self, set: VcpuStateKind, image: &[u8]) -> Result<()> {
        if image.len() != set.size() {
            self.violation(format!(
                "{set:?} image of {} bytes reached the vcpu",
                image.len()
            ));
            return Err(Errno::EINVAL);
        }
        // KVM_SET_MP_STATE rejects unknown states.
        if set == VcpuStateKind::Mp
            && u32::from_le_bytes([image[0], image[1], image[2], image[3]]) > 8
        {
            return Err(Errno::EINVAL);
        }
        let mut m = self.inner.borrow_mut();
        m.state[vcpu_state_index(set)] = Some(image.to_vec());
        m.set_log.push(set);
        Ok(())
    }

    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>> {
        if indices.len() > limits::MAX_MSR_ENTRIES {
            self.violation(format!("{} MSRs reached the vcpu", indices.len()));
            return Err(Errno::E2BIG);
        }
        let m = self.inner.borrow();
        Ok(indices
            .iter()
            .take_while(|i| msr_known(**i))
            .map(|i| m.msrs.get(i).copied().unwrap_or(0))
            .collect())
    }

    fn set_msrs(&self, entries: &[(u32, u64)]) -> Result<()> {
        if entries.len() > limits::MAX_MSR_ENTRIES {
            self.violation(format!("{} MSRs reached the vcpu", entries.len()));
            return Err(Errno::E2BIG);
        }
        let mut m = self.inner.borrow_mut();
        for &(i, v) in entries.iter().take_while(|(i, _)| msr_known(*i)) {
            m.msrs.insert(i, v);
        }
        Ok(())
    }

    fn set_cpuid(&self, entries: &[Cpuid]) -> Result<()> {
        if entries.len() > limits::MAX_CPUID_ENTRIES {
            self.violation(format!("{} CPUID entries reached the vcpu", entries.len()));
            return Err(Errno::E2BIG);
        }
        self.inner.borrow_mut().cpuid = entries.to_vec();
        Ok(())
    }

    fn get_hyperv_cpuid(&self) -> Result<Vec<Cpuid>> {
        Ok(vec![Cpuid {
            function: 0x4000_0001,
            eax: 0x3123_7648,
            ..Default::default()
        }])
    }

    fn enable_capability(&self, cap: u32) -> Result<()> {
        if cap != 123 && cap != 148 {
            return Err(Errno::EINVAL);
        }
        self.inner.borrow_mut().caps.push(cap);
        Ok(())
    }
}

/// Host resources for the main handler: real pipes and eventfds (so the
/// handler's `dup`s and descriptor counts are real), a fake tap.
pub struct FakeServices {
    vcpus: Vec<[OwnedFd; 2]>,
    shutdown: EventFd,
    tap: Option<OwnedFd>,
    pauses: RefCell<Vec<(u64, u64)>>,
    /// Host ends of the extra connections the harness accepted.
    pub connections: RefCell<Vec<OwnedFd>>,
    /// The plugin's control channel (`GetControlSocket`).
    pub control: RefCell<vmm::runtime::plugin_control::PluginControl>,
}

impl FakeServices {
    /// `vcpus` vcpu channels; a tap when `with_tap`.
    pub fn new(vcpus: usize, with_tap: bool) -> std::result::Result<FakeServices, ModelError> {
        let mut chans = Vec::with_capacity(vcpus);
        for _ in 0..vcpus {
            let (_, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe2"))?;
            let (r, _) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe2"))?;
            chans.push([w, r]);
        }
        let shutdown = EventFd::new(libc::EFD_CLOEXEC).map_err(|e| ModelError::Sys {
            what: "eventfd",
            source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
        })?;
        let tap = if with_tap {
            Some(
                std::fs::File::open("/dev/null")
                    .map_err(|_| ModelError::Sys {
                        what: "opening /dev/null",
                        source: Errno::ENOENT,
                    })?
                    .into(),
            )
        } else {
            None
        };
        Ok(FakeServices {
            vcpus: chans,
            shutdown,
            tap,
            pauses: RefCell::new(Vec::new()),
            connections: RefCell::new(Vec::new()),
            control: RefCell::default(),
        })
    }

    /// Pause requests seen so far.
    pub fn pauses(&self) -> Vec<(u64, u64)> {
        self.pauses.borrow().clone()
    }
}

impl HostServices for FakeServices {
    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    fn vcpu_fds(&self, i: usize) -> [BorrowedFd<'_>; 2] {
        let [a, b] = &self.vcpus[i];
        [a.as_fd(), b.as_fd()]
    }

    fn fast_channel_fd(&self, _i: usize) -> Option<BorrowedFd<'_>> {
        None
    }

    fn shutdown_eventfd(&self) -> BorrowedFd<'_> {
        vmm::vm::borrow_fd(&self.shutdown)
    }

    fn net_config(&self) -> std::result::Result<Option<NetConfig<'_>>, Errno> {
        Ok(self.tap.as_ref().map(|fd| NetConfig {
            mac: [0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a],
            ip: [100, 115, 92, 5],
            netmask: [255, 255, 255, 252],
            fd: fd.as_fd(),
        }))
    }

    fn pause_vcpus(&self, mask: u64, user: u64) {
        let mut p = self.pauses.borrow_mut();
        // Bounded like the real host's per-vcpu slots.
        if p.len() >= 64 {
            p.remove(0);
        }
        p.push((mask, user));
    }

    fn connection_count(&self) -> usize {
        1 + self.connections.borrow().len()
    }

    fn open_control_channel(&self) -> std::result::Result<OwnedFd, Errno> {
        self.control.borrow_mut().open()
    }
}

/// Number of descriptors open in this process.
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1))
        .unwrap_or(0)
}

/// Largest memfd a replay creates, in pages (sparse, never touched).
pub const MAX_REPLAY_PAGES: u16 = 16384;

fn memfd(pages: u16, seals: SealFlag) -> std::result::Result<OwnedFd, ModelError> {
    let fd = memfd_create(
        c"model",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(sys("memfd_create"))?;
    let size = i64::from(pages.min(MAX_REPLAY_PAGES)) * PAGE as i64;
    nix::unistd::ftruncate(&fd, size).map_err(sys("ftruncate"))?;
    if !seals.is_empty() {
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(sys("F_ADD_SEALS"))?;
    }
    Ok(fd)
}

/// Makes descriptors of `kind` as the host's receive would hand them to the
/// handler: at most one, plus whether more were attached.
pub fn make_fds(kind: FdKind, arg: u16) -> std::result::Result<(Vec<OwnedFd>, bool), ModelError> {
    let one = |fd: OwnedFd| Ok((vec![fd], false));
    match kind {
        FdKind::None => Ok((Vec::new(), false)),
        FdKind::SealedMemfd => one(memfd(arg, SealFlag::F_SEAL_SHRINK)?),
        FdKind::UnsealedMemfd => one(memfd(arg, SealFlag::empty())?),
        FdKind::WriteSealedMemfd => one(memfd(
            arg,
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_WRITE,
        )?),
        FdKind::Pipe => one(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(sys("pipe2"))?
            .0),
        FdKind::EventFd => {
            let e = EventFd::new(libc::EFD_CLOEXEC).map_err(|e| ModelError::Sys {
                what: "eventfd",
                source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
            })?;
            // SAFETY: into_raw_fd hands over sole ownership of the descriptor.
            one(unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) })
        }
        FdKind::RegularFile => {
            let f = std::fs::File::open("/proc/self/exe").map_err(|e| ModelError::Sys {
                what: "opening /proc/self/exe",
                source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOENT)),
            })?;
            one(f.into())
        }
        FdKind::Socket => {
            let (a, _b) = socketpair(
                AddressFamily::Unix,
                SockType::SeqPacket,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .map_err(sys("socketpair"))?;
            one(a)
        }
        // The host receives with room for one: the first is kept, the rest
        // are closed by the kernel, and the packet counts as carrying none.
        FdKind::Many => Ok((vec![memfd(16, SealFlag::F_SEAL_SHRINK)?], true)),
    }
}
