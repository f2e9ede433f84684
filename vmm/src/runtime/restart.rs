//! Hot restart of the plugin (docs/protocol-extensions.md §9): on command
//! (`upgrade`) or after a crash (`--on-plugin-crash restart[:MAX]`), a new
//! plugin process takes over the running VM. The host keeps everything but
//! the plugin's own device state: the VM, the vcpus (never touched), guest
//! memory (never copied), objects, reservations and routes.
//!
//! The sequence, driven by [`Host::restart_round`] from the main loop:
//! 1. *Detach*: every vcpu is host-paused and kicked, its channel marked
//!    detached, and the host's copies of the old channel's plugin ends are
//!    closed (a vcpu waiting on the dead plugin sees end of file). A vcpu
//!    parks before its next `KVM_RUN` (complete state) or, if it waited for
//!    the old plugin's `Resume`, waits in [`Relink`] with that exit pending.
//! 2. *Spawn*: once every vcpu settled, the new plugin starts in a fresh
//!    jail on a new main socket, with new vcpu channels of the same kind.
//! 3. *Attach*: it sends `Attach` (the objects, their descriptors, the
//!    state blob or checkpoint memfd, per-vcpu exit serials), `GetVcpus`
//!    and `Start`.
//! 4. *Resume*: at its `Start` each vcpu gets the new channel; a vcpu that
//!    waited re-sends its pending exit there, the others leave the pause.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};
use plugin_proto::main_response::{self, attach};
use plugin_proto::MainResponse;

use super::main_handler::{MainState, Reply};
use super::objects::{Object, Refused};
use super::vcpu::{ServiceError, Transport};
use super::{new_channel, process, Host, RunError, TOKEN_SECCOMP};
use crate::launch::Launch;

/// Largest checkpoint memfd a plugin may hand over.
pub const MAX_CHECKPOINT: u64 = 64 << 20;
/// How long a new plugin may take from its start to its `Start`.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
pub use crate::config::{CrashPolicy, CRASH_WINDOW, DEFAULT_MAX_CRASHES};

/// Where a vcpu is while its plugin is replaced.
const LINK_RUNNING: u8 = 0;
/// Waiting in [`Relink::wait_channel`] with an exit to re-deliver.
const LINK_WAIT_PENDING: u8 = 1;
/// Waiting in [`Relink::wait_channel`] with nothing to re-deliver.
const LINK_WAIT_IDLE: u8 = 2;

/// One vcpu's side of a restart: the replacing plugin's channel, handed
/// from the main thread to the vcpu thread, which takes it at a safe point
/// (parked with complete state, or waiting for a `Resume` that will never
/// come).
#[derive(Default)]
pub struct Relink {
    /// Set by the main thread when the plugin goes; cleared by the vcpu
    /// thread when it took the new channel.
    detached: AtomicBool,
    next: Mutex<Option<Transport>>,
    ready: Condvar,
    /// `LINK_*`.
    link: AtomicU8,
    /// Serial of the last exit sent that needs a `Resume` (from 1; Init is
    /// not counted). Written by the vcpu thread only.
    delivered: AtomicU64,
}

impl Relink {
    pub fn detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    fn detach(&self) {
        self.detached.store(true, Ordering::Release);
    }

    /// Main thread: hands the new channel over and wakes a waiting vcpu.
    fn offer(&self, t: Transport) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        self.ready.notify_all();
    }

    /// Vcpu thread, after leaving a host pause: the new channel, if one
    /// was offered.
    pub(crate) fn take(&self) -> Option<Transport> {
        let t = self.next.lock().unwrap_or_else(|p| p.into_inner()).take();
        if t.is_some() {
            self.detached.store(false, Ordering::Release);
        }
        t
    }

    /// Vcpu thread: one more exit that waits for a `Resume` was sent.
    pub(crate) fn count_delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Vcpu thread, its plugin gone while it waited for a reply: blocks
    /// until the replacing plugin's channel is offered (or the VM stops).
    pub(crate) fn wait_channel(
        &self,
        kill: &AtomicBool,
        pending: bool,
    ) -> Result<Transport, ServiceError> {
        self.link.store(
            if pending {
                LINK_WAIT_PENDING
            } else {
                LINK_WAIT_IDLE
            },
            Ordering::Release,
        );
        let mut g = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let r = loop {
            if kill.load(Ordering::Acquire) {
                break Err(ServiceError::Killed);
            }
            if let Some(t) = g.take() {
                self.detached.store(false, Ordering::Release);
                break Ok(t);
            }
            g = self
                .ready
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        self.link.store(LINK_RUNNING, Ordering::Release);
        r
    }
}

