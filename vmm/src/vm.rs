//! The narrow hypervisor surface the request handlers use.
//!
//! [`Vm`] and [`Vcpu`] are what the main and vcpu request handlers call; the
//! real implementations sit on `kvm-ioctls` ([`KvmVm`], `kvm_ioctls::VcpuFd`),
//! and an in-memory model (the `vmm-model` crate) implements the same traits
//! for unit tests and fuzzing.
//! State images cross these traits as raw bytes, exactly as they cross the wire.
//! [`VcpuRun`] is the run handle of a vcpu: `run()` returns a [`VmExit`], which
//! the exit routing (`runtime::vcpu::exits`) turns into wait reasons.

use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_enable_cap, kvm_fpu,
    kvm_irq_routing_entry, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_config,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
    CpuId, KvmIrqRouting, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use nix::errno::Errno;
use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, IntoBytes};

/// Most entries a CPUID or MSR-list query returns (as the reference host).
pub const MAX_KVM_LIST_ENTRIES: usize = 256;

pub type Result<T> = std::result::Result<T, Errno>;

/// Errors setting up the VM itself (not request handling, which uses errnos).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open the KVM device {path}")]
    OpenKvm {
        path: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VCPU {id} failed")]
    CreateVcpu {
        id: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot map the coalesced ring through vcpu {id}")]
    CoalescedRing {
        id: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// An address space of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    Ioport,
    Mmio,
}

impl Space {
    /// Decodes the wire value (0 = IOPORT, 1 = MMIO).
    pub fn from_wire(v: i32) -> Option<Space> {
        match v {
            0 => Some(Space::Ioport),
            1 => Some(Space::Mmio),
            _ => None,
        }
    }

    pub fn to_wire(self) -> i32 {
        match self {
            Space::Ioport => 0,
            Space::Mmio => 1,
        }
    }
}

/// Which VM-wide state image (`MainRequest.StateSet`): a kind, not the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmStateKind {
    Pic0,
    Pic1,
    Ioapic,
    Pit,
    Clock,
}

impl VmStateKind {
    pub fn from_wire(v: i32) -> Option<VmStateKind> {
        Some(match v {
            0 => VmStateKind::Pic0,
            1 => VmStateKind::Pic1,
            2 => VmStateKind::Ioapic,
            3 => VmStateKind::Pit,
            4 => VmStateKind::Clock,
            _ => return None,
        })
    }

    /// Size in bytes of the image.
    pub fn size(self) -> usize {
        match self {
            VmStateKind::Pic0 | VmStateKind::Pic1 => 16,
            VmStateKind::Ioapic => 216,
            VmStateKind::Pit => std::mem::size_of::<kvm_pit_state2>(),
            VmStateKind::Clock => std::mem::size_of::<kvm_clock_data>(),
        }
    }
}

/// Which per-vcpu state image (`VcpuRequest.StateSet`): a kind, not the
/// image (the SDK's `VcpuState` struct is an image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStateKind {
    Regs,
    Sregs,
    Fpu,
    Debugregs,
    Lapic,
    Mp,
    Xcregs,
    Events,
}

impl VcpuStateKind {
    pub fn from_wire(v: i32) -> Option<VcpuStateKind> {
        Some(match v {
            0 => VcpuStateKind::Regs,
            1 => VcpuStateKind::Sregs,
            2 => VcpuStateKind::Fpu,
            3 => VcpuStateKind::Debugregs,
            4 => VcpuStateKind::Lapic,
            5 => VcpuStateKind::Mp,
            6 => VcpuStateKind::Xcregs,
            7 => VcpuStateKind::Events,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            VcpuStateKind::Regs => std::mem::size_of::<kvm_regs>(),
            VcpuStateKind::Sregs => std::mem::size_of::<kvm_sregs>(),
            VcpuStateKind::Fpu => std::mem::size_of::<kvm_fpu>(),
            VcpuStateKind::Debugregs => std::mem::size_of::<kvm_debugregs>(),
            VcpuStateKind::Lapic => std::mem::size_of::<kvm_lapic_state>(),
            VcpuStateKind::Mp => std::mem::size_of::<kvm_mp_state>(),
            VcpuStateKind::Xcregs => std::mem::size_of::<kvm_xcrs>(),
            VcpuStateKind::Events => std::mem::size_of::<kvm_vcpu_events>(),
        }
    }
}

/// One GSI route of `SetIrqRouting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqRoute {
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    Msi { gsi: u32, address: u64, data: u32 },
}

/// A CPUID entry (KVM's own struct; the wire conversion is
/// [`plugin_proto::cpuid`]).
pub type Cpuid = kvm_cpuid_entry2;

