//! `--trace`: one decoded line per main request, vcpu request and event,
//! as strace prints system calls, and the hooks that feed `--stats`.
//!
//! ```text
//! main[0] ReserveRange{space: IoPort, start: 0x3f8, length: 0x8} = 0 (12µs)
//! vcpu0 -> Wait{} = Init{} (3µs)
//! vcpu0 <- Io{IoPort 0x3f8 write [0x48]}
//! vcpu0 -> Resume{} (41µs)
//! ```
//!
//! A main request's latency is the host's time handling it; a vcpu
//! request's is the time until its reply; a `Resume`'s is the time since the
//! event it resumes was delivered (the time the vcpu waited on the plugin).
//!
//! Off by default, and then the whole cost on a request or exit path is
//! one relaxed atomic load ([`enabled`]): nothing is decoded or formatted.
//! Each line is written with one `write(2)` of at most [`MAX_LINE`] bytes,
//! so lines of the main and vcpu threads never interleave (also in a pipe).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use plugin_proto::protobuf::Message;
use plugin_proto::{vcpu_request, vcpu_response, MainRequest, VcpuRequest, VcpuResponse};

use crate::decode;
use crate::stats::{self, VcpuStats};
use crate::vm::Space;

/// Longest line written (bytes, newline included): at most `PIPE_BUF`, so
/// a write to a pipe is atomic.
pub const MAX_LINE: usize = 4096;

/// Bit of [`FLAGS`]: print trace lines.
pub const TRACE: u8 = 1;
/// Bit of [`FLAGS`]: count statistics.
pub const STATS: u8 = 2;

static FLAGS: AtomicU8 = AtomicU8::new(0);
static SINK: OnceLock<File> = OnceLock::new();

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot open the trace file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot duplicate stderr for the trace")]
    Stderr(#[source] std::io::Error),
}

/// What to observe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// Print trace lines.
    pub trace: bool,
    /// Where to print them (default: stderr).
    pub file: Option<PathBuf>,
    /// Count statistics.
    pub stats: bool,
}

/// Turns tracing and statistics on as configured (once per process).
pub fn init(config: &TraceConfig) -> Result<(), TraceError> {
    let mut flags = 0;
    if config.trace {
        let file = match &config.file {
            Some(path) => open(path)?,
            None => {
                use std::os::fd::AsFd;
                std::io::stderr()
                    .as_fd()
                    .try_clone_to_owned()
                    .map(File::from)
                    .map_err(TraceError::Stderr)?
            }
        };
        let _ = SINK.set(file);
        flags |= TRACE;
    }
    if config.stats {
        flags |= STATS;
    }
    FLAGS.store(flags, Ordering::Relaxed);
    Ok(())
}

fn open(path: &Path) -> Result<File, TraceError> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| TraceError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The observation flags ([`TRACE`], [`STATS`]): 0 when off. One relaxed
/// load; the hot paths test this and nothing else.
#[inline(always)]
pub fn enabled() -> u8 {
    FLAGS.load(Ordering::Relaxed)
}

