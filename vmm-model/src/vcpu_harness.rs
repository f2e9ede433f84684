//! Drives the real vcpu servicing loop ([`vcpu::service`], [`vcpu::deliver`],
//! the resume-data rules) over an in-memory channel: Init, then a sequence of
//! exits (IO reads and writes, posted writes, pauses, Hyper-V exits), each
//! answered by whatever requests the input holds, in every state.

use std::collections::VecDeque;

use arbitrary::{Arbitrary, Unstructured};
use nix::errno::Errno;
use plugin_proto::protobuf::Message;
use plugin_proto::{vcpu_request, vcpu_response, VcpuRequest, VcpuResponse};

use super::gen::{ExitShape, VcpuInput};
use super::{invariant, ModelError, ModelVcpu};
use vmm::limits;
use vmm::record::{records, RecordKind};
use vmm::runtime::vcpu::{
    complete_read, decode_request, deliver, hcall_result, service, ServiceError, VcpuIo,
};
use vmm::vm::{Vcpu, VcpuStateKind};

/// One step of a vcpu session.
#[derive(Debug, Clone)]
pub enum Item {
    /// Bytes the plugin wrote to the request pipe (one `write()`).
    Request(Vec<u8>),
    /// An exit of the guest, delivered as this wait reason.
    Exit(vcpu_response::Wait),
}

/// Counts of what happened.
#[derive(Debug, Default, Clone)]
pub struct VcpuStats {
    pub requests: u64,
    pub undecodable: u64,
    pub responses: u64,
    pub exits: u64,
    pub resumes: u64,
    pub failed_servicing: u64,
}

impl VcpuStats {
    pub fn merge(&mut self, o: &VcpuStats) {
        self.requests += o.requests;
        self.undecodable += o.undecodable;
        self.responses += o.responses;
        self.exits += o.exits;
        self.resumes += o.resumes;
        self.failed_servicing += o.failed_servicing;
    }
}

/// The in-memory channel: pops requests, checks every response against the
/// request it answers and the servicing state.
struct QueueIo<'a> {
    queue: &'a mut VecDeque<Item>,
    stats: &'a mut VcpuStats,
    /// Shadow of the handler's `init_pending`.
    init_pending: bool,
    /// The request being answered.
    last: Option<VcpuRequest>,
    /// The bytes of the request being answered.
    current: Vec<u8>,
    /// Responses written since the last exit delivery.
    written: Vec<VcpuResponse>,
    error: Option<ModelError>,
}

impl QueueIo<'_> {
    fn fail(&mut self, e: ModelError) -> ServiceError {
        if self.error.is_none() {
            self.error = Some(e);
        }
        ServiceError::Write(Errno::EPROTO)
    }

    /// What a reply to `req` must look like.
    fn expect(&mut self, req: &VcpuRequest, r: &VcpuResponse) -> Result<(), ModelError> {
        use plugin_proto::vcpu_response::Message as R;
        use vcpu_request::Message as Q;
        let errno = r.errno;
        if errno < 0 {
            return Err(invariant(format!("negative errno {errno}")));
        }
        if self.init_pending {
            return match (&req.message, &r.message) {
                (Some(Q::Wait(_)), Some(R::Wait(w))) if errno == 0 && w.has_init() => {
                    self.init_pending = false;
                    Ok(())
                }
                (Some(Q::Wait(_)), _) => Err(invariant("Wait during Init not answered with init")),
                (_, None) if errno == Errno::EPROTO as i32 => Ok(()),
                _ => Err(invariant(format!("{req:?} during Init answered {r:?}"))),
            };
        }
        let want = |e: Errno| -> Result<(), ModelError> {
            if errno == e as i32 {
                Ok(())
            } else {
                Err(invariant(format!("{req:?}: errno {errno}, expected {e}")))
            }
        };
        match &req.message {
            None => want(Errno::ENOTTY),
            Some(Q::Wait(_)) => want(Errno::EPROTO),
            Some(Q::Resume(_)) | Some(Q::Shutdown(_)) => {
                Err(invariant("Resume or Shutdown was answered"))
            }
            Some(Q::GetState(g)) => match VcpuStateKind::from_wire(g.set.value()) {
                None => want(Errno::EINVAL),
                Some(set) if errno == 0 && r.get_state().state.len() != set.size() => {
                    Err(invariant(format!("{set:?} image of the wrong size")))
                }
                Some(_) => Ok(()),
            },
            Some(Q::SetState(s)) => match VcpuStateKind::from_wire(s.set.value()) {
                Some(set) if s.state.len() == set.size() => Ok(()),
                _ => want(Errno::EINVAL),
            },
            Some(Q::GetMsrs(g)) if g.entry_indices.len() > limits::MAX_MSR_ENTRIES => {
                want(Errno::E2BIG)
            }
            Some(Q::GetMsrs(g)) => {
                if r.get_msrs().entry_data.len() > g.entry_indices.len() {
                    Err(invariant("more MSR values than indices"))
                } else {
                    Ok(())
                }
            }
            Some(Q::SetMsrs(s)) if s.entries.len() > limits::MAX_MSR_ENTRIES => want(Errno::E2BIG),
            Some(Q::SetCpuid(s)) if s.entries.len() > limits::MAX_CPUID_ENTRIES => {
                want(Errno::E2BIG)
            }
            Some(Q::EnableCapability(c)) if c.capability != 123 && c.capability != 148 => {
                want(Errno::EINVAL)
            }
            Some(_) => Ok(()),
        }
    }
}

