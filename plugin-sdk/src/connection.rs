//! Main connections: the request/response socket to the VMM, the shared vcpu
//! table and the shared object-id allocator.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_ioapic_state, kvm_pic_state, kvm_pit_state2,
};
use nix::errno::Errno;
use plugin_proto::framing::{
    full_cmsg_space, recv_packet_with, send_message, MAX_MESSAGE_SIZE, SCM_MAX_FD,
};
use plugin_proto::main_request::{self, StateSet};
use plugin_proto::main_response;
use plugin_proto::protobuf::{EnumOrUnknown, Message};
use plugin_proto::{MainRequest, MainResponse};

use crate::error::{Error, Result};
use crate::image::StateImage;
use crate::transport::{PipeTransport, ShmTransport, VcpuTransport};
use crate::types::{
    cpuid_from_proto, ipv4_from_wire, AddressSpace, CallHint, IrqRoute, NetConfig,
    MAX_HINT_DETAIL_COUNT,
};
use crate::vcpu::{Vcpu, VcpuSlot};

/// Name of the environment variable holding the inherited socket number.
pub const SOCKET_ENV: &str = "CROSVM_SOCKET";

/// Set once the `CROSVM_SOCKET` descriptor has been adopted, so it never gets
/// two owners.
static ENV_SOCKET_ADOPTED: AtomicBool = AtomicBool::new(false);

/// State shared by a connection and every connection derived from it.
pub(crate) struct Shared {
    pub(crate) vcpus: Box<[VcpuSlot]>,
    next_id: Mutex<u32>,
}

impl Shared {
    /// Takes the next object id (docs/c-api.md §9.2).
    pub(crate) fn alloc_id(&self) -> Result<u32> {
        let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        let id = *next;
        *next = id.checked_add(1).ok_or(Error::IdsExhausted)?;
        Ok(id)
    }

    /// Hot restart: ids up to `id` are taken (objects the host kept).
    pub(crate) fn taken_up_to(&self, id: u32) {
        let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        *next = (*next).max(id.saturating_add(1));
    }

    /// Gives `id` back, but only when it is the most recently allocated one.
    pub(crate) fn release_id(&self, id: u32) {
        let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        if id.checked_add(1) == Some(*next) {
            *next = id;
        }
    }
}

/// The socket of one main connection plus its reusable buffers.
struct MainChannel {
    sock: OwnedFd,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    cmsg_buf: Vec<u8>,
}

impl MainChannel {
    fn new(sock: OwnedFd) -> MainChannel {
        MainChannel {
            sock,
            send_buf: Vec::new(),
            recv_buf: Vec::new(),
            cmsg_buf: Vec::new(),
        }
    }

    /// Receives and decodes one response (no errno check).
    fn recv(&mut self, op: &'static str) -> Result<(MainResponse, Vec<OwnedFd>)> {
        if self.recv_buf.len() < MAX_MESSAGE_SIZE {
            // Zeroed allocation: pages are only touched when used.
            self.recv_buf = vec![0; MAX_MESSAGE_SIZE];
            self.cmsg_buf = vec![0; full_cmsg_space()];
        }
        let packet = recv_packet_with(
            self.sock.as_fd(),
            &mut self.recv_buf,
            &mut self.cmsg_buf,
            SCM_MAX_FD,
        )
        .map_err(Error::transport(op))?;
        let response = MainResponse::parse_from_bytes(&self.recv_buf[..packet.len])
            .map_err(Error::decode(op))?;
        Ok((response, packet.fds))
    }

