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

/// A command forwarded to the plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum Forward {
    PowerButton,
    SleepButton,
    Plugin { name: String, args: Value },
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
}

fn error(client: u64, id: Id, code: ErrorCode, message: impl Into<String>) -> ToServer {
    ToServer::Response {
        client,
        response: Response::error(id, code, message),
    }
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
    /// What to send to the control thread, in order.
    pub fn take(&mut self) -> Vec<ToServer> {
        std::mem::take(&mut self.out)
    }

    /// Pauses are waiting for their vcpus to leave the guest (the main
    /// loop polls often then).
    pub fn waiting(&self) -> bool {
        !self.pauses.is_empty()
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
                if phase != Phase::Running {
                    let what = if phase == Phase::Starting {
                        "starting (its vcpus do not run yet)"
                    } else {
                        "stopping"
                    };
                    self.out.push(error(
                        client,
                        id,
                        ErrorCode::InvalidState,
                        format!("{name}: the VM is {what}"),
                    ));
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
        }
    }

    /// Answers the pauses whose vcpus all left the guest, and fails those
    /// the VM's end overtook.
    pub fn poll(&mut self, vm: &mut impl ControlTarget) {
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

    /// The plugin's replies to forwarded commands (and timeouts).
    pub fn replies(&mut self, replies: Vec<(u64, PluginReply)>) {
        for (tag, reply) in replies {
            let Some((client, id, name)) = self.forwards.remove(&tag) else {
                continue;
            };
            self.out.push(match reply {
                PluginReply::Ok(v) => ok(client, id, v),
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
