//! The host's side of live migration (docs/migration-stream.md): the
//! source's rounds (the main loop collects the dirty pages and decides, a
//! worker thread reads them from duplicates of the memfds and sends them,
//! so the main loop keeps serving the plugin and the control socket), and
//! the target's `--incoming` (the stream is read into the plugin's memory
//! when the plugin asks for its restore state or starts, which it waits
//! for: the back-pressure the source sees).

use std::io::{BufReader, BufWriter};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde_json::json;
use vmm_migration::plan::{Decision, Planner};
use vmm_migration::{Frame, Header, Reader, Region, Reply, State, Writer, PAGE};
use vmm_snapshot::Records;

use super::main_handler::{dirty_bitmap_len, RestoreOffer};
use super::objects::Object;
use super::snapshot::{device_state_fits, host_tables};
use super::{Host, RunError};
use crate::control::dispatch::MigrateProgress;
use crate::migrate::{Addr, Conn, Listener};
use crate::snapshot::{self as snap, Restore};
use crate::vm::Vm;

/// A run of pages of one region (index in the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    region: u32,
    first: u64,
    count: u32,
}

/// A region as the worker reads it.
struct Source {
    fd: OwnedFd,
    offset: u64,
    size: u64,
}

enum Job {
    Round { round: u32, runs: Vec<Run> },
    Final { runs: Vec<Run>, state: Box<State> },
}

enum News {
    RoundSent {
        bytes: u64,
        pages: u64,
        took: Duration,
    },
    Done {
        bytes: u64,
        pages: u64,
    },
    Failed {
        why: String,
        committed: bool,
    },
}

/// A region as the main loop tracks it.
struct Tracked {
    id: u32,
    slot: u32,
    gpa: u64,
    size: u64,
    /// Pages dirtied and not yet sent.
    dirty: Vec<u8>,
}

/// An outgoing migration.
pub(super) struct Outgoing {
    to: String,
    planner: Planner,
    regions: Vec<Tracked>,
    jobs: Option<mpsc::Sender<Job>>,
    news: mpsc::Receiver<News>,
    worker: Option<JoinHandle<()>>,
    /// A handle to shut the connection down on abort.
    conn: Conn,
    started: Instant,
    paused_at: Option<Instant>,
    last_round: Option<(u64, Duration)>,
    rounds: u32,
    pages: u64,
    plugin_pages_outside: u64,
}

fn chain(e: &dyn std::error::Error) -> String {
    crate::error_chain(e)
}

/// The set bits of `bitmap` as runs of at most `MAX_FRAME_PAGES` pages.
fn runs(region: u32, bitmap: &[u8], pages: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (byte, &bits) in bitmap.iter().enumerate() {
        if bits == 0 {
            continue;
        }
        for bit in 0..8u64 {
            let page = byte as u64 * 8 + bit;
            if bits & (1 << bit) == 0 || page >= pages {
                continue;
            }
            match out.last_mut() {
                Some(r)
                    if r.first + u64::from(r.count) == page
                        && r.count < vmm_migration::MAX_FRAME_PAGES =>
                {
                    r.count += 1
                }
                _ => out.push(Run {
                    region,
                    first: page,
                    count: 1,
                }),
            }
        }
    }
    out
}

fn count_bits(b: &[u8]) -> u64 {
    b.iter().map(|x| u64::from(x.count_ones())).sum()
}

/// Reads run `r` of `src` into `buf` (zero past the region's end).
fn read_run(src: &Source, r: Run, buf: &mut Vec<u8>) -> Result<(), String> {
    let len = r.count as usize * PAGE;
    buf.clear();
    buf.resize(len, 0);
    let start = r.first * PAGE as u64;
    let n = (src.size.saturating_sub(start)).min(len as u64) as usize;
    vmm_snapshot::memory::read_full(src.fd.as_fd(), &mut buf[..n], src.offset + start).map_err(
        |e| {
            format!(
                "cannot read guest memory at region {} page {}: {e}",
                r.region, r.first
            )
        },
    )
}

