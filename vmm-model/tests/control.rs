//! The control socket without KVM: the real dispatcher on the model VM
//! (`vmm_model::control_harness`), and the real vcpu run loop's host pause
//! (parking before `KVM_RUN`) on a scripted run handle. The same code runs
//! on KVM in tests/tests/control.rs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use vmm::control::dispatch::PluginReply;
use vmm::runtime::objects::SharedExitConfig;
use vmm::runtime::vcpu::{run_loop, Servicer, StartBarrier, Stop, VcpuControl, VcpuShared};
use vmm_client::proto::ErrorCode;
use vmm_model::control_harness::{run_control_session, ControlHarness, ModelVm, PluginMode};
use vmm_model::rng::SplitMix64 as Rng;
use vmm_model::run::{resume, Exit, ScriptedIo, ScriptedRun};
use vmm_model::ModelVcpu;

fn code(r: &vmm_client::proto::Response) -> Option<ErrorCode> {
    r.error.as_ref().map(|e| e.code)
}

fn running(vcpus: u32, plugin: PluginMode) -> ControlHarness {
    let mut h = ControlHarness::new(ModelVm::new(vcpus, plugin));
    h.start().unwrap();
    h
}

#[test]
fn pause_is_answered_once_every_vcpu_left_the_guest() {
    let mut h = running(2, PluginMode::Old);
    h.line(1, br#"{"id":1,"command":"pause","args":{"vcpus":[1]}}"#, 0)
        .unwrap();
    assert!(h.responses().is_empty(), "answered before vcpu 1 left");
    assert!(h.vm.paused[1] && !h.vm.paused[0]);
    h.tick().unwrap();
    let rs = h.responses();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1.ok, Some(json!({"paused": [1]})));
    let ev = h.events();
    assert_eq!(ev.last().unwrap().event, "paused");
    // Partial pause: still running, with the list.
    h.line(1, br#"{"id":2,"command":"status"}"#, 0).unwrap();
    let s = h.responses()[1].1.ok.clone().unwrap();
    assert_eq!(s["state"], "running");
    assert_eq!(s["paused_vcpus"], json!([1]));
    // Pausing all: paused; the exits of vcpu 1 no longer move.
    h.line(1, br#"{"id":3,"command":"pause"}"#, 0).unwrap();
    h.tick().unwrap();
    let before = h.vm.exits.clone();
    h.tick().unwrap();
    assert_eq!(h.vm.exits, before);
    h.line(1, br#"{"id":4,"command":"status"}"#, 0).unwrap();
    assert_eq!(h.responses()[3].1.ok.clone().unwrap()["state"], "paused");
    h.line(1, br#"{"id":5,"command":"resume"}"#, 0).unwrap();
    h.tick().unwrap();
    assert!(h.vm.exits[0] > before[0]);
    let names: Vec<&str> = h.events().iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["running", "paused", "paused", "resumed"]);
    h.finish().unwrap();
}

#[test]
fn state_rules_for_pause_stop_and_kill() {
    let mut h = ControlHarness::new(ModelVm::new(1, PluginMode::Old));
    h.line(1, br#"{"id":1,"command":"pause"}"#, 0).unwrap();
    h.line(1, br#"{"id":2,"command":"vcpu-tids"}"#, 0).unwrap();
    h.line(1, br#"{"id":3,"command":"status"}"#, 0).unwrap();
    let rs = h.responses();
    assert_eq!(code(rs[0].1), Some(ErrorCode::InvalidState));
    assert!(rs[0].1.error.as_ref().unwrap().message.contains("starting"));
    assert_eq!(rs[1].1.ok.clone().unwrap()["vcpus"], json!([]));
    assert_eq!(rs[2].1.ok.clone().unwrap()["state"], "starting");
    h.start().unwrap();
    h.line(1, br#"{"id":4,"command":"pause","args":{"vcpus":[3]}}"#, 0)
        .unwrap();
    assert_eq!(code(h.responses()[3].1), Some(ErrorCode::BadArgument));
    // A pause still waiting when the VM stops is failed, not forgotten.
    h.line(1, br#"{"id":5,"command":"pause"}"#, 0).unwrap();
    h.line(1, br#"{"id":6,"command":"stop"}"#, 0).unwrap();
    assert!(h.vm.stopped);
    h.tick().unwrap();
    h.line(1, br#"{"id":7,"command":"stop"}"#, 0).unwrap();
    h.line(1, br#"{"id":8,"command":"resume"}"#, 0).unwrap();
    h.line(1, br#"{"id":9,"command":"kill"}"#, 0).unwrap();
    let rs = h.responses();
    let by_id = |id: u64| {
        rs.iter()
            .find(|(_, r)| r.id == json!(id))
            .map(|(_, r)| (*r).clone())
            .unwrap()
    };
    assert_eq!(by_id(6).ok, Some(json!({"state": "stopping"})));
    assert_eq!(by_id(7).ok, Some(json!({"state": "stopping"})));
    assert_eq!(code(&by_id(8)), Some(ErrorCode::InvalidState));
    assert!(h.vm.killed);
    assert_eq!(by_id(9).ok.unwrap()["killed"], true);
    h.finish().unwrap();
    // The pause overtaken by the stop got its answer.
    let rs = h.responses();
    let p = rs.iter().find(|(_, r)| r.id == json!(5)).unwrap();
    assert_eq!(code(p.1), Some(ErrorCode::InvalidState));
}

#[test]
fn descriptors_with_a_command_are_refused() {
    let mut h = running(1, PluginMode::Old);
    h.line(4, br#"{"id":"a","command":"status"}"#, 2).unwrap();
    let rs = h.responses();
    assert_eq!(code(rs[0].1), Some(ErrorCode::BadDescriptors));
    assert!(rs[0]
        .1
        .error
        .as_ref()
        .unwrap()
        .message
        .starts_with("status: "));
    h.finish().unwrap();
}

#[test]
fn forwarded_commands_map_the_plugins_answers() {
    let mut h = running(1, PluginMode::Old);
    h.line(1, br#"{"id":1,"command":"powerbtn"}"#, 0).unwrap();
    assert_eq!(code(h.responses()[0].1), Some(ErrorCode::NotSupported));

    let mut h = running(1, PluginMode::Takes(2));
    for id in 1..=3 {
        let line = format!(r#"{{"id":{id},"command":"plugin","args":{{"name":"count"}}}}"#);
        h.line(1, line.as_bytes(), 0).unwrap();
    }
    // The third does not fit.
    assert_eq!(code(h.responses()[0].1), Some(ErrorCode::Busy));
    h.reply(PluginReply::Ok(json!({"count": 7}))).unwrap();
    h.reply(PluginReply::Refused {
        errno: libc::EINVAL,
        message: "no such counter".into(),
    })
    .unwrap();
    h.line(1, br#"{"id":4,"command":"sleepbtn"}"#, 0).unwrap();
    h.reply(PluginReply::TimedOut(Duration::from_secs(5)))
        .unwrap();
    let rs = h.responses();
    assert_eq!(rs[1].1.id, json!(1));
    assert_eq!(rs[1].1.ok, Some(json!({"count": 7})));
    assert_eq!(code(rs[2].1), Some(ErrorCode::PluginError));
    assert!(rs[2]
        .1
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("no such counter"));
    assert_eq!(code(rs[3].1), Some(ErrorCode::Timeout));
    h.finish().unwrap();
}

#[test]
fn events_subscription_reports_the_sequence() {
    let mut h = running(1, PluginMode::Old);
    h.line(3, br#"{"id":1,"command":"events"}"#, 0).unwrap();
    let ok = h.responses()[0].1.ok.clone().unwrap();
    assert_eq!(ok, json!({"subscribed": true, "seq": 1}));
    h.line(
        3,
        br#"{"id":2,"command":"events","args":{"subscribe":false}}"#,
        0,
    )
    .unwrap();
    assert_eq!(h.responses()[1].1.ok.clone().unwrap()["subscribed"], false);
    h.finish().unwrap();
}

#[test]
fn random_sessions_keep_every_invariant() {
    let mut rng = Rng::new(0x11c0_7201);
    let lines: &[&[u8]] = &[
        br#"{"id":1,"command":"pause"}"#,
        br#"{"id":2,"command":"resume","args":{"vcpus":[0]}}"#,
        br#"{"id":3,"command":"pause","args":{"vcpus":[1,1,0]}}"#,
        br#"{"id":4,"command":"status"}"#,
        br#"{"id":5,"command":"stop"}"#,
        br#"{"id":6,"command":"plugin","args":{"name":"x","args":[1]}}"#,
        br#"{"id":7,"command":"events"}"#,
        br#"{"id":8,"command":"kill"}"#,
        br#"{"id":9,"command":"powerbtn"}"#,
        br#"{"id":10,"command":"stats"}"#,
        b"{not json",
        br#"{"id":[],"command":"status"}"#,
    ];
    for _ in 0..300 {
        let mut data = vec![rng.below(256) as u8, rng.below(256) as u8];
        for _ in 0..rng.below(40) {
            data.push(rng.below(256) as u8);
            if rng.below(3) == 0 {
                data.extend_from_slice(lines[rng.below(lines.len() as u64) as usize]);
            }
            data.push(b'\n');
        }
        run_control_session(&data).unwrap_or_else(|e| panic!("{e} on {data:?}"));
    }
}

fn shared() -> Arc<VcpuShared> {
    Arc::new(VcpuShared {
        kill: AtomicBool::new(false),
        barrier: StartBarrier::new(1),
        exit_config: Arc::new(SharedExitConfig::default()),
        exited: vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).unwrap(),
        failure: Default::default(),
        unreserved: Default::default(),
        coalesced: Default::default(),
    })
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The run loop on its own thread: unreserved port writes (answered by
/// the host alone), then `hlt`.
fn spawn_loop(
    control: Arc<VcpuControl>,
    shared: Arc<VcpuShared>,
    exits: usize,
    requests: Vec<plugin_proto::VcpuRequest>,
) -> std::thread::JoinHandle<(Stop, ScriptedRun, Servicer<ModelVcpu, ScriptedIo>)> {
    std::thread::spawn(move || {
        let mut script: Vec<Exit> = (0..exits).map(|_| Exit::IoOut(0x99, vec![1])).collect();
        script.push(Exit::Hlt);
        let mut run = ScriptedRun::new(script);
        let mut sv = Servicer::with_io(
            0,
            ModelVcpu::default(),
            ScriptedIo::new(requests),
            control,
            shared,
        );
        let stop = run_loop(&mut run, &mut sv);
        (stop, run, sv)
    })
}

#[test]
fn a_host_paused_vcpu_parks_before_entering_the_guest_until_resumed() {
    let control = Arc::new(VcpuControl::default());
    control.host_pause();
    let t = spawn_loop(Arc::clone(&control), shared(), 3, Vec::new());
    wait_until("the vcpu parks", || control.is_parked());
    std::thread::sleep(Duration::from_millis(50));
    assert!(control.is_parked());
    assert_eq!(control.exits(), 0, "no guest entry while paused");
    control.host_pause(); // idempotent
    control.host_resume();
    let (stop, run, _) = t.join().unwrap();
    assert_eq!(stop, Stop::Halted);
    assert_eq!(run.entries, 4);
    assert_eq!(control.exits(), 4);
    assert!(!control.is_parked());
}

#[test]
fn a_parked_vcpu_stops_when_killed() {
    let control = Arc::new(VcpuControl::default());
    let shared = shared();
    control.host_pause();
    let t = spawn_loop(Arc::clone(&control), Arc::clone(&shared), 3, Vec::new());
    wait_until("the vcpu parks", || control.is_parked());
    shared.kill.store(true, Ordering::Release);
    control.wake();
    let (stop, run, _) = t.join().unwrap();
    assert_eq!(stop, Stop::Killed);
    assert_eq!(run.entries, 0);
}

#[test]
fn a_plugin_pause_during_a_host_pause_is_delivered_after_the_resume() {
    let control = Arc::new(VcpuControl::default());
    control.host_pause();
    control.request_pause(0x5a);
    let t = spawn_loop(Arc::clone(&control), shared(), 0, vec![resume(&[])]);
    wait_until("the vcpu parks", || control.is_parked());
    control.host_resume();
    let (stop, run, mut sv) = t.join().unwrap();
    assert_eq!(stop, Stop::Halted);
    let rs = &sv.io().responses;
    assert_eq!(rs.len(), 1, "{rs:?}");
    assert_eq!(rs[0].wait().user().user, 0x5a);
    assert_eq!(run.interrupted, 1);
}

// `snapshot` (issue 12): the dispatcher pauses every vcpu, asks the plugin
// for its state once all are parked, has the host write, resumes, and
// tells the plugin.

#[test]
fn snapshot_parks_asks_the_plugin_writes_and_resumes() {
    let mut h = running(2, PluginMode::Takes(4));
    h.line(
        1,
        br#"{"id":1,"command":"snapshot","args":{"dir":"/s"}}"#,
        0,
    )
    .unwrap();
    assert!(h.vm.paused.iter().all(|&p| p));
    // Nothing is asked before every vcpu left the guest.
    assert!(h.vm.forwarded.is_empty());
    h.tick().unwrap();
    assert_eq!(
        h.vm.forwarded.values().collect::<Vec<_>>(),
        [&vmm::control::dispatch::Forward::SaveState]
    );
    // A second snapshot meanwhile is busy.
    h.line(
        2,
        br#"{"id":2,"command":"snapshot","args":{"dir":"/t"}}"#,
        0,
    )
    .unwrap();
    assert_eq!(code(h.responses()[0].1), Some(ErrorCode::Busy));
    h.reply(PluginReply::State(vec![1, 2, 3])).unwrap();
    assert!(h.vm.snapshot_saw_all_paused);
    assert_eq!(h.vm.snapshot, Some(("/s".into(), Some(vec![1, 2, 3]))));
    h.tick().unwrap();
    let rs = h.responses();
    let r = rs.iter().find(|(_, r)| r.id == json!(1)).unwrap().1;
    assert_eq!(r.ok.as_ref().unwrap()["dir"], "/s", "{r:?}");
    assert!(
        h.vm.paused.iter().all(|&p| !p),
        "resumed after the snapshot"
    );
    assert_eq!(h.vm.resumed, 1, "the plugin heard RESUMED");
    let names: Vec<&str> = h.events().iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["running", "snapshot-started", "snapshot-done"]);
    h.finish().unwrap();
}

#[test]
fn snapshot_errors_leave_the_vm_as_it_was() {
    // An old plugin: not-supported, unless without device state.
    let mut h = running(1, PluginMode::Old);
    h.line(
        1,
        br#"{"id":1,"command":"snapshot","args":{"dir":"/s"}}"#,
        0,
    )
    .unwrap();
    h.tick().unwrap();
    let rs = h.responses();
    assert_eq!(code(rs[0].1), Some(ErrorCode::NotSupported));
    assert!(rs[0]
        .1
        .error
        .as_ref()
        .unwrap()
        .message
        .contains("does not take part in snapshots"));
    assert!(!h.vm.paused[0]);
    h.line(
        1,
        br#"{"id":2,"command":"snapshot","args":{"dir":"/s","without_device_state":true}}"#,
        0,
    )
    .unwrap();
    h.tick().unwrap();
    h.tick().unwrap();
    assert_eq!(h.vm.snapshots, [("/s".to_string(), None)]);
    assert!(h.responses()[1].1.ok.is_some());
    h.finish().unwrap();

    // A paused VM stays paused; the plugin's refusal and a failed write
    // are errors; starting is invalid-state.
    let mut h = ControlHarness::new(ModelVm::new(2, PluginMode::Takes(4)));
    h.line(
        1,
        br#"{"id":1,"command":"snapshot","args":{"dir":"/s"}}"#,
        0,
    )
    .unwrap();
    assert_eq!(code(h.responses()[0].1), Some(ErrorCode::InvalidState));
    h.start().unwrap();
    h.line(1, br#"{"id":2,"command":"pause","args":{"vcpus":[1]}}"#, 0)
        .unwrap();
    h.tick().unwrap();
    h.line(
        1,
        br#"{"id":3,"command":"snapshot","args":{"dir":"/s"}}"#,
        0,
    )
    .unwrap();
    h.tick().unwrap();
    h.reply(PluginReply::Refused {
        errno: 5,
        message: "no".into(),
    })
    .unwrap();
    let rs = h.responses();
    let r = rs.iter().find(|(_, r)| r.id == json!(3)).unwrap().1;
    assert_eq!(code(r), Some(ErrorCode::PluginError));
    assert_eq!(h.vm.paused, [false, true], "vcpu 1 stays paused");
    h.line(
        1,
        br#"{"id":4,"command":"snapshot","args":{"dir":"/fail"}}"#,
        0,
    )
    .unwrap();
    h.tick().unwrap();
    h.reply(PluginReply::State(Vec::new())).unwrap();
    let rs = h.responses();
    let r = rs.iter().find(|(_, r)| r.id == json!(4)).unwrap().1;
    assert_eq!(code(r), Some(ErrorCode::Internal));
    assert!(r.error.as_ref().unwrap().message.contains("/fail"));
    h.line(
        1,
        br#"{"id":5,"command":"snapshot","args":{"dir":"/s"}}"#,
        0,
    )
    .unwrap();
    h.tick().unwrap();
    h.reply(PluginReply::TimedOut(Duration::from_secs(5)))
        .unwrap();
    let rs = h.responses();
    let r = rs.iter().find(|(_, r)| r.id == json!(5)).unwrap().1;
    assert_eq!(code(r), Some(ErrorCode::Timeout));
    assert_eq!(h.vm.paused, [false, true]);
    assert!(h.vm.snapshots.is_empty());
    h.finish().unwrap();
}

#[test]
fn snapshot_arguments_are_checked() {
    let mut h = running(1, PluginMode::Takes(4));
    for (i, args) in [
        r#"{}"#,
        r#"{"dir":""}"#,
        r#"{"dir":3}"#,
        r#"{"dir":"/s","without_device_state":"yes"}"#,
        r#"{"dir":"/s","other":1}"#,
    ]
    .iter()
    .enumerate()
    {
        let line = format!(r#"{{"id":{i},"command":"snapshot","args":{args}}}"#);
        h.line(1, line.as_bytes(), 0).unwrap();
    }
    assert!(h.vm.paused.iter().all(|&p| !p));
    h.finish().unwrap();
}

/// A transport that host-pauses the vcpu while the plugin serves its exit
/// (the pause arrives mid-exit, as a snapshot's does).
struct PauseWhileServing {
    io: ScriptedIo,
    control: Arc<VcpuControl>,
}

impl vmm::runtime::vcpu::VcpuIo for PauseWhileServing {
    fn read_request(&mut self) -> Result<&[u8], vmm::runtime::vcpu::ServiceError> {
        self.control.host_pause();
        self.io.read_request()
    }
    fn write_response(&mut self, body: &[u8]) -> Result<(), vmm::runtime::vcpu::ServiceError> {
        self.io.write_response(body)
    }
}

#[test]
fn a_vcpu_parks_only_once_a_pending_read_is_in_its_registers() {
    let control = Arc::new(VcpuControl::default());
    let shared = {
        let exit_config = Arc::new(SharedExitConfig::default());
        let mut cfg = vmm::runtime::objects::ExitConfig::default();
        cfg.reservations
            .reserve(vmm::vm::Space::Ioport, 0x700, 4, false)
            .unwrap();
        exit_config.publish(cfg);
        Arc::new(VcpuShared {
            exit_config,
            ..Arc::try_unwrap(shared()).ok().unwrap()
        })
    };
    let c = Arc::clone(&control);
    let sh = Arc::clone(&shared);
    let t = std::thread::spawn(move || {
        let mut run = ScriptedRun::new([Exit::IoIn(0x700, 4), Exit::Hlt]);
        let io = PauseWhileServing {
            io: ScriptedIo::new([resume(&[1, 2, 3, 4])]),
            control: Arc::clone(&c),
        };
        let mut sv = Servicer::with_io(0, ModelVcpu::default(), io, c, sh);
        let stop = run_loop(&mut run, &mut sv);
        (stop, run)
    });
    wait_until("the vcpu parks", || control.is_parked());
    // Stopped while parked: whatever the guest has now is what a snapshot
    // taken at the park would hold.
    shared.kill.store(true, Ordering::Release);
    control.wake();
    let (stop, run) = t.join().unwrap();
    assert_eq!(stop, Stop::Killed);
    assert_eq!(
        run.completed,
        [vmm_model::run::Completed::Read(vec![1, 2, 3, 4])],
        "the read was completed (by a KVM_RUN cut short) before the vcpu parked"
    );
    assert_eq!(run.entries, 1, "the guest did not run again");
    assert_eq!(run.interrupted, 1);
}

// `migrate` (issue 12): the dispatcher starts the plugin's tracking, lets
// the host send rounds with the plugin's pages until it says stop, parks
// every vcpu, asks for the device state and the last pages, and ends the
// VM once the target runs it; failures before the commit resume, after
// it the VM stays paused.

use vmm::control::dispatch::Forward as F;

/// Answers the plugin's waiting command: `DirtyPages` with `pages`,
/// `SaveState` with a state.
fn answer(h: &mut ControlHarness, pages: &[u64]) {
    let what = h.vm.forwarded.values().next().cloned();
    match what {
        Some(F::DirtyPages) => h.reply(PluginReply::DirtyPages(pages.to_vec())).unwrap(),
        Some(F::SaveState) => h.reply(PluginReply::State(b"dev".to_vec())).unwrap(),
        other => panic!("the plugin was sent {other:?}"),
    }
}

fn migrate(h: &mut ControlHarness, to: &str) {
    let line = format!(r#"{{"id":7,"command":"migrate","args":{{"to":"unix:{to}"}}}}"#);
    h.line(1, line.as_bytes(), 0).unwrap();
}

/// A migration to `to` through three empty rounds to the hand-over: every
/// vcpu parked, SAVE_STATE answered and the last pages sent.
fn to_hand_over(h: &mut ControlHarness, to: &str) {
    migrate(h, to);
    answer(h, &[]);
    for _ in 0..3 {
        h.tick().unwrap();
        answer(h, &[]);
    }
    h.tick().unwrap();
    answer(h, &[]);
    answer(h, &[]);
}

#[test]
fn migrate_rounds_park_hand_over_and_end_the_vm() {
    let mut h = running(2, PluginMode::Takes(4));
    migrate(&mut h, "/t");
    // Tracking first: nothing is sent before the plugin's first answer.
    assert_eq!(
        h.vm.forwarded.values().collect::<Vec<_>>(),
        [&F::DirtyPages]
    );
    assert!(h.vm.migration.is_none());
    answer(&mut h, &[0xdead_0000]);
    for round in 1..=3u64 {
        assert!(
            h.vm.paused.iter().all(|&p| !p),
            "paused during round {round}"
        );
        h.tick().unwrap();
        answer(&mut h, &[round * 0x1000]);
    }
    // Converged: every vcpu paused; once parked, SAVE_STATE, then the last
    // pages.
    assert!(h.vm.paused.iter().all(|&p| p));
    h.tick().unwrap();
    answer(&mut h, &[]);
    answer(&mut h, &[0x9000]);
    let m = h.vm.migration.clone().unwrap();
    // The tracking answer is not a round's.
    assert_eq!(
        m.plugin_pages,
        [vec![0x1000], vec![0x2000], vec![0x3000], vec![0x9000]]
    );
    assert_eq!(m.finished, Some((b"dev".to_vec(), true)));
    h.tick().unwrap();
    let rs = h.responses();
    let r = rs.iter().find(|(_, r)| r.id == json!(7)).unwrap().1;
    assert_eq!(r.ok.as_ref().unwrap()["to"], "unix:/t", "{r:?}");
    assert_eq!(h.vm.migrated_to.as_deref(), Some("unix:/t"));
    assert_eq!(h.vm.resumed, 0, "a migrated plugin never hears RESUMED");
    let names: Vec<&str> = h.events().iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["running", "migration-started", "migration-done"]);
    h.finish().unwrap();
}

#[test]
fn migrate_failures_before_the_commit_resume_after_it_stay_paused() {
    // A drop in round 0: nothing was paused, the error names it.
    let mut h = running(1, PluginMode::Takes(4));
    migrate(&mut h, "/drop");
    answer(&mut h, &[]);
    h.tick().unwrap();
    let e = h.responses()[0].1.error.clone().unwrap();
    assert_eq!(e.code, ErrorCode::Internal);
    assert!(
        e.message.contains("the peer closed the connection"),
        "{e:?}"
    );
    assert!(!h.vm.paused[0]);
    assert_eq!(h.vm.migrations_aborted, 1);
    // Connecting fails at once.
    migrate(&mut h, "/unreachable");
    h.vm.migration = None;
    answer(&mut h, &[]);
    let e = h.responses()[1].1.error.clone().unwrap();
    assert!(e.message.contains("cannot connect"), "{e:?}");
    h.finish().unwrap();

    // The target refuses the state: resumed, and the plugin hears RESUMED.
    for (to, committed) in [("/refuse", false), ("/commit-drop", true)] {
        let mut h = running(2, PluginMode::Takes(4));
        // Vcpu 1 was paused before: it stays paused either way.
        h.line(1, br#"{"id":1,"command":"pause","args":{"vcpus":[1]}}"#, 0)
            .unwrap();
        h.tick().unwrap();
        to_hand_over(&mut h, to);
        h.tick().unwrap();
        let rs = h.responses();
        let e = rs.iter().find(|(_, r)| r.id == json!(7)).unwrap().1;
        let e = e.error.clone().unwrap();
        assert!(h.vm.migrated_to.is_none());
        assert!(h.vm.paused[1], "{to}: vcpu 1 was paused before");
        if committed {
            assert!(e.message.contains("the target may be running"), "{e:?}");
            assert!(h.vm.paused[0], "after the commit the VM stays paused");
            assert_eq!(h.vm.resumed, 0);
        } else {
            assert!(e.message.contains("refused the machine"), "{e:?}");
            assert!(!h.vm.paused[0], "resumed");
            assert_eq!(h.vm.resumed, 1, "the plugin heard RESUMED");
        }
        let names: Vec<&str> = h.events().iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names.last(), Some(&"migration-failed"));
        h.finish().unwrap();
    }
}

#[test]
fn migrate_refusals_change_nothing() {
    // An old plugin cannot report its writes or hand over its state.
    let mut h = running(1, PluginMode::Old);
    migrate(&mut h, "/t");
    let e = h.responses()[0].1.error.clone().unwrap();
    assert_eq!(e.code, ErrorCode::NotSupported);
    assert!(
        e.message.contains("does not take part in migrations"),
        "{e:?}"
    );
    h.finish().unwrap();
    // A migration while one is under way or during a snapshot, a VM that
    // does not run yet.
    let mut h = running(1, PluginMode::Takes(4));
    migrate(&mut h, "/t");
    migrate(&mut h, "/u");
    assert_eq!(code(h.responses()[0].1), Some(ErrorCode::Busy));
    h.line(
        1,
        br#"{"id":9,"command":"snapshot","args":{"dir":"/s"}}"#,
        0,
    )
    .unwrap();
    let rs = h.responses();
    let r = rs.iter().find(|(_, r)| r.id == json!(9)).unwrap().1;
    assert_eq!(code(r), Some(ErrorCode::Busy));
    let mut h = ControlHarness::new(ModelVm::new(1, PluginMode::Takes(4)));
    migrate(&mut h, "/t");
    assert_eq!(code(h.responses()[0].1), Some(ErrorCode::InvalidState));
    h.finish().unwrap();
}

/// The VM ends (its plugin exited on its own, the run tears down) with
/// requests outstanding: [`Dispatcher::ended`] answers every one, naming
/// why, before anything else happens, so the host can flush the answers
/// before its control socket closes. The flake of the migration tests under
/// load was this: a source whose guest finished mid-migration exited with
/// the `migrate` request unanswered, and the client saw "vmm closed the
/// connection". The host calls the same method in its teardown.
///
/// [`Dispatcher::ended`]: vmm::control::dispatch::Dispatcher::ended
#[test]
fn the_vms_end_answers_every_outstanding_request_naming_why() {
    use vmm::control::dispatch::Phase;
    let why = "the plugin exited with status 0";
    // Checks the answers `ended` gave (read through the harness's own
    // accounting), before `finish` could answer anything itself.
    let end = |h: &mut ControlHarness| {
        h.vm.phase = Phase::Stopping;
        h.dispatcher.ended(&mut h.vm, why);
        // Only to hand what was queued to the harness's checks: the VM is
        // stopping, nothing moves.
        h.tick().unwrap();
    };
    let message = |h: &ControlHarness, id: u64| {
        let rs = h.responses();
        let r = rs
            .iter()
            .find(|(_, r)| r.id == json!(id))
            .unwrap_or_else(|| panic!("request {id} was never answered: {rs:?}"))
            .1;
        r.error
            .clone()
            .unwrap_or_else(|| panic!("request {id} succeeded: {r:?}"))
            .message
    };

    // Waiting for the plugin's first pages, with a plugin command and a
    // pause of a vcpu still in the guest outstanding too.
    let mut h = running(2, PluginMode::Takes(4));
    migrate(&mut h, "/t");
    h.line(
        1,
        br#"{"id":8,"command":"plugin","args":{"name":"count"}}"#,
        0,
    )
    .unwrap();
    h.line(2, br#"{"id":9,"command":"pause","args":{"vcpus":[1]}}"#, 0)
        .unwrap();
    assert!(h.responses().is_empty());
    end(&mut h);
    assert_eq!(
        message(&h, 7),
        format!("migrate: the VM ended before the migration finished ({why})")
    );
    assert!(message(&h, 8).contains(why), "{}", message(&h, 8));
    assert!(
        message(&h, 9).starts_with("pause: the VM"),
        "{}",
        message(&h, 9)
    );
    assert_eq!(h.responses().len(), 3);
    let names: Vec<&str> = h.events().iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.last(), Some(&"migration-failed"));
    // Nothing left for `finish` (which fails on a request never answered).
    h.finish().unwrap();

    // Mid-precopy (a round being sent): the worker is stopped, the answer
    // names why.
    let mut h = running(1, PluginMode::Takes(4));
    migrate(&mut h, "/t");
    answer(&mut h, &[]);
    end(&mut h);
    assert_eq!(
        message(&h, 7),
        format!("migrate: the VM ended before the migration finished ({why})")
    );
    assert_eq!(h.vm.migrations_aborted, 1);
    assert!(h.vm.migrated_to.is_none());
    h.finish().unwrap();

    // In the hand-over, the worker done: the answer is the migration's
    // success, not the VM's end.
    let mut h = running(1, PluginMode::Takes(4));
    to_hand_over(&mut h, "/t");
    assert!(h.vm.migration.as_ref().unwrap().finished.is_some());
    assert!(h.responses().is_empty());
    end(&mut h);
    let rs = h.responses();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].1.ok.as_ref().unwrap()["to"], "unix:/t", "{rs:?}");
    assert_eq!(h.vm.migrated_to.as_deref(), Some("unix:/t"));
    h.finish().unwrap();

    // In the hand-over after `Commit`, the target gone: the error says the
    // target may run the machine (and nothing about resuming this VM).
    let mut h = running(1, PluginMode::Takes(4));
    to_hand_over(&mut h, "/commit-drop");
    end(&mut h);
    let m = message(&h, 7);
    assert!(m.ends_with("the target may be running the machine"), "{m}");
    h.finish().unwrap();

    // A snapshot waiting for its vcpus to park.
    let mut h = running(1, PluginMode::Takes(4));
    h.line(
        1,
        br#"{"id":5,"command":"snapshot","args":{"dir":"/s"}}"#,
        0,
    )
    .unwrap();
    end(&mut h);
    assert!(
        message(&h, 5).starts_with("snapshot: the VM"),
        "{}",
        message(&h, 5)
    );
    h.finish().unwrap();
}