/// The VM-level operations the main request handler needs.
pub trait Vm {
    /// `KVM_CHECK_EXTENSION` on the VM; the raw ioctl result.
    fn check_extension(&self, cap: u32) -> i32;
    fn supported_cpuid(&self) -> Result<Vec<Cpuid>>;
    fn emulated_cpuid(&self) -> Result<Vec<Cpuid>>;
    fn msr_index_list(&self) -> Result<Vec<u32>>;
    /// Installs `[host_addr, host_addr + size)` at `guest_addr` in `slot`.
    ///
    /// # Safety
    /// The host range must stay mapped until the slot is removed.
    unsafe fn add_memory_slot(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        read_only: bool,
        dirty_log: bool,
    ) -> Result<()>;
    fn remove_memory_slot(&self, slot: u32, guest_addr: u64) -> Result<()>;
    fn register_ioevent(
        &self,
        evt: &EventFd,
        space: Space,
        addr: u64,
        len: u32,
        datamatch: u64,
    ) -> Result<()>;
    fn unregister_ioevent(
        &self,
        evt: &EventFd,
        space: Space,
        addr: u64,
        len: u32,
        datamatch: u64,
    ) -> Result<()>;
    fn register_irqfd(&self, trigger: &EventFd, resample: &EventFd, gsi: u32) -> Result<()>;
    fn unregister_irqfd(&self, trigger: &EventFd, gsi: u32) -> Result<()>;
    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()>;
    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()>;
    fn get_state(&self, set: VmStateKind) -> Result<Vec<u8>>;
    /// `image` has already been checked to be `set.size()` bytes.
    fn set_state(&self, set: VmStateKind, image: &[u8]) -> Result<()>;
    fn set_identity_map_addr(&self, addr: u64) -> Result<()>;
    /// Fetches (and resets) the dirty bitmap of `slot`, `bitmap_len` bytes.
    fn get_dirty_log(&self, slot: u32, size: u64, bitmap_len: usize) -> Result<Vec<u8>>;
    /// Highest number of memory slots the VM supports.
    fn max_memory_slots(&self) -> u32;
    /// Makes KVM coalesce guest writes to `[addr, addr + len)`
    /// (`KVM_REGISTER_COALESCED_MMIO` / `_PIO`): they append to the VM's
    /// coalesced ring instead of exiting (docs/protocol-extensions.md §4).
    fn register_coalesced(&self, space: Space, addr: u64, len: u32) -> Result<()>;
    /// Removes a zone registered with [`Vm::register_coalesced`] (same
    /// space, address and length).
    fn unregister_coalesced(&self, space: Space, addr: u64, len: u32) -> Result<()>;
}

/// One guest write taken from the coalesced ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescedWrite {
    pub space: Space,
    pub address: u64,
    /// Bytes written (1 to 8).
    pub len: u32,
    pub data: [u8; 8],
}

/// Size of one record of a `CoalescedWrites` batch on the wire
/// (docs/protocol-extensions.md §4.3).
pub const COALESCED_RECORD: usize = 24;

impl CoalescedWrite {
    /// The wire record: address u64, length u32, is_port u32, data, all
    /// little-endian.
    pub fn record(&self) -> [u8; COALESCED_RECORD] {
        let mut r = [0u8; COALESCED_RECORD];
        r[..8].copy_from_slice(&self.address.to_le_bytes());
        r[8..12].copy_from_slice(&self.len.to_le_bytes());
        r[12..16].copy_from_slice(&u32::from(self.space == Space::Ioport).to_le_bytes());
        r[16..].copy_from_slice(&self.data);
        r
    }
}

/// The VM's coalesced-write ring, as the vcpu threads drain it (one
/// consumer at a time: the owner serialises access).
pub trait CoalescedRing: Send {
    /// The oldest write not taken yet, if any.
    fn pop(&mut self) -> Option<CoalescedWrite>;
}

/// The coalesced ring of a KVM VM: the page at
/// `KVM_COALESCED_MMIO_PAGE_OFFSET` of a vcpu descriptor (every vcpu maps
/// the same VM-wide page), read through kvm-ioctls on a handle of its own.
pub struct KvmCoalescedRing(VcpuFd);

impl CoalescedRing for KvmCoalescedRing {
    fn pop(&mut self) -> Option<CoalescedWrite> {
        let e = self.0.coalesced_mmio_read().ok()??;
        Some(CoalescedWrite {
            // SAFETY: both members of the union are a plain u32 (`pad` and
            // `pio` share the word); reading it is always defined.
            space: if unsafe { e.__bindgen_anon_1.pio } != 0 {
                Space::Ioport
            } else {
                Space::Mmio
            },
            address: e.phys_addr,
            // KVM only coalesces accesses of at most 8 bytes; a longer
            // length would be a kernel bug, cut to the data that exists.
            len: e.len.min(8),
            data: e.data,
        })
    }
}

