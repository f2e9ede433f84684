//! `MainRequest` → `MainResponse`: a plain function over a [`Vm`] and the
//! host resources in [`HostServices`], so the same code runs on real KVM, in
//! unit tests and under the fuzzer.

use std::fs::File;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{lseek, Whence};
use plugin_proto::cpuid::{self, Side};
use plugin_proto::protobuf::Message;
use plugin_proto::{main_request, CpuidEntry, MainRequest, MainResponse};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;
use vmm_sys_util::eventfd::EventFd;

use super::objects::{
    CallHint, ExitConfig, Object, ObjectTable, Refused, RegHint, SharedExitConfig,
};
use crate::limits;
use crate::vm::{borrow_fd, Cpuid, IrqRoute, Space, Vm, VmStateKind};

/// The first tap's description for `GetNetConfig`.
pub struct NetConfig<'a> {
    pub mac: [u8; 6],
    /// Octets in network order.
    pub ip: [u8; 4],
    pub netmask: [u8; 4],
    pub fd: BorrowedFd<'a>,
}

/// Host resources the handler hands out or acts on, besides the VM.
pub trait HostServices {
    fn vcpu_count(&self) -> usize;
    /// [request-pipe write end, response-pipe read end] of vcpu `i`.
    fn vcpu_fds(&self, i: usize) -> [BorrowedFd<'_>; 2];
    /// The shared-memory channel memfd of vcpu `i`, when the host offers the
    /// fast channel.
    fn fast_channel_fd(&self, i: usize) -> Option<BorrowedFd<'_>>;
    fn shutdown_eventfd(&self) -> BorrowedFd<'_>;
    /// `Ok(None)` when no tap is configured.
    fn net_config(&self) -> Result<Option<NetConfig<'_>>, Errno>;
    /// Records a pause of the masked vcpus (delivered as `User` events).
    fn pause_vcpus(&self, mask: u64, user: u64);
    /// Number of main connections currently served.
    fn connection_count(&self) -> usize;
    /// Whether a reply may carry `n` more descriptors: the host bounds the
    /// descriptors it has sent that the plugin has not received yet, since
    /// the kernel counts them against a limit shared by every process of
    /// the host's uid. `false` → the request fails with `ETOOMANYREFS`.
    fn may_send_fds(&self, n: usize) -> bool {
        let _ = n;
        true
    }
    /// `GetControlSocket` (docs/protocol-extensions.md §5): opens the
    /// plugin's control channel and returns the plugin's end. `EEXIST`
    /// while one is open. A host without the channel answers `ENOTSUP`.
    fn open_control_channel(&self) -> Result<OwnedFd, Errno> {
        Err(Errno::ENOTSUP)
    }
    /// Fast reset (docs/protocol-extensions.md §7): takes the in-memory
    /// snapshot (returns the bytes of guest memory copied) or resets to it
    /// (returns the pages copied back). A host without it: `ENOTSUP`.
    fn fast_reset(&self, state: &MainState, op: FastReset<'_>) -> Result<u64, Refused> {
        let _ = (state, op);
        Err(Refused::new(
            Errno::ENOTSUP,
            "this host does not offer fast reset",
        ))
    }
}

/// The fast-reset requests (docs/protocol-extensions.md §7).
#[derive(Debug, Clone, Copy)]
pub enum FastReset<'a> {
    /// `SnapshotInMemory`.
    Snapshot,
    /// `ResetToSnapshot` with the pages the plugin wrote itself.
    Reset(&'a [u64]),
}

/// State owned by the main loop and changed only by main requests.
pub struct MainState {
    pub objects: ObjectTable,
    pub exit_config: ExitConfig,
    pub shared_exit: Arc<SharedExitConfig>,
    pub started: bool,
    /// The vcpu channels use shared memory (granted by `GetVcpus` before
    /// `Start`).
    pub fast_channel: bool,
    /// The GSIs the VM's interrupt routing table covers: KVM's default
    /// table (the in-kernel irqchip's 24 IOAPIC pins, which include the
    /// PIC's 16) until the plugin installs its own with `SetIrqRouting`,
    /// then exactly the GSIs that table routes. `SetIrq` on any other line
    /// is `EINVAL` (`KVM_IRQ_LINE` itself returns 0 for them and does
    /// nothing).
    pub routed_gsis: std::collections::BTreeSet<u32>,
    /// Bytes of guest memory registered, and the bounds on them.
    pub guest_memory: u64,
    pub memory_limits: limits::GuestMemoryLimits,
    /// Coalesced ranges reserved now (bounded by
    /// [`limits::MAX_COALESCED_RANGES`]).
    pub coalesced_ranges: usize,
    /// The routing table the plugin set (`None`: KVM's default), for a
    /// snapshot.
    pub irq_routes: Option<Vec<IrqRoute>>,
    /// The identity-map address the plugin set, for a snapshot.
    pub identity_map: Option<u64>,
    /// `--restore`: what `GetRestoreState` answers.
    pub restore: Option<RestoreOffer>,
    /// Hot restart (docs/protocol-extensions.md §9).
    pub restart: super::restart::RestartState,
}

/// What a restoring host offers the plugin (`GetRestoreState`).
#[derive(Debug, Default)]
pub struct RestoreOffer {
    /// The plugin's device state from the snapshot (empty: taken without).
    pub device: Vec<u8>,
    /// The plugin asked for it.
    pub asked: bool,
}

/// GSIs of KVM's default routing table with the in-kernel irqchip.
pub const DEFAULT_GSIS: u32 = 24;

impl MainState {
    pub fn new(shared_exit: Arc<SharedExitConfig>) -> Self {
        MainState {
            objects: ObjectTable::default(),
            exit_config: ExitConfig::default(),
            shared_exit,
            started: false,
            fast_channel: false,
            routed_gsis: (0..DEFAULT_GSIS).collect(),
            guest_memory: 0,
            memory_limits: limits::GuestMemoryLimits::from_host(),
            coalesced_ranges: 0,
            irq_routes: None,
            identity_map: None,
            restore: None,
            restart: Default::default(),
        }
    }

