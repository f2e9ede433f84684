//! The one helper that compiles C (or C++) against `crosvm.h` for the
//! tests, used by the SDK's own tests (`plugin-sdk/tests/`) and by the
//! end-to-end tests (`tests/src/lib.rs` includes this file by path), so the
//! compiler flags and the way `libcrosvm_plugin.so` is found live in one
//! place.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (both including crates sit directly below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives below the repository root")
        .to_path_buf()
}

/// `plugin-sdk/include`, where `crosvm.h` is.
pub fn include_dir() -> PathBuf {
    root().join("plugin-sdk/include")
}

/// `<target>/<profile>`: test binaries live in its `deps/` directory.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// The directory holding the current `libcrosvm_plugin.so`. Cargo writes
/// the cdylib to `deps/` when it builds tests and copies it to the profile
/// directory for `cargo build`; the former is preferred (always current).
pub fn library_dir() -> PathBuf {
    let profile = profile_dir();
    let candidates = [profile.join("deps"), profile.clone()];
    candidates
        .iter()
        .find(|d| d.join("libcrosvm_plugin.so").exists())
        .unwrap_or_else(|| {
            panic!(
                "libcrosvm_plugin.so is not built in {candidates:?}: build the workspace first \
                 (cargo build --release --workspace)"
            )
        })
        .clone()
}

/// A scratch directory for compiled test programs, `<profile>/c-api-tests`.
pub fn out_dir() -> PathBuf {
    let dir = profile_dir().join("c-api-tests");
    std::fs::create_dir_all(&dir).expect("create the C test output directory");
    dir
}

/// One compiler run: `compiler -I plugin-sdk/include -Wall -Werror FLAGS
/// SOURCES [-o OUT] [-L LIB -Wl,-rpath,LIB -lcrosvm_plugin]`.
pub struct CBuild {
    cmd: Command,
    link: Option<PathBuf>,
}

impl CBuild {
    /// `cc` with the header's directory on the include path and warnings as
    /// errors.
    pub fn c() -> CBuild {
        CBuild::with("cc")
    }

    /// The same with `c++`.
    pub fn cxx() -> CBuild {
        CBuild::with("c++")
    }

    fn with(compiler: &str) -> CBuild {
        let mut cmd = Command::new(compiler);
        cmd.arg("-I").arg(include_dir()).args(["-Wall", "-Werror"]);
        CBuild { cmd, link: None }
    }

    /// Adds compiler flags (standard, optimisation, `-c`, ...).
    pub fn flags<S: AsRef<OsStr>>(mut self, flags: impl IntoIterator<Item = S>) -> CBuild {
        self.cmd.args(flags);
        self
    }

    /// Adds a source file.
    pub fn source(mut self, path: &Path) -> CBuild {
        self.cmd.arg(path);
        self
    }

    /// Names the output file.
    pub fn output(mut self, path: &Path) -> CBuild {
        self.cmd.arg("-o").arg(path);
        self
    }

    /// Links against `libcrosvm_plugin.so` from [`library_dir`], with an
    /// rpath, as a user would (`-pthread` included).
    pub fn link_sdk(mut self) -> CBuild {
        self.cmd.arg("-pthread");
        self.link = Some(library_dir());
        self
    }

    /// Runs the compiler; the error holds the command and its diagnostics.
    pub fn try_run(mut self) -> Result<(), String> {
        if let Some(lib) = &self.link {
            self.cmd
                .arg("-L")
                .arg(lib)
                .arg(format!("-Wl,-rpath,{}", lib.display()))
                .arg("-lcrosvm_plugin");
        }
        let out = self
            .cmd
            .output()
            .map_err(|e| format!("cannot run {:?}: {e}", self.cmd))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{:?} failed ({}):\n{}{}",
                self.cmd,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Runs the compiler and panics with its diagnostics when it fails.
    pub fn run(self) {
        if let Err(e) = self.try_run() {
            panic!("{e}");
        }
    }
}
