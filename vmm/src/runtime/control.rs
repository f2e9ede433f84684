//! The control socket's side of the main loop: requests from the control
//! thread are carried out by the dispatcher (`crate::control::dispatch`)
//! over the `Host` as its [`ControlTarget`]; answers and events go back.
//! Host-level pause and resume act on the vcpus' `VcpuControl`s; the
//! commands for the plugin go through its control channel
//! ([`PluginControl`]).

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::time::Instant;

use log::{error, warn};
use nix::sys::epoll::EpollTimeout;
use serde_json::Value;
use vmm_client::proto::VcpuTid;

use super::plugin_control::{ForwardError, PluginControl, Reply};
use super::{vcpu, Host, RunError};
use crate::control::dispatch::{
    ControlTarget, Dispatcher, Forward, ForwardRefused, HostStatus, Phase, PluginReply,
};
use crate::control::Link;

/// The control state the main loop keeps.
pub(super) struct Api {
    link: Option<Link>,
    dispatcher: Dispatcher,
    started_at: Instant,
    /// Events of the host not yet handed to the dispatcher: name, data,
    /// uptime.
    events: Vec<(&'static str, Value, u64)>,
    /// Each vcpu's kick count read right after its host pause was set.
    pub(super) pause_kicks: Vec<u64>,
    /// The vcpus whose `vcpu-stopped` event went out.
    reported: Vec<bool>,
    /// The plugin's control channel (commands forwarded to it).
    pub(super) plugin_control: PluginControl,
}

impl Api {
    pub(super) fn new(link: Option<Link>, started_at: Instant) -> Self {
        Api {
            link,
            dispatcher: Dispatcher::default(),
            started_at,
            events: Vec::new(),
            pause_kicks: Vec::new(),
            reported: Vec::new(),
            plugin_control: PluginControl::default(),
        }
    }

    /// Whether vmm serves a control socket.
    pub(super) fn enabled(&self) -> bool {
        self.link.is_some()
    }

    /// The descriptor the main loop watches for requests.
    pub(super) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.link.as_ref().map(|l| l.fd())
    }

    fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started_at.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The main loop's timeout, shortened while a pause waits for its
    /// vcpus (polled every millisecond) or a forwarded command for its
    /// reply deadline.
    pub(super) fn shorten(&self, timeout: EpollTimeout) -> EpollTimeout {
        let mut ms = i32::from(timeout);
        let mut at_most = |m: i32| {
            if ms < 0 || m < ms {
                ms = m;
            }
        };
        if self.dispatcher.waiting() {
            at_most(1);
        }
        if let Some(deadline) = self.plugin_control.next_deadline() {
            let left = deadline.saturating_duration_since(Instant::now());
            at_most(i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1));
        }
        if ms < 0 {
            EpollTimeout::NONE
        } else {
            EpollTimeout::try_from(ms as u64).unwrap_or(EpollTimeout::NONE)
        }
    }
}

fn reply(r: Reply) -> PluginReply {
    match r {
        Reply::Ok(v) => PluginReply::Ok(v),
        Reply::State(b) => PluginReply::State(b),
        Reply::DirtyPages(p) => PluginReply::DirtyPages(p),
        Reply::Refused { errno, message } => PluginReply::Refused { errno, message },
        Reply::TimedOut => PluginReply::TimedOut(super::plugin_control::REPLY_TIMEOUT),
        Reply::Closed => PluginReply::Closed,
    }
}

impl Host {
    /// The plugin's pid as the host sees it.
    pub(super) fn plugin_host_pid(&self) -> i32 {
        match &self.plugin.jail {
            Some(j) => j.plugin_pid as i32,
            None => self.plugin.pid.as_raw(),
        }
    }

    /// Queues an event for the control socket's subscribers.
    pub(super) fn emit(&mut self, name: &'static str, data: Value) {
        if self.api.enabled() {
            let t = self.api.uptime_ms();
            self.api.events.push((name, data, t));
        }
    }

    /// `vcpu-stopped` for every vcpu whose run ended since the last call.
    pub(super) fn report_stopped_vcpus(&mut self) {
        if !self.api.enabled() {
            return;
        }
        self.api.reported.resize(self.controls.len(), false);
        for id in 0..self.controls.len() {
            if self.api.reported[id] {
                continue;
            }
            if let Some(reason) = self.controls[id].stop_reason() {
                self.api.reported[id] = true;
                self.emit(
                    "vcpu-stopped",
                    serde_json::json!({ "vcpu": id, "reason": reason }),
                );
            }
        }
    }

    fn drain_events(&mut self) {
        for (name, data, t) in std::mem::take(&mut self.api.events) {
            self.api.dispatcher.event(t, name, data);
        }
    }