    fn publish(&self) {
        self.shared_exit.publish(self.exit_config.clone());
    }
}

/// What to send back, and side effects for the main loop.
#[derive(Default)]
pub struct Reply {
    pub response: MainResponse,
    pub fds: Vec<OwnedFd>,
    /// Extra packets that follow the response (chunked `GetVcpus`).
    pub follow_ups: Vec<(MainResponse, Vec<OwnedFd>)>,
    /// Host end of a new main connection to serve.
    pub new_connection: Option<OwnedFd>,
    /// Why the request was refused, for the host's debug log: the request
    /// and its arguments (only described when debug logging is on), the
    /// errno and the reason. The wire reply carries only the errno.
    pub refused: Option<String>,
}

impl Reply {
    fn with(response: MainResponse) -> Self {
        Reply {
            response,
            ..Default::default()
        }
    }
}

/// Why a request could not even be answered (the connection is dropped).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("undecodable MainRequest")]
    Decode(#[source] plugin_proto::protobuf::Error),
    #[error("malformed MainRequest")]
    Malformed(#[source] plugin_proto::framing::FramingError),
}

type Outcome = Result<Reply, Refused>;

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    fd.try_clone_to_owned()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))
}

/// A close-on-exec counter-mode eventfd, as handed to plugins.
pub fn new_eventfd() -> Result<EventFd, Errno> {
    EventFd::new(libc::EFD_CLOEXEC).map_err(|e| io_errno(&e))
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL))
}

fn space(
    v: plugin_proto::protobuf::EnumOrUnknown<plugin_proto::AddressSpace>,
) -> Result<Space, Refused> {
    Space::from_wire(v.value()).ok_or_else(|| {
        Refused::new(
            Errno::EINVAL,
            format!("unknown address space {}", v.value()),
        )
    })
}

fn refuse<T>(errno: Errno, reason: impl Into<String>) -> Result<T, Refused> {
    Err(Refused::new(errno, reason))
}

/// The response member matching a request, selected even on error (as the
/// reference host does), so clients that look at it are not surprised.
fn response_for(req: &main_request::Message) -> MainResponse {
    use main_request::Message as Q;
    let mut r = MainResponse::new();
    match req {
        Q::Create(_) => r.set_create(Default::default()),
        Q::Destroy(_) => r.set_destroy(Default::default()),
        Q::NewConnection(_) => r.set_new_connection(Default::default()),
        Q::GetShutdownEventfd(_) => r.set_get_shutdown_eventfd(Default::default()),
        Q::CheckExtension(_) => r.set_check_extension(Default::default()),
        Q::GetSupportedCpuid(_) => r.set_get_supported_cpuid(Default::default()),
        Q::GetEmulatedCpuid(_) => r.set_get_emulated_cpuid(Default::default()),
        Q::GetMsrIndexList(_) => r.set_get_msr_index_list(Default::default()),
        Q::GetNetConfig(_) => {}
        Q::ReserveRange(_) => r.set_reserve_range(Default::default()),
        Q::SetIrq(_) => r.set_set_irq(Default::default()),
        Q::SetIrqRouting(_) => r.set_set_irq_routing(Default::default()),
        Q::GetState(_) => r.set_get_state(Default::default()),
        Q::SetState(_) => r.set_set_state(Default::default()),
        Q::SetIdentityMapAddr(_) => r.set_set_identity_map_addr(Default::default()),
        Q::PauseVcpus(_) => r.set_pause_vcpus(Default::default()),
        Q::GetVcpus(_) => r.set_get_vcpus(Default::default()),
        Q::Start(_) => r.set_start(Default::default()),
        Q::SetCallHint(_) => r.set_set_call_hint(Default::default()),
        Q::DirtyLog(_) => r.set_dirty_log(Default::default()),
        Q::GetControlSocket(_) => r.set_get_control_socket(Default::default()),
        Q::GetRestoreState(_) => r.set_get_restore_state(Default::default()),
        Q::SnapshotInMemory(_) => r.set_snapshot_in_memory(Default::default()),
        Q::ResetToSnapshot(_) => r.set_reset_to_snapshot(Default::default()),
        Q::DeclareRestartable(_) => r.set_declare_restartable(Default::default()),
        Q::Attach(_) => r.set_attach(Default::default()),
        _ => {}
    }
    r
}