impl VcpuIo for QueueIo<'_> {
    fn read_request(&mut self) -> Result<&[u8], ServiceError> {
        let bytes = match self.queue.front() {
            Some(Item::Request(_)) => match self.queue.pop_front() {
                Some(Item::Request(b)) => b,
                _ => unreachable!("front was a request"),
            },
            // The plugin has nothing more to say for this stop.
            _ => return Err(ServiceError::Closed),
        };
        self.stats.requests += 1;
        let decoded = decode_request(&bytes);
        match (&decoded, VcpuRequest::parse_from_bytes(&bytes)) {
            (Ok(_), Ok(_)) => {}
            (Err(ServiceError::Decode(_)), Err(_)) => self.stats.undecodable += 1,
            // The length check refuses what protobuf refuses, and requests
            // protobuf would take although they were cut short.
            (Err(ServiceError::Malformed(_)), _) => self.stats.undecodable += 1,
            (d, p) => {
                let e = invariant(format!(
                    "decode_request disagrees with protobuf: {:?} vs {:?}",
                    d.as_ref().err(),
                    p.err()
                ));
                return Err(self.fail(e));
            }
        }
        // `service` decodes (or fast-decodes) the bytes itself; the decoded
        // copy here is what the response checks compare against.
        self.last = decoded.ok();
        self.current = bytes;
        Ok(&self.current)
    }

    fn write_response(&mut self, body: &[u8]) -> Result<(), ServiceError> {
        self.stats.responses += 1;
        // The body must decode, and re-encode to the same bytes (this also
        // checks the hand-written exit-path encoder against protobuf).
        let msg = match VcpuResponse::parse_from_bytes(body) {
            Ok(m) => m,
            Err(e) => return Err(self.fail(invariant(format!("response does not decode: {e}")))),
        };
        match msg.write_to_bytes() {
            Ok(b) if b == body => {}
            _ => return Err(self.fail(invariant("response is not canonically encoded"))),
        }
        let msg = &msg;
        if msg.has_wait() && msg.errno == 0 && !msg.wait().has_init() {
            // An unsolicited exit delivery.
            self.written.push(msg.clone());
            return Ok(());
        }
        let Some(req) = self.last.take() else {
            return Err(self.fail(invariant("a response without a request")));
        };
        if let Err(e) = self.expect(&req, msg) {
            return Err(self.fail(e));
        }
        self.written.push(msg.clone());
        Ok(())
    }
}

/// One vcpu, its servicing channel, and the session input.
pub struct VcpuHarness {
    pub vcpu: ModelVcpu,
    queue: VecDeque<Item>,
    pub stats: VcpuStats,
    /// A well-formed generated request the decoder refused.
    rejected_good: Option<String>,
}

impl Default for VcpuHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuHarness {
    pub fn new() -> VcpuHarness {
        VcpuHarness {
            vcpu: ModelVcpu::default(),
            queue: VecDeque::new(),
            stats: VcpuStats::default(),
            rejected_good: None,
        }
    }

