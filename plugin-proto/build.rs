//! Generates the Rust code for `proto/plugin.proto` with rust-protobuf's
//! pure-Rust parser, so no `protoc` binary is needed.

fn main() {
    println!("cargo:rerun-if-changed=proto/plugin.proto");
    protobuf_codegen::Codegen::new()
        .pure()
        .include("proto")
        .input("proto/plugin.proto")
        .cargo_out_dir("generated")
        .run_from_script();
}
