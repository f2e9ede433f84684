//! The recording hook: a real run with `VMM_RECORD_DIR` writes sessions in
//! the fuzzers' input format, and they replay through the model harnesses.

use e2e_tests::{bin, run_command, TempDir};
use vmm::record::{records, RecordKind};
use vmm_model::main_harness::run_model_session;
use vmm_model::vcpu_harness::run_vcpu_session;

#[test]
fn recorded_sessions_replay_through_the_harnesses() {
    let dir = TempDir::new("record");
    let mut cmd = std::process::Command::new(bin("vmm"));
    cmd.env(vmm::record::RECORD_DIR_ENV, &dir.0)
        .args(["--disable-sandbox", "--cpus", "2", "--plugin"])
        .arg(bin("multi_io"))
        .args(["--plugin-args", "20"]);
    run_command(cmd).assert_success();
    let mut main = Vec::new();
    let mut vcpus = Vec::new();
    for e in std::fs::read_dir(&dir.0).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(e.path()).unwrap();
        if name.starts_with("main-") {
            main.push(data);
        } else if name.starts_with("vcpu") {
            vcpus.push(data);
        }
    }
    assert_eq!(
        (main.len(), vcpus.len()),
        (1, 2),
        "one main and two vcpu sessions"
    );
    // The main session: GetVcpus first, memory with its sealed memfd.
    let recs: Vec<_> = records(&main[0]).collect();
    assert!(recs.iter().all(|r| matches!(
        r.kind,
        RecordKind::MainRequest | RecordKind::CloseConnection
    )));
    assert!(
        recs[0].payload.starts_with(&[0x8a, 0x01]),
        "GetVcpus comes first"
    );
    assert!(recs
        .iter()
        .any(|r| r.fd_kind == vmm::record::FdKind::SealedMemfd && r.fd_arg == 16));
    let stats = run_model_session(&main[0], 2, 8).unwrap();
    assert!(stats.created >= 1, "{stats:?}");
    // Each vcpu: its requests and the 21 exits it delivered.
    for v in &vcpus {
        let exits = records(v)
            .filter(|r| r.kind == RecordKind::VcpuExit)
            .count();
        assert_eq!(exits, 21);
        let stats = run_vcpu_session(v).unwrap();
        assert_eq!(stats.exits, 21, "{stats:?}");
        // Init and the 20 data writes were resumed; the plugin left at the
        // done port without resuming it.
        assert_eq!((stats.resumes, stats.undecodable), (21, 0), "{stats:?}");
    }
}
