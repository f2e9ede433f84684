//! `manifest.json`: what a snapshot directory holds, and how to check it.
//!
//! ```json
//! {"format": "vmm-snapshot", "version": 1, "vmm": "0.1.0",
//!  "created_unix_ms": 1796000000000, "vcpus": 2,
//!  "facts": {"cpuid-crc32": "0x1234abcd", "plugin": "longrun"},
//!  "parts": [
//!   {"name": "vm", "kind": "state", "file": "vm.state", "bytes": 1234, "crc32": 305419896},
//!   {"name": "ram0", "kind": "memory", "file": "ram0.img", "bytes": 1048576,
//!    "crc32": 2271560481, "guest_address": 0, "data_pages": 12},
//!   {"name": "device", "kind": "blob", "file": "device.bin", "bytes": 8, "crc32": 1}]}
//! ```
//!
//! The manifest is written last (to a temporary name, then renamed), so a
//! directory without one is an incomplete snapshot. Every part has its own
//! checksum (see `memory.rs` for how a sparse image's is computed; for the
//! other kinds it is CRC-32 of the file).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The `format` of every manifest.
pub const FORMAT: &str = "vmm-snapshot";
/// The version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Most parts in one snapshot.
pub const MAX_PARTS: usize = 1024;
/// Largest manifest file.
pub const MAX_MANIFEST: u64 = 1 << 20;
/// Largest state or blob part (memory parts are bounded by the guest).
pub const MAX_SMALL_PART: u64 = 256 << 20;
/// Largest memory part.
pub const MAX_MEMORY_PART: u64 = 1 << 40;
/// Most vcpus a snapshot may describe.
pub const MAX_VCPUS: u32 = 4096;

/// A part's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartKind {
    /// Named state records (`records.rs`).
    State,
    /// A sparse memory image (`memory.rs`).
    Memory,
    /// Opaque bytes (the plugin's device state).
    Blob,
}

/// One part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub name: String,
    pub kind: PartKind,
    /// The file in the snapshot directory.
    pub file: String,
    /// The file's length (for memory: the region's size).
    pub bytes: u64,
    pub crc32: u32,
    /// Memory: where the region sits in guest-physical space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_address: Option<u64>,
    /// Memory: the non-zero pages the image holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_pages: Option<u64>,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The vmm version that wrote it.
    pub vmm: String,
    pub created_unix_ms: u64,
    pub vcpus: u32,
    /// Facts a restore compares with its own machine (CPUID digest, ...).
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
    pub parts: Vec<Part>,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the manifest is not valid JSON of the expected shape")]
    Json(#[source] serde_json::Error),
    #[error("not a vmm snapshot (format {0:?})")]
    Format(String),
    #[error("snapshot format version {0}; this vmm reads version {FORMAT_VERSION}")]
    Version(u32),
    #[error("{0} vcpus; a snapshot describes 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("{0} parts; at most {MAX_PARTS}")]
    TooManyParts(usize),
    #[error("part {index}: bad name {name:?} (1 to 64 bytes of [a-z0-9._-])")]
    BadName { index: usize, name: String },
    #[error("part {name}: bad file name {file:?} (1 to 64 bytes of [A-Za-z0-9._-], not starting with '.')")]
    BadFile { name: String, file: String },
    #[error("part name {0:?} appears twice")]
    DuplicateName(String),
    #[error("file {0:?} is used by two parts")]
    DuplicateFile(String),
    #[error("part {name}: {problem}")]
    BadPart { name: String, problem: String },
    #[error("memory parts {a} and {b} overlap in guest-physical space")]
    Overlap { a: String, b: String },
}

fn safe_name(s: &str, upper: bool) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b"._-".contains(&b)
                || (upper && b.is_ascii_uppercase())
        })
}

impl Manifest {
    /// A manifest for this vmm version with no parts yet.
    pub fn new(vmm: &str, vcpus: u32, created_unix_ms: u64) -> Manifest {
        Manifest {
            format: FORMAT.to_string(),
            version: FORMAT_VERSION,
            vmm: vmm.to_string(),
            created_unix_ms,
            vcpus,
            facts: BTreeMap::new(),
            parts: Vec::new(),
        }
    }

