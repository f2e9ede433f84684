//! The control socket's dispatcher (`vmm::control::dispatch`) on a model
//! VM ([`ModelVm`]), and a session driver for the `control_request` fuzz
//! target and the tests: request lines through the real parser
//! (`vmm_client::proto::parse_request`) and the real dispatcher,
//! interleaved with what the VM does meanwhile (vcpus leaving the guest,
//! the plugin replying, the VM starting and stopping).
//!
//! Checked after every step: a `pause` is answered only when every vcpu it
//! names is out of the guest, each request gets exactly one response (at
//! the end, once the VM stopped and the plugin's channel closed), event
//! sequence numbers increase by one, and every line the dispatcher makes
//! serializes within the protocol's line bound.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};
use vmm::control::dispatch::{
    ControlTarget, Dispatcher, Forward, ForwardRefused, HostStatus, MigrateProgress, Phase,
    PluginReply,
};
use vmm::control::{ApiRequest, ToServer};
use vmm_client::proto::{self, ServerMessage, VcpuTid};

use crate::{invariant, ModelError};

/// What the model plugin does with forwarded commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginMode {
    /// An older plugin: never opened its control channel.
    Old,
    /// Takes at most this many commands at once.
    Takes(usize),
}

/// A VM as the dispatcher sees it, in memory.
pub struct ModelVm {
    pub phase: Phase,
    pub vcpus: u32,
    /// Host-paused vcpus.
    pub paused: Vec<bool>,
    /// Vcpus that left the guest since they were paused.
    pub out: Vec<bool>,
    pub exits: Vec<u64>,
    pub uptime: u64,
    pub plugin: PluginMode,
    /// Forwarded commands waiting for the plugin, by tag.
    pub forwarded: BTreeMap<u64, Forward>,
    pub stopped: bool,
    pub killed: bool,
    /// The snapshot being "written": its directory and device state; it is
    /// done at the next tick.
    pub snapshot: Option<(String, Option<Vec<u8>>)>,
    /// Snapshots finished (directory, device state), in order.
    pub snapshots: Vec<(String, Option<Vec<u8>>)>,
    /// Whether every vcpu was paused when the last snapshot began.
    pub snapshot_saw_all_paused: bool,
    /// Snapshots whose result `snapshot_poll` handed out.
    pub snapshots_answered: usize,
    /// `RESUMED` commands the plugin got.
    pub resumed: u64,
    /// The migration the dispatcher drives (`migrate_*`).
    pub migration: Option<ModelMigration>,
    /// Where the machine migrated to (`migrated`).
    pub migrated_to: Option<String>,
    /// Migrations abandoned (`migrate_abort`).
    pub migrations_aborted: u64,
}

/// A migration on the model: rounds are "sent" at the next poll; the
/// address scripts it: `/drop` fails the first round, `/refuse` fails
/// after the state (before `Commit`), `/commit-drop` after `Commit`;
/// anything else succeeds once `rounds_to_converge` rounds were sent.
#[derive(Debug, Default, Clone)]
pub struct ModelMigration {
    pub to: String,
    pub rounds_to_converge: u32,
    pub rounds: u32,
    pub round_pending: bool,
    /// Plugin pages per round, in order.
    pub plugin_pages: Vec<Vec<u64>>,
    /// The device state and whether every vcpu was parked at the finish.
    pub finished: Option<(Vec<u8>, bool)>,
}

impl ModelVm {
    pub fn new(vcpus: u32, plugin: PluginMode) -> Self {
        let n = vcpus as usize;
        ModelVm {
            phase: Phase::Starting,
            vcpus,
            paused: vec![false; n],
            out: vec![false; n],
            exits: vec![0; n],
            uptime: 0,
            plugin,
            forwarded: BTreeMap::new(),
            stopped: false,
            killed: false,
            snapshot: None,
            snapshots: Vec::new(),
            snapshot_saw_all_paused: false,
            snapshots_answered: 0,
            resumed: 0,
            migration: None,
            migrated_to: None,
            migrations_aborted: 0,
        }
    }

    /// Time passes: running vcpus that are not paused take exits; paused
    /// ones leave the guest.
    pub fn tick(&mut self) {
        self.uptime += 1;
        if let Some(s) = self.snapshot.take() {
            self.snapshots.push(s);
        }
        for i in 0..self.vcpus as usize {
            if self.paused[i] {
                self.out[i] = true;
            } else if self.phase == Phase::Running {
                self.exits[i] += 1;
            }
        }
    }
}