/// Handles one request packet. `fds` are the descriptors that came with it;
/// `fds_truncated` says the sender attached more than the host accepts.
pub fn handle(
    state: &mut MainState,
    vm: &impl Vm,
    services: &impl HostServices,
    bytes: &[u8],
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
) -> Result<Reply, HandlerError> {
    // rust-protobuf would take a request cut short inside a field for a
    // complete one; refuse it like any undecodable packet.
    plugin_proto::framing::check_lengths(bytes, &[]).map_err(HandlerError::Malformed)?;
    let request = MainRequest::parse_from_bytes(bytes).map_err(HandlerError::Decode)?;
    Ok(handle_request(
        state,
        vm,
        services,
        request,
        fds,
        fds_truncated,
    ))
}

/// Handles one decoded request.
pub fn handle_request(
    state: &mut MainState,
    vm: &impl Vm,
    services: &impl HostServices,
    request: MainRequest,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
) -> Reply {
    // Described before the request is taken apart, and only when the
    // description can be logged.
    let what = log::log_enabled!(log::Level::Debug)
        .then(|| plugin_proto::describe::main_request(&request));
    let Some(msg) = request.message else {
        let mut r = MainResponse::new();
        r.errno = Errno::ENOTTY as i32;
        return Reply {
            refused: what.map(|w| format!("{w} refused: ENOTTY: the request has no message")),
            ..Reply::with(r)
        };
    };
    // A packet with two or more descriptors counts as carrying none.
    let fd = if fds.len() == 1 && !fds_truncated {
        fds.into_iter().next()
    } else {
        None
    };
    let base = response_for(&msg);
    use main_request::Message as Q;
    // Descriptors this request's reply may carry, checked against the
    // budget of descriptors in flight before anything is created.
    let fd_cost = match &msg {
        Q::GetVcpus(_) => 3 * services.vcpu_count(),
        Q::Create(_) => 2,
        Q::NewConnection(_)
        | Q::GetShutdownEventfd(_)
        | Q::GetNetConfig(_)
        | Q::GetControlSocket(_) => 1,
        _ => 0,
    };
    let outcome = if fd_cost > 0 && !services.may_send_fds(fd_cost) {
        refuse(
            Errno::ETOOMANYREFS,
            format!(
                "the reply would carry {fd_cost} descriptors, more than the budget of \
                 descriptors sent but not yet received allows"
            ),
        )
    } else {
        dispatch(state, vm, services, msg, fd, &base)
    };
    outcome.unwrap_or_else(|e| {
        let mut r = base;
        r.errno = e.errno as i32;
        Reply {
            refused: what.map(|w| format!("{w} refused: {e}")),
            ..Reply::with(r)
        }
    })
}