fn stream_err(e: vmm_migration::StreamError) -> String {
    chain(&e)
}

/// The worker: round 0 at once, then what the main loop sends.
fn worker(
    conn: Conn,
    header: Header,
    sources: Vec<Source>,
    jobs: mpsc::Receiver<Job>,
    news: mpsc::Sender<News>,
) {
    let mut committed = false;
    let mut pages = 0u64;
    let Ok(peer) = conn.try_clone() else {
        let _ = news.send(News::Failed {
            why: "cannot clone the connection".into(),
            committed,
        });
        return;
    };
    let mut replies = BufReader::new(peer);
    let r = (|| -> Result<u64, String> {
        let mut w = Writer::new(BufWriter::with_capacity(1 << 20, conn)).map_err(stream_err)?;
        w.header(&header).map_err(stream_err)?;
        // Round 0: every non-zero page, holes skipped.
        let started = Instant::now();
        let before = w.bytes();
        let mut buf = Vec::with_capacity(vmm_migration::MAX_FRAME_PAGES as usize * PAGE);
        let mut n0 = 0u64;
        let chunk = vmm_migration::MAX_FRAME_PAGES as u64 * PAGE as u64;
        for (i, s) in sources.iter().enumerate() {
            let extents = vmm_snapshot::memory::extents(s.fd.as_fd(), s.offset, s.offset + s.size)
                .map_err(|e| format!("cannot find region {i}'s data: {e}"))?;
            for (a, b) in extents {
                let mut at = a - s.offset;
                let end = b - s.offset;
                while at < end {
                    let len = chunk.min(end - at);
                    let count = len.div_ceil(PAGE as u64) as u32;
                    let run = Run {
                        region: i as u32,
                        first: at / PAGE as u64,
                        count,
                    };
                    read_run(s, run, &mut buf)?;
                    // Runs of non-zero pages within the chunk.
                    let mut p = 0usize;
                    while p < count as usize {
                        if vmm_snapshot::memory::is_zero(&buf[p * PAGE..(p + 1) * PAGE]) {
                            p += 1;
                            continue;
                        }
                        let q = (p..count as usize)
                            .find(|&q| {
                                vmm_snapshot::memory::is_zero(&buf[q * PAGE..(q + 1) * PAGE])
                            })
                            .unwrap_or(count as usize);
                        w.pages(i as u32, run.first + p as u64, &buf[p * PAGE..q * PAGE])
                            .map_err(stream_err)?;
                        n0 += (q - p) as u64;
                        p = q;
                    }
                    at += len;
                }
            }
        }
        w.round_end(0, n0).map_err(stream_err)?;
        w.flush().map_err(stream_err)?;
        pages += n0;
        let took0 = started.elapsed();
        // The guest is not stopped before the target takes pages (its
        // plugin started and set up memory): its start-up is no downtime.
        vmm_migration::expect_reply(&mut replies, Reply::Receiving)
            .map_err(|e| format!("the target did not start receiving: {}", chain(&e)))?;
        let _ = news.send(News::RoundSent {
            bytes: w.bytes() - before,
            pages: n0,
            took: took0,
        });
        let send_runs = |w: &mut Writer<BufWriter<Conn>>, runs: &[Run], buf: &mut Vec<u8>| {
            for r in runs {
                let s = &sources[r.region as usize];
                read_run(s, *r, buf)?;
                w.pages(r.region, r.first, buf).map_err(stream_err)?;
            }
            Ok::<u64, String>(runs.iter().map(|r| u64::from(r.count)).sum())
        };
        loop {
            match jobs.recv() {
                Err(_) => return Err("the migration was cancelled".into()),
                Ok(Job::Round { round, runs }) => {
                    let started = Instant::now();
                    let before = w.bytes();
                    let n = send_runs(&mut w, &runs, &mut buf)?;
                    w.round_end(round, n).map_err(stream_err)?;
                    w.flush().map_err(stream_err)?;
                    pages += n;
                    let _ = news.send(News::RoundSent {
                        bytes: w.bytes() - before,
                        pages: n,
                        took: started.elapsed(),
                    });
                }
                Ok(Job::Final { runs, state }) => {
                    pages += send_runs(&mut w, &runs, &mut buf)?;
                    w.state(&state).map_err(stream_err)?;
                    w.end().map_err(stream_err)?;
                    vmm_migration::expect_reply(&mut replies, Reply::Ready).map_err(|e| {
                        format!("the target did not take the machine: {}", chain(&e))
                    })?;
                    vmm_migration::write_reply(w.get_mut(), &Reply::Commit).map_err(stream_err)?;
                    committed = true;
                    vmm_migration::expect_reply(&mut replies, Reply::Done).map_err(|e| {
                        format!(
                            "the target did not confirm it runs the machine: {}",
                            chain(&e)
                        )
                    })?;
                    return Ok(w.bytes());
                }
            }
        }
    })();
    let r = r.map_err(|why| {
        if committed {
            return why;
        }
        // A target that gives up says why before it closes: a failed
        // write is most likely its refusal.
        let _ = replies
            .get_ref()
            .set_timeouts(Some(Duration::from_millis(500)));
        match vmm_migration::read_reply(&mut replies) {
            Ok(Reply::Error(m)) => format!("the target refused the machine: {m}"),
            _ => why,
        }
    });
    let _ = news.send(match r {
        Ok(bytes) => News::Done { bytes, pages },
        Err(why) => News::Failed { why, committed },
    });
}

