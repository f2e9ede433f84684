//! Compiles the C example machines in `c/` against `crosvm.h`. Each C file's
//! `main` is renamed so a thin Rust binary (`src/bin/<name>.rs`) can call it;
//! the C code itself is unchanged crosvm API 0.22 code.

/// The C example machines: `(binary, source)`, each `c/<source>.c` with a
/// `src/bin/<binary>.rs`.
const C_EXAMPLES: &[(&str, &str)] = &[
    ("adder_c", "adder_c"),
    ("tutorial_c", "tutorial"),
    ("counter_c", "counter_c"),
    ("longrun_c", "longrun"),
];

fn main() {
    for (name, source) in C_EXAMPLES {
        let src = format!("c/{source}.c");
        println!("cargo:rerun-if-changed={src}");
        cc::Build::new()
            .file(&src)
            .include("../plugin-sdk/include")
            .define("main", Some(format!("{name}_main").as_str()))
            .flag("-std=gnu11")
            .warnings(true)
            .extra_warnings(true)
            .warnings_into_errors(true)
            .compile(name);
    }
    println!("cargo:rerun-if-changed=../plugin-sdk/include/crosvm.h");
    println!("cargo:rerun-if-changed=../plugin-sdk/include/crosvm_ext.h");
}