fn dispatch(
    state: &mut MainState,
    vm: &impl Vm,
    services: &impl HostServices,
    msg: main_request::Message,
    fd: Option<OwnedFd>,
    base: &MainResponse,
) -> Outcome {
    use main_request::Message as Q;
    let ok = |r: MainResponse| Ok(Reply::with(r));
    match msg {
        Q::Create(c) => create(state, vm, c, fd, base.clone()),
        Q::Destroy(d) => {
            destroy(state, vm, d.id)?;
            ok(base.clone())
        }
        Q::NewConnection(_) => new_connection(services, base.clone()),
        Q::GetShutdownEventfd(_) => Ok(Reply {
            fds: vec![dup(services.shutdown_eventfd())?],
            ..Reply::with(base.clone())
        }),
        Q::CheckExtension(c) => {
            let mut r = base.clone();
            r.mut_check_extension().has_extension = vm.check_extension(c.extension) == 1;
            ok(r)
        }
        Q::GetSupportedCpuid(_) => {
            let entries = vm.supported_cpuid()?;
            let mut r = base.clone();
            r.mut_get_supported_cpuid().entries = host_cpuid(&entries);
            ok(r)
        }
        Q::GetEmulatedCpuid(_) => {
            let entries = vm.emulated_cpuid()?;
            let mut r = base.clone();
            r.mut_get_emulated_cpuid().entries = host_cpuid(&entries);
            ok(r)
        }
        Q::GetMsrIndexList(_) => {
            let indices = vm.msr_index_list()?;
            let mut r = base.clone();
            r.mut_get_msr_index_list().indices = indices;
            ok(r)
        }
        Q::GetNetConfig(_) => net_config(services),
        Q::ReserveRange(rr) => {
            reserve_range(vm, state, rr)?;
            ok(base.clone())
        }
        Q::SetIrq(s) if !state.routed_gsis.contains(&s.irq_id) => refuse(
            Errno::EINVAL,
            format!("irq {} is not routed by the VM's routing table", s.irq_id),
        ),
        Q::SetIrq(s) => {
            vm.set_irq_line(s.irq_id, s.active)?;
            ok(base.clone())
        }
        Q::SetIrqRouting(s) => {
            let (gsis, routes) = set_irq_routing(vm, s)?;
            state.routed_gsis = gsis;
            state.irq_routes = Some(routes);
            ok(base.clone())
        }
        Q::GetState(g) => {
            let set = VmStateKind::from_wire(g.set.value()).ok_or_else(|| {
                Refused::new(
                    Errno::EINVAL,
                    format!("unknown VM state set {}", g.set.value()),
                )
            })?;
            let mut r = base.clone();
            r.mut_get_state().state = vm.get_state(set)?;
            ok(r)
        }
        Q::SetState(s) => {
            set_state(vm, s)?;
            ok(base.clone())
        }
        Q::SetIdentityMapAddr(_) if state.started => {
            refuse(Errno::EINVAL, "the VM has already started")
        }
        Q::SetIdentityMapAddr(s) => {
            vm.set_identity_map_addr(u64::from(s.address))?;
            state.identity_map = Some(u64::from(s.address));
            ok(base.clone())
        }
        Q::PauseVcpus(p) => {
            services.pause_vcpus(p.cpu_mask, p.user);
            ok(base.clone())
        }
        Q::GetVcpus(g) => get_vcpus(state, services, &g, base.clone()),
        Q::Start(_) if state.started && super::restart::start(state) => ok(base.clone()),
        Q::Start(_) if state.started => refuse(Errno::EINVAL, "the VM has already started"),
        Q::Start(_) => {
            state.started = true;
            ok(base.clone())
        }
        Q::SetCallHint(h) => {
            set_call_hint(state, h)?;
            ok(base.clone())
        }
        Q::DirtyLog(d) => {
            let mut r = base.clone();
            r.mut_dirty_log().bitmap = dirty_log(state, vm, d.id)?;
            ok(r)
        }
        Q::GetRestoreState(_) => {
            let mut r = base.clone();
            if let Some(offer) = &mut state.restore {
                offer.asked = true;
                let g = r.mut_get_restore_state();
                g.restoring = true;
                g.state = offer.device.clone();
            }
            ok(r)
        }
        Q::SnapshotInMemory(_) => {
            let mut r = base.clone();
            r.mut_snapshot_in_memory().bytes = services.fast_reset(state, FastReset::Snapshot)?;
            ok(r)
        }
        Q::ResetToSnapshot(q) => {
            let mut r = base.clone();
            r.mut_reset_to_snapshot().pages =
                services.fast_reset(state, FastReset::Reset(&q.plugin_dirty_pages))?;
            ok(r)
        }
        Q::DeclareRestartable(_) => {
            super::restart::declare(state, fd)?;
            ok(base.clone())
        }
        Q::Attach(_) => super::restart::attach(
            state,
            services.vcpu_count(),
            |n| services.may_send_fds(n),
            base.clone(),
        ),
        Q::GetControlSocket(_) => {
            let fd = services.open_control_channel().map_err(|e| {
                Refused::new(
                    e,
                    if e == Errno::EEXIST {
                        "the plugin's control channel is already open"
                    } else {
                        "the host cannot open a control channel"
                    },
                )
            })?;
            Ok(Reply {
                fds: vec![fd],
                ..Reply::with(base.clone())
            })
        }
        _ => refuse(Errno::ENOTTY, "unknown request"),
    }
}

fn host_cpuid(entries: &[Cpuid]) -> Vec<CpuidEntry> {
    entries
        .iter()
        .map(|c| cpuid::to_wire(c, Side::Host))
        .collect()
}

