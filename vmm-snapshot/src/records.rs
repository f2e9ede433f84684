//! Named state records: the binary body of a `state` part (and, later, of
//! the frames of a migration stream).
//!
//! ```text
//! "VMMSTATE"  u32 version (1)  u32 count
//! count x { u16 name_len  name  u32 data_len  data }      (little endian)
//! ```
//!
//! Names are 1..=[`MAX_NAME`] bytes of `[a-z0-9._/-]`, unique in a part
//! (`pit`, `vcpu0/regs`, `vcpu0/msrs`, ...); data is opaque bytes (kernel
//! state images, encoded lists). The parser takes hostile input: every
//! length is checked against what is left, nothing is allocated beyond the
//! input's own size, and trailing bytes are an error.

use std::collections::BTreeSet;

/// The part's magic.
pub const MAGIC: &[u8; 8] = b"VMMSTATE";
/// The record format's version.
pub const VERSION: u32 = 1;
/// Most records in one part.
pub const MAX_RECORDS: usize = 65536;
/// Longest record name.
pub const MAX_NAME: usize = 128;
/// Largest record.
pub const MAX_RECORD: usize = 16 << 20;

/// Why a record list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordsError {
    #[error("not a state part (bad magic)")]
    BadMagic,
    #[error("state records version {0}; this vmm reads version {VERSION}")]
    Version(u32),
    #[error("{0} records; at most {MAX_RECORDS}")]
    TooMany(u64),
    #[error("truncated at byte {offset}: {what} needs {need} bytes, {left} left")]
    Truncated {
        offset: usize,
        what: &'static str,
        need: usize,
        left: usize,
    },
    #[error("record {index}: bad name {name:?} (1 to {MAX_NAME} bytes of [a-z0-9._/-])")]
    BadName { index: usize, name: String },
    #[error("record {index} ({name}): {len} bytes; at most {MAX_RECORD}")]
    TooLarge {
        index: usize,
        name: String,
        len: usize,
    },
    #[error("record name {0:?} appears twice")]
    Duplicate(String),
    #[error("{0} bytes after the last record")]
    Trailing(usize),
}

/// An ordered list of named records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    items: Vec<(String, Vec<u8>)>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b))
}

impl Records {
    pub fn new() -> Records {
        Records::default()
    }

    /// Appends a record. The name must be valid and new, the data at most
    /// [`MAX_RECORD`] bytes: a writer that breaks that is a bug, reported
    /// like a parse error.
    pub fn push(&mut self, name: &str, data: Vec<u8>) -> Result<(), RecordsError> {
        let index = self.items.len();
        if !valid_name(name) {
            return Err(RecordsError::BadName {
                index,
                name: name.to_string(),
            });
        }
        if data.len() > MAX_RECORD {
            return Err(RecordsError::TooLarge {
                index,
                name: name.to_string(),
                len: data.len(),
            });
        }
        if index >= MAX_RECORDS {
            return Err(RecordsError::TooMany(index as u64 + 1));
        }
        if self.get(name).is_some() {
            return Err(RecordsError::Duplicate(name.to_string()));
        }
        self.items.push((name.to_string(), data));
        Ok(())
    }

    /// The data of record `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.items
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.items.iter().map(|(n, d)| (n.as_str(), d.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The encoded part.
    pub fn encode(&self) -> Vec<u8> {
        let size = 16
            + self
                .items
                .iter()
                .map(|(n, d)| 6 + n.len() + d.len())
                .sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.items.len() as u32).to_le_bytes());
        for (n, d) in &self.items {
            out.extend_from_slice(&(n.len() as u16).to_le_bytes());
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&(d.len() as u32).to_le_bytes());
            out.extend_from_slice(d);
        }
        out
    }

    /// Parses an encoded part.
    pub fn decode(bytes: &[u8]) -> Result<Records, RecordsError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(8, "the magic")? != MAGIC {
            return Err(RecordsError::BadMagic);
        }
        let version = r.u32("the version")?;
        if version != VERSION {
            return Err(RecordsError::Version(version));
        }
        let count = r.u32("the record count")? as usize;
        if count > MAX_RECORDS {
            return Err(RecordsError::TooMany(count as u64));
        }
        let mut names = BTreeSet::new();
        // Each record takes at least 7 bytes: the count cannot make this
        // allocate more than the input justifies.
        let mut items = Vec::with_capacity(count.min(bytes.len() / 7));
        for index in 0..count {
            let name_len = usize::from(r.u16("a name length")?);
            let name = r.take(name_len, "a name")?;
            let name = String::from_utf8_lossy(name).into_owned();
            if !valid_name(&name) {
                return Err(RecordsError::BadName { index, name });
            }
            let len = r.u32("a data length")? as usize;
            if len > MAX_RECORD {
                return Err(RecordsError::TooLarge { index, name, len });
            }
            let data = r.take(len, "record data")?.to_vec();
            if !names.insert(name.clone()) {
                return Err(RecordsError::Duplicate(name));
            }
            items.push((name, data));
        }
        if r.at != bytes.len() {
            return Err(RecordsError::Trailing(bytes.len() - r.at));
        }
        Ok(Records { items })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], RecordsError> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(RecordsError::Truncated {
                offset: self.at,
                what,
                need: n,
                left,
            });
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, RecordsError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, RecordsError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Records {
        let mut r = Records::new();
        r.push("pit", vec![1, 2, 3]).unwrap();
        r.push("vcpu0/regs", vec![9; 144]).unwrap();
        r.push("empty", vec![]).unwrap();
        r
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let bytes = r.encode();
        assert_eq!(Records::decode(&bytes).unwrap(), r);
        assert_eq!(r.get("vcpu0/regs").map(<[u8]>::len), Some(144));
        assert_eq!(r.get("nope"), None);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(Records::decode(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Records::decode(&long), Err(RecordsError::Trailing(1)));
    }

    #[test]
    fn hostile_headers() {
        let mut b = sample().encode();
        b[0] = b'X';
        assert_eq!(Records::decode(&b), Err(RecordsError::BadMagic));
        let mut b = sample().encode();
        b[8] = 2;
        assert_eq!(Records::decode(&b), Err(RecordsError::Version(2)));
        // A huge count with no records behind it allocates nothing.
        let mut b = sample().encode();
        b[12..16].copy_from_slice(&60000u32.to_le_bytes());
        assert!(matches!(
            Records::decode(&b),
            Err(RecordsError::Truncated { .. })
        ));
        let mut b = sample().encode();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Records::decode(&b), Err(RecordsError::TooMany(_))));
    }

    #[test]
    fn names_are_checked_both_ways() {
        let mut r = Records::new();
        assert!(r.push("Bad Name", vec![]).is_err());
        assert!(r.push("", vec![]).is_err());
        r.push("a", vec![]).unwrap();
        assert_eq!(
            r.push("a", vec![]),
            Err(RecordsError::Duplicate("a".into()))
        );
        // A duplicate written by hand is refused by the parser too.
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        for _ in 0..2 {
            b.extend_from_slice(&1u16.to_le_bytes());
            b.push(b'a');
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        assert_eq!(
            Records::decode(&b),
            Err(RecordsError::Duplicate("a".into()))
        );
    }
}
