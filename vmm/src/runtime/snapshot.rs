//! The host's side of snapshots (issue 12): the tables the snapshot
//! records, the capture once every vcpu is parked, the writer thread, and
//! at `Start` of a restore the memory images and VM state.

use std::os::fd::AsFd;
use std::thread::JoinHandle;

use log::info;
use serde_json::{json, Value};
use vmm_snapshot::{Manifest, SnapshotError};

use super::main_handler::MainState;
use super::objects::Object;
use super::{Host, RunError};
use crate::snapshot::{
    self as snap, HostTables, IoeventRecord, IrqfdRecord, MemoryRecord, MemorySource,
    ReservationRecord, SnapError, Written,
};
use crate::vm::{Space, Vm};

/// A snapshot being written.
pub(super) type Writer = JoinHandle<Result<Written, SnapshotError>>;

/// The host's tables as a snapshot records them.
pub(super) fn host_tables(state: &MainState) -> HostTables {
    let mut t = HostTables {
        irq_routes: state.irq_routes.clone(),
        identity_map: state.identity_map,
        ..Default::default()
    };
    for (&id, o) in state.objects.iter() {
        match o {
            Object::Memory {
                slot,
                start,
                length,
                dirty_log,
                mapping,
            } => t.memory.push(MemoryRecord {
                id,
                slot: *slot,
                gpa: *start,
                size: *length,
                read_only: mapping.prot() & libc::PROT_WRITE == 0,
                dirty_log: *dirty_log,
            }),
            Object::IoEvent {
                space,
                address,
                length,
                datamatch,
                ..
            } => t.ioevents.push(IoeventRecord {
                id,
                space: snap::space_name(*space),
                address: *address,
                length: *length,
                datamatch: *datamatch,
            }),
            Object::IrqEvent { gsi, .. } => t.irqfds.push(IrqfdRecord { id, gsi: *gsi }),
        }
    }
    for space in [Space::Ioport, Space::Mmio] {
        for r in state.exit_config.reservations.ranges(space) {
            t.reservations.push(ReservationRecord {
                space: snap::space_name(space),
                start: r.start,
                length: r.length,
                async_write: r.async_write,
                coalesced: r.coalesced,
            });
        }
    }
    t
}

/// The memfd and offset behind memory object `id`.
fn memory_fd(state: &MainState, id: u32) -> Option<(std::os::fd::BorrowedFd<'_>, u64)> {
    match state.objects.get(id) {
        Some(Object::Memory { mapping, .. }) => {
            mapping.file_offset().map(|f| (f.file().as_fd(), f.start()))
        }
        _ => None,
    }
}

/// The plugin's device state is at most what a snapshot (and a
/// migration's State frame) holds.
pub(super) fn device_state_fits(d: &[u8]) -> Result<(), String> {
    if d.len() > snap::MAX_DEVICE_STATE {
        return Err(format!(
            "the plugin's device state is {} bytes, more than {}",
            d.len(),
            snap::MAX_DEVICE_STATE
        ));
    }
    Ok(())
}

impl Host {
    /// The VM's and every vcpu's state (every vcpu parked), as a snapshot
    /// and a migration's State frame record them.
    pub(super) fn capture_machine(
        &self,
        tables: &HostTables,
    ) -> Result<(vmm_snapshot::Records, Vec<vmm_snapshot::Records>), String> {
        let chain = |e: SnapError| crate::error_chain(&e);
        let vm = snap::capture_vm(&self.vm, tables).map_err(chain)?;
        let msrs = self
            .vm
            .msr_index_list()
            .map_err(|e| format!("cannot list the vcpus' MSRs: {e}"))?;
        let mut vcpus = Vec::with_capacity(self.snap_vcpus.len());
        for (i, v) in self.snap_vcpus.iter().enumerate() {
            vcpus.push(snap::capture_vcpu(v, i, &msrs).map_err(chain)?);
        }
        Ok((vm, vcpus))
    }