fn create(
    state: &mut MainState,
    vm: &impl Vm,
    c: main_request::Create,
    fd: Option<OwnedFd>,
    base: MainResponse,
) -> Outcome {
    use main_request::create::Constructor;
    if state.objects.contains(c.id) {
        return refuse(Errno::EEXIST, format!("object id {} is in use", c.id));
    }
    let Some(constructor) = c.constructor else {
        return refuse(Errno::ENOTTY, "no constructor");
    };
    if state.objects.len() >= limits::MAX_OBJECTS {
        return refuse(
            Errno::ENOSPC,
            format!(
                "the VM already has {} objects (the limit)",
                limits::MAX_OBJECTS
            ),
        );
    }
    let mut reply = Reply::with(base);
    let obj = match constructor {
        Constructor::IoEvent(io) => {
            let space = space(io.space)?;
            if !matches!(io.length, 0 | 1 | 2 | 4 | 8) {
                return refuse(
                    Errno::EINVAL,
                    format!("datamatch length {} is not 0, 1, 2, 4 or 8", io.length),
                );
            }
            let datamatch = match io.length {
                0 => 0,
                8 => io.datamatch,
                n => io.datamatch & ((1u64 << (8 * n)) - 1),
            };
            if let Some(r) = state
                .exit_config
                .reservations
                .lookup(space, io.address)
                .filter(|r| r.coalesced)
            {
                return refuse(
                    Errno::EPERM,
                    format!(
                        "{:#x} is in the coalesced range {:#x}..{:#x}",
                        io.address,
                        r.start,
                        r.start + r.length
                    ),
                );
            }
            let evt = new_eventfd()?;
            vm.register_ioevent(&evt, space, io.address, io.length, datamatch)?;
            match dup(borrow_fd(&evt)) {
                Ok(fd) => reply.fds.push(fd),
                Err(e) => {
                    let _ = vm.unregister_ioevent(&evt, space, io.address, io.length, datamatch);
                    return Err(e.into());
                }
            }
            Object::IoEvent {
                evt,
                space,
                address: io.address,
                length: io.length,
                datamatch,
            }
        }
        Constructor::Memory(m) => {
            let fd = fd.ok_or_else(|| {
                Refused::new(
                    Errno::EBADF,
                    "the request did not carry exactly one descriptor (the memfd)",
                )
            })?;
            let obj = create_memory(state, vm, m, fd)?;
            if let Object::Memory { length, .. } = &obj {
                state.guest_memory += *length;
            }
            obj
        }
        Constructor::IrqEvent(irq) => {
            let trigger = new_eventfd()?;
            let resample = new_eventfd()?;
            vm.register_irqfd(&trigger, &resample, irq.irq_id)?;
            match dup(borrow_fd(&trigger)) {
                Ok(fd) => reply.fds.push(fd),
                Err(e) => {
                    let _ = vm.unregister_irqfd(&trigger, irq.irq_id);
                    return Err(e.into());
                }
            }
            // SAFETY: into_raw_fd hands over sole ownership of the descriptor.
            reply
                .fds
                .push(unsafe { OwnedFd::from_raw_fd(resample.into_raw_fd()) });
            Object::IrqEvent {
                trigger,
                gsi: irq.irq_id,
            }
        }
        _ => return refuse(Errno::ENOTTY, "unknown constructor"),
    };
    state.objects.insert(c.id, obj);
    Ok(reply)
}

fn create_memory(
    state: &MainState,
    vm: &impl Vm,
    m: main_request::create::Memory,
    fd: OwnedFd,
) -> Result<Object, Refused> {
    let size = lseek(&fd, 0, Whence::SeekEnd)?;
    let size = u64::try_from(size).map_err(|_| Errno::EINVAL)?;
    let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(|e| {
        Refused::new(
            e,
            format!("the descriptor is not a sealable memfd ({})", e.desc()),
        )
    })?;
    if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
        return refuse(
            Errno::EPERM,
            "the memfd is not sealed against shrinking (F_SEAL_SHRINK)",
        );
    }
    let end = m
        .offset
        .checked_add(m.length)
        .ok_or_else(|| Refused::new(Errno::EOVERFLOW, "offset + length overflows"))?;
    if end > size {
        return refuse(
            Errno::EINVAL,
            format!("offset + length {end:#x} is beyond the memfd's size {size:#x}"),
        );
    }
    if m.start.checked_add(m.length).is_none() {
        return refuse(Errno::EOVERFLOW, "guest address + length overflows");
    }
    if m.length == 0 {
        return refuse(Errno::EINVAL, "the length is 0");
    }
    // KVM allocates two dirty bitmaps for a dirty-logged slot, sized by the
    // region (256 MiB each for its largest slot), and a bitmap over the
    // limit could never be read back (`dirty_log`): refuse it up front.
    if m.dirty_log && dirty_bitmap_len(m.length) > limits::MAX_DIRTY_BITMAP {
        return refuse(
            Errno::E2BIG,
            "the region's dirty bitmap would exceed the host's limit",
        );
    }
    // Bounded before anything is mapped: KVM allocates per-page metadata
    // for a slot (charged to vmm, not to the plugin whose sparse memfd
    // costs nothing) and walks it on registration, so an unbounded region
    // costs host memory and stalls the main loop.
    if !state.memory_limits.allows(state.guest_memory, m.length) {
        return refuse(
            Errno::ENOMEM,
            format!(
                "{:#x} more bytes would exceed the guest memory limit ({:#x} registered)",
                m.length, state.guest_memory
            ),
        );
    }
    let length = usize::try_from(m.length).map_err(|_| Errno::EINVAL)?;
    let slot = state
        .objects
        .free_slot(vm.max_memory_slots())
        .ok_or_else(|| Refused::new(Errno::ENOSPC, "every KVM memory slot is in use"))?;
    // Read-only regions are mapped read-only, so a memfd sealed against
    // writes can back them.
    let prot = if m.read_only {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    let mapping = MmapRegion::build(
        Some(FileOffset::new(File::from(fd), m.offset)),
        length,
        prot,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
    )
    .map_err(|e| match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => io_errno(&io),
        _ => Errno::EINVAL,
    })?;
    // SAFETY: `mapping` is stored in the object table with the slot and is
    // only dropped after the slot has been removed (see `destroy`).
    unsafe {
        vm.add_memory_slot(
            slot,
            m.start,
            m.length,
            mapping.as_ptr() as u64,
            m.read_only,
            m.dirty_log,
        )
    }?;
    Ok(Object::Memory {
        slot,
        start: m.start,
        length: m.length,
        dirty_log: m.dirty_log,
        mapping,
    })
}

