//! The main request handler against the model VM. Input: a session (see
//! `vmm::record`): raw and generated main requests with descriptors of every
//! kind, and connection closes. Every request's outcome and every invariant
//! is checked; the session must leak no descriptor.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Few memory slots, so slot exhaustion is reachable.
    if let Err(e) = vmm_model::main_harness::run_model_session(data, 2, 8) {
        panic!("{e}");
    }
});