    /// One request/response exchange; a non-zero errno becomes an error
    /// (descriptors attached to a failed reply are closed).
    fn transact(
        &mut self,
        op: &'static str,
        request: &MainRequest,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(MainResponse, Vec<OwnedFd>)> {
        send_message(self.sock.as_fd(), request, fds, &mut self.send_buf)
            .map_err(Error::transport(op))?;
        let (response, fds) = self.recv(op)?;
        if response.errno != 0 {
            return Err(Error::Host {
                op: plugin_proto::describe::main_request(request),
                errno: response.errno,
            });
        }
        Ok((response, fds))
    }

    /// `GetShutdownEventfd`: a new descriptor of the VM's shutdown eventfd.
    fn shutdown_eventfd(&mut self) -> Result<OwnedFd> {
        let mut req = MainRequest::new();
        req.set_get_shutdown_eventfd(main_request::GetShutdownEventfd::new());
        let (_, fds) = self.transact("get_shutdown_eventfd", &req, &[])?;
        first_fd(fds, "get_shutdown_eventfd reply carries no descriptor")
    }

    /// `GetVcpus` with chunked descriptor delivery (and, if `fast`, the
    /// shared-memory channel offer); returns the descriptors and how many
    /// there are per vcpu (2, or 3 when the host granted the fast channel).
    fn get_vcpus(&mut self, fast: bool) -> Result<(Vec<OwnedFd>, usize)> {
        const OP: &str = "get_vcpus";
        let mut req = MainRequest::new();
        req.set_get_vcpus(main_request::GetVcpus {
            accept_chunked_fds: true,
            request_fast_channel: fast,
            ..Default::default()
        });
        let (resp, mut fds) = self.transact(OP, &req, &[])?;
        let (total, per_vcpu) = match resp.message {
            Some(main_response::Message::GetVcpus(g)) => {
                (g.vcpu_count, if g.fast_channel { 3 } else { 2 })
            }
            _ => return Err(Error::Protocol("get_vcpus reply lacks its member")),
        };
        if total != 0 {
            let expected = usize::try_from(total)
                .ok()
                .and_then(|t| t.checked_mul(per_vcpu))
                .ok_or(Error::Protocol("absurd vcpu count"))?;
            while fds.len() < expected {
                let (resp, more) = self.recv(OP)?;
                if resp.errno != 0 {
                    return Err(Error::host(OP, resp.errno));
                }
                if !matches!(resp.message, Some(main_response::Message::GetVcpus(_))) {
                    return Err(Error::Protocol("follow-up packet is not get_vcpus"));
                }
                if more.is_empty() {
                    return Err(Error::Protocol(
                        "follow-up get_vcpus packet has no descriptors",
                    ));
                }
                fds.extend(more);
            }
            if fds.len() != expected {
                return Err(Error::Protocol(
                    "get_vcpus descriptor count does not match vcpu_count",
                ));
            }
        }
        if fds.is_empty() || fds.len() % per_vcpu != 0 {
            return Err(Error::Protocol(
                "get_vcpus needs a non-zero descriptor count, a whole number per vcpu",
            ));
        }
        Ok((fds, per_vcpu))
    }
}

/// Environment variable that disables the shared-memory vcpu channel when
/// set to `0` (the crosvm pipes are used even if the host offers it).
pub const FAST_CHANNEL_ENV: &str = "CROSVM_FAST_CHANNEL";

fn fast_channel_wanted() -> bool {
    std::env::var_os(FAST_CHANNEL_ENV).is_none_or(|v| v != "0")
}

struct ConnectionInner {
    main: Mutex<MainChannel>,
    shared: Arc<Shared>,
}

/// A main connection to the VMM.
///
/// ```no_run
/// use crosvm_plugin::{AddressSpace, Connection};
/// let conn = Connection::from_env()?; // needs a running vmm
/// if let Err(e) = conn.reserve_range(AddressSpace::IoPort, 0x3f8, 8) {
///     // e.g. "reserve_range(IoPort, 0x3f8, 8): EPERM: Operation not permitted"
///     eprintln!("{e}");
/// }
/// # Ok::<(), crosvm_plugin::Error>(())
/// ```
///
/// Cloning is cheap and shares the same socket (requests are serialized by
/// an internal lock); use [`Connection::new_connection`] for an independent
/// socket that can be used in parallel. All methods take `&self`.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnectionInner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("vcpus", &self.inner.shared.vcpus.len())
            .finish_non_exhaustive()
    }
}

