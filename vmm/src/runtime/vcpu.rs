//! Vcpu threads: servicing the plugin on the vcpu channel and the channel's
//! two transports (this file), exit routing and the run loop (`exits`), the
//! kick signal (`kick`) and the start barrier (`barrier`).
//!
//! The servicing state machine (docs/wire-protocol.md §8.2) is the plain function
//! [`handle_request`] over a [`Vcpu`], so it can be unit-tested and fuzzed; the
//! thread around it only does I/O.
//!
//! Stopping a vcpu thread: the main thread sets the kill flag and sends the
//! kick signal. The handler sets `immediate_exit` in the thread's `kvm_run`
//! (so a `KVM_RUN` about to start returns at once) and, being installed
//! without `SA_RESTART`, interrupts a blocking pipe read or write. This works in
//! every phase, Init included (quirk 14 of docs/differences-from-crosvm.md).
//!
//! Pausing a vcpu from the control socket (host pause, distinct from the
//! plugin's `PauseVcpus`): the main thread sets the vcpu's host-pause bit
//! and kicks it. Before every `KVM_RUN` the thread looks at its pause bits
//! (one acquire load, the same one that finds a plugin pause) and parks on a
//! condvar while the host-pause bit is set. The kick handler counts kicks:
//! once the count passes the value read after the bit was set, the thread
//! is out of the guest (a vcpu serving an exit with the plugin parks
//! before its next `KVM_RUN`, which `immediate_exit` cuts short).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use plugin_proto::cpuid;
use plugin_proto::protobuf::Message;
use plugin_proto::{vcpu_request, vcpu_response, VcpuRequest, VcpuResponse};
use vmm_sys_util::eventfd::EventFd;

mod barrier;
pub mod diag;
mod exits;
mod kick;

pub use barrier::StartBarrier;
pub use exits::{run_loop, run_thread, run_vcpu, stop_reason, Servicer, Stop};
pub use kick::{install_kick_handler, kick_signal};

use super::objects::SharedExitConfig;
use crate::exit_codec;
use crate::vm::{CoalescedRing, Cpuid, Space, Vcpu, VcpuStateKind};
use crate::{limits, record};

/// Most bytes of a port read forwarded to the plugin (string `IN`).
const MAX_IO_READ: usize = 256;
/// Most bytes of a write forwarded to the plugin.
const MAX_IO_WRITE: usize = 8;

/// Per-vcpu state the main thread acts on. Exists from startup, so a pause
/// requested before the vcpu threads exist is kept, not dropped.
///
/// Two kinds of pause: the plugin's (`PauseVcpus`: a `User` wait reason
/// delivered to the plugin) and the host's (the control socket's `pause`:
/// the thread parks before its next `KVM_RUN` until resumed). Both are bits
/// of one atomic, so the run loop's check before every `KVM_RUN` stays one
/// acquire load.
#[derive(Default)]
pub struct VcpuControl {
    pending_pause: Mutex<Option<u64>>,
    /// [`PLUGIN_PAUSE`] | [`HOST_PAUSE`].
    pending: AtomicU8,
    /// Whether the thread is parked (host pause), under its condvar.
    parked: Mutex<bool>,
    unpark: Condvar,
    /// Kick signals this thread has handled (the kick handler counts them).
    kicks: AtomicU64,
    /// Exits of the guest so far (written by the vcpu thread only).
    exits: AtomicU64,
    /// The thread's id (0 until it runs).
    tid: AtomicI32,
    /// Why the vcpu's run ended, once it did.
    stop: Mutex<Option<String>>,
    /// The exit the vcpu waits on the plugin for (stuck detection).
    pub watch: diag::WaitWatch,
    /// Hot restart: the channel of the plugin that replaces the current
    /// one (docs/protocol-extensions.md §9, `runtime/restart.rs`).
    pub relink: crate::runtime::restart::Relink,
}

