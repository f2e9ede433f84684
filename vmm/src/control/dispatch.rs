//! The command dispatcher (docs/control-api.md): plain code over
//! [`ControlTarget`], the VM as the commands see it. The main loop runs it
//! over the real host; tests and the `control_request` fuzz target run it
//! over the model VM of `vmm-model`.
//!
//! Nothing here blocks: a `pause` is answered once every named vcpu is out
//! of the guest ([`Dispatcher::poll`], called by the main loop after every
//! round), a forwarded command once the plugin replied
//! ([`Dispatcher::replies`]).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};
use vmm_client::proto::{Command, ErrorCode, Event, Id, Response, Status, VcpuTid, VcpuTids};

use super::{ApiRequest, ToServer};

mod migrate;
pub use migrate::MigrateProgress;
mod upgrade;

/// A command forwarded to the plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum Forward {
    PowerButton,
    SleepButton,
    Plugin {
        name: String,
        args: Value,
    },
    /// `SAVE_STATE`: the plugin's device state for a snapshot.
    SaveState,
    /// `RESUMED`: the snapshot is done (no reply expected).
    Resumed,
    /// `DIRTY_PAGES` (§8): the pages the plugin wrote since the last one.
    DirtyPages,
}

/// Why a command could not be forwarded; the message names the cause.
#[derive(Debug, Clone, PartialEq)]
pub enum ForwardRefused {
    /// The plugin never opened its control channel (an older plugin).
    NotSupported(String),
    /// Too many commands wait for the plugin's reply.
    Busy(String),
    /// Sending it failed.
    Failed(String),
}

/// The plugin's answer to a forwarded command.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginReply {
    Ok(Value),
    /// The device state, answering `SaveState`.
    State(Vec<u8>),
    /// The plugin's written pages, answering `DirtyPages`.
    DirtyPages(Vec<u64>),
    Refused {
        errno: i32,
        message: String,
    },
    /// No answer within this long.
    TimedOut(std::time::Duration),
    /// The channel closed before an answer.
    Closed,
}

/// The VM's life as the control socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The vcpus do not run yet.
    Starting,
    /// The vcpus run (some or all may be host-paused).
    Running,
    /// The VM is shutting down.
    Stopping,
}

/// What `status` reports that only the host knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostStatus {
    pub plugin_pid: i32,
    pub jail_init_pid: Option<i32>,
    pub plugin: String,
    pub vmm_pid: u32,
    pub exits: Vec<u64>,
    pub objects: BTreeMap<String, u64>,
}

