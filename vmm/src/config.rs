//! The VM's configuration, as the lower layers take it: `runtime::run`
//! takes a [`VmConfig`], the jail a [`JailConfig`], the tap code a list of
//! [`NetSpec`]s. The command line (`cli.rs`) converts into these types and is
//! the only module that knows about options, spellings and list files; this
//! module knows nothing of `clap` and depends on no other layer but
//! `limits`.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::limits::GuestMemoryLimits;

/// Everything `runtime::run` needs to know.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub plugin: PathBuf,
    pub args: Vec<String>,
    /// The plugin's environment besides CROSVM_SOCKET (nothing else of the
    /// host's is passed).
    pub env: Vec<(String, OsString)>,
    pub vcpus: usize,
    pub kvm_path: PathBuf,
    pub vcpu_cgroup_path: Option<PathBuf>,
    /// Tap devices, in creation order; the first is the plugin's.
    pub nets: Vec<NetSpec>,
    /// Offer the shared-memory vcpu channel to plugins that ask for it.
    pub fast_channel: bool,
    /// Bounds on the guest memory the plugin registers.
    pub memory_limits: GuestMemoryLimits,
    /// `None`: `--disable-sandbox`.
    pub jail: Option<JailConfig>,
    /// The level the plugin's stderr lines are logged at (`plugin:` prefix).
    pub plugin_stderr_level: log::Level,
    /// The control socket (`--api-socket`), docs/control-api.md.
    pub api_socket: Option<PathBuf>,
    /// `--cpus` was given (with `--restore` it must match the snapshot).
    pub vcpus_given: bool,
    /// `--restore DIR`.
    pub restore: Option<PathBuf>,
    /// `--incoming ADDR`: receive a migrating machine.
    pub incoming: Option<String>,
    /// `--incoming-timeout S`: how long to wait for the source.
    pub incoming_timeout: Option<std::time::Duration>,
    /// `--on-plugin-crash` (docs/protocol-extensions.md §9).
    pub on_plugin_crash: CrashPolicy,
    /// `--hot-restart`: `upgrade` is possible (implied by
    /// `--on-plugin-crash restart`).
    pub allow_upgrade: bool,
}

impl VmConfig {
    /// Whether a later plugin may replace the first (docs/protocol-extensions.md §9).
    pub fn hot_restart(&self) -> bool {
        self.allow_upgrade || self.on_plugin_crash != CrashPolicy::Stop
    }
}

/// How to jail the plugin.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// `--plugin-root` or `--pivot-root`; `None`: an empty directory vmm
    /// creates (and removes).
    pub root: Option<PathBuf>,
    pub mounts: Vec<BindMount>,
    pub gid_maps: Vec<GidMap>,
    pub policy: PolicySource,
    pub log_failures: bool,
}

/// One extra bind mount into the jail (`--plugin-mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub writable: bool,
}

/// One extra gid mapping of the jail's user namespace (`--plugin-gid-map`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidMap {
    pub inner: u32,
    pub outer: u32,
    pub count: u32,
}

/// One tap device (`--net` or a deprecated equivalent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    TapName {
        name: String,
        mac: Option<[u8; 6]>,
    },
    TapFd {
        fd: i32,
        mac: Option<[u8; 6]>,
    },
    HostIp {
        ip: Ipv4Addr,
        netmask: Ipv4Addr,
        mac: [u8; 6],
    },
}

/// Where the plugin's policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// `vmm/src/jail/plugin.policy`, compiled into vmm.
    BuiltIn,
    /// A minijail-syntax file (`--seccomp-policy-dir DIR` → `DIR/plugin.policy`).
    Minijail(PathBuf),
    /// A seccompiler JSON file (`--seccomp-policy FILE`).
    Json(PathBuf),
}

impl PolicySource {
    /// From the command line: `--seccomp-policy` wins, then
    /// `--seccomp-policy-dir` if it holds `plugin.policy`, else built-in.
    pub fn from_options(policy: Option<&Path>, dir: Option<&Path>) -> PolicySource {
        if let Some(p) = policy {
            return PolicySource::Json(p.to_path_buf());
        }
        if let Some(d) = dir {
            let p = d.join("plugin.policy");
            if p.exists() {
                return PolicySource::Minijail(p);
            }
        }
        PolicySource::BuiltIn
    }

    /// The name errors use for the policy: its file, or `(built-in)`.
    pub(crate) fn display(&self) -> PathBuf {
        match self {
            PolicySource::BuiltIn => PathBuf::from("(built-in)"),
            PolicySource::Minijail(p) | PolicySource::Json(p) => p.clone(),
        }
    }
}

/// Default crash window of `--on-plugin-crash restart[:MAX]`.
pub const CRASH_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Default MAX of `--on-plugin-crash restart`.
pub const DEFAULT_MAX_CRASHES: u32 = 5;

/// `--on-plugin-crash`: what to do when a restartable plugin dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashPolicy {
    /// End the VM (as crosvm did).
    #[default]
    Stop,
    /// Start a new plugin, at most `max` times within `window`.
    Restart {
        max: u32,
        window: std::time::Duration,
    },
}

impl std::str::FromStr for CrashPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "stop" => Ok(CrashPolicy::Stop),
            None if s == "restart" => Ok(CrashPolicy::Restart {
                max: DEFAULT_MAX_CRASHES,
                window: CRASH_WINDOW,
            }),
            Some(("restart", max)) => match max.parse::<u32>() {
                Ok(max) if (1..=1000).contains(&max) => Ok(CrashPolicy::Restart {
                    max,
                    window: CRASH_WINDOW,
                }),
                _ => Err(format!("restart:{max}: MAX must be 1..=1000")),
            },
            _ => Err(format!("{s}: expected stop, restart or restart:MAX")),
        }
    }
}

#[cfg(test)]
mod crash_policy_tests {
    use super::*;

    #[test]
    fn on_plugin_crash_values_parse_and_bad_ones_name_the_form() {
        assert_eq!("stop".parse::<CrashPolicy>(), Ok(CrashPolicy::Stop));
        assert_eq!(
            "restart".parse::<CrashPolicy>(),
            Ok(CrashPolicy::Restart {
                max: DEFAULT_MAX_CRASHES,
                window: CRASH_WINDOW
            })
        );
        assert_eq!(
            "restart:7".parse::<CrashPolicy>(),
            Ok(CrashPolicy::Restart {
                max: 7,
                window: CRASH_WINDOW
            })
        );
        for bad in ["restart:0", "restart:1001", "restart:x", "again", "stop:3"] {
            let e = bad.parse::<CrashPolicy>().unwrap_err();
            assert!(e.contains("MAX") || e.contains("expected"), "{bad}: {e}");
        }
    }
}