    /// Requests from the control thread.
    pub(super) fn on_control(&mut self) {
        let Some(link) = &self.api.link else {
            return;
        };
        let requests = link.take();
        self.drain_events();
        let mut d = std::mem::take(&mut self.api.dispatcher);
        for r in requests {
            d.handle(self, r);
        }
        self.api.dispatcher = d;
    }

    /// Replies that did not come from the channel (it was closed for a
    /// hot restart), for the dispatcher.
    pub(super) fn plugin_replies(&mut self, replies: Vec<(u64, Reply)>) {
        let mut d = std::mem::take(&mut self.api.dispatcher);
        d.replies(
            self,
            replies.into_iter().map(|(t, r)| (t, reply(r))).collect(),
        );
        self.api.dispatcher = d;
    }

    /// The plugin's control channel is readable.
    pub(super) fn on_plugin_control(&mut self) {
        let replies = self.api.plugin_control.on_readable();
        let mut d = std::mem::take(&mut self.api.dispatcher);
        d.replies(
            self,
            replies.into_iter().map(|(t, r)| (t, reply(r))).collect(),
        );
        self.api.dispatcher = d;
    }

    /// After every round of the main loop: overdue replies, pauses whose vcpus left the guest,
    /// and everything queued sent to the control thread.
    pub(super) fn control_round(&mut self) {
        if !self.api.enabled() {
            return;
        }
        let expired = self.api.plugin_control.expire(Instant::now());
        if !expired.is_empty() {
            let mut d = std::mem::take(&mut self.api.dispatcher);
            d.replies(
                self,
                expired.into_iter().map(|(t, r)| (t, reply(r))).collect(),
            );
            self.api.dispatcher = d;
        }
        self.drain_events();
        if self.api.dispatcher.waiting() {
            let mut d = std::mem::take(&mut self.api.dispatcher);
            d.poll(self);
            self.api.dispatcher = d;
            self.drain_events();
        }
        let out = self.api.dispatcher.take();
        if let Some(link) = &self.api.link {
            link.send(out);
        }
    }

    /// The run's last control round (teardown): whatever ended the run,
    /// the VM is stopping for the dispatcher, every request still
    /// outstanding (a migration, a snapshot, a pause, a forwarded command
    /// whose plugin is gone) is answered naming why, and everything queued
    /// goes to the control thread, which writes it out before the socket
    /// closes ([`crate::control::ControlSocket`]'s drop). Before this, a
    /// plugin that exited on its own during a migration ended vmm with the
    /// request unanswered: the client saw "vmm closed the connection".
    pub(super) fn control_end(&mut self) {
        if !self.api.enabled() {
            return;
        }
        self.dying_since.get_or_insert_with(Instant::now);
        let why = match &self.plugin_end {
            Some(super::PluginEnd::Exited(code)) => format!("the plugin exited with status {code}"),
            Some(super::PluginEnd::Signaled(sig)) => format!("the plugin was killed by {sig}"),
            None => "vmm is shutting down".to_string(),
        };
        // The channel's waiting commands are the dispatcher's to answer.
        let _ = self.api.plugin_control.detach();
        self.drain_events();
        let mut d = std::mem::take(&mut self.api.dispatcher);
        d.ended(self, &why);
        self.api.dispatcher = d;
        self.control_round();
    }

    fn kick_vcpu(&self, id: usize) {
        use vmm_sys_util::signal::Killable;
        if let Some(t) = self.threads.get(id) {
            if !t.is_finished() {
                if let Err(e) = t.kill(vcpu::kick_signal()) {
                    warn!("cannot kick vcpu {id}: {e}");
                }
            }
        }
    }
}

impl ControlTarget for Host {
    fn phase(&self) -> Phase {
        if self.dying_since.is_some() || self.plugin_end.is_some() {
            Phase::Stopping
        } else if self.threads.is_empty() {
            Phase::Starting
        } else {
            Phase::Running
        }
    }

    fn vcpu_count(&self) -> u32 {
        self.controls.len() as u32
    }

    fn uptime_ms(&self) -> u64 {
        self.api.uptime_ms()
    }

    fn is_paused(&self, id: u32) -> bool {
        self.controls
            .get(id as usize)
            .is_some_and(|c| c.is_host_paused())
    }

    fn pause(&mut self, vcpus: &[u32]) {
        for &id in vcpus {
            let id = id as usize;
            let Some(c) = self.controls.get(id) else {
                continue;
            };
            c.host_pause();
            // Read after the pause bit is set: a kick counted beyond this
            // was handled with the bit visible (see VcpuControl::kicks).
            let k = c.kicks();
            if let Some(slot) = self.api.pause_kicks.get_mut(id) {
                *slot = k;
            }
            self.kick_vcpu(id);
        }
    }

    fn resume(&mut self, vcpus: &[u32]) {
        for &id in vcpus {
            if let Some(c) = self.controls.get(id as usize) {
                c.host_resume();
            }
        }
    }

