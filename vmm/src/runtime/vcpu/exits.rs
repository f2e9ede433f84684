//! Exit routing: the run loop of a vcpu thread over [`VcpuRun`], and the
//! [`Servicer`] that turns each exit into a wait reason for the plugin and
//! completes it from the plugin's `Resume`. Plain code over the hypervisor
//! traits and [`VcpuIo`]; only [`run_vcpu`] is tied to KVM.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_ioctls::VcpuFd;
use log::{debug, error, info, warn};
use nix::errno::Errno;
use plugin_proto::shm::ShmError;
use plugin_proto::vcpu_response;
use zerocopy::FromBytes;

use super::diag::WaitKind;
use super::kick::{IMMEDIATE_EXIT, KICKS};
use super::{
    complete_read, deliver, deliver_io, hcall_result, io_wait, service, ChannelIo, ServiceError,
    Transport, VcpuControl, VcpuIo, VcpuShared, MAX_IO_READ, MAX_IO_WRITE,
};
use crate::runtime::objects::ExitConfigReader;
use crate::vm::{CoalescedWrite, Space, Vcpu, VcpuRun, VcpuStateKind, VmExit, COALESCED_RECORD};
use crate::{exit_codec, limits, record};

/// The non-`KVM_RUN` half of a vcpu thread: channel I/O and servicing, and
/// the routing of exits to the plugin. Plain code over [`Vcpu`] and
/// [`VcpuIo`]: on a real host `V` is a second `VcpuFd` on the same vcpu (for
/// state requests while the run handle is borrowed by an exit) and `I` the
/// vcpu channel; in tests both are models.
pub struct Servicer<V: Vcpu, I: VcpuIo = ChannelIo> {
    pub id: u32,
    pub vcpu: V,
    pub control: Arc<VcpuControl>,
    pub shared: Arc<VcpuShared>,
    io: I,
    config: ExitConfigReader,
    /// Encoding buffer of the exit path.
    scratch: Vec<u8>,
    /// The data of the last `Resume`.
    resume_data: Vec<u8>,
    /// Servicing failed for good (a corrupted fast channel): the vcpu
    /// stops.
    failed: bool,
    /// Coalesced writes taken from the ring and not delivered yet, as wire
    /// records (capacity for a whole batch: no allocation on the exit path).
    batch: Vec<u8>,
    /// `--restore`: this vcpu's snapshot state, applied after Init
    /// servicing and before the start barrier.
    pub restore: Option<vmm_snapshot::Records>,
}

/// Most writes in one `CoalescedWrites` batch (a bit more than KVM's ring
/// holds, so a full ring plus the write that found it full is one batch).
pub const MAX_COALESCED_BATCH: usize = 256;

impl<V: Vcpu> Servicer<V, ChannelIo> {
    /// A servicer on a real vcpu channel.
    pub fn new(
        id: u32,
        vcpu: V,
        transport: Transport,
        control: Arc<VcpuControl>,
        shared: Arc<VcpuShared>,
    ) -> Self {
        let io = ChannelIo::new(id, transport, Arc::clone(&shared), Arc::clone(&control));
        Servicer::with_io(id, vcpu, io, control, shared)
    }
}

impl<V: Vcpu, I: VcpuIo> Servicer<V, I> {
    /// A servicer on any transport.
    pub fn with_io(
        id: u32,
        vcpu: V,
        io: I,
        control: Arc<VcpuControl>,
        shared: Arc<VcpuShared>,
    ) -> Self {
        let config = ExitConfigReader::new(Arc::clone(&shared.exit_config));
        Servicer {
            id,
            vcpu,
            control,
            io,
            shared,
            config,
            scratch: Vec::with_capacity(512),
            resume_data: Vec::with_capacity(MAX_IO_READ),
            failed: false,
            batch: Vec::with_capacity(MAX_COALESCED_BATCH * COALESCED_RECORD),
            restore: None,
        }
    }

    /// The transport (tests inspect what was sent).
    pub fn io(&mut self) -> &mut I {
        &mut self.io
    }

    fn killed(&self) -> bool {
        self.shared.kill.load(Ordering::Acquire)
    }

