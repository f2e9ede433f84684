//! Gives `libcrosvm_plugin.so` its soname, so programs linked against it
//! (in the build tree or an installed prefix) record the same `NEEDED`
//! entry. The soname is unversioned on purpose: the library's ABI is
//! crosvm's plugin API 0.22, frozen, and programs built against crosvm's
//! own unversioned library keep finding this one.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcrosvm_plugin.so");
    println!("cargo:rerun-if-changed=build.rs");
}