/// Unregisters and forgets an object. The object is gone from the table even
/// when the teardown fails (reference behaviour kept, quirk 10 of
/// docs/differences-from-crosvm.md).
pub fn destroy(state: &mut MainState, vm: &impl Vm, id: u32) -> Result<(), Refused> {
    let obj = state
        .objects
        .remove(id)
        .ok_or_else(|| Refused::new(Errno::ENOENT, format!("no object has id {id}")))?;
    let length = match &obj {
        Object::Memory { length, .. } => *length,
        _ => 0,
    };
    let r = teardown(vm, obj);
    // A slot KVM failed to remove keeps its mapping (leaked) and its charge.
    if r.is_ok() {
        state.guest_memory = state.guest_memory.saturating_sub(length);
    }
    Ok(r?)
}

/// Undoes what `create` registered with the VM.
pub fn teardown(vm: &impl Vm, obj: Object) -> Result<(), Errno> {
    match obj {
        Object::IoEvent {
            evt,
            space,
            address,
            length,
            datamatch,
        } => vm.unregister_ioevent(&evt, space, address, length, datamatch),
        Object::Memory {
            slot,
            start,
            mapping,
            ..
        } => {
            let r = vm.remove_memory_slot(slot, start);
            if r.is_err() {
                // KVM may still reference the pages: leaking the mapping is
                // the only safe choice.
                std::mem::forget(mapping);
            }
            r
        }
        Object::IrqEvent { trigger, gsi } => vm.unregister_irqfd(&trigger, gsi),
    }
}

fn new_connection(services: &impl HostServices, base: MainResponse) -> Outcome {
    if services.connection_count() >= limits::MAX_CONNECTIONS {
        return refuse(
            Errno::EMFILE,
            format!(
                "{} connections are open (the limit)",
                limits::MAX_CONNECTIONS
            ),
        );
    }
    // Only the host's end is non-blocking (the main loop must never stall on
    // it). The plugin's end must block like the first connection's: the file
    // status flags travel with the descriptor, and a non-blocking plugin end
    // makes the client's receive race the reply (EAGAIN).
    let (host, plugin) = seqpacket_pair()?;
    Ok(Reply {
        fds: vec![plugin],
        new_connection: Some(host),
        ..Reply::with(base)
    })
}

fn net_config(services: &impl HostServices) -> Outcome {
    let cfg = services
        .net_config()?
        .ok_or_else(|| Refused::new(Errno::ENODATA, "no tap is configured (--net)"))?;
    let mut r = MainResponse::new();
    let n = r.mut_get_net_config();
    n.host_mac_address = cfg.mac.to_vec();
    n.host_ipv4_address = u32::from_le_bytes(cfg.ip);
    n.netmask = u32::from_le_bytes(cfg.netmask);
    Ok(Reply {
        fds: vec![dup(cfg.fd)?],
        ..Reply::with(r)
    })
}

fn reserve_range(
    vm: &impl Vm,
    state: &mut MainState,
    rr: main_request::ReserveRange,
) -> Result<(), Refused> {
    let space = space(rr.space)?;
    if rr.length == 0 {
        let removed = state.exit_config.reservations.starting_at(space, rr.start);
        if let Some(r) = removed.filter(|r| r.coalesced) {
            // Registered with this length, which fits u32 (checked below).
            vm.unregister_coalesced(space, r.start, r.length as u32)
                .map_err(|e| Refused::new(e, "KVM_UNREGISTER_COALESCED_MMIO failed".to_string()))?;
            state.coalesced_ranges -= 1;
        }
        state.exit_config.reservations.unreserve(space, rr.start)?;
    } else if rr.coalesced {
        reserve_coalesced(vm, state, space, rr.start, rr.length)?;
    } else {
        let reservations = &mut state.exit_config.reservations;
        reservations.reserve(space, rr.start, rr.length, rr.async_write)?;
    }
    state.publish();
    Ok(())
}