impl Host {
    /// `migrate`: connects, turns dirty logging on for every region and
    /// starts the worker with the header and round 0.
    pub(super) fn migrate_begin(&mut self, to: &str, downtime_ms: u64) -> Result<(), String> {
        if self.outgoing.is_some() {
            return Err("a migration is under way".into());
        }
        if self.snapshot_writer.is_some() {
            return Err("a snapshot is being written".into());
        }
        let addr = Addr::parse(to).map_err(|e| chain(&e))?;
        let conn = Conn::connect(&addr).map_err(|e| chain(&e))?;
        let mut regions = Vec::new();
        let mut sources = Vec::new();
        for (&id, o) in self.state.objects.iter() {
            let Object::Memory {
                slot,
                start,
                length,
                dirty_log,
                mapping,
            } = o
            else {
                continue;
            };
            let Some(f) = mapping.file_offset() else {
                return Err(format!("memory object {id} has no descriptor"));
            };
            let fd = f
                .file()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("cannot duplicate memory object {id}'s memfd: {e}"))?;
            if !*dirty_log {
                // SAFETY: the mapping is the one KVM already uses for this
                // slot (same slot, address and size: only the flags
                // change); the object table keeps it alive until the slot
                // is removed.
                unsafe {
                    self.vm.add_memory_slot(
                        *slot,
                        *start,
                        *length,
                        mapping.as_ptr() as u64,
                        mapping.prot() & libc::PROT_WRITE == 0,
                        true,
                    )
                }
                .map_err(|e| format!("cannot turn dirty logging on for memory object {id}: {e}"))?;
            }
            self.vm
                .get_dirty_log(*slot, *length, dirty_bitmap_len(*length))
                .map_err(|e| format!("cannot clear memory object {id}'s dirty log: {e}"))?;
            regions.push(Tracked {
                id,
                slot: *slot,
                gpa: *start,
                size: *length,
                dirty: vec![0; dirty_bitmap_len(*length)],
            });
            sources.push(Source {
                fd,
                offset: f.start(),
                size: *length,
            });
        }
        let mut facts = Records::new();
        let _ = facts.push("vmm", env!("CARGO_PKG_VERSION").as_bytes().to_vec());
        let plugin = self
            .config
            .plugin
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let _ = facts.push("plugin", plugin.into_bytes());
        let header = Header {
            vcpus: self.controls.len() as u32,
            regions: regions
                .iter()
                .map(|r| Region {
                    gpa: r.gpa,
                    size: r.size,
                })
                .collect(),
            facts,
        };
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (news_tx, news_rx) = mpsc::channel();
        let handle = conn
            .try_clone()
            .map_err(|e| format!("cannot clone the connection: {e}"))?;
        let worker = std::thread::Builder::new()
            .name("vmm_migrate".into())
            .spawn(move || worker(conn, header, sources, jobs_rx, news_tx))
            .map_err(|e| format!("cannot start the migration worker: {e}"))?;
        info!("migrating to {to} (downtime target {downtime_ms} ms)");
        self.outgoing = Some(Outgoing {
            to: to.to_string(),
            planner: Planner::new(Duration::from_millis(downtime_ms)),
            regions,
            jobs: Some(jobs_tx),
            news: news_rx,
            worker: Some(worker),
            conn: handle,
            started: Instant::now(),
            paused_at: None,
            last_round: None,
            rounds: 0,
            pages: 0,
            plugin_pages_outside: 0,
        });
        Ok(())
    }

    pub(super) fn migrate_poll(&mut self) -> Option<MigrateProgress> {
        let m = self.outgoing.as_mut()?;
        match m.news.try_recv() {
            Ok(News::RoundSent { bytes, pages, took }) => {
                m.last_round = Some((bytes, took));
                m.rounds += 1;
                m.pages += pages;
                debug!("migration: round sent, {pages} pages, {bytes} bytes in {took:?}");
                Some(MigrateProgress::RoundSent)
            }
            Ok(News::Done { bytes, pages }) => {
                let downtime = m.paused_at.map_or(Duration::ZERO, |t| t.elapsed());
                let v = json!({
                    "downtime_ms": (downtime.as_secs_f64() * 1e6).round() / 1e3,
                    "total_ms": m.started.elapsed().as_millis() as u64,
                    "rounds": m.rounds,
                    "pages": pages,
                    "bytes": bytes,
                });
                Some(MigrateProgress::Done(v))
            }
            Ok(News::Failed { why, committed }) => Some(MigrateProgress::Failed { why, committed }),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(MigrateProgress::Failed {
                why: "the migration worker ended".into(),
                committed: false,
            }),
        }
    }

    /// Adds KVM's dirty log and the plugin's pages to the dirty sets.
    fn collect_dirty(&mut self, plugin_pages: &[u64]) -> Result<u64, String> {
        let Some(m) = self.outgoing.as_mut() else {
            return Err("no migration".into());
        };
        for r in &mut m.regions {
            let log = self
                .vm
                .get_dirty_log(r.slot, r.size, r.dirty.len())
                .map_err(|e| format!("cannot read memory object {}'s dirty log: {e}", r.id))?;
            for (d, l) in r.dirty.iter_mut().zip(&log) {
                *d |= l;
            }
        }
        for &gpa in plugin_pages {
            match m
                .regions
                .iter_mut()
                .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)
            {
                Some(r) => {
                    let page = ((gpa - r.gpa) / PAGE as u64) as usize;
                    r.dirty[page / 8] |= 1 << (page % 8);
                }
                None => m.plugin_pages_outside += 1,
            }
        }
        if m.plugin_pages_outside > 0 {
            warn!(
                "migration: the plugin reported {} written page(s) outside guest memory (ignored)",
                std::mem::take(&mut m.plugin_pages_outside)
            );
        }
        Ok(m.regions.iter().map(|r| count_bits(&r.dirty)).sum())
    }

    fn take_runs(&mut self) -> Vec<Run> {
        let Some(m) = self.outgoing.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, r) in m.regions.iter_mut().enumerate() {
            out.extend(runs(i as u32, &r.dirty, r.size.div_ceil(PAGE as u64)));
            r.dirty.iter_mut().for_each(|b| *b = 0);
        }
        out
    }

    pub(super) fn migrate_round(&mut self, plugin_pages: &[u64]) -> Result<bool, String> {
        let dirty = self.collect_dirty(plugin_pages)?;
        let Some(m) = self.outgoing.as_mut() else {
            return Err("no migration".into());
        };
        let (bytes, took) = m.last_round.take().unwrap_or_default();
        let decision = m.planner.after_round(bytes, took, dirty);
        debug!(
            "migration: {dirty} pages dirty after round {}: {decision:?}",
            m.rounds
        );
        if decision == Decision::StopAndCopy {
            m.paused_at = Some(Instant::now());
            return Ok(true);
        }
        let round = m.rounds;
        let runs = self.take_runs();
        let Some(m) = self.outgoing.as_mut() else {
            return Err("no migration".into());
        };
        m.jobs
            .as_ref()
            .and_then(|j| j.send(Job::Round { round, runs }).ok())
            .ok_or_else(|| "the migration worker ended".to_string())?;
        Ok(false)
    }

    pub(super) fn migrate_finish(
        &mut self,
        device: Vec<u8>,
        plugin_pages: &[u64],
    ) -> Result<(), String> {
        device_state_fits(&device)?;
        self.collect_dirty(plugin_pages)?;
        let (vm, vcpus) = self.capture_machine(&host_tables(&self.state))?;
        let runs = self.take_runs();
        let state = Box::new(State { vm, vcpus, device });
        let Some(m) = self.outgoing.as_mut() else {
            return Err("no migration".into());
        };
        m.jobs
            .as_ref()
            .and_then(|j| j.send(Job::Final { runs, state }).ok())
            .ok_or_else(|| "the migration worker ended".to_string())
    }

    pub(super) fn migrate_abort(&mut self) {
        let Some(mut m) = self.outgoing.take() else {
            return;
        };
        m.jobs = None;
        let _ = match &m.conn {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
        if let Some(w) = m.worker.take() {
            // The worker ends at its next read or write of the closed
            // connection, or at once when it waits for a job.
            let _ = w.join();
        }
        info!("migration to {} abandoned", m.to);
    }

    pub(super) fn migrated(&mut self, to: &str) {
        if let Some(mut m) = self.outgoing.take() {
            m.jobs = None;
            if let Some(w) = m.worker.take() {
                let _ = w.join();
            }
        }
        info!("migrated to {to}");
        self.migrated_to = Some(to.to_string());
        self.enter_dying("the machine migrated");
    }
}

