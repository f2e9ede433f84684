//! The vcpu servicing loop against the model vcpu, in every state: Init,
//! stopped in an IO read or write, after a posted write, paused, in a
//! Hyper-V exit. Input: a session of vcpu requests and exits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmm_model::vcpu_harness::run_vcpu_session(data) {
        panic!("{e}");
    }
});
