//! `HostServices` for the main request handler: the host's vcpu channels,
//! taps, vcpu controls and threads, shutdown eventfd, connection count and
//! descriptor budget, as `main_handler` sees them.

use std::cell::RefCell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::warn;
use nix::errno::Errno;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use super::inflight::InFlight;
use super::main_handler::{FastReset, MainState};
use super::main_handler::{HostServices, NetConfig};
use super::objects::{Object, Refused};
use super::plugin_control::PluginControl;
use super::reset::{self, Region, ResetPoint};
use super::vcpu::{self, VcpuControl};
use super::Channel;
use crate::net::Tap;
use crate::vm::borrow_fd;

/// The host resources the main request handler sees.
pub(super) struct Services<'a> {
    pub(super) channels: &'a [Channel],
    pub(super) taps: &'a [Tap],
    pub(super) controls: &'a [Arc<VcpuControl>],
    pub(super) threads: &'a [JoinHandle<()>],
    pub(super) shutdown: &'a EventFd,
    pub(super) connections: usize,
    pub(super) in_flight: &'a InFlight,
    /// The plugin's control channel (`GetControlSocket` opens it).
    pub(super) control: RefCell<&'a mut PluginControl>,
    /// Fast reset (reset.rs): the VM, a handle on each vcpu and the
    /// in-memory snapshot.
    pub(super) vm: &'a crate::vm::KvmVm,
    pub(super) vcpus: &'a [kvm_ioctls::VcpuFd],
    pub(super) reset_point: RefCell<&'a mut Option<ResetPoint>>,
}

impl HostServices for Services<'_> {
    fn vcpu_count(&self) -> usize {
        self.channels.len()
    }

    fn vcpu_fds(&self, i: usize) -> [BorrowedFd<'_>; 2] {
        let [a, b] = &self.channels[i].plugin;
        [a.as_fd(), b.as_fd()]
    }

    fn fast_channel_fd(&self, i: usize) -> Option<BorrowedFd<'_>> {
        self.channels[i].fast.as_ref().map(|f| f.as_fd())
    }

    fn shutdown_eventfd(&self) -> BorrowedFd<'_> {
        borrow_fd(self.shutdown)
    }

    fn net_config(&self) -> Result<Option<NetConfig<'_>>, Errno> {
        let Some(tap) = self.taps.first() else {
            return Ok(None);
        };
        let a = tap.addresses()?;
        Ok(Some(NetConfig {
            mac: a.mac,
            ip: a.ip,
            netmask: a.netmask,
            fd: tap.fd(),
        }))
    }

    fn pause_vcpus(&self, mask: u64, user: u64) {
        for (i, control) in self.controls.iter().enumerate().take(64) {
            if mask & (1u64 << i) == 0 {
                continue;
            }
            control.request_pause(user);
            if let Some(t) = self.threads.get(i) {
                if let Err(e) = t.kill(vcpu::kick_signal()) {
                    warn!("cannot kick vcpu {i}: {e}");
                }
            }
        }
    }

    fn connection_count(&self) -> usize {
        self.connections
    }

    fn may_send_fds(&self, n: usize) -> bool {
        self.in_flight.fits(n)
    }

    fn open_control_channel(&self) -> Result<OwnedFd, Errno> {
        self.control.borrow_mut().open()
    }

    fn fast_reset(&self, state: &MainState, op: FastReset<'_>) -> Result<u64, Refused> {
        if !state.started || self.vcpus.is_empty() {
            return Err(Refused::new(Errno::EINVAL, "the VM has not started"));
        }
        // Every vcpu must be out of KVM_RUN and stay out while the main
        // thread sets its state: waiting for the plugin's Resume of an
        // exit, or parked (docs/protocol-extensions.md §7).
        for (i, c) in self.controls.iter().enumerate() {
            if c.stop_reason().is_some() {
                return Err(Refused::new(Errno::EINVAL, format!("vcpu {i} has stopped")));
            }
            if c.watch.snapshot().is_none() && !c.is_parked() {
                return Err(Refused::new(
                    Errno::EBUSY,
                    format!("vcpu {i} is running, not stopped in an exit or parked"),
                ));
            }
        }
        let regions: Vec<Region<'_>> = state
            .objects
            .iter()
            .filter_map(|(&id, o)| match o {
                Object::Memory {
                    slot,
                    start,
                    length,
                    dirty_log,
                    mapping,
                } => Some(Region {
                    id,
                    slot: *slot,
                    gpa: *start,
                    size: *length,
                    dirty_log: *dirty_log,
                    mapping,
                }),
                _ => None,
            })
            .collect();
        let mut point = self.reset_point.borrow_mut();
        match op {
            FastReset::Snapshot => {
                let msrs = crate::vm::Vm::msr_index_list(self.vm)
                    .map_err(|e| Refused::new(e, "cannot list the vcpus' MSRs"))?;
                // The old snapshot goes first: two copies of guest memory
                // are never held at once.
                **point = None;
                let p = reset::take(self.vm, self.vcpus, &msrs, &regions)?;
                let bytes = p.bytes();
                **point = Some(p);
                Ok(bytes)
            }
            FastReset::Reset(pages) => {
                let Some(p) = point.as_ref() else {
                    return Err(Refused::new(
                        Errno::ENOENT,
                        "no in-memory snapshot: call SnapshotInMemory first",
                    ));
                };
                reset::reset(p, self.vm, self.vcpus, &regions, pages)
            }
        }
    }
}
