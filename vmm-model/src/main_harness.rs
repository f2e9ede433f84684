//! Drives the real main request handler ([`main_handler::handle`]) with
//! hostile packets and descriptors, predicts what each request must do, and
//! checks the host state and the model after every one of them.

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use nix::errno::Errno;
use plugin_proto::protobuf::Message;
use plugin_proto::{main_request, MainRequest, MainResponse};

use super::gen::MainInput;
use super::{invariant, make_fds, open_fd_count, FakeServices, ModelError, ModelVm};
use vmm::limits;
use vmm::record::{records, FdKind, RecordKind};
use vmm::runtime::main_handler::{self, HandlerError, MainState, Reply};
use vmm::runtime::objects::{ExitConfigReader, Object, SharedExitConfig};
use vmm::vm::{KvmVm, Space, Vm};

/// What the harness needs from a VM beyond [`Vm`].
pub trait Inspect: Vm {
    /// Checks the VM against the host's object table.
    fn inspect(&self, state: &MainState) -> Result<(), ModelError>;
    /// The main loop created the vcpus (after `Start`).
    fn vcpus_created(&self) {}
    /// Whether tearing an object down may fail (real KVM) or never (model).
    fn teardown_may_fail(&self) -> bool;
}

impl Inspect for ModelVm {
    fn inspect(&self, state: &MainState) -> Result<(), ModelError> {
        self.check()?;
        let mut slots = self.slots();
        let mut ioevents = self.ioevents();
        let mut irqfds = self.irqfds();
        for (id, obj) in state.objects.iter() {
            match obj {
                Object::Memory {
                    slot,
                    start,
                    length,
                    dirty_log,
                    mapping,
                } => {
                    let s = slots.remove(slot).ok_or_else(|| {
                        invariant(format!("memory {id}: slot {slot} is not installed"))
                    })?;
                    if s.guest_addr != *start
                        || s.size != *length
                        || s.host_addr != mapping.as_ptr() as u64
                        || s.dirty_log != *dirty_log
                    {
                        return Err(invariant(format!(
                            "memory {id}: slot {slot} differs from the object: {s:?}"
                        )));
                    }
                }
                Object::IoEvent {
                    evt,
                    space,
                    address,
                    length,
                    datamatch,
                } => {
                    let reg = super::IoReg {
                        fd: std::os::fd::AsRawFd::as_raw_fd(evt),
                        space: *space,
                        addr: *address,
                        len: *length,
                        datamatch: *datamatch,
                    };
                    let i = ioevents.iter().position(|r| *r == reg).ok_or_else(|| {
                        invariant(format!("io event {id} is not registered: {reg:?}"))
                    })?;
                    ioevents.remove(i);
                }
                Object::IrqEvent { trigger, gsi } => {
                    let reg = super::IrqReg {
                        trigger: std::os::fd::AsRawFd::as_raw_fd(trigger),
                        gsi: *gsi,
                    };
                    let i = irqfds.iter().position(|r| *r == reg).ok_or_else(|| {
                        invariant(format!("irq event {id} is not registered: {reg:?}"))
                    })?;
                    irqfds.remove(i);
                }
            }
        }
        if !slots.is_empty() || !ioevents.is_empty() || !irqfds.is_empty() {
            return Err(invariant(format!(
                "registrations without an object: slots {slots:?}, ioevents {ioevents:?}, irqfds {irqfds:?}"
            )));
        }
        Ok(())
    }

    fn vcpus_created(&self) {
        self.set_vcpus_created();
    }

    fn teardown_may_fail(&self) -> bool {
        false
    }
}

impl Inspect for KvmVm {
    fn inspect(&self, _: &MainState) -> Result<(), ModelError> {
        Ok(())
    }

    fn teardown_may_fail(&self) -> bool {
        true
    }
}

