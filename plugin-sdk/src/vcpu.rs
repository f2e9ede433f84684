//! Vcpu channels: events, resume, register cache and per-vcpu state calls.

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use plugin_proto::protobuf::{EnumOrUnknown, Message};
use plugin_proto::vcpu_request::{self, StateSet};
use plugin_proto::vcpu_response;
use plugin_proto::{VcpuRequest, VcpuResponse};

use crate::connection::Shared;
use crate::decode::{Exit, Member, WaitDecoder};
use crate::error::{Error, Result};
use crate::image::StateImage;
use crate::transport::VcpuTransport;
use crate::types::{cpuid_from_proto, cpuid_to_proto, AddressSpace, CoalescedWrite};

/// Initial capacity of the per-vcpu event data buffer: the largest io access
/// the host reports (a 256-byte string IN), so it never reallocates.
const EVENT_DATA_CAPACITY: usize = 256;

/// One event reported by a vcpu (see [`VcpuGuard::wait`]).
///
/// ```
/// use crosvm_plugin::{AddressSpace, VcpuEvent};
///
/// let write = VcpuEvent::Io {
///     space: AddressSpace::IoPort,
///     address: 0x3f8,
///     is_write: true,
///     no_resume: false,
///     data: b"A",
/// };
/// assert!(write.needs_resume());
/// assert!(!VcpuEvent::Shutdown.needs_resume());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent<'a> {
    /// First event of every vcpu after `start`; the vcpu has not run yet.
    ///
    /// The vcpu is in x86 reset state: real mode with `CS.base =
    /// 0xffff0000` and `RIP = 0xfff0`, so setting only `rip` runs code at
    /// `0xffff0000 + rip`; vcpus other than 0 wait for a startup IPI. Use
    /// [`crate::machine`]'s `enter_*_mode` helpers. No vcpu runs until every
    /// vcpu has been resumed from its `Init` (the start barrier, see
    /// [`Connection::start`](crate::Connection::start)).
    Init,
    /// A guest access to a reserved address.
    Io {
        space: AddressSpace,
        address: u64,
        is_write: bool,
        /// True for writes to an async-write range: the guest already
        /// continued, the vcpu must not be resumed (only `wait` is legal).
        no_resume: bool,
        /// The written bytes, or (for a read) a zero-filled buffer whose
        /// length is the access size.
        data: &'a [u8],
    },
    /// The vcpu stopped because of [`Connection::pause_vcpus`](crate::Connection::pause_vcpus).
    Paused { user: u64 },
    /// A Hyper-V hypercall; answer with [`VcpuGuard::resume_hypercall`].
    HypervCall { input: u64, params: [u64; 2] },
    /// A write to a Hyper-V SynIC MSR.
    HypervSynic {
        msr: u32,
        control: u64,
        evt_page: u64,
        msg_page: u64,
    },
    /// Guest writes to coalesced ranges
    /// ([`Connection::reserve_coalesced_range`](crate::Connection::reserve_coalesced_range)),
    /// oldest first, all made before the event that follows. Needs no
    /// resume (only `wait` is legal); the slice lives until the next `wait`.
    CoalescedWrites(&'a [CoalescedWrite]),
    /// The host is stopping the VM (it signalled the shutdown eventfd, e.g.
    /// because another vcpu stopped, the guest shut down, or `vmm` was
    /// interrupted) and this vcpu has nothing more to report. It needs no
    /// resume; every later `wait` returns it again. The plugin should wind
    /// down and exit: the host kills plugins that outlive a short grace
    /// period.
    Shutdown,
}

impl VcpuEvent<'_> {
    /// True when the vcpu is stopped and waits for a resume.
    pub fn needs_resume(&self) -> bool {
        !matches!(
            self,
            VcpuEvent::Io {
                no_resume: true,
                ..
            } | VcpuEvent::Shutdown
                | VcpuEvent::CoalescedWrites(_)
        )
    }
}

/// The event a vcpu is stopped in, remembered until its resume so that a
/// premature `wait` can name it.
#[derive(Clone, Copy)]
enum Owed {
    Init,
    Io {
        space: AddressSpace,
        address: u64,
        is_write: bool,
        len: usize,
    },
    Paused(u64),
    HypervCall,
    HypervSynic(u32),
}

