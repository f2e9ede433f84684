//! The `migrate` command's steps in the dispatcher (docs/control-api.md,
//! docs/migration-stream.md §4): plain code over [`ControlTarget`], like
//! the snapshot's.
//!
//! 1. `DIRTY_PAGES` to the plugin, answer discarded: its tracking starts.
//! 2. [`ControlTarget::migrate_begin`]: dirty logging on, the worker
//!    connects, sends the header and round 0 (every non-zero page).
//! 3. After each round: `DIRTY_PAGES`, then [`ControlTarget::migrate_round`]
//!    merges them with KVM's dirty log and either sends another round or
//!    says stop.
//! 4. Stop: every vcpu parked, `SAVE_STATE`, the last `DIRTY_PAGES`,
//!    [`ControlTarget::migrate_finish`]: the rest of the pages, the state,
//!    `End`, the target's `Ready`, `Commit`, its `Done`.
//! 5. Done: the answer with the numbers, `migration-done`, the VM ends.
//!
//! A failure before `Commit` resumes what the migration paused, tells the
//! plugin `RESUMED` if it was asked for its state, and answers the error;
//! after `Commit` the machine stays paused (the target may run it).

use serde_json::{json, Value};
use vmm_client::proto::{ErrorCode, Id};

use super::PluginReply;
use super::{error, not_running, ok, ControlTarget, Dispatcher, Forward, ForwardRefused, Phase};

/// What the host's migration reports when polled.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrateProgress {
    /// The worker sent the round it was given.
    RoundSent,
    /// The target runs the machine: the numbers for the answer.
    Done(Value),
    /// It failed; `committed`: after `Commit` went out.
    Failed { why: String, committed: bool },
}

#[derive(Debug, Clone, PartialEq)]
enum Stage {
    /// The first `DIRTY_PAGES` (its tag).
    Tracking(u64),
    /// A round is being sent.
    Precopy,
    /// A round's `DIRTY_PAGES`.
    Dirty(u64),
    /// Waiting for every vcpu to park.
    Parking,
    /// `SAVE_STATE`.
    Device(u64),
    /// The last `DIRTY_PAGES`, with the device state.
    FinalDirty(u64, Vec<u8>),
    /// The rest, the state and the handshake.
    Final,
}

pub(super) struct PendingMigration {
    client: u64,
    id: Id,
    pub(super) to: String,
    downtime_ms: u64,
    was_paused: Vec<u32>,
    stage: Stage,
    /// `SAVE_STATE` went out: `RESUMED` follows a failure.
    asked_plugin: bool,
}

impl Dispatcher {
    fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// `migrate`.
    pub(super) fn migrate(
        &mut self,
        vm: &mut impl ControlTarget,
        client: u64,
        id: Id,
        to: String,
        downtime_ms: u64,
    ) {
        if let Some(e) = not_running(
            vm.phase(),
            client,
            &id,
            "migrate",
            "only a running or paused VM can be migrated",
        )
        .or_else(|| self.machine_busy(client, &id, "migrate"))
        {
            self.out.push(e);
            return;
        }
        if let Err(e) = crate::migrate::Addr::parse(&to) {
            self.out.push(error(
                client,
                id,
                ErrorCode::BadArgument,
                format!("migrate: {e}"),
            ));
            return;
        }
        let tag = self.tag();
        if let Err(e) = vm.forward(Forward::DirtyPages, tag) {
            let (code, why) = match e {
                ForwardRefused::NotSupported(_) => (
                    ErrorCode::NotSupported,
                    "the plugin does not take part in migrations (it never opened its control \
                     channel, so neither its device state nor its own writes into guest memory \
                     can move)"
                        .to_string(),
                ),
                ForwardRefused::Busy(m) | ForwardRefused::Failed(m) => (
                    ErrorCode::PluginError,
                    format!("cannot ask the plugin for its written pages: {m}"),
                ),
            };
            self.out
                .push(error(client, id, code, format!("migrate: {why}")));
            return;
        }
        let n = vm.vcpu_count();
        let was_paused = (0..n).filter(|&i| vm.is_paused(i)).collect();
        self.event(
            vm.uptime_ms(),
            "migration-started",
            json!({ "to": to.clone() }),
        );
        self.migration = Some(PendingMigration {
            client,
            id,
            to,
            downtime_ms,
            was_paused,
            stage: Stage::Tracking(tag),
            asked_plugin: false,
        });
    }