/// The per-vcpu operations the vcpu request handler needs.
pub trait Vcpu {
    fn get_state(&self, set: VcpuStateKind) -> Result<Vec<u8>>;
    /// `image` has already been checked to be `set.size()` bytes.
    fn set_state(&self, set: VcpuStateKind, image: &[u8]) -> Result<()>;
    /// Returns the values of the first MSRs the kernel could read.
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>>;
    fn set_msrs(&self, entries: &[(u32, u64)]) -> Result<()>;
    fn set_cpuid(&self, entries: &[Cpuid]) -> Result<()>;
    /// The CPUID entries set on the vcpu (none if never set), for a
    /// snapshot.
    fn get_cpuid(&self) -> Result<Vec<Cpuid>> {
        Err(Errno::ENOTTY)
    }
    /// The vcpu's whole XSAVE image (`KVM_GET_XSAVE`, 4096 bytes: x87,
    /// SSE, AVX and the other enabled components), for a snapshot.
    fn get_xsave(&self) -> Result<Vec<u8>> {
        Err(Errno::ENOTTY)
    }
    /// Sets an image from [`Self::get_xsave`].
    fn set_xsave(&self, image: &[u8]) -> Result<()> {
        let _ = image;
        Err(Errno::ENOTTY)
    }
    /// `KVM_SET_MSRS`: how many of `entries` were set (it stops at the
    /// first one KVM refuses), for a restore.
    fn set_msrs_counted(&self, entries: &[(u32, u64)]) -> Result<usize> {
        self.set_msrs(entries).map(|()| entries.len())
    }
    fn get_hyperv_cpuid(&self) -> Result<Vec<Cpuid>>;
    fn enable_capability(&self, cap: u32) -> Result<()>;
}