impl ControlTarget for ModelVm {
    fn phase(&self) -> Phase {
        self.phase
    }
    fn vcpu_count(&self) -> u32 {
        self.vcpus
    }
    fn uptime_ms(&self) -> u64 {
        self.uptime
    }
    fn is_paused(&self, id: u32) -> bool {
        self.paused.get(id as usize).copied().unwrap_or(false)
    }
    fn pause(&mut self, vcpus: &[u32]) {
        for &v in vcpus {
            let v = v as usize;
            if !self.paused[v] {
                self.paused[v] = true;
                self.out[v] = false;
            }
        }
    }
    fn resume(&mut self, vcpus: &[u32]) {
        for &v in vcpus {
            self.paused[v as usize] = false;
            self.out[v as usize] = false;
        }
    }
    fn out_of_guest(&self, id: u32) -> bool {
        self.phase == Phase::Stopping || self.out.get(id as usize).copied().unwrap_or(true)
    }
    fn status(&self) -> HostStatus {
        HostStatus {
            plugin_pid: 2,
            jail_init_pid: Some(1),
            plugin: "model".into(),
            vmm_pid: 1,
            exits: self.exits.clone(),
            objects: BTreeMap::from([("memory".to_string(), 1)]),
        }
    }
    fn vcpu_tids(&self) -> Vec<VcpuTid> {
        if self.phase == Phase::Starting {
            return Vec::new();
        }
        (0..self.vcpus)
            .map(|v| VcpuTid {
                vcpu: v,
                tid: 100 + v as i32,
            })
            .collect()
    }
    fn stats(&self) -> Value {
        json!({ "requests": [], "vcpus": [] })
    }
    fn stop(&mut self) {
        self.stopped = true;
        self.phase = Phase::Stopping;
    }
    fn kill(&mut self) {
        self.killed = true;
        self.phase = Phase::Stopping;
    }
    fn snapshot_begin(&mut self, dir: &str, device: Option<Vec<u8>>) -> Result<(), String> {
        if self.snapshot.is_some() {
            return Err("a snapshot is being written".into());
        }
        self.snapshot_saw_all_paused = (0..self.vcpus).all(|v| self.parked(v));
        if dir.starts_with("/fail") {
            return Err(format!("{dir}: cannot create the snapshot directory"));
        }
        self.snapshot = Some((dir.to_string(), device));
        Ok(())
    }
    fn snapshot_poll(&mut self) -> Option<Result<Value, String>> {
        if self.snapshot.is_some() || self.snapshots_answered >= self.snapshots.len() {
            return None;
        }
        self.snapshots_answered += 1;
        Some(Ok(json!({ "bytes": 4096, "ms": 0, "memory_pages": 1 })))
    }
    fn migrate_begin(&mut self, to: &str, _downtime_ms: u64) -> Result<(), String> {
        if self.migration.is_some() {
            return Err("a migration is under way".into());
        }
        if to.ends_with("/unreachable") {
            return Err(format!("cannot connect to {to}"));
        }
        self.migration = Some(ModelMigration {
            to: to.to_string(),
            rounds_to_converge: 3,
            round_pending: true,
            ..Default::default()
        });
        Ok(())
    }
    fn migrate_poll(&mut self) -> Option<MigrateProgress> {
        let m = self.migration.as_mut()?;
        if m.finished.is_some() {
            return Some(if m.to.ends_with("/refuse") {
                MigrateProgress::Failed {
                    why: "the target refused the machine: no".into(),
                    committed: false,
                }
            } else if m.to.ends_with("/commit-drop") {
                MigrateProgress::Failed {
                    why: "the target did not confirm".into(),
                    committed: true,
                }
            } else {
                MigrateProgress::Done(json!({ "downtime_ms": 1, "rounds": m.rounds }))
            });
        }
        if !std::mem::take(&mut m.round_pending) {
            return None;
        }
        m.rounds += 1;
        if m.to.ends_with("/drop") {
            return Some(MigrateProgress::Failed {
                why: "the peer closed the connection".into(),
                committed: false,
            });
        }
        Some(MigrateProgress::RoundSent)
    }
    fn migrate_round(&mut self, plugin_pages: &[u64]) -> Result<bool, String> {
        let m = self.migration.as_mut().ok_or("no migration")?;
        m.plugin_pages.push(plugin_pages.to_vec());
        if m.rounds >= m.rounds_to_converge {
            return Ok(true);
        }
        m.round_pending = true;
        Ok(false)
    }
    fn migrate_finish(&mut self, device: Vec<u8>, plugin_pages: &[u64]) -> Result<(), String> {
        let parked = (0..self.vcpus).all(|v| self.parked(v));
        let m = self.migration.as_mut().ok_or("no migration")?;
        m.plugin_pages.push(plugin_pages.to_vec());
        m.finished = Some((device, parked));
        Ok(())
    }
    fn migrate_abort(&mut self) {
        self.migrations_aborted += 1;
    }
    fn migrated(&mut self, to: &str) {
        self.migrated_to = Some(to.to_string());
        self.phase = Phase::Stopping;
    }
    fn forward(&mut self, what: Forward, tag: u64) -> Result<(), ForwardRefused> {
        if what == Forward::Resumed {
            // No reply is expected: it does not wait among the forwards.
            self.resumed += 1;
            return match self.plugin {
                PluginMode::Old => Err(ForwardRefused::NotSupported("old plugin".into())),
                PluginMode::Takes(_) => Ok(()),
            };
        }
        match self.plugin {
            PluginMode::Old => Err(ForwardRefused::NotSupported(
                "the plugin does not take control commands".into(),
            )),
            PluginMode::Takes(n) if self.forwarded.len() >= n => {
                Err(ForwardRefused::Busy(format!("{n} commands wait")))
            }
            PluginMode::Takes(_) => {
                self.forwarded.insert(tag, what);
                Ok(())
            }
        }
    }
}

