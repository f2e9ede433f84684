//! Run statistics (`--stats`; crosvm had them as its `CROSVM_STATS`
//! feature): per request type the count, errors and latency p50/p99/max;
//! per vcpu its exits by the reserved range that took them, and the time it
//! spent waiting on the plugin.
//!
//! Cheap on the hot path: a vcpu thread owns its [`VcpuStats`] (no shared
//! lock per exit) and hands them over once, when it ends ([`submit`]);
//! latencies go into a fixed-size log-bucket [`Histogram`] (no allocation
//! per sample). Main requests are counted by the main thread. [`report`]
//! merges everything into a [`Report`], which prints as a table and
//! serializes to JSON (for the control socket's `stats` command).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::vm::Space;

/// Sub-buckets per power of two: a bucket is at most 25% wide.
const SUB: u32 = 4;
/// Buckets: values 0..4 exactly, then 4 per power of two up to 2^64.
const BUCKETS: usize = (4 + SUB * 62) as usize;

/// A latency histogram over nanoseconds with logarithmic buckets of at
/// most 25% relative width: fixed size, no allocation per sample.
#[derive(Clone)]
pub struct Histogram {
    buckets: [u64; BUCKETS],
    count: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; BUCKETS],
            count: 0,
            max: 0,
            sum: 0,
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < 4 {
        return v as usize;
    }
    let b = 63 - v.leading_zeros(); // >= 2
    let sub = ((v >> (b - 2)) & 3) as u32;
    (SUB * (b - 1) + sub) as usize
}

/// The largest value that falls into bucket `i`.
fn bucket_high(i: usize) -> u64 {
    if i < 4 {
        return i as u64;
    }
    let i = i as u32;
    let b = i / SUB + 1;
    let sub = u64::from(i % SUB);
    let low = (4 + sub) << (b - 2);
    low + (1u64 << (b - 2)) - 1
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        self.buckets[bucket_of(ns)] += 1;
        self.count += 1;
        self.max = self.max.max(ns);
        self.sum += u128::from(ns);
    }

    pub fn record_duration(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket
    /// holding it, never above the largest sample.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_high(i).min(self.max);
            }
        }
        self.max
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }
}

/// One request type's numbers.
#[derive(Clone, Default)]
pub struct RequestStats {
    pub errors: u64,
    pub latency: Histogram,
}

impl RequestStats {
    fn merge(&mut self, o: &RequestStats) {
        self.errors += o.errors;
        self.latency.merge(&o.latency);
    }
}

/// Per request type, by the names of [`crate::decode`].
pub type RequestTable = BTreeMap<&'static str, RequestStats>;

fn record_request(table: &mut RequestTable, kind: &'static str, failed: bool, d: Duration) {
    let s = table.entry(kind).or_default();
    s.errors += u64::from(failed);
    s.latency.record_duration(d);
}

/// The range an exit fell into: a reserved range, or `None` for an access
/// to no reserved range (answered by the host alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExitKey {
    pub mmio: bool,
    pub range: Option<(u64, u64)>,
}

/// What one vcpu thread counts; owned by that thread.
#[derive(Clone, Default)]
pub struct VcpuStats {
    pub requests: RequestTable,
    pub exits: BTreeMap<ExitKey, u64>,
    /// Events delivered to the plugin that it had to resume.
    pub waits: u64,
    /// Time from such an event's delivery to the plugin's `Resume`.
    pub waiting: Duration,
    pub wait_latency: Histogram,
}

impl VcpuStats {
    pub fn request(&mut self, kind: &'static str, failed: bool, d: Duration) {
        record_request(&mut self.requests, kind, failed, d);
    }

    /// A guest access that took an exit: `range` is the reserved range
    /// (start, length) that took it.
    pub fn exit(&mut self, space: Space, range: Option<(u64, u64)>) {
        let key = ExitKey {
            mmio: space == Space::Mmio,
            range,
        };
        *self.exits.entry(key).or_insert(0) += 1;
    }

    /// The plugin resumed an event after `d`.
    pub fn waited(&mut self, d: Duration) {
        self.waits += 1;
        self.waiting += d;
        self.wait_latency.record_duration(d);
    }
}

