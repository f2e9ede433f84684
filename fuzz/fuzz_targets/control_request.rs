//! The control socket's request parser and command dispatcher on the model
//! VM: arbitrary bytes as request lines (`vmm_client::proto::parse_request`,
//! then `vmm::control::dispatch`), interleaved with vcpus leaving the
//! guest, plugin replies, start and stop. The harness checks that every
//! request is answered exactly once, pauses only when their vcpus are out
//! of the guest, and events are numbered without gaps.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmm_model::control_harness::run_control_session(data) {
        panic!("{e}");
    }
});
