//! Exit routing and the vcpu run loop (`vmm::runtime::vcpu::run_thread`,
//! `run_loop`) without KVM: the real code over the model vcpu, a scripted
//! run handle and a scripted plugin. The same code runs on KVM in the
//! end-to-end tests (tests/tests/*.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use plugin_proto::{vcpu_request, vcpu_response, VcpuRequest, VcpuResponse};
use vmm::runtime::objects::{ExitConfig, SharedExitConfig};
use vmm::runtime::vcpu::{
    run_loop, run_thread, Servicer, StartBarrier, Stop, VcpuControl, VcpuShared,
};
use vmm::vm::{Space, Vcpu, VcpuStateKind};
use vmm_model::run::{resume, resume_with_regs, wait, Completed, Exit, ScriptedIo, ScriptedRun};
use vmm_model::ModelVcpu;

const PORT: u16 = 0x3f8;
const MMIO: u64 = 0xd000_0000;

/// Reservations: PORT (8 ports, synchronous), 0x80 (posted writes), MMIO (16 bytes).
fn shared() -> Arc<VcpuShared> {
    let exit_config = Arc::new(SharedExitConfig::default());
    let mut cfg = ExitConfig::default();
    cfg.reservations
        .reserve(Space::Ioport, u64::from(PORT), 8, false)
        .unwrap();
    cfg.reservations
        .reserve(Space::Ioport, 0x80, 1, true)
        .unwrap();
    cfg.reservations
        .reserve(Space::Mmio, MMIO, 16, false)
        .unwrap();
    exit_config.publish(cfg);
    Arc::new(VcpuShared {
        kill: AtomicBool::new(false),
        barrier: StartBarrier::new(1),
        exit_config,
        exited: vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).unwrap(),
        failure: Default::default(),
        unreserved: Default::default(),
        coalesced: Default::default(),
    })
}

struct Run {
    stop: Option<Stop>,
    run: ScriptedRun,
    sv: Servicer<ModelVcpu, ScriptedIo>,
}

impl Run {
    fn responses(&mut self) -> &[VcpuResponse] {
        &self.sv.io().responses
    }

    /// The wait reasons sent after Init.
    fn waits(&mut self) -> Vec<vcpu_response::Wait> {
        let rs = self.responses();
        assert!(rs[0].wait().has_init(), "Init first: {:?}", rs[0]);
        rs[1..].iter().map(|r| r.wait().clone()).collect()
    }
}

/// Runs a whole vcpu thread body: Init (answered by `Wait`, then `Resume`),
/// then the exits, the plugin answering with `requests`.
fn run(exits: Vec<Exit>, requests: Vec<VcpuRequest>) -> Run {
    let mut all = vec![wait(), resume(&[])];
    all.extend(requests);
    let mut sv = Servicer::with_io(
        0,
        ModelVcpu::default(),
        ScriptedIo::new(all),
        Arc::new(VcpuControl::default()),
        shared(),
    );
    let mut run = ScriptedRun::new(exits);
    let stop = run_thread(&mut run, &mut sv);
    Run { stop, run, sv }
}

fn io(w: &vcpu_response::Wait) -> &vcpu_response::wait::Io {
    assert!(w.has_io(), "an Io event: {w:?}");
    w.io()
}

#[test]
fn port_write_to_a_reserved_port_is_delivered_and_resumed() {
    let mut r = run(
        vec![
            Exit::IoOut(PORT + 1, vec![0x41]),
            Exit::IoOut(0x99, vec![1]),
            Exit::Hlt,
        ],
        vec![resume(&[])],
    );
    assert_eq!(r.stop, Some(Stop::Halted));
    let waits = r.waits();
    assert_eq!(waits.len(), 1, "the unreserved port 0x99 is not delivered");
    let e = io(&waits[0]);
    assert_eq!(e.space.value(), Space::Ioport.to_wire());
    assert_eq!(e.address, u64::from(PORT + 1));
    assert!(e.is_write && !e.no_resume);
    assert_eq!(e.data, [0x41]);
    assert_eq!(r.run.entries, 3);
}

#[test]
fn a_corrupted_channel_stops_the_vcpu_once_and_records_the_failure() {
    let mut io = ScriptedIo::new(vec![wait(), resume(&[])]);
    io.corrupt_when_empty = true;
    let shared = shared();
    let mut sv = Servicer::with_io(
        0,
        ModelVcpu::default(),
        io,
        Arc::new(VcpuControl::default()),
        Arc::clone(&shared),
    );
    let mut run = ScriptedRun::new(vec![
        Exit::IoOut(PORT, vec![1]),
        Exit::IoOut(PORT, vec![2]),
        Exit::IoOut(PORT, vec![3]),
        Exit::Hlt,
    ]);
    let stop = run_thread(&mut run, &mut sv);
    // The first exit meets the broken ring; the guest is not entered again.
    assert_eq!(stop, Some(Stop::ChannelFailed));
    assert_eq!(run.entries, 1);
    let failure = shared.failure.lock().unwrap().clone();
    let (vcpu, cause) = failure.expect("the failure is recorded for the main loop");
    assert_eq!(vcpu, 0);
    assert!(cause.contains("corrupt"), "{cause}");
}

