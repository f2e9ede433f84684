//! Diagnostics of the vcpu threads that cost the exit path nothing
//! measurable:
//!
//! * [`WaitWatch`]: which exit a vcpu is waiting on the plugin for. The vcpu
//!   thread publishes the exit with three plain atomic stores (no clock, no
//!   lock); the main thread samples it on its timer and [`StuckDetector`]
//!   warns about a vcpu whose exit has not been resumed for
//!   [`STUCK_AFTER`], again after twice as long, and so on;
//! * the start barrier report: which vcpus have not finished `Init`;
//! * [`UnreservedLog`]: a guest access to an unreserved address is logged
//!   once per address, for a bounded number of addresses.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::vm::Space;

/// How long a vcpu may wait for the plugin's `resume()` (or for every vcpu to
/// finish `Init`) before the host warns; the warning repeats after twice as
/// long each time (5 s, 10 s, 20 s, ...).
pub const STUCK_AFTER: Duration = Duration::from_secs(5);

/// How often the main loop samples the vcpus while they run.
pub const WATCH_TICK: Duration = Duration::from_millis(500);

/// Most distinct unreserved addresses logged; later ones are counted, not
/// remembered.
pub const MAX_UNRESERVED_LOGGED: usize = 1024;

/// What a vcpu waits on the plugin for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    Write(Space),
    Read(Space),
    Hypercall,
    Synic,
    Pause,
}

impl WaitKind {
    fn code(self) -> u8 {
        match self {
            WaitKind::Write(Space::Ioport) => 1,
            WaitKind::Read(Space::Ioport) => 2,
            WaitKind::Write(Space::Mmio) => 3,
            WaitKind::Read(Space::Mmio) => 4,
            WaitKind::Hypercall => 5,
            WaitKind::Synic => 6,
            WaitKind::Pause => 7,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => WaitKind::Write(Space::Ioport),
            2 => WaitKind::Read(Space::Ioport),
            3 => WaitKind::Write(Space::Mmio),
            4 => WaitKind::Read(Space::Mmio),
            5 => WaitKind::Hypercall,
            6 => WaitKind::Synic,
            7 => WaitKind::Pause,
            _ => return None,
        })
    }
}

/// Describes an exit for a log line, e.g. `the write to port 0x3f8`.
pub fn describe_wait(kind: WaitKind, address: u64) -> String {
    let space = |s: Space| match s {
        Space::Ioport => "port",
        Space::Mmio => "MMIO address",
    };
    match kind {
        WaitKind::Write(s) => format!("the write to {} {address:#x}", space(s)),
        WaitKind::Read(s) => format!("the read of {} {address:#x}", space(s)),
        WaitKind::Hypercall => "the Hyper-V hypercall".into(),
        WaitKind::Synic => "the SynIC MSR write".into(),
        WaitKind::Pause => "the pause (User event)".into(),
    }
}

/// One vcpu's published wait: a sequence number that is odd while the
/// vcpu waits for a resume, and the exit it waits on. Written only by the
/// vcpu's thread, read by the main thread.
#[derive(Debug, Default)]
pub struct WaitWatch {
    seq: AtomicU64,
    kind: AtomicU8,
    address: AtomicU64,
    /// The vcpu's `Init` servicing is over (it reached the start barrier).
    init_done: AtomicBool,
}

impl WaitWatch {
    /// The vcpu delivered an exit and now waits for the plugin's resume.
    pub fn begin(&self, kind: WaitKind, address: u64) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.kind.store(kind.code(), Ordering::Relaxed);
        self.address.store(address, Ordering::Relaxed);
        // Release: a reader that sees the odd number sees kind and address.
        self.seq.store(seq | 1, Ordering::Release);
    }

    /// The plugin resumed (or servicing ended).
    pub fn end(&self) {
        let seq = self.seq.load(Ordering::Relaxed);
        if seq & 1 == 1 {
            self.seq.store(seq + 1, Ordering::Release);
        }
    }

    pub fn set_init_done(&self) {
        self.init_done.store(true, Ordering::Release);
    }

    pub fn init_done(&self) -> bool {
        self.init_done.load(Ordering::Acquire)
    }

    /// `(sequence, kind, address)` of the exit being waited on, if any. A
    /// wait that changed while it was read is reported as none (the vcpu
    /// made progress).
    pub fn snapshot(&self) -> Option<(u64, WaitKind, u64)> {
        let seq = self.seq.load(Ordering::Acquire);
        if seq & 1 == 0 {
            return None;
        }
        let kind = self.kind.load(Ordering::Relaxed);
        let address = self.address.load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        if self.seq.load(Ordering::Relaxed) != seq {
            return None;
        }
        Some((seq, WaitKind::from_code(kind)?, address))
    }
}

#[derive(Debug, Clone, Copy)]
struct Track {
    seq: u64,
    since: Instant,
    next: Duration,
}

/// The main thread's side of stuck detection: per vcpu, the wait it saw
/// last, since when, and when to warn next.
#[derive(Debug, Default)]
pub struct StuckDetector {
    tracks: Vec<Option<Track>>,
    /// The vcpu threads were started at; the next barrier report.
    barrier: Option<(Instant, Duration)>,
}

impl StuckDetector {
    /// The vcpu threads have just been started.
    pub fn started(&mut self, now: Instant) {
        self.barrier = Some((now, STUCK_AFTER));
    }