/// Writes one line (a newline is added) with a single `write`.
pub fn emit(line: &mut String) {
    if line.len() > MAX_LINE - 4 {
        let mut cut = MAX_LINE - 4;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line.push('\n');
    if let Some(mut f) = SINK.get() {
        // A failing trace sink must not disturb the VM: the line is lost.
        let _ = f.write(line.as_bytes());
    }
}

/// Start of a main request: the time, when anything observes it.
#[inline]
pub fn main_begin() -> Option<Instant> {
    (enabled() != 0).then(Instant::now)
}

/// A main request of connection `conn` was answered with `response` and
/// `fds` descriptors.
pub fn main_end(
    conn: u64,
    start: Option<Instant>,
    bytes: &[u8],
    response: &plugin_proto::MainResponse,
    fds: usize,
) {
    let Some(start) = start else { return };
    let took = start.elapsed();
    let flags = enabled();
    let req = MainRequest::parse_from_bytes(bytes).unwrap_or_default();
    if flags & STATS != 0 {
        stats::main_request(decode::main_kind(&req), response.errno != 0, took);
    }
    if flags & TRACE != 0 {
        let mut line = format!("main[{conn}] ");
        decode::main_request(&mut line, &req);
        decode::main_result(&mut line, response, fds);
        line.push_str(" (");
        decode::duration(&mut line, took);
        line.push(')');
        emit(&mut line);
    }
}

/// A main request that could not be answered: the connection is dropped.
pub fn main_refused(conn: u64, start: Option<Instant>, bytes: &[u8], why: &dyn std::error::Error) {
    let Some(start) = start else { return };
    let took = start.elapsed();
    let flags = enabled();
    if flags & STATS != 0 {
        stats::main_request("Undecodable", true, took);
    }
    if flags & TRACE != 0 {
        let mut line = format!(
            "main[{conn}] undecodable request ({} bytes): {} = connection dropped (",
            bytes.len(),
            crate::error_chain(why)
        );
        decode::duration(&mut line, took);
        line.push(')');
        emit(&mut line);
    }
}

/// The observer of one vcpu channel, owned by its thread: sees every
/// request the plugin sends and every response the host writes.
pub struct VcpuTap {
    id: u32,
    /// The request awaiting its reply: kind, its decoded form (when
    /// tracing), when it came.
    pending: Option<(&'static str, String, Instant)>,
    /// When the event the plugin has to resume was delivered.
    event_at: Option<Instant>,
    stats: VcpuStats,
}

impl VcpuTap {
    pub fn new(id: u32) -> Self {
        VcpuTap {
            id,
            pending: None,
            event_at: None,
            stats: VcpuStats::default(),
        }
    }

    /// The plugin sent `bytes` on the request channel.
    #[inline]
    pub fn request(&mut self, bytes: &[u8]) {
        let flags = enabled();
        if flags != 0 {
            self.request_slow(flags, bytes);
        }
    }

    #[cold]
    fn request_slow(&mut self, flags: u8, bytes: &[u8]) {
        let now = Instant::now();
        let tracing = flags & TRACE != 0;
        // Statistics alone: the common Resume is counted without decoding.
        if !tracing && crate::exit_codec::parse_resume(bytes).is_some() {
            let waited = self.event_at.take().map(|t| now.duration_since(t));
            if let Some(d) = waited {
                self.stats.waited(d);
            }
            self.stats
                .request("Resume", false, waited.unwrap_or(Duration::ZERO));
            return;
        }
        let Ok(req) = VcpuRequest::parse_from_bytes(bytes) else {
            if tracing {
                emit(&mut format!(
                    "vcpu{} -> undecodable request ({} bytes)",
                    self.id,
                    bytes.len()
                ));
            }
            return;
        };
        let kind = decode::vcpu_kind(&req);
        match &req.message {
            Some(vcpu_request::Message::Resume(_)) | Some(vcpu_request::Message::Shutdown(_)) => {
                let waited = self.event_at.take().map(|t| now.duration_since(t));
                if flags & STATS != 0 {
                    if let Some(d) = waited {
                        self.stats.waited(d);
                    }
                    self.stats
                        .request(kind, false, waited.unwrap_or(Duration::ZERO));
                }
                if tracing {
                    let mut line = format!("vcpu{} -> ", self.id);
                    decode::vcpu_request(&mut line, &req);
                    if let Some(d) = waited {
                        line.push_str(" (");
                        decode::duration(&mut line, d);
                        line.push(')');
                    }
                    emit(&mut line);
                }
            }
            _ => {
                let mut text = String::new();
                if tracing {
                    decode::vcpu_request(&mut text, &req);
                }
                self.pending = Some((kind, text, now));
            }
        }
    }

    /// The host wrote the serialized response `body`.
    #[inline]
    pub fn response(&mut self, body: &[u8]) {
        let flags = enabled();
        if flags != 0 {
            self.response_slow(flags, body);
        }
    }

    #[cold]
    fn response_slow(&mut self, flags: u8, body: &[u8]) {
        let now = Instant::now();
        let tracing = flags & TRACE != 0;
        if !tracing && self.pending.is_none() {
            // Statistics alone, an event: nothing to decode. A posted write
            // is never resumed; the next event restarts the clock.
            self.event_at = Some(now);
            return;
        }
        let resp = VcpuResponse::parse_from_bytes(body).unwrap_or_default();
        let wait = match &resp.message {
            Some(vcpu_response::Message::Wait(w)) => Some(w),
            _ => None,
        };
        if wait.is_some_and(needs_resume) {
            self.event_at = Some(now);
        }
        match self.pending.take() {
            Some((kind, text, at)) => {
                let took = now.duration_since(at);
                if flags & STATS != 0 {
                    self.stats.request(kind, resp.errno != 0, took);
                }
                if tracing {
                    let mut line = format!("vcpu{} -> {text}", self.id);
                    decode::vcpu_result(&mut line, &resp);
                    line.push_str(" (");
                    decode::duration(&mut line, took);
                    line.push(')');
                    emit(&mut line);
                }
            }
            None if tracing => {
                let mut line = format!("vcpu{} <- ", self.id);
                match wait {
                    Some(w) => decode::wait(&mut line, w),
                    None => line.push_str("unsolicited response"),
                }
                emit(&mut line);
            }
            None => {}
        }
    }

    /// A guest access exited to the host; `range` is the reserved range
    /// (start, length) that took it, `None` when no range did.
    #[inline]
    pub fn exit(&mut self, space: Space, range: Option<(u64, u64)>) {
        if enabled() & STATS != 0 {
            self.stats.exit(space, range);
        }
    }

    /// The vcpu thread ends: its numbers join the run's.
    pub fn finish(&mut self) {
        if enabled() & STATS != 0 {
            stats::submit(self.id, std::mem::take(&mut self.stats));
        }
    }

    /// The numbers counted so far (tests).
    pub fn stats(&self) -> &VcpuStats {
        &self.stats
    }
}

fn needs_resume(w: &vcpu_response::Wait) -> bool {
    !matches!(&w.exit, Some(vcpu_response::wait::Exit::Io(io)) if io.no_resume)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_counts_requests_waits_and_exits_without_kvm() {
        FLAGS.fetch_or(STATS, Ordering::Relaxed);
        let mut tap = VcpuTap::new(3);
        let mut wait = VcpuRequest::new();
        wait.set_wait(Default::default());
        tap.request(&wait.write_to_bytes().unwrap());
        let mut init = VcpuResponse::new();
        init.mut_wait().set_init(Default::default());
        tap.response(&init.write_to_bytes().unwrap());
        let mut get = VcpuRequest::new();
        get.mut_get_state();
        tap.request(&get.write_to_bytes().unwrap());
        let mut failed = VcpuResponse::new();
        failed.errno = 22;
        tap.response(&failed.write_to_bytes().unwrap());
        let mut resume = VcpuRequest::new();
        resume.set_resume(Default::default());
        tap.request(&resume.write_to_bytes().unwrap());
        // An exit: the event, then its resume.
        tap.exit(Space::Ioport, Some((0x600, 3)));
        let mut io = VcpuResponse::new();
        io.mut_wait().mut_io().address = 0x600;
        tap.response(&io.write_to_bytes().unwrap());
        tap.request(&resume.write_to_bytes().unwrap());
        tap.exit(Space::Mmio, None);
        let s = tap.stats();
        assert_eq!(s.requests["Wait"].latency.count(), 1);
        assert_eq!(s.requests["GetState"].errors, 1);
        assert_eq!(s.requests["Resume"].latency.count(), 2);
        assert_eq!(s.waits, 2);
        let exits: Vec<_> = s.exits.values().copied().collect();
        assert_eq!(exits, [1, 1]);
    }

    #[test]
    fn long_lines_are_cut_to_one_atomic_write() {
        let mut line = "é".repeat(MAX_LINE);
        emit(&mut line);
        assert!(line.len() <= MAX_LINE, "{}", line.len());
        assert!(line.ends_with("…\n"));
    }
}
