//! Starting the plugin process and ending it.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::config::JailConfig;
use crate::jail::{self, JailError, Jailed};
use crate::launch::Launch;

/// Errors starting the plugin.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot execute {path}")]
    Spawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Jail(JailError),
}

/// A running plugin: the host's child. Unjailed, that is the plugin, which
/// leads its own process group so anything it forks is killed with it.
/// Jailed, it is the jail's init, and killing it ends the whole PID
/// namespace.
pub struct Plugin {
    pub pid: Pid,
    pub jail: Option<Jailed>,
}

impl Plugin {
    /// SIGKILLs the plugin and everything it started.
    pub fn kill(&self) -> Result<(), Errno> {
        let r = match self.jail {
            Some(_) => kill(self.pid, Signal::SIGKILL),
            None => killpg(self.pid, Signal::SIGKILL),
        };
        match r {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// How the plugin ended, given how the host's child ended: jailed, the
    /// plugin's own status as init reported it (if init was not killed).
    pub fn end_status(&self, child: WaitStatus) -> WaitStatus {
        match &self.jail {
            Some(j) => j
                .plugin_status()
                .and_then(|raw| WaitStatus::from_raw(self.pid, raw).ok())
                .unwrap_or(child),
            None => child,
        }
    }
}

/// Starts the plugin in a jail (the default).
pub fn spawn_jailed(launch: Launch<'_>, config: &JailConfig) -> Result<Plugin, ProcessError> {
    let (pid, jailed) = jail::spawn(config, launch).map_err(ProcessError::Jail)?;
    Ok(Plugin {
        pid,
        jail: Some(jailed),
    })
}

/// Starts the plugin without a jail (`--disable-sandbox`).
pub fn spawn_unjailed(launch: Launch<'_>) -> Result<Plugin, ProcessError> {
    let socket_fd: RawFd = launch.socket.as_raw_fd();
    let mut cmd = Command::new(launch.path);
    cmd.arg0(launch.path)
        .args(launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env("CROSVM_SOCKET", socket_fd.to_string())
        .stdin(Stdio::inherit())
        .stdout(Stdio::from(launch.stdout))
        .stderr(Stdio::from(launch.stderr))
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (fcntl, prctl) on values captured by copy.
    unsafe {
        cmd.pre_exec(move || {
            // The socket must survive exec; every other host descriptor is
            // close-on-exec.
            if libc::fcntl(socket_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If the host dies, the plugin must not outlive it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        path: launch.path.display().to_string(),
        source,
    })?;
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // The child is reaped by the main loop with waitpid; std's handle is not
    // used to wait.
    drop(child);
    Ok(Plugin { pid, jail: None })
}
