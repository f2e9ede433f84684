//! The pre-copy round logic (docs/migration-stream.md §4): plain code over
//! numbers, so the decision is tested without KVM or sockets.
//!
//! Round 0 sends every non-zero page while the guest runs; each later
//! round sends what was dirtied during the one before. After each round
//! the planner compares the pages left with what the link moves within
//! the downtime target at the bandwidth measured so far: once they fit,
//! or after [`MAX_ROUNDS`], the source stops the vcpus and copies the
//! rest with the machine's state.

use std::time::Duration;

/// Rounds after which the source stops the guest whatever is left (a
/// guest that dirties memory faster than the link drains it never
/// converges).
pub const MAX_ROUNDS: u32 = 30;

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the dirty pages in another round, the guest running.
    Round,
    /// Stop the vcpus and send the rest with the state.
    StopAndCopy,
}

/// The planner's memory of the rounds so far.
#[derive(Debug, Clone)]
pub struct Planner {
    downtime: Duration,
    max_rounds: u32,
    rounds: u32,
    bytes: u64,
    busy: Duration,
}

impl Planner {
    pub fn new(downtime: Duration) -> Planner {
        Planner {
            downtime,
            max_rounds: MAX_ROUNDS,
            rounds: 0,
            bytes: 0,
            busy: Duration::ZERO,
        }
    }

    /// A planner with another round cap (at least 1).
    pub fn with_max_rounds(downtime: Duration, max_rounds: u32) -> Planner {
        Planner {
            max_rounds: max_rounds.max(1),
            ..Planner::new(downtime)
        }
    }

    /// Rounds finished so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Bytes per second measured so far (`None` before any byte moved in
    /// a measurable time).
    pub fn bandwidth(&self) -> Option<f64> {
        let s = self.busy.as_secs_f64();
        (self.bytes > 0 && s > 0.0).then(|| self.bytes as f64 / s)
    }

    /// Records a finished round (`bytes` sent in `took`) and decides, with
    /// `dirty_pages` now waiting to be sent.
    pub fn after_round(&mut self, bytes: u64, took: Duration, dirty_pages: u64) -> Decision {
        self.rounds += 1;
        self.bytes += bytes;
        self.busy += took;
        if dirty_pages == 0 || self.rounds >= self.max_rounds {
            return Decision::StopAndCopy;
        }
        let Some(bw) = self.bandwidth() else {
            // Nothing measured yet: one more round measures the link.
            return Decision::Round;
        };
        // A page and its share of a full frame's 21-byte head.
        let left = dirty_pages as f64 * (crate::PAGE as f64 + 1.0);
        if left / bw <= self.downtime.as_secs_f64() {
            Decision::StopAndCopy
        } else {
            Decision::Round
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_idle_guest_stops_after_the_first_round() {
        let mut p = Planner::new(20 * MS);
        // 256 MiB in 200 ms, then 3 pages dirty: they fit easily.
        assert_eq!(p.after_round(256 << 20, 200 * MS, 3), Decision::StopAndCopy);
        let mut p = Planner::new(20 * MS);
        assert_eq!(p.after_round(1 << 20, 10 * MS, 0), Decision::StopAndCopy);
    }

    #[test]
    fn a_busy_guest_takes_rounds_until_its_dirty_set_fits() {
        // 1 GiB/s: 20 ms move about 5,000 pages.
        let mut p = Planner::new(20 * MS);
        assert_eq!(p.after_round(1 << 30, 1000 * MS, 50_000), Decision::Round);
        assert_eq!(p.after_round(200 << 20, 200 * MS, 20_000), Decision::Round);
        assert_eq!(
            p.after_round(80 << 20, 80 * MS, 4_000),
            Decision::StopAndCopy
        );
        assert_eq!(p.rounds(), 3);
    }

    #[test]
    fn a_guest_that_never_converges_is_stopped_at_the_cap() {
        let mut p = Planner::with_max_rounds(MS, 5);
        let mut decisions = Vec::new();
        for _ in 0..5 {
            decisions.push(p.after_round(4096 * 1000, 100 * MS, 1_000_000));
        }
        assert_eq!(&decisions[..4], &[Decision::Round; 4]);
        assert_eq!(decisions[4], Decision::StopAndCopy);
        let mut p = Planner::new(MS);
        let n = (0..100)
            .take_while(|_| p.after_round(4096, MS, 1_000_000) == Decision::Round)
            .count();
        assert_eq!(n as u32 + 1, MAX_ROUNDS);
    }

    #[test]
    fn no_measured_time_means_another_round() {
        let mut p = Planner::new(20 * MS);
        assert_eq!(p.after_round(0, Duration::ZERO, 10), Decision::Round);
        assert!(p.bandwidth().is_none());
    }
}