impl std::fmt::Display for Owed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Owed::Init => f.write_str("Init"),
            Owed::Io {
                space,
                address,
                is_write,
                len,
            } => write!(
                f,
                "Io ({} byte {} {} {address:#x})",
                len,
                if is_write { "write to" } else { "read of" },
                match space {
                    AddressSpace::IoPort => "port",
                    AddressSpace::Mmio => "MMIO address",
                }
            ),
            Owed::Paused(user) => write!(f, "Paused (user {user:#x})"),
            Owed::HypervCall => f.write_str("HypervCall"),
            Owed::HypervSynic(msr) => write!(f, "HypervSynic (MSR {msr:#x})"),
        }
    }
}

/// `get_state(REGS)`, `set_msrs`, ...: the vcpu request and its key
/// argument, for error messages (built only on failure).
fn describe_request(request: &VcpuRequest) -> String {
    use vcpu_request::Message as M;
    match &request.message {
        Some(M::Wait(_)) => "wait".into(),
        Some(M::Resume(_)) => "resume".into(),
        Some(M::GetState(g)) => format!("vcpu get_state({:?})", g.set),
        Some(M::SetState(g)) => format!("vcpu set_state({:?}, {} bytes)", g.set, g.state.len()),
        Some(M::GetMsrs(g)) => format!("get_msrs({:#x?})", g.entry_indices),
        Some(M::SetMsrs(g)) => format!(
            "set_msrs({:#x?})",
            g.entries.iter().map(|e| e.index).collect::<Vec<_>>()
        ),
        Some(M::SetCpuid(g)) => format!("set_cpuid({} entries)", g.entries.len()),
        Some(M::GetHypervCpuid(_)) => "get_hyperv_cpuid".into(),
        Some(M::EnableCapability(c)) => format!("enable_capability({})", c.capability),
        Some(_) => "a vcpu request".into(),
        None => "an empty vcpu request".into(),
    }
}

/// Cache of one deferred-settable register image (docs/c-api.md §9.3).
#[derive(Default)]
struct RegCache {
    image: Vec<u8>,
    /// `image` holds current state that can answer a get.
    valid: bool,
    /// `image` holds a set not yet sent.
    dirty: bool,
}

impl RegCache {
    fn set(&mut self, bytes: &[u8]) {
        self.image.clear();
        self.image.extend_from_slice(bytes);
        self.dirty = true;
        self.valid = false;
    }

    fn take_eager(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            self.valid = false;
        } else {
            self.image.clear();
            self.image.extend_from_slice(bytes);
            self.valid = true;
        }
    }
}

/// The three register kinds whose sets are deferred.
#[derive(Clone, Copy)]
enum Cached {
    Regs,
    Sregs,
    Debugregs,
}

impl Cached {
    fn state_set(self) -> StateSet {
        match self {
            Cached::Regs => StateSet::REGS,
            Cached::Sregs => StateSet::SREGS,
            Cached::Debugregs => StateSet::DEBUGREGS,
        }
    }
}

/// Mutable state of one vcpu channel.
pub(crate) struct VcpuState {
    transport: Box<dyn VcpuTransport>,
    wait_sent: bool,
    /// The event the vcpu is stopped in until its resume is sent.
    owed: Option<Owed>,
    /// The host signalled shutdown: `wait` keeps returning `Shutdown`.
    shut_down: bool,
    regs: RegCache,
    sregs: RegCache,
    debugregs: RegCache,
    /// Data of the current event: io bytes or the 8-byte hypercall result.
    /// Becomes the `data` of the next resume.
    event_data: Vec<u8>,
    /// Reused decode target of wait events.
    decoder: WaitDecoder,
    /// The writes of the last `CoalescedWrites` event.
    coalesced: Vec<CoalescedWrite>,
    /// Exits received that need a resume, Init not counted (the host
    /// counts the same; hot restart, docs/protocol-extensions.md §9).
    serial: u64,
}