    fn service(&mut self, init: bool) -> Result<(), ServiceError> {
        service(&self.vcpu, &mut self.io, init, &mut self.resume_data)
    }

    /// Delivers a stopping wait reason and services it until `Resume`.
    fn deliver(&mut self, wait: vcpu_response::Wait, kind: WaitKind) -> Result<(), ServiceError> {
        if let Some(r) = record::recorder() {
            r.vcpu_exit(self.id, &wait);
        }
        self.control.watch.begin(kind, 0);
        let r = deliver(&self.vcpu, &mut self.io, wait, true, &mut self.resume_data).map(drop);
        self.control.watch.end();
        r
    }

    /// Records why this vcpu stopped the VM, to become the run's error (the
    /// first such failure of the VM wins).
    fn set_failure(&self, message: String) {
        if let Ok(mut f) = self.shared.failure.lock() {
            if f.is_none() {
                *f = Some((self.id, message));
            }
        }
    }

    fn log_service_error(&mut self, what: &str, e: &ServiceError) {
        if let ServiceError::FastChannel(
            ShmError::Corrupt | ShmError::TooLarge(_) | ShmError::BadHeader,
        ) = e
        {
            // The shared ring is broken for good: every later exit would
            // fail the same way. Stop this vcpu (and so the VM) once, and
            // let the main loop report it as the run's error.
            if !self.failed {
                self.failed = true;
                debug!("vcpu {}: {what} servicing failed: {e}", self.id);
                self.set_failure(crate::error_chain(e));
            }
            return;
        }
        match e {
            ServiceError::Killed | ServiceError::Shutdown => {
                debug!("vcpu {}: {what} servicing ended: {e}", self.id)
            }
            _ => warn!(
                "vcpu {}: {what} servicing failed: {}",
                self.id,
                crate::error_chain(e)
            ),
        }
    }

    /// Sends an `Io` event (write data cut to 8 bytes, read buffers to 256)
    /// and, unless it is a posted write, services it; returns whether the
    /// plugin resumed it.
    fn io_event(
        &mut self,
        space: Space,
        address: u64,
        is_write: bool,
        data: &[u8],
        no_resume: bool,
    ) -> Result<bool, ServiceError> {
        let max = if is_write { MAX_IO_WRITE } else { MAX_IO_READ };
        let data = &data[..data.len().min(max)];
        if let Some(r) = record::recorder() {
            let mut w = vcpu_response::Wait::new();
            w.set_io(io_wait(space, address, is_write, data, no_resume));
            r.vcpu_exit(self.id, &w);
        }
        let hinted = if no_resume {
            None
        } else {
            self.hinted_registers(space, address, is_write)
        };
        let (regs, sregs, debugregs) = hinted
            .as_ref()
            .map_or((&[][..], &[][..], &[][..]), |(r, s, d)| {
                (&r[..], &s[..], &d[..])
            });
        let event = exit_codec::IoEvent {
            space: space.to_wire(),
            address,
            is_write,
            no_resume,
            data,
            regs,
            sregs,
            debugregs,
        };
        if !no_resume {
            let kind = if is_write {
                WaitKind::Write(space)
            } else {
                WaitKind::Read(space)
            };
            self.control.watch.begin(kind, address);
        }
        let r = deliver_io(
            &self.vcpu,
            &mut self.io,
            &event,
            &mut self.scratch,
            &mut self.resume_data,
        );
        self.control.watch.end();
        r
    }

    /// Logs a guest access to an unreserved address, once per address (for
    /// at most `MAX_UNRESERVED_LOGGED` addresses of the VM).
    #[cold]
    fn log_unreserved(&self, space: Space, address: u64, is_write: bool, len: usize) {
        match self.shared.unreserved.first(space, address) {
            Ok(()) => {
                let (what, effect) = match (space, is_write) {
                    (Space::Ioport, true) => ("write to port", "the write is dropped"),
                    (Space::Ioport, false) => ("read of port", "the read returns 0"),
                    (Space::Mmio, true) => ("write to MMIO address", "the write is dropped"),
                    (Space::Mmio, false) => ("read of MMIO address", "the read returns 0"),
                };
                warn!(
                    "vcpu {}: guest {what} {address:#x} ({len} bytes) is not in a reserved \
                     range: {effect} (logged once per address)",
                    self.id
                );
            }
            Err(true) => warn!(
                "vcpu {}: more than {} unreserved addresses accessed; further ones are not logged",
                self.id,
                super::diag::MAX_UNRESERVED_LOGGED
            ),
            Err(false) => {}
        }
    }