    fn out_of_guest(&self, id: u32) -> bool {
        let id = id as usize;
        let (Some(c), Some(t)) = (self.controls.get(id), self.threads.get(id)) else {
            return true;
        };
        t.is_finished()
            || c.is_parked()
            || c.kicks() > self.api.pause_kicks.get(id).copied().unwrap_or(u64::MAX)
    }

    fn status(&self) -> HostStatus {
        let mut objects = BTreeMap::new();
        for (_, o) in self.state.objects.iter() {
            *objects.entry(o.kind().to_string()).or_insert(0u64) += 1;
        }
        objects.insert(
            "reserved_range".to_string(),
            self.state.exit_config.reservations.len() as u64,
        );
        objects.insert("main_connection".to_string(), self.connections.len() as u64);
        HostStatus {
            plugin_pid: self.plugin_host_pid(),
            jail_init_pid: self.plugin.jail.as_ref().map(|_| self.plugin.pid.as_raw()),
            plugin: self.config.plugin.display().to_string(),
            vmm_pid: std::process::id(),
            exits: self.controls.iter().map(|c| c.exits()).collect(),
            objects,
        }
    }

    fn vcpu_tids(&self) -> Vec<VcpuTid> {
        if self.threads.is_empty() {
            return Vec::new();
        }
        self.controls
            .iter()
            .enumerate()
            .filter(|(_, c)| c.tid() != 0)
            .map(|(i, c)| VcpuTid {
                vcpu: i as u32,
                tid: c.tid(),
            })
            .collect()
    }

    fn stats(&self) -> Value {
        let mut v = serde_json::to_value(crate::stats::report()).unwrap_or(Value::Null);
        let collecting = crate::trace::enabled() & crate::trace::STATS != 0;
        if let Value::Object(o) = &mut v {
            o.insert("collecting".into(), Value::Bool(collecting));
            if !collecting {
                // Counting costs time on every exit: only with --stats.
                o.insert(
                    "note".into(),
                    Value::from("vmm runs without --stats: nothing is counted"),
                );
            }
        }
        v
    }

    fn stop(&mut self) {
        self.enter_dying("stopped over the control socket");
    }

    fn kill(&mut self) {
        let why = "killed over the control socket".to_string();
        if !self
            .errors
            .iter()
            .any(|e| matches!(e, RunError::Interrupted(_)))
        {
            self.errors.insert(0, RunError::Interrupted(why));
        }
        if let Err(e) = self.plugin.kill() {
            error!("cannot kill the plugin: {e}");
        }
        self.enter_dying("killed over the control socket");
    }

    fn parked(&self, id: u32) -> bool {
        let id = id as usize;
        let (Some(c), Some(t)) = (self.controls.get(id), self.threads.get(id)) else {
            return true;
        };
        t.is_finished() || c.is_parked()
    }

    fn snapshot_begin(&mut self, dir: &str, device: Option<Vec<u8>>) -> Result<(), String> {
        self.begin_snapshot(dir, device)
    }

    fn snapshot_poll(&mut self) -> Option<Result<Value, String>> {
        self.poll_snapshot()
    }

    fn migrate_begin(&mut self, to: &str, downtime_ms: u64) -> Result<(), String> {
        Host::migrate_begin(self, to, downtime_ms)
    }

    fn migrate_poll(&mut self) -> Option<crate::control::dispatch::MigrateProgress> {
        Host::migrate_poll(self)
    }

    fn migrate_round(&mut self, plugin_pages: &[u64]) -> Result<bool, String> {
        Host::migrate_round(self, plugin_pages)
    }

    fn migrate_finish(&mut self, device: Vec<u8>, plugin_pages: &[u64]) -> Result<(), String> {
        Host::migrate_finish(self, device, plugin_pages)
    }

    fn migrate_abort(&mut self) {
        Host::migrate_abort(self)
    }

    fn migrated(&mut self, to: &str) {
        Host::migrated(self, to)
    }

    fn upgrade_prepare(&mut self) -> Option<String> {
        let why = self.upgrade_refusal();
        if why.is_none() {
            self.restart.park_began = Some(std::time::Instant::now());
        }
        why
    }

    fn upgrade_begin(
        &mut self,
        plugin: &str,
        args: &[String],
        state: Vec<u8>,
    ) -> Result<(), String> {
        Host::upgrade_begin(self, plugin.into(), args.to_vec(), state)
    }

    fn upgrade_poll(&mut self) -> Option<Result<Value, String>> {
        self.restart.upgrade_done.take()
    }

    fn forward(&mut self, what: Forward, tag: u64) -> Result<(), ForwardRefused> {
        self.api.plugin_control.forward(what, tag).map_err(|e| {
            let m = crate::error_chain(&e);
            match e {
                ForwardError::NotSupported => ForwardRefused::NotSupported(m),
                ForwardError::Busy => ForwardRefused::Busy(m),
                ForwardError::Send(_) => ForwardRefused::Failed(m),
            }
        })
    }
}