/// The VM the commands act on.
pub trait ControlTarget {
    fn phase(&self) -> Phase;
    fn vcpu_count(&self) -> u32;
    /// Milliseconds since vmm started.
    fn uptime_ms(&self) -> u64;
    /// Whether vcpu `id` is host-paused (asked to stay out of the guest).
    fn is_paused(&self, id: u32) -> bool;
    /// Host-pauses the vcpus: each parks before its next `KVM_RUN` and is
    /// kicked out of the guest. Idempotent.
    fn pause(&mut self, vcpus: &[u32]);
    /// Lets the vcpus go again. Idempotent.
    fn resume(&mut self, vcpus: &[u32]);
    /// Whether host-paused vcpu `id` runs no guest instruction any more
    /// (parked, kicked out of `KVM_RUN` on its way to park, or ended).
    fn out_of_guest(&self, id: u32) -> bool;
    fn status(&self) -> HostStatus;
    /// The vcpu threads' ids (empty before they exist).
    fn vcpu_tids(&self) -> Vec<VcpuTid>;
    /// The run's statistics so far.
    fn stats(&self) -> Value;
    /// The orderly shutdown, as when the VM ends on its own.
    fn stop(&mut self);
    /// Ends the VM at once.
    fn kill(&mut self);
    fn forward(&mut self, what: Forward, tag: u64) -> Result<(), ForwardRefused>;
    /// Whether vcpu `id` is parked where its state is complete (after a
    /// `KVM_RUN` with `immediate_exit` returned), or ended.
    fn parked(&self, id: u32) -> bool {
        self.out_of_guest(id)
    }
    /// With every vcpu parked: captures the machine's state and starts
    /// writing the snapshot to `dir` (`device`: the plugin's blob, `None`
    /// without device state). Returns at once; [`Self::snapshot_poll`]
    /// tells when it is done.
    fn snapshot_begin(&mut self, dir: &str, device: Option<Vec<u8>>) -> Result<(), String> {
        let _ = (dir, device);
        Err("this VM cannot be snapshotted".into())
    }
    /// The snapshot's result once written: `{"bytes", "memory_pages",
    /// "ms"}` or why it failed.
    fn snapshot_poll(&mut self) -> Option<Result<Value, String>> {
        None
    }
    /// Starts a migration to `to` (the plugin's tracking began): dirty
    /// logging on, the worker connects and sends the header and round 0.
    fn migrate_begin(&mut self, to: &str, downtime_ms: u64) -> Result<(), String> {
        let _ = (to, downtime_ms);
        Err("this VM cannot be migrated".into())
    }
    /// The migration's news, if any.
    fn migrate_poll(&mut self) -> Option<MigrateProgress> {
        None
    }
    /// After a round: the plugin's pages and KVM's dirty log; `true`: stop
    /// the vcpus and finish, `false`: another round is being sent.
    fn migrate_round(&mut self, plugin_pages: &[u64]) -> Result<bool, String> {
        let _ = plugin_pages;
        Err("this VM cannot be migrated".into())
    }
    /// Every vcpu parked: the state, the last pages, the handshake.
    fn migrate_finish(&mut self, device: Vec<u8>, plugin_pages: &[u64]) -> Result<(), String> {
        let _ = (device, plugin_pages);
        Err("this VM cannot be migrated".into())
    }
    /// Drops the migration's connection and worker.
    fn migrate_abort(&mut self) {}
    /// The target runs the machine: this VM ends ("migrated to ADDR").
    fn migrated(&mut self, to: &str) {
        let _ = to;
    }
    /// `upgrade` (hot restart, docs/protocol-extensions.md §9): why the
    /// plugin cannot be replaced, if it cannot; else the vcpus are about
    /// to be parked (the blackout starts).
    fn upgrade_prepare(&mut self) -> Option<String> {
        Some("this VM cannot replace its plugin".into())
    }
    /// With every vcpu parked and the old plugin's state in hand: replaces
    /// the plugin. Returns at once; [`Self::upgrade_poll`] tells when the
    /// new plugin runs.
    fn upgrade_begin(
        &mut self,
        plugin: &str,
        args: &[String],
        state: Vec<u8>,
    ) -> Result<(), String> {
        let _ = (plugin, args, state);
        Err("this VM cannot replace its plugin".into())
    }
    /// The upgrade's result once the new plugin started the vcpus again.
    fn upgrade_poll(&mut self) -> Option<Result<Value, String>> {
        None
    }
}

/// Where a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapStage {
    /// Waiting for every vcpu to park.
    Parking,
    /// Waiting for the plugin's device state (the forward's tag).
    Device(u64),
    /// The host writes it.
    Writing,
}

struct PendingSnapshot {
    client: u64,
    id: Id,
    dir: String,
    without_device_state: bool,
    /// Vcpus host-paused before the snapshot (they stay paused).
    was_paused: Vec<u32>,
    stage: SnapStage,
    /// SAVE_STATE went out: RESUMED follows.
    asked_plugin: bool,
}

struct PendingPause {
    client: u64,
    id: Id,
    vcpus: Vec<u32>,
}

/// The command dispatcher's state: event sequence, pauses waiting for
/// their vcpus, commands waiting for the plugin.
#[derive(Default)]
pub struct Dispatcher {
    seq: u64,
    out: Vec<ToServer>,
    pauses: Vec<PendingPause>,
    forwards: BTreeMap<u64, (u64, Id, &'static str)>,
    next_tag: u64,
    snapshot: Option<PendingSnapshot>,
    migration: Option<migrate::PendingMigration>,
    upgrade: Option<upgrade::PendingUpgrade>,
}

fn error(client: u64, id: Id, code: ErrorCode, message: impl Into<String>) -> ToServer {
    ToServer::Response {
        client,
        response: Response::error(id, code, message),
    }
}

/// The `invalid-state` refusal of `command` outside `Running`: "the VM is
/// starting (`why_starting`)" or "the VM is stopping".
fn not_running(
    phase: Phase,
    client: u64,
    id: &Id,
    command: &str,
    why_starting: &str,
) -> Option<ToServer> {
    let what = match phase {
        Phase::Running => return None,
        Phase::Starting => format!("starting ({why_starting})"),
        Phase::Stopping => "stopping".to_string(),
    };
    Some(error(
        client,
        id.clone(),
        ErrorCode::InvalidState,
        format!("{command}: the VM is {what}"),
    ))
}

fn ok(client: u64, id: Id, value: Value) -> ToServer {
    ToServer::Response {
        client,
        response: Response::ok(id, value),
    }
}

/// The `state` of `status`.
pub fn state_name(phase: Phase, all_paused: bool) -> &'static str {
    match phase {
        Phase::Starting => "starting",
        Phase::Running if all_paused => "paused",
        Phase::Running => "running",
        Phase::Stopping => "stopping",
    }
}