/// Why `KVM_RUN` returned, with the exit's data.
///
/// Slices borrow the vcpu's run area: a guest read is completed by filling
/// `data` before the next [`VcpuRun::run`], a hypercall by writing `result`.
#[derive(Debug, PartialEq, Eq)]
pub enum VmExit<'a> {
    /// `OUT` to `port`.
    IoOut { port: u16, data: &'a [u8] },
    /// `IN` from `port`: the value the guest reads goes into `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// A write to unmapped guest-physical memory.
    MmioWrite { address: u64, data: &'a [u8] },
    /// A read of unmapped guest-physical memory: the value goes into `data`.
    MmioRead { address: u64, data: &'a mut [u8] },
    /// A Hyper-V hypercall (`KVM_EXIT_HYPERV_HCALL`); `result` is what the
    /// guest gets in RAX.
    HypervHcall {
        input: u64,
        params: [u64; 2],
        result: &'a mut u64,
    },
    /// A guest write to a SynIC MSR (`KVM_EXIT_HYPERV_SYNIC`).
    HypervSynic {
        msr: u32,
        control: u64,
        evt_page: u64,
        msg_page: u64,
    },
    /// A Hyper-V exit of a type this host does not know.
    HypervUnknown(u32),
    /// The guest executed `HLT` with no in-kernel LAPIC to wait in.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR`: the suberror and the first `ndata` words
    /// KVM reports.
    InternalError {
        suberror: u32,
        ndata: u32,
        data: [u64; 16],
    },
    /// VM entry failed.
    FailEntry { hardware_reason: u64, cpu: u32 },
    /// `KVM_RUN` was interrupted by a signal or by `immediate_exit` (EINTR):
    /// the vcpu's owner has something to do (stop, pause).
    Interrupted,
    /// Exits that need nothing (`KVM_EXIT_INTR`, `KVM_EXIT_IRQ_WINDOW_OPEN`).
    Spurious,
    /// Any other exit reason.
    Unknown(u32),
}

/// The `KVM_RUN` handle of a vcpu. It is separate from [`Vcpu`] because an
/// exit borrows the run area while the plugin is serviced through a second
/// handle on the same vcpu.
pub trait VcpuRun {
    /// Enters the guest until the next exit. `EAGAIN` and other errors of the
    /// call itself are returned as errnos; EINTR is [`VmExit::Interrupted`].
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// Sets or clears `immediate_exit`: while set, `run` returns
    /// [`VmExit::Interrupted`] without entering the guest.
    fn set_immediate_exit(&mut self, on: bool);
}

fn errno(e: kvm_ioctls::Error) -> Errno {
    Errno::from_raw(e.errno())
}

/// The VM on real KVM.
pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
}

impl KvmVm {
    /// Opens the KVM device and creates a VM with the in-kernel irqchip and PIT
    /// (docs/host-behaviour.md §4.1). No memory, no vcpus yet.
    pub fn new(kvm_path: &str) -> std::result::Result<KvmVm, VmError> {
        let path = std::ffi::CString::new(kvm_path).map_err(|_| VmError::OpenKvm {
            path: kvm_path.to_string(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let kvm = Kvm::new_with_path(path).map_err(|source| VmError::OpenKvm {
            path: kvm_path.to_string(),
            source,
        })?;
        let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
        vm.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        vm.create_pit2(kvm_pit_config::default())
            .map_err(VmError::CreatePit)?;
        Ok(KvmVm { kvm, vm })
    }

    /// Largest vcpu count KVM allows.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    pub fn create_vcpu(&self, id: u32) -> std::result::Result<VcpuFd, VmError> {
        self.vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VmError::CreateVcpu { id, source })
    }

    /// Creates vcpu `id` and a second handle on it: one for `KVM_RUN`, one
    /// for state ioctls while an exit borrows the first.
    pub fn create_vcpu_pair(&self, id: u32) -> std::result::Result<(VcpuFd, VcpuFd), VmError> {
        let run = self.create_vcpu(id)?;
        let fail = |e: Errno| VmError::CreateVcpu {
            id,
            source: kvm_ioctls::Error::new(e as i32),
        };
        let dup = nix::unistd::dup(borrow_fd(&run)).map_err(fail)?;
        // SAFETY: `dup` is a fresh descriptor for the vcpu just created;
        // ownership passes to the new VcpuFd.
        let control = unsafe {
            self.vm
                .create_vcpu_from_rawfd(std::os::fd::IntoRawFd::into_raw_fd(dup))
        }
        .map_err(|source| VmError::CreateVcpu { id, source })?;
        Ok((run, control))
    }

    /// Another handle on vcpu `id` (a snapshot reads its state through it
    /// while the vcpu is parked).
    pub fn vcpu_handle(&self, id: u32, vcpu: &VcpuFd) -> std::result::Result<VcpuFd, VmError> {
        let fail = |e: Errno| VmError::CreateVcpu {
            id,
            source: kvm_ioctls::Error::new(e as i32),
        };
        let dup = nix::unistd::dup(borrow_fd(vcpu)).map_err(fail)?;
        // SAFETY: `dup` is a fresh descriptor of an existing vcpu of this VM;
        // ownership passes to the new VcpuFd.
        unsafe {
            self.vm
                .create_vcpu_from_rawfd(std::os::fd::IntoRawFd::into_raw_fd(dup))
        }
        .map_err(|source| VmError::CreateVcpu { id, source })
    }

    /// Maps the VM's coalesced ring through a new handle on vcpu `id`
    /// (`None` when KVM has no `KVM_CAP_COALESCED_MMIO`).
    pub fn coalesced_ring(
        &self,
        id: u32,
        vcpu: &VcpuFd,
    ) -> std::result::Result<Option<KvmCoalescedRing>, VmError> {
        if !self.kvm.check_extension(kvm_ioctls::Cap::CoalescedMmio) {
            return Ok(None);
        }
        let fail = |e: Errno| VmError::CoalescedRing {
            id,
            source: kvm_ioctls::Error::new(e as i32),
        };
        let dup = nix::unistd::dup(borrow_fd(vcpu)).map_err(fail)?;
        // SAFETY: `dup` is a fresh descriptor of an existing vcpu of this VM;
        // ownership passes to the new VcpuFd.
        let mut handle = unsafe {
            self.vm
                .create_vcpu_from_rawfd(std::os::fd::IntoRawFd::into_raw_fd(dup))
        }
        .map_err(|source| VmError::CoalescedRing { id, source })?;
        handle
            .map_coalesced_mmio_ring()
            .map_err(|source| VmError::CoalescedRing { id, source })?;
        Ok(Some(KvmCoalescedRing(handle)))
    }

    /// Whether `KVM_CAP_IMMEDIATE_EXIT` is available.
    pub fn has_immediate_exit(&self) -> bool {
        self.kvm.check_extension(kvm_ioctls::Cap::ImmediateExit)
    }

    fn irqchip(&self, chip: u32) -> Result<kvm_irqchip> {
        let mut irqchip = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        self.vm.get_irqchip(&mut irqchip).map_err(errno)?;
        Ok(irqchip)
    }

    fn set_irqchip(&self, chip: u32, image: &[u8]) -> Result<()> {
        let mut irqchip = kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        let dst = irqchip.chip.as_mut_bytes();
        dst[..image.len()].copy_from_slice(image);
        self.vm.set_irqchip(&irqchip).map_err(errno)
    }
}

fn cpuid_list(r: std::result::Result<CpuId, kvm_ioctls::Error>) -> Result<Vec<Cpuid>> {
    Ok(r.map_err(errno)?.as_slice().to_vec())
}

fn io_address(space: Space, addr: u64) -> IoEventAddress {
    match space {
        Space::Ioport => IoEventAddress::Pio(addr),
        Space::Mmio => IoEventAddress::Mmio(addr),
    }
}

/// Calls `KVM_IOEVENTFD` through the typed kvm-ioctls wrapper, which encodes
/// the access width in the datamatch type.
fn ioevent_call(
    vm: &VmFd,
    evt: &EventFd,
    space: Space,
    addr: u64,
    len: u32,
    datamatch: u64,
    assign: bool,
) -> Result<()> {
    let addr = io_address(space, addr);
    macro_rules! call {
        ($dm:expr) => {
            if assign {
                vm.register_ioevent(evt, &addr, $dm)
            } else {
                vm.unregister_ioevent(evt, &addr, $dm)
            }
        };
    }
    match len {
        0 => call!(kvm_ioctls::NoDatamatch),
        1 => call!(datamatch as u8),
        2 => call!(datamatch as u16),
        4 => call!(datamatch as u32),
        8 => call!(datamatch),
        _ => return Err(Errno::EINVAL),
    }
    .map_err(errno)
}

impl Vm for KvmVm {
    fn check_extension(&self, cap: u32) -> i32 {
        self.vm.check_extension_raw(libc::c_ulong::from(cap))
    }

    fn supported_cpuid(&self) -> Result<Vec<Cpuid>> {
        cpuid_list(self.kvm.get_supported_cpuid(MAX_KVM_LIST_ENTRIES))
    }

    fn emulated_cpuid(&self) -> Result<Vec<Cpuid>> {
        cpuid_list(self.kvm.get_emulated_cpuid(MAX_KVM_LIST_ENTRIES))
    }

    fn msr_index_list(&self) -> Result<Vec<u32>> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(errno)?
            .as_slice()
            .to_vec())
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
        let mut flags = 0;
        if read_only {
            flags |= KVM_MEM_READONLY;
        }
        if dirty_log {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped until the
        // slot is removed (this trait method's contract).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(errno)
    }

    fn remove_memory_slot(&self, slot: u32, guest_addr: u64) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; KVM keeps no reference
        // to host memory afterwards.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(errno)
    }

    fn register_ioevent(
        &self,
        evt: &EventFd,
        space: Space,
        addr: u64,
        len: u32,
        datamatch: u64,
    ) -> Result<()> {
        ioevent_call(&self.vm, evt, space, addr, len, datamatch, true)
    }

    fn unregister_ioevent(
        &self,
        evt: &EventFd,
        space: Space,
        addr: u64,
        len: u32,
        datamatch: u64,
    ) -> Result<()> {
        ioevent_call(&self.vm, evt, space, addr, len, datamatch, false)
    }

    fn register_irqfd(&self, trigger: &EventFd, resample: &EventFd, gsi: u32) -> Result<()> {
        self.vm
            .register_irqfd_with_resample(trigger, resample, gsi)
            .map_err(errno)
    }

    fn unregister_irqfd(&self, trigger: &EventFd, gsi: u32) -> Result<()> {
        self.vm.unregister_irqfd(trigger, gsi).map_err(errno)
    }

    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()> {
        self.vm.set_irq_line(irq, active).map_err(errno)
    }

    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes
            .iter()
            .map(|r| {
                let mut e = kvm_irq_routing_entry::default();
                match *r {
                    IrqRoute::Irqchip { gsi, chip, pin } => {
                        e.gsi = gsi;
                        e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                        e.u.irqchip.irqchip = chip;
                        e.u.irqchip.pin = pin;
                    }
                    IrqRoute::Msi { gsi, address, data } => {
                        e.gsi = gsi;
                        e.type_ = KVM_IRQ_ROUTING_MSI;
                        e.u.msi.address_lo = address as u32;
                        e.u.msi.address_hi = (address >> 32) as u32;
                        e.u.msi.data = data;
                    }
                }
                e
            })
            .collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| Errno::E2BIG)?;
        self.vm.set_gsi_routing(&table).map_err(errno)
    }

    fn get_state(&self, set: VmStateKind) -> Result<Vec<u8>> {
        Ok(match set {
            VmStateKind::Pic0 => {
                self.irqchip(KVM_IRQCHIP_PIC_MASTER)?.chip.as_bytes()[..16].to_vec()
            }
            VmStateKind::Pic1 => {
                self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?.chip.as_bytes()[..16].to_vec()
            }
            VmStateKind::Ioapic => {
                self.irqchip(KVM_IRQCHIP_IOAPIC)?.chip.as_bytes()[..216].to_vec()
            }
            VmStateKind::Pit => self.vm.get_pit2().map_err(errno)?.as_bytes().to_vec(),
            VmStateKind::Clock => self.vm.get_clock().map_err(errno)?.as_bytes().to_vec(),
        })
    }

    fn set_state(&self, set: VmStateKind, image: &[u8]) -> Result<()> {
        match set {
            VmStateKind::Pic0 => self.set_irqchip(KVM_IRQCHIP_PIC_MASTER, image),
            VmStateKind::Pic1 => self.set_irqchip(KVM_IRQCHIP_PIC_SLAVE, image),
            VmStateKind::Ioapic => self.set_irqchip(KVM_IRQCHIP_IOAPIC, image),
            VmStateKind::Pit => {
                let pit = kvm_pit_state2::read_from_bytes(image).map_err(|_| Errno::EINVAL)?;
                self.vm.set_pit2(&pit).map_err(errno)
            }
            VmStateKind::Clock => {
                let clock = kvm_clock_data::read_from_bytes(image).map_err(|_| Errno::EINVAL)?;
                self.vm.set_clock(&clock).map_err(errno)
            }
        }
    }

    fn set_identity_map_addr(&self, addr: u64) -> Result<()> {
        self.vm.set_identity_map_address(addr).map_err(errno)
    }

    fn get_dirty_log(&self, slot: u32, size: u64, bitmap_len: usize) -> Result<Vec<u8>> {
        let size = usize::try_from(size).map_err(|_| Errno::EINVAL)?;
        let words = self.vm.get_dirty_log(slot, size).map_err(errno)?;
        let mut bitmap: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bitmap.truncate(bitmap_len);
        Ok(bitmap)
    }

    fn max_memory_slots(&self) -> u32 {
        u32::try_from(self.kvm.get_nr_memslots()).unwrap_or(u32::MAX)
    }

    fn register_coalesced(&self, space: Space, addr: u64, len: u32) -> Result<()> {
        self.vm
            .register_coalesced_mmio(io_address(space, addr), len)
            .map_err(errno)
    }

    fn unregister_coalesced(&self, space: Space, addr: u64, len: u32) -> Result<()> {
        self.vm
            .unregister_coalesced_mmio(io_address(space, addr), len)
            .map_err(errno)
    }
}