    /// Samples every vcpu's watch at `now`; returns the warnings due.
    pub fn tick<'a>(
        &mut self,
        watches: impl IntoIterator<Item = &'a WaitWatch>,
        now: Instant,
    ) -> Vec<String> {
        let watches: Vec<&WaitWatch> = watches.into_iter().collect();
        let mut out = Vec::new();
        if let Some((since, next)) = self.barrier {
            let missing: Vec<usize> = (0..watches.len())
                .filter(|&i| !watches[i].init_done())
                .collect();
            if missing.is_empty() {
                self.barrier = None;
            } else {
                let waited = now.saturating_duration_since(since);
                if waited >= next {
                    for i in missing {
                        out.push(format!(
                            "waiting for vcpu {i} to finish Init for {}s: its plugin thread \
                             has not called wait() and resume() for its Init event (the start \
                             barrier: no vcpu runs until every vcpu has finished Init)",
                            waited.as_secs()
                        ));
                    }
                    self.barrier = Some((since, next * 2));
                }
            }
        }
        self.tracks.resize(watches.len(), None);
        for (i, w) in watches.iter().enumerate() {
            let Some((seq, kind, address)) = w.snapshot() else {
                self.tracks[i] = None;
                continue;
            };
            let t = match self.tracks[i] {
                Some(t) if t.seq == seq => t,
                _ => {
                    self.tracks[i] = Some(Track {
                        seq,
                        since: now,
                        next: STUCK_AFTER,
                    });
                    continue;
                }
            };
            let waited = now.saturating_duration_since(t.since);
            if waited >= t.next {
                out.push(format!(
                    "vcpu {i} is stuck: the plugin has not resumed {} for {}s (every \
                     exit delivered by wait() must be answered by resume())",
                    describe_wait(kind, address),
                    waited.as_secs()
                ));
                self.tracks[i] = Some(Track {
                    next: t.next * 2,
                    ..t
                });
            }
        }
        out
    }
}

/// The unreserved addresses already logged, shared by the vcpus of a VM.
#[derive(Debug, Default)]
pub struct UnreservedLog {
    seen: Mutex<(HashSet<(bool, u64)>, bool)>,
}

impl UnreservedLog {
    /// Whether an access to `address` is to be logged: the first time for
    /// each address, for at most [`MAX_UNRESERVED_LOGGED`] addresses. Once
    /// the set is full, returns `Err(true)` exactly once (to say further
    /// addresses are not logged), then `Err(false)`.
    pub fn first(&self, space: Space, address: u64) -> Result<(), bool> {
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let key = (space == Space::Mmio, address);
        if g.0.contains(&key) {
            return Err(false);
        }
        if g.0.len() >= MAX_UNRESERVED_LOGGED {
            let first_overflow = !g.1;
            g.1 = true;
            return Err(first_overflow);
        }
        g.0.insert(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuck_warnings_back_off_and_stop_on_resume() {
        let w = WaitWatch::default();
        w.set_init_done();
        let mut d = StuckDetector::default();
        let t0 = Instant::now();
        assert!(d.tick([&w], t0).is_empty());
        w.begin(WaitKind::Write(Space::Ioport), 0x3f8);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(d.tick([&w], at(1)).is_empty());
        assert!(d.tick([&w], at(5)).is_empty());
        let warn = d.tick([&w], at(6));
        assert_eq!(warn.len(), 1);
        assert!(
            warn[0].contains(
                "vcpu 0 is stuck: the plugin has not resumed the write to port 0x3f8 for 5s"
            ),
            "{warn:?}"
        );
        assert!(d.tick([&w], at(10)).is_empty());
        assert!(d.tick([&w], at(11))[0].contains("for 10s"));
        assert!(d.tick([&w], at(20)).is_empty());
        assert!(d.tick([&w], at(21))[0].contains("for 20s"));
        // A resume and a new exit start over.
        w.end();
        assert!(d.tick([&w], at(22)).is_empty());
        w.begin(WaitKind::Read(Space::Mmio), 0xd000_0000);
        assert!(d.tick([&w], at(23)).is_empty());
        assert!(d.tick([&w], at(27)).is_empty());
        assert!(d.tick([&w], at(28))[0].contains("the read of MMIO address 0xd0000000 for 5s"));
    }

    #[test]
    fn barrier_report_names_the_vcpus_without_init() {
        let ws = [WaitWatch::default(), WaitWatch::default()];
        ws[0].set_init_done();
        let mut d = StuckDetector::default();
        let t0 = Instant::now();
        d.started(t0);
        assert!(d.tick(&ws, t0 + Duration::from_secs(4)).is_empty());
        let warn = d.tick(&ws, t0 + Duration::from_secs(5));
        assert_eq!(warn.len(), 1, "{warn:?}");
        assert!(warn[0].starts_with("waiting for vcpu 1 to finish Init for 5s"));
        assert!(d.tick(&ws, t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(d.tick(&ws, t0 + Duration::from_secs(10)).len(), 1);
        ws[1].set_init_done();
        assert!(d.tick(&ws, t0 + Duration::from_secs(40)).is_empty());
    }

    #[test]
    fn unreserved_log_is_once_per_address_and_bounded() {
        let l = UnreservedLog::default();
        assert_eq!(l.first(Space::Ioport, 0x80), Ok(()));
        assert_eq!(l.first(Space::Ioport, 0x80), Err(false));
        assert_eq!(l.first(Space::Mmio, 0x80), Ok(()));
        for a in 0..MAX_UNRESERVED_LOGGED as u64 - 2 {
            assert_eq!(l.first(Space::Mmio, 0x1000 + a), Ok(()));
        }
        assert_eq!(l.first(Space::Mmio, 0x10), Err(true));
        assert_eq!(l.first(Space::Mmio, 0x11), Err(false));
        assert_eq!(l.first(Space::Ioport, 0x80), Err(false));
    }
}