impl VcpuState {
    fn cache(&mut self, which: Cached) -> &mut RegCache {
        match which {
            Cached::Regs => &mut self.regs,
            Cached::Sregs => &mut self.sregs,
            Cached::Debugregs => &mut self.debugregs,
        }
    }

    fn invalidate_caches(&mut self) {
        self.regs.valid = false;
        self.sregs.valid = false;
        self.debugregs.valid = false;
    }

    /// Sends `request` and returns the reply's message after the errno check.
    fn transact(&mut self, request: &VcpuRequest) -> Result<vcpu_response::Message> {
        self.transport.send(request)?;
        let frame = self.transport.recv_frame()?;
        let response =
            VcpuResponse::parse_from_bytes(frame).map_err(Error::decode("a vcpu response"))?;
        if response.errno != 0 {
            return Err(Error::Host {
                op: describe_request(request),
                errno: response.errno,
            });
        }
        response
            .message
            .ok_or(Error::Protocol("vcpu reply without a message"))
    }
}

/// Table entry of one vcpu; its address is the C API's `struct crosvm_vcpu *`.
pub(crate) struct VcpuSlot {
    id: u32,
    state: Mutex<VcpuState>,
}

impl VcpuSlot {
    pub(crate) fn new(id: u32, transport: Box<dyn VcpuTransport>) -> VcpuSlot {
        VcpuSlot {
            id,
            state: Mutex::new(VcpuState {
                transport,
                wait_sent: false,
                owed: None,
                shut_down: false,
                regs: RegCache::default(),
                sregs: RegCache::default(),
                debugregs: RegCache::default(),
                event_data: Vec::with_capacity(EVENT_DATA_CAPACITY),
                decoder: WaitDecoder::new(EVENT_DATA_CAPACITY),
                coalesced: Vec::new(),
                serial: 0,
            }),
        }
    }

    /// Hot restart: the channel of a plugin that takes over a running vcpu
    /// (no Init comes; the host counted `serial` exits already).
    pub(crate) fn take_over(&self, serial: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.wait_sent = true;
        st.serial = serial;
    }

    pub(crate) fn lock(&self) -> VcpuGuard<'_> {
        VcpuGuard {
            id: self.id,
            // A panic while holding the lock leaves the state consistent
            // enough (at worst a desynchronized channel, reported later).
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    fn try_lock(&self) -> Option<VcpuGuard<'_>> {
        let state = match self.state.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(VcpuGuard { id: self.id, state })
    }
}

/// A shareable handle to one vcpu of the table built at connect time.
///
/// ```no_run
/// # use crosvm_plugin::Connection;
/// let conn = Connection::from_env()?;
/// let vcpu = conn.vcpu(0)?;
/// let worker = std::thread::spawn(move || vcpu.lock().wait().map(|e| e.needs_resume()));
/// # drop(worker);
/// # Ok::<(), crosvm_plugin::Error>(())
/// ```
///
/// Cheap to clone and `Send + Sync`; every operation goes through
/// [`Vcpu::lock`], which gives exclusive use of the vcpu channel. Different
/// vcpus can be driven concurrently from different threads.
#[derive(Clone)]
pub struct Vcpu {
    shared: Arc<Shared>,
    index: usize,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id()).finish()
    }
}

impl Vcpu {
    pub(crate) fn new(shared: Arc<Shared>, index: usize) -> Vcpu {
        Vcpu { shared, index }
    }

    fn slot(&self) -> &VcpuSlot {
        &self.shared.vcpus[self.index]
    }

    /// The vcpu id (its index in the table).
    pub fn id(&self) -> u32 {
        self.slot().id
    }

    /// Takes exclusive use of the vcpu channel, blocking while another
    /// thread holds it.
    pub fn lock(&self) -> VcpuGuard<'_> {
        self.slot().lock()
    }

    /// Like [`Vcpu::lock`] but returns `None` instead of blocking.
    pub fn try_lock(&self) -> Option<VcpuGuard<'_>> {
        self.slot().try_lock()
    }
}