impl Dispatcher {
    /// The `busy` refusal of `command`, one that takes the whole machine
    /// (snapshot, migrate, upgrade), while another one is under way.
    fn machine_busy(&self, client: u64, id: &Id, command: &str) -> Option<ToServer> {
        let why = if let Some(m) = &self.migration {
            format!("a migration to {} is under way", m.to)
        } else if let Some(s) = &self.snapshot {
            format!("a snapshot into {} is being taken", s.dir)
        } else if self.upgrade.is_some() {
            "an upgrade is under way".into()
        } else {
            return None;
        };
        Some(error(
            client,
            id.clone(),
            ErrorCode::Busy,
            format!("{command}: {why}"),
        ))
    }

    /// What to send to the control thread, in order.
    pub fn take(&mut self) -> Vec<ToServer> {
        std::mem::take(&mut self.out)
    }

    /// Pauses are waiting for their vcpus to leave the guest (the main
    /// loop polls often then).
    pub fn waiting(&self) -> bool {
        !self.pauses.is_empty()
            || self.snapshot.is_some()
            || self.migration.is_some()
            || self.upgrade.is_some()
    }

    /// The last event's sequence number (0 before the first).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Pushes an event to the subscribers.
    pub fn event(&mut self, uptime_ms: u64, name: &'static str, data: Value) {
        self.seq += 1;
        self.out.push(ToServer::Event(Event {
            event: name.to_string(),
            seq: self.seq,
            uptime_ms,
            data,
        }));
    }