impl AsRawFd for KvmVm {
    fn as_raw_fd(&self) -> i32 {
        self.vm.as_raw_fd()
    }
}

/// Byte offset of `xstate_bv` (the XSAVE header) in `kvm_xsave.region`, and
/// its x87 and SSE component bits.
const XSTATE_BV_WORD: usize = 512 / 4;
const XFEATURE_FP_SSE: u32 = 0b11;

/// `KVM_SET_FPU` only writes the legacy area of the vcpu's XSAVE image. When
/// the header marks x87/SSE as being in their initial configuration (always
/// the case for a vcpu that has not used its FPU yet, e.g. at Init), the
/// restore before guest entry ignores that area: the guest would never see
/// the state that was set, while `KVM_GET_FPU` echoes it back. Marking both
/// components as in use first makes the image set the state the guest runs
/// with.
fn mark_fpu_in_use(vcpu: &VcpuFd) -> Result<()> {
    // Without XSAVE support there is no header to fix.
    let Ok(mut xsave) = vcpu.get_xsave() else {
        return Ok(());
    };
    if xsave.region[XSTATE_BV_WORD] & XFEATURE_FP_SSE == XFEATURE_FP_SSE {
        return Ok(());
    }
    xsave.region[XSTATE_BV_WORD] |= XFEATURE_FP_SSE;
    // SAFETY: the host never enables dynamically sized XSTATE features for
    // its guests (no ARCH_REQ_XCOMP_GUEST_PERM), so the vcpu's XSAVE image
    // fits the 4096-byte `kvm_xsave` the kernel reads (and just filled).
    unsafe { vcpu.set_xsave(&xsave) }.map_err(errno)
}

