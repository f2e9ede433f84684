//! Hostile migration-stream bytes (what `vmm --incoming` reads from its
//! peer): the first byte picks the parser (the source's stream or one
//! reply), the rest is its input. Neither may panic or allocate beyond
//! the stream's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_migration::fuzz_one(data);
});