#[test]
fn posted_write_needs_no_resume() {
    let mut r = run(vec![Exit::IoOut(0x80, vec![7, 8]), Exit::Hlt], vec![]);
    assert_eq!(r.stop, Some(Stop::Halted));
    let waits = r.waits();
    let e = io(&waits[0]);
    assert!(e.is_write && e.no_resume);
    assert_eq!(e.data, [7, 8]);
}

#[test]
fn port_read_is_completed_from_the_resume_data() {
    let mut r = run(
        vec![
            Exit::IoIn(PORT, 4),
            Exit::IoIn(PORT + 2, 2),
            Exit::IoIn(0x99, 2),
            Exit::Hlt,
        ],
        // A short reply: the rest reads as zero; a long one is cut.
        vec![resume(&[1, 2]), resume(&[9, 8, 7])],
    );
    assert_eq!(r.stop, Some(Stop::Halted));
    assert_eq!(
        r.run.completed,
        [
            Completed::Read(vec![1, 2, 0, 0]),
            Completed::Read(vec![9, 8]),
            Completed::Read(vec![0, 0]),
        ]
    );
    let waits = r.waits();
    assert_eq!(waits.len(), 2);
    let e = io(&waits[0]);
    assert!(!e.is_write);
    assert_eq!(
        e.data,
        [0, 0, 0, 0],
        "a read event carries the read size as zeros"
    );
}

#[test]
fn mmio_write_and_read() {
    let mut r = run(
        vec![
            Exit::MmioWrite(MMIO + 8, vec![1, 2, 3, 4, 5, 6, 7, 8]),
            Exit::MmioRead(MMIO + 4, 4),
            Exit::MmioRead(MMIO + 16, 4),
            Exit::Hlt,
        ],
        vec![resume(&[]), resume(&[0xaa, 0xbb, 0xcc, 0xdd])],
    );
    assert_eq!(r.stop, Some(Stop::Halted));
    let waits = r.waits();
    assert_eq!(waits.len(), 2, "MMIO + 16 is past the range");
    let w = io(&waits[0]);
    assert_eq!(
        (w.space.value(), w.address, w.is_write),
        (Space::Mmio.to_wire(), MMIO + 8, true)
    );
    assert_eq!(w.data, [1, 2, 3, 4, 5, 6, 7, 8]);
    let rd = io(&waits[1]);
    assert_eq!((rd.address, rd.is_write), (MMIO + 4, false));
    assert_eq!(
        r.run.completed,
        [
            Completed::Read(vec![0xaa, 0xbb, 0xcc, 0xdd]),
            Completed::Read(vec![0; 4])
        ]
    );
}

#[test]
fn resume_applies_deferred_registers_before_reentry() {
    let regs = vec![0x11u8; VcpuStateKind::Regs.size()];
    let r = run(
        vec![Exit::IoOut(PORT, vec![0]), Exit::Hlt],
        vec![resume_with_regs(&regs)],
    );
    assert_eq!(r.stop, Some(Stop::Halted));
    assert_eq!(r.sv.vcpu.get_state(VcpuStateKind::Regs).unwrap(), regs);
}

#[test]
fn hypercall_result_comes_from_eight_bytes_of_resume_data() {
    let mut r = run(
        vec![
            Exit::HypervHcall {
                input: 0x12,
                params: [0x34, 0x56],
            },
            Exit::HypervHcall {
                input: 1,
                params: [0, 0],
            },
            Exit::Hlt,
        ],
        // The second reply has the wrong length: the result is 0.
        vec![resume(&0xfeed_beefu64.to_le_bytes()), resume(&[1, 2, 3])],
    );
    assert_eq!(r.stop, Some(Stop::Halted));
    assert_eq!(
        r.run.completed,
        [Completed::Hypercall(0xfeed_beef), Completed::Hypercall(0)]
    );
    let waits = r.waits();
    let c = waits[0].hyperv_call();
    assert_eq!((c.input, c.params0, c.params1), (0x12, 0x34, 0x56));
}

#[test]
fn hypercall_result_is_zero_when_the_plugin_is_gone() {
    let r = run(
        vec![
            Exit::HypervHcall {
                input: 1,
                params: [2, 3],
            },
            Exit::Hlt,
        ],
        vec![],
    );
    assert_eq!(r.stop, Some(Stop::Halted));
    assert_eq!(r.run.completed, [Completed::Hypercall(0)]);
}

