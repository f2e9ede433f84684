//! Deterministic fuzzing in the normal test suite: fixed seeds, at least
//! 100,000 requests through each request handler and the framing decoders,
//! every one checked against the model's invariants (vmm_model).
//!
//! The tests share the process's descriptor table (the leak checks count
//! it), so they run one at a time.

use std::sync::Mutex;

use vmm_model::rng::{smoke_framing, smoke_main, smoke_vcpu};

static SERIAL: Mutex<()> = Mutex::new(());

const REQUESTS: usize = 100_000;

#[test]
fn main_handler_100k_requests() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let stats = smoke_main(0x5eed_0001, REQUESTS, 400).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{stats:?}");
    assert!(stats.requests as usize >= REQUESTS);
    // The generator must reach the interesting paths, not just errors.
    assert!(stats.created > REQUESTS as u64 / 100, "{stats:?}");
    assert!(stats.ok > REQUESTS as u64 / 5, "{stats:?}");
    assert!(stats.undecodable > 0, "{stats:?}");
    for errno in [
        libc::EEXIST,
        libc::ENOENT,
        libc::EINVAL,
        libc::EPERM,
        libc::EBADF,
        libc::E2BIG,
    ] {
        assert!(
            stats.errnos.contains_key(&errno),
            "errno {errno} never seen: {stats:?}"
        );
    }
}

#[test]
fn vcpu_handler_100k_requests() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let stats = smoke_vcpu(0x5eed_0002, REQUESTS, 300).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{stats:?}");
    assert!(stats.requests as usize >= REQUESTS);
    assert!(stats.resumes > REQUESTS as u64 / 50, "{stats:?}");
    assert!(stats.exits > REQUESTS as u64 / 50, "{stats:?}");
    assert!(stats.undecodable > 0, "{stats:?}");
}

#[test]
fn framing_decoders_100k_frames() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (frames, packets) =
        smoke_framing(0x5eed_0003, REQUESTS, REQUESTS).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("frames={frames} packets={packets}");
    assert!(frames >= REQUESTS && packets >= REQUESTS);
}