    /// Eager register images per the call hint (docs/wire-protocol.md §8.8):
    /// (regs, sregs, debugregs), empty when not sent.
    fn hinted_registers(
        &mut self,
        space: Space,
        address: u64,
        is_write: bool,
    ) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let hint = &self.config.get().hint;
        if !hint.applies(space, address, is_write) {
            return None;
        }
        let image = self.vcpu.get_state(VcpuStateKind::Regs).ok()?;
        let regs = kvm_bindings::kvm_regs::read_from_bytes(&image).ok()?;
        let (send_sregs, send_debugregs) = hint
            .hints
            .iter()
            .find(|h| h.matches(regs.rax, regs.rbx, regs.rcx, regs.rdx))
            .map_or((false, false), |h| (h.send_sregs, h.send_debugregs));
        let get = |set| self.vcpu.get_state(set).unwrap_or_default();
        Some((
            image,
            if send_sregs {
                get(VcpuStateKind::Sregs)
            } else {
                Vec::new()
            },
            if send_debugregs {
                get(VcpuStateKind::Debugregs)
            } else {
                Vec::new()
            },
        ))
    }

    /// A guest write at `address`.
    fn on_write(&mut self, space: Space, address: u64, data: &[u8]) {
        let range = self.config.get().reservations.lookup(space, address);
        self.io.note_exit(space, range.map(|r| (r.start, r.length)));
        if range.is_some_and(|r| r.coalesced) {
            // A write KVM did not coalesce (its ring was full): it joins the
            // batch after everything the ring held, in guest order.
            let mut w = CoalescedWrite {
                space,
                address,
                len: data.len().min(8) as u32,
                data: [0; 8],
            };
            w.data[..w.len as usize].copy_from_slice(&data[..w.len as usize]);
            self.push_coalesced(&w);
            self.flush_coalesced();
            return;
        }
        self.flush_coalesced();
        let Some(range) = range else {
            self.log_unreserved(space, address, true, data.len());
            return;
        };
        if let Err(e) = self.io_event(space, address, true, data, range.async_write) {
            self.log_service_error("io write", &e);
        }
    }

    /// A guest read at `address`; fills `data` (zeros when unreserved or when
    /// servicing fails, missing bytes of a short reply read as zero).
    fn on_read(&mut self, space: Space, address: u64, data: &mut [u8]) {
        let range = self.config.get().reservations.lookup(space, address);
        self.io.note_exit(space, range.map(|r| (r.start, r.length)));
        if range.is_none_or(|r| r.async_write) {
            if range.is_none() {
                self.log_unreserved(space, address, false, data.len());
            }
            complete_read(data, None);
            return;
        }
        let zeros = [0u8; MAX_IO_READ];
        let len = data.len().min(MAX_IO_READ);
        match self.io_event(space, address, false, &zeros[..len], false) {
            Ok(true) => complete_read(data, Some(&self.resume_data)),
            Ok(false) => complete_read(data, None),
            Err(e) => {
                self.log_service_error("io read", &e);
                complete_read(data, None);
            }
        }
    }

    /// Whether coalesced ranges were ever reserved (then the ring is
    /// drained at every exit).
    fn coalescing(&mut self) -> bool {
        self.config.get().coalesced
    }

    fn push_coalesced(&mut self, w: &CoalescedWrite) {
        if self.batch.len() >= MAX_COALESCED_BATCH * COALESCED_RECORD {
            self.flush_coalesced();
        }
        self.batch.extend_from_slice(&w.record());
    }

    /// Takes every write the ring holds into the batch (delivering full
    /// batches on the way).
    fn collect_coalesced(&mut self) {
        let shared = Arc::clone(&self.shared);
        loop {
            let mut guard = shared.coalesced.lock().unwrap_or_else(|p| p.into_inner());
            let Some(ring) = guard.as_mut() else {
                return;
            };
            while self.batch.len() < MAX_COALESCED_BATCH * COALESCED_RECORD {
                match ring.pop() {
                    Some(w) => self.batch.extend_from_slice(&w.record()),
                    None => return,
                }
            }
            // The batch is full: deliver it without holding the ring.
            drop(guard);
            self.flush_coalesced();
        }
    }

    /// Delivers the pending batch, if any, as one posted event.
    fn flush_coalesced(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if let Some(r) = record::recorder() {
            let mut c = vcpu_response::wait::CoalescedWrites::new();
            c.records = self.batch.clone();
            let mut w = vcpu_response::Wait::new();
            w.set_coalesced_writes(c);
            r.vcpu_exit(self.id, &w);
        }
        self.scratch.clear();
        exit_codec::encode_coalesced_writes(&mut self.scratch, &self.batch);
        self.batch.clear();
        if let Err(e) = self.io.write_response(&self.scratch) {
            self.log_service_error("coalesced writes", &e);
        }
    }

    /// Drains the ring and delivers what it held.
    pub fn drain_coalesced(&mut self) {
        if self.coalescing() {
            self.collect_coalesced();
            self.flush_coalesced();
        }
    }

    fn on_pause(&mut self, user: u64) -> Result<(), ServiceError> {
        let mut u = vcpu_response::wait::User::new();
        u.user = user;
        let mut w = vcpu_response::Wait::new();
        w.set_user(u);
        self.deliver(w, WaitKind::Pause)
    }
}

