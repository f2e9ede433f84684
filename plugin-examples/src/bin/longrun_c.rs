//! Entry point of the C longrun machine (`c/longrun.c`): passes argv to the C
//! `main`, which the build script compiled against `crosvm.h` and `crosvm_ext.h`.

use std::ffi::{c_char, c_int};

// The C API implementation the C code calls.
use crosvm_plugin as _;

extern "C" {
    fn longrun_c_main(argc: c_int, argv: *const *const c_char) -> c_int;
}

fn main() {
    plugin_examples::run_c_main(longrun_c_main)
}