/// The target's side: the connection, the stream being read.
pub(super) struct Incoming {
    addr: String,
    _listener: Listener,
    reader: Reader<BufReader<Conn>>,
    replies: Conn,
    header: Header,
    /// The whole stream was read into memory.
    pub(super) received: bool,
}

/// `--incoming ADDR`: binds, waits for one source (at most `timeout`),
/// reads and checks the stream's version and header. `vcpus`: `--cpus`
/// when it was given.
pub(super) fn accept(
    addr: &str,
    timeout: Option<Duration>,
    vcpus: Option<usize>,
) -> Result<Incoming, RunError> {
    let fail = |e: String| RunError::Migration(e);
    let a = Addr::parse(addr).map_err(|e| fail(chain(&e)))?;
    let listener = Listener::bind(&a).map_err(|e| fail(chain(&e)))?;
    info!("waiting for a migration source on {a}");
    let conn = listener.accept(timeout).map_err(|e| fail(chain(&e)))?;
    let mut replies = conn
        .try_clone()
        .map_err(|e| fail(format!("cannot clone the connection: {e}")))?;
    let refuse = |replies: &mut Conn, why: String| {
        let _ = vmm_migration::write_reply(replies, &Reply::Error(why.clone()));
        fail(why)
    };
    let mut reader = match Reader::new(BufReader::with_capacity(1 << 20, conn)) {
        Ok(r) => r,
        Err(e) => {
            return Err(refuse(
                &mut replies,
                format!("the migration stream: {}", chain(&e)),
            ))
        }
    };
    let header = match reader.next_frame() {
        Ok(Frame::Header(h)) => h,
        Ok(f) => {
            return Err(refuse(
                &mut replies,
                format!("the stream began with {}", f.name()),
            ))
        }
        Err(e) => {
            return Err(refuse(
                &mut replies,
                format!("the migration stream: {}", chain(&e)),
            ))
        }
    };
    if let Some(n) = vcpus {
        if n != header.vcpus as usize {
            return Err(refuse(
                &mut replies,
                format!(
                    "--cpus {n} was given, but the migrating machine has {} vcpu(s)",
                    header.vcpus
                ),
            ));
        }
    }
    info!(
        "incoming migration: {} vcpu(s), {} region(s)",
        header.vcpus,
        header.regions.len()
    );
    Ok(Incoming {
        addr: a.to_string(),
        _listener: listener,
        reader,
        replies,
        header,
        received: false,
    })
}

