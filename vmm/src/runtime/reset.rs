//! Fast reset (issue 12, docs/protocol-extensions.md §7): an in-memory
//! snapshot of the whole machine and the reset to it that rewrites only the
//! pages dirtied since (KVM's dirty log plus the pages the plugin says it
//! wrote itself), then puts VM and vcpu state back.
//!
//! Plain code over the [`Vm`] and [`Vcpu`] traits and the host's mappings
//! of guest memory; the runtime (services.rs) checks that every vcpu is
//! stopped in the plugin's hands before it calls in.

use std::os::fd::AsFd;

use nix::errno::Errno;
use vm_memory::mmap::MmapRegion;
use vm_memory::{VolatileMemory, VolatileSlice};
use vmm_snapshot::Records;

use super::main_handler::dirty_bitmap_len;
use super::objects::Refused;
use crate::snapshot::{self as snap, HostTables, VmPart};
use crate::vm::{Vcpu, Vm, VmStateKind};

/// Guest page size of the dirty log.
pub const PAGE: u64 = 4096;

/// A guest memory region as the host holds it now.
pub struct Region<'a> {
    pub id: u32,
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    /// The slot was created with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub dirty_log: bool,
    /// The host's mapping of the plugin's memfd (KVM uses it for the slot).
    pub mapping: &'a MmapRegion<()>,
}

impl Region<'_> {
    fn writable(&self) -> bool {
        self.mapping.prot() & libc::PROT_WRITE != 0
    }

    fn slice(&self, offset: u64, len: u64) -> Result<VolatileSlice<'_>, Refused> {
        let (o, l) = (usize::try_from(offset), usize::try_from(len));
        match (o, l) {
            (Ok(o), Ok(l)) => self.mapping.get_slice(o, l).map_err(|e| {
                Refused::new(
                    Errno::EFAULT,
                    format!("memory object {}: bytes {offset:#x}+{len:#x}: {e}", self.id),
                )
            }),
            _ => Err(Refused::new(Errno::EFAULT, "region too large")),
        }
    }
}

/// One region's private copy.
struct Saved {
    id: u32,
    slot: u32,
    gpa: u64,
    size: u64,
    copy: Vec<u8>,
}

/// The machine as `SnapshotInMemory` found it.
pub struct ResetPoint {
    vm: VmPart,
    vcpus: Vec<Records>,
    regions: Vec<Saved>,
}

