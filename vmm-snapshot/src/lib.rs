//! vmm's snapshot format: a directory with a versioned, self-describing
//! `manifest.json` ([`manifest`]) and one file per part, each with its own
//! checksum: named state records ([`records`]), sparse memory images
//! ([`memory`]) and opaque blobs (the plugin's device state).
//!
//! [`SnapshotWriter`] writes a directory part by part and the manifest
//! last; [`Snapshot`] opens one, checks the manifest, and reads parts back
//! with their checksums verified. Everything read is hostile input (a
//! truncated or corrupted snapshot, or one crafted to harm the host): the
//! readers bound every size before allocating and report what is wrong.

pub mod manifest;
pub mod memory;
pub mod records;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use manifest::{Manifest, ManifestError, Part, PartKind};
pub use memory::{ImageInfo, MemoryError};
pub use records::{Records, RecordsError};

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// Why a snapshot could not be written or read. Names the directory or the
/// part.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: already holds a snapshot")]
    Exists(PathBuf),
    #[error("{0}: not a snapshot (no manifest.json: missing, or the snapshot was never finished)")]
    NoManifest(PathBuf),
    #[error("{path}: the manifest is refused")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("{0}: the manifest is larger than 1 MiB")]
    ManifestTooLarge(PathBuf),
    #[error("no part named {0:?} in the snapshot")]
    NoPart(String),
    #[error("part {name} is {actual:?}, not {expected:?}")]
    WrongKind {
        name: String,
        expected: PartKind,
        actual: PartKind,
    },
    #[error("part {name}: the file holds {actual} bytes; the manifest says {expected}")]
    Length {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("part {name}: checksum mismatch (reads as {actual:#010x}, the manifest says {expected:#010x})")]
    Checksum {
        name: String,
        expected: u32,
        actual: u32,
    },
    #[error("part {name}: its records are refused")]
    Records {
        name: String,
        #[source]
        source: RecordsError,
    },
    #[error("part {name}: the memory image")]
    Memory {
        name: String,
        #[source]
        source: MemoryError,
    },
    #[error("the manifest being written is invalid")]
    Invalid(#[source] ManifestError),
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Writes a snapshot directory.
pub struct SnapshotWriter {
    dir: PathBuf,
    manifest: Manifest,
    /// fsync every file and the directory before the manifest is renamed
    /// into place.
    durable: bool,
}

impl SnapshotWriter {
    /// Starts a snapshot in `dir` (created if missing; an existing
    /// directory must not hold a manifest). `manifest` gives the header;
    /// its parts are filled in as they are added.
    pub fn create(dir: &Path, manifest: Manifest, durable: bool) -> Result<Self, SnapshotError> {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if dir.join(MANIFEST).exists() {
                    return Err(SnapshotError::Exists(dir.to_path_buf()));
                }
            }
            Err(e) => return Err(io(dir, "cannot create the snapshot directory")(e)),
        }
        Ok(SnapshotWriter {
            dir: dir.to_path_buf(),
            manifest: Manifest {
                parts: Vec::new(),
                ..manifest
            },
            durable,
        })
    }

    fn new_file(&self, file: &str) -> Result<(File, PathBuf), SnapshotError> {
        let path = self.dir.join(file);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path, "cannot create the part's file"))?;
        Ok((f, path))
    }

    fn finish_file(&self, f: &File, path: &Path) -> Result<(), SnapshotError> {
        if self.durable {
            f.sync_all()
                .map_err(io(path, "cannot sync the part's file"))?;
        }
        Ok(())
    }

    fn add(&mut self, part: Part) -> Result<(), SnapshotError> {
        self.manifest.parts.push(part);
        if let Err(e) = self.manifest.check() {
            self.manifest.parts.pop();
            return Err(SnapshotError::Invalid(e));
        }
        Ok(())
    }

    fn add_bytes(&mut self, name: &str, kind: PartKind, bytes: &[u8]) -> Result<(), SnapshotError> {
        let file = format!(
            "{name}.{}",
            if kind == PartKind::State {
                "state"
            } else {
                "bin"
            }
        );
        let (mut f, path) = self.new_file(&file)?;
        f.write_all(bytes)
            .map_err(io(&path, "cannot write the part"))?;
        self.finish_file(&f, &path)?;
        self.add(Part {
            name: name.to_string(),
            kind,
            file,
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
            guest_address: None,
            data_pages: None,
        })
    }

    /// Adds a state part.
    pub fn add_state(&mut self, name: &str, records: &Records) -> Result<(), SnapshotError> {
        self.add_bytes(name, PartKind::State, &records.encode())
    }

    /// Adds a blob part (the plugin's device state).
    pub fn add_blob(&mut self, name: &str, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.add_bytes(name, PartKind::Blob, bytes)
    }

    /// Adds a memory part: `size` bytes of `src` from `src_offset`, which
    /// the guest sees at `guest_address`. Returns the image facts.
    pub fn add_memory(
        &mut self,
        name: &str,
        guest_address: u64,
        src: BorrowedFd<'_>,
        src_offset: u64,
        size: u64,
    ) -> Result<ImageInfo, SnapshotError> {
        let file = format!("{name}.img");
        let (f, path) = self.new_file(&file)?;
        let info = memory::write_image(src, src_offset, size, &f).map_err(|source| {
            SnapshotError::Memory {
                name: name.to_string(),
                source,
            }
        })?;
        self.finish_file(&f, &path)?;
        self.add(Part {
            name: name.to_string(),
            kind: PartKind::Memory,
            file,
            bytes: size,
            crc32: info.crc32,
            guest_address: Some(guest_address),
            data_pages: Some(info.data_pages),
        })?;
        Ok(info)
    }

    /// Writes the manifest (to a temporary name, then renamed into place):
    /// from here on the directory is a snapshot.
    pub fn finish(self) -> Result<Manifest, SnapshotError> {
        self.manifest.check().map_err(SnapshotError::Invalid)?;
        let tmp = self.dir.join(".manifest.json.tmp");
        let (mut f, _) = self.new_file(".manifest.json.tmp")?;
        f.write_all(&self.manifest.to_json())
            .map_err(io(&tmp, "cannot write the manifest"))?;
        self.finish_file(&f, &tmp)?;
        let path = self.dir.join(MANIFEST);
        std::fs::rename(&tmp, &path).map_err(io(&path, "cannot put the manifest in place"))?;
        if self.durable {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir, "cannot sync the snapshot directory"))?;
        }
        Ok(self.manifest)
    }
}