/// A plugin pause is pending.
const PLUGIN_PAUSE: u8 = 1;
/// The host paused the vcpu.
const HOST_PAUSE: u8 = 2;

/// How often a parked vcpu re-checks the kill flag by itself (the main
/// thread also wakes it).
const PARK_RECHECK: Duration = Duration::from_millis(100);

impl VcpuControl {
    /// Records a pause; a newer value overwrites an unserviced older one.
    pub fn request_pause(&self, user: u64) {
        let mut p = self.pending_pause.lock().unwrap_or_else(|p| p.into_inner());
        *p = Some(user);
        self.pending.fetch_or(PLUGIN_PAUSE, Ordering::Release);
    }

    fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) != 0
    }

    fn take_pause(&self) -> Option<u64> {
        let mut p = self.pending_pause.lock().unwrap_or_else(|p| p.into_inner());
        self.pending.fetch_and(!PLUGIN_PAUSE, Ordering::Release);
        p.take()
    }

    /// Host-pauses the vcpu: it parks before its next `KVM_RUN`. The
    /// caller then kicks the thread out of the guest. Sequentially
    /// consistent with the kick counter (see [`Self::kicks`]).
    pub fn host_pause(&self) {
        self.pending.fetch_or(HOST_PAUSE, Ordering::SeqCst);
    }

    /// Lets a host-paused vcpu go.
    pub fn host_resume(&self) {
        let g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        self.pending.fetch_and(!HOST_PAUSE, Ordering::SeqCst);
        drop(g);
        self.unpark.notify_all();
    }

    pub fn is_host_paused(&self) -> bool {
        self.pending.load(Ordering::Acquire) & HOST_PAUSE != 0
    }

    /// Whether the thread is parked now.
    pub fn is_parked(&self) -> bool {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kick signals handled so far. A kick handled after [`Self::host_pause`]
    /// (the count grew past a value read after it) guarantees the thread
    /// is out of the guest and parks before it enters it again: the
    /// handler set `immediate_exit`, and the thread checks the pause bits
    /// before every `KVM_RUN`.
    pub fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::SeqCst)
    }

    pub(super) fn kicks_ptr(&self) -> *const AtomicU64 {
        &self.kicks
    }

    /// Wakes a parked thread (to see the kill flag).
    pub fn wake(&self) {
        let g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        drop(g);
        self.unpark.notify_all();
    }

    /// Guest exits taken so far.
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// The vcpu thread's id (0 before it runs).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Acquire)
    }

    /// Why the vcpu's run ended (`None` while it runs).
    pub fn stop_reason(&self) -> Option<String> {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_stop_reason(&self, why: String) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    pub(crate) fn set_tid(&self, tid: i32) {
        self.tid.store(tid, Ordering::Release);
    }

    /// One more exit: a plain load and store (this thread is the only
    /// writer), no locked instruction on the exit path.
    #[inline]
    fn count_exit(&self) {
        self.exits
            .store(self.exits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Parks while host-paused (and not `kill`ed); true if it parked.
    fn park(&self, kill: &AtomicBool) -> bool {
        let mut g = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if self.pending.load(Ordering::Acquire) & HOST_PAUSE == 0 {
            return false;
        }
        *g = true;
        while self.pending.load(Ordering::Acquire) & HOST_PAUSE != 0
            && !kill.load(Ordering::Acquire)
        {
            g = self
                .unpark
                .wait_timeout(g, PARK_RECHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *g = false;
        true
    }
}

/// State shared by all vcpu threads and the main thread.
pub struct VcpuShared {
    pub kill: AtomicBool,
    pub barrier: StartBarrier,
    pub exit_config: Arc<SharedExitConfig>,
    /// Signalled whenever a vcpu thread ends.
    pub exited: EventFd,
    /// The first vcpu failure that stops the VM and fails the run (vcpu id,
    /// cause), reported once by the main loop.
    pub failure: std::sync::Mutex<Option<(u32, String)>>,
    /// Unreserved addresses the guest accessed that were logged.
    pub unreserved: diag::UnreservedLog,
    /// The VM's coalesced-write ring (docs/protocol-extensions.md §4), set
    /// before the vcpu threads start; the lock makes one vcpu at a time its
    /// consumer and is held only while entries are taken out, never across
    /// an exit or a channel write.
    pub coalesced: Mutex<Option<Box<dyn CoalescedRing>>>,
}

/// The host's ends of one vcpu channel (the plugin's ends are kept by the
/// main loop for `GetVcpus`).
pub struct HostChannel {
    pub request_read: OwnedFd,
    pub response_write: OwnedFd,
}

/// What servicing one request leads to.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Send this reply and keep servicing.
    Reply(VcpuResponse),
    /// Leave servicing and re-enter the guest.
    Resume(vcpu_request::Resume),
    /// Stop servicing at once, without a reply.
    Shutdown,
}

fn errno_reply(e: Errno) -> VcpuResponse {
    let mut r = VcpuResponse::new();
    r.errno = e as i32;
    r
}

/// The vcpu servicing state machine for one request. `init_pending` is true
/// while the Init wait reason has not been delivered.
pub fn handle_request(vcpu: &impl Vcpu, init_pending: &mut bool, req: VcpuRequest) -> Action {
    use vcpu_request::Message as Q;
    if *init_pending {
        return match req.message {
            Some(Q::Wait(_)) => {
                *init_pending = false;
                let mut w = vcpu_response::Wait::new();
                w.set_init(Default::default());
                let mut r = VcpuResponse::new();
                r.set_wait(w);
                Action::Reply(r)
            }
            _ => Action::Reply(errno_reply(Errno::EPROTO)),
        };
    }
    let Some(msg) = req.message else {
        return Action::Reply(errno_reply(Errno::ENOTTY));
    };
    let mut r = VcpuResponse::new();
    let result: Result<(), Errno> = match msg {
        Q::Wait(_) => Err(Errno::EPROTO),
        Q::Resume(resume) => return Action::Resume(resume),
        Q::Shutdown(_) => return Action::Shutdown,
        Q::GetState(g) => {
            r.set_get_state(Default::default());
            VcpuStateKind::from_wire(g.set.value())
                .ok_or(Errno::EINVAL)
                .and_then(|set| vcpu.get_state(set))
                .map(|image| r.mut_get_state().state = image)
        }
        Q::SetState(s) => {
            r.set_set_state(Default::default());
            match VcpuStateKind::from_wire(s.set.value()) {
                Some(set) if s.state.len() == set.size() => vcpu.set_state(set, &s.state),
                _ => Err(Errno::EINVAL),
            }
        }
        Q::GetMsrs(g) => {
            r.set_get_msrs(Default::default());
            if g.entry_indices.len() > limits::MAX_MSR_ENTRIES {
                Err(Errno::E2BIG)
            } else {
                vcpu.get_msrs(&g.entry_indices)
                    .map(|data| r.mut_get_msrs().entry_data = data)
            }
        }
        Q::SetMsrs(s) => {
            r.set_set_msrs(Default::default());
            if s.entries.len() > limits::MAX_MSR_ENTRIES {
                Err(Errno::E2BIG)
            } else {
                let entries: Vec<(u32, u64)> =
                    s.entries.iter().map(|e| (e.index, e.data)).collect();
                vcpu.set_msrs(&entries)
            }
        }
        Q::SetCpuid(s) => {
            r.set_set_cpuid(Default::default());
            if s.entries.len() > limits::MAX_CPUID_ENTRIES {
                Err(Errno::E2BIG)
            } else {
                let entries: Vec<Cpuid> = s
                    .entries
                    .iter()
                    .map(|e| cpuid::from_wire(e, cpuid::Side::Host))
                    .collect();
                vcpu.set_cpuid(&entries)
            }
        }
        Q::GetHypervCpuid(_) => {
            r.set_get_hyperv_cpuid(Default::default());
            vcpu.get_hyperv_cpuid().map(|entries| {
                r.mut_get_hyperv_cpuid().entries = entries
                    .iter()
                    .map(|c| cpuid::to_wire(c, cpuid::Side::Host))
                    .collect()
            })
        }
        Q::EnableCapability(c) => {
            r.set_enable_capability(Default::default());
            vcpu.enable_capability(c.capability)
        }
        _ => Err(Errno::ENOTTY),
    };
    if let Err(e) = result {
        r.errno = e as i32;
    }
    Action::Reply(r)
}

/// Applies the deferred register images of a `Resume` (regs, sregs,
/// debugregs, in that order). Empty images mean "no change".
pub fn apply_deferred_registers(
    vcpu: &impl Vcpu,
    regs: &[u8],
    sregs: &[u8],
    debugregs: &[u8],
) -> Result<(), Errno> {
    for (set, image) in [
        (VcpuStateKind::Regs, regs),
        (VcpuStateKind::Sregs, sregs),
        (VcpuStateKind::Debugregs, debugregs),
    ] {
        if image.is_empty() {
            continue;
        }
        if image.len() != set.size() {
            return Err(Errno::EINVAL);
        }
        vcpu.set_state(set, image)?;
    }
    Ok(())
}

/// Why servicing the plugin ended without a `Resume`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the vcpu is being stopped")]
    Killed,
    #[error("the plugin sent Shutdown")]
    Shutdown,
    #[error("reading the vcpu request pipe failed")]
    Read(#[source] Errno),
    #[error("the vcpu request pipe was closed")]
    Closed,
    #[error("writing the vcpu response pipe failed")]
    Write(#[source] Errno),
    #[error("undecodable vcpu request")]
    Decode(#[source] plugin_proto::protobuf::Error),
    #[error("malformed vcpu request")]
    Malformed(#[source] plugin_proto::framing::FramingError),
    #[error("applying deferred registers on resume failed")]
    DeferredRegisters(#[source] Errno),
    #[error("the fast vcpu channel failed")]
    FastChannel(#[source] plugin_proto::shm::ShmError),
}

/// `VcpuRequest.get_msrs`: its packed `entry_indices` is checked before
/// decoding (see [`plugin_proto::framing::check_lengths`]).
const GET_MSRS_FIELD: u64 = 5;

/// Decodes one bare request as read from the request pipe. A truncated
/// request, or one whose length prefixes claim more than it holds, is
/// undecodable.
pub fn decode_request(bytes: &[u8]) -> Result<VcpuRequest, ServiceError> {
    plugin_proto::framing::check_lengths(bytes, &[GET_MSRS_FIELD])
        .map_err(ServiceError::Malformed)?;
    VcpuRequest::parse_from_bytes(bytes).map_err(ServiceError::Decode)
}

/// The byte transport of one vcpu channel as the servicing loop sees it: the
/// pipes or the shared-memory channel on a real host, memory in tests and
/// fuzzing.
pub trait VcpuIo {
    /// Blocks for the next request of the plugin and returns its bytes
    /// (valid until the next call).
    fn read_request(&mut self) -> Result<&[u8], ServiceError>;
    /// Sends one serialized response; the transport adds its framing.
    fn write_response(&mut self, body: &[u8]) -> Result<(), ServiceError>;
    /// Sends an unsolicited wait reason (an exit); `needs_resume` when the
    /// vcpu now waits for the plugin's `Resume` (hot restart re-delivers
    /// it to a replacing plugin, docs/protocol-extensions.md §9).
    fn write_event(&mut self, body: &[u8], needs_resume: bool) -> Result<(), ServiceError> {
        let _ = needs_resume;
        self.write_response(body)
    }
    /// The vcpu left a host pause with complete state: the moment to take
    /// up a replacing plugin's channel (hot restart).
    fn unparked(&mut self) {}
    /// A guest access exited to the host; `range` is the reserved range
    /// (start, length) that took it (`--stats`).
    fn note_exit(&mut self, space: Space, range: Option<(u64, u64)>) {
        let _ = (space, range);
    }
    /// The vcpu was kicked: a moment to publish its statistics so far
    /// (the control socket's live `stats`).
    fn publish_stats(&mut self) {}
}

/// Services the plugin until `Resume` (docs/wire-protocol.md §8.2). With `init`,
/// the Init reason is pending and must be asked for with `Wait` first. The
/// deferred registers of the `Resume` are applied and its data is left in
/// `resume_data`.
pub fn service(
    vcpu: &impl Vcpu,
    io: &mut impl VcpuIo,
    init: bool,
    resume_data: &mut Vec<u8>,
) -> Result<(), ServiceError> {
    let mut init_pending = init;
    loop {
        let bytes = io.read_request()?;
        // The common case, decoded without allocating; it means exactly what
        // `handle_request` would make of it.
        if !init_pending {
            if let Some(resume) = exit_codec::parse_resume(bytes) {
                apply_deferred_registers(vcpu, resume.regs, resume.sregs, resume.debugregs)
                    .map_err(ServiceError::DeferredRegisters)?;
                resume_data.clear();
                resume_data.extend_from_slice(resume.data);
                return Ok(());
            }
        }
        let req = decode_request(bytes)?;
        match handle_request(vcpu, &mut init_pending, req) {
            Action::Reply(r) => send_response(io, &r)?,
            Action::Resume(resume) => {
                apply_deferred_registers(vcpu, &resume.regs, &resume.sregs, &resume.debugregs)
                    .map_err(ServiceError::DeferredRegisters)?;
                *resume_data = resume.data;
                return Ok(());
            }
            Action::Shutdown => return Err(ServiceError::Shutdown),
        }
    }
}

/// Serializes and sends one response (replies and rare events; the exit
/// path uses [`deliver_io`]).
pub fn send_response(io: &mut impl VcpuIo, msg: &VcpuResponse) -> Result<(), ServiceError> {
    let body = msg
        .write_to_bytes()
        .map_err(|_| ServiceError::Write(Errno::EINVAL))?;
    io.write_response(&body)
}

/// Sends an unsolicited wait reason and, unless it is a posted write
/// (`needs_resume` false), services the plugin until `Resume`. Returns
/// whether it resumed (then its data is in `resume_data`).
pub fn deliver(
    vcpu: &impl Vcpu,
    io: &mut impl VcpuIo,
    wait: vcpu_response::Wait,
    needs_resume: bool,
    resume_data: &mut Vec<u8>,
) -> Result<bool, ServiceError> {
    let mut r = VcpuResponse::new();
    r.set_wait(wait);
    let body = r
        .write_to_bytes()
        .map_err(|_| ServiceError::Write(Errno::EINVAL))?;
    io.write_event(&body, needs_resume)?;
    if !needs_resume {
        return Ok(false);
    }
    service(vcpu, io, false, resume_data).map(|()| true)
}

/// [`deliver`] for an `Io` event, on the exit path: encoded into `scratch`
/// without building protobuf messages.
pub fn deliver_io(
    vcpu: &impl Vcpu,
    io: &mut impl VcpuIo,
    event: &exit_codec::IoEvent<'_>,
    scratch: &mut Vec<u8>,
    resume_data: &mut Vec<u8>,
) -> Result<bool, ServiceError> {
    scratch.clear();
    exit_codec::encode_io_event(scratch, event);
    io.write_event(scratch, !event.no_resume)?;
    if event.no_resume {
        return Ok(false);
    }
    service(vcpu, io, false, resume_data).map(|()| true)
}

/// Completes a guest read from the plugin's resume data: the first bytes
/// come from `reply`, everything it does not cover reads as zero (a short
/// reply crashed the reference host; quirk 6 of
/// docs/differences-from-crosvm.md).
pub fn complete_read(data: &mut [u8], reply: Option<&[u8]>) {
    data.fill(0);
    if let Some(reply) = reply {
        let n = reply.len().min(data.len());
        data[..n].copy_from_slice(&reply[..n]);
    }
}

/// The hypercall result carried by resume data: exactly 8 little-endian
/// bytes, anything else reads as 0 (docs/wire-protocol.md §8.6).
pub fn hcall_result(reply: Option<&[u8]>) -> u64 {
    reply
        .and_then(|d| <[u8; 8]>::try_from(d).ok())
        .map_or(0, u64::from_le_bytes)
}

/// The `Io` wait reason for a guest access (without eager registers). Write
/// data is cut to 8 bytes, read buffers to 256 (docs/host-behaviour.md §11.3).
pub fn io_wait(
    space: Space,
    address: u64,
    is_write: bool,
    data: &[u8],
    no_resume: bool,
) -> vcpu_response::wait::Io {
    let max = if is_write { MAX_IO_WRITE } else { MAX_IO_READ };
    let mut io = vcpu_response::wait::Io::new();
    io.space = plugin_proto::protobuf::EnumOrUnknown::from_i32(space.to_wire());
    io.address = address;
    io.is_write = is_write;
    io.no_resume = no_resume;
    io.data = data[..data.len().min(max)].to_vec();
    io
}

/// How a vcpu thread talks to the plugin.
pub enum Transport {
    /// The crosvm pipes: bare requests in, varint-delimited responses out.
    Pipe(Arc<HostChannel>),
    /// The shared-memory fast channel (protocol extension).
    Shm(plugin_proto::shm::ShmChannel),
}

fn shm_error(e: plugin_proto::shm::ShmError) -> ServiceError {
    match e {
        plugin_proto::shm::ShmError::Aborted => ServiceError::Killed,
        e => ServiceError::FastChannel(e),
    }
}

/// One vcpu channel of a real host, either transport.
pub struct ChannelIo {
    id: u32,
    transport: Transport,
    shared: Arc<VcpuShared>,
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
    /// `--trace` and `--stats` of this channel.
    pub tap: crate::trace::VcpuTap,
    /// Hot restart: where a replacing plugin's channel arrives.
    pub(crate) control: Arc<VcpuControl>,
    /// The last exit sent that waits for a `Resume` (re-delivered to a
    /// plugin that replaces a crashed one).
    pending: Vec<u8>,
    has_pending: bool,
}

impl ChannelIo {
    pub(crate) fn new(
        id: u32,
        transport: Transport,
        shared: Arc<VcpuShared>,
        control: Arc<VcpuControl>,
    ) -> Self {
        let read_buf = match transport {
            Transport::Pipe(_) => vec![0; plugin_proto::framing::MAX_MESSAGE_SIZE],
            Transport::Shm(_) => Vec::new(),
        };
        ChannelIo {
            id,
            transport,
            shared,
            read_buf,
            write_buf: Vec::with_capacity(512),
            tap: crate::trace::VcpuTap::new(id),
            control,
            pending: Vec::with_capacity(512),
            has_pending: false,
        }
    }

    fn set_transport(&mut self, transport: Transport) {
        match transport {
            Transport::Pipe(_) => {
                if self.read_buf.len() < plugin_proto::framing::MAX_MESSAGE_SIZE {
                    self.read_buf = vec![0; plugin_proto::framing::MAX_MESSAGE_SIZE];
                }
            }
            Transport::Shm(_) => self.read_buf = Vec::new(),
        }
        self.transport = transport;
    }

    /// One request's length (its bytes in `read_buf` or the shm channel).
    fn try_read(&mut self) -> Result<usize, ServiceError> {
        let kill = &self.shared.kill;
        let relink = &self.control.relink;
        match &mut self.transport {
            Transport::Pipe(channel) => loop {
                if kill.load(Ordering::Acquire) {
                    return Err(ServiceError::Killed);
                }
                match nix::unistd::read(channel.request_read.as_fd(), &mut self.read_buf) {
                    Ok(0) => return Err(ServiceError::Closed),
                    Ok(n) => return Ok(n),
                    Err(Errno::EINTR) if relink.detached() => return Err(ServiceError::Closed),
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(ServiceError::Read(e)),
                }
            },
            Transport::Shm(channel) => {
                let mut killed = || kill.load(Ordering::Acquire) || relink.detached();
                channel
                    .recv(&mut killed)
                    .map(|b| b.len())
                    .map_err(shm_error)
            }
        }
    }

    /// The plugin went while this vcpu waited for it: takes up the new
    /// plugin's channel and re-sends the exit it waited on
    /// (docs/protocol-extensions.md §9).
    fn relink_waiting(&mut self) -> Result<(), ServiceError> {
        let t = self
            .control
            .relink
            .wait_channel(&self.shared.kill, self.has_pending)?;
        self.set_transport(t);
        if self.has_pending {
            let body = std::mem::take(&mut self.pending);
            let r = self.write_response(&body);
            self.pending = body;
            r?;
        }
        Ok(())
    }
}

impl VcpuIo for ChannelIo {
    fn write_event(&mut self, body: &[u8], needs_resume: bool) -> Result<(), ServiceError> {
        // A copy of the exit for a replacing plugin (a few dozen bytes).
        self.has_pending = needs_resume;
        if needs_resume {
            self.pending.clear();
            self.pending.extend_from_slice(body);
            self.control.relink.count_delivered();
        }
        self.write_response(body)
    }

    fn unparked(&mut self) {
        if let Some(t) = self.control.relink.take() {
            self.has_pending = false;
            self.set_transport(t);
        }
    }

    fn read_request(&mut self) -> Result<&[u8], ServiceError> {
        // Hot restart: the plugin died while this vcpu waited for it; take
        // up the replacing plugin's channel (re-sending the pending exit)
        // and read from that.
        let len = loop {
            match self.try_read() {
                Ok(n) => break n,
                Err(ServiceError::Killed | ServiceError::Closed)
                    if self.control.relink.detached()
                        && !self.shared.kill.load(Ordering::Acquire) =>
                {
                    self.relink_waiting()?;
                }
                Err(e) => return Err(e),
            }
        };
        let bytes: &[u8] = match &mut self.transport {
            Transport::Pipe(_) => &self.read_buf[..len],
            Transport::Shm(channel) => channel.received(),
        };
        if let Some(r) = record::recorder() {
            r.vcpu_request(self.id, bytes);
        }
        self.tap.request(bytes);
        Ok(bytes)
    }

    fn note_exit(&mut self, space: Space, range: Option<(u64, u64)>) {
        self.tap.exit(space, range);
    }

    fn publish_stats(&mut self) {
        if crate::trace::enabled() & crate::trace::STATS != 0 {
            crate::stats::publish(self.id, self.tap.stats());
        }
    }

    fn write_response(&mut self, body: &[u8]) -> Result<(), ServiceError> {
        self.tap.response(body);
        let kill = &self.shared.kill;
        match &mut self.transport {
            Transport::Pipe(channel) => {
                // Prefix and message in one write(), so the reader never sees
                // half a frame.
                self.write_buf.clear();
                exit_codec::put_varint(&mut self.write_buf, body.len() as u64);
                self.write_buf.extend_from_slice(body);
                let mut off = 0;
                while off < self.write_buf.len() {
                    if kill.load(Ordering::Acquire) {
                        return Err(ServiceError::Killed);
                    }
                    match nix::unistd::write(channel.response_write.as_fd(), &self.write_buf[off..])
                    {
                        Ok(n) => off += n,
                        Err(Errno::EINTR) => continue,
                        Err(e) => return Err(ServiceError::Write(e)),
                    }
                }
                Ok(())
            }
            Transport::Shm(channel) => {
                let mut killed = || kill.load(Ordering::Acquire);
                channel.send(body, &mut killed).map_err(shm_error)
            }
        }
    }
}
