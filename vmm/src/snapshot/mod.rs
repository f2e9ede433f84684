//! Snapshot and restore of a whole machine on the host side (issue 12,
//! docs/snapshot-format.md "vmm's parts"): plain code over the [`Vm`] and
//! [`Vcpu`] traits that captures the VM and vcpu state into named records
//! and puts them back, plus the writer job (run on a worker thread) and the
//! checked opening of a snapshot for `--restore`.
//!
//! The record layouts: KVM images are stored as the bytes the Vm/Vcpu
//! traits exchange (the same images as the wire protocol's state sets);
//! `msrs` is a list of (u32 index, u64 value) little-endian pairs; `cpuid`
//! a list of `kvm_cpuid_entry2` images; the host's tables (`memory`,
//! `reservations`, `ioevents`, `irqfds`, `irq-routes`, `identity-map`) are
//! JSON documents, read back with `deny_unknown_fields`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use log::warn;
use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use vmm_snapshot::{Manifest, Records, Snapshot, SnapshotError, SnapshotWriter};
use zerocopy::{FromBytes, IntoBytes};

use crate::vm::{Cpuid, IrqRoute, Space, Vcpu, VcpuStateKind, Vm, VmStateKind};

/// The size of a `kvm_xsave` image.
pub const XSAVE_SIZE: usize = std::mem::size_of::<kvm_bindings::kvm_xsave>();

/// Largest device-state blob a plugin may hand over (design: 16 MiB).
pub const MAX_DEVICE_STATE: usize = 16 << 20;

/// The name of the VM state part, the device blob, vcpu N's part, memory
/// object ID's part.
pub const VM_PART: &str = "vm";
pub const DEVICE_PART: &str = "device";
pub fn vcpu_part(id: usize) -> String {
    format!("vcpu{id}")
}
pub fn memory_part(id: u32) -> String {
    format!("ram{id}")
}