/// An opened snapshot directory with a checked manifest.
pub struct Snapshot {
    dir: PathBuf,
    manifest: Manifest,
}

impl Snapshot {
    /// Opens `dir` and checks its manifest.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let path = dir.join(MANIFEST);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::NoManifest(dir.to_path_buf()))
            }
            Err(e) => return Err(io(&path, "cannot open the manifest")(e)),
        };
        let mut bytes = Vec::new();
        f.take(manifest::MAX_MANIFEST + 1)
            .read_to_end(&mut bytes)
            .map_err(io(&path, "cannot read the manifest"))?;
        if bytes.len() as u64 > manifest::MAX_MANIFEST {
            return Err(SnapshotError::ManifestTooLarge(path));
        }
        let manifest = Manifest::parse(&bytes).map_err(|source| SnapshotError::Manifest {
            path: path.clone(),
            source,
        })?;
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn part(&self, name: &str, kind: PartKind) -> Result<&Part, SnapshotError> {
        let p = self
            .manifest
            .part(name)
            .ok_or_else(|| SnapshotError::NoPart(name.to_string()))?;
        if p.kind != kind {
            return Err(SnapshotError::WrongKind {
                name: name.to_string(),
                expected: kind,
                actual: p.kind,
            });
        }
        Ok(p)
    }

    fn open_part(&self, p: &Part) -> Result<(File, PathBuf), SnapshotError> {
        let path = self.dir.join(&p.file);
        let f = File::open(&path).map_err(io(&path, "cannot open the part"))?;
        let len = f
            .metadata()
            .map_err(io(&path, "cannot inspect the part"))?
            .len();
        if len != p.bytes {
            return Err(SnapshotError::Length {
                name: p.name.clone(),
                expected: p.bytes,
                actual: len,
            });
        }
        Ok((f, path))
    }

    fn read_small(&self, name: &str, kind: PartKind) -> Result<Vec<u8>, SnapshotError> {
        let p = self.part(name, kind)?;
        let (f, path) = self.open_part(p)?;
        // The manifest bounds the size; the read is bounded by it too, in
        // case the file grows meanwhile.
        let mut bytes = Vec::with_capacity(p.bytes as usize);
        f.take(p.bytes)
            .read_to_end(&mut bytes)
            .map_err(io(&path, "cannot read the part"))?;
        if bytes.len() as u64 != p.bytes {
            return Err(SnapshotError::Length {
                name: name.to_string(),
                expected: p.bytes,
                actual: bytes.len() as u64,
            });
        }
        let actual = crc32fast::hash(&bytes);
        if actual != p.crc32 {
            return Err(SnapshotError::Checksum {
                name: name.to_string(),
                expected: p.crc32,
                actual,
            });
        }
        Ok(bytes)
    }

    /// The records of state part `name`, checksum verified.
    pub fn state(&self, name: &str) -> Result<Records, SnapshotError> {
        let bytes = self.read_small(name, PartKind::State)?;
        Records::decode(&bytes).map_err(|source| SnapshotError::Records {
            name: name.to_string(),
            source,
        })
    }

    /// The bytes of blob part `name`, checksum verified.
    pub fn blob(&self, name: &str) -> Result<Vec<u8>, SnapshotError> {
        self.read_small(name, PartKind::Blob)
    }

    /// The memory parts.
    pub fn memory_parts(&self) -> impl Iterator<Item = &Part> {
        self.manifest
            .parts
            .iter()
            .filter(|p| p.kind == PartKind::Memory)
    }

    fn image_info(p: &Part) -> ImageInfo {
        ImageInfo {
            size: p.bytes,
            data_pages: p.data_pages.unwrap_or(0),
            crc32: p.crc32,
        }
    }

    /// Loads memory part `name` into `dst` at `dst_offset` (which must read
    /// as zero: a fresh memfd), checksum verified.
    pub fn load_memory(
        &self,
        name: &str,
        dst: BorrowedFd<'_>,
        dst_offset: u64,
    ) -> Result<ImageInfo, SnapshotError> {
        let p = self.part(name, PartKind::Memory)?;
        let (f, _) = self.open_part(p)?;
        memory::read_image(&f, Self::image_info(p), dst, dst_offset).map_err(|source| {
            SnapshotError::Memory {
                name: name.to_string(),
                source,
            }
        })
    }

    /// Reads every part and checks every checksum (`vmm snapshot verify`).
    pub fn verify(&self) -> Result<(), SnapshotError> {
        self.verify_parts(true)
    }

    /// Checks every state and blob part completely and every memory part's
    /// file length, but reads no memory image: [`Self::load_memory`]
    /// verifies an image's checksum over the bytes it loads, so a restore
    /// that loads every image reads each once instead of twice (a
    /// mismatch fails the load before any guest instruction runs).
    pub fn verify_except_memory(&self) -> Result<(), SnapshotError> {
        self.verify_parts(false)
    }

    fn verify_parts(&self, memory: bool) -> Result<(), SnapshotError> {
        for p in &self.manifest.parts {
            match p.kind {
                PartKind::State => drop(self.state(&p.name)?),
                PartKind::Blob => drop(self.blob(&p.name)?),
                PartKind::Memory if !memory => drop(self.open_part(p)?),
                PartKind::Memory => {
                    let (f, _) = self.open_part(p)?;
                    memory::verify_image(&f, Self::image_info(p)).map_err(|source| {
                        SnapshotError::Memory {
                            name: p.name.clone(),
                            source,
                        }
                    })?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::uio::pwrite;
    use std::os::fd::AsFd;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("vmm-snapdir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }

    fn write_sample(d: &Path) -> Manifest {
        let ram =
            nix::sys::memfd::memfd_create(c"ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&ram, 0x20000).unwrap();
        pwrite(ram.as_fd(), b"guest code", 0x1000).unwrap();
        let mut w = SnapshotWriter::create(d, Manifest::new("0.1.0", 1, 5), false).unwrap();
        let mut vm = Records::new();
        vm.push("pit", vec![7; 112]).unwrap();
        w.add_state("vm", &vm).unwrap();
        w.add_memory("ram0", 0, ram.as_fd(), 0, 0x20000).unwrap();
        w.add_blob("device", b"acc=42").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn write_open_read_back() {
        let d = dir("rt");
        let m = write_sample(&d.0);
        let s = Snapshot::open(&d.0).unwrap();
        assert_eq!(s.manifest(), &m);
        s.verify().unwrap();
        assert_eq!(s.state("vm").unwrap().get("pit"), Some(&[7u8; 112][..]));
        assert_eq!(s.blob("device").unwrap(), b"acc=42");
        let dst =
            nix::sys::memfd::memfd_create(c"dst", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&dst, 0x20000).unwrap();
        let info = s.load_memory("ram0", dst.as_fd(), 0).unwrap();
        assert_eq!(info.data_pages, 1);
        let mut b = [0u8; 10];
        nix::sys::uio::pread(dst.as_fd(), &mut b, 0x1000).unwrap();
        assert_eq!(&b, b"guest code");
        assert!(matches!(s.blob("vm"), Err(SnapshotError::WrongKind { .. })));
        assert!(matches!(s.blob("nope"), Err(SnapshotError::NoPart(_))));
        // A second snapshot into the same directory is refused.
        assert!(matches!(
            SnapshotWriter::create(&d.0, Manifest::new("0.1.0", 1, 5), false),
            Err(SnapshotError::Exists(_))
        ));
    }

    #[test]
    fn damaged_snapshots_are_refused_with_the_part_named() {
        let d = dir("bad");
        write_sample(&d.0);
        // A flipped byte in the device blob.
        let blob = d.0.join("device.bin");
        std::fs::write(&blob, b"acc=43").unwrap();
        let e = Snapshot::open(&d.0).unwrap().verify().unwrap_err();
        assert!(e.to_string().contains("part device: checksum"), "{e}");
        // A flipped byte in a memory image: only a full verify or the load
        // sees it; a truncated one is refused without reading it.
        std::fs::write(&blob, b"acc=42").unwrap();
        let img = d.0.join("ram0.img");
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[0x1000] ^= 1;
        std::fs::write(&img, &bytes).unwrap();
        let s = Snapshot::open(&d.0).unwrap();
        s.verify_except_memory().unwrap();
        let e = s.verify().unwrap_err();
        assert!(e.to_string().contains("part ram0"), "{e}");
        let dst =
            nix::sys::memfd::memfd_create(c"dst", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&dst, 0x20000).unwrap();
        let e = s.load_memory("ram0", dst.as_fd(), 0).unwrap_err();
        assert!(
            crate_chain(&e).contains("checksum mismatch"),
            "{}",
            crate_chain(&e)
        );
        std::fs::write(&img, &bytes[..0x10000]).unwrap();
        let e = s.verify_except_memory().unwrap_err();
        assert!(e.to_string().contains("part ram0: the file holds"), "{e}");
        bytes[0x1000] ^= 1;
        std::fs::write(&img, &bytes).unwrap();
        // A truncated state part.
        let st = d.0.join("vm.state");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() - 3]).unwrap();
        let e = Snapshot::open(&d.0).unwrap().state("vm").unwrap_err();
        assert!(e.to_string().contains("part vm: the file holds"), "{e}");
        // No manifest: an unfinished snapshot.
        std::fs::remove_file(d.0.join(MANIFEST)).unwrap();
        assert!(matches!(
            Snapshot::open(&d.0),
            Err(SnapshotError::NoManifest(_))
        ));
        // A manifest from a newer version.
        std::fs::write(
            d.0.join(MANIFEST),
            br#"{"format":"vmm-snapshot","version":9,"parts":[]}"#,
        )
        .unwrap();
        let e = Snapshot::open(&d.0).err().unwrap();
        assert!(crate_chain(&e).contains("version 9"), "{}", crate_chain(&e));
    }

    fn crate_chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}
