//! Which files the plugin needs to start: its binary, the dynamic loader
//! its ELF header names (`PT_INTERP`), and the shared libraries the loader
//! would load. The libraries are found by asking that loader itself
//! (`LOADER --list BINARY`, what `ldd` does): it applies RUNPATH, RPATH,
//! `$ORIGIN`, `LD_LIBRARY_PATH`, `ld.so.cache` and hwcaps directories
//! exactly as it will in the jail, without running any of the plugin's code.
//! The jail binds each file at the path the loader uses, and binds
//! `/etc/ld.so.cache` too so the loader resolves the same paths inside.
//!
//! Running the loader costs a fork and an exec per VM; [`needed_files_cached`]
//! keeps its answer in a per-boot cache (`/run/vmm/libs`, a directory of
//! vmm's user that nobody else may write), valid while the plugin, every
//! file listed, the directories they are in and `/etc` are unchanged
//! (device, inode, size, modification and change times; for a symbolic
//! link, the link's and its target's).

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use log::debug;
use serde::{Deserialize, Serialize};

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
/// Reads only the ELF header, the program headers and the path.
pub fn interpreter(path: &Path) -> Result<Option<PathBuf>, LibsError> {
    let read_err = |source| LibsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let not_elf = || LibsError::NotElf(path.to_path_buf());
    let f = std::fs::File::open(path).map_err(read_err)?;
    // Reads `len` bytes at `off`; a short file is not an ELF executable.
    let read_at = |off: u64, len: usize| -> Result<Vec<u8>, LibsError> {
        let mut buf = vec![0u8; len];
        match f.read_exact_at(&mut buf, off) {
            Ok(()) => Ok(buf),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(not_elf()),
            Err(e) => Err(read_err(e)),
        }
    };
    let header = read_at(0, 64)?;
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB.
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |d: &[u8], o: usize| d.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |d: &[u8], o: usize| {
        d.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |d: &[u8], o: usize| {
        d.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let phoff = u64_at(&header, 0x20).ok_or_else(not_elf)?;
    let phentsize = u16_at(&header, 0x36).ok_or_else(not_elf)? as usize;
    let phnum = u16_at(&header, 0x38).ok_or_else(not_elf)? as usize;
    if phentsize < 56 {
        return if phnum == 0 { Ok(None) } else { Err(not_elf()) };
    }
    // At most 65535 entries of at most 65535 bytes: bounded (4 GiB in
    // theory; refuse more than 1 MiB of program headers).
    let table_len = phnum * phentsize;
    if table_len > 1 << 20 {
        return Err(not_elf());
    }
    let table = read_at(phoff, table_len)?;
    for i in 0..phnum {
        let ph = i * phentsize;
        if u32_at(&table, ph).ok_or_else(not_elf)? != PT_INTERP {
            continue;
        }
        let off = u64_at(&table, ph + 8).ok_or_else(not_elf)?;
        let size = u64_at(&table, ph + 32).ok_or_else(not_elf)? as usize;
        if size > libc::PATH_MAX as usize {
            return Err(not_elf());
        }
        let raw = read_at(off, size)?;
        let raw = raw.split(|&b| b == 0).next().unwrap_or(&raw);
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

/// Where [`needed_files_cached`] keeps the loader's answers by default.
pub const CACHE_DIR: &str = "/run/vmm/libs";
/// Bumped when the cache entry's meaning changes.
const CACHE_VERSION: u32 = 1;
/// A cache entry larger than this is not read.
const CACHE_ENTRY_MAX: u64 = 1 << 20;

/// What identifies a file's contents without reading them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The path itself (a link is not followed) and what it leads to.
    fn pair(path: &Path) -> Option<(FileId, FileId)> {
        let link = std::fs::symlink_metadata(path).ok()?;
        let target = std::fs::metadata(path).ok()?;
        Some((FileId::of(&link), FileId::of(&target)))
    }
}

/// One cached answer: the question (plugin, environment), the answer
/// (files), and what it depends on.
#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    version: u32,
    plugin: Vec<u8>,
    env: Vec<(String, Vec<u8>)>,
    files: Vec<Vec<u8>>,
    depends: Vec<(Vec<u8>, FileId, FileId)>,
}

fn env_key(env: &[(String, OsString)]) -> Vec<(String, Vec<u8>)> {
    env.iter()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
        .collect()
}

/// The paths an answer depends on: the plugin, each file, their
/// directories, and `/etc` (where a new `ld.so.cache` would appear).
fn dependencies(path: &Path, files: &[PathBuf]) -> Vec<PathBuf> {
    let mut deps = vec![path.to_path_buf(), PathBuf::from("/etc")];
    for f in std::iter::once(path).chain(files.iter().map(PathBuf::as_path)) {
        deps.push(f.to_path_buf());
        if let Some(dir) = f.parent() {
            deps.push(dir.to_path_buf());
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    deps.retain(|d| seen.insert(d.clone()));
    deps
}

fn entry_name(path: &Path, env: &[(String, OsString)]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.as_os_str().as_bytes().hash(&mut h);
    env_key(env).hash(&mut h);
    format!("{:016x}.json", h.finish())
}

/// Reads a cache entry if it is this user's, writable by nobody else, and
/// still describes the files as they are.
fn cache_lookup(file: &Path, path: &Path, env: &[(String, OsString)]) -> Option<Vec<PathBuf>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(file)
        .ok()?;
    let m = f.metadata().ok()?;
    if !m.is_file()
        || m.uid() != nix::unistd::geteuid().as_raw()
        || m.mode() & 0o022 != 0
        || m.len() > CACHE_ENTRY_MAX
    {
        debug!(
            "library cache: ignoring {} (owner, mode or size)",
            file.display()
        );
        return None;
    }
    let mut text = Vec::new();
    f.take(CACHE_ENTRY_MAX).read_to_end(&mut text).ok()?;
    let e: CacheEntry = serde_json::from_slice(&text).ok()?;
    if e.version != CACHE_VERSION
        || e.plugin != path.as_os_str().as_bytes()
        || e.env != env_key(env)
    {
        return None;
    }
    for (p, link, target) in &e.depends {
        let now = FileId::pair(Path::new(OsStr::from_bytes(p)))?;
        if now != (link.clone(), target.clone()) {
            return None;
        }
    }
    Some(
        e.files
            .iter()
            .map(|f| PathBuf::from(OsStr::from_bytes(f)))
            .collect(),
    )
}

/// Stores an answer (write to a new file, then rename it into place).
fn cache_store(
    file: &Path,
    path: &Path,
    env: &[(String, OsString)],
    files: &[PathBuf],
    before: Vec<(Vec<u8>, FileId, FileId)>,
) -> std::io::Result<()> {
    let entry = CacheEntry {
        version: CACHE_VERSION,
        plugin: path.as_os_str().as_bytes().to_vec(),
        env: env_key(env),
        files: files
            .iter()
            .map(|f| f.as_os_str().as_bytes().to_vec())
            .collect(),
        depends: before,
    };
    let text = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
    let tmp = file.with_extension(format!("{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let written = f
        .write_all(&text)
        .and_then(|()| std::fs::rename(&tmp, file));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// [`needed_files`], answered from the cache in `cache_dir` when it holds
/// an answer for this plugin and environment that is still valid (`None`,
/// or a directory that is not vmm's user's alone: always ask the loader).
/// An answer is not stored if any file it depends on changed less than a
/// second before the loader ran (or since): the identities recorded might
/// then be newer than what the loader read.
pub fn needed_files_cached(
    path: &Path,
    env: &[(String, OsString)],
    cache_dir: Option<&Path>,
) -> Result<Vec<PathBuf>, LibsError> {
    let dir = cache_dir.and_then(|d| {
        let s = d.to_str()?;
        match super::netns::private_dir(s) {
            Ok(()) => Some(d),
            Err(e) => {
                debug!("library cache not used: {}", crate::error_chain(&e));
                None
            }
        }
    });
    let Some(dir) = dir else {
        return needed_files(path, env);
    };
    let file = dir.join(entry_name(path, env));
    if let Some(files) = cache_lookup(&file, path, env) {
        return Ok(files);
    }
    let asked = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        - 1;
    let files = needed_files(path, env)?;
    let mut depends = Vec::new();
    for d in dependencies(path, &files) {
        match FileId::pair(&d) {
            // ctime is the kernel's (coarse) clock at the last change.
            Some((l, t)) if l.ctime.0 < asked && t.ctime.0 < asked => {
                depends.push((d.as_os_str().as_bytes().to_vec(), l, t))
            }
            _ => return Ok(files),
        }
    }
    if let Err(e) = cache_store(&file, path, env, &files, depends) {
        debug!("library cache: cannot store {}: {e}", file.display());
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

    /// A scratch directory with a copy of this test binary.
    fn scratch(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vmm-libs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cache")).unwrap();
        let exe = dir.join("plugin");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        (dir.clone(), exe, dir.join("cache"))
    }

    #[test]
    fn cache_answers_while_nothing_changed_and_only_from_a_private_file() {
        let (dir, exe, cache) = scratch("cache");
        let truth = needed_files(&exe, &[]).unwrap();
        // A file changed less than a second ago: the answer is not stored.
        assert_eq!(needed_files_cached(&exe, &[], Some(&cache)).unwrap(), truth);
        let entry = cache.join(entry_name(&exe, &[]));
        assert!(!entry.exists());

        // An entry made as if the files had been unchanged for a while,
        // with a marker file in its answer, so that a hit shows.
        let mut marked = truth.clone();
        marked.push(PathBuf::from("/marker-of-a-cache-hit"));
        let store = |files: &[PathBuf]| {
            let deps = dependencies(&exe, &truth)
                .into_iter()
                .map(|d| {
                    let (l, t) = FileId::pair(&d).unwrap();
                    (d.as_os_str().as_bytes().to_vec(), l, t)
                })
                .collect();
            let _ = std::fs::remove_file(&entry);
            cache_store(&entry, &exe, &[], files, deps).unwrap();
        };
        store(&marked);
        assert_eq!(
            needed_files_cached(&exe, &[], Some(&cache)).unwrap(),
            marked
        );
        // Another environment is another question.
        let env = [(
            "LD_LIBRARY_PATH".to_string(),
            OsString::from("/nonexistent"),
        )];
        assert!(!needed_files_cached(&exe, &env, Some(&cache))
            .unwrap()
            .contains(&marked[marked.len() - 1]));
        // No cache: the loader.
        assert_eq!(needed_files_cached(&exe, &[], None).unwrap(), truth);

        // An entry others can write is not believed.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o622)).unwrap();
        assert_eq!(needed_files_cached(&exe, &[], Some(&cache)).unwrap(), truth);
        // Nor is a cache directory others can write.
        store(&marked);
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(needed_files_cached(&exe, &[], Some(&cache)).unwrap(), truth);
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(
            needed_files_cached(&exe, &[], Some(&cache)).unwrap(),
            marked
        );

        // A changed plugin (or library, or directory) is asked about again.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&exe)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert_eq!(needed_files_cached(&exe, &[], Some(&cache)).unwrap(), truth);
        // So is a new file in one of the directories.
        store(&marked);
        assert_eq!(
            needed_files_cached(&exe, &[], Some(&cache)).unwrap(),
            marked
        );
        std::fs::write(dir.join("new-file"), b"").unwrap();
        assert_eq!(needed_files_cached(&exe, &[], Some(&cache)).unwrap(), truth);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interpreter_reads_only_what_it_needs_and_refuses_short_files() {
        let (dir, exe, _) = scratch("interp");
        let loader = interpreter(&exe).unwrap().unwrap();
        assert!(loader.to_string_lossy().contains("ld-linux"), "{loader:?}");
        // The first 4 KiB hold the header, the program headers and the
        // path in any ordinary executable; cut there the answer is the same.
        let head = std::fs::read(&exe).unwrap()[..4096].to_vec();
        let cut = dir.join("cut");
        std::fs::write(&cut, &head).unwrap();
        assert_eq!(interpreter(&cut).unwrap().unwrap(), loader);
        std::fs::write(&cut, &head[..40]).unwrap();
        assert!(matches!(interpreter(&cut), Err(LibsError::NotElf(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