/// Counts of what happened, for reports.
#[derive(Debug, Default, Clone)]
pub struct MainStats {
    pub requests: u64,
    pub undecodable: u64,
    pub ok: u64,
    pub errnos: BTreeMap<i32, u64>,
    pub created: u64,
}

impl MainStats {
    pub fn merge(&mut self, o: &MainStats) {
        self.requests += o.requests;
        self.undecodable += o.undecodable;
        self.ok += o.ok;
        self.created += o.created;
        for (k, v) in &o.errnos {
            *self.errnos.entry(*k).or_default() += v;
        }
    }
}

/// A naive reference implementation of the reservation rules
/// (docs/host-behaviour.md §9, every overlap refused), compared with the host's.
#[derive(Default)]
struct ShadowRanges {
    ranges: Vec<(Space, u64, u64, bool)>,
}

impl ShadowRanges {
    fn apply(&mut self, space: Space, start: u64, length: u64, async_write: bool) -> Errno {
        if length == 0 {
            return match self
                .ranges
                .iter()
                .position(|r| r.0 == space && r.1 == start)
            {
                Some(i) => {
                    self.ranges.remove(i);
                    Errno::UnknownErrno
                }
                None => Errno::ENOENT,
            };
        }
        let same = || self.ranges.iter().filter(move |r| r.0 == space);
        if same().any(|r| start >= r.1 && start - r.1 < r.2) {
            return Errno::EPERM;
        }
        let Some(end) = start.checked_add(length) else {
            return Errno::EINVAL;
        };
        if same().any(|r| r.1 >= start && r.1 < end) {
            return Errno::EPERM;
        }
        if self.ranges.len() >= limits::MAX_RESERVED_RANGES {
            return Errno::ENOSPC;
        }
        self.ranges.push((space, start, length, async_write));
        Errno::UnknownErrno
    }
}

/// The main handler with a VM, fake host services and the predictions.
pub struct MainHarness<V: Inspect> {
    pub state: MainState,
    pub vm: V,
    pub services: FakeServices,
    live: BTreeMap<u32, &'static str>,
    shadow: ShadowRanges,
    pub stats: MainStats,
}

impl MainHarness<ModelVm> {
    /// A harness over the model VM with `vcpus` vcpus and room for
    /// `max_slots` memory slots.
    pub fn with_model(vcpus: usize, max_slots: u32) -> Result<Self, ModelError> {
        MainHarness::new(ModelVm::new(max_slots), vcpus)
    }
}

fn errno_of(r: &MainResponse) -> Errno {
    if r.errno == 0 {
        Errno::UnknownErrno
    } else {
        Errno::from_raw(r.errno)
    }
}

impl<V: Inspect> MainHarness<V> {
    pub fn new(vm: V, vcpus: usize) -> Result<Self, ModelError> {
        Ok(MainHarness {
            state: MainState::new(std::sync::Arc::new(SharedExitConfig::default())),
            vm,
            services: FakeServices::new(vcpus, true)?,
            live: BTreeMap::new(),
            shadow: ShadowRanges::default(),
            stats: MainStats::default(),
        })
    }

    /// Ids of the live objects the harness expects.
    pub fn live_ids(&self) -> Vec<u32> {
        self.live.keys().copied().collect()
    }

    /// The plugin closes one of its extra connections.
    pub fn close_connection(&mut self) {
        self.services.connections.borrow_mut().pop();
    }

    /// Sends one packet with descriptors of `fd_kind`; returns the response,
    /// or `None` when the handler (rightly) refused to decode it.
    pub fn request(
        &mut self,
        bytes: &[u8],
        fd_kind: FdKind,
        fd_arg: u16,
    ) -> Result<Option<MainResponse>, ModelError> {
        let (fds, truncated) = make_fds(fd_kind, fd_arg)?;
        self.request_with(bytes, fds, truncated)
    }

