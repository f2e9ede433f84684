//! `upgrade` (docs/control-api.md, docs/protocol-extensions.md §9): park
//! every vcpu (an exit being served is finished by the old plugin, as for
//! a snapshot), ask the old plugin for its device state (`SAVE_STATE`),
//! let the host replace the plugin, answer once the new one runs the
//! vcpus again.

use serde_json::{json, Value};
use vmm_client::proto::{ErrorCode, Id};

use super::{error, ok, ControlTarget, Dispatcher, Forward, ForwardRefused, PluginReply};

pub(super) struct PendingUpgrade {
    client: u64,
    id: Id,
    plugin: String,
    args: Vec<String>,
    stage: Stage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Parking,
    /// Waiting for the old plugin's state (the forward's tag).
    Device(u64),
    /// The host replaces the plugin.
    Replacing,
}

impl Dispatcher {
    pub(super) fn upgrade_start(
        &mut self,
        vm: &mut impl ControlTarget,
        client: u64,
        id: Id,
        plugin: String,
        args: Vec<String>,
    ) {
        if let Some(e) = self.machine_busy(client, &id, "upgrade") {
            self.out.push(e);
            return;
        }
        if let Some(why) = vm.upgrade_prepare() {
            self.out.push(error(
                client,
                id,
                ErrorCode::NotSupported,
                format!("upgrade: {why}"),
            ));
            return;
        }
        let n = vm.vcpu_count();
        if (0..n).any(|i| vm.is_paused(i)) {
            self.out.push(error(
                client,
                id,
                ErrorCode::InvalidState,
                "upgrade: some vcpus are paused; resume them first",
            ));
            return;
        }
        let all: Vec<u32> = (0..n).collect();
        vm.pause(&all);
        self.event(
            vm.uptime_ms(),
            "upgrade-started",
            json!({ "plugin": plugin.clone() }),
        );
        self.upgrade = Some(PendingUpgrade {
            client,
            id,
            plugin,
            args,
            stage: Stage::Parking,
        });
        self.upgrade_poll(vm);
    }

    pub(super) fn upgrade_owns(&self, tag: u64) -> bool {
        self.upgrade
            .as_ref()
            .is_some_and(|u| u.stage == Stage::Device(tag))
    }

    /// Ends the upgrade: on failure before the old plugin was stopped the
    /// vcpus go on with it.
    fn upgrade_end(
        &mut self,
        vm: &mut impl ControlTarget,
        result: Result<Value, (ErrorCode, String)>,
    ) {
        let Some(u) = self.upgrade.take() else {
            return;
        };
        if u.stage != Stage::Replacing {
            let all: Vec<u32> = (0..vm.vcpu_count()).collect();
            vm.resume(&all);
        }
        match result {
            Ok(v) => {
                self.event(vm.uptime_ms(), "upgrade-done", v.clone());
                self.out.push(ok(u.client, u.id, v));
            }
            Err((code, why)) => {
                self.event(
                    vm.uptime_ms(),
                    "upgrade-done",
                    json!({ "error": why.clone() }),
                );
                self.out
                    .push(error(u.client, u.id, code, format!("upgrade: {why}")));
            }
        }
    }

    /// The VM ended (`why`) with the upgrade under way: its answer now;
    /// a replacement that ended (a new plugin that failed ends the VM) is
    /// answered with its own result.
    pub(super) fn upgrade_ended(&mut self, vm: &mut impl ControlTarget, why: &str) {
        let Some(u) = &self.upgrade else {
            return;
        };
        if u.stage == Stage::Replacing {
            if let Some(r) = vm.upgrade_poll() {
                self.upgrade_end(vm, r.map_err(|why| (ErrorCode::PluginError, why)));
                return;
            }
        }
        self.upgrade_end(
            vm,
            Err((
                ErrorCode::InvalidState,
                format!("the VM ended before the upgrade finished ({why})"),
            )),
        );
    }

    pub(super) fn upgrade_poll(&mut self, vm: &mut impl ControlTarget) {
        let Some(u) = &mut self.upgrade else {
            return;
        };
        match u.stage {
            Stage::Parking => {
                if !(0..vm.vcpu_count()).all(|v| vm.parked(v)) {
                    return;
                }
                let tag = self.next_tag;
                self.next_tag += 1;
                match vm.forward(Forward::SaveState, tag) {
                    Ok(()) => u.stage = Stage::Device(tag),
                    // A restartable plugin without a control channel keeps
                    // no state to hand over (or keeps it in its checkpoint).
                    Err(ForwardRefused::NotSupported(_)) => {
                        self.upgrade_state(vm, PluginReply::State(Vec::new()))
                    }
                    Err(ForwardRefused::Busy(m) | ForwardRefused::Failed(m)) => self.upgrade_end(
                        vm,
                        Err((
                            ErrorCode::PluginError,
                            format!("cannot ask the plugin for its device state: {m}"),
                        )),
                    ),
                }
            }
            Stage::Device(_) => {}
            Stage::Replacing => {
                if let Some(r) = vm.upgrade_poll() {
                    self.upgrade_end(vm, r.map_err(|why| (ErrorCode::PluginError, why)));
                }
            }
        }
    }

    pub(super) fn upgrade_state(&mut self, vm: &mut impl ControlTarget, reply: PluginReply) {
        let Some(u) = &mut self.upgrade else {
            return;
        };
        let why = match reply {
            PluginReply::State(blob) => match vm.upgrade_begin(&u.plugin, &u.args, blob) {
                Ok(()) => {
                    u.stage = Stage::Replacing;
                    return;
                }
                Err(why) => (ErrorCode::Internal, why),
            },
            PluginReply::Refused { errno, message } => (
                ErrorCode::PluginError,
                format!(
                    "the plugin refused to hand over its device state: {message} (errno {errno})"
                ),
            ),
            PluginReply::TimedOut(after) => (
                ErrorCode::Timeout,
                format!("the plugin did not hand over its device state within {after:?}"),
            ),
            PluginReply::Ok(_) | PluginReply::DirtyPages(_) => (
                ErrorCode::PluginError,
                "the plugin answered SAVE_STATE without a device state".into(),
            ),
            PluginReply::Closed => (
                ErrorCode::PluginError,
                "the plugin closed its control channel before handing over its device state".into(),
            ),
        };
        self.upgrade_end(vm, Err(why));
    }
}
