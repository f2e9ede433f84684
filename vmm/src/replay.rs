//! `vmm replay FILE...` (also spelled `vmm decode`): prints a session
//! recorded with `VMM_RECORD_DIR` (the format of [`crate::record`]) one
//! line per record, decoded with the formatter of `--trace`:
//!
//! ```text
//! #0 main GetVcpus{request_fast_channel}
//! #1 main Create{id: 1, Memory{start: 0x0, length: 0x10000, offset: 0x0}} +SealedMemfd(16 pages)
//! #4 vcpu <- Io{IoPort 0x600 read 4}
//! #5 vcpu -> Resume{data: [0x2a, 0x0, 0x0, 0x0]}
//! ```
//!
//! The fuzzers read any bytes as a session; `replay` is strict instead: a
//! record of an unknown kind, an unknown descriptor kind or a cut-short
//! record is an error naming the record and its offset. A packet that does
//! not decode is not: it is what the plugin sent, and is shown as such.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

use plugin_proto::protobuf::Message;
use plugin_proto::{vcpu_response, MainRequest, VcpuRequest};

use crate::decode;
use crate::record::{FdKind, RecordKind, HEADER_LEN};

/// Why a session cannot be printed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: record {index} at byte {offset}: {why}")]
    Corrupt {
        path: PathBuf,
        index: usize,
        offset: usize,
        why: String,
    },
    #[error("cannot write the output")]
    Write(#[source] std::io::Error),
}

/// Decodes a whole session into lines (no trailing newlines); `Err` gives
/// (record index, byte offset, reason) of the first structural fault.
pub fn decode_session(data: &[u8]) -> Result<Vec<String>, (usize, usize, String)> {
    let mut lines = Vec::new();
    let mut off = 0;
    let mut index = 0;
    while off < data.len() {
        let rest = &data[off..];
        if rest.len() < HEADER_LEN {
            return Err((
                index,
                off,
                format!("truncated header: {} of {HEADER_LEN} bytes", rest.len()),
            ));
        }
        let kind = RecordKind::from_byte(rest[0]);
        if kind.to_byte() != rest[0] {
            return Err((index, off, format!("unknown record kind {}", rest[0])));
        }
        let fd_kind = FdKind::from_byte(rest[1]);
        if fd_kind.to_byte() != rest[1] {
            return Err((index, off, format!("unknown descriptor kind {}", rest[1])));
        }
        let fd_arg = u16::from_le_bytes([rest[2], rest[3]]);
        let len = usize::from(u16::from_le_bytes([rest[4], rest[5]]));
        let payload = &rest[HEADER_LEN..];
        if payload.len() < len {
            return Err((
                index,
                off,
                format!(
                    "truncated payload: the header says {len} bytes, {} remain",
                    payload.len()
                ),
            ));
        }
        let payload = &payload[..len];
        let mut line = format!("#{index} ");
        record_line(&mut line, kind, fd_kind, fd_arg, payload);
        lines.push(line);
        off += HEADER_LEN + len;
        index += 1;
    }
    Ok(lines)
}