/// A coalesced range (docs/protocol-extensions.md §4.1): checked like any
/// reservation, plus its own bounds; then registered with KVM.
fn reserve_coalesced(
    vm: &impl Vm,
    state: &mut MainState,
    space: Space,
    start: u64,
    length: u64,
) -> Result<(), Refused> {
    let Ok(len32) = u32::try_from(length) else {
        return refuse(
            Errno::EINVAL,
            format!("a coalesced range is at most 4 GiB - 1 long, not {length:#x}"),
        );
    };
    if space == Space::Ioport && start.saturating_add(length) > 0x1_0000 {
        return refuse(
            Errno::EINVAL,
            format!("ports {start:#x} + {length:#x} go beyond port 0xffff"),
        );
    }
    if state.coalesced_ranges >= limits::MAX_COALESCED_RANGES {
        return refuse(
            Errno::ENOSPC,
            format!(
                "the VM already has {} coalesced ranges (the limit)",
                limits::MAX_COALESCED_RANGES
            ),
        );
    }
    // An ioeventfd inside the range would compete with the coalescing for
    // the same writes in KVM's io bus: refused either way round.
    let end = start.saturating_add(length);
    let ioevent = state.objects.iter().find_map(|(id, o)| match o {
        Object::IoEvent {
            space: s, address, ..
        } if *s == space && (start..end).contains(address) => Some((*id, *address)),
        _ => None,
    });
    if let Some((id, address)) = ioevent {
        return refuse(
            Errno::EPERM,
            format!("overlaps the ioeventfd {id} at {address:#x}"),
        );
    }
    state
        .exit_config
        .reservations
        .reserve_coalesced(space, start, length)?;
    if let Err(e) = vm.register_coalesced(space, start, len32) {
        let _ = state.exit_config.reservations.unreserve(space, start);
        return refuse(e, "KVM_REGISTER_COALESCED_MMIO failed");
    }
    state.coalesced_ranges += 1;
    state.exit_config.coalesced = true;
    Ok(())
}