impl Incoming {
    pub(super) fn vcpus(&self) -> usize {
        self.header.vcpus as usize
    }

    /// Tells the source why the target gives up.
    pub(super) fn refuse(&mut self, why: &str) {
        let _ = vmm_migration::write_reply(&mut self.replies, &Reply::Error(why.to_string()));
    }
}

impl Host {
    /// Before the plugin's `GetRestoreState` or `Start` (whichever comes
    /// first) is answered: reads the rest of the stream into the plugin's
    /// memory and takes the machine's state. An error is the run's.
    pub(super) fn receive_incoming(&mut self) -> Result<(), RunError> {
        let Some(inc) = self.incoming.as_mut() else {
            return Ok(());
        };
        if inc.received {
            return Ok(());
        }
        inc.received = true;
        let started = Instant::now();
        let r = receive(&mut self.state, &self.vm, inc);
        match r {
            Ok(restore) => {
                info!(
                    "received the machine from the migration source in {} ms",
                    started.elapsed().as_millis()
                );
                self.state.restore = Some(RestoreOffer {
                    device: restore.device.clone(),
                    asked: false,
                });
                self.restore = Some(restore);
                Ok(())
            }
            Err(why) => {
                inc.refuse(&why);
                Err(RunError::Migration(why))
            }
        }
    }