    /// Whether `tag` answers a migration step.
    pub(super) fn migration_tag(&self, tag: u64) -> bool {
        self.migration.as_ref().is_some_and(|m| match m.stage {
            Stage::Tracking(t) | Stage::Dirty(t) | Stage::Device(t) | Stage::FinalDirty(t, _) => {
                t == tag
            }
            _ => false,
        })
    }

    fn migration_end(
        &mut self,
        vm: &mut impl ControlTarget,
        result: Result<Value, (ErrorCode, String, bool)>,
    ) {
        let Some(m) = self.migration.take() else {
            return;
        };
        match result {
            Ok(mut v) => {
                if let Value::Object(o) = &mut v {
                    o.insert("to".into(), Value::from(m.to.clone()));
                }
                self.event(vm.uptime_ms(), "migration-done", v.clone());
                self.out.push(ok(m.client, m.id, v));
                vm.migrated(&m.to);
            }
            Err((code, why, committed)) => {
                vm.migrate_abort();
                let why = if committed && vm.phase() == Phase::Stopping {
                    format!("{why}; the target may be running the machine")
                } else if committed {
                    format!(
                        "{why}; the target may be running the machine, so this VM stays paused \
                         (resume it only once the target is known not to run it)"
                    )
                } else {
                    if vm.phase() != Phase::Stopping {
                        let resume: Vec<u32> = (0..vm.vcpu_count())
                            .filter(|v| !m.was_paused.contains(v))
                            .collect();
                        vm.resume(&resume);
                    }
                    if m.asked_plugin {
                        let tag = self.tag();
                        let _ = vm.forward(Forward::Resumed, tag);
                    }
                    why
                };
                self.event(
                    vm.uptime_ms(),
                    "migration-failed",
                    json!({ "to": m.to, "error": why.clone() }),
                );
                self.out
                    .push(error(m.client, m.id, code, format!("migrate: {why}")));
            }
        }
    }

    fn migration_fail(&mut self, vm: &mut impl ControlTarget, code: ErrorCode, why: String) {
        self.migration_end(vm, Err((code, why, false)));
    }

    /// Asks for the plugin's pages; the next stage waits for them.
    fn ask_dirty(&mut self, vm: &mut impl ControlTarget, next: impl FnOnce(u64) -> Stage) {
        let tag = self.tag();
        match vm.forward(Forward::DirtyPages, tag) {
            Ok(()) => {
                if let Some(m) = &mut self.migration {
                    m.stage = next(tag);
                }
            }
            Err(
                ForwardRefused::NotSupported(m)
                | ForwardRefused::Busy(m)
                | ForwardRefused::Failed(m),
            ) => self.migration_fail(
                vm,
                ErrorCode::PluginError,
                format!("cannot ask the plugin for its written pages: {m}"),
            ),
        }
    }

    /// Moves the migration on (from [`Dispatcher::poll`]).
    pub(super) fn migration_poll(&mut self, vm: &mut impl ControlTarget) {
        let Some(m) = &self.migration else {
            return;
        };
        if vm.phase() == Phase::Stopping {
            // In the hand-over the target may already run the machine:
            // only the worker knows ([`Dispatcher::migration_ended`]
            // answers if the VM ends first).
            if m.stage != Stage::Final {
                self.migration_fail(vm, ErrorCode::InvalidState, "the VM is stopping".into());
                return;
            }
        }
        match m.stage {
            Stage::Precopy => match vm.migrate_poll() {
                None => {}
                Some(MigrateProgress::RoundSent) => self.ask_dirty(vm, Stage::Dirty),
                Some(MigrateProgress::Failed { why, committed }) => {
                    self.migration_end(vm, Err((ErrorCode::Internal, why, committed)))
                }
                Some(MigrateProgress::Done(_)) => self.migration_fail(
                    vm,
                    ErrorCode::Internal,
                    "the migration ended before the machine's state was sent".into(),
                ),
            },
            Stage::Parking => {
                if !(0..vm.vcpu_count()).all(|v| vm.parked(v)) {
                    return;
                }
                let tag = self.tag();
                match vm.forward(Forward::SaveState, tag) {
                    Ok(()) => {
                        if let Some(m) = &mut self.migration {
                            m.stage = Stage::Device(tag);
                            m.asked_plugin = true;
                        }
                    }
                    Err(
                        ForwardRefused::NotSupported(e)
                        | ForwardRefused::Busy(e)
                        | ForwardRefused::Failed(e),
                    ) => self.migration_fail(
                        vm,
                        ErrorCode::PluginError,
                        format!("cannot ask the plugin for its device state: {e}"),
                    ),
                }
            }
            Stage::Final => match vm.migrate_poll() {
                None | Some(MigrateProgress::RoundSent) => {}
                Some(MigrateProgress::Done(v)) => self.migration_end(vm, Ok(v)),
                Some(MigrateProgress::Failed { why, committed }) => {
                    self.migration_end(vm, Err((ErrorCode::Internal, why, committed)))
                }
            },
            _ => {}
        }
    }