/// Runs vcpu `id` to completion on the current thread (the KVM glue: the
/// kick handler's view of `immediate_exit`, then [`run_thread`]).
pub fn run_vcpu(mut run: VcpuFd, mut sv: Servicer<VcpuFd>) {
    let ptr: *mut u8 = &mut run.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(ptr));
    let control = Arc::clone(&sv.control);
    KICKS.with(|c| c.set(control.kicks_ptr()));
    control.set_tid(nix::unistd::gettid().as_raw());
    let stop = run_thread(&mut run, &mut sv);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    KICKS.with(|c| c.set(std::ptr::null()));
    drop(control);
    sv.control.set_stop_reason(stop_reason(stop));
    sv.io().tap.finish();
    signal_exited(&sv);
}

fn signal_exited<V: Vcpu, I: VcpuIo>(sv: &Servicer<V, I>) {
    if let Err(e) = sv.shared.exited.write(1) {
        error!("vcpu {}: cannot signal its exit: {e}", sv.id);
    }
}

/// The life of a vcpu thread: Init servicing, the start barrier, then the
/// run loop until the vcpu stops (`None`: it never ran, because Init
/// servicing failed or the start was cancelled).
pub fn run_thread<R: VcpuRun, V: Vcpu, I: VcpuIo>(
    run: &mut R,
    sv: &mut Servicer<V, I>,
) -> Option<Stop> {
    let init = sv.service(true);
    if let Err(e) = &init {
        sv.log_service_error("init", e);
    }
    sv.control.watch.set_init_done();
    if init.is_ok() {
        if let Some(r) = sv.restore.take() {
            // The plugin's Init handler set fresh registers; the snapshot's
            // state replaces them, so the first KVM_RUN continues the guest
            // where it stopped. A failure stops the VM before any guest
            // instruction runs.
            if let Err(e) = crate::snapshot::apply_vcpu(&sv.vcpu, sv.id as usize, &r) {
                let message = crate::error_chain(&e);
                error!("vcpu {}: {message}", sv.id);
                sv.set_failure(message);
                sv.shared.barrier.cancel();
                return None;
            }
        }
    }
    let go = sv.shared.barrier.wait();
    (init.is_ok() && go).then(|| run_loop(run, sv))
}

/// Why the run loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The main thread asked the vcpu to stop.
    Killed,
    Halted,
    /// Triple fault.
    GuestShutdown,
    InternalError,
    FailEntry,
    /// Servicing a pause failed (the plugin is gone or misbehaved).
    PauseFailed,
    /// The vcpu channel is broken for good (a corrupted fast channel).
    ChannelFailed,
    UnknownHypervExit,
    TooManyUnknownExits,
    RunFailed(Errno),
}

