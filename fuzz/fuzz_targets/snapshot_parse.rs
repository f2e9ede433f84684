//! Hostile snapshot bytes: the first byte picks the parser (manifest JSON
//! or state records), the rest is its input. Neither may panic or allocate
//! beyond its bounds; whatever parses must re-encode to an equal value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_snapshot::{Manifest, Records};

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        if let Ok(m) = Manifest::parse(rest) {
            let again = Manifest::parse(&m.to_json()).expect("a parsed manifest re-parses");
            assert_eq!(again, m);
        }
    } else if let Ok(r) = Records::decode(rest) {
        assert_eq!(Records::decode(&r.encode()).expect("re-decodes"), r);
    }
});