    /// Like [`Self::request`] with prepared descriptors.
    pub fn request_with(
        &mut self,
        bytes: &[u8],
        fds: Vec<std::os::fd::OwnedFd>,
        truncated: bool,
    ) -> Result<Option<MainResponse>, ModelError> {
        self.stats.requests += 1;
        // What the handler may accept: complete framing, then protobuf.
        let decoded = plugin_proto::framing::check_lengths(bytes, &[])
            .map_err(|_| ())
            .and_then(|()| MainRequest::parse_from_bytes(bytes).map_err(|_| ()));
        let had_fd = fds.len() == 1 && !truncated;
        let result = main_handler::handle(
            &mut self.state,
            &self.vm,
            &self.services,
            bytes,
            fds,
            truncated,
        );
        let reply = match (result, decoded) {
            (Err(HandlerError::Decode(_) | HandlerError::Malformed(_)), Err(())) => {
                self.stats.undecodable += 1;
                self.check()?;
                return Ok(None);
            }
            (Err(e), Ok(_)) => {
                return Err(invariant(format!("a decodable request was refused: {e}")))
            }
            (Ok(_), Err(_)) => return Err(invariant("an undecodable request was answered")),
            (Ok(reply), Ok(req)) => {
                self.verify(&req, &reply, had_fd)?;
                reply
            }
        };
        let Reply {
            response,
            new_connection,
            ..
        } = reply;
        if let Some(conn) = new_connection {
            let mut conns = self.services.connections.borrow_mut();
            if conns.len() + 1 >= limits::MAX_CONNECTIONS {
                return Err(invariant("a connection beyond the limit was opened"));
            }
            conns.push(conn);
        }
        self.check()?;
        Ok(Some(response))
    }