impl ResetPoint {
    /// Bytes of guest memory held.
    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

fn chain(what: &str, e: snap::SnapError) -> Refused {
    Refused::new(Errno::EIO, format!("{what}: {}", crate::error_chain(&e)))
}

/// Takes the in-memory snapshot: VM state, every vcpu's state (without the
/// CPUID, which KVM does not let a vcpu change once it ran and a reset does
/// not need to set again), a copy of every region, and dirty logging on for
/// every region (re-registered with `KVM_MEM_LOG_DIRTY_PAGES` when it was
/// created without), with the log cleared.
pub fn take<V: Vm, C: Vcpu>(
    vm: &V,
    vcpus: &[C],
    msr_indices: &[u32],
    regions: &[Region<'_>],
) -> Result<ResetPoint, Refused> {
    let records = snap::capture_vm(vm, &HostTables::default()).map_err(|e| chain("VM state", e))?;
    let vm_part = snap::parse_vm(records).map_err(|e| chain("VM state", e))?;
    let mut states = Vec::with_capacity(vcpus.len());
    for (i, v) in vcpus.iter().enumerate() {
        let mut r = snap::capture_vcpu(v, i, msr_indices).map_err(|e| chain("vcpu state", e))?;
        let xsave = r.get("xsave").map(<[u8]>::to_vec);
        if let (Some(x), Some(fpu)) = (xsave, r.get("fpu")) {
            if !snap::xsave_holds_x87_sse(&x) {
                // x87/SSE in their initial configuration: set the same
                // FPU state once (KVM marks both components in use, as
                // every reset's FPU set used to) and keep the XSAVE image
                // that says so; each reset then puts x87/SSE back with
                // the XSAVE image alone (snapshot::apply_vcpu).
                let refused = |what: &str, e: Errno| {
                    Refused::new(e, format!("vcpu {i}: cannot {what} for the reset point"))
                };
                v.set_state(crate::vm::VcpuStateKind::Fpu, fpu)
                    .map_err(|e| refused("set its FPU state", e))?;
                let x = v
                    .get_xsave()
                    .map_err(|e| refused("read its XSAVE image", e))?;
                r = replace_record(&r, "xsave", x)
                    .map_err(|e| Refused::new(Errno::EIO, format!("vcpu {i}'s records: {e}")))?;
            }
        }
        let mut kept = Records::new();
        for (name, data) in r.iter() {
            let data = if name == "cpuid" {
                Vec::new()
            } else {
                data.to_vec()
            };
            kept.push(name, data)
                .map_err(|e| Refused::new(Errno::EIO, format!("vcpu {i}'s records: {e}")))?;
        }
        states.push(kept);
    }
    let mut saved = Vec::with_capacity(regions.len());
    for r in regions {
        let size = usize::try_from(r.size).map_err(|_| Errno::ENOMEM)?;
        let mut copy = Vec::new();
        copy.try_reserve_exact(size).map_err(|_| {
            Refused::new(
                Errno::ENOMEM,
                format!(
                    "no memory for a copy of memory object {} ({size} bytes)",
                    r.id
                ),
            )
        })?;
        copy.resize(size, 0);
        r.slice(0, r.size)?.copy_to(&mut copy[..]);
        saved.push(Saved {
            id: r.id,
            slot: r.slot,
            gpa: r.gpa,
            size: r.size,
            copy,
        });
    }
    for r in regions {
        if !r.dirty_log {
            // SAFETY: the mapping is the one KVM already uses for this slot
            // (same slot, address and size: only the flags change); the
            // object table keeps it alive until the slot is removed.
            unsafe {
                vm.add_memory_slot(
                    r.slot,
                    r.gpa,
                    r.size,
                    r.mapping.as_ptr() as u64,
                    !r.writable(),
                    true,
                )
            }
            .map_err(|e| {
                Refused::new(
                    e,
                    format!("cannot turn dirty logging on for memory object {}", r.id),
                )
            })?;
        }
        vm.get_dirty_log(r.slot, r.size, dirty_bitmap_len(r.size))
            .map_err(|e| {
                Refused::new(
                    e,
                    format!("cannot clear memory object {}'s dirty log", r.id),
                )
            })?;
    }
    Ok(ResetPoint {
        vm: vm_part,
        vcpus: states,
        regions: saved,
    })
}

/// `r` with record `name`'s data replaced.
fn replace_record(
    r: &Records,
    name: &str,
    data: Vec<u8>,
) -> Result<Records, vmm_snapshot::RecordsError> {
    let mut out = Records::new();
    let mut data = Some(data);
    for (n, d) in r.iter() {
        match data.take_if(|_| n == name) {
            Some(new) => out.push(n, new)?,
            None => out.push(n, d.to_vec())?,
        }
    }
    Ok(out)
}

/// Resets the machine to `point`: copies back every page KVM logged dirty
/// and every page of `plugin_pages` (checked first: an address in no region
/// changes nothing), then sets VM and vcpu state. Returns the pages copied.
pub fn reset<V: Vm, C: Vcpu>(
    point: &ResetPoint,
    vm: &V,
    vcpus: &[C],
    regions: &[Region<'_>],
    plugin_pages: &[u64],
) -> Result<u64, Refused> {
    let same = regions.len() == point.regions.len()
        && regions
            .iter()
            .zip(&point.regions)
            .all(|(a, b)| (a.id, a.slot, a.gpa, a.size) == (b.id, b.slot, b.gpa, b.size));
    if !same {
        return Err(Refused::new(
            Errno::EINVAL,
            "the guest memory regions changed since SnapshotInMemory: take a new snapshot",
        ));
    }
    if vcpus.len() != point.vcpus.len() {
        return Err(Refused::new(
            Errno::EINVAL,
            "the vcpu count changed since SnapshotInMemory",
        ));
    }
    // The plugin's pages as (region, page) marks, all checked before any
    // change.
    let mut marks: Vec<Vec<u8>> = regions
        .iter()
        .map(|r| vec![0u8; dirty_bitmap_len(r.size)])
        .collect();
    for (i, &gpa) in plugin_pages.iter().enumerate() {
        let Some((k, r)) = regions
            .iter()
            .enumerate()
            .find(|(_, r)| gpa >= r.gpa && gpa - r.gpa < r.size)
        else {
            return Err(Refused::new(
                Errno::EINVAL,
                format!("plugin_dirty_pages[{i}] = {gpa:#x} is in no guest memory region"),
            ));
        };
        let page = ((gpa - r.gpa) / PAGE) as usize;
        marks[k][page / 8] |= 1 << (page % 8);
    }
    let mut pages = 0u64;
    for ((r, s), mark) in regions.iter().zip(&point.regions).zip(&mut marks) {
        let log = vm.get_dirty_log(r.slot, r.size, mark.len()).map_err(|e| {
            Refused::new(e, format!("cannot read memory object {}'s dirty log", r.id))
        })?;
        for (m, l) in mark.iter_mut().zip(&log) {
            *m |= l;
        }
        for (byte, &bits) in mark.iter().enumerate() {
            if bits == 0 {
                continue;
            }
            for bit in 0..8 {
                if bits & (1 << bit) == 0 {
                    continue;
                }
                let offset = (byte as u64 * 8 + bit) * PAGE;
                if offset >= r.size {
                    break;
                }
                let len = PAGE.min(r.size - offset);
                let src = &s.copy[offset as usize..(offset + len) as usize];
                write_back(r, offset, src)?;
                pages += 1;
            }
        }
    }
    set_vm_state(vm, &point.vm)?;
    for (i, (v, r)) in vcpus.iter().zip(&point.vcpus).enumerate() {
        snap::apply_vcpu(v, i, r).map_err(|e| chain("vcpu state", e))?;
    }
    Ok(pages)
}

/// The VM images a reset puts back. The irqchips' and the PIT's are read
/// first and set only when they differ (a VM ioctl, cheap next to setting
/// them: setting the IOAPIC makes every vcpu rescan it, setting the PIT
/// restarts its timer); the clock always moves, so it is always set.
const VM_IMAGES: [(&str, VmStateKind, bool); 5] = [
    ("pic-master", VmStateKind::Pic0, true),
    ("pic-slave", VmStateKind::Pic1, true),
    ("ioapic", VmStateKind::Ioapic, true),
    ("pit", VmStateKind::Pit, true),
    ("clock", VmStateKind::Clock, false),
];

fn set_vm_state<V: Vm>(vm: &V, part: &VmPart) -> Result<(), Refused> {
    for (name, kind, compare) in VM_IMAGES {
        let Some(image) = part.records.get(name) else {
            return Err(Refused::new(
                Errno::EIO,
                format!("the in-memory snapshot lacks the VM's {name}"),
            ));
        };
        if compare && vm.get_state(kind).is_ok_and(|now| now == image) {
            continue;
        }
        vm.set_state(kind, image)
            .map_err(|e| Refused::new(e, format!("cannot set the VM's {name}")))?;
    }
    Ok(())
}

/// Copies a saved page back: through the host's mapping, or (a mapping
/// the host holds read-only) with `pwrite` on the memfd.
fn write_back(r: &Region<'_>, offset: u64, src: &[u8]) -> Result<(), Refused> {
    if r.writable() {
        r.slice(offset, src.len() as u64)?.copy_from(src);
        return Ok(());
    }
    let Some(file) = r.mapping.file_offset() else {
        return Err(Refused::new(
            Errno::EFAULT,
            format!("memory object {} is read-only and has no descriptor", r.id),
        ));
    };
    let at = i64::try_from(file.start() + offset).map_err(|_| Errno::EOVERFLOW)?;
    let n = nix::sys::uio::pwrite(file.file().as_fd(), src, at)
        .map_err(|e| Refused::new(e, format!("cannot write memory object {} back", r.id)))?;
    if n != src.len() {
        return Err(Refused::new(
            Errno::EIO,
            format!("short write back to memory object {}", r.id),
        ));
    }
    Ok(())
}