fn parse<T: FromBytes>(image: &[u8]) -> Result<T> {
    T::read_from_bytes(image).map_err(|_| Errno::EINVAL)
}

impl Vcpu for VcpuFd {
    fn get_state(&self, set: VcpuStateKind) -> Result<Vec<u8>> {
        Ok(match set {
            VcpuStateKind::Regs => self.get_regs().map_err(errno)?.as_bytes().to_vec(),
            VcpuStateKind::Sregs => self.get_sregs().map_err(errno)?.as_bytes().to_vec(),
            VcpuStateKind::Fpu => {
                plugin_proto::image::fpu_to_image(&self.get_fpu().map_err(errno)?).to_vec()
            }
            VcpuStateKind::Debugregs => self.get_debug_regs().map_err(errno)?.as_bytes().to_vec(),
            VcpuStateKind::Lapic => self.get_lapic().map_err(errno)?.as_bytes().to_vec(),
            VcpuStateKind::Mp => self.get_mp_state().map_err(errno)?.as_bytes().to_vec(),
            VcpuStateKind::Xcregs => self.get_xcrs().map_err(errno)?.as_bytes().to_vec(),
            VcpuStateKind::Events => self.get_vcpu_events().map_err(errno)?.as_bytes().to_vec(),
        })
    }