#[test]
fn synic_exit_is_delivered_and_unknown_hyperv_exit_stops() {
    let mut r = run(
        vec![
            Exit::HypervSynic {
                msr: 0x4000_0080,
                control: 1,
                evt_page: 0x2000,
                msg_page: 0x3000,
            },
            Exit::HypervUnknown(9),
            Exit::Hlt,
        ],
        vec![resume(&[])],
    );
    assert_eq!(r.stop, Some(Stop::UnknownHypervExit));
    assert_eq!(r.run.remaining(), 1, "nothing runs after the unknown exit");
    let waits = r.waits();
    let s = waits[0].hyperv_synic();
    assert_eq!(
        (s.msr, s.control, s.evt_page, s.msg_page),
        (0x4000_0080, 1, 0x2000, 0x3000)
    );
}

#[test]
fn shutdown_internal_error_and_failed_entry_stop_the_vcpu() {
    for (exit, stop) in [
        (Exit::Shutdown, Stop::GuestShutdown),
        (
            Exit::InternalError {
                suberror: 1,
                data: vec![0xdead, 0xbeef],
            },
            Stop::InternalError,
        ),
        (
            Exit::FailEntry {
                hardware_reason: 0x80000021,
                cpu: 1,
            },
            Stop::FailEntry,
        ),
        (Exit::Fails(Errno::EFAULT), Stop::RunFailed(Errno::EFAULT)),
    ] {
        let mut r = run(vec![exit.clone(), Exit::IoOut(PORT, vec![1])], vec![]);
        assert_eq!(r.stop, Some(stop), "{exit:?}");
        assert_eq!(r.run.remaining(), 1, "{exit:?}: the vcpu stopped");
        assert_eq!(r.waits().len(), 0);
    }
}

#[test]
fn spurious_exits_and_eagain_reenter() {
    let r = run(
        vec![
            Exit::Spurious,
            Exit::Fails(Errno::EAGAIN),
            Exit::Interrupted,
            Exit::Hlt,
        ],
        vec![],
    );
    assert_eq!(r.stop, Some(Stop::Halted));
    assert_eq!(r.run.entries, 4);
}

#[test]
fn endless_unknown_exits_stop_the_vcpu_and_a_known_exit_resets_the_count() {
    let max = vmm::limits::MAX_CONSECUTIVE_UNKNOWN_EXITS as usize;
    let mut exits = vec![Exit::Unknown(100); max];
    exits.push(Exit::Spurious);
    exits.extend(vec![Exit::Unknown(100); max + 1]);
    exits.push(Exit::Hlt);
    let r = run(exits, vec![]);
    assert_eq!(r.stop, Some(Stop::TooManyUnknownExits));
    assert_eq!(r.run.remaining(), 1);
}

#[test]
fn a_pending_pause_interrupts_the_guest_and_is_delivered() {
    let shared = shared();
    let control = Arc::new(VcpuControl::default());
    let mut sv = Servicer::with_io(
        3,
        ModelVcpu::default(),
        ScriptedIo::new([resume(&[])]),
        Arc::clone(&control),
        Arc::clone(&shared),
    );
    control.request_pause(0x5eed);
    let mut run = ScriptedRun::new([Exit::Hlt]);
    assert_eq!(run_loop(&mut run, &mut sv), Stop::Halted);
    assert_eq!(run.interrupted, 1, "immediate_exit cut the first entry");
    let responses = &sv.io().responses;
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].wait().user().user, 0x5eed);
}

#[test]
fn a_pause_the_plugin_does_not_answer_stops_the_vcpu() {
    let control = Arc::new(VcpuControl::default());
    let mut sv = Servicer::with_io(
        0,
        ModelVcpu::default(),
        ScriptedIo::default(),
        Arc::clone(&control),
        shared(),
    );
    control.request_pause(1);
    let mut run = ScriptedRun::new([Exit::Hlt]);
    assert_eq!(run_loop(&mut run, &mut sv), Stop::PauseFailed);
}

#[test]
fn a_killed_vcpu_stops_before_entering_and_when_interrupted() {
    let shared = shared();
    shared.kill.store(true, Ordering::Release);
    let mut sv = Servicer::with_io(
        0,
        ModelVcpu::default(),
        ScriptedIo::default(),
        Arc::new(VcpuControl::default()),
        Arc::clone(&shared),
    );
    let mut run = ScriptedRun::new([Exit::Hlt]);
    assert_eq!(run_loop(&mut run, &mut sv), Stop::Killed);
    assert_eq!(run.entries, 0);
}

#[test]
fn init_servicing_failure_never_enters_the_guest() {
    // The plugin sends a request other than Wait first, then closes.
    let mut bad = VcpuRequest::new();
    bad.set_get_state(vcpu_request::GetState::new());
    let mut sv = Servicer::with_io(
        0,
        ModelVcpu::default(),
        ScriptedIo::new([bad]),
        Arc::new(VcpuControl::default()),
        shared(),
    );
    let mut run = ScriptedRun::new([Exit::Hlt]);
    assert_eq!(run_thread(&mut run, &mut sv), None);
    assert_eq!(run.entries, 0);
    assert_eq!(sv.io().responses[0].errno, Errno::EPROTO as i32);
}