/// Why capturing, writing, opening or applying a snapshot failed; each
/// names the record, part or region.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("cannot read the VM's {0}")]
    GetVm(&'static str, #[source] Errno),
    #[error("cannot read vcpu {vcpu}'s {what}")]
    GetVcpu {
        vcpu: usize,
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot set the VM's {0}")]
    SetVm(&'static str, #[source] Errno),
    #[error("cannot set vcpu {vcpu}'s {what} from the snapshot")]
    SetVcpu {
        vcpu: usize,
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("snapshot part {part}: record {record} is missing")]
    MissingRecord { part: String, record: &'static str },
    #[error("snapshot part {part}: record {record} is malformed: {why}")]
    BadRecord {
        part: String,
        record: &'static str,
        why: String,
    },
    #[error("cannot build the records")]
    Records(#[source] vmm_snapshot::RecordsError),
    #[error("snapshot {0}")]
    Snapshot(PathBuf, #[source] SnapshotError),
    #[error("the snapshot holds {snapshot} vcpus but --cpus asks for {asked}")]
    VcpuCount { snapshot: u32, asked: usize },
    #[error("the snapshot has no part for vcpu {0}")]
    NoVcpuPart(usize),
    #[error(
        "the memory layout differs from the snapshot's: {0} (the plugin must set up the same \
         memory as the machine that was snapshotted)"
    )]
    Layout(String),
    #[error(
        "the snapshot holds {0} bytes of device state but the plugin never asked for it \
         (GetRestoreState) before Start: it does not support restoring"
    )]
    DeviceStateNotTaken(usize),
    #[error("cannot clear guest memory region {name} before loading it")]
    Punch {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("cannot duplicate the descriptor of memory object {0}")]
    Dup(u32, #[source] Errno),
    #[error("the snapshot comes from another CPU: {0}")]
    OtherCpu(String),
    #[error("cannot read the CPUID this host's KVM supports")]
    SupportedCpuid(#[source] Errno),
}

/// The CPUID feature words a snapshot's guest may rely on: (leaf, subleaf,
/// register name, register). A bit set there in the snapshot must be one
/// this host's KVM supports, or the restored guest would use an instruction
/// or feature the CPU lacks.
const FEATURE_WORDS: &[(u32, u32, &str)] = &[
    (1, 0, "ecx"),
    (1, 0, "edx"),
    (7, 0, "ebx"),
    (7, 0, "ecx"),
    (7, 0, "edx"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

fn cpuid_reg(e: &Cpuid, reg: &str) -> u32 {
    match reg {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        "edx" => e.edx,
        _ => 0,
    }
}

fn vendor(e: &Cpuid) -> String {
    let mut b = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&b).escape_debug().to_string()
}

/// Checks that a guest that ran with `snapshot` (the CPUID set on one of
/// its vcpus) can run on a host whose KVM supports `supported`: the same
/// CPU vendor, and no feature bit the host lacks. An empty snapshot CPUID
/// (the plugin never set one) asks for nothing.
pub fn check_cpu_compatible(vcpu: usize, snapshot: &[Cpuid], supported: &[Cpuid]) -> Result<()> {
    let find = |list: &[Cpuid], leaf: u32, sub: u32| {
        list.iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0))
            .copied()
    };
    if let (Some(a), Some(b)) = (find(snapshot, 0, 0), find(supported, 0, 0)) {
        if (a.ebx, a.ecx, a.edx) != (b.ebx, b.ecx, b.edx) {
            return Err(SnapError::OtherCpu(format!(
                "vcpu {vcpu}'s CPU vendor is \"{}\", this host's is \"{}\"",
                vendor(&a),
                vendor(&b)
            )));
        }
    }
    for &(leaf, sub, reg) in FEATURE_WORDS {
        let Some(want) = find(snapshot, leaf, sub) else {
            continue;
        };
        let have = find(supported, leaf, sub).map_or(0, |e| cpuid_reg(&e, reg));
        let missing = cpuid_reg(&want, reg) & !have;
        // Leaf 1 ecx bit 27 (OSXSAVE) and edx bit 9 (APIC) follow guest and
        // APIC state rather than the CPU; KVM reports them per vcpu.
        let missing = match (leaf, reg) {
            (1, "ecx") => missing & !(1 << 27),
            (1, "edx") => missing & !(1 << 9),
            _ => missing,
        };
        if missing != 0 {
            return Err(SnapError::OtherCpu(format!(
                "vcpu {vcpu}'s CPUID leaf {leaf:#x} {reg} has feature bits {missing:#010x} \
                 that this host's KVM does not support"
            )));
        }
    }
    Ok(())
}

type Result<T> = std::result::Result<T, SnapError>;

/// A guest memory region as the snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRecord {
    pub id: u32,
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub read_only: bool,
    pub dirty_log: bool,
}

/// A reserved range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationRecord {
    pub space: String,
    pub start: u64,
    pub length: u64,
    #[serde(rename = "async")]
    pub async_write: bool,
    pub coalesced: bool,
}

/// An ioeventfd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoeventRecord {
    pub id: u32,
    pub space: String,
    pub address: u64,
    pub length: u32,
    pub datamatch: u64,
}

/// An irqfd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrqfdRecord {
    pub id: u32,
    pub gsi: u32,
}

/// A GSI route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
pub enum RouteRecord {
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    Msi { gsi: u32, address: u64, data: u32 },
}

impl From<&IrqRoute> for RouteRecord {
    fn from(r: &IrqRoute) -> Self {
        match *r {
            IrqRoute::Irqchip { gsi, chip, pin } => RouteRecord::Irqchip { gsi, chip, pin },
            IrqRoute::Msi { gsi, address, data } => RouteRecord::Msi { gsi, address, data },
        }
    }
}

impl From<&RouteRecord> for IrqRoute {
    fn from(r: &RouteRecord) -> Self {
        match *r {
            RouteRecord::Irqchip { gsi, chip, pin } => IrqRoute::Irqchip { gsi, chip, pin },
            RouteRecord::Msi { gsi, address, data } => IrqRoute::Msi { gsi, address, data },
        }
    }
}

pub fn space_name(s: Space) -> String {
    match s {
        Space::Ioport => "ioport".into(),
        Space::Mmio => "mmio".into(),
    }
}

/// What the host knows of the machine's objects and tables, for `vm.state`.
#[derive(Debug, Clone, Default)]
pub struct HostTables {
    pub memory: Vec<MemoryRecord>,
    pub reservations: Vec<ReservationRecord>,
    pub ioevents: Vec<IoeventRecord>,
    pub irqfds: Vec<IrqfdRecord>,
    /// `None`: the plugin never set a routing table (KVM's default).
    pub irq_routes: Option<Vec<IrqRoute>>,
    pub identity_map: Option<u64>,
}