/// A dispatcher on a model VM, with the checks.
pub struct ControlHarness {
    pub vm: ModelVm,
    pub dispatcher: Dispatcher,
    /// Requests sent to the dispatcher and not answered, by client.
    outstanding: BTreeMap<u64, usize>,
    /// Everything the dispatcher sent, in order.
    pub sent: Vec<ToServer>,
    last_seq: u64,
    subscribed: BTreeSet<u64>,
}

impl ControlHarness {
    pub fn new(vm: ModelVm) -> Self {
        ControlHarness {
            vm,
            dispatcher: Dispatcher::default(),
            outstanding: BTreeMap::new(),
            sent: Vec::new(),
            last_seq: 0,
            subscribed: BTreeSet::new(),
        }
    }

    /// One request line from `client`, as the control thread handles it:
    /// parsed, refused at once or handed to the dispatcher.
    pub fn line(&mut self, client: u64, line: &[u8], fds: usize) -> Result<(), ModelError> {
        match proto::parse_request(line) {
            Err(e) => {
                let out = ServerMessage::Response(e.into_response()).to_line();
                if out.len() > proto::MAX_MESSAGE {
                    return Err(invariant(format!(
                        "a refusal is {} bytes, over the line bound",
                        out.len()
                    )));
                }
            }
            Ok((id, command)) => {
                let fds = (0..fds)
                    .map(|_| {
                        nix::sys::eventfd::EventFd::from_flags(
                            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
                        )
                        .map(std::os::fd::OwnedFd::from)
                        .map_err(|source| ModelError::Sys {
                            what: "an eventfd",
                            source,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                *self.outstanding.entry(client).or_insert(0) += 1;
                self.dispatcher.handle(
                    &mut self.vm,
                    ApiRequest {
                        client,
                        id,
                        command,
                        fds,
                        fds_truncated: false,
                    },
                );
            }
        }
        self.check()
    }

    /// The VM moves on: a tick, then the dispatcher polls.
    pub fn tick(&mut self) -> Result<(), ModelError> {
        self.vm.tick();
        self.dispatcher.poll(&mut self.vm);
        self.check()
    }

    /// The plugin answers its oldest forwarded command with `reply`.
    pub fn reply(&mut self, reply: PluginReply) -> Result<(), ModelError> {
        if let Some((&tag, _)) = self.vm.forwarded.iter().next() {
            self.vm.forwarded.remove(&tag);
            self.dispatcher.replies(&mut self.vm, vec![(tag, reply)]);
        }
        self.check()
    }

    /// The vcpus start.
    pub fn start(&mut self) -> Result<(), ModelError> {
        if self.vm.phase == Phase::Starting {
            self.vm.phase = Phase::Running;
            let n = self.vm.vcpus;
            self.dispatcher
                .event(self.vm.uptime, "running", json!({ "vcpus": n }));
        }
        self.check()
    }

    /// The VM ends: stopping, the plugin's channel closes; every request
    /// must have its answer then.
    pub fn finish(&mut self) -> Result<(), ModelError> {
        self.vm.phase = Phase::Stopping;
        self.dispatcher.poll(&mut self.vm);
        let tags: Vec<u64> = self.vm.forwarded.keys().copied().collect();
        self.vm.forwarded.clear();
        self.dispatcher.replies(
            &mut self.vm,
            tags.into_iter().map(|t| (t, PluginReply::Closed)).collect(),
        );
        self.check()?;
        if let Some((client, n)) = self.outstanding.iter().find(|(_, n)| **n > 0) {
            return Err(invariant(format!(
                "client {client} has {n} request(s) never answered"
            )));
        }
        Ok(())
    }

    /// The responses sent so far (for tests).
    pub fn responses(&self) -> Vec<(u64, &proto::Response)> {
        self.sent
            .iter()
            .filter_map(|m| match m {
                ToServer::Response { client, response } => Some((*client, response)),
                _ => None,
            })
            .collect()
    }

    /// The events sent so far (for tests).
    pub fn events(&self) -> Vec<&proto::Event> {
        self.sent
            .iter()
            .filter_map(|m| match m {
                ToServer::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn check(&mut self) -> Result<(), ModelError> {
        for m in self.dispatcher.take() {
            match &m {
                ToServer::Response { client, response } => {
                    let n = self.outstanding.entry(*client).or_insert(0);
                    if *n == 0 {
                        return Err(invariant(format!(
                            "a response nobody asked for: {response:?}"
                        )));
                    }
                    *n -= 1;
                    if response.ok.is_some() == response.error.is_some() {
                        return Err(invariant(format!(
                            "a response is ok or error: {response:?}"
                        )));
                    }
                    if let Some(ok) = &response.ok {
                        if ok.get("paused").is_some() {
                            for v in ok["paused"].as_array().into_iter().flatten() {
                                let v = v.as_u64().unwrap_or(u64::MAX) as u32;
                                if !self.vm.out_of_guest(v) {
                                    return Err(invariant(format!(
                                        "pause answered while vcpu {v} is in the guest"
                                    )));
                                }
                            }
                        }
                    }
                    let line = ServerMessage::Response(response.clone()).to_line();
                    if line.len() > proto::MAX_MESSAGE {
                        return Err(invariant(format!(
                            "a response line is {} bytes",
                            line.len()
                        )));
                    }
                }
                ToServer::Event(e) => {
                    if e.seq != self.last_seq + 1 {
                        return Err(invariant(format!(
                            "event seq {} after {}",
                            e.seq, self.last_seq
                        )));
                    }
                    self.last_seq = e.seq;
                    if !proto::EVENT_NAMES.contains(&e.event.as_str()) {
                        return Err(invariant(format!("unknown event {}", e.event)));
                    }
                }
                ToServer::Subscribe { client, on } => {
                    if *on {
                        self.subscribed.insert(*client);
                    } else {
                        self.subscribed.remove(client);
                    }
                }
                ToServer::Shutdown => return Err(invariant("the dispatcher sent Shutdown")),
            }
            self.sent.push(m);
        }
        Ok(())
    }
}

/// Plays a session (the fuzz input): chunks separated by `\n`; the first
/// byte of each chooses the step and the rest is its line.
pub fn run_control_session(data: &[u8]) -> Result<(), ModelError> {
    let vcpus = u32::from(data.first().copied().unwrap_or(0) % 4) + 1;
    let mode = match data.get(1).copied().unwrap_or(0) % 3 {
        0 => PluginMode::Old,
        1 => PluginMode::Takes(2),
        _ => PluginMode::Takes(64),
    };
    let mut h = ControlHarness::new(ModelVm::new(vcpus, mode));
    for chunk in data.get(2..).unwrap_or_default().split(|&b| b == b'\n') {
        let Some((&op, rest)) = chunk.split_first() else {
            continue;
        };
        let client = u64::from(op >> 4);
        match op & 0xf {
            0..=7 => h.line(client, rest, 0)?,
            8 => h.line(client, rest, 1)?,
            9 => h.tick()?,
            10 => h.reply(PluginReply::State(rest.to_vec()))?,
            11 => h.start()?,
            12 => h.reply(PluginReply::Ok(json!({ "count": rest.len() })))?,
            13 => h.reply(PluginReply::Refused {
                errno: i32::from(rest.first().copied().unwrap_or(22)),
                message: String::from_utf8_lossy(rest).into_owned(),
            })?,
            14 => h.reply(PluginReply::TimedOut(std::time::Duration::from_secs(5)))?,
            _ => {
                h.vm.phase = Phase::Stopping;
                h.tick()?;
            }
        }
    }
    h.finish()
}
