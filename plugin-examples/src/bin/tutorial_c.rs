//! Entry point of the C tutorial machine (`c/tutorial.c`): passes argv to the C
//! `main`, which the build script compiled against `crosvm.h`.

use std::ffi::{c_char, c_int, CString};

// The C API implementation the C code calls, and the library crate whose
// rlib carries the compiled C archive.
use crosvm_plugin as _;
use plugin_examples as _;

extern "C" {
    fn tutorial_c_main(argc: c_int, argv: *const *const c_char) -> c_int;
}

fn main() {
    let args: Vec<CString> = std::env::args()
        .map(|a| CString::new(a).unwrap_or_default())
        .collect();
    let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let argc = c_int::try_from(args.len()).unwrap_or(c_int::MAX);
    // SAFETY: argv holds `argc` valid NUL-terminated strings (kept alive by
    // `args`) followed by NULL, as C's main expects.
    let code = unsafe { tutorial_c_main(argc, argv.as_ptr()) };
    std::process::exit(code);
}