fn first_fd(fds: Vec<OwnedFd>, what: &'static str) -> Result<OwnedFd> {
    fds.into_iter().next().ok_or(Error::Protocol(what))
}

impl Connection {
    /// Adopts the socket named by `CROSVM_SOCKET` and fetches the vcpu
    /// channels. Absent variable → `ENOTCONN`; not a number or negative →
    /// `EINVAL`. The descriptor can be adopted once per process (a second
    /// call fails with `EBUSY`).
    pub fn from_env() -> Result<Connection> {
        let value = std::env::var_os(SOCKET_ENV).ok_or(Error::NoSocketEnv)?;
        let text = value
            .to_str()
            .ok_or_else(|| Error::BadSocketEnv(value.to_string_lossy().into_owned()))?;
        let fd: i32 = text
            .parse()
            .map_err(|_| Error::BadSocketEnv(text.to_owned()))?;
        if fd < 0 {
            return Err(Error::BadSocketEnv(text.to_owned()));
        }
        // SAFETY: F_GETFD only inspects the descriptor table entry; no memory
        // is passed to the kernel.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::Sys {
                op: "checking the CROSVM_SOCKET descriptor",
                source: Errno::last(),
            });
        }
        if ENV_SOCKET_ADOPTED.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyAdopted);
        }
        // SAFETY: the VMM hands this open descriptor (checked above) to the
        // plugin for exclusive use, and the flag above guarantees it is
        // adopted at most once in this process.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Connection::from_fd(sock)
    }

    /// Uses `sock` (a connected `SOCK_SEQPACKET` socket to the VMM) as the
    /// first main connection: sends `GetVcpus` and builds the vcpu table.
    pub fn from_fd(sock: OwnedFd) -> Result<Connection> {
        let mut main = MainChannel::new(sock);
        let (fds, per_vcpu) = main.get_vcpus(fast_channel_wanted())?;
        // Every vcpu channel polls the shutdown eventfd while it waits, so a
        // plugin blocked in `wait()` learns that the VM is stopping without
        // a watcher thread. A host that refuses it only loses that.
        let shutdown = main.shutdown_eventfd().ok().map(Arc::new);
        let mut vcpus = Vec::with_capacity(fds.len() / per_vcpu);
        let mut iter = fds.into_iter();
        while let (Some(request), Some(response)) = (iter.next(), iter.next()) {
            let id = u32::try_from(vcpus.len()).map_err(|_| Error::Protocol("too many vcpus"))?;
            let transport: Box<dyn VcpuTransport> = if per_vcpu == 3 {
                let shm = iter
                    .next()
                    .ok_or(Error::Protocol("missing fast channel descriptor"))?;
                Box::new(ShmTransport::new(&shm, response, shutdown.clone())?)
            } else {
                Box::new(PipeTransport::new(request, response, shutdown.clone()))
            };
            vcpus.push(VcpuSlot::new(id, transport));
        }
        let shared = Arc::new(Shared {
            vcpus: vcpus.into_boxed_slice(),
            next_id: Mutex::new(0),
        });
        Ok(Connection::with_shared(main, shared))
    }

    fn with_shared(main: MainChannel, shared: Arc<Shared>) -> Connection {
        Connection {
            inner: Arc::new(ConnectionInner {
                main: Mutex::new(main),
                shared,
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// One exchange on this connection's socket.
    pub(crate) fn transact(
        &self,
        op: &'static str,
        request: &MainRequest,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(MainResponse, Vec<OwnedFd>)> {
        let mut main = self.inner.main.lock().unwrap_or_else(|e| e.into_inner());
        main.transact(op, request, fds)
    }

    /// One exchange whose descriptors may continue in follow-up packets
    /// (chunked as `GetVcpus`): `want` says how many the reply announces.
    pub(crate) fn transact_chunked(
        &self,
        op: &'static str,
        request: &MainRequest,
        want: impl FnOnce(&MainResponse) -> Result<usize>,
    ) -> Result<(MainResponse, Vec<OwnedFd>)> {
        let mut main = self.inner.main.lock().unwrap_or_else(|e| e.into_inner());
        let (resp, mut fds) = main.transact(op, request, &[])?;
        let expected = want(&resp)?;
        while fds.len() < expected {
            let (more_resp, more) = main.recv(op)?;
            if more_resp.errno != 0 {
                return Err(Error::host(op, more_resp.errno));
            }
            if more.is_empty() {
                return Err(Error::Protocol("a follow-up packet carries no descriptors"));
            }
            fds.extend(more);
        }
        if fds.len() != expected {
            return Err(Error::Protocol("more descriptors than the reply announced"));
        }
        Ok((resp, fds))
    }

    /// Exchange whose reply content is not needed beyond the errno.
    fn simple(&self, op: &'static str, request: &MainRequest) -> Result<()> {
        self.transact(op, request, &[]).map(drop)
    }

    /// Opens another main connection sharing the vcpu table and object ids.
    pub fn new_connection(&self) -> Result<Connection> {
        let mut req = MainRequest::new();
        req.set_new_connection(main_request::NewConnection::new());
        let (_, fds) = self.transact("new_connection", &req, &[])?;
        let sock = first_fd(fds, "new_connection reply carries no descriptor")?;
        Ok(Connection::with_shared(
            MainChannel::new(sock),
            self.inner.shared.clone(),
        ))
    }

    /// A new descriptor for the VM's shutdown eventfd (caller-owned).
    ///
    /// A plugin does not need it to notice the end: [`VcpuGuard::wait`]
    /// already returns [`VcpuEvent::Shutdown`]. Reading the eventfd resets
    /// it for every holder, so poll it rather than read it if vcpu threads
    /// are still waiting. A plugin writes to it to stop the VM itself.
    ///
    /// [`VcpuGuard::wait`]: crate::VcpuGuard::wait
    /// [`VcpuEvent::Shutdown`]: crate::VcpuEvent::Shutdown
    pub fn get_shutdown_eventfd(&self) -> Result<OwnedFd> {
        self.inner
            .main
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown_eventfd()
    }

    /// `KVM_CHECK_EXTENSION` on the VM: true only if KVM reported exactly 1.
    pub fn check_extension(&self, extension: u32) -> Result<bool> {
        let mut req = MainRequest::new();
        req.mut_check_extension().extension = extension;
        match self.transact("check_extension", &req, &[])?.0.message {
            Some(main_response::Message::CheckExtension(c)) => Ok(c.has_extension),
            _ => Err(Error::Protocol("check_extension reply lacks its member")),
        }
    }

    /// `KVM_GET_SUPPORTED_CPUID`.
    pub fn get_supported_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        let mut req = MainRequest::new();
        req.set_get_supported_cpuid(main_request::CpuidRequest::new());
        match self.transact("get_supported_cpuid", &req, &[])?.0.message {
            Some(main_response::Message::GetSupportedCpuid(c)) => {
                Ok(c.entries.iter().map(cpuid_from_proto).collect())
            }
            _ => Err(Error::Protocol(
                "get_supported_cpuid reply lacks its member",
            )),
        }
    }

    /// `KVM_GET_EMULATED_CPUID`.
    pub fn get_emulated_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        let mut req = MainRequest::new();
        req.set_get_emulated_cpuid(main_request::CpuidRequest::new());
        match self.transact("get_emulated_cpuid", &req, &[])?.0.message {
            Some(main_response::Message::GetEmulatedCpuid(c)) => {
                Ok(c.entries.iter().map(cpuid_from_proto).collect())
            }
            _ => Err(Error::Protocol("get_emulated_cpuid reply lacks its member")),
        }
    }

    /// `KVM_GET_MSR_INDEX_LIST`.
    pub fn get_msr_index_list(&self) -> Result<Vec<u32>> {
        let mut req = MainRequest::new();
        req.set_get_msr_index_list(main_request::MsrListRequest::new());
        match self.transact("get_msr_index_list", &req, &[])?.0.message {
            Some(main_response::Message::GetMsrIndexList(m)) => Ok(m.indices),
            _ => Err(Error::Protocol("get_msr_index_list reply lacks its member")),
        }
    }

    /// Describes the VMM's first tap device (`ENODATA` when there is none).
    pub fn get_net_config(&self) -> Result<NetConfig> {
        let mut req = MainRequest::new();
        req.set_get_net_config(main_request::GetNetConfig::new());
        let (resp, fds) = self.transact("get_net_config", &req, &[])?;
        let config = match resp.message {
            Some(main_response::Message::GetNetConfig(c)) => c,
            _ => return Err(Error::Protocol("get_net_config reply lacks its member")),
        };
        let tap = fds.into_iter().last().ok_or(Error::Protocol(
            "get_net_config reply carries no descriptor",
        ))?;
        let host_mac: [u8; 6] =
            config
                .host_mac_address
                .as_slice()
                .try_into()
                .map_err(|_| Error::BadLength {
                    what: "host MAC address",
                    expected: 6,
                    got: config.host_mac_address.len(),
                })?;
        Ok(NetConfig {
            tap,
            host_ip: ipv4_from_wire(config.host_ipv4_address),
            netmask: ipv4_from_wire(config.netmask),
            host_mac,
        })
    }

    /// One `ReserveRange` of any kind; `op` names the SDK call in errors.
    fn reserve(
        &self,
        op: &'static str,
        (space, start, length): (AddressSpace, u64, u64),
        async_write: bool,
        coalesced: bool,
    ) -> Result<()> {
        let mut req = MainRequest::new();
        let r = req.mut_reserve_range();
        r.space = space.to_proto();
        r.start = start;
        r.length = length;
        r.async_write = async_write;
        r.coalesced = coalesced;
        self.simple(op, &req)
    }

    /// Reserves `[start, start + length)` for synchronous io events (reads
    /// and writes stop the vcpu until resumed). `length` 0 removes the
    /// reservation starting at `start`, like [`unreserve_range`](Self::unreserve_range).
    pub fn reserve_range(&self, space: AddressSpace, start: u64, length: u64) -> Result<()> {
        self.reserve("reserve_range", (space, start, length), false, false)
    }

    /// Reserves a write-notification range: writes are reported with
    /// `no_resume` while the guest continues; reads are not reported.
    pub fn reserve_async_write_range(
        &self,
        space: AddressSpace,
        start: u64,
        length: u64,
    ) -> Result<()> {
        self.reserve("reserve_range", (space, start, length), true, false)
    }

    /// Reserves a coalesced range (protocol extension,
    /// docs/protocol-extensions.md §4): the guest's writes to it go to KVM's
    /// coalesced ring without stopping the vcpu, and arrive in order, in
    /// batches, as [`VcpuEvent::CoalescedWrites`](crate::VcpuEvent::CoalescedWrites)
    /// on some vcpu before that vcpu's next event. Reads are not reported
    /// (they read 0): only for devices whose writes need no immediate
    /// answer. A host without the extension ignores the flag and makes it
    /// an async-write range: the same writes then arrive one by one as
    /// posted `Io` events (`no_resume`).
    pub fn reserve_coalesced_range(
        &self,
        space: AddressSpace,
        start: u64,
        length: u64,
    ) -> Result<()> {
        self.reserve(
            "reserve_coalesced_range",
            (space, start, length),
            true,
            true,
        )
    }

    /// Removes the reservation (of either kind) starting at `start`.
    pub fn unreserve_range(&self, space: AddressSpace, start: u64) -> Result<()> {
        self.reserve("reserve_range", (space, start, 0), false, false)
    }

    /// Replaces the hypercall hint. The address must be non-zero and at most
    /// [`MAX_HINT_DETAIL_COUNT`] details are allowed (else `EINVAL`).
    pub fn set_call_hint(&self, hint: &CallHint) -> Result<()> {
        if hint.address == 0 {
            return Err(Error::InvalidArgument("hint address must be non-zero"));
        }
        if hint.details.len() > MAX_HINT_DETAIL_COUNT {
            return Err(Error::InvalidArgument("too many hint details"));
        }
        let mut req = MainRequest::new();
        let h = req.mut_set_call_hint();
        h.space = hint.space.to_proto();
        h.address = hint.address;
        h.on_write = hint.on_write;
        h.hints = hint.details.iter().map(|d| d.to_proto()).collect();
        self.simple("set_call_hint", &req)
    }

    /// Removes the hypercall hint.
    pub fn clear_call_hint(&self) -> Result<()> {
        let mut req = MainRequest::new();
        req.set_set_call_hint(main_request::SetCallHint::new());
        self.simple("set_call_hint", &req)
    }

    /// Sets the level of an irq line (`KVM_IRQ_LINE`).
    pub fn set_irq(&self, irq_id: u32, active: bool) -> Result<()> {
        let mut req = MainRequest::new();
        let s = req.mut_set_irq();
        s.irq_id = irq_id;
        s.active = active;
        self.simple("set_irq", &req)
    }

    /// Replaces the whole GSI routing table (empty clears it).
    pub fn set_irq_routing(&self, routes: &[IrqRoute]) -> Result<()> {
        let mut req = MainRequest::new();
        req.mut_set_irq_routing().routes = routes.iter().map(|r| r.to_proto()).collect();
        self.simple("set_irq_routing", &req)
    }

    fn get_vm_state<T: StateImage>(&self, set: StateSet) -> Result<T> {
        let mut req = MainRequest::new();
        req.mut_get_state().set = EnumOrUnknown::new(set);
        match self.transact("get_state", &req, &[])?.0.message {
            Some(main_response::Message::GetState(s)) => T::from_image(&s.state),
            _ => Err(Error::Protocol("get_state reply lacks its member")),
        }
    }

    fn set_vm_state<T: StateImage>(&self, set: StateSet, value: &T) -> Result<()> {
        let mut req = MainRequest::new();
        let s = req.mut_set_state();
        s.set = EnumOrUnknown::new(set);
        s.state = value.as_image().to_vec();
        self.simple("set_state", &req)
    }

    fn pic_set(primary: bool) -> StateSet {
        if primary {
            StateSet::PIC0
        } else {
            StateSet::PIC1
        }
    }

    /// State of the primary (`true`) or secondary in-kernel PIC.
    pub fn get_pic_state(&self, primary: bool) -> Result<kvm_pic_state> {
        self.get_vm_state(Self::pic_set(primary))
    }

    pub fn set_pic_state(&self, primary: bool, state: &kvm_pic_state) -> Result<()> {
        self.set_vm_state(Self::pic_set(primary), state)
    }

    pub fn get_ioapic_state(&self) -> Result<kvm_ioapic_state> {
        self.get_vm_state(StateSet::IOAPIC)
    }

    pub fn set_ioapic_state(&self, state: &kvm_ioapic_state) -> Result<()> {
        self.set_vm_state(StateSet::IOAPIC, state)
    }

    pub fn get_pit_state(&self) -> Result<kvm_pit_state2> {
        self.get_vm_state(StateSet::PIT)
    }

    pub fn set_pit_state(&self, state: &kvm_pit_state2) -> Result<()> {
        self.set_vm_state(StateSet::PIT, state)
    }

    pub fn get_clock(&self) -> Result<kvm_clock_data> {
        self.get_vm_state(StateSet::CLOCK)
    }

    pub fn set_clock(&self, clock: &kvm_clock_data) -> Result<()> {
        self.set_vm_state(StateSet::CLOCK, clock)
    }

    /// `KVM_SET_IDENTITY_MAP_ADDR` (only accepted before the vcpus exist).
    pub fn set_identity_map_addr(&self, address: u32) -> Result<()> {
        let mut req = MainRequest::new();
        req.mut_set_identity_map_addr().address = address;
        self.simple("set_identity_map_addr", &req)
    }

    /// Asks the vcpus whose bit is set in `cpu_mask` to stop with a
    /// [`VcpuEvent::Paused`](crate::VcpuEvent::Paused) event carrying `user`.
    pub fn pause_vcpus(&self, cpu_mask: u64, user: u64) -> Result<()> {
        let mut req = MainRequest::new();
        let p = req.mut_pause_vcpus();
        p.cpu_mask = cpu_mask;
        p.user = user;
        self.simple("pause_vcpus", &req)
    }

    /// Ends setup: the VMM creates the vcpus, which then report `Init`.
    ///
    /// **Start barrier:** every vcpu reports [`VcpuEvent::Init`] first, and
    /// no vcpu runs guest code until *every* vcpu of the VM has been resumed
    /// from its `Init`. A plugin must therefore wait on and resume all
    /// [`vcpu_count`](Self::vcpu_count) vcpus (one thread each, or one after
    /// the other), or refuse to run with more vcpus than it drives: a vcpu
    /// nobody waits on holds the whole VM forever.
    ///
    /// **Initial state:** at `Init` each vcpu is in x86 reset state (real
    /// mode, `CS.base = 0xffff0000`, `RIP = 0xfff0`; vcpus other than 0 wait
    /// for a startup IPI); see [`crate::machine`] for the details and the
    /// helpers that set real, protected or long mode.
    ///
    /// ```no_run
    /// # use crosvm_plugin::{machine, Connection, VcpuEvent};
    /// let conn = Connection::from_env()?;
    /// let threads: Vec<_> = (0..conn.vcpu_count() as u32)
    ///     .map(|id| {
    ///         let vcpu = conn.vcpu(id).unwrap();
    ///         std::thread::spawn(move || -> crosvm_plugin::Result<()> {
    ///             let mut v = vcpu.lock();
    ///             loop {
    ///                 match v.wait()? {
    ///                     VcpuEvent::Init => machine::enter_real_mode(&mut v, 0x1000, 0x8000)?,
    ///                     VcpuEvent::Shutdown => return Ok(()),
    ///                     _ => {}
    ///                 }
    ///                 v.resume()?;
    ///             }
    ///         })
    ///     })
    ///     .collect();
    /// conn.start()?; // vcpus may be waited on before or after start
    /// # drop(threads);
    /// # Ok::<(), crosvm_plugin::Error>(())
    /// ```
    ///
    /// [`VcpuEvent::Init`]: crate::VcpuEvent::Init
    pub fn start(&self) -> Result<()> {
        let mut req = MainRequest::new();
        req.set_start(main_request::Start::new());
        self.simple("start", &req)
    }

    /// Number of vcpus in the table.
    pub fn vcpu_count(&self) -> usize {
        self.inner.shared.vcpus.len()
    }

    /// The vcpu with index `id` (`ENOENT` if there is none). Purely local;
    /// all handles to the same id share one channel.
    pub fn vcpu(&self, id: u32) -> Result<Vcpu> {
        let index = self.vcpu_index(id)?;
        Ok(Vcpu::new(self.inner.shared.clone(), index))
    }

    fn vcpu_index(&self, id: u32) -> Result<usize> {
        usize::try_from(id)
            .ok()
            .filter(|&i| i < self.inner.shared.vcpus.len())
            .ok_or(Error::NoSuchVcpu(id))
    }

    /// The table slot of vcpu `id`, whose address stays stable as long as
    /// any connection sharing the table lives (used by the C API).
    pub(crate) fn vcpu_slot(&self, id: u32) -> Result<&VcpuSlot> {
        let index = self.vcpu_index(id)?;
        Ok(&self.inner.shared.vcpus[index])
    }
}