/// Exclusive access to one vcpu channel.
///
/// State calls (`get_*`/`set_*`, msrs, cpuid, capabilities) are only
/// meaningful while the vcpu is stopped in an event that needs a resume,
/// i.e. between [`wait`](Self::wait) and [`resume`](Self::resume).
pub struct VcpuGuard<'a> {
    id: u32,
    state: MutexGuard<'a, VcpuState>,
}

impl VcpuGuard<'_> {
    /// The vcpu id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Blocks until the vcpu reports its next event.
    ///
    /// Returns [`VcpuEvent::Shutdown`] once the host stops the VM (its
    /// shutdown eventfd is signalled; checked while waiting on either vcpu
    /// transport, no watcher thread needed), and [`Error::ResumeOwed`]
    /// (`EBUSY`), naming the event, when the previous event still needs a
    /// [`resume`](Self::resume): the vcpu is stopped and would never report
    /// anything.
    ///
    /// The first call on a vcpu sends the `Wait` request; every call reads
    /// the next response. The io data of the event stays available through
    /// [`event_data`](Self::event_data) until the next resume.
    pub fn wait(&mut self) -> Result<VcpuEvent<'_>> {
        let st = &mut *self.state;
        if let Some(owed) = st.owed {
            return Err(Error::ResumeOwed {
                vcpu: self.id,
                pending: owed.to_string(),
            });
        }
        if st.shut_down {
            return Ok(VcpuEvent::Shutdown);
        }
        if !st.wait_sent {
            let mut req = VcpuRequest::new();
            req.set_wait(vcpu_request::Wait::new());
            st.transport.send(&req)?;
            st.wait_sent = true;
        }
        let frame = match st.transport.recv_frame() {
            Ok(frame) => frame,
            Err(Error::Shutdown { .. }) => {
                st.shut_down = true;
                return Ok(VcpuEvent::Shutdown);
            }
            Err(e) => return Err(e),
        };
        let dec = &mut st.decoder;
        dec.decode(frame)
            .map_err(Error::decode("a vcpu wait response"))?;
        if dec.errno != 0 {
            return Err(Error::host("wait", dec.errno));
        }
        if dec.member != Member::Wait {
            return Err(Error::Protocol("vcpu reply is not a wait event"));
        }
        let exit = dec
            .exit
            .ok_or(Error::Protocol("wait event without a known exit"))?;
        st.event_data.clear();
        match exit {
            Exit::Init => {
                st.invalidate_caches();
                st.owed = Some(Owed::Init);
                Ok(VcpuEvent::Init)
            }
            Exit::Io {
                space,
                address,
                is_write,
                no_resume,
            } => {
                let space = AddressSpace::from_raw(u32::try_from(space).unwrap_or(u32::MAX))
                    .map_err(|_| Error::Protocol("unknown address space in an io event"))?;
                // Both buffers keep their capacity: no allocation per exit.
                std::mem::swap(&mut st.event_data, &mut dec.data);
                st.regs.take_eager(&dec.regs);
                st.sregs.take_eager(&dec.sregs);
                st.debugregs.take_eager(&dec.debugregs);
                if !no_resume {
                    st.serial += 1;
                    st.owed = Some(Owed::Io {
                        space,
                        address,
                        is_write,
                        len: st.event_data.len(),
                    });
                }
                Ok(VcpuEvent::Io {
                    space,
                    address,
                    is_write,
                    no_resume,
                    data: &st.event_data,
                })
            }
            Exit::CoalescedWrites => {
                let records = &dec.data;
                if !records.len().is_multiple_of(24) {
                    return Err(Error::Protocol(
                        "coalesced writes batch is not a whole number of records",
                    ));
                }
                st.coalesced.clear();
                for r in records.chunks_exact(24) {
                    let r: &[u8; 24] = r.try_into().unwrap_or(&[0; 24]);
                    let w = CoalescedWrite::from_record(r)
                        .ok_or(Error::Protocol("malformed coalesced write record"))?;
                    st.coalesced.push(w);
                }
                Ok(VcpuEvent::CoalescedWrites(&st.coalesced))
            }
            Exit::User { user } => {
                st.invalidate_caches();
                st.serial += 1;
                st.owed = Some(Owed::Paused(user));
                Ok(VcpuEvent::Paused { user })
            }
            Exit::HypervCall {
                input,
                params0,
                params1,
            } => {
                st.event_data.extend_from_slice(&[0; 8]);
                st.invalidate_caches();
                st.serial += 1;
                st.owed = Some(Owed::HypervCall);
                Ok(VcpuEvent::HypervCall {
                    input,
                    params: [params0, params1],
                })
            }
            Exit::HypervSynic {
                msr,
                control,
                evt_page,
                msg_page,
            } => {
                st.invalidate_caches();
                st.serial += 1;
                st.owed = Some(Owed::HypervSynic(msr));
                Ok(VcpuEvent::HypervSynic {
                    msr,
                    control,
                    evt_page,
                    msg_page,
                })
            }
        }
    }

    /// The serial of the last exit that needed a resume on this vcpu
    /// (counted from 1, Init not counted; the host counts the same). A
    /// plugin that checkpoints its devices stores it with the checkpoint:
    /// after a crash, an exit with a serial the checkpoint already covers
    /// is one the old plugin applied but did not resume
    /// (docs/protocol-extensions.md §9).
    pub fn serial(&self) -> u64 {
        self.state.serial
    }

    /// The current event's data: the io bytes (fill it in for a read), or
    /// the 8-byte little-endian hypercall result. Sent with the next resume.
    pub fn event_data(&self) -> &[u8] {
        &self.state.event_data
    }

    /// Mutable view of [`event_data`](Self::event_data).
    pub fn event_data_mut(&mut self) -> &mut [u8] {
        &mut self.state.event_data
    }

    /// Raw pointer to the event data buffer for the C API. It stays valid
    /// (no reallocation) until the next `wait`.
    pub(crate) fn event_data_ptr(&mut self) -> *mut u8 {
        self.state.event_data.as_mut_ptr()
    }

    /// Lets the vcpu continue: sends `Resume` with the event data and every
    /// pending (dirty) register image. There is no reply.
    pub fn resume(&mut self) -> Result<()> {
        let st = &mut *self.state;
        if st.shut_down {
            // Nothing is stopped any more; a loop that resumes every event
            // must end here rather than wait again forever.
            return Err(Error::Shutdown { op: "resume" });
        }
        // Even if sending fails the event is settled: the channel is broken.
        st.owed = None;
        let mut resume = vcpu_request::Resume::new();
        std::mem::swap(&mut resume.data, &mut st.event_data);
        let moved = [st.regs.dirty, st.sregs.dirty, st.debugregs.dirty];
        if moved[0] {
            std::mem::swap(&mut resume.regs, &mut st.regs.image);
            st.regs.dirty = false;
        }
        if moved[1] {
            std::mem::swap(&mut resume.sregs, &mut st.sregs.image);
            st.sregs.dirty = false;
        }
        if moved[2] {
            std::mem::swap(&mut resume.debugregs, &mut st.debugregs.image);
            st.debugregs.dirty = false;
        }
        let mut req = VcpuRequest::new();
        req.set_resume(resume);
        let result = st.transport.send(&req);
        // Take the buffers back so their allocations are reused.
        if let Some(vcpu_request::Message::Resume(mut resume)) = req.message.take() {
            std::mem::swap(&mut resume.data, &mut st.event_data);
            if moved[0] {
                std::mem::swap(&mut resume.regs, &mut st.regs.image);
            }
            if moved[1] {
                std::mem::swap(&mut resume.sregs, &mut st.sregs.image);
            }
            if moved[2] {
                std::mem::swap(&mut resume.debugregs, &mut st.debugregs.image);
            }
        }
        result
    }

    /// Answers an io read: copies `data` into the event buffer (truncated to
    /// the access size, missing bytes are zero) and resumes.
    pub fn resume_io_read(&mut self, data: &[u8]) -> Result<()> {
        let buf = &mut self.state.event_data;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        buf[n..].fill(0);
        self.resume()
    }

    /// Answers a hypercall with its 64-bit result and resumes.
    pub fn resume_hypercall(&mut self, result: u64) -> Result<()> {
        let buf = &mut self.state.event_data;
        buf.clear();
        buf.extend_from_slice(&result.to_le_bytes());
        self.resume()
    }

    fn get_state_image<T: StateImage>(&mut self, set: StateSet) -> Result<T> {
        let mut req = VcpuRequest::new();
        req.mut_get_state().set = EnumOrUnknown::new(set);
        match self.state.transact(&req)? {
            vcpu_response::Message::GetState(gs) => T::from_image(&gs.state),
            _ => Err(Error::Protocol("vcpu reply is not get_state")),
        }
    }

    fn set_state_bytes(&mut self, set: StateSet, state: Vec<u8>) -> Result<Vec<u8>> {
        let mut req = VcpuRequest::new();
        let ss = req.mut_set_state();
        ss.set = EnumOrUnknown::new(set);
        ss.state = state;
        let reply = self.state.transact(&req);
        let buffer = match req.message.take() {
            Some(vcpu_request::Message::SetState(ss)) => ss.state,
            _ => Vec::new(),
        };
        match reply? {
            vcpu_response::Message::SetState(_) => Ok(buffer),
            _ => Err(Error::Protocol("vcpu reply is not set_state")),
        }
    }

    fn set_state_image<T: StateImage>(&mut self, set: StateSet, value: &T) -> Result<()> {
        self.set_state_bytes(set, value.as_image().to_vec())
            .map(drop)
    }

    fn get_cached<T: StateImage>(&mut self, which: Cached) -> Result<T> {
        let cache = self.state.cache(which);
        if cache.dirty {
            cache.dirty = false;
            let image = std::mem::take(&mut cache.image);
            let buffer = self.set_state_bytes(which.state_set(), image)?;
            self.state.cache(which).image = buffer;
        }
        let cache = self.state.cache(which);
        if cache.valid {
            return T::from_image(&cache.image);
        }
        self.get_state_image(which.state_set())
    }

    fn set_cached<T: StateImage>(&mut self, which: Cached, value: &T) {
        self.state.cache(which).set(value.as_image());
    }

    /// General-purpose registers (flushes a pending set first; answered
    /// locally when the current io event carried them).
    pub fn get_regs(&mut self) -> Result<kvm_regs> {
        self.get_cached(Cached::Regs)
    }

    /// Deferred: the registers are sent with the next resume (or flushed by
    /// the next [`get_regs`](Self::get_regs)). Never talks to the VMM.
    pub fn set_regs(&mut self, regs: &kvm_regs) {
        self.set_cached(Cached::Regs, regs)
    }

    /// Special registers (cached like [`get_regs`](Self::get_regs)).
    pub fn get_sregs(&mut self) -> Result<kvm_sregs> {
        self.get_cached(Cached::Sregs)
    }

    /// Deferred like [`set_regs`](Self::set_regs).
    pub fn set_sregs(&mut self, sregs: &kvm_sregs) {
        self.set_cached(Cached::Sregs, sregs)
    }

    /// Debug registers (cached like [`get_regs`](Self::get_regs)).
    pub fn get_debugregs(&mut self) -> Result<kvm_debugregs> {
        self.get_cached(Cached::Debugregs)
    }

    /// Deferred like [`set_regs`](Self::set_regs).
    pub fn set_debugregs(&mut self, dregs: &kvm_debugregs) {
        self.set_cached(Cached::Debugregs, dregs)
    }

    /// FPU state (immediate round trip).
    pub fn get_fpu(&mut self) -> Result<kvm_fpu> {
        self.get_state_image(StateSet::FPU)
    }

    pub fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<()> {
        self.set_state_image(StateSet::FPU, fpu)
    }

    /// Extended control registers.
    pub fn get_xcrs(&mut self) -> Result<kvm_xcrs> {
        self.get_state_image(StateSet::XCREGS)
    }

    pub fn set_xcrs(&mut self, xcrs: &kvm_xcrs) -> Result<()> {
        self.set_state_image(StateSet::XCREGS, xcrs)
    }

    /// Local APIC state.
    pub fn get_lapic_state(&mut self) -> Result<kvm_lapic_state> {
        self.get_state_image(StateSet::LAPIC)
    }

    pub fn set_lapic_state(&mut self, lapic: &kvm_lapic_state) -> Result<()> {
        self.set_state_image(StateSet::LAPIC, lapic)
    }

    /// Multiprocessing state.
    pub fn get_mp_state(&mut self) -> Result<kvm_mp_state> {
        self.get_state_image(StateSet::MP)
    }

    pub fn set_mp_state(&mut self, mp: &kvm_mp_state) -> Result<()> {
        self.set_state_image(StateSet::MP, mp)
    }

    /// Pending exceptions, interrupts and NMIs.
    pub fn get_vcpu_events(&mut self) -> Result<kvm_vcpu_events> {
        self.get_state_image(StateSet::EVENTS)
    }

    pub fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<()> {
        self.set_state_image(StateSet::EVENTS, events)
    }

    /// Reads the MSRs `indices`, returning their values in order. The VMM may
    /// return fewer values than requested (KVM stopped at an unreadable MSR).
    pub fn get_msrs(&mut self, indices: &[u32]) -> Result<Vec<u64>> {
        let mut req = VcpuRequest::new();
        req.mut_get_msrs().entry_indices = indices.to_vec();
        match self.state.transact(&req)? {
            vcpu_response::Message::GetMsrs(g) => Ok(g.entry_data),
            _ => Err(Error::Protocol("vcpu reply is not get_msrs")),
        }
    }

    /// Writes `{index, data}` of every entry.
    pub fn set_msrs(&mut self, entries: &[kvm_msr_entry]) -> Result<()> {
        let mut req = VcpuRequest::new();
        req.mut_set_msrs().entries = entries
            .iter()
            .map(|e| vcpu_request::MsrEntry {
                index: e.index,
                data: e.data,
                ..Default::default()
            })
            .collect();
        match self.state.transact(&req)? {
            vcpu_response::Message::SetMsrs(_) => Ok(()),
            _ => Err(Error::Protocol("vcpu reply is not set_msrs")),
        }
    }

    /// Replaces the vcpu's CPUID table.
    pub fn set_cpuid(&mut self, entries: &[kvm_cpuid_entry2]) -> Result<()> {
        let mut req = VcpuRequest::new();
        req.mut_set_cpuid().entries = entries.iter().map(cpuid_to_proto).collect();
        match self.state.transact(&req)? {
            vcpu_response::Message::SetCpuid(_) => Ok(()),
            _ => Err(Error::Protocol("vcpu reply is not set_cpuid")),
        }
    }

    /// The Hyper-V CPUID leaves KVM supports for this vcpu.
    pub fn get_hyperv_cpuid(&mut self) -> Result<Vec<kvm_cpuid_entry2>> {
        let mut req = VcpuRequest::new();
        req.set_get_hyperv_cpuid(vcpu_request::CpuidRequest::new());
        match self.state.transact(&req)? {
            vcpu_response::Message::GetHypervCpuid(c) => {
                Ok(c.entries.iter().map(cpuid_from_proto).collect())
            }
            _ => Err(Error::Protocol("vcpu reply is not get_hyperv_cpuid")),
        }
    }

    /// Enables a vcpu capability (the VMM accepts `KVM_CAP_HYPERV_SYNIC` and
    /// `KVM_CAP_HYPERV_SYNIC2`). `flags` and every `args` value must be 0
    /// (else `EINVAL`, nothing sent).
    pub fn enable_capability(&mut self, capability: u32, flags: u32, args: [u64; 4]) -> Result<()> {
        if flags != 0 {
            return Err(Error::InvalidArgument("capability flags must be 0"));
        }
        if args.iter().any(|&a| a != 0) {
            return Err(Error::InvalidArgument("capability args must be 0"));
        }
        let mut req = VcpuRequest::new();
        req.mut_enable_capability().capability = capability;
        match self.state.transact(&req)? {
            vcpu_response::Message::EnableCapability(_) => Ok(()),
            _ => Err(Error::Protocol("vcpu reply is not enable_capability")),
        }
    }
}
