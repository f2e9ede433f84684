//! Fast reset's logic (vmm/src/runtime/reset.rs, docs/protocol-extensions.md
//! §7) on the model VM and vcpu: only the pages the dirty log reports and
//! the plugin names are copied back, VM and vcpu state come back, and a
//! refused reset changes nothing.

use nix::errno::Errno;
use vm_memory::mmap::MmapRegion;
use vm_memory::VolatileMemory;
use vmm::runtime::reset::{self, Region, PAGE};
use vmm::vm::{Cpuid, Vcpu, VcpuStateKind, Vm, VmStateKind};
use vmm_model::{ModelVcpu, ModelVm};

/// The model vcpu with `get_cpuid` (which the model leaves to the trait's
/// `ENOTTY` default): no CPUID was set.
#[derive(Default)]
struct V(ModelVcpu);

impl Vcpu for V {
    fn get_state(&self, set: VcpuStateKind) -> Result<Vec<u8>, Errno> {
        self.0.get_state(set)
    }
    fn set_state(&self, set: VcpuStateKind, image: &[u8]) -> Result<(), Errno> {
        self.0.set_state(set, image)
    }
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>, Errno> {
        self.0.get_msrs(indices)
    }
    fn set_msrs(&self, entries: &[(u32, u64)]) -> Result<(), Errno> {
        self.0.set_msrs(entries)
    }
    fn set_cpuid(&self, entries: &[Cpuid]) -> Result<(), Errno> {
        self.0.set_cpuid(entries)
    }
    fn get_cpuid(&self) -> Result<Vec<Cpuid>, Errno> {
        Ok(Vec::new())
    }
    fn get_hyperv_cpuid(&self) -> Result<Vec<Cpuid>, Errno> {
        self.0.get_hyperv_cpuid()
    }
    fn enable_capability(&self, cap: u32) -> Result<(), Errno> {
        self.0.enable_capability(cap)
    }
}

const GPA: u64 = 0x10000;
const SIZE: u64 = 4 * PAGE;

fn fill(m: &MmapRegion<()>, page: u64, byte: u8) {
    let s = m.get_slice((page * PAGE) as usize, PAGE as usize).unwrap();
    s.copy_from(&[byte; PAGE as usize][..]);
}

fn first_byte(m: &MmapRegion<()>, page: u64) -> u8 {
    let mut b = [0u8; 1];
    m.get_slice((page * PAGE) as usize, 1)
        .unwrap()
        .copy_to(&mut b[..]);
    b[0]
}

fn image(kind_size: usize, byte: u8) -> Vec<u8> {
    vec![byte; kind_size]
}

struct Machine {
    vm: ModelVm,
    vcpus: [V; 1],
    ram: MmapRegion<()>,
}

impl Machine {
    fn new() -> Machine {
        let vm = ModelVm::new(8);
        let ram = MmapRegion::new(SIZE as usize).unwrap();
        // SAFETY: `ram` outlives the model VM's use of it in this test (the
        // model only checks that the range is mapped).
        unsafe { vm.add_memory_slot(3, GPA, SIZE, ram.as_ptr() as u64, false, true) }.unwrap();
        Machine {
            vm,
            vcpus: [V::default()],
            ram,
        }
    }

    fn regions(&self) -> Vec<Region<'_>> {
        vec![Region {
            id: 1,
            slot: 3,
            gpa: GPA,
            size: SIZE,
            dirty_log: true,
            mapping: &self.ram,
        }]
    }

    /// Memory pattern, registers and PIT as "A" (1) or "B" (2).
    fn set(&self, v: u8) {
        for p in 0..4 {
            fill(&self.ram, p, v * 0x10 + p as u8);
        }
        let regs = image(VcpuStateKind::Regs.size(), v);
        self.vcpus[0].set_state(VcpuStateKind::Regs, &regs).unwrap();
        let pit = image(VmStateKind::Pit.size(), v);
        self.vm.set_state(VmStateKind::Pit, &pit).unwrap();
    }
}

#[test]
fn reset_copies_back_only_logged_and_plugin_pages_and_restores_state() {
    let m = Machine::new();
    m.set(1);
    let point = reset::take(&m.vm, &m.vcpus, &[], &m.regions()).unwrap();
    assert_eq!(point.bytes(), SIZE);
    m.set(2);
    // The model's dirty log reports page 0; the plugin names page 2 (any
    // address inside it).
    let pages = reset::reset(&point, &m.vm, &m.vcpus, &m.regions(), &[GPA + 2 * PAGE + 5]).unwrap();
    assert_eq!(pages, 2);
    assert_eq!(first_byte(&m.ram, 0), 0x10, "logged page back");
    assert_eq!(first_byte(&m.ram, 2), 0x12, "plugin page back");
    assert_eq!(first_byte(&m.ram, 1), 0x21, "a clean page is not rewritten");
    assert_eq!(first_byte(&m.ram, 3), 0x23, "a clean page is not rewritten");
    assert_eq!(
        m.vcpus[0].0.image(VcpuStateKind::Regs),
        image(VcpuStateKind::Regs.size(), 1)
    );
    assert_eq!(
        m.vm.get_state(VmStateKind::Pit).unwrap(),
        image(VmStateKind::Pit.size(), 1)
    );
    m.vm.check().unwrap();
    m.vcpus[0].0.check().unwrap();
}

#[test]
fn a_page_outside_guest_memory_changes_nothing() {
    let m = Machine::new();
    m.set(1);
    let point = reset::take(&m.vm, &m.vcpus, &[], &m.regions()).unwrap();
    m.set(2);
    for bad in [GPA - 1, GPA + SIZE, u64::MAX] {
        let e = reset::reset(&point, &m.vm, &m.vcpus, &m.regions(), &[GPA, bad]).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL, "{e:?}");
        assert!(e.reason.contains(&format!("{bad:#x}")), "{}", e.reason);
    }
    assert_eq!(first_byte(&m.ram, 0), 0x20);
    assert_eq!(
        m.vcpus[0].0.image(VcpuStateKind::Regs),
        image(VcpuStateKind::Regs.size(), 2)
    );
}

#[test]
fn changed_memory_layout_or_vcpu_count_is_refused() {
    let m = Machine::new();
    let point = reset::take(&m.vm, &m.vcpus, &[], &m.regions()).unwrap();
    let e = reset::reset(&point, &m.vm, &m.vcpus, &[], &[]).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    let two = [V::default(), V::default()];
    let e = reset::reset(&point, &m.vm, &two, &m.regions(), &[]).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
}