/// Why a vcpu's run ended, for the control socket's `vcpu-stopped` event.
pub fn stop_reason(stop: Option<Stop>) -> String {
    match stop {
        None => "it never ran (its start was cancelled or Init servicing failed)".into(),
        Some(Stop::Killed) => "stopped by the host".into(),
        Some(Stop::Halted) => "the guest halted".into(),
        Some(Stop::GuestShutdown) => "the guest shut down (triple fault)".into(),
        Some(Stop::InternalError) => "KVM internal error".into(),
        Some(Stop::FailEntry) => "VM entry failed".into(),
        Some(Stop::PauseFailed) => "servicing a pause failed".into(),
        Some(Stop::ChannelFailed) => "its vcpu channel failed".into(),
        Some(Stop::UnknownHypervExit) => "unknown Hyper-V exit".into(),
        Some(Stop::TooManyUnknownExits) => "too many unhandled exits".into(),
        Some(Stop::RunFailed(e)) => format!("KVM_RUN failed: {e}"),
    }
}

/// What to do after one exit.
enum Next {
    Continue { known: bool },
    Stop(Stop),
}

/// Enters the guest until the vcpu stops; routes every exit.
pub fn run_loop<R: VcpuRun, V: Vcpu, I: VcpuIo>(run: &mut R, sv: &mut Servicer<V, I>) -> Stop {
    let id = sv.id;
    let mut unknown_exits = 0u32;
    // The last KVM_RUN returned without an exit to complete: a port or MMIO
    // read's data is in the registers (KVM completes it at the next
    // KVM_RUN), so the vcpu's state is complete and it may park.
    let mut complete = false;
    loop {
        if sv.killed() {
            return Stop::Killed;
        }
        if sv.failed {
            return Stop::ChannelFailed;
        }
        // One acquire load per KVM_RUN covers both kinds of pause.
        if sv.control.has_pending() {
            if complete && sv.control.park(&sv.shared.kill) {
                // Resumed (or killed): look at everything again, with the
                // channel of a plugin that replaced the old one (§9).
                sv.io.unparked();
                complete = false;
                continue;
            }
            run.set_immediate_exit(true);
        }
        let exit = match run.run() {
            Ok(VmExit::Interrupted) => {
                complete = true;
                run.set_immediate_exit(false);
                if sv.killed() {
                    return Stop::Killed;
                }
                sv.io.publish_stats();
                // A kick (the main loop's coalesced tick, a pause) is a
                // drain point too.
                sv.drain_coalesced();
                if let Some(user) = sv.control.take_pause() {
                    if let Err(e) = sv.on_pause(user) {
                        sv.log_service_error("pause", &e);
                        return Stop::PauseFailed;
                    }
                }
                continue;
            }
            Ok(exit) => {
                complete = false;
                sv.control.count_exit();
                exit
            }
            Err(Errno::EAGAIN) => continue,
            Err(e) => {
                error!("vcpu {id}: KVM_RUN failed: {e}");
                return Stop::RunFailed(e);
            }
        };
        match sv.on_exit(exit) {
            Next::Continue { known } => {
                // An unknown exit that repeats without end would spin: give up.
                unknown_exits = if known { 0 } else { unknown_exits + 1 };
                if unknown_exits > limits::MAX_CONSECUTIVE_UNKNOWN_EXITS {
                    error!("vcpu {id}: too many consecutive unhandled exits");
                    return Stop::TooManyUnknownExits;
                }
            }
            Next::Stop(stop) => return stop,
        }
    }
}