    /// The part called `name`.
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// Parses and checks a manifest.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        // The format and version are checked before the shape, so a future
        // version with new fields is reported as a version, not as JSON.
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
        if let Some(f) = v.get("format") {
            if f != FORMAT {
                return Err(ManifestError::Format(
                    f.as_str().map_or_else(|| f.to_string(), str::to_string),
                ));
            }
        }
        if let Some(ver) = v.get("version").and_then(serde_json::Value::as_u64) {
            if ver != u64::from(FORMAT_VERSION) {
                return Err(ManifestError::Version(ver.min(u64::from(u32::MAX)) as u32));
            }
        }
        let m: Manifest = serde_json::from_value(v).map_err(ManifestError::Json)?;
        m.check()?;
        Ok(m)
    }

    /// Checks every rule the parser enforces (the writer calls it too).
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT {
            return Err(ManifestError::Format(self.format.clone()));
        }
        if self.version != FORMAT_VERSION {
            return Err(ManifestError::Version(self.version));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ManifestError::Vcpus(self.vcpus));
        }
        if self.parts.len() > MAX_PARTS {
            return Err(ManifestError::TooManyParts(self.parts.len()));
        }
        let mut names = BTreeSet::new();
        let mut files = BTreeSet::new();
        let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
        for (index, p) in self.parts.iter().enumerate() {
            if !safe_name(&p.name, false) {
                return Err(ManifestError::BadName {
                    index,
                    name: p.name.clone(),
                });
            }
            if !safe_name(&p.file, true) || p.file == "manifest.json" {
                return Err(ManifestError::BadFile {
                    name: p.name.clone(),
                    file: p.file.clone(),
                });
            }
            if !names.insert(p.name.as_str()) {
                return Err(ManifestError::DuplicateName(p.name.clone()));
            }
            if !files.insert(p.file.as_str()) {
                return Err(ManifestError::DuplicateFile(p.file.clone()));
            }
            let bad = |problem: String| ManifestError::BadPart {
                name: p.name.clone(),
                problem,
            };
            match p.kind {
                PartKind::Memory => {
                    let gpa = p
                        .guest_address
                        .ok_or_else(|| bad("a memory part needs guest_address".into()))?;
                    if p.bytes == 0 || !p.bytes.is_multiple_of(crate::memory::PAGE as u64) {
                        return Err(bad(format!(
                            "size {:#x} is not a non-zero multiple of 4 KiB",
                            p.bytes
                        )));
                    }
                    if p.bytes > MAX_MEMORY_PART {
                        return Err(bad(format!("size {:#x} is over 1 TiB", p.bytes)));
                    }
                    if !gpa.is_multiple_of(crate::memory::PAGE as u64) {
                        return Err(bad(format!("guest_address {gpa:#x} is not page aligned")));
                    }
                    let end = gpa
                        .checked_add(p.bytes)
                        .ok_or_else(|| bad("the region wraps around the address space".into()))?;
                    let pages = p.data_pages.unwrap_or(0);
                    if pages > p.bytes / crate::memory::PAGE as u64 {
                        return Err(bad(format!("{pages} data pages in a smaller region")));
                    }
                    ranges.push((gpa, end, p.name.as_str()));
                }
                PartKind::State | PartKind::Blob => {
                    if p.guest_address.is_some() || p.data_pages.is_some() {
                        return Err(bad(
                            "only memory parts have guest_address and data_pages".into()
                        ));
                    }
                    if p.bytes > MAX_SMALL_PART {
                        return Err(bad(format!("{} bytes; at most {MAX_SMALL_PART}", p.bytes)));
                    }
                }
            }
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(ManifestError::Overlap {
                    a: w[0].2.to_string(),
                    b: w[1].2.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The manifest as written to disk.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new("0.1.0", 2, 1);
        m.facts.insert("plugin".into(), "longrun".into());
        m.parts.push(Part {
            name: "vm".into(),
            kind: PartKind::State,
            file: "vm.state".into(),
            bytes: 10,
            crc32: 1,
            guest_address: None,
            data_pages: None,
        });
        m.parts.push(Part {
            name: "ram0".into(),
            kind: PartKind::Memory,
            file: "ram0.img".into(),
            bytes: 0x10000,
            crc32: 2,
            guest_address: Some(0),
            data_pages: Some(3),
        });
        m
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
    }

    fn refused(edit: impl FnOnce(&mut Manifest)) -> String {
        let mut m = sample();
        edit(&mut m);
        Manifest::parse(&m.to_json()).unwrap_err().to_string()
    }

    #[test]
    fn bad_manifests_name_the_problem() {
        assert!(refused(|m| m.version = 2).contains("version 2"));
        assert!(refused(|m| m.format = "other".into()).contains("not a vmm snapshot"));
        assert!(refused(|m| m.vcpus = 0).contains("0 vcpus"));
        assert!(refused(|m| m.parts[0].file = "../etc/passwd".into()).contains("bad file name"));
        assert!(refused(|m| m.parts[0].file = "manifest.json".into()).contains("bad file name"));
        assert!(refused(|m| m.parts[1].name = "vm".into()).contains("twice"));
        assert!(refused(|m| m.parts[1].file = "vm.state".into()).contains("two parts"));
        assert!(refused(|m| m.parts[1].bytes = 100).contains("4 KiB"));
        assert!(refused(|m| m.parts[1].guest_address = None).contains("guest_address"));
        assert!(refused(|m| m.parts[1].guest_address = Some(u64::MAX - 0xfff)).contains("wraps"));
        assert!(refused(|m| m.parts[0].data_pages = Some(1)).contains("only memory"));
        assert!(refused(|m| {
            let mut p = m.parts[1].clone();
            p.name = "ram1".into();
            p.file = "ram1.img".into();
            p.guest_address = Some(0x8000);
            m.parts.push(p);
        })
        .contains("overlap"));
        // A future version's unknown fields are reported as the version.
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["version"] = 7.into();
        v["new_field"] = true.into();
        let e = Manifest::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("version 7"), "{e}");
        assert!(Manifest::parse(b"{").is_err());
        assert!(Manifest::parse(b"[]").is_err());
    }
}