    /// Checks one reply against what the request must do.
    fn verify(&mut self, req: &MainRequest, reply: &Reply, had_fd: bool) -> Result<(), ModelError> {
        use main_request::Message as Q;
        let r = &reply.response;
        if r.errno < 0 {
            return Err(invariant(format!("negative errno {}", r.errno)));
        }
        let errno = errno_of(r);
        *self.stats.errnos.entry(r.errno).or_default() += 1;
        let ok = r.errno == 0;
        if ok {
            self.stats.ok += 1;
        }
        let fd_total =
            reply.fds.len() + reply.follow_ups.iter().map(|(_, f)| f.len()).sum::<usize>();
        if !ok && (fd_total != 0 || reply.new_connection.is_some() || !reply.follow_ups.is_empty())
        {
            return Err(invariant(format!(
                "a failed reply ({errno}) carries descriptors or side effects"
            )));
        }
        match r.write_to_bytes() {
            Ok(b) if b.len() <= limits::MAX_MAIN_REQUEST => {}
            Ok(b) => {
                return Err(invariant(format!(
                    "a {}-byte response cannot reach the plugin",
                    b.len()
                )))
            }
            Err(e) => return Err(invariant(format!("the response does not encode: {e}"))),
        }
        let expect_fds = |n: usize| -> Result<(), ModelError> {
            if ok && fd_total != n {
                return Err(invariant(format!(
                    "{req:?}: {fd_total} descriptors, expected {n}"
                )));
            }
            Ok(())
        };
        let Some(msg) = &req.message else {
            return if errno == Errno::ENOTTY && fd_total == 0 {
                Ok(())
            } else {
                Err(invariant(format!("empty request answered with {errno}")))
            };
        };
        if ok && r.message.is_none() {
            return Err(invariant(format!("{msg:?}: success without a member")));
        }
        match msg {
            Q::Create(c) => {
                use main_request::create::Constructor as C;
                if let Some(_existing) = self.live.get(&c.id) {
                    if errno != Errno::EEXIST {
                        return Err(invariant(format!("create of live id {}: {errno}", c.id)));
                    }
                } else if ok {
                    let (kind, n) = match &c.constructor {
                        Some(C::IoEvent(_)) => ("io_event", 1),
                        Some(C::Memory(_)) => ("memory", 0),
                        Some(C::IrqEvent(_)) => ("irq_event", 2),
                        _ => return Err(invariant("create without a constructor succeeded")),
                    };
                    if matches!(c.constructor, Some(C::Memory(_))) && !had_fd {
                        return Err(invariant("memory created without a descriptor"));
                    }
                    expect_fds(n)?;
                    self.live.insert(c.id, kind);
                    self.stats.created += 1;
                } else if c.constructor.is_none() && errno != Errno::ENOTTY {
                    return Err(invariant(format!("create without constructor: {errno}")));
                } else if matches!(c.constructor, Some(C::Memory(_)))
                    && !had_fd
                    && errno != Errno::EBADF
                {
                    return Err(invariant(format!("memory without a descriptor: {errno}")));
                }
            }
            Q::Destroy(d) => {
                if self.live.remove(&d.id).is_some() {
                    if !ok && !self.vm.teardown_may_fail() {
                        return Err(invariant(format!("destroy of {} failed: {errno}", d.id)));
                    }
                } else if errno != Errno::ENOENT {
                    return Err(invariant(format!("destroy of unknown {}: {errno}", d.id)));
                }
            }
            Q::GetControlSocket(_) => {
                // One descriptor, or EEXIST while a channel is open (the
                // harness never reads the host's end, so it stays open), or
                // the descriptor budget's refusal.
                if !matches!(
                    errno,
                    Errno::UnknownErrno | Errno::EEXIST | Errno::ETOOMANYREFS
                ) && !ok
                {
                    return Err(invariant(format!("get_control_socket: {errno}")));
                }
                expect_fds(1)?;
                if (ok || errno == Errno::EEXIST) && !self.services.control.borrow().is_open() {
                    return Err(invariant("get_control_socket: the channel is not open"));
                }
            }
            Q::NewConnection(_) => {
                let full = self.services.connections.borrow().len() + 1 >= limits::MAX_CONNECTIONS;
                if full != (errno == Errno::EMFILE) {
                    return Err(invariant(format!("new connection: {errno}")));
                }
                expect_fds(1)?;
                if ok != reply.new_connection.is_some() {
                    return Err(invariant("new connection without a host end"));
                }
                if let (Some(host), Some(plugin)) = (&reply.new_connection, reply.fds.first()) {
                    // Only the host's end may be non-blocking.
                    let nonblocking = |fd: &std::os::fd::OwnedFd| {
                        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).is_ok_and(|f| {
                            nix::fcntl::OFlag::from_bits_truncate(f)
                                .contains(nix::fcntl::OFlag::O_NONBLOCK)
                        })
                    };
                    if !nonblocking(host) || nonblocking(plugin) {
                        return Err(invariant(
                            "a new connection's host end must be non-blocking, the plugin's blocking",
                        ));
                    }
                }
            }
            Q::GetShutdownEventfd(_) => {
                if !ok {
                    return Err(invariant("GetShutdownEventfd failed"));
                }
                expect_fds(1)?;
            }
            Q::GetNetConfig(_) => expect_fds(1)?,
            Q::GetVcpus(g) => {
                use vmm::runtime::main_handler::HostServices;
                let all = 2 * self.services.vcpu_count();
                let per_packet = (plugin_proto::framing::SCM_MAX_FD / 2) * 2;
                expect_fds(if g.accept_chunked_fds {
                    all
                } else {
                    all.min(per_packet)
                })?;
                if reply.fds.len() > per_packet
                    || reply.follow_ups.iter().any(|(_, f)| f.len() > per_packet)
                {
                    return Err(invariant(
                        "a packet carries more than SCM_MAX_FD descriptors",
                    ));
                }
            }
            Q::Start(_) => {
                // `started` was updated by the handler: success iff it was not.
                if ok {
                    self.vm.vcpus_created();
                } else if errno != Errno::EINVAL || !self.state.started {
                    return Err(invariant(format!("start: {errno}")));
                }
            }
            Q::SetIdentityMapAddr(_) => {
                if self.state.started && !ok && errno != Errno::EINVAL {
                    return Err(invariant(format!("identity map after start: {errno}")));
                }
                if self.state.started && ok {
                    // Only possible when this very request came before Start.
                    return Err(invariant("identity map accepted after start"));
                }
                expect_fds(0)?;
            }
            Q::ReserveRange(rr) => {
                let want = match Space::from_wire(rr.space.value()) {
                    None => Errno::EINVAL,
                    Some(space) => self
                        .shadow
                        .apply(space, rr.start, rr.length, rr.async_write),
                };
                if want != errno {
                    return Err(invariant(format!(
                        "reserve {rr:?}: host says {errno}, the reference {want}"
                    )));
                }
            }
            Q::SetIrqRouting(s) => {
                if s.routes.len() > limits::MAX_IRQ_ROUTES && errno != Errno::E2BIG {
                    return Err(invariant(format!("{} routes: {errno}", s.routes.len())));
                }
            }
            Q::SetCallHint(h) => {
                if Space::from_wire(h.space.value()).is_none() {
                    if errno != Errno::EINVAL {
                        return Err(invariant(format!("call hint in a bad space: {errno}")));
                    }
                } else if h.hints.len() > limits::MAX_CALL_HINT_DETAILS && errno != Errno::E2BIG {
                    return Err(invariant(format!("{} hints: {errno}", h.hints.len())));
                }
            }
            Q::DirtyLog(d) => {
                if self.live.get(&d.id) != Some(&"memory") && errno != Errno::ENOENT {
                    return Err(invariant(format!(
                        "dirty log of non-memory {}: {errno}",
                        d.id
                    )));
                }
            }
            _ => expect_fds(0)?,
        }
        Ok(())
    }

    /// Every invariant of the host state and the VM.
    pub fn check(&self) -> Result<(), ModelError> {
        self.vm.inspect(&self.state)?;
        let objects = &self.state.objects;
        if objects.len() > limits::MAX_OBJECTS {
            return Err(invariant("more objects than the limit"));
        }
        if objects.len() != self.live.len() {
            return Err(invariant(format!(
                "{} objects in the table, {} expected",
                objects.len(),
                self.live.len()
            )));
        }
        let mut slots = std::collections::BTreeSet::new();
        for (id, obj) in objects.iter() {
            if self.live.get(id) != Some(&obj.kind()) {
                return Err(invariant(format!(
                    "object {id} ({}) unexpected",
                    obj.kind()
                )));
            }
            if let Object::Memory {
                slot,
                length,
                mapping,
                ..
            } = obj
            {
                if !slots.insert(*slot) || *slot >= self.vm.max_memory_slots() {
                    return Err(invariant(format!("slot {slot} reused or out of range")));
                }
                if mapping.size() as u64 != *length {
                    return Err(invariant(format!("memory {id}: mapping size differs")));
                }
            }
        }
        // Reservations: equal to the reference, disjoint, and published.
        let res = &self.state.exit_config.reservations;
        if res.len() > limits::MAX_RESERVED_RANGES {
            return Err(invariant("more reserved ranges than the limit"));
        }
        let mut shadow = self.shadow.ranges.clone();
        shadow.sort_by_key(|r| (r.0, r.1));
        let mut host = Vec::new();
        for space in [Space::Ioport, Space::Mmio] {
            let mut prev_end: Option<u64> = None;
            for r in res.ranges(space) {
                let end = r
                    .start
                    .checked_add(r.length)
                    .filter(|_| r.length != 0)
                    .ok_or_else(|| invariant(format!("degenerate range {r:?}")))?;
                if prev_end.is_some_and(|p| p > r.start) {
                    return Err(invariant(format!("overlapping reservations at {r:?}")));
                }
                prev_end = Some(end);
                host.push((space, r.start, r.length, r.async_write));
            }
        }
        if host != shadow {
            return Err(invariant("reservations differ from the reference"));
        }
        let mut reader = ExitConfigReader::new(std::sync::Arc::clone(&self.state.shared_exit));
        let published = reader.get();
        for space in [Space::Ioport, Space::Mmio] {
            if !published.reservations.ranges(space).eq(res.ranges(space)) {
                return Err(invariant("the published reservations are stale"));
            }
        }
        if published.hint != self.state.exit_config.hint {
            return Err(invariant("the published call hint is stale"));
        }
        if self.state.exit_config.hint.hints.len() > limits::MAX_CALL_HINT_DETAILS {
            return Err(invariant("call hint beyond its limit"));
        }
        if self.services.connections.borrow().len() >= limits::MAX_CONNECTIONS {
            return Err(invariant("more connections than the limit"));
        }
        Ok(())
    }

    /// Replays a session: main requests (raw and generated) and connection
    /// closes; vcpu records are ignored.
    pub fn run_session(&mut self, data: &[u8]) -> Result<(), ModelError> {
        for rec in records(data) {
            match rec.kind {
                RecordKind::MainRequest => {
                    self.request(rec.payload, rec.fd_kind, rec.fd_arg)?;
                }
                RecordKind::MainStructured => {
                    let mut u = Unstructured::new(rec.payload);
                    if let Ok(input) = MainInput::arbitrary(&mut u) {
                        let (kind, arg) = input.fds();
                        let bytes = input.to_bytes();
                        // The framing check must never refuse a well-formed
                        // request.
                        if matches!(input.damage, super::gen::Damage::None)
                            && plugin_proto::framing::check_lengths(&bytes, &[]).is_err()
                        {
                            return Err(invariant(format!(
                                "check_lengths refused a well-formed {:?}",
                                input.shape
                            )));
                        }
                        self.request(&bytes, kind, arg)?;
                    }
                }
                RecordKind::CloseConnection => self.close_connection(),
                _ => {}
            }
        }
        Ok(())
    }

    /// Destroys every live object exactly once (a second destroy must say
    /// `ENOENT`) and checks that nothing is left behind.
    pub fn finish(mut self) -> Result<MainStats, ModelError> {
        for id in self.live_ids() {
            let mut req = MainRequest::new();
            req.mut_destroy().id = id;
            let bytes = req.write_to_bytes().unwrap_or_default();
            let r = self
                .request(&bytes, FdKind::None, 0)?
                .ok_or_else(|| invariant("destroy undecodable"))?;
            if r.errno != 0 && !self.vm.teardown_may_fail() {
                return Err(invariant(format!(
                    "final destroy of {id}: errno {}",
                    r.errno
                )));
            }
            let r = self
                .request(&bytes, FdKind::None, 0)?
                .ok_or_else(|| invariant("destroy undecodable"))?;
            if r.errno != Errno::ENOENT as i32 {
                return Err(invariant(format!(
                    "second destroy of {id}: errno {}",
                    r.errno
                )));
            }
        }
        if !self.state.objects.is_empty() {
            return Err(invariant("objects left after destroying all"));
        }
        self.check()?;
        Ok(std::mem::take(&mut self.stats))
    }
}

/// Runs one session against a fresh model harness, destroys everything, and
/// checks that no descriptor leaked.
pub fn run_model_session(
    data: &[u8],
    vcpus: usize,
    max_slots: u32,
) -> Result<MainStats, ModelError> {
    let before = open_fd_count();
    let stats = {
        let mut h = MainHarness::with_model(vcpus, max_slots)?;
        h.run_session(data)?;
        h.finish()?
    };
    let after = open_fd_count();
    if after != before {
        return Err(invariant(format!(
            "descriptor leak: {before} open before the session, {after} after"
        )));
    }
    Ok(stats)
}