    fn set_state(&self, set: VcpuStateKind, image: &[u8]) -> Result<()> {
        match set {
            VcpuStateKind::Regs => self.set_regs(&parse(image)?),
            VcpuStateKind::Sregs => self.set_sregs(&parse(image)?),
            VcpuStateKind::Fpu => {
                let fpu = plugin_proto::image::fpu_from_image(image).ok_or(Errno::EINVAL)?;
                mark_fpu_in_use(self)?;
                self.set_fpu(&fpu)
            }
            VcpuStateKind::Debugregs => self.set_debug_regs(&parse(image)?),
            VcpuStateKind::Lapic => self.set_lapic(&parse(image)?),
            VcpuStateKind::Mp => self.set_mp_state(parse(image)?),
            VcpuStateKind::Xcregs => self.set_xcrs(&parse(image)?),
            VcpuStateKind::Events => self.set_vcpu_events(&parse(image)?),
        }
        .map_err(errno)
    }

    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Errno::E2BIG)?;
        let n = VcpuFd::get_msrs(self, &mut msrs).map_err(errno)?;
        Ok(msrs.as_slice()[..n.min(indices.len())]
            .iter()
            .map(|e| e.data)
            .collect())
    }

    fn set_msrs(&self, entries: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = entries
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Errno::E2BIG)?;
        VcpuFd::set_msrs(self, &msrs).map(|_| ()).map_err(errno)
    }

    fn set_cpuid(&self, entries: &[Cpuid]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| Errno::E2BIG)?;
        self.set_cpuid2(&cpuid).map_err(errno)
    }

    fn get_cpuid(&self) -> Result<Vec<Cpuid>> {
        cpuid_list(self.get_cpuid2(MAX_KVM_LIST_ENTRIES))
    }

    fn get_xsave(&self) -> Result<Vec<u8>> {
        Ok(self.get_xsave().map_err(errno)?.as_bytes().to_vec())
    }

    fn set_xsave(&self, image: &[u8]) -> Result<()> {
        let xsave: kvm_bindings::kvm_xsave = parse(image)?;
        // SAFETY: the host never enables dynamically sized XSTATE features
        // for its guests (no ARCH_REQ_XCOMP_GUEST_PERM), so the vcpu's XSAVE
        // image fits the 4096-byte `kvm_xsave` the kernel reads.
        unsafe { VcpuFd::set_xsave(self, &xsave) }.map_err(errno)
    }

    fn set_msrs_counted(&self, entries: &[(u32, u64)]) -> Result<usize> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = entries
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Errno::E2BIG)?;
        VcpuFd::set_msrs(self, &msrs).map_err(errno)
    }

    fn get_hyperv_cpuid(&self) -> Result<Vec<Cpuid>> {
        let mut cpuid = CpuId::new(MAX_KVM_LIST_ENTRIES).map_err(|_| Errno::ENOMEM)?;
        // SAFETY: KVM_GET_SUPPORTED_HV_CPUID writes at most `nent` entries into
        // the kvm_cpuid2 buffer, which CpuId allocated with room for `nent`.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ptr(
                self,
                kvm_get_supported_hv_cpuid(),
                cpuid.as_mut_fam_struct_ptr(),
            )
        };
        if ret < 0 {
            return Err(Errno::last());
        }
        Ok(cpuid.as_slice().to_vec())
    }

    fn enable_capability(&self, cap: u32) -> Result<()> {
        const KVM_CAP_HYPERV_SYNIC: u32 = 123;
        const KVM_CAP_HYPERV_SYNIC2: u32 = 148;
        if cap != KVM_CAP_HYPERV_SYNIC && cap != KVM_CAP_HYPERV_SYNIC2 {
            return Err(Errno::EINVAL);
        }
        let cap = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        self.enable_cap(&cap).map_err(errno)
    }
}

