//! The end of a run: the shutdown sequence (the shutdown eventfd, stopping
//! the vcpus, the grace period) and the teardown that turns what happened
//! (plugin exit status, signal, panic, timeouts, earlier errors) into the
//! result of `run`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{error, info};
use nix::sys::signal::Signal;
use vmm_sys_util::signal::Killable;

use super::{vcpu, Host, PluginEnd, RunError, DYING_GRACE};

impl Host {
    /// Starts the shutdown: tells the plugin through the shutdown eventfd,
    /// stops the vcpus, and gives the plugin `DYING_GRACE` to exit.
    pub(super) fn enter_dying(&mut self, why: &str) {
        if self.dying_since.is_some() {
            return;
        }
        info!("shutting down: {why}");
        self.dying_since = Some(Instant::now());
        self.emit("stopping", serde_json::json!({ "reason": why }));
        self.signal_shutdown_eventfd();
        self.stop_vcpus();
    }

    /// Adds 1 to the shutdown eventfd without ever blocking the main loop.
    /// The plugin shares the eventfd's open file description (it received
    /// it by `SCM_RIGHTS`): it can set the counter to its maximum, so that
    /// a write blocks until someone reads, and it can clear `O_NONBLOCK` on
    /// the description at any time. So the write is made on a thread of its
    /// own: if it blocks, only that thread waits (until the plugin reads or
    /// vmm exits), and the main loop goes on handling signals and the
    /// shutdown.
    fn signal_shutdown_eventfd(&self) {
        let evt = match self.shutdown.try_clone() {
            Ok(e) => e,
            Err(e) => {
                error!("cannot signal the shutdown eventfd: {e}");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("vmm_shutdown".into())
            .spawn(move || {
                if let Err(e) = evt.write(1) {
                    error!("cannot signal the shutdown eventfd: {e}");
                }
            });
        if let Err(e) = spawned {
            error!("cannot signal the shutdown eventfd: {e}");
        }
    }

    pub(super) fn stop_vcpus(&self) {
        self.shared.kill.store(true, Ordering::Release);
        self.shared.barrier.cancel();
        // Parked (host-paused) vcpus see the kill flag at once.
        for c in &self.controls {
            c.wake();
        }
        for t in &self.threads {
            if !t.is_finished() {
                let _ = t.kill(vcpu::kick_signal());
            }
        }
    }

    /// Stops everything and turns what happened into the result.
    pub(super) fn teardown(mut self) -> Result<(), RunError> {
        // No more restarts; the kept output pipe ends go, so the
        // forwarders see EOF once the plugin is gone.
        self.restart.policy = super::restart::CrashPolicy::Stop;
        self.restart.pipes = None;
        self.stop_vcpus();
        let deadline = Instant::now() + Duration::from_secs(5);
        // Kicked threads leave within microseconds; a kick that raced with a
        // thread entering a blocking call is repeated.
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            self.stop_vcpus();
            std::thread::sleep(Duration::from_micros(100));
        }
        for t in std::mem::take(&mut self.threads) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                error!("a vcpu thread did not stop; leaving it behind");
            }
        }

