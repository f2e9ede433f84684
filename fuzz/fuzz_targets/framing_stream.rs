//! The vcpu-channel stream decoders (`decode_varint`, `FrameReader`) against
//! reference decoders, on raw bytes and on real responses cut anywhere.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmm_model::check_stream(data) {
        panic!("{e}");
    }
});