impl<V: Vcpu, I: VcpuIo> Servicer<V, I> {
    /// Routes one exit (anything but [`VmExit::Interrupted`]).
    fn on_exit(&mut self, exit: VmExit<'_>) -> Next {
        let id = self.id;
        // Coalesced writes precede this exit in guest order: they reach the
        // plugin first (docs/protocol-extensions.md §4.4). A write exit
        // delivers them itself, so that a write that found the ring full
        // goes in the same batch.
        if self.coalescing() {
            self.collect_coalesced();
            if !matches!(exit, VmExit::IoOut { .. } | VmExit::MmioWrite { .. }) {
                self.flush_coalesced();
            }
        }
        match exit {
            VmExit::IoOut { port, data } => self.on_write(Space::Ioport, u64::from(port), data),
            VmExit::IoIn { port, data } => self.on_read(Space::Ioport, u64::from(port), data),
            VmExit::MmioWrite { address, data } => self.on_write(Space::Mmio, address, data),
            VmExit::MmioRead { address, data } => self.on_read(Space::Mmio, address, data),
            VmExit::HypervHcall {
                input,
                params,
                result,
            } => *result = self.on_hypercall(input, params),
            VmExit::HypervSynic {
                msr,
                control,
                evt_page,
                msg_page,
            } => self.on_synic(msr, control, evt_page, msg_page),
            VmExit::HypervUnknown(other) => {
                error!("vcpu {id}: unknown Hyper-V exit type {other}");
                return Next::Stop(Stop::UnknownHypervExit);
            }
            VmExit::Hlt => {
                info!("vcpu {id}: guest halted");
                return Next::Stop(Stop::Halted);
            }
            VmExit::Shutdown => {
                info!("vcpu {id}: guest shut down (triple fault)");
                return Next::Stop(Stop::GuestShutdown);
            }
            VmExit::InternalError {
                suberror,
                ndata,
                data,
            } => {
                let n = (ndata as usize).min(data.len());
                let rip = self
                    .vcpu
                    .get_state(VcpuStateKind::Regs)
                    .ok()
                    .and_then(|image| kvm_bindings::kvm_regs::read_from_bytes(&image).ok())
                    .map_or_else(
                        || "at an unknown rip".to_string(),
                        |r| format!("at rip {:#x}", r.rip),
                    );
                let words: Vec<String> = data[..n].iter().map(|d| format!("{d:#x}")).collect();
                let message = format!(
                    "KVM internal error (suberror {suberror}: {}) {rip}, exit data [{}]",
                    internal_suberror(suberror),
                    words.join(", ")
                );
                error!("vcpu {id}: {message}");
                self.set_failure(message);
                return Next::Stop(Stop::InternalError);
            }
            VmExit::FailEntry {
                hardware_reason,
                cpu,
            } => {
                let message =
                    format!("VM entry failed (hardware reason {hardware_reason:#x}, cpu {cpu})");
                error!("vcpu {id}: {message}");
                self.set_failure(message);
                return Next::Stop(Stop::FailEntry);
            }
            VmExit::Spurious | VmExit::Interrupted => {}
            VmExit::Unknown(reason) => {
                warn!("vcpu {id}: unhandled exit (reason {reason})");
                return Next::Continue { known: false };
            }
        }
        Next::Continue { known: true }
    }

    /// A Hyper-V hypercall: delivered to the plugin; returns the result the
    /// guest gets (0 when servicing failed or the reply is malformed).
    fn on_hypercall(&mut self, input: u64, params: [u64; 2]) -> u64 {
        let mut c = vcpu_response::wait::HypervCall::new();
        c.input = input;
        c.params0 = params[0];
        c.params1 = params[1];
        let mut w = vcpu_response::Wait::new();
        w.set_hyperv_call(c);
        match self.deliver(w, WaitKind::Hypercall) {
            Ok(()) => hcall_result(Some(&self.resume_data)),
            Err(e) => {
                self.log_service_error("hypercall", &e);
                0
            }
        }
    }

    /// A SynIC MSR write: delivered to the plugin.
    fn on_synic(&mut self, msr: u32, control: u64, evt_page: u64, msg_page: u64) {
        let mut s = vcpu_response::wait::HypervSynic::new();
        s.msr = msr;
        s.control = control;
        s.evt_page = evt_page;
        s.msg_page = msg_page;
        let mut w = vcpu_response::Wait::new();
        w.set_hyperv_synic(s);
        if let Err(e) = self.deliver(w, WaitKind::Synic) {
            self.log_service_error("synic", &e);
        }
    }
}

/// The meaning of a `KVM_EXIT_INTERNAL_ERROR` suberror (linux/kvm.h).
fn internal_suberror(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "event delivery failed",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    }
}