/// Installs the routing table; returns the GSIs it routes.
fn set_irq_routing(
    vm: &impl Vm,
    s: main_request::SetIrqRouting,
) -> Result<(std::collections::BTreeSet<u32>, Vec<IrqRoute>), Refused> {
    use main_request::set_irq_routing::route::Route as R;
    if s.routes.len() > limits::MAX_IRQ_ROUTES {
        return refuse(
            Errno::E2BIG,
            format!(
                "{} routes, more than the limit of {}",
                s.routes.len(),
                limits::MAX_IRQ_ROUTES
            ),
        );
    }
    let routes = s
        .routes
        .iter()
        .map(|r| match &r.route {
            Some(R::Irqchip(c)) => Ok(IrqRoute::Irqchip {
                gsi: r.irq_id,
                chip: c.irqchip,
                pin: c.pin,
            }),
            Some(R::Msi(m)) => Ok(IrqRoute::Msi {
                gsi: r.irq_id,
                address: m.address,
                data: m.data,
            }),
            _ => Err(Refused::new(
                Errno::EINVAL,
                format!("the route of irq {} is neither irqchip nor msi", r.irq_id),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    vm.set_gsi_routing(&routes)?;
    Ok((s.routes.iter().map(|r| r.irq_id).collect(), routes))
}

fn set_state(vm: &impl Vm, s: main_request::SetState) -> Result<(), Refused> {
    let set = VmStateKind::from_wire(s.set.value()).ok_or_else(|| {
        Refused::new(
            Errno::EINVAL,
            format!("unknown VM state set {}", s.set.value()),
        )
    })?;
    if s.state.len() != set.size() {
        return refuse(
            Errno::EINVAL,
            format!(
                "the state is {} bytes, the set takes {}",
                s.state.len(),
                set.size()
            ),
        );
    }
    Ok(vm.set_state(set, &s.state)?)
}

fn get_vcpus(
    state: &mut MainState,
    services: &impl HostServices,
    g: &main_request::GetVcpus,
    base: MainResponse,
) -> Outcome {
    let n = services.vcpu_count();
    let offered = n > 0 && services.fast_channel_fd(0).is_some();
    let fast = if state.fast_channel {
        // The channels already run over shared memory: a client that cannot
        // use it would never be served.
        if !g.request_fast_channel {
            return refuse(
                Errno::EBUSY,
                "the vcpu channels already run over shared memory and this client did not ask for it",
            );
        }
        true
    } else {
        let grant = g.request_fast_channel && offered && !state.started;
        state.fast_channel = grant;
        grant
    };
    let per_vcpu = if fast { 3 } else { 2 };
    let mut all = Vec::with_capacity(per_vcpu * n);
    for i in 0..n {
        for fd in services.vcpu_fds(i) {
            all.push(dup(fd)?);
        }
        if fast {
            all.push(dup(services.fast_channel_fd(i).ok_or(Errno::EIO)?)?);
        }
    }
    // Whole vcpus per packet, within SCM_MAX_FD.
    let per_packet = (plugin_proto::framing::SCM_MAX_FD / per_vcpu) * per_vcpu;
    let mut response = base;
    let r = response.mut_get_vcpus();
    r.vcpu_count = u32::try_from(n).unwrap_or(u32::MAX);
    r.fast_channel = fast;
    let rest = all.split_off(all.len().min(per_packet));
    let mut reply = Reply {
        fds: all,
        ..Reply::with(response.clone())
    };
    if g.accept_chunked_fds {
        let mut rest = rest.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<OwnedFd> = rest.by_ref().take(per_packet).collect();
            reply.follow_ups.push((response.clone(), chunk));
        }
    }
    Ok(reply)
}

fn set_call_hint(state: &mut MainState, h: main_request::SetCallHint) -> Result<(), Refused> {
    let space = space(h.space)?;
    if h.hints.len() > limits::MAX_CALL_HINT_DETAILS {
        return refuse(
            Errno::E2BIG,
            format!(
                "{} hints, more than the limit of {}",
                h.hints.len(),
                limits::MAX_CALL_HINT_DETAILS
            ),
        );
    }
    state.exit_config.hint = if h.address == 0 {
        CallHint::default()
    } else {
        CallHint {
            space: Some(space),
            address: h.address,
            on_write: h.on_write,
            hints: h
                .hints
                .iter()
                .map(|d| RegHint {
                    rax: d.match_rax.then_some(d.rax),
                    rbx: d.match_rbx.then_some(d.rbx),
                    rcx: d.match_rcx.then_some(d.rcx),
                    rdx: d.match_rdx.then_some(d.rdx),
                    send_sregs: d.send_sregs,
                    send_debugregs: d.send_debugregs,
                })
                .collect(),
        }
    };
    state.publish();
    Ok(())
}

/// Bytes of a dirty bitmap for a region: one bit per 4 KiB page.
/// Whether this main request must wait for an incoming migration's
/// stream (`GetRestoreState`, `Start`).
pub fn waits_for_incoming(packet: &[u8]) -> bool {
    use main_request::Message as Q;
    matches!(
        MainRequest::parse_from_bytes(packet).map(|r| r.message),
        Ok(Some(Q::GetRestoreState(_) | Q::Start(_)))
    )
}

pub fn dirty_bitmap_len(length: u64) -> usize {
    let pages = length.div_ceil(4096);
    usize::try_from(pages.div_ceil(8)).unwrap_or(usize::MAX)
}

fn dirty_log(state: &MainState, vm: &impl Vm, id: u32) -> Result<Vec<u8>, Refused> {
    match state.objects.get(id) {
        Some(Object::Memory { slot, length, .. }) => {
            let len = dirty_bitmap_len(*length);
            // The region's length is the plugin's choice: bound the bitmap
            // before anything is allocated for it.
            if len > limits::MAX_DIRTY_BITMAP {
                return refuse(Errno::E2BIG, "the dirty bitmap exceeds the host's limit");
            }
            Ok(vm.get_dirty_log(*slot, *length, len)?)
        }
        Some(_) => refuse(Errno::ENOENT, format!("object {id} is not a memory region")),
        None => refuse(Errno::ENOENT, format!("no object has id {id}")),
    }
}

/// A `SOCK_SEQPACKET` pair for a new channel to the plugin: the host's end
/// non-blocking (the main loop never waits on the plugin), the plugin's end
/// blocking (its status flags travel with the descriptor).
pub(crate) fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), Errno> {
    let (host, plugin) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    fcntl(&host, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    Ok((host, plugin))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Just enough host for requests that do not touch vcpus or taps.
    struct Stub {
        shutdown: EventFd,
    }

    impl HostServices for Stub {
        fn vcpu_count(&self) -> usize {
            0
        }
        fn vcpu_fds(&self, _: usize) -> [BorrowedFd<'_>; 2] {
            unreachable!("no vcpus")
        }
        fn fast_channel_fd(&self, _: usize) -> Option<BorrowedFd<'_>> {
            None
        }
        fn shutdown_eventfd(&self) -> BorrowedFd<'_> {
            borrow_fd(&self.shutdown)
        }
        fn net_config(&self) -> Result<Option<NetConfig<'_>>, Errno> {
            Ok(None)
        }
        fn pause_vcpus(&self, _: u64, _: u64) {}
        fn connection_count(&self) -> usize {
            1
        }
    }

    fn status_flags(fd: &OwnedFd) -> OFlag {
        OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap())
    }

    #[test]
    fn new_connection_plugin_end_blocks_host_end_does_not() {
        let stub = Stub {
            shutdown: new_eventfd().unwrap(),
        };
        let reply = new_connection(&stub, MainResponse::new()).unwrap();
        let host = reply.new_connection.expect("host end");
        assert_eq!(reply.fds.len(), 1);
        // The plugin's client does blocking receives on its end.
        assert!(!status_flags(&reply.fds[0]).contains(OFlag::O_NONBLOCK));
        // The main loop must never block on the host end.
        assert!(status_flags(&host).contains(OFlag::O_NONBLOCK));
    }
}
