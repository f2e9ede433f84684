//! Vcpu threads: the `KVM_RUN` loop, exit routing, and servicing the plugin
//! on the vcpu channel.
//!
//! The servicing state machine (wire-protocol.md §8.2) is the plain function
//! [`handle_request`] over a [`Vcpu`], so it can be unit-tested and fuzzed; the
//! thread around it only does I/O.
//!
//! Stopping a vcpu thread: the main thread sets the kill flag and sends the
//! kick signal. The handler sets `immediate_exit` in the thread's `kvm_run`
//! (so a `KVM_RUN` about to start returns at once) and, being installed
//! without `SA_RESTART`, interrupts a blocking pipe read or write. This works in
//! every phase, Init included (host-behaviour.md quirk 14).

use std::cell::Cell;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_ioctls::VcpuFd;
use log::{debug, error, info, warn};
use nix::errno::Errno;
use plugin_proto::cpuid;
use plugin_proto::protobuf::Message;
use plugin_proto::{vcpu_request, vcpu_response, VcpuRequest, VcpuResponse};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::FromBytes;

use super::fastpath;
use super::objects::{ExitConfigReader, SharedExitConfig};
use crate::vm::{Cpuid, Space, Vcpu, VcpuRun, VcpuState, VmExit};
use crate::{limits, record};

/// Most bytes of a port read forwarded to the plugin (string `IN`).
const MAX_IO_READ: usize = 256;
/// Most bytes of a write forwarded to the plugin.
const MAX_IO_WRITE: usize = 8;

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is set by this thread to its own kvm_run mapping
        // and cleared before that mapping is dropped; a volatile byte store is
        // async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

/// The signal used to kick vcpu threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), Errno> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| Errno::from_raw(e.errno()))
}

/// A start barrier that can be cancelled, so a failed start never leaves
/// threads waiting forever.
pub struct StartBarrier {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

impl StartBarrier {
    pub fn new(n: usize) -> Self {
        StartBarrier {
            state: Mutex::new((n, false)),
            cv: Condvar::new(),
        }
    }

    /// Waits until all parties arrived (true) or the barrier was cancelled.
    pub fn wait(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(1);
        if st.0 == 0 {
            self.cv.notify_all();
        }
        while st.0 > 0 && !st.1 {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        !st.1
    }

    pub fn cancel(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = true;
        self.cv.notify_all();
    }
}

/// Per-vcpu state the main thread acts on. Exists from startup, so a pause
/// requested before the vcpu threads exist is kept, not dropped.
#[derive(Default)]
pub struct VcpuControl {
    pending_pause: Mutex<Option<u64>>,
    has_pending: AtomicBool,
}

impl VcpuControl {
    /// Records a pause; a newer value overwrites an unserviced older one.
    pub fn request_pause(&self, user: u64) {
        let mut p = self.pending_pause.lock().unwrap_or_else(|p| p.into_inner());
        *p = Some(user);
        self.has_pending.store(true, Ordering::Release);
    }

    fn has_pending(&self) -> bool {
        self.has_pending.load(Ordering::Acquire)
    }

    fn take_pause(&self) -> Option<u64> {
        let mut p = self.pending_pause.lock().unwrap_or_else(|p| p.into_inner());
        self.has_pending.store(false, Ordering::Release);
        p.take()
    }
}

/// State shared by all vcpu threads and the main thread.
pub struct VcpuShared {
    pub kill: AtomicBool,
    pub barrier: StartBarrier,
    pub exit_config: Arc<SharedExitConfig>,
    /// Signalled whenever a vcpu thread ends.
    pub exited: EventFd,
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
            VcpuState::from_wire(g.set.value())
                .ok_or(Errno::EINVAL)
                .and_then(|set| vcpu.get_state(set))
                .map(|image| r.mut_get_state().state = image)
        }
        Q::SetState(s) => {
            r.set_set_state(Default::default());
            match VcpuState::from_wire(s.set.value()) {
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
        (VcpuState::Regs, regs),
        (VcpuState::Sregs, sregs),
        (VcpuState::Debugregs, debugregs),
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
}

/// Services the plugin until `Resume` (wire-protocol.md §8.2). With `init`,
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
            if let Some(resume) = fastpath::parse_resume(bytes) {
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
    send_response(io, &r)?;
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
    event: &fastpath::IoEvent<'_>,
    scratch: &mut Vec<u8>,
    resume_data: &mut Vec<u8>,
) -> Result<bool, ServiceError> {
    scratch.clear();
    fastpath::encode_io_event(scratch, event);
    io.write_response(scratch)?;
    if event.no_resume {
        return Ok(false);
    }
    service(vcpu, io, false, resume_data).map(|()| true)
}

/// Completes a guest read from the plugin's resume data: the first bytes
/// come from `reply`, everything it does not cover reads as zero (a short
/// reply crashed the reference host; spec quirk 6).
pub fn complete_read(data: &mut [u8], reply: Option<&[u8]>) {
    data.fill(0);
    if let Some(reply) = reply {
        let n = reply.len().min(data.len());
        data[..n].copy_from_slice(&reply[..n]);
    }
}

/// The hypercall result carried by resume data: exactly 8 little-endian
/// bytes, anything else reads as 0 (wire-protocol.md §8.6).
pub fn hcall_result(reply: Option<&[u8]>) -> u64 {
    reply
        .and_then(|d| <[u8; 8]>::try_from(d).ok())
        .map_or(0, u64::from_le_bytes)
}

/// The `Io` wait reason for a guest access (without eager registers). Write
/// data is cut to 8 bytes, read buffers to 256 (host-behaviour.md §11.3).
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
}

impl VcpuIo for ChannelIo {
    fn read_request(&mut self) -> Result<&[u8], ServiceError> {
        let kill = &self.shared.kill;
        let bytes: &[u8] = match &mut self.transport {
            Transport::Pipe(channel) => {
                let n = loop {
                    if kill.load(Ordering::Acquire) {
                        return Err(ServiceError::Killed);
                    }
                    match nix::unistd::read(channel.request_read.as_fd(), &mut self.read_buf) {
                        Ok(0) => return Err(ServiceError::Closed),
                        Ok(n) => break n,
                        Err(Errno::EINTR) => continue,
                        Err(e) => return Err(ServiceError::Read(e)),
                    }
                };
                &self.read_buf[..n]
            }
            Transport::Shm(channel) => {
                let mut killed = || kill.load(Ordering::Acquire);
                channel.recv(&mut killed).map_err(shm_error)?
            }
        };
        if let Some(r) = record::recorder() {
            r.vcpu_request(self.id, bytes);
        }
        Ok(bytes)
    }