    /// Queues session records (vcpu kinds; others are ignored).
    pub fn load(&mut self, data: &[u8]) {
        for rec in records(data) {
            match rec.kind {
                RecordKind::VcpuRequest => {
                    self.queue.push_back(Item::Request(rec.payload.to_vec()))
                }
                RecordKind::VcpuStructured => {
                    if let Ok(i) = VcpuInput::arbitrary(&mut Unstructured::new(rec.payload)) {
                        let bytes = i.to_bytes();
                        if matches!(i.damage, super::gen::Damage::None)
                            && !matches!(i.shape, super::gen::VcpuShape::Garbage(_))
                            && decode_request(&bytes).is_err()
                        {
                            self.rejected_good = Some(format!("{:?}", i.shape));
                        }
                        self.queue.push_back(Item::Request(bytes));
                    }
                }
                RecordKind::VcpuExit => {
                    if let Ok(w) = vcpu_response::Wait::parse_from_bytes(rec.payload) {
                        if w.exit.is_some() && !w.has_init() {
                            self.queue.push_back(Item::Exit(as_the_host_builds(w)));
                        }
                    }
                }
                RecordKind::VcpuExitStructured => {
                    if let Ok(e) = ExitShape::arbitrary(&mut Unstructured::new(rec.payload)) {
                        self.queue.push_back(Item::Exit(e.to_wait()));
                    }
                }
                _ => {}
            }
        }
    }

    /// Queues one item.
    pub fn push(&mut self, item: Item) {
        self.queue.push_back(item);
    }