    /// Carries out one request (or starts to: see [`Self::poll`]).
    pub fn handle(&mut self, vm: &mut impl ControlTarget, req: ApiRequest) {
        let ApiRequest {
            client,
            id,
            command,
            fds,
            fds_truncated,
        } = req;
        let name = command.name();
        if !fds.is_empty() || fds_truncated {
            // Closed here: no command of this protocol version takes any.
            drop(fds);
            self.out.push(error(
                client,
                id,
                ErrorCode::BadDescriptors,
                format!("{name}: takes no descriptors (the request carried some; they are closed)"),
            ));
            return;
        }
        let phase = vm.phase();
        let n = vm.vcpu_count();
        match command {
            Command::Status => {
                let paused: Vec<u32> = (0..n).filter(|&i| vm.is_paused(i)).collect();
                let h = vm.status();
                let status = Status {
                    state: state_name(phase, n > 0 && paused.len() == n as usize).to_string(),
                    vcpus: n,
                    paused_vcpus: paused,
                    plugin_pid: h.plugin_pid,
                    jail_init_pid: h.jail_init_pid,
                    plugin: h.plugin,
                    vmm_pid: h.vmm_pid,
                    uptime_ms: vm.uptime_ms(),
                    exits: h.exits,
                    objects: h.objects,
                };
                let v = serde_json::to_value(status).unwrap_or(Value::Null);
                self.out.push(ok(client, id, v));
            }
            Command::Pause { vcpus } | Command::Resume { vcpus } => {
                let pause = name == "pause";
                if let Some(e) = not_running(phase, client, &id, name, "its vcpus do not run yet") {
                    self.out.push(e);
                    return;
                }
                let list: Vec<u32> = match vcpus {
                    None => (0..n).collect(),
                    Some(v) => {
                        if let Some(bad) = v.iter().find(|&&i| i >= n) {
                            self.out.push(error(
                                client,
                                id,
                                ErrorCode::BadArgument,
                                format!(
                                    "{name}: there is no vcpu {bad} (the VM has {n}: 0 to {})",
                                    n.saturating_sub(1)
                                ),
                            ));
                            return;
                        }
                        v.into_iter()
                            .collect::<BTreeSet<u32>>()
                            .into_iter()
                            .collect()
                    }
                };
                if pause {
                    vm.pause(&list);
                    self.pauses.push(PendingPause {
                        client,
                        id,
                        vcpus: list,
                    });
                    self.poll(vm);
                } else {
                    // A pause still waiting on one of these vcpus can never
                    // be true any more.
                    let mut i = 0;
                    while i < self.pauses.len() {
                        if self.pauses[i].vcpus.iter().any(|v| list.contains(v)) {
                            let p = self.pauses.remove(i);
                            self.out.push(error(
                                p.client,
                                p.id,
                                ErrorCode::InvalidState,
                                "pause: resumed before every vcpu had left the guest",
                            ));
                        } else {
                            i += 1;
                        }
                    }
                    vm.resume(&list);
                    self.out
                        .push(ok(client, id, json!({ "resumed": list.clone() })));
                    self.event(vm.uptime_ms(), "resumed", json!({ "vcpus": list }));
                }
            }
            Command::Stop => {
                if phase != Phase::Stopping {
                    vm.stop();
                }
                self.out
                    .push(ok(client, id, json!({ "state": "stopping" })));
            }
            Command::Kill => {
                vm.kill();
                self.out.push(ok(
                    client,
                    id,
                    json!({ "state": "stopping", "killed": true }),
                ));
            }
            Command::VcpuTids => {
                let tids = VcpuTids {
                    pid: vm.status().vmm_pid,
                    vcpus: vm.vcpu_tids(),
                };
                let v = serde_json::to_value(tids).unwrap_or(Value::Null);
                self.out.push(ok(client, id, v));
            }
            Command::Stats => {
                let v = vm.stats();
                self.out.push(ok(client, id, v));
            }
            Command::Events { subscribe } => {
                self.out.push(ToServer::Subscribe {
                    client,
                    on: subscribe,
                });
                self.out.push(ok(
                    client,
                    id,
                    json!({ "subscribed": subscribe, "seq": self.seq }),
                ));
            }
            Command::PowerButton | Command::SleepButton | Command::Plugin { .. } => {
                let what = match command {
                    Command::PowerButton => Forward::PowerButton,
                    Command::SleepButton => Forward::SleepButton,
                    Command::Plugin { name, args } => Forward::Plugin { name, args },
                    _ => return,
                };
                let tag = self.next_tag;
                self.next_tag += 1;
                match vm.forward(what, tag) {
                    Ok(()) => {
                        self.forwards.insert(tag, (client, id, name));
                    }
                    Err(e) => {
                        let (code, why) = match e {
                            ForwardRefused::NotSupported(m) => (ErrorCode::NotSupported, m),
                            ForwardRefused::Busy(m) => (ErrorCode::Busy, m),
                            ForwardRefused::Failed(m) => (ErrorCode::PluginError, m),
                        };
                        self.out
                            .push(error(client, id, code, format!("{name}: {why}")));
                    }
                }
            }
            Command::Upgrade { plugin, args } => {
                if let Some(e) = not_running(
                    phase,
                    client,
                    &id,
                    "upgrade",
                    "only a running VM can replace its plugin",
                ) {
                    self.out.push(e);
                    return;
                }
                self.upgrade_start(vm, client, id, plugin, args);
            }
            Command::Snapshot {
                dir,
                without_device_state,
            } => {
                if let Some(e) = not_running(
                    phase,
                    client,
                    &id,
                    "snapshot",
                    "only a running or paused VM can be snapshotted",
                )
                .or_else(|| self.machine_busy(client, &id, "snapshot"))
                {
                    self.out.push(e);
                    return;
                }
                let was_paused: Vec<u32> = (0..n).filter(|&i| vm.is_paused(i)).collect();
                let all: Vec<u32> = (0..n).collect();
                vm.pause(&all);
                self.event(
                    vm.uptime_ms(),
                    "snapshot-started",
                    json!({ "dir": dir.clone() }),
                );
                self.snapshot = Some(PendingSnapshot {
                    client,
                    id,
                    dir,
                    without_device_state,
                    was_paused,
                    stage: SnapStage::Parking,
                    asked_plugin: false,
                });
                self.poll(vm);
            }
            Command::Migrate { to, downtime_ms } => self.migrate(vm, client, id, to, downtime_ms),
        }
    }