const VM_IMAGES: [(&str, VmStateKind); 5] = [
    ("pic-master", VmStateKind::Pic0),
    ("pic-slave", VmStateKind::Pic1),
    ("ioapic", VmStateKind::Ioapic),
    ("pit", VmStateKind::Pit),
    ("clock", VmStateKind::Clock),
];

/// In the order they are applied at restore (cpuid and msrs are separate).
const VCPU_IMAGES: [(&str, VcpuStateKind); 8] = [
    ("sregs", VcpuStateKind::Sregs),
    ("regs", VcpuStateKind::Regs),
    ("fpu", VcpuStateKind::Fpu),
    ("xcrs", VcpuStateKind::Xcregs),
    ("lapic", VcpuStateKind::Lapic),
    ("mp-state", VcpuStateKind::Mp),
    ("events", VcpuStateKind::Events),
    ("debugregs", VcpuStateKind::Debugregs),
];

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn push(r: &mut Records, name: &str, data: Vec<u8>) -> Result<()> {
    r.push(name, data).map_err(SnapError::Records)
}

/// Captures `vm.state`.
pub fn capture_vm(vm: &impl Vm, tables: &HostTables) -> Result<Records> {
    let mut r = Records::new();
    for (name, kind) in VM_IMAGES {
        let image = vm.get_state(kind).map_err(|e| SnapError::GetVm(name, e))?;
        push(&mut r, name, image)?;
    }
    if let Some(addr) = tables.identity_map {
        push(&mut r, "identity-map", addr.to_le_bytes().to_vec())?;
    }
    if let Some(routes) = &tables.irq_routes {
        let v: Vec<RouteRecord> = routes.iter().map(RouteRecord::from).collect();
        push(&mut r, "irq-routes", json(&v))?;
    }
    push(&mut r, "memory", json(&tables.memory))?;
    push(&mut r, "reservations", json(&tables.reservations))?;
    push(&mut r, "ioevents", json(&tables.ioevents))?;
    push(&mut r, "irqfds", json(&tables.irqfds))?;
    Ok(r)
}

/// Reads every MSR of `indices` that `KVM_GET_MSRS` returns: it stops at
/// the first index it cannot read, which is skipped.
pub fn read_msrs(vcpu: &impl Vcpu, indices: &[u32]) -> std::result::Result<Vec<(u32, u64)>, Errno> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(crate::limits::MAX_MSR_ENTRIES)];
        let values = vcpu.get_msrs(chunk)?;
        let n = values.len().min(chunk.len());
        out.extend(chunk[..n].iter().copied().zip(values));
        // Index `n` could not be read: skip it.
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(out)
}

/// Captures `vcpuN.state` of a vcpu out of the guest.
pub fn capture_vcpu(vcpu: &impl Vcpu, id: usize, msr_indices: &[u32]) -> Result<Records> {
    let mut r = Records::new();
    let get = |what: &'static str| {
        move |source| SnapError::GetVcpu {
            vcpu: id,
            what,
            source,
        }
    };
    for (name, kind) in VCPU_IMAGES {
        let image = vcpu.get_state(kind).map_err(get(name))?;
        push(&mut r, name, image)?;
    }
    let msrs = read_msrs(vcpu, msr_indices).map_err(get("msrs"))?;
    let mut bytes = Vec::with_capacity(msrs.len() * 12);
    for (i, v) in msrs {
        bytes.extend_from_slice(&i.to_le_bytes());
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    push(&mut r, "msrs", bytes)?;
    let cpuid = vcpu.get_cpuid().map_err(get("cpuid"))?;
    push(&mut r, "cpuid", cpuid.as_bytes().to_vec())?;
    // The whole FPU/vector state where KVM has XSAVE (`fpu` holds only
    // x87/SSE).
    match vcpu.get_xsave() {
        Ok(image) => push(&mut r, "xsave", image)?,
        Err(Errno::ENOTTY | Errno::EINVAL) => {}
        Err(e) => return Err(get("xsave")(e)),
    }
    Ok(r)
}

/// CRC-32 of a vcpu's `cpuid` record (the `cpuid-crc32` fact).
pub fn cpuid_crc(records: &Records) -> u32 {
    crc32fast_hash(records.get("cpuid").unwrap_or_default())
}