    /// At `Start`, state applied: `Ready`, then the source's `Commit`.
    pub(super) fn incoming_commit(&mut self) -> Result<(), RunError> {
        let Some(inc) = self.incoming.as_mut() else {
            return Ok(());
        };
        vmm_migration::write_reply(&mut inc.replies, &Reply::Ready)
            .and_then(|()| vmm_migration::expect_reply(inc.reader.get_mut(), Reply::Commit))
            .map_err(|e| {
                RunError::Migration(format!(
                    "the migration source did not commit: {}",
                    chain(&e)
                ))
            })
    }

    /// The vcpus run: `Done` for the source, which ends.
    pub(super) fn incoming_done(&mut self) {
        if let Some(inc) = self.incoming.as_mut() {
            if let Err(e) = vmm_migration::write_reply(&mut inc.replies, &Reply::Done) {
                warn!(
                    "cannot tell the migration source the machine runs: {}",
                    chain(&e)
                );
            }
            info!("the machine migrated from {} runs here", inc.addr);
        }
    }

    /// A failure of the target's start: the source hears it.
    pub(super) fn incoming_failed(&mut self, e: &RunError) {
        if let Some(inc) = self.incoming.as_mut() {
            inc.refuse(&chain(e));
        }
    }
}

fn receive(
    state: &mut super::main_handler::MainState,
    vm: &crate::vm::KvmVm,
    inc: &mut Incoming,
) -> Result<Restore, String> {
    let tables = host_tables(state);
    // The plugin's memory must be the stream's, region by region.
    let mut targets = Vec::with_capacity(inc.header.regions.len());
    for (i, r) in inc.header.regions.iter().enumerate() {
        let Some(m) = tables
            .memory
            .iter()
            .find(|m| m.gpa == r.gpa && m.size == r.size)
        else {
            return Err(format!(
                "the migrating machine's region {i} at {:#x} ({:#x} bytes) is not set up by the \
                 plugin (it must create its memory before it asks for its restore state or starts)",
                r.gpa, r.size
            ));
        };
        let Some(Object::Memory { mapping, .. }) = state.objects.get(m.id) else {
            return Err(format!("memory object {} vanished", m.id));
        };
        let Some(f) = mapping.file_offset() else {
            return Err(format!("memory object {} has no descriptor", m.id));
        };
        let fd = f
            .file()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot duplicate memory object {}'s memfd: {e}", m.id))?;
        targets.push((fd, f.start(), r.size));
    }
    if let Some(m) = tables.memory.iter().find(|m| {
        !inc.header
            .regions
            .iter()
            .any(|r| r.gpa == m.gpa && r.size == m.size)
    }) {
        return Err(format!(
            "the plugin's region at {:#x} ({:#x} bytes) is not in the migrating machine",
            m.gpa, m.size
        ));
    }
    vmm_migration::write_reply(&mut inc.replies, &Reply::Receiving)
        .map_err(|e| format!("cannot answer the source: {}", chain(&e)))?;
    let supported = vm
        .supported_cpuid()
        .map_err(|e| format!("cannot read this host's CPUID: {e}"))?;
    let stream = |e: vmm_migration::StreamError| format!("the migration stream: {}", chain(&e));
    let mut got = None;
    loop {
        match inc.reader.next_frame().map_err(stream)? {
            Frame::Header(_) => return Err("a second header".into()),
            Frame::Pages {
                region,
                first_page,
                data,
                ..
            } => {
                let (fd, offset, size) = &targets[region as usize];
                let start = first_page * PAGE as u64;
                let n = (size - start).min(data.len() as u64) as usize;
                vmm_snapshot::memory::write_full(fd.as_fd(), &data[..n], offset + start)
                    .map_err(|e| format!("cannot write guest memory: {e}"))?;
            }
            Frame::RoundEnd { round, pages } => {
                debug!("incoming migration: round {round} ({pages} pages)")
            }
            Frame::State(s) => {
                for (i, r) in s.vcpus.iter().enumerate() {
                    let part = snap::vcpu_part(i);
                    let bytes = r
                        .get("cpuid")
                        .ok_or_else(|| format!("vcpu {i}'s state has no cpuid record"))?;
                    let cpuid = snap::parse_cpuid(bytes, &part).map_err(|e| chain(&e))?;
                    snap::check_cpu_compatible(i, &cpuid, &supported).map_err(|e| chain(&e))?;
                }
                got = Some(s);
            }
            Frame::End { .. } => break,
        }
    }
    let s = got.ok_or("the stream ended without the machine's state")?;
    Restore::from_migration(&inc.addr, s.vm, s.vcpus, s.device).map_err(|e| chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_bits_become_bounded_runs() {
        let mut b = vec![0u8; 80];
        b[0] = 0b1011_0001;
        for x in &mut b[8..48] {
            *x = 0xff;
        }
        let r = runs(3, &b, 640);
        assert_eq!(
            r[..3],
            [
                Run {
                    region: 3,
                    first: 0,
                    count: 1
                },
                Run {
                    region: 3,
                    first: 4,
                    count: 2
                },
                Run {
                    region: 3,
                    first: 7,
                    count: 1
                },
            ]
        );
        // 320 pages from 64 on: one full frame and the rest.
        assert_eq!(
            r[3],
            Run {
                region: 3,
                first: 64,
                count: 256
            }
        );
        assert_eq!(
            r[4],
            Run {
                region: 3,
                first: 320,
                count: 64
            }
        );
        assert_eq!(r.len(), 5);
        // Bits past the region's pages are ignored.
        assert!(runs(0, &[0xff], 3)
            .iter()
            .all(|r| r.first + u64::from(r.count) <= 3));
    }
}