    /// Ends the snapshot: the vcpus that were not paused before go again,
    /// the plugin hears `RESUMED` if it was asked for its state, the client
    /// gets its answer.
    fn snapshot_end(
        &mut self,
        vm: &mut impl ControlTarget,
        result: Result<Value, (ErrorCode, String)>,
    ) {
        let Some(s) = self.snapshot.take() else {
            return;
        };
        if vm.phase() != Phase::Stopping {
            let resume: Vec<u32> = (0..vm.vcpu_count())
                .filter(|v| !s.was_paused.contains(v))
                .collect();
            vm.resume(&resume);
        }
        if s.asked_plugin {
            let tag = self.next_tag;
            self.next_tag += 1;
            // No reply is expected; a plugin that is gone cannot hear it.
            let _ = vm.forward(Forward::Resumed, tag);
        }
        match result {
            Ok(mut v) => {
                if let Value::Object(o) = &mut v {
                    o.insert("dir".into(), Value::from(s.dir.clone()));
                }
                self.event(vm.uptime_ms(), "snapshot-done", v.clone());
                self.out.push(ok(s.client, s.id, v));
            }
            Err((code, why)) => {
                self.event(
                    vm.uptime_ms(),
                    "snapshot-done",
                    json!({ "dir": s.dir, "error": why.clone() }),
                );
                self.out
                    .push(error(s.client, s.id, code, format!("snapshot: {why}")));
            }
        }
    }

    /// Moves the snapshot on (called from [`Self::poll`] and when the
    /// plugin's state arrived).
    fn snapshot_poll(&mut self, vm: &mut impl ControlTarget) {
        let Some(s) = &mut self.snapshot else {
            return;
        };
        if vm.phase() == Phase::Stopping {
            self.snapshot_end(
                vm,
                Err((ErrorCode::InvalidState, "the VM is stopping".into())),
            );
            return;
        }
        match s.stage {
            SnapStage::Parking => {
                if !(0..vm.vcpu_count()).all(|v| vm.parked(v)) {
                    return;
                }
                if s.without_device_state {
                    s.stage = SnapStage::Writing;
                    let dir = s.dir.clone();
                    if let Err(why) = vm.snapshot_begin(&dir, None) {
                        self.snapshot_end(vm, Err((ErrorCode::Internal, why)));
                    }
                    return;
                }
                let tag = self.next_tag;
                self.next_tag += 1;
                match vm.forward(Forward::SaveState, tag) {
                    Ok(()) => {
                        s.stage = SnapStage::Device(tag);
                        s.asked_plugin = true;
                    }
                    Err(ForwardRefused::NotSupported(_)) => self.snapshot_end(
                        vm,
                        Err((ErrorCode::NotSupported, "the plugin does not take part in snapshots (it never opened its                              control channel); add without_device_state to snapshot without                              its device state"
                            .into())),
                    ),
                    Err(
                        ForwardRefused::Busy(m) | ForwardRefused::Failed(m),
                    ) => self.snapshot_end(
                        vm,
                        Err((
                            ErrorCode::PluginError,
                            format!("cannot ask the plugin for its device state: {m}"),
                        )),
                    ),
                }
            }
            SnapStage::Device(_) => {}
            SnapStage::Writing => {
                if let Some(r) = vm.snapshot_poll() {
                    self.snapshot_end(vm, r.map_err(|why| (ErrorCode::Internal, why)));
                }
            }
        }
    }

    /// The plugin's answer to SAVE_STATE.
    fn snapshot_state(&mut self, vm: &mut impl ControlTarget, reply: PluginReply) {
        let Some(s) = &mut self.snapshot else {
            return;
        };
        let plugin = ErrorCode::PluginError;
        let why = match reply {
            PluginReply::State(blob) => {
                s.stage = SnapStage::Writing;
                let dir = s.dir.clone();
                match vm.snapshot_begin(&dir, Some(blob)) {
                    Ok(()) => return,
                    Err(why) => (ErrorCode::Internal, why),
                }
            }
            PluginReply::Ok(_) | PluginReply::DirtyPages(_) => (
                plugin,
                "the plugin answered SAVE_STATE without a device state".into(),
            ),
            PluginReply::Refused { errno, message } => (
                plugin,
                format!(
                "the plugin refused to hand over its device state: {message} ({}, errno {errno})",
                nix::errno::Errno::from_raw(errno).desc()
            ),
            ),
            PluginReply::TimedOut(after) => (
                ErrorCode::Timeout,
                format!("the plugin did not hand over its device state within {after:?}"),
            ),
            PluginReply::Closed => (
                plugin,
                "the plugin closed its control channel before handing over its device state".into(),
            ),
        };
        self.snapshot_end(vm, Err(why));
    }