fn crc32fast_hash(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

fn record<'a>(r: &'a Records, part: &str, name: &'static str) -> Result<&'a [u8]> {
    r.get(name).ok_or_else(|| SnapError::MissingRecord {
        part: part.to_string(),
        record: name,
    })
}

fn bad(part: &str, record: &'static str, why: impl Into<String>) -> SnapError {
    SnapError::BadRecord {
        part: part.to_string(),
        record,
        why: why.into(),
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(
    r: &Records,
    part: &str,
    name: &'static str,
) -> Result<T> {
    serde_json::from_slice(record(r, part, name)?).map_err(|e| bad(part, name, e.to_string()))
}

/// The `msrs` record.
pub fn parse_msrs(bytes: &[u8], part: &str) -> Result<Vec<(u32, u64)>> {
    if !bytes.len().is_multiple_of(12) {
        return Err(bad(
            part,
            "msrs",
            format!("{} bytes, not a multiple of 12", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(12)
        .map(|c| {
            let mut i = [0u8; 4];
            let mut v = [0u8; 8];
            i.copy_from_slice(&c[..4]);
            v.copy_from_slice(&c[4..]);
            (u32::from_le_bytes(i), u64::from_le_bytes(v))
        })
        .collect())
}

/// The `cpuid` record.
pub fn parse_cpuid(bytes: &[u8], part: &str) -> Result<Vec<Cpuid>> {
    let size = std::mem::size_of::<Cpuid>();
    if !bytes.len().is_multiple_of(size) || bytes.len() / size > crate::limits::MAX_CPUID_ENTRIES {
        return Err(bad(
            part,
            "cpuid",
            format!("{} bytes is no list of entries", bytes.len()),
        ));
    }
    Ok(bytes
        .chunks_exact(size)
        .filter_map(|c| Cpuid::read_from_bytes(c).ok())
        .collect())
}

/// Checks a vcpu part completely (every record present and well formed),
/// before anything runs.
pub fn check_vcpu(r: &Records, part: &str) -> Result<()> {
    for (name, kind) in VCPU_IMAGES {
        let image = record(r, part, name)?;
        if image.len() != kind.size() {
            return Err(bad(
                part,
                name,
                format!("{} bytes, expected {}", image.len(), kind.size()),
            ));
        }
    }
    parse_msrs(record(r, part, "msrs")?, part)?;
    parse_cpuid(record(r, part, "cpuid")?, part)?;
    if let Some(x) = r.get("xsave") {
        if x.len() != XSAVE_SIZE {
            return Err(bad(
                part,
                "xsave",
                format!("{} bytes, expected {XSAVE_SIZE}", x.len()),
            ));
        }
    }
    Ok(())
}

/// Applies a vcpu part (checked by [`check_vcpu`]): cpuid, then the images
/// in [`VCPU_IMAGES`] order with the XSAVE image and the MSRs after the
/// xcrs (`fpu` only when the part has no XSAVE image, which covers it).
pub fn apply_vcpu(vcpu: &impl Vcpu, id: usize, r: &Records) -> Result<()> {
    let part = vcpu_part(id);
    let set = |what: &'static str| {
        move |source| SnapError::SetVcpu {
            vcpu: id,
            what,
            source,
        }
    };
    let cpuid = parse_cpuid(record(r, &part, "cpuid")?, &part)?;
    if !cpuid.is_empty() {
        vcpu.set_cpuid(&cpuid).map_err(set("cpuid"))?;
    }
    let xsave = r.get("xsave");
    let xsave_has_fpu = xsave.is_some_and(xsave_holds_x87_sse);
    for (name, kind) in VCPU_IMAGES {
        let image = record(r, &part, name)?;
        // An XSAVE image whose header marks x87 and SSE as in use holds
        // the state `fpu` holds (its legacy area, read at the same moment)
        // and, set after the xcrs, replaces it: setting `fpu` first would
        // only cost three ioctls (KVM's FPU set reads and rewrites the
        // XSAVE header first). With either bit clear, KVM skips that part
        // of the legacy area on a set, so `fpu` is what puts it back.
        if name == "fpu" && xsave_has_fpu {
            continue;
        }
        vcpu.set_state(kind, image).map_err(set(name))?;
        if name == "xcrs" {
            // XCR0 is set: the XSAVE image's components are valid now.
            if let Some(x) = xsave {
                vcpu.set_xsave(x).map_err(set("xsave"))?;
            }
            let msrs = parse_msrs(record(r, &part, "msrs")?, &part)?;
            write_msrs(vcpu, id, &msrs).map_err(set("msrs"))?;
        }
    }
    Ok(())
}

/// Whether an XSAVE image's header (`xstate_bv`, at byte 512) marks both
/// x87 (bit 0) and SSE (bit 1) as in use.
pub fn xsave_holds_x87_sse(image: &[u8]) -> bool {
    image.get(512).is_some_and(|b| b & 0b11 == 0b11)
}

/// Writes the MSRs; one KVM refuses is skipped with a warning (KVM_SET_MSRS
/// stops at it).
fn write_msrs(vcpu: &impl Vcpu, id: usize, msrs: &[(u32, u64)]) -> std::result::Result<(), Errno> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(crate::limits::MAX_MSR_ENTRIES)];
        let n = vcpu.set_msrs_counted(chunk)?.min(chunk.len());
        if n < chunk.len() {
            warn!(
                "vcpu {id}: KVM refused MSR {:#x} = {:#x} of the snapshot; skipped",
                chunk[n].0, chunk[n].1
            );
        }
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(())
}

/// The parsed `vm.state`.
pub struct VmPart {
    pub records: Records,
    pub memory: Vec<MemoryRecord>,
    pub reservations: Vec<ReservationRecord>,
    pub ioevents: Vec<IoeventRecord>,
    pub irqfds: Vec<IrqfdRecord>,
    pub irq_routes: Option<Vec<IrqRoute>>,
    /// The EPT identity-map address the snapshot's machine set (`None`:
    /// KVM's default).
    pub identity_map: Option<u64>,
}

/// Checks and parses `vm.state`.
pub fn parse_vm(records: Records) -> Result<VmPart> {
    let part = VM_PART;
    for (name, kind) in VM_IMAGES {
        let image = record(&records, part, name)?;
        if image.len() != kind.size() {
            return Err(bad(
                part,
                name,
                format!("{} bytes, expected {}", image.len(), kind.size()),
            ));
        }
    }
    let irq_routes = match records.get("irq-routes") {
        None => None,
        Some(_) => {
            let v: Vec<RouteRecord> = parse_json(&records, part, "irq-routes")?;
            if v.len() > crate::limits::MAX_IRQ_ROUTES {
                return Err(bad(part, "irq-routes", "too many routes"));
            }
            Some(v.iter().map(IrqRoute::from).collect())
        }
    };
    let identity_map = match records.get("identity-map") {
        None => None,
        Some(b) => {
            let b: [u8; 8] = b.try_into().map_err(|_| {
                bad(
                    part,
                    "identity-map",
                    format!("{} bytes, expected 8", b.len()),
                )
            })?;
            let addr = u64::from_le_bytes(b);
            // The identity map takes one page below 4 GiB (KVM's check,
            // repeated here so the refusal names the record).
            if addr >= 1 << 32 || !addr.is_multiple_of(4096) {
                return Err(bad(
                    part,
                    "identity-map",
                    format!("{addr:#x} is not a page-aligned address below 4 GiB"),
                ));
            }
            Some(addr)
        }
    };
    Ok(VmPart {
        identity_map,
        memory: parse_json(&records, part, "memory")?,
        reservations: parse_json(&records, part, "reservations")?,
        ioevents: parse_json(&records, part, "ioevents")?,
        irqfds: parse_json(&records, part, "irqfds")?,
        irq_routes,
        records,
    })
}

/// Applies the VM-wide state: routes (when the snapshot's machine set
/// some), PICs, IOAPIC, PIT, clock.
pub fn apply_vm(vm: &impl Vm, p: &VmPart) -> Result<()> {
    if let Some(routes) = &p.irq_routes {
        vm.set_gsi_routing(routes)
            .map_err(|e| SnapError::SetVm("irq-routes", e))?;
    }
    for (name, kind) in VM_IMAGES {
        vm.set_state(kind, record(&p.records, VM_PART, name)?)
            .map_err(|e| SnapError::SetVm(name, e))?;
    }
    Ok(())
}

/// Sets the snapshot's identity-map address (`KVM_SET_IDENTITY_MAP_ADDR`,
/// which KVM takes only before the first vcpu is created: the restore
/// calls this at `Start`, before the vcpus exist). `now` is the address
/// the plugin set itself for the new machine, if it did: the same address
/// needs nothing, another one is refused (the guest's page tables may rely
/// on the snapshot's). Returns the address to record.
pub fn apply_identity_map(vm: &impl Vm, p: &VmPart, now: Option<u64>) -> Result<Option<u64>> {
    match (p.identity_map, now) {
        (None, now) => Ok(now),
        (Some(want), Some(have)) if want == have => Ok(now),
        (Some(want), Some(have)) => Err(SnapError::Layout(format!(
            "the plugin set the identity map at {have:#x}, the snapshot's machine at {want:#x}"
        ))),
        (Some(want), None) => {
            vm.set_identity_map_addr(want)
                .map_err(|e| SnapError::SetVm("identity-map", e))?;
            log::debug!("restore: identity map set at {want:#x}");
            Ok(Some(want))
        }
    }
}

/// Compares the plugin's machine with the snapshot's: memory must match
/// (an error naming the region), the rest only warns.
pub fn compare_layout(snap: &VmPart, now: &HostTables) -> Result<()> {
    let key = |m: &MemoryRecord| (m.gpa, m.size);
    let mut a: Vec<_> = snap.memory.iter().map(key).collect();
    let mut b: Vec<_> = now.memory.iter().map(key).collect();
    a.sort_unstable();
    b.sort_unstable();
    if let Some(m) = a.iter().find(|m| !b.contains(m)) {
        return Err(SnapError::Layout(format!(
            "the snapshot's region at {:#x} ({:#x} bytes) is not set up by the plugin",
            m.0, m.1
        )));
    }
    if let Some(m) = b.iter().find(|m| !a.contains(m)) {
        return Err(SnapError::Layout(format!(
            "the plugin's region at {:#x} ({:#x} bytes) is not in the snapshot",
            m.0, m.1
        )));
    }
    let mut r1 = snap.reservations.clone();
    let mut r2 = now.reservations.clone();
    let order = |r: &ReservationRecord| (r.space.clone(), r.start);
    r1.sort_by_key(order);
    r2.sort_by_key(order);
    if r1 != r2 {
        warn!(
            "restore: the plugin's reserved ranges differ from the snapshot's ({r2:?} vs {r1:?})"
        );
    }
    let strip = |v: &[IoeventRecord]| {
        let mut v: Vec<_> = v
            .iter()
            .map(|e| (e.space.clone(), e.address, e.length, e.datamatch))
            .collect();
        v.sort();
        v
    };
    if strip(&snap.ioevents) != strip(&now.ioevents) {
        warn!("restore: the plugin's ioeventfds differ from the snapshot's");
    }
    let gsis = |v: &[IrqfdRecord]| {
        let mut v: Vec<_> = v.iter().map(|e| e.gsi).collect();
        v.sort_unstable();
        v
    };
    if gsis(&snap.irqfds) != gsis(&now.irqfds) {
        warn!("restore: the plugin's irqfds differ from the snapshot's");
    }
    Ok(())
}

/// A memory region to write: a duplicate of the object's memfd.
pub struct MemorySource {
    pub id: u32,
    pub gpa: u64,
    pub size: u64,
    pub fd: OwnedFd,
    pub offset: u64,
}

/// Everything the writer thread needs: captured while the vcpus are out of
/// the guest.
pub struct Job {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub vm: Records,
    pub vcpus: Vec<Records>,
    pub memory: Vec<MemorySource>,
    /// `None`: taken without device state (no `device` part).
    pub device: Option<Vec<u8>>,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub bytes: u64,
    pub memory_pages: u64,
    pub ms: u64,
}

/// Writes the snapshot (on the worker thread).
pub fn write(job: Job) -> std::result::Result<Written, SnapshotError> {
    let started = Instant::now();
    let mut w = SnapshotWriter::create(&job.dir, job.manifest, false)?;
    w.add_state(VM_PART, &job.vm)?;
    for (i, r) in job.vcpus.iter().enumerate() {
        w.add_state(&vcpu_part(i), r)?;
    }
    let mut pages = 0;
    for m in &job.memory {
        let info = w.add_memory(&memory_part(m.id), m.gpa, m.fd.as_fd(), m.offset, m.size)?;
        pages += info.data_pages;
    }
    if let Some(d) = &job.device {
        w.add_blob(DEVICE_PART, d)?;
    }
    let manifest = w.finish()?;
    let bytes = manifest
        .parts
        .iter()
        .map(|p| match p.kind {
            vmm_snapshot::PartKind::Memory => p.data_pages.unwrap_or(0) * 4096,
            _ => p.bytes,
        })
        .sum();
    Ok(Written {
        bytes,
        memory_pages: pages,
        ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// An opened and verified snapshot, ready to restore.
pub struct Restore {
    /// The snapshot directory, or the migration address.
    pub dir: PathBuf,
    /// `None` for an incoming migration: the memory is already in place.
    pub snapshot: Option<Snapshot>,
    pub vm: VmPart,
    pub vcpus: Vec<Records>,
    /// The plugin's blob (empty: taken without device state).
    pub device: Vec<u8>,
}

impl Restore {
    /// Refuses a snapshot whose guest relied on a CPU vendor or features
    /// this host's KVM does not offer (before anything runs).
    pub fn check_cpu(&self, vm: &impl Vm) -> Result<()> {
        let supported = vm.supported_cpuid().map_err(SnapError::SupportedCpuid)?;
        for (i, r) in self.vcpus.iter().enumerate() {
            let cpuid = parse_cpuid(record(r, &vcpu_part(i), "cpuid")?, &vcpu_part(i))?;
            check_cpu_compatible(i, &cpuid, &supported)?;
        }
        Ok(())
    }

    /// Opens `dir`, verifies the checksum of every state and blob part and
    /// checks every state record and every memory image's length; `vcpus`
    /// is `--cpus` when it was given. The memory images' checksums are
    /// verified as [`Self::load_region`] loads them (at `Start`, before any
    /// vcpu exists): reading every image twice, once here and once to load
    /// it, doubled the restore time.
    pub fn open(dir: &Path, vcpus: Option<usize>) -> Result<Restore> {
        let snap = |e| SnapError::Snapshot(dir.to_path_buf(), e);
        let snapshot = Snapshot::open(dir).map_err(snap)?;
        snapshot.verify_except_memory().map_err(snap)?;
        let n = snapshot.manifest().vcpus;
        if let Some(asked) = vcpus {
            if asked as u64 != u64::from(n) {
                return Err(SnapError::VcpuCount { snapshot: n, asked });
            }
        }
        let vm = parse_vm(snapshot.state(VM_PART).map_err(snap)?)?;
        let mut parts = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let name = vcpu_part(i);
            if snapshot.manifest().part(&name).is_none() {
                return Err(SnapError::NoVcpuPart(i));
            }
            let r = snapshot.state(&name).map_err(snap)?;
            check_vcpu(&r, &name)?;
            parts.push(r);
        }
        for m in &vm.memory {
            let name = memory_part(m.id);
            match snapshot.manifest().part(&name) {
                Some(p) if p.guest_address == Some(m.gpa) && p.bytes == m.size => {}
                _ => {
                    return Err(bad(
                        VM_PART,
                        "memory",
                        format!("region {} has no matching memory part {name}", m.id),
                    ))
                }
            }
        }
        let device = match snapshot.manifest().part(DEVICE_PART) {
            Some(_) => snapshot.blob(DEVICE_PART).map_err(snap)?,
            None => Vec::new(),
        };
        Ok(Restore {
            dir: dir.to_path_buf(),
            snapshot: Some(snapshot),
            vm,
            vcpus: parts,
            device,
        })
    }

    /// An incoming migration's state (memory already written), checked
    /// like a snapshot's parts.
    pub fn from_migration(
        origin: &str,
        vm: Records,
        vcpus: Vec<Records>,
        device: Vec<u8>,
    ) -> Result<Restore> {
        let vm = parse_vm(vm)?;
        for (i, r) in vcpus.iter().enumerate() {
            check_vcpu(r, &vcpu_part(i))?;
        }
        Ok(Restore {
            dir: PathBuf::from(origin),
            snapshot: None,
            vm,
            vcpus,
            device,
        })
    }

    /// The vcpu count.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Punches region `m`'s range of `fd` to zero and loads its image,
    /// verifying its checksum over the bytes loaded (a mismatch is an error
    /// naming the part; the region then holds garbage and the restore
    /// fails before any vcpu exists).
    pub fn load_region(
        &self,
        m: &MemoryRecord,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
    ) -> Result<()> {
        let name = memory_part(m.id);
        let len = i64::try_from(m.size).map_err(|_| SnapError::Punch {
            name: name.clone(),
            source: Errno::EOVERFLOW,
        })?;
        let off = i64::try_from(offset).map_err(|_| SnapError::Punch {
            name: name.clone(),
            source: Errno::EOVERFLOW,
        })?;
        nix::fcntl::fallocate(
            fd,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
        .map_err(|source| SnapError::Punch {
            name: name.clone(),
            source,
        })?;
        let Some(snapshot) = &self.snapshot else {
            return Ok(());
        };
        snapshot
            .load_memory(&name, fd, offset)
            .map_err(|e| SnapError::Snapshot(self.dir.clone(), e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, ebx: u32, ecx: u32, edx: u32) -> Cpuid {
        Cpuid {
            function,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn cpu_compatibility_is_vendor_and_a_feature_subset() {
        // "GenuineIntel" as ebx, edx, ecx.
        let intel = leaf(0, 0x756e_6547, 0x6c65_746e, 0x4965_6e69);
        let amd = leaf(0, 0x6874_7541, 0x444d_4163, 0x6974_6e65);
        let host = [intel, leaf(1, 0, 0b1011, 0b1), leaf(7, 0b110, 0, 0)];
        // Nothing set, or a subset: fine.
        check_cpu_compatible(0, &[], &host).unwrap();
        check_cpu_compatible(
            0,
            &[intel, leaf(1, 0, 0b0011, 0b1), leaf(7, 0b100, 0, 0)],
            &host,
        )
        .unwrap();
        // OSXSAVE follows the guest, not the CPU.
        check_cpu_compatible(0, &[leaf(1, 0, 1 << 27, 0)], &host).unwrap();
        let e = check_cpu_compatible(1, &[amd], &host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vcpu 1's CPU vendor is \"AuthenticAMD\""), "{e}");
        assert!(e.contains("\"GenuineIntel\""), "{e}");
        let e = check_cpu_compatible(0, &[leaf(7, 0b0011, 0, 0)], &host)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("leaf 0x7 ebx has feature bits 0x00000001"),
            "{e}"
        );
        // A leaf the host does not report at all offers no features.
        let e = check_cpu_compatible(0, &[leaf(0x8000_0001, 0, 0, 1 << 29)], &host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("leaf 0x80000001 edx"), "{e}");
    }

    #[test]
    fn crc_matches_the_ieee_check_value() {
        assert_eq!(crc32fast_hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn msrs_round_trip_and_bad_length_is_named() {
        let mut b = Vec::new();
        for (i, v) in [(0x10u32, 5u64), (0xc000_0080, 0xd01)] {
            b.extend_from_slice(&i.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(
            parse_msrs(&b, "vcpu0").unwrap(),
            vec![(0x10, 5), (0xc000_0080, 0xd01)]
        );
        let e = parse_msrs(&b[..13], "vcpu0").unwrap_err().to_string();
        assert!(e.contains("vcpu0") && e.contains("msrs"), "{e}");
    }

    #[test]
    fn a_vcpu_part_missing_a_record_is_refused_by_name() {
        let mut r = Records::new();
        r.push("regs", vec![0; VcpuStateKind::Regs.size()]).unwrap();
        let e = check_vcpu(&r, "vcpu0").unwrap_err().to_string();
        assert!(e.contains("sregs") && e.contains("missing"), "{e}");
    }

    #[test]
    fn layout_mismatch_names_the_region() {
        let snap = VmPart {
            records: Records::new(),
            memory: vec![MemoryRecord {
                id: 0,
                slot: 0,
                gpa: 0,
                size: 0x10000,
                read_only: false,
                dirty_log: false,
            }],
            reservations: vec![],
            ioevents: vec![],
            irqfds: vec![],
            irq_routes: None,
            identity_map: None,
        };
        let mut now = HostTables::default();
        now.memory.push(MemoryRecord {
            size: 0x20000,
            ..snap.memory[0].clone()
        });
        let e = compare_layout(&snap, &now).unwrap_err().to_string();
        assert!(e.contains("0x10000"), "{e}");
        now.memory[0].size = 0x10000;
        compare_layout(&snap, &now).unwrap();
    }
}
