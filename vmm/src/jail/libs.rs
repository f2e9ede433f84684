//! Which files the plugin needs to start: its binary, the dynamic loader
//! its ELF header names (`PT_INTERP`), and the shared libraries the loader
//! would load. The libraries are found by asking that loader itself
//! (`LOADER --list BINARY`, what `ldd` does): it applies RUNPATH, RPATH,
//! `$ORIGIN`, `LD_LIBRARY_PATH`, `ld.so.cache` and hwcaps directories
//! exactly as it will in the jail, without running any of the plugin's code.
//! The jail binds each file at the path the loader uses, and binds
//! `/etc/ld.so.cache` too so the loader resolves the same paths inside.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors finding what the plugin needs.
#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a 64-bit little-endian ELF executable (the jail runs only those)")]
    NotElf(PathBuf),
    #[error("cannot run the dynamic loader {loader} to list the libraries of {path}")]
    Loader {
        loader: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the dynamic loader {loader} cannot list the libraries of {path}: {message}")]
    List {
        loader: PathBuf,
        path: PathBuf,
        message: String,
    },
    #[error("library {name} needed by {path} was not found")]
    NotFound { name: String, path: PathBuf },
}

const PT_INTERP: u32 = 3;

/// The `PT_INTERP` path of an ELF executable, `None` if statically linked.
pub fn interpreter(path: &Path) -> Result<Option<PathBuf>, LibsError> {
    let read_err = |source| LibsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read_err)?;
    // The header and program headers are in the first pages of any sane
    // executable; read a bounded prefix.
    let mut data = Vec::new();
    f.by_ref()
        .take(1 << 20)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    let not_elf = || LibsError::NotElf(path.to_path_buf());
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB.
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let phoff = u64_at(0x20).ok_or_else(not_elf)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(not_elf)? as usize;
    let phnum = u16_at(0x38).ok_or_else(not_elf)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(not_elf)? != PT_INTERP {
            continue;
        }
        let off = u64_at(ph + 8).ok_or_else(not_elf)? as usize;
        let size = u64_at(ph + 32).ok_or_else(not_elf)? as usize;
        let raw = data.get(off..off + size).ok_or_else(not_elf)?;
        let raw = raw.split(|&b| b == 0).next().unwrap_or(raw);
        return Ok(Some(PathBuf::from(OsStr::from_bytes(raw))));
    }
    Ok(None)
}

/// Parses `ld.so --list` output into the paths the loader opened.
pub fn parse_list(output: &str, path: &Path) -> Result<Vec<PathBuf>, LibsError> {
    let mut out = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // "name => /path (0x...)", "name => not found", "/path (0x...)",
        // "linux-vdso.so.1 (0x...)".
        let (name, target) = match line.split_once("=>") {
            Some((n, t)) => (n.trim(), t.trim()),
            None => (line, line),
        };
        if target.starts_with("not found") {
            return Err(LibsError::NotFound {
                name: name.to_string(),
                path: path.to_path_buf(),
            });
        }
        let file = target.split(" (0x").next().unwrap_or(target).trim();
        if file.starts_with('/') {
            out.push(PathBuf::from(file));
        }
    }
    Ok(out)
}

/// Everything the plugin needs to start, as paths to bind at the same
/// place: the loader (as `PT_INTERP` names it), the libraries, and
/// `/etc/ld.so.cache` if the plugin is dynamically linked. `path` must be
/// the canonical path of the plugin (the one it is started by); it is not
/// included. `env` is the environment the plugin will get: the loader
/// resolves with exactly it (`LD_LIBRARY_PATH` of vmm's own environment must
/// not decide which copy of a library is bound when the plugin, started with
/// a minimal environment, would load another).
pub fn needed_files(
    path: &Path,
    env: &[(String, std::ffi::OsString)],
) -> Result<Vec<PathBuf>, LibsError> {
    let Some(loader) = interpreter(path)? else {
        return Ok(Vec::new());
    };
    let loader_err = |source| LibsError::Loader {
        loader: loader.clone(),
        path: path.to_path_buf(),
        source,
    };
    let out = Command::new(&loader)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--list")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(loader_err)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A missing library is reported on stdout with a failure status.
        parse_list(&stdout, path)?;
        return Err(LibsError::List {
            loader: loader.clone(),
            path: path.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let mut files = vec![loader.clone()];
    files.extend(parse_list(&stdout, path)?);
    let cache = Path::new("/etc/ld.so.cache");
    if cache.exists() {
        files.push(cache.to_path_buf());
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loader_listing() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc1d7f3000)\n\
                    \tlibcrosvm_plugin.so => /w/target/release/libcrosvm_plugin.so (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let v = parse_list(text, Path::new("/p")).unwrap();
        assert_eq!(
            v,
            vec![
                PathBuf::from("/w/target/release/libcrosvm_plugin.so"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let e = parse_list("\tlibfoo.so.1 => not found\n", Path::new("/p")).unwrap_err();
        assert!(e.to_string().contains("libfoo.so.1"), "{e}");
    }

    #[test]
    fn finds_this_test_binary_loader_and_libc() {
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        let files = needed_files(&exe, &[]).unwrap();
        let loader = interpreter(&exe).unwrap().unwrap();
        assert_eq!(files[0], loader);
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
        assert!(matches!(
            interpreter(Path::new("/etc/hostname")),
            Err(LibsError::NotElf(_)) | Err(LibsError::Read { .. })
        ));
    }
}