    /// Answers the pauses whose vcpus all left the guest, and fails those
    /// the VM's end overtook.
    pub fn poll(&mut self, vm: &mut impl ControlTarget) {
        self.snapshot_poll(vm);
        self.migration_poll(vm);
        self.upgrade_poll(vm);
        let phase = vm.phase();
        let mut i = 0;
        while i < self.pauses.len() {
            let p = &self.pauses[i];
            if phase == Phase::Stopping {
                let p = self.pauses.remove(i);
                self.out.push(error(
                    p.client,
                    p.id,
                    ErrorCode::InvalidState,
                    "pause: the VM is stopping",
                ));
                continue;
            }
            if p.vcpus.iter().all(|&v| vm.out_of_guest(v)) {
                let p = self.pauses.remove(i);
                self.out
                    .push(ok(p.client, p.id, json!({ "paused": p.vcpus.clone() })));
                self.event(vm.uptime_ms(), "paused", json!({ "vcpus": p.vcpus }));
                continue;
            }
            i += 1;
        }
    }

    /// The VM ended (`why`: its plugin exited, vmm tears the run down):
    /// every request still outstanding is answered now, naming why, so
    /// that the answers go out before the control socket closes and no
    /// client sees the connection close instead. `vm` must be in
    /// [`Phase::Stopping`]. Nothing is outstanding afterwards.
    pub fn ended(&mut self, vm: &mut impl ControlTarget, why: &str) {
        self.migration_ended(vm, why);
        self.upgrade_ended(vm, why);
        // Snapshots and pauses fail as the VM's stop overtakes them.
        self.poll(vm);
        self.snapshot_end(
            vm,
            Err((ErrorCode::InvalidState, format!("the VM ended ({why})"))),
        );
        for p in std::mem::take(&mut self.pauses) {
            self.out.push(error(
                p.client,
                p.id,
                ErrorCode::InvalidState,
                format!("pause: the VM ended ({why})"),
            ));
        }
        for (_, (client, id, name)) in std::mem::take(&mut self.forwards) {
            self.out.push(error(
                client,
                id,
                ErrorCode::PluginError,
                format!("{name}: the VM ended before the plugin answered ({why})"),
            ));
        }
    }

    /// The plugin's replies to forwarded commands (and timeouts).
    pub fn replies(&mut self, vm: &mut impl ControlTarget, replies: Vec<(u64, PluginReply)>) {
        for (tag, reply) in replies {
            if self.migration_tag(tag) {
                self.migration_reply(vm, reply);
                continue;
            }
            if self
                .snapshot
                .as_ref()
                .is_some_and(|s| s.stage == SnapStage::Device(tag))
            {
                self.snapshot_state(vm, reply);
                continue;
            }
            if self.upgrade_owns(tag) {
                self.upgrade_state(vm, reply);
                continue;
            }
            let Some((client, id, name)) = self.forwards.remove(&tag) else {
                continue;
            };
            self.out.push(match reply {
                PluginReply::Ok(v) => ok(client, id, v),
                PluginReply::State(_) | PluginReply::DirtyPages(_) => ok(client, id, Value::Null),
                PluginReply::Refused { errno, message } => error(
                    client,
                    id,
                    ErrorCode::PluginError,
                    format!(
                        "{name}: the plugin refused it: {message} ({}, errno {errno})",
                        nix::errno::Errno::from_raw(errno).desc()
                    ),
                ),
                PluginReply::TimedOut(after) => error(
                    client,
                    id,
                    ErrorCode::Timeout,
                    format!("{name}: the plugin did not answer within {after:?}"),
                ),
                PluginReply::Closed => error(
                    client,
                    id,
                    ErrorCode::PluginError,
                    format!("{name}: the plugin closed its control channel before answering"),
                ),
            });
        }
    }
}