#[derive(Default)]
struct Collected {
    main: RequestTable,
    vcpus: BTreeMap<u32, VcpuStats>,
    /// Snapshots of vcpus still running ([`publish`]), replaced by their
    /// final numbers when they end.
    live: BTreeMap<u32, VcpuStats>,
}

static COLLECTED: Mutex<Collected> = Mutex::new(Collected {
    main: BTreeMap::new(),
    vcpus: BTreeMap::new(),
    live: BTreeMap::new(),
});

/// A running vcpu's numbers so far (called when it is kicked, not per
/// exit), for the live report of the control socket's `stats`.
pub fn publish(id: u32, stats: &VcpuStats) {
    collected().live.insert(id, stats.clone());
}

fn collected() -> std::sync::MutexGuard<'static, Collected> {
    COLLECTED.lock().unwrap_or_else(|p| p.into_inner())
}

/// A main request was answered (the main thread; not a hot path).
pub fn main_request(kind: &'static str, failed: bool, d: Duration) {
    record_request(&mut collected().main, kind, failed, d);
}

/// A vcpu thread hands over its numbers when it ends.
pub fn submit(id: u32, stats: VcpuStats) {
    let mut c = collected();
    c.live.remove(&id);
    let slot = c.vcpus.entry(id).or_default();
    for (k, v) in &stats.requests {
        slot.requests.entry(k).or_default().merge(v);
    }
    for (k, n) in &stats.exits {
        *slot.exits.entry(*k).or_insert(0) += n;
    }
    slot.waits += stats.waits;
    slot.waiting += stats.waiting;
    slot.wait_latency.merge(&stats.wait_latency);
}

/// One request type in a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRow {
    /// `main` or `vcpu`.
    pub channel: &'static str,
    pub request: &'static str,
    pub count: u64,
    pub errors: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// Exits of one vcpu through one range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitRow {
    /// `IoPort` or `Mmio`.
    pub space: &'static str,
    /// The reserved range; `None` for accesses to no reserved range.
    pub start: Option<u64>,
    pub length: Option<u64>,
    pub exits: u64,
}

/// One vcpu in a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VcpuRow {
    pub id: u32,
    pub exits: Vec<ExitRow>,
    /// Events the plugin resumed, and the time the vcpu waited for them.
    pub resumed_events: u64,
    pub waiting_on_plugin_ns: u64,
    pub wait_p50_ns: u64,
    pub wait_p99_ns: u64,
    pub wait_max_ns: u64,
}

/// Everything counted in a run, merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub requests: Vec<RequestRow>,
    pub vcpus: Vec<VcpuRow>,
}

fn rows<'a>(
    channel: &'static str,
    table: &'a RequestTable,
) -> impl Iterator<Item = RequestRow> + 'a {
    table.iter().map(move |(k, s)| RequestRow {
        channel,
        request: k,
        count: s.latency.count(),
        errors: s.errors,
        p50_ns: s.latency.quantile(0.5),
        p99_ns: s.latency.quantile(0.99),
        max_ns: s.latency.max(),
    })
}

/// Builds the report from the main thread's numbers and the vcpus'.
pub fn build(main: &RequestTable, vcpus: &BTreeMap<u32, VcpuStats>) -> Report {
    let mut vcpu_requests = RequestTable::new();
    for v in vcpus.values() {
        for (k, s) in &v.requests {
            vcpu_requests.entry(k).or_default().merge(s);
        }
    }
    Report {
        requests: rows("main", main)
            .chain(rows("vcpu", &vcpu_requests))
            .collect(),
        vcpus: vcpus
            .iter()
            .map(|(id, v)| VcpuRow {
                id: *id,
                exits: v
                    .exits
                    .iter()
                    .map(|(k, n)| ExitRow {
                        space: if k.mmio { "Mmio" } else { "IoPort" },
                        start: k.range.map(|r| r.0),
                        length: k.range.map(|r| r.1),
                        exits: *n,
                    })
                    .collect(),
                resumed_events: v.waits,
                waiting_on_plugin_ns: u64::try_from(v.waiting.as_nanos()).unwrap_or(u64::MAX),
                wait_p50_ns: v.wait_latency.quantile(0.5),
                wait_p99_ns: v.wait_latency.quantile(0.99),
                wait_max_ns: v.wait_latency.max(),
            })
            .collect(),
    }
}