    fn write_response(&mut self, body: &[u8]) -> Result<(), ServiceError> {
        let kill = &self.shared.kill;
        match &mut self.transport {
            Transport::Pipe(channel) => {
                // Prefix and message in one write(), so the reader never sees
                // half a frame.
                self.write_buf.clear();
                fastpath::put_varint(&mut self.write_buf, body.len() as u64);
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
}

impl<V: Vcpu> Servicer<V, ChannelIo> {
    /// A servicer on a real vcpu channel.
    pub fn new(
        id: u32,
        vcpu: V,
        transport: Transport,
        control: Arc<VcpuControl>,
        shared: Arc<VcpuShared>,
    ) -> Self {
        let read_buf = match transport {
            Transport::Pipe(_) => vec![0; plugin_proto::framing::MAX_MESSAGE_SIZE],
            Transport::Shm(_) => Vec::new(),
        };
        let io = ChannelIo {
            id,
            transport,
            shared: Arc::clone(&shared),
            read_buf,
            write_buf: Vec::with_capacity(512),
        };
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
    fn deliver(&mut self, wait: vcpu_response::Wait) -> Result<(), ServiceError> {
        if let Some(r) = record::recorder() {
            r.vcpu_exit(self.id, &wait);
        }
        deliver(&self.vcpu, &mut self.io, wait, true, &mut self.resume_data).map(drop)
    }

    fn log_service_error(&self, what: &str, e: &ServiceError) {
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
        let event = fastpath::IoEvent {
            space: space.to_wire(),
            address,
            is_write,
            no_resume,
            data,
            regs,
            sregs,
            debugregs,
        };
        deliver_io(
            &self.vcpu,
            &mut self.io,
            &event,
            &mut self.scratch,
            &mut self.resume_data,
        )
    }

    /// Eager register images per the call hint (wire-protocol.md §8.8):
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
        let image = self.vcpu.get_state(VcpuState::Regs).ok()?;
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
                get(VcpuState::Sregs)
            } else {
                Vec::new()
            },
            if send_debugregs {
                get(VcpuState::Debugregs)
            } else {
                Vec::new()
            },
        ))
    }

    /// A guest write at `address`.
    fn on_write(&mut self, space: Space, address: u64, data: &[u8]) {
        let Some(range) = self.config.get().reservations.lookup(space, address) else {
            return;
        };
        if let Err(e) = self.io_event(space, address, true, data, range.async_write) {
            self.log_service_error("io write", &e);
        }
    }

    /// A guest read at `address`; fills `data` (zeros when unreserved or when
    /// servicing fails, missing bytes of a short reply read as zero).
    fn on_read(&mut self, space: Space, address: u64, data: &mut [u8]) {
        let sync = self
            .config
            .get()
            .reservations
            .lookup(space, address)
            .is_some_and(|r| !r.async_write);
        if !sync {
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

    fn on_pause(&mut self, user: u64) -> Result<(), ServiceError> {
        let mut u = vcpu_response::wait::User::new();
        u.user = user;
        let mut w = vcpu_response::Wait::new();
        w.set_user(u);
        self.deliver(w)
    }
}

/// Runs vcpu `id` to completion on the current thread (the KVM glue: the
/// kick handler's view of `immediate_exit`, then [`run_thread`]).
pub fn run_vcpu(mut run: VcpuFd, mut sv: Servicer<VcpuFd>) {
    let ptr: *mut u8 = &mut run.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(ptr));
    run_thread(&mut run, &mut sv);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
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
    UnknownHypervExit,
    TooManyUnknownExits,
    RunFailed(Errno),
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
    loop {
        if sv.killed() {
            return Stop::Killed;
        }
        if sv.control.has_pending() {
            run.set_immediate_exit(true);
        }
        let exit = match run.run() {
            Ok(VmExit::Interrupted) => {
                run.set_immediate_exit(false);
                if sv.killed() {
                    return Stop::Killed;
                }
                if let Some(user) = sv.control.take_pause() {
                    if let Err(e) = sv.on_pause(user) {
                        sv.log_service_error("pause", &e);
                        return Stop::PauseFailed;
                    }
                }
                continue;
            }
            Ok(exit) => exit,
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
                error!(
                    "vcpu {id}: KVM internal error (suberror {suberror}, data {:x?})",
                    &data[..n]
                );
                return Next::Stop(Stop::InternalError);
            }
            VmExit::FailEntry {
                hardware_reason,
                cpu,
            } => {
                error!(
                    "vcpu {id}: VM entry failed (hardware reason {hardware_reason:#x}, cpu {cpu})"
                );
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
        match self.deliver(w) {
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
        if let Err(e) = self.deliver(w) {
            self.log_service_error("synic", &e);
        }
    }
}