/// What a plugin declared and what a replacing plugin is offered; part of
/// [`MainState`] (changed by main requests only).
#[derive(Default)]
pub struct RestartState {
    /// The current plugin sent `DeclareRestartable`.
    pub declared: bool,
    /// Its checkpoint memfd (never read by the host: handed to the next
    /// plugin, which validates it).
    pub checkpoint: Option<OwnedFd>,
    /// Set while a replacing plugin attaches.
    pub offer: Option<Offer>,
}

/// What `Attach` answers a replacing plugin.
pub struct Offer {
    pub kind: attach::Kind,
    pub state: Vec<u8>,
    pub delivered: Vec<u64>,
    pub redelivered: Vec<bool>,
    pub generation: u32,
    /// The new plugin sent `Start`: the main loop finishes the restart.
    pub started: bool,
}

/// `DeclareRestartable` (with the checkpoint memfd, if any).
pub fn declare(state: &mut MainState, fd: Option<OwnedFd>) -> Result<(), Refused> {
    if let Some(fd) = &fd {
        // Only a memfd: F_GET_SEALS fails on anything else.
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(|e| Refused::new(e, "declare_restartable: the checkpoint is not a memfd"))?;
        let st = nix::sys::stat::fstat(fd)
            .map_err(|e| Refused::new(e, "declare_restartable: cannot stat the checkpoint"))?;
        if st.st_size as u64 > MAX_CHECKPOINT {
            return Err(Refused::new(
                Errno::EFBIG,
                format!(
                    "declare_restartable: the checkpoint memfd has {} bytes (at most {MAX_CHECKPOINT})",
                    st.st_size
                ),
            ));
        }
    }
    let r = &mut state.restart;
    r.declared = true;
    if fd.is_some() {
        r.checkpoint = fd;
    }
    Ok(())
}