/// The statistics of this run so far: ended vcpus' final numbers, running
/// ones' last published snapshots.
pub fn report() -> Report {
    let c = collected();
    if c.live.is_empty() {
        return build(&c.main, &c.vcpus);
    }
    let mut vcpus = c.vcpus.clone();
    for (id, s) in &c.live {
        vcpus.entry(*id).or_insert_with(|| s.clone());
    }
    build(&c.main, &vcpus)
}

fn ns(out: &mut String, v: u64) {
    crate::decode::duration(out, Duration::from_nanos(v));
}

impl Report {
    /// The JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut s = String::from("vmm statistics\n");
        let _ = writeln!(
            s,
            "  {:<7} {:<20} {:>8} {:>7} {:>9} {:>9} {:>9}",
            "channel", "request", "count", "errors", "p50", "p99", "max"
        );
        for r in &self.requests {
            let mut lat = [String::new(), String::new(), String::new()];
            ns(&mut lat[0], r.p50_ns);
            ns(&mut lat[1], r.p99_ns);
            ns(&mut lat[2], r.max_ns);
            let _ = writeln!(
                s,
                "  {:<7} {:<20} {:>8} {:>7} {:>9} {:>9} {:>9}",
                r.channel, r.request, r.count, r.errors, lat[0], lat[1], lat[2]
            );
        }
        for v in &self.vcpus {
            let mut wait = String::new();
            ns(&mut wait, v.waiting_on_plugin_ns);
            let _ = writeln!(
                s,
                "  vcpu{}: {} resumed event(s), {} waiting on the plugin",
                v.id, v.resumed_events, wait
            );
            for e in &v.exits {
                match (e.start, e.length) {
                    (Some(start), Some(len)) => {
                        let _ = writeln!(
                            s,
                            "    {:<6} {:#x}..{:#x} {:>10} exit(s)",
                            e.space,
                            start,
                            start.saturating_add(len),
                            e.exits
                        );
                    }
                    _ => {
                        let _ =
                            writeln!(s, "    {:<6} unreserved {:>10} exit(s)", e.space, e.exits);
                    }
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut prev = 0;
        for v in (0..2000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS);
            assert!(b >= prev || v > 2000, "{v}");
            assert!(bucket_high(b) >= v, "{v} in bucket {b}");
            if b > 0 {
                assert!(bucket_high(b - 1) < v, "{v} in bucket {b}");
            }
            prev = b;
        }
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5);
        assert!((500_000..=625_000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((990_000..=1_000_000).contains(&p99), "{p99}");
        assert_eq!(h.max(), 1_000_000);
        assert_eq!(h.count(), 1000);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    #[test]
    fn report_merges_and_serializes() {
        let mut main = RequestTable::new();
        record_request(&mut main, "ReserveRange", false, Duration::from_micros(3));
        record_request(&mut main, "ReserveRange", true, Duration::from_micros(5));
        let mut v = VcpuStats::default();
        v.exit(Space::Ioport, Some((0x600, 3)));
        v.exit(Space::Ioport, Some((0x600, 3)));
        v.exit(Space::Mmio, None);
        v.request("Resume", false, Duration::from_micros(1));
        v.waited(Duration::from_micros(10));
        let vcpus = BTreeMap::from([(0, v)]);
        let r = build(&main, &vcpus);
        assert_eq!(r.requests[0].request, "ReserveRange");
        assert_eq!((r.requests[0].count, r.requests[0].errors), (2, 1));
        assert_eq!(r.requests[1].channel, "vcpu");
        assert_eq!(r.vcpus[0].exits[0].exits, 2);
        assert_eq!(r.vcpus[0].exits[1].start, None);
        assert_eq!(r.vcpus[0].waiting_on_plugin_ns, 10_000);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["vcpus"][0]["exits"][0]["start"], 1536);
        let table = r.table();
        assert!(table.contains("IoPort 0x600..0x603"), "{table}");
        assert!(table.contains("unreserved"), "{table}");
    }
}