    /// Captures the machine (every vcpu parked) and starts the writer.
    pub(super) fn begin_snapshot(
        &mut self,
        dir: &str,
        device: Option<Vec<u8>>,
    ) -> Result<(), String> {
        if self.snapshot_writer.is_some() {
            return Err("a snapshot is being written".into());
        }
        if let Some(d) = &device {
            device_state_fits(d)?;
        }
        let tables = host_tables(&self.state);
        let (vm, vcpus) = self.capture_machine(&tables)?;
        let mut memory = Vec::with_capacity(tables.memory.len());
        for m in &tables.memory {
            let (fd, offset) = memory_fd(&self.state, m.id)
                .ok_or_else(|| format!("memory object {} has no descriptor", m.id))?;
            let fd = fd
                .try_clone_to_owned()
                .map_err(|e| format!("cannot duplicate memory object {}'s memfd: {e}", m.id))?;
            memory.push(MemorySource {
                id: m.id,
                gpa: m.gpa,
                size: m.size,
                fd,
                offset,
            });
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut manifest = Manifest::new(env!("CARGO_PKG_VERSION"), vcpus.len() as u32, now_ms);
        let plugin = self
            .config
            .plugin
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        manifest.facts.insert("plugin".into(), plugin);
        if let Some(v) = vcpus.first() {
            manifest
                .facts
                .insert("cpuid-crc32".into(), snap::cpuid_crc(v).to_string());
        }
        let job = snap::Job {
            dir: dir.into(),
            manifest,
            vm,
            vcpus,
            memory,
            device,
        };
        let handle = std::thread::Builder::new()
            .name("vmm_snapshot".into())
            .spawn(move || snap::write(job))
            .map_err(|e| format!("cannot start the snapshot writer: {e}"))?;
        self.snapshot_writer = Some(handle);
        Ok(())
    }

    /// The writer's result, once it finished.
    pub(super) fn poll_snapshot(&mut self) -> Option<Result<Value, String>> {
        if !self.snapshot_writer.as_ref()?.is_finished() {
            return None;
        }
        let handle = self.snapshot_writer.take()?;
        Some(match handle.join() {
            Ok(Ok(w)) => {
                info!(
                    "snapshot written: {} bytes, {} memory pages, {} ms",
                    w.bytes, w.memory_pages, w.ms
                );
                Ok(json!({ "bytes": w.bytes, "ms": w.ms, "memory_pages": w.memory_pages }))
            }
            Ok(Err(e)) => Err(crate::error_chain(&e)),
            Err(_) => Err("the snapshot writer panicked".into()),
        })
    }

    /// At `Start` of a restore, before the vcpus exist: the plugin took
    /// its state if there is one, its memory matches the snapshot's, the
    /// memory images are loaded and the VM state is set.
    pub(super) fn restore_machine(&mut self) -> Result<(), RunError> {
        let Some(r) = &self.restore else {
            return Ok(());
        };
        let fail = RunError::Restore;
        if !r.device.is_empty() && !self.state.restore.as_ref().is_some_and(|o| o.asked) {
            return Err(fail(SnapError::DeviceStateNotTaken(r.device.len())));
        }
        let tables = host_tables(&self.state);
        snap::compare_layout(&r.vm, &tables).map_err(fail)?;
        let started = std::time::Instant::now();
        // An incoming migration wrote the memory already.
        let memory = if r.snapshot.is_some() {
            &r.vm.memory[..]
        } else {
            &[]
        };
        for m in memory {
            let now = tables
                .memory
                .iter()
                .find(|t| t.gpa == m.gpa && t.size == m.size)
                .ok_or_else(|| fail(SnapError::Layout(format!("no region at {:#x}", m.gpa))))?;
            let (fd, offset) = memory_fd(&self.state, now.id).ok_or_else(|| {
                fail(SnapError::Layout(format!(
                    "the region at {:#x} has no descriptor",
                    m.gpa
                )))
            })?;
            r.load_region(m, fd, offset).map_err(fail)?;
        }
        snap::apply_vm(&self.vm, &r.vm).map_err(fail)?;
        self.state.identity_map =
            snap::apply_identity_map(&self.vm, &r.vm, self.state.identity_map).map_err(fail)?;
        if let Some(routes) = &r.vm.irq_routes {
            self.state.routed_gsis = routes
                .iter()
                .map(|r| match *r {
                    crate::vm::IrqRoute::Irqchip { gsi, .. }
                    | crate::vm::IrqRoute::Msi { gsi, .. } => gsi,
                })
                .collect();
            self.state.irq_routes = Some(routes.clone());
        }
        info!(
            "restored guest memory and VM state from {} in {} ms",
            r.dir.display(),
            started.elapsed().as_millis()
        );
        Ok(())
    }
}