/// `Attach`: the objects and their descriptors, the device state and the
/// per-vcpu serials. `budget` says whether `n` descriptors may be sent.
pub fn attach(
    state: &mut MainState,
    vcpus: usize,
    budget: impl Fn(usize) -> bool,
    base: MainResponse,
) -> Result<Reply, Refused> {
    let mut response = base;
    let Some(offer) = &state.restart.offer else {
        // A fresh boot (or an old-style start): nothing to take over.
        response.mut_attach().kind = attach::Kind::NONE.into();
        response.mut_attach().vcpu_count = vcpus as u32;
        return Ok(Reply {
            response,
            ..Default::default()
        });
    };
    if offer.started {
        return Err(Refused::new(
            Errno::EINVAL,
            "attach: the plugin already started",
        ));
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut objects = Vec::new();
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned().map_err(|e| {
            Refused::new(
                Errno::from_raw(e.raw_os_error().unwrap_or(5)),
                "attach: dup",
            )
        })
    };
    let mut ids: Vec<u32> = state.objects.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    let n_fds = ids.len() + usize::from(state.restart.checkpoint.is_some());
    if !budget(n_fds) {
        return Err(Refused::new(
            Errno::ETOOMANYREFS,
            format!("attach: the reply would carry {n_fds} descriptors, over the budget"),
        ));
    }
    for id in ids {
        let Some(obj) = state.objects.get(id) else {
            continue;
        };
        let mut o = attach::Object::new();
        o.id = id;
        match obj {
            Object::Memory {
                start,
                length,
                dirty_log,
                mapping,
                ..
            } => {
                let Some(file) = mapping.file_offset() else {
                    continue;
                };
                o.kind = attach::object::Kind::MEMORY.into();
                o.start = *start;
                o.length = *length;
                o.dirty_log = *dirty_log;
                o.read_only = !mapping.prot() & libc::PROT_WRITE != 0;
                fds.push(dup(file.file().as_fd())?);
            }
            Object::IoEvent {
                evt,
                space,
                address,
                length,
                datamatch,
            } => {
                o.kind = attach::object::Kind::IO_EVENT.into();
                o.start = *address;
                o.length = u64::from(*length);
                o.datamatch = *datamatch;
                o.space = plugin_proto::protobuf::EnumOrUnknown::from_i32(space.to_wire());
                fds.push(dup(crate::vm::borrow_fd(evt))?);
            }
            Object::IrqEvent { trigger, gsi } => {
                o.kind = attach::object::Kind::IRQ_EVENT.into();
                o.gsi = *gsi;
                fds.push(dup(crate::vm::borrow_fd(trigger))?);
            }
        }
        objects.push(o);
    }
    if let Some(c) = &state.restart.checkpoint {
        fds.push(dup(c.as_fd())?);
    }
    let a = response.mut_attach();
    a.kind = offer.kind.into();
    a.state = offer.state.clone();
    a.vcpu_count = vcpus as u32;
    a.objects = objects;
    a.has_checkpoint = state.restart.checkpoint.is_some();
    a.delivered = offer.delivered.clone();
    a.redelivered = offer.redelivered.clone();
    a.generation = offer.generation;
    a.fast_channel = state.fast_channel;
    // Chunked like GetVcpus: SCM_MAX_FD per packet.
    let max = plugin_proto::framing::SCM_MAX_FD;
    let mut rest = fds.split_off(fds.len().min(max));
    let mut follow_ups = Vec::new();
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(max));
        let mut r = MainResponse::new();
        r.set_attach(main_response::Attach::new());
        follow_ups.push((r, std::mem::replace(&mut rest, tail)));
    }
    Ok(Reply {
        response,
        fds,
        follow_ups,
        ..Default::default()
    })
}

/// `Start` from a replacing plugin: the main loop finishes the restart.
/// `false` when no restart is under way.
pub fn start(state: &mut MainState) -> bool {
    match &mut state.restart.offer {
        Some(o) if !o.started => {
            o.started = true;
            true
        }
        _ => false,
    }
}

/// Why a restart happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Upgrade,
    Crash,
}

/// The host's side of restarts (a field of `Host`).
#[derive(Default)]
pub struct HostRestart {
    pub policy: CrashPolicy,
    /// Dups of the plugin's stdout and stderr pipe write ends, for the
    /// next plugin; dropped when the VM ends (so the readers see EOF).
    pub pipes: Option<(OwnedFd, OwnedFd)>,
    /// Pids of replaced plugins (or jail inits) not reaped yet.
    retired: Vec<nix::unistd::Pid>,
    crashes: VecDeque<Instant>,
    generation: u32,
    stage: Option<Stage>,
    /// `upgrade`: the plugin to start next (path, args).
    next_plugin: Option<(PathBuf, Vec<String>)>,
    /// Outcome of the last upgrade, for the dispatcher.
    pub upgrade_done: Option<Result<serde_json::Value, String>>,
    /// The last blackout (park to resume) and crash-to-running times.
    pub last_blackout: Option<Duration>,
    /// `upgrade`: when the vcpus were asked to park.
    pub park_began: Option<Instant>,
}

struct Stage {
    why: Why,
    state: Vec<u8>,
    began: Instant,
    phase: Phase,
}

#[derive(PartialEq)]
enum Phase {
    /// Waiting for every vcpu to park or wait for a new channel.
    Settling,
    /// The new plugin runs; waiting for its `Start`.
    Attaching(Instant),
}

