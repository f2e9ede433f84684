//! The main-connection receive (`recv_packet_with`) over a real socket pair:
//! packet sizes around the limit, 0..SCM_MAX_FD descriptors of every kind.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmm_model::check_seqpacket(data) {
        panic!("{e}");
    }
});