    /// The VM ended (`why`) with the migration under way: its answer now,
    /// before the control socket goes. A hand-over the worker finished is
    /// answered as such; one it did not may have reached the target
    /// (`Commit` may be out), so the error says so.
    pub(super) fn migration_ended(&mut self, vm: &mut impl ControlTarget, why: &str) {
        let Some(m) = &self.migration else {
            return;
        };
        if m.stage == Stage::Final {
            let r = match vm.migrate_poll() {
                Some(MigrateProgress::Done(v)) => Ok(v),
                Some(MigrateProgress::Failed { why, committed }) => {
                    Err((ErrorCode::Internal, why, committed))
                }
                None | Some(MigrateProgress::RoundSent) => Err((
                    ErrorCode::InvalidState,
                    format!("the VM ended during the hand-over ({why})"),
                    true,
                )),
            };
            self.migration_end(vm, r);
            return;
        }
        self.migration_end(
            vm,
            Err((
                ErrorCode::InvalidState,
                format!("the VM ended before the migration finished ({why})"),
                false,
            )),
        );
    }

    /// The plugin's answer to a migration step.
    pub(super) fn migration_reply(&mut self, vm: &mut impl ControlTarget, reply: PluginReply) {
        let Some(m) = &mut self.migration else {
            return;
        };
        let stage = std::mem::replace(&mut m.stage, Stage::Precopy);
        let (to, downtime_ms) = (m.to.clone(), m.downtime_ms);
        let refused = |what: &str, reply: PluginReply| -> (ErrorCode, String) {
            match reply {
                PluginReply::Refused { errno, message } => (
                    ErrorCode::PluginError,
                    format!(
                        "the plugin refused {what}: {message} ({}, errno {errno})",
                        nix::errno::Errno::from_raw(errno).desc()
                    ),
                ),
                PluginReply::TimedOut(after) => (
                    ErrorCode::Timeout,
                    format!("the plugin did not answer {what} within {after:?}"),
                ),
                PluginReply::Closed => (
                    ErrorCode::PluginError,
                    format!("the plugin closed its control channel before answering {what}"),
                ),
                _ => (
                    ErrorCode::PluginError,
                    format!("the plugin answered {what} with something else"),
                ),
            }
        };
        match (stage, reply) {
            (Stage::Tracking(_), PluginReply::DirtyPages(_)) => {
                match vm.migrate_begin(&to, downtime_ms) {
                    Ok(()) => {}
                    Err(why) => self.migration_fail(vm, ErrorCode::Internal, why),
                }
            }
            (Stage::Dirty(_), PluginReply::DirtyPages(pages)) => match vm.migrate_round(&pages) {
                Ok(false) => {}
                Ok(true) => {
                    let all: Vec<u32> = (0..vm.vcpu_count()).collect();
                    vm.pause(&all);
                    if let Some(m) = &mut self.migration {
                        m.stage = Stage::Parking;
                    }
                    self.migration_poll(vm);
                }
                Err(why) => self.migration_fail(vm, ErrorCode::Internal, why),
            },
            (Stage::Device(_), PluginReply::State(blob)) => {
                self.ask_dirty(vm, |t| Stage::FinalDirty(t, blob))
            }
            (Stage::FinalDirty(_, blob), PluginReply::DirtyPages(pages)) => {
                match vm.migrate_finish(blob, &pages) {
                    Ok(()) => {
                        if let Some(m) = &mut self.migration {
                            m.stage = Stage::Final;
                        }
                    }
                    Err(why) => self.migration_fail(vm, ErrorCode::Internal, why),
                }
            }
            (Stage::Device(_), r) => {
                let (code, why) = refused("SAVE_STATE", r);
                self.migration_fail(vm, code, why)
            }
            (_, r) => {
                let (code, why) = refused("DIRTY_PAGES", r);
                self.migration_fail(vm, code, why)
            }
        }
    }
}