        let timed_out = self.plugin_end.is_none();
        if timed_out {
            // Grace period over (or the loop failed): the plugin must go.
            if let Err(e) = self.plugin.kill() {
                error!("cannot kill the plugin: {e}");
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.plugin_end.is_none() && Instant::now() < deadline {
                self.reap();
                std::thread::sleep(Duration::from_millis(2));
            }
            if self.plugin_end.is_none() {
                error!("the plugin (pid {}) could not be reaped", self.plugin.pid);
            }
            if self.abandoned {
                self.errors.insert(0, RunError::PluginAbandoned);
            } else if !self.errors.iter().any(|e| matches!(e, RunError::Wait(_))) {
                self.errors.insert(0, RunError::PluginTimeout(DYING_GRACE));
            }
        }
        // Anything the plugin forked dies with it.
        let _ = self.plugin.kill();
        if self.stderr.open {
            self.stderr.drain();
            self.stderr.flush();
        }
        // Everything that could write the plugin's stdout is gone: the
        // forwarder sees EOF and ends. A stdout that does not drain (a
        // full pipe nobody reads) must not hold up the exit.
        if let Some(t) = self.stdout_thread.take() {
            let deadline = Instant::now() + Duration::from_secs(1);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.take_vcpu_failure();
        self.report_stopped_vcpus();
        // The last events (vcpu-stopped, plugin-exited) and the answers to
        // every request still outstanding go to the control thread, which
        // flushes them before the socket is removed.
        self.control_end();

        let panicked = self.stderr.panic.panic().map(str::to_string);
        match (self.plugin_end.as_ref(), panicked) {
            (_, _) if timed_out => {}
            (Some(PluginEnd::Exited(code)), Some(message)) if *code != 0 => self.errors.insert(
                0,
                RunError::PluginPanicked {
                    message,
                    end: format!("exited with status {code}"),
                },
            ),
            (Some(PluginEnd::Signaled(sig)), Some(message))
                if !matches!(self.errors.first(), Some(RunError::Seccomp(_))) =>
            {
                self.errors.insert(
                    0,
                    RunError::PluginPanicked {
                        message,
                        end: format!("was killed by signal {sig}"),
                    },
                )
            }
            _ => {}
        }
        match self.plugin_end {
            // Killed by us: the timeout is the cause.
            _ if timed_out => {}
            _ if matches!(self.errors.first(), Some(RunError::PluginPanicked { .. })) => {}
            Some(PluginEnd::Exited(code)) if code != 0 => {
                self.errors.insert(0, RunError::PluginExit(code))
            }
            // Killed by us after a seccomp violation: that is the cause.
            Some(PluginEnd::Signaled(_))
                if matches!(self.errors.first(), Some(RunError::Seccomp(_))) => {}
            Some(PluginEnd::Signaled(sig)) => self.errors.insert(
                0,
                RunError::PluginSignaled {
                    signal: sig.to_string(),
                    detail: signal_detail(sig),
                },
            ),
            _ => {}
        }
        // The user's stop, or a vcpu that failed (a KVM internal error,
        // say), is the cause of a plugin that then exited, was killed or
        // timed out: name the cause first, then what followed.
        let cause = self
            .errors
            .iter()
            .position(|e| matches!(e, RunError::Interrupted(_)))
            .or_else(|| {
                self.errors.iter().position(|e| {
                    matches!(
                        e,
                        RunError::VcpuFailed { .. }
                            | RunError::RestartLoop { .. }
                            | RunError::AttachFailed(_)
                    )
                })
            });
        if let Some(i) = cause.filter(|&i| i > 0) {
            if matches!(
                self.errors[0],
                RunError::PluginTimeout(_)
                    | RunError::PluginExit(_)
                    | RunError::PluginSignaled { .. }
            ) {
                let then = self.errors.remove(0).to_string();
                let mut first = self.errors.remove(i - 1);
                match &mut first {
                    RunError::VcpuFailed { message, .. }
                    | RunError::Interrupted(message)
                    | RunError::AttachFailed(message)
                    | RunError::RestartLoop { last: message, .. } => {
                        message.push_str("; then ");
                        message.push_str(&then);
                    }
                    _ => {}
                }
                self.errors.insert(0, first);
            }
        }
        if let Some(to) = &self.migrated_to {
            // The machine runs at the target; whatever the stopped plugin
            // did here does not matter.
            info!("the machine migrated to {to}; this vmm ends");
            return Ok(());
        }
        match self.errors.into_iter().next() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

fn signal_detail(sig: Signal) -> &'static str {
    match sig {
        Signal::SIGSEGV => " (segmentation fault)",
        Signal::SIGBUS => " (bus error)",
        Signal::SIGABRT => " (aborted)",
        Signal::SIGILL => " (illegal instruction)",
        Signal::SIGFPE => " (arithmetic exception)",
        Signal::SIGKILL => " (killed)",
        Signal::SIGSYS => " (bad system call: stopped by the seccomp filter)",
        _ => "",
    }
}