impl VcpuRun for VcpuFd {
    fn run(&mut self) -> Result<VmExit<'_>> {
        use kvm_bindings::{KVM_EXIT_HYPERV_HCALL, KVM_EXIT_HYPERV_SYNIC};
        use kvm_ioctls::VcpuExit;
        // kvm-ioctls reports some exits without their data; those are read
        // from the run area after the exit is decoded. The borrow checker
        // cannot see that such an exit no longer borrows the handle (an
        // exit that does is returned at once), hence the reborrow through a
        // raw pointer.
        let this: *mut VcpuFd = self;
        // SAFETY: `this` comes from `&mut self` and is used only here. The
        // exit it yields is either converted and returned (its borrow then
        // lasts as long as the `&mut self` of the return type), or it is not
        // used any more, and only then is `self` used again below.
        let exit = match unsafe { &mut *this }.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR => return Ok(VmExit::Interrupted),
            Err(e) => return Err(errno(e)),
        };
        Ok(match exit {
            VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
            VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
            VcpuExit::MmioWrite(address, data) => VmExit::MmioWrite { address, data },
            VcpuExit::MmioRead(address, data) => VmExit::MmioRead { address, data },
            VcpuExit::Hlt => VmExit::Hlt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::FailEntry(hardware_reason, cpu) => VmExit::FailEntry {
                hardware_reason,
                cpu,
            },
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => VmExit::Spurious,
            VcpuExit::InternalError => {
                // SAFETY: reason KVM_EXIT_INTERNAL_ERROR selects the
                // `internal` member of the exit union.
                let internal = unsafe { self.get_kvm_run().__bindgen_anon_1.internal };
                VmExit::InternalError {
                    suberror: internal.suberror,
                    ndata: internal.ndata,
                    data: internal.data,
                }
            }
            VcpuExit::Hyperv => {
                // SAFETY: reason KVM_EXIT_HYPERV selects `hyperv`.
                let hv = unsafe { &mut self.get_kvm_run().__bindgen_anon_1.hyperv };
                match hv.type_ {
                    KVM_EXIT_HYPERV_HCALL => {
                        // SAFETY: type HCALL selects the `hcall` member.
                        let hcall = unsafe { &mut hv.u.hcall };
                        VmExit::HypervHcall {
                            input: hcall.input,
                            params: hcall.params,
                            result: &mut hcall.result,
                        }
                    }
                    KVM_EXIT_HYPERV_SYNIC => {
                        // SAFETY: type SYNIC selects the `synic` member.
                        let synic = unsafe { hv.u.synic };
                        VmExit::HypervSynic {
                            msr: synic.msr,
                            control: synic.control,
                            evt_page: synic.evt_page,
                            msg_page: synic.msg_page,
                        }
                    }
                    other => VmExit::HypervUnknown(other),
                }
            }
            _ => VmExit::Unknown(self.get_kvm_run().exit_reason),
        })
    }

    fn set_immediate_exit(&mut self, on: bool) {
        self.set_kvm_immediate_exit(u8::from(on));
    }
}

vmm_sys_util::ioctl_iowr_nr!(
    kvm_get_supported_hv_cpuid,
    kvm_bindings::KVMIO,
    0xc1,
    kvm_bindings::kvm_cpuid2
);

mod sealed {
    /// Only the types listed below may be borrowed with [`super::borrow_fd`].
    pub trait Sealed {}
    impl Sealed for vmm_sys_util::eventfd::EventFd {}
    impl Sealed for kvm_ioctls::VcpuFd {}
}

/// A type that owns one open descriptor for as long as it lives and offers
/// no way to close it or swap it through a shared reference (so its
/// `as_raw_fd` is a valid descriptor for the whole borrow). Sealed: only
/// `EventFd` and `VcpuFd`, which predate `AsFd`, implement it.
pub trait OwnsFd: AsRawFd + sealed::Sealed {}
impl OwnsFd for vmm_sys_util::eventfd::EventFd {}
impl OwnsFd for kvm_ioctls::VcpuFd {}

/// Borrows the descriptor of an [`OwnsFd`] value for as long as the value
/// is borrowed.
pub fn borrow_fd<T: OwnsFd>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: `OwnsFd` is only implemented for types that own an open
    // descriptor until they are dropped and cannot close it through `&self`;
    // the returned borrow is tied to `owner`, so the descriptor stays open
    // (and is never -1) for its whole life.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}