fn record_line(line: &mut String, kind: RecordKind, fd_kind: FdKind, fd_arg: u16, p: &[u8]) {
    match kind {
        RecordKind::MainRequest => {
            line.push_str("main ");
            match MainRequest::parse_from_bytes(p) {
                Ok(req) => decode::main_request(line, &req),
                Err(e) => undecodable(line, p, &e),
            }
            match fd_kind {
                FdKind::None => {}
                FdKind::SealedMemfd | FdKind::UnsealedMemfd | FdKind::WriteSealedMemfd => {
                    let _ = write!(line, " +{fd_kind:?}({fd_arg} pages)");
                }
                FdKind::Many => {
                    let _ = write!(line, " +{fd_arg} fds");
                }
                _ => {
                    let _ = write!(line, " +{fd_kind:?}");
                }
            }
        }
        RecordKind::VcpuRequest => {
            line.push_str("vcpu -> ");
            match VcpuRequest::parse_from_bytes(p) {
                Ok(req) => decode::vcpu_request(line, &req),
                Err(e) => undecodable(line, p, &e),
            }
        }
        RecordKind::VcpuExit => {
            line.push_str("vcpu <- ");
            match vcpu_response::Wait::parse_from_bytes(p) {
                Ok(w) => decode::wait(line, &w),
                Err(e) => undecodable(line, p, &e),
            }
        }
        RecordKind::CloseConnection => line.push_str("main close connection"),
        RecordKind::MainStructured
        | RecordKind::VcpuStructured
        | RecordKind::VcpuExitStructured => {
            let _ = write!(
                line,
                "{kind:?}: fuzzer input for `arbitrary` ({} bytes)",
                p.len()
            );
        }
    }
}

fn undecodable(line: &mut String, p: &[u8], e: &plugin_proto::protobuf::Error) {
    let _ = write!(line, "undecodable ({e}) ");
    decode::bytes(line, p);
}

/// Prints each file's session to `out`; with several files, each is
/// introduced by a `==> FILE <==` line.
pub fn replay(files: &[PathBuf], out: &mut impl Write) -> Result<(), ReplayError> {
    for path in files {
        let data = std::fs::read(path).map_err(|source| ReplayError::Read {
            path: path.clone(),
            source,
        })?;
        let lines = decode_session(&data)
            .map_err(|(index, offset, why)| corrupt(path, index, offset, why))?;
        let mut text = String::new();
        if files.len() > 1 {
            let _ = writeln!(text, "==> {} <==", path.display());
        }
        for l in lines {
            text.push_str(&l);
            text.push('\n');
        }
        out.write_all(text.as_bytes()).map_err(ReplayError::Write)?;
    }
    Ok(())
}

fn corrupt(path: &Path, index: usize, offset: usize, why: String) -> ReplayError {
    ReplayError::Corrupt {
        path: path.to_path_buf(),
        index,
        offset,
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::encode_record;

    #[test]
    fn sessions_decode_and_corruption_is_named() {
        let mut q = MainRequest::new();
        q.mut_destroy().id = 3;
        let mut s = Vec::new();
        encode_record(
            &mut s,
            RecordKind::MainRequest,
            FdKind::None,
            0,
            &q.write_to_bytes().unwrap(),
        );
        encode_record(&mut s, RecordKind::CloseConnection, FdKind::None, 0, &[]);
        encode_record(&mut s, RecordKind::VcpuRequest, FdKind::None, 0, &[0xff]);
        let lines = decode_session(&s).unwrap();
        assert_eq!(lines[0], "#0 main Destroy{id: 3}");
        assert_eq!(lines[1], "#1 main close connection");
        assert!(
            lines[2].starts_with("#2 vcpu -> undecodable ("),
            "{}",
            lines[2]
        );
        // Structural faults name the record and where it starts.
        let mut bad = s.clone();
        bad.extend_from_slice(&[9, 0, 0, 0, 0, 0]);
        let (i, off, why) = decode_session(&bad).unwrap_err();
        assert_eq!((i, off), (3, s.len()));
        assert_eq!(why, "unknown record kind 9");
        let mut cut = s.clone();
        cut.extend_from_slice(&[0, 0, 0, 0, 9, 0, 1]);
        assert!(decode_session(&cut)
            .unwrap_err()
            .2
            .contains("truncated payload"));
        let mut short = s.clone();
        short.extend_from_slice(&[0, 0]);
        assert!(decode_session(&short)
            .unwrap_err()
            .2
            .contains("truncated header"));
        let mut fdk = s;
        fdk.extend_from_slice(&[0, 200, 0, 0, 0, 0]);
        assert_eq!(
            decode_session(&fdk).unwrap_err().2,
            "unknown descriptor kind 200"
        );
    }
}
