//! Replays the committed fuzz inputs through the same harnesses as the fuzz
//! targets: recorded seeds (fuzz/seeds), the minimized corpora
//! (fuzz/corpus) and crash/bug reproducers (fuzz/regressions).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vmm_model::main_harness::{run_model_session, MainHarness};
use vmm_model::vcpu_harness::run_vcpu_session;
use vmm_model::{check_seqpacket, check_stream, open_fd_count};

/// The leak checks count this process's descriptors: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file under `fuzz/{seeds,corpus,regressions}/<target>`.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["seeds", "corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            out.push((p, data));
        }
    }
    out
}

fn replay(target: &str, f: impl Fn(&[u8]) -> Result<(), String>) -> usize {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let all = inputs(target);
    for (path, data) in &all {
        if let Err(e) = f(data) {
            panic!("{}: {e}", path.display());
        }
    }
    all.len()
}

#[test]
fn main_handler_inputs() {
    let n = replay("main_handler", |d| {
        run_model_session(d, 2, 8)
            .map(drop)
            .map_err(|e| e.to_string())
    });
    assert!(n >= 6, "the recorded seeds are missing");
}

#[test]
fn vcpu_handler_inputs() {
    let n = replay("vcpu_handler", |d| {
        run_vcpu_session(d).map(drop).map_err(|e| e.to_string())
    });
    assert!(n >= 6, "the recorded seeds are missing");
}

#[test]
fn framing_inputs() {
    replay("framing_stream", |d| {
        check_stream(d).map(drop).map_err(|e| e.to_string())
    });
    replay("framing_seqpacket", |d| {
        check_seqpacket(d).map(drop).map_err(|e| e.to_string())
    });
}

#[test]
fn main_kvm_inputs() {
    replay("main_kvm", |d| {
        let before = open_fd_count();
        {
            let vm = vmm::vm::KvmVm::new("/dev/kvm").map_err(|e| e.to_string())?;
            let mut h = MainHarness::new(vm, 2).map_err(|e| e.to_string())?;
            h.run_session(d).map_err(|e| e.to_string())?;
            h.finish().map_err(|e| e.to_string())?;
        }
        if open_fd_count() != before {
            return Err("descriptor leak".into());
        }
        Ok(())
    });
}

#[test]
fn regression_truncated_request_is_refused() {
    let data =
        std::fs::read(fuzz_dir().join("regressions/main_handler/truncated-create-memory.session"))
            .unwrap();
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let stats = run_model_session(&data, 2, 8).unwrap();
    // GetVcpus and the complete Create answered; the cut one refused.
    assert_eq!((stats.undecodable, stats.created), (1, 1), "{stats:?}");
}

#[test]
fn regression_packed_claim_is_undecodable() {
    let data =
        std::fs::read(fuzz_dir().join("regressions/vcpu_handler/packed-get-msrs-claim.session"))
            .unwrap();
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let stats = run_vcpu_session(&data).unwrap();
    assert_eq!(stats.undecodable, 1, "{stats:?}");
}

#[test]
fn control_request_inputs() {
    let n = replay("control_request", |d| {
        vmm_model::control_harness::run_control_session(d).map_err(|e| e.to_string())
    });
    assert!(n >= 1, "the control_request corpus is missing");
}

#[test]
fn migration_stream_inputs() {
    let n = replay("migration_stream", |d| {
        vmm_migration::fuzz_one(d);
        Ok(())
    });
    assert!(n >= 4, "the migration_stream seeds are missing");
}