impl HostRestart {
    pub fn new(policy: CrashPolicy, pipes: Option<(OwnedFd, OwnedFd)>) -> Self {
        HostRestart {
            policy,
            pipes,
            ..Default::default()
        }
    }

    pub fn busy(&self) -> bool {
        self.stage.is_some()
    }

    /// A reaped child that was a replaced plugin (ignored).
    pub fn retired_reaped(&mut self, pid: nix::unistd::Pid) -> bool {
        if let Some(i) = self.retired.iter().position(|p| *p == pid) {
            self.retired.swap_remove(i);
            return true;
        }
        false
    }
}

impl Host {
    /// The plugin ended: whether a restart begins instead of the VM ending
    /// (a restartable plugin that died while the VM runs, under
    /// `--on-plugin-crash restart`). Over MAX crashes in the window, the
    /// run's error says so.
    pub(super) fn restart_on_crash(&mut self, signaled: Option<&str>, code: i32) -> bool {
        let CrashPolicy::Restart { max, window } = self.restart.policy else {
            if self.restart.busy() {
                let how = signaled.map_or_else(
                    || format!("exited with status {code}"),
                    |s| format!("was killed by {s}"),
                );
                self.fail_restart(&format!("the new plugin {how} before it started the VM"));
                self.errors.push(RunError::AttachFailed(format!(
                    "the new plugin {} {how} before it started the VM",
                    self.config.plugin.display()
                )));
            }
            return false;
        };
        let crashed = signaled.is_some() || code != 0;
        let attaching = self.restart.busy();
        if !crashed && !attaching {
            return false;
        }
        if !attaching
            && (!self.state.restart.declared
                || !self.state.started
                || self.threads.is_empty()
                || self.dying_since.is_some())
        {
            return false;
        }
        if self.dying_since.is_some() {
            return false;
        }
        let now = Instant::now();
        while self
            .restart
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.restart.crashes.pop_front();
        }
        let how = signaled.map_or_else(
            || format!("exited with status {code}"),
            |s| format!("was killed by {s}"),
        );
        if self.restart.crashes.len() >= max as usize {
            self.errors.push(RunError::RestartLoop {
                crashes: self.restart.crashes.len() + 1,
                window,
                last: how,
            });
            return false;
        }
        self.restart.crashes.push_back(now);
        warn!(
            "the plugin {how}; restarting it ({} of at most {max} within {window:?})",
            self.restart.crashes.len()
        );
        // The checkpoint, not a blob, carries the state of a crash; a new
        // plugin that died while attaching keeps the original reason.
        let why = match &self.restart.stage {
            Some(s) => s.why,
            None => Why::Crash,
        };
        let state = self
            .restart
            .stage
            .take()
            .map(|s| s.state)
            .unwrap_or_default();
        self.detach_plugin(why, state);
        true
    }

    /// Why `upgrade` cannot replace this plugin, if it cannot.
    pub(super) fn upgrade_refusal(&self) -> Option<String> {
        if !self.config.hot_restart() {
            Some("vmm runs without --hot-restart (or --on-plugin-crash restart)".into())
        } else if !self.state.restart.declared {
            Some("the plugin did not declare it can be restarted (DeclareRestartable)".into())
        } else if self.restart.busy() {
            Some("a restart is under way".into())
        } else {
            None
        }
    }

    /// `upgrade`: with every vcpu parked and the old plugin's state in
    /// hand, replaces the plugin by `path args`.
    pub(super) fn upgrade_begin(
        &mut self,
        path: PathBuf,
        args: Vec<String>,
        state: Vec<u8>,
    ) -> Result<(), String> {
        if let Some(why) = self.upgrade_refusal() {
            return Err(why);
        }
        if let Err(e) = self.plugin.kill() {
            return Err(format!("cannot stop the old plugin: {e}"));
        }
        self.restart.retired.push(self.plugin.pid);
        self.restart.next_plugin = Some((path, args));
        self.restart.upgrade_done = None;
        self.detach_plugin(Why::Upgrade, state);
        Ok(())
    }

    /// Step 1: every vcpu off the old plugin's channel; its connections,
    /// control channel and vcpu channels closed.
    fn detach_plugin(&mut self, why: Why, state: Vec<u8>) {
        for (i, c) in self.controls.iter().enumerate() {
            c.relink.detach();
            c.host_pause();
            if let Some(k) = self.api.pause_kicks.get_mut(i) {
                *k = c.kicks();
            }
        }
        self.kick_vcpus();
        // New channels of the same kind; dropping the old ones closes the
        // host's copies of the old plugin's ends (its waiting vcpus see EOF).
        let fast = self.config.fast_channel;
        match (0..self.channels.len())
            .map(|_| new_channel(fast))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(c) => self.channels = c,
            Err(e) => {
                self.errors.push(e);
                self.enter_dying("the plugin could not be restarted");
                return;
            }
        }
        let tokens: Vec<u64> = self.connections.keys().copied().collect();
        for t in tokens {
            if let Some(fd) = self.connections.remove(&t) {
                let _ = self.epoll.delete(&fd);
                self.in_flight.dropped(t, fd);
            }
        }
        let closed = self.api.plugin_control.detach();
        if !closed.is_empty() {
            self.plugin_replies(closed);
        }
        if let Some(j) = &self.plugin.jail {
            let _ = self.epoll.delete(j.seccomp_fd());
        }
        self.state.restart.declared = false;
        self.state.restart.offer = None;
        let began = match &self.restart.stage {
            Some(s) => s.began,
            None if why == Why::Upgrade => {
                self.restart.park_began.take().unwrap_or_else(Instant::now)
            }
            None => Instant::now(),
        };
        self.restart.stage = Some(Stage {
            why,
            state,
            began,
            phase: Phase::Settling,
        });
        self.restart_round();
    }

    /// Moves a restart on; called after every round of the main loop.
    pub(super) fn restart_round(&mut self) {
        let Some(stage) = &self.restart.stage else {
            return;
        };
        if self.dying_since.is_some() {
            self.restart.stage = None;
            return;
        }
        match stage.phase {
            Phase::Settling => {
                let settled = self.controls.iter().all(|c| {
                    c.is_parked() || c.relink.link.load(Ordering::Acquire) != LINK_RUNNING
                });
                if settled {
                    if let Err(e) = self.spawn_replacement() {
                        let message = crate::error_chain(&e);
                        self.fail_restart(&message);
                        self.errors.push(e);
                    }
                }
            }
            Phase::Attaching(since) => {
                let started = self.state.restart.offer.as_ref().is_some_and(|o| o.started);
                if started {
                    self.finish_restart();
                } else if since.elapsed() > ATTACH_TIMEOUT {
                    let _ = self.plugin.kill();
                    self.fail_restart(&format!(
                        "the new plugin did not start the VM within {ATTACH_TIMEOUT:?}"
                    ));
                    self.errors.push(RunError::AttachFailed(format!(
                        "the new plugin did not start the VM within {ATTACH_TIMEOUT:?}"
                    )));
                }
            }
        }
    }

    /// While a restart runs the main loop polls it often.
    pub(super) fn restart_timeout(&self) -> Option<Duration> {
        self.restart
            .stage
            .as_ref()
            .map(|_| Duration::from_millis(1))
    }

    fn fail_restart(&mut self, why: &str) {
        warn!("hot restart failed: {why}");
        self.restart.stage = None;
        self.restart.upgrade_done = Some(Err(why.to_string()));
        self.enter_dying("the plugin could not be restarted");
    }

    /// Step 2: the new plugin, in a fresh jail (the same configuration).
    fn spawn_replacement(&mut self) -> Result<(), RunError> {
        let Some(stage) = &mut self.restart.stage else {
            return Ok(());
        };
        let offer = Offer {
            kind: match stage.why {
                Why::Upgrade => attach::Kind::UPGRADE,
                Why::Crash => attach::Kind::CRASH,
            },
            state: std::mem::take(&mut stage.state),
            delivered: self
                .controls
                .iter()
                .map(|c| c.relink.delivered.load(Ordering::Acquire))
                .collect(),
            redelivered: self
                .controls
                .iter()
                .map(|c| c.relink.link.load(Ordering::Acquire) == LINK_WAIT_PENDING)
                .collect(),
            generation: self.restart.generation + 1,
            started: false,
        };
        let (host_sock, plugin_sock) =
            super::main_handler::seqpacket_pair().map_err(super::resource("the plugin socket"))?;
        let Some((out, err)) = &self.restart.pipes else {
            return Err(RunError::AttachFailed("no output pipes kept".into()));
        };
        let stdout = out
            .try_clone()
            .map_err(|_| RunError::AttachFailed("cannot dup stdout".into()))?;
        let stderr = err
            .try_clone()
            .map_err(|_| RunError::AttachFailed("cannot dup stderr".into()))?;
        let (path, args) = self
            .restart
            .next_plugin
            .take()
            .unwrap_or_else(|| (self.config.plugin.clone(), self.config.args.clone()));
        let launch = Launch {
            path: &path,
            args: &args,
            env: &self.config.env,
            socket: &plugin_sock,
            stdout,
            stderr,
        };
        let plugin = match &self.config.jail {
            Some(j) => process::spawn_jailed(launch, j),
            None => process::spawn_unjailed(launch),
        }
        .map_err(RunError::Spawn)?;
        drop(plugin_sock);
        info!(
            "restart {}: started plugin {} (pid {})",
            offer.generation,
            path.display(),
            plugin
                .jail
                .as_ref()
                .map_or(plugin.pid.as_raw() as u32, |j| j.plugin_pid)
        );
        self.plugin = plugin;
        self.config.plugin = path;
        self.config.args = args;
        self.restart.generation = offer.generation;
        self.state.restart.offer = Some(offer);
        if let Some(j) = &self.plugin.jail {
            if let Err(e) = self.epoll.add(
                j.seccomp_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SECCOMP),
            ) {
                warn!("cannot watch the new plugin's seccomp filter: {e}");
            }
        }
        self.add_connection(host_sock)?;
        if let Some(s) = &mut self.restart.stage {
            s.phase = Phase::Attaching(Instant::now());
        }
        Ok(())
    }

    /// Step 4: the new plugin started: every vcpu takes its new channel and
    /// runs again.
    fn finish_restart(&mut self) {
        let Some(stage) = self.restart.stage.take() else {
            return;
        };
        for (i, c) in self.controls.iter().enumerate() {
            let transport = match (&self.channels[i].fast, self.state.fast_channel) {
                (Some(memfd), true) => match plugin_proto::shm::ShmChannel::map(
                    memfd.as_fd(),
                    plugin_proto::shm::Side::Host,
                ) {
                    Ok(ch) => Transport::Shm(ch),
                    Err(e) => {
                        let m = format!("cannot map the new fast channel: {e}");
                        self.fail_restart(&m);
                        self.errors.push(RunError::AttachFailed(m));
                        return;
                    }
                },
                _ => Transport::Pipe(std::sync::Arc::clone(&self.channels[i].host)),
            };
            c.relink.offer(transport);
        }
        for c in &self.controls {
            c.host_resume();
        }
        let took = stage.began.elapsed();
        self.restart.last_blackout = Some(took);
        let generation = self.restart.generation;
        let why = match stage.why {
            Why::Upgrade => "upgrade",
            Why::Crash => "crash",
        };
        info!("restart {generation} ({why}) done: the vcpus ran again after {took:?}");
        let data = serde_json::json!({
            "generation": generation,
            "reason": why,
            "pid": self.plugin_host_pid(),
            "blackout_us": took.as_micros() as u64,
        });
        if stage.why == Why::Upgrade {
            self.restart.upgrade_done = Some(Ok(data.clone()));
        }
        self.emit("plugin-restarted", data);
    }
}