    /// Runs one servicing (Init when `init`, else after `wait`) and checks
    /// its outcome. Returns the resume data, or `None` if servicing failed.
    fn serve(
        &mut self,
        init: bool,
        wait: Option<(vcpu_response::Wait, bool)>,
    ) -> Result<Result<Option<Vec<u8>>, ServiceError>, ModelError> {
        self.vcpu.take_set_log();
        let mut io = QueueIo {
            queue: &mut self.queue,
            stats: &mut self.stats,
            init_pending: init,
            last: None,
            current: Vec::new(),
            written: Vec::new(),
            error: None,
        };
        // The resume is reconstructed from the last request for the register
        // checks; its data is what the servicing loop left in `data`.
        let mut data = Vec::new();
        let resumed = match wait {
            None => service(&self.vcpu, &mut io, init, &mut data).map(|()| true),
            Some((w, needs_resume)) => deliver(&self.vcpu, &mut io, w, needs_resume, &mut data),
        };
        let result = resumed.map(|resumed| {
            resumed.then(|| {
                let resume = match &io.last {
                    Some(r) if r.has_resume() => r.resume().clone(),
                    _ => vcpu_request::Resume::new(),
                };
                (data, resume)
            })
        });
        if let Some(e) = io.error.take() {
            return Err(e);
        }
        let init_still_pending = io.init_pending;
        let last = io.last.take();
        match &result {
            Ok(Some((_, resume))) => {
                self.stats.resumes += 1;
                if init && init_still_pending {
                    return Err(invariant("Init servicing resumed without Wait"));
                }
                // Deferred registers: regs, sregs, debugregs, in that order,
                // only the non-empty ones, stored as given.
                let log = self.vcpu.take_set_log();
                let mut want = Vec::new();
                for (set, img) in [
                    (VcpuStateKind::Regs, &resume.regs),
                    (VcpuStateKind::Sregs, &resume.sregs),
                    (VcpuStateKind::Debugregs, &resume.debugregs),
                ] {
                    if !img.is_empty() {
                        want.push(set);
                        if self.vcpu.image(set) != *img {
                            return Err(invariant(format!("{set:?} from Resume not applied")));
                        }
                    }
                }
                if !log.ends_with(&want) {
                    return Err(invariant(format!(
                        "deferred registers applied as {log:?}, expected {want:?}"
                    )));
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.stats.failed_servicing += 1;
                match e {
                    ServiceError::DeferredRegisters(_) => {
                        let bad = last.as_ref().is_some_and(|r| {
                            let res = r.resume();
                            [
                                (VcpuStateKind::Regs, &res.regs),
                                (VcpuStateKind::Sregs, &res.sregs),
                                (VcpuStateKind::Debugregs, &res.debugregs),
                            ]
                            .iter()
                            .any(|(s, i)| !i.is_empty() && i.len() != s.size())
                        });
                        if !bad {
                            return Err(invariant("deferred registers failed on good images"));
                        }
                    }
                    ServiceError::Shutdown => {
                        if init_still_pending {
                            return Err(invariant("Shutdown honoured while Init was pending"));
                        }
                    }
                    ServiceError::Closed | ServiceError::Decode(_) | ServiceError::Malformed(_) => {
                    }
                    other => return Err(invariant(format!("unexpected servicing end: {other}"))),
                }
            }
        }
        self.vcpu.check()?;
        Ok(result.map(|r| r.map(|(d, _)| d)))
    }

    /// Runs the whole queued session: Init, then every exit in turn. A
    /// request found while the guest runs is served at a pause (`User`).
    /// When the vcpu thread would end (failed Init or pause servicing), the
    /// rest of the input goes to a fresh vcpu.
    pub fn run(&mut self) -> Result<(), ModelError> {
        if let Some(shape) = &self.rejected_good {
            return Err(invariant(format!("a well-formed {shape} was refused")));
        }
        while !self.queue.is_empty() {
            self.vcpu = ModelVcpu::default();
            let before = self.queue.len();
            if self.serve(true, None)?.is_err() {
                // Failed Init: the vcpu thread ends.
                if self.queue.len() == before {
                    self.queue.pop_front();
                }
                continue;
            }
            self.run_exits()?;
        }
        Ok(())
    }

    /// Delivers exits until the input runs out or the vcpu thread ends.
    fn run_exits(&mut self) -> Result<(), ModelError> {
        while let Some(item) = self.queue.pop_front() {
            let wait = match item {
                Item::Exit(w) => w,
                Item::Request(b) => {
                    self.queue.push_front(Item::Request(b));
                    let mut w = vcpu_response::Wait::new();
                    w.mut_user().user = 0;
                    w
                }
            };
            self.stats.exits += 1;
            let no_resume = wait.has_io() && wait.io().no_resume;
            let outcome = self.serve(false, Some((wait.clone(), !no_resume)))?;
            if wait.has_io() && !wait.io().is_write {
                // The guest's buffer after completion.
                let len = wait.io().data.len();
                let mut data = vec![0xcc; len];
                let reply = outcome.as_ref().ok().and_then(|d| d.as_deref());
                complete_read(&mut data, reply);
                let given = reply.unwrap_or(&[]);
                let n = given.len().min(len);
                if data[..n] != given[..n] || data[n..].iter().any(|b| *b != 0) {
                    return Err(invariant("IO read not completed from resume data + zeros"));
                }
            }
            if wait.has_hyperv_call() {
                let reply = outcome.as_ref().ok().and_then(|d| d.as_deref());
                let want = match reply {
                    Some(d) if d.len() == 8 => u64::from_le_bytes(d.try_into().unwrap_or([0; 8])),
                    _ => 0,
                };
                if hcall_result(reply) != want {
                    return Err(invariant("hypercall result misread"));
                }
            }
            if wait.has_user() && outcome.is_err() {
                // Failed pause servicing ends the vcpu thread.
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Runs one vcpu session against a fresh harness.
pub fn run_vcpu_session(data: &[u8]) -> Result<VcpuStats, ModelError> {
    let mut h = VcpuHarness::new();
    h.load(data);
    h.run()?;
    // A last sanity check that the model vcpu still answers.
    h.vcpu
        .get_state(VcpuStateKind::Regs)
        .map_err(|e| ModelError::Sys {
            what: "reading regs",
            source: e,
        })?;
    Ok(h.stats)
}

/// A recorded exit as the host builds exits: without the fields protobuf
/// did not know in the recording. protobuf keeps such fields and writes
/// them back in no fixed order, so a response carrying them has no
/// canonical encoding; the host never sends one (it builds every `Wait`
/// from a `VmExit`), a parsed recording can hold them.
fn as_the_host_builds(mut w: vcpu_response::Wait) -> vcpu_response::Wait {
    use vcpu_response::wait::Exit;
    w.mut_unknown_fields().clear();
    match &mut w.exit {
        Some(Exit::Init(m)) => m.mut_unknown_fields().clear(),
        Some(Exit::Io(m)) => m.mut_unknown_fields().clear(),
        Some(Exit::User(m)) => m.mut_unknown_fields().clear(),
        Some(Exit::HypervCall(m)) => m.mut_unknown_fields().clear(),
        Some(Exit::HypervSynic(m)) => m.mut_unknown_fields().clear(),
        // A kind of exit added later keeps them: the canonical-encoding
        // check then says so.
        Some(_) | None => {}
    }
    w
}
