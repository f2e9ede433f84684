//! Command line: clap definitions (with crosvm's option spellings), value
//! parsers that follow docs/host-behaviour.md §2, list files, and the
//! conversion of the parsed arguments into the `config` layer
//! ([`Args::vm_config`]). Only `main.rs` uses this module.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::config::{BindMount, GidMap, JailConfig, NetSpec, PolicySource, VmConfig};
use crate::limits::GuestMemoryLimits;

/// Exit status for errors caught while parsing arguments (as crosvm).
pub const PARSE_ERROR_STATUS: i32 = 35;

/// Runs a virtual machine whose devices, memory and vcpus are driven by a
/// plugin process.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None, after_long_help = LONG_HELP_TAIL)]
pub struct Args {
    /// Plugin executable: the machine. It is started with CROSVM_SOCKET set.
    #[arg(long, value_name = "PATH")]
    pub plugin: PathBuf,

    /// Arguments for the plugin, one per word, up to the next vmm option;
    /// repeatable (the lists are joined). Words after `--` all go to the
    /// plugin, even ones that look like vmm options.
    #[arg(long = "plugin-args", value_name = "ARG", num_args = 0.., allow_hyphen_values = true, action = clap::ArgAction::Append)]
    pub plugin_args: Vec<String>,

    /// Environment variable for the plugin: NAME (the host's value, if set)
    /// or NAME=VALUE; repeatable. By default the plugin gets only
    /// CROSVM_SOCKET (and CROSVM_FAST_CHANNEL if the host has it).
    #[arg(long = "plugin-env", value_name = "NAME[=VALUE]", value_parser = parse_env)]
    pub plugin_env: Vec<EnvVar>,

    /// One plugin argument (crosvm spelling); repeatable, kept in order and
    /// placed before --plugin-args.
    #[arg(short = 'p', long = "params", value_name = "STR")]
    pub params: Vec<String>,

    /// Number of vcpus: N or num-cores=N (default 1; with --restore, the
    /// snapshot's, which a different N contradicts).
    #[arg(short = 'c', long = "cpus", value_name = "SPEC", value_parser = parse_cpus)]
    pub cpus: Option<usize>,

    /// Accepted for crosvm compatibility and ignored: all guest memory comes
    /// from the plugin.
    #[arg(short = 'm', long = "mem", value_name = "SPEC", value_parser = parse_mem)]
    pub mem: Option<u64>,

    /// Start the plugin without any jail (by default it runs jailed:
    /// namespaces, a tmpfs root, no capabilities, a seccomp filter).
    #[arg(long)]
    pub disable_sandbox: bool,

    /// Seccomp policy for the plugin in seccompiler's JSON format (the
    /// filter named `plugin`, or the only one), replacing the built-in one.
    #[arg(long, value_name = "FILE", conflicts_with = "seccomp_policy_dir")]
    pub seccomp_policy: Option<PathBuf>,

    /// crosvm spelling: use DIR/plugin.policy (minijail syntax) if present,
    /// else the built-in policy.
    #[arg(long, value_name = "DIR")]
    pub seccomp_policy_dir: Option<PathBuf>,

    /// Log the system calls the seccomp policy forbids and let them run,
    /// instead of stopping the plugin.
    #[arg(long)]
    pub seccomp_log_failures: bool,

    /// Jail root when --plugin-root is absent (default: an empty directory
    /// vmm creates). A 64 MiB tmpfs covers it.
    #[arg(long, value_name = "DIR")]
    pub pivot_root: Option<PathBuf>,

    /// Root directory of the plugin's jail (default: the pivot root). A
    /// 64 MiB tmpfs covers it: use --plugin-mount to show files.
    #[arg(long, value_name = "DIR")]
    pub plugin_root: Option<PathBuf>,

    /// Extra bind mount into the jail: SRC[:[DST][:true|false]] (true =
    /// writable); repeatable.
    #[arg(long, value_name = "SPEC", value_parser = parse_mount)]
    pub plugin_mount: Vec<BindMount>,

    /// File with one --plugin-mount SPEC per line (# comments).
    #[arg(long, value_name = "FILE")]
    pub plugin_mount_file: Option<PathBuf>,

    /// Extra gid mapping for the jail's user namespace:
    /// INNER[:[OUTER][:COUNT]]; repeatable.
    #[arg(long, value_name = "SPEC", value_parser = parse_gid_map)]
    pub plugin_gid_map: Vec<GidMap>,

    /// File with one --plugin-gid-map SPEC per line (# comments).
    #[arg(long, value_name = "FILE")]
    pub plugin_gid_map_file: Option<PathBuf>,

    /// Host IPv4 address of a new tap device (needs --netmask and --mac).
    #[arg(long, value_name = "IP")]
    pub host_ip: Option<Ipv4Addr>,

    /// Netmask of that tap device.
    #[arg(long, value_name = "MASK")]
    pub netmask: Option<Ipv4Addr>,

    /// MAC address of that tap device (hh:hh:hh:hh:hh:hh).
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub mac: Option<[u8; 6]>,

    /// Tap device: tap-name=NAME[,mac=MAC] | tap-fd=FD[,mac=MAC] |
    /// host-ip=IP,netmask=MASK,mac=MAC; repeatable. Only the first tap is
    /// visible to the plugin.
    #[arg(long, value_name = "KV", value_parser = parse_net)]
    pub net: Vec<NetSpec>,

    /// Existing tap interface to open by name; repeatable.
    #[arg(long, value_name = "NAME")]
    pub tap_name: Vec<String>,

    /// Already open tap descriptor to adopt; repeatable.
    #[arg(long, value_name = "FD")]
    pub tap_fd: Vec<i32>,

    /// Put the host process and vcpu threads into DIR/tasks.
    #[arg(long, value_name = "DIR")]
    pub vcpu_cgroup_path: Option<PathBuf>,

    /// Hypervisor: kvm[device=PATH].
    #[arg(long, value_name = "SPEC", value_parser = parse_hypervisor, conflicts_with = "kvm_device")]
    pub hypervisor: Option<PathBuf>,

    /// KVM device node (deprecated spelling of --hypervisor kvm[device=PATH]).
    #[arg(long, value_name = "PATH")]
    pub kvm_device: Option<PathBuf>,

    /// Accepted for crosvm compatibility; no effect (no host-allocated memory).
    #[arg(long)]
    pub hugepages: bool,

    /// Never offer the shared-memory vcpu channel: plugins use the crosvm
    /// pipes even if their library asks for the fast channel.
    #[arg(long)]
    pub no_fast_channel: bool,

    /// Most guest memory the plugin may register, in total and in any one
    /// region: bytes, or with a K, M, G or T suffix (powers of 1024).
    /// Default: the host's physical RAM. Beyond it, `CreateMemory` fails
    /// with ENOMEM.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_guest_memory: Option<u64>,

    /// Log level: off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_level_filter)]
    pub log_level: log::LevelFilter,

    /// Print one decoded line per main request, vcpu request and event
    /// (with its result and latency) to stderr. `--log-level trace`
    /// implies it.
    #[arg(long)]
    pub trace: bool,

    /// Write the `--trace` lines to FILE (appended) instead of stderr;
    /// implies `--trace`.
    #[arg(long, value_name = "FILE")]
    pub trace_file: Option<PathBuf>,

    /// Print statistics at exit: per request type count, errors and
    /// latency; per vcpu its exits by range and its time waiting on the
    /// plugin.
    #[arg(long)]
    pub stats: bool,

    /// Level the plugin's stderr lines are logged at, with a `plugin:`
    /// prefix: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_level)]
    pub plugin_stderr_level: log::Level,

    /// Serve the control socket at PATH (mode 0600; docs/control-api.md):
    /// status, pause/resume, stop, kill, stats, events, and commands for
    /// the plugin. Removed when vmm exits. Also spelled `--socket`.
    #[arg(long, visible_alias = "socket", value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Restore the snapshot in DIR (taken with `vmm ctl PATH snapshot
    /// DIR`; docs/snapshot-format.md): the plugin sets up its machine as
    /// usual, and at Start guest memory, VM and vcpu state come from DIR.
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,

    /// Receive a migrating machine at ADDR (`unix:PATH`, a socket of mode
    /// 0600 removed at exit, or `tcp:HOST:PORT`), sent by `vmm ctl S
    /// migrate ADDR` (docs/migration-stream.md). Waits for the source.
    #[arg(long, value_name = "ADDR", conflicts_with = "restore")]
    pub incoming: Option<String>,

    /// With --incoming: give up when no source connected within S seconds.
    #[arg(long, value_name = "S", requires = "incoming")]
    pub incoming_timeout: Option<f64>,

    /// What to do when a plugin that declared it can be restarted dies
    /// (signal, or non-zero exit) while the VM runs: `stop` (the default)
    /// ends the VM; `restart[:MAX]` starts it again (same path and args),
    /// its state from its checkpoint, at most MAX (default 5) times within
    /// 60 s (docs/protocol-extensions.md §9).
    #[arg(long, value_name = "stop|restart[:MAX]", default_value = "stop")]
    pub on_plugin_crash: crate::config::CrashPolicy,

    /// Allow `vmm ctl PATH upgrade NEW_PLUGIN` (implied by
    /// `--on-plugin-crash restart`). vmm then keeps its capabilities to
    /// build the jails of later plugins (docs/protocol-extensions.md §9).
    #[arg(long)]
    pub hot_restart: bool,
}

const LEVELS: &str = "error, warn, info, debug, trace";

fn parse_level_filter(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: valid levels are off, {LEVELS}"))
}

fn parse_level(s: &str) -> Result<log::Level, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: valid levels are {LEVELS}"))
}

/// The end of `vmm --help`: sub-commands and environment.
const LONG_HELP_TAIL: &str = "\
Sub-commands:
  vmm replay FILE...   print a session recorded with VMM_RECORD_DIR, one
                       decoded line per record (also spelled `vmm decode`)

Environment:
  VMM_RECORD_DIR=DIR   record every main request packet of the plugin into
                       DIR/main-<pid>.session and every vcpu request and
                       delivered event into DIR/vcpu<id>-<pid>.session (the
                       fuzzers' seed format; `vmm replay` prints them)";

impl Args {
    /// What `--trace`, `--trace-file`, `--stats` and `--log-level trace`
    /// ask to observe.
    pub fn trace_config(&self) -> crate::trace::TraceConfig {
        crate::trace::TraceConfig {
            trace: self.trace
                || self.trace_file.is_some()
                || self.log_level >= log::LevelFilter::Trace,
            file: self.trace_file.clone(),
            stats: self.stats,
        }
    }
}

/// One `--plugin-env`: NAME alone takes the host's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
}

fn parse_env(s: &str) -> Result<EnvVar, String> {
    let (name, value) = match s.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (s, None),
    };
    if name.is_empty() || name.contains('\0') {
        return Err(format!("`{s}` is not NAME or NAME=VALUE"));
    }
    if name == "CROSVM_SOCKET" {
        return Err("CROSVM_SOCKET is set by vmm".into());
    }
    Ok(EnvVar {
        name: name.to_string(),
        value,
    })
}

/// Rewrites the command line for clap: crosvm's `run` sub-command word is
/// dropped; each word after `--plugin-args` up to the next word that is a
/// vmm option becomes one `--plugin-args=WORD` (so a vmm option typed after
/// the plugin's arguments is honoured, never passed on silently); every word
/// after `--` is a plugin argument.
pub fn normalize_args<I, T>(args: I) -> Vec<std::ffi::OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    use clap::CommandFactory;
    use std::ffi::OsString;
    let cmd = Args::command();
    let mut longs: Vec<String> = vec!["help".into(), "version".into()];
    let mut shorts: Vec<char> = vec!['h', 'V'];
    for a in cmd.get_arguments() {
        longs.extend(
            a.get_long_and_visible_aliases()
                .into_iter()
                .flatten()
                .map(String::from),
        );
        shorts.extend(a.get_short_and_visible_aliases().into_iter().flatten());
    }
    let is_vmm_option = |w: &OsString| {
        let Some(w) = w.to_str() else { return false };
        if let Some(long) = w.strip_prefix("--") {
            let name = long.split('=').next().unwrap_or(long);
            return longs.iter().any(|l| l == name);
        }
        let mut chars = w.chars();
        chars.next() == Some('-') && chars.next().is_some_and(|c| shorts.contains(&c))
    };
    let as_plugin_arg = |w: OsString| {
        let mut o = OsString::from("--plugin-args=");
        o.push(w);
        o
    };
    let mut it = args.into_iter().map(Into::into);
    let mut out: Vec<OsString> = it.next().into_iter().collect();
    let mut rest: Vec<OsString> = it.collect();
    if rest.first().is_some_and(|w| w == "run") {
        rest.remove(0);
    }
    let mut in_plugin_args = false;
    let mut words = rest.into_iter();
    while let Some(w) = words.next() {
        if w == "--" {
            out.extend(words.by_ref().map(as_plugin_arg));
            break;
        }
        if w == "--plugin-args" {
            in_plugin_args = true;
            continue;
        }
        if in_plugin_args && !is_vmm_option(&w) {
            out.push(as_plugin_arg(w));
            continue;
        }
        in_plugin_args = false;
        out.push(w);
    }
    out
}

/// Errors resolving the parsed arguments into a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    ReadListFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    BadListLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("--host-ip, --netmask and --mac must be given together: {0} is missing")]
    IncompleteNet(&'static str),
}

pub fn parse_cpus(s: &str) -> Result<usize, String> {
    let n = s.strip_prefix("num-cores=").unwrap_or(s);
    let n = n.split(',').next().unwrap_or(n);
    match n.parse::<usize>() {
        Ok(0) => Err("the vcpu count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not N or num-cores=N")),
    }
}

fn parse_mem(s: &str) -> Result<u64, String> {
    let n = s.strip_prefix("size=").unwrap_or(s);
    n.parse::<u64>()
        .map_err(|_| format!("`{s}` is not N or size=N"))
}

fn parse_hypervisor(s: &str) -> Result<PathBuf, String> {
    let rest = s
        .strip_prefix("kvm")
        .ok_or_else(|| format!("unsupported hypervisor `{s}`"))?;
    if rest.is_empty() {
        return Ok(PathBuf::from("/dev/kvm"));
    }
    rest.strip_prefix("[device=")
        .and_then(|r| r.strip_suffix(']'))
        .map(PathBuf::from)
        .ok_or_else(|| format!("`{s}` is not kvm or kvm[device=PATH]"))
}

/// `SRC[:[DST][:WRITABLE]]` (docs/host-behaviour.md §2.1).
pub fn parse_mount(s: &str) -> Result<BindMount, String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() > 3 || parts[0].is_empty() {
        return Err(format!("`{s}` is not SRC[:[DST][:true|false]]"));
    }
    let src = PathBuf::from(parts[0]);
    if !src.is_absolute() {
        return Err(format!(
            "mount source `{}` must be an absolute path",
            src.display()
        ));
    }
    if !src.exists() {
        return Err(format!("mount source `{}` does not exist", src.display()));
    }
    let dst = match parts.get(1) {
        None | Some(&"") => src.clone(),
        Some(d) => PathBuf::from(d),
    };
    if !dst.is_absolute() {
        return Err(format!(
            "mount destination `{}` must be an absolute path",
            dst.display()
        ));
    }
    let writable = match parts.get(2) {
        None => false,
        Some(&"true") => true,
        Some(&"false") => false,
        Some(w) => return Err(format!("`{w}` is not true or false")),
    };
    Ok(BindMount { src, dst, writable })
}

/// `INNER[:[OUTER][:COUNT]]` (docs/host-behaviour.md §2.2).
pub fn parse_gid_map(s: &str) -> Result<GidMap, String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() > 3 || parts[0].is_empty() {
        return Err(format!("`{s}` is not INNER[:[OUTER][:COUNT]]"));
    }
    let num = |p: &str| {
        p.parse::<u32>()
            .map_err(|_| format!("`{p}` is not a group id or count"))
    };
    let inner = num(parts[0])?;
    let outer = match parts.get(1) {
        None | Some(&"") => inner,
        Some(o) => num(o)?,
    };
    let count = match parts.get(2) {
        None => 1,
        Some(c) => num(c)?,
    };
    Ok(GidMap {
        inner,
        outer,
        count,
    })
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("`{s}` is not a MAC address hh:hh:hh:hh:hh:hh");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// `--net` key-values.
pub fn parse_net(s: &str) -> Result<NetSpec, String> {
    let (mut name, mut fd, mut mac, mut ip, mut mask) = (None, None, None, None, None);
    for kv in s.split(',') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "tap-name" => name = Some(v.to_string()),
            "tap-fd" => {
                fd = Some(
                    v.parse::<i32>()
                        .map_err(|_| format!("`{v}` is not a descriptor"))?,
                )
            }
            "mac" => mac = Some(parse_mac(v)?),
            "host-ip" => {
                ip = Some(
                    v.parse::<Ipv4Addr>()
                        .map_err(|_| format!("`{v}` is not an IPv4 address"))?,
                )
            }
            "netmask" => {
                mask = Some(
                    v.parse::<Ipv4Addr>()
                        .map_err(|_| format!("`{v}` is not an IPv4 netmask"))?,
                )
            }
            "vhost-net" => return Err("vhost-net is not supported with a plugin".into()),
            "vq-pairs" | "packed-queue" | "pci-address" | "mrg_rxbuf" => {}
            _ => return Err(format!("unknown --net key `{k}`")),
        }
    }
    match (name, fd, ip, mask, mac) {
        (Some(name), None, None, None, mac) => Ok(NetSpec::TapName { name, mac }),
        (None, Some(fd), None, None, mac) => Ok(NetSpec::TapFd { fd, mac }),
        (None, None, Some(ip), Some(netmask), Some(mac)) => Ok(NetSpec::HostIp { ip, netmask, mac }),
        _ => Err(format!(
            "`{s}` is not tap-name=NAME[,mac=MAC], tap-fd=FD[,mac=MAC] or host-ip=IP,netmask=MASK,mac=MAC"
        )),
    }
}

/// Reads a list file: `#` starts a comment, blank lines are skipped, each
/// remaining line is parsed with `parse`.
pub fn read_list_file<T>(
    path: &Path,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadListFile {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        out.push(parse(line).map_err(|message| ConfigError::BadListLine {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        })?);
    }
    Ok(out)
}

impl Args {
    /// Parses a whole command line (argv[0] first), crosvm spellings
    /// included (see `normalize_args`).
    pub fn from_command_line<I, T>(args: I) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        Args::try_parse_from(normalize_args(args))
    }

    /// The plugin's environment besides CROSVM_SOCKET: CROSVM_FAST_CHANNEL
    /// if the host has it, then each `--plugin-env` (a NAME the host does
    /// not have is left out). `host` looks a variable up.
    pub fn plugin_environment(
        &self,
        host: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Vec<(String, std::ffi::OsString)> {
        let mut env: Vec<(String, std::ffi::OsString)> = Vec::new();
        let mut set = |name: &str, value: Option<std::ffi::OsString>| {
            env.retain(|(n, _)| n != name);
            if let Some(v) = value {
                env.push((name.to_string(), v));
            }
        };
        set("CROSVM_FAST_CHANNEL", host("CROSVM_FAST_CHANNEL"));
        for e in &self.plugin_env {
            let value = match &e.value {
                Some(v) => Some(v.into()),
                None => host(&e.name),
            };
            set(&e.name, value);
        }
        env
    }

    /// The plugin's argv after argv[0]: `--params` then `--plugin-args`.
    pub fn plugin_argv(&self) -> Vec<String> {
        self.params
            .iter()
            .chain(&self.plugin_args)
            .cloned()
            .collect()
    }

    /// All bind mounts: command line first, then the list file.
    pub fn all_mounts(&self) -> Result<Vec<BindMount>, ConfigError> {
        let mut v = self.plugin_mount.clone();
        if let Some(f) = &self.plugin_mount_file {
            v.extend(read_list_file(f, parse_mount)?);
        }
        Ok(v)
    }

    /// All gid maps: command line first, then the list file.
    pub fn all_gid_maps(&self) -> Result<Vec<GidMap>, ConfigError> {
        let mut v = self.plugin_gid_map.clone();
        if let Some(f) = &self.plugin_gid_map_file {
            v.extend(read_list_file(f, parse_gid_map)?);
        }
        Ok(v)
    }

    /// Taps in creation order: --net, --tap-name, --tap-fd, then the
    /// deprecated --host-ip/--netmask/--mac triple.
    pub fn all_nets(&self) -> Result<Vec<NetSpec>, ConfigError> {
        let mut v = self.net.clone();
        v.extend(self.tap_name.iter().map(|name| NetSpec::TapName {
            name: name.clone(),
            mac: None,
        }));
        v.extend(
            self.tap_fd
                .iter()
                .map(|&fd| NetSpec::TapFd { fd, mac: None }),
        );
        match (self.host_ip, self.netmask, self.mac) {
            (None, None, None) => {}
            (Some(ip), Some(netmask), Some(mac)) => v.push(NetSpec::HostIp { ip, netmask, mac }),
            (None, _, _) => return Err(ConfigError::IncompleteNet("--host-ip")),
            (_, None, _) => return Err(ConfigError::IncompleteNet("--netmask")),
            (_, _, None) => return Err(ConfigError::IncompleteNet("--mac")),
        }
        Ok(v)
    }

    /// The KVM device node to open.
    pub fn kvm_path(&self) -> PathBuf {
        self.hypervisor
            .clone()
            .or_else(|| self.kvm_device.clone())
            .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
    }

    /// The jail options (`None` with `--disable-sandbox`); reads the list
    /// files.
    pub fn jail_config(&self) -> Result<Option<JailConfig>, ConfigError> {
        if self.disable_sandbox {
            return Ok(None);
        }
        Ok(Some(JailConfig {
            root: self.plugin_root.clone().or_else(|| self.pivot_root.clone()),
            mounts: self.all_mounts()?,
            gid_maps: self.all_gid_maps()?,
            policy: PolicySource::from_options(
                self.seccomp_policy.as_deref(),
                self.seccomp_policy_dir.as_deref(),
            ),
            log_failures: self.seccomp_log_failures,
        }))
    }

    /// The whole configuration of the run. `host` looks up the host's
    /// environment variables (for `--plugin-env NAME`).
    pub fn vm_config(
        &self,
        host: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<VmConfig, ConfigError> {
        let jail = self.jail_config()?;
        Ok(VmConfig {
            plugin: self.plugin.clone(),
            args: self.plugin_argv(),
            env: self.plugin_environment(host),
            vcpus: self.cpus.unwrap_or(1),
            vcpus_given: self.cpus.is_some(),
            restore: self.restore.clone(),
            incoming: self.incoming.clone(),
            incoming_timeout: self
                .incoming_timeout
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(std::time::Duration::from_secs_f64),
            on_plugin_crash: self.on_plugin_crash,
            allow_upgrade: self.hot_restart,
            kvm_path: self.kvm_path(),
            vcpu_cgroup_path: self.vcpu_cgroup_path.clone(),
            nets: self.all_nets()?,
            fast_channel: !self.no_fast_channel,
            memory_limits: self
                .max_guest_memory
                .map_or_else(GuestMemoryLimits::from_host, GuestMemoryLimits::at_most),
            jail,
            plugin_stderr_level: self.plugin_stderr_level,
            api_socket: self.api_socket.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_specs() {
        let m = parse_mount("/dev/null").unwrap();
        assert_eq!(
            (m.src.to_str(), m.dst.to_str(), m.writable),
            (Some("/dev/null"), Some("/dev/null"), false)
        );
        let m = parse_mount("/dev/null:/dev/zero").unwrap();
        assert_eq!(m.dst, PathBuf::from("/dev/zero"));
        assert!(parse_mount("/dev/null::true").unwrap().writable);
        assert!(parse_mount("/dev/null:/a:true:x").is_err());
        assert!(parse_mount("dev/null").is_err());
        assert!(parse_mount("/dev/null:rel").is_err());
        assert!(parse_mount("/dev/null::yes").is_err());
        assert!(parse_mount("/no/such/path/here").is_err());
        assert!(parse_mount("").is_err());
    }

    #[test]
    fn gid_map_specs() {
        let g = |s| parse_gid_map(s).map(|g| (g.inner, g.outer, g.count));
        assert_eq!(g("1:2:3"), Ok((1, 2, 3)));
        assert_eq!(g("1"), Ok((1, 1, 1)));
        assert_eq!(g("1:2"), Ok((1, 2, 1)));
        assert_eq!(g("1::3"), Ok((1, 1, 3)));
        assert!(g("1:2:").is_err());
        assert!(g(":1").is_err());
        assert!(g("1:2:3:4").is_err());
        assert!(g("x").is_err());
    }

    #[test]
    fn cpus_and_net() {
        assert_eq!(parse_cpus("4"), Ok(4));
        assert_eq!(parse_cpus("num-cores=2"), Ok(2));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("x").is_err());
        assert_eq!(
            parse_mac("de:21:e8:47:6b:6a"),
            Ok([0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a])
        );
        assert!(parse_mac("de:21:e8:47:6b").is_err());
        assert!(matches!(
            parse_net("tap-name=t0,mac=de:21:e8:47:6b:6a"),
            Ok(NetSpec::TapName { .. })
        ));
        assert!(matches!(
            parse_net("tap-fd=5,vq-pairs=2"),
            Ok(NetSpec::TapFd { fd: 5, mac: None })
        ));
        assert!(matches!(
            parse_net("host-ip=100.115.92.5,netmask=255.255.255.252,mac=de:21:e8:47:6b:6a"),
            Ok(NetSpec::HostIp { .. })
        ));
        assert!(parse_net("tap-name=t0,vhost-net=true").is_err());
        assert!(parse_net("host-ip=1.2.3.4").is_err());
    }

    #[test]
    fn argv_order_and_spaces() {
        let a = Args::from_command_line([
            "vmm",
            "--plugin",
            "/bin/true",
            "-p",
            "one two",
            "--cpus",
            "2",
            "--plugin-args",
            "--x",
            "three four",
        ])
        .unwrap();
        assert_eq!(a.plugin_argv(), vec!["one two", "--x", "three four"]);
        assert_eq!(a.cpus, Some(2));
    }

    #[test]
    fn crosvm_run_word_repeated_plugin_args_and_double_dash() {
        let a = Args::from_command_line([
            "vmm",
            "run",
            "-c",
            "1",
            "--plugin",
            "/bin/true",
            "--plugin-args",
            "A",
            "--plugin-args",
            "B",
            "-x",
            "--disable-sandbox",
            "--plugin-args",
            "--",
            "--cpus",
            "run",
        ])
        .unwrap();
        assert_eq!(a.plugin_argv(), vec!["A", "B", "-x", "--cpus", "run"]);
        assert_eq!(a.cpus, Some(1));
        assert!(a.disable_sandbox);
        // A vmm option after the plugin's arguments is honoured, in both
        // spellings.
        let a = Args::from_command_line([
            "vmm",
            "--plugin-args",
            "1",
            "2",
            "--disable-sandbox",
            "--plugin=/bin/true",
        ])
        .unwrap();
        assert!(a.disable_sandbox);
        assert_eq!(a.plugin_argv(), vec!["1", "2"]);
        // An empty argument survives.
        let a = Args::from_command_line(["vmm", "--plugin", "/x", "--plugin-args", ""]).unwrap();
        assert_eq!(a.plugin_argv(), vec![""]);
    }

    #[test]
    fn plugin_environment_is_minimal_and_named() {
        let host = |n: &str| match n {
            "HOME" => Some("/root".into()),
            "CROSVM_FAST_CHANNEL" => Some("0".into()),
            _ => None,
        };
        let a = Args::from_command_line(["vmm", "--plugin", "/x"]).unwrap();
        assert_eq!(
            a.plugin_environment(host),
            vec![("CROSVM_FAST_CHANNEL".to_string(), "0".into())]
        );
        let a = Args::from_command_line([
            "vmm",
            "--plugin",
            "/x",
            "--plugin-env",
            "HOME",
            "--plugin-env",
            "A=b=c",
            "--plugin-env",
            "NOPE",
            "--plugin-env",
            "CROSVM_FAST_CHANNEL=1",
        ])
        .unwrap();
        let env = a.plugin_environment(host);
        assert_eq!(
            env,
            vec![
                ("HOME".to_string(), "/root".into()),
                ("A".to_string(), "b=c".into()),
                ("CROSVM_FAST_CHANNEL".to_string(), "1".into()),
            ]
        );
        assert!(Args::from_command_line(["vmm", "--plugin", "/x", "--plugin-env", "=v"]).is_err());
        assert!(Args::from_command_line([
            "vmm",
            "--plugin",
            "/x",
            "--plugin-env",
            "CROSVM_SOCKET=3"
        ])
        .is_err());
    }

    #[test]
    fn list_file_comments() {
        let dir = std::env::temp_dir().join(format!("vmm-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("gids");
        std::fs::write(&f, "# header\n 1:2:3 # trailing\n\n5\n").unwrap();
        let v = read_list_file(&f, parse_gid_map).unwrap();
        assert_eq!(v.len(), 2);
        std::fs::write(&f, "1\nbad\n").unwrap();
        let e = read_list_file(&f, parse_gid_map).unwrap_err();
        assert!(e.to_string().contains(":2:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `--max-guest-memory`: a byte count with an optional K/M/G/T suffix.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "unknown size suffix `{c}` in `{s}` (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("`{s}` is not a size: {e}"))?;
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size `{s}` is zero or too large"))
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert_eq!(super::parse_size("64M"), Ok(64 << 20));
        assert_eq!(super::parse_size("2g"), Ok(2 << 30));
        assert!(super::parse_size("0").is_err());
        assert!(super::parse_size("1X").is_err());
        assert!(super::parse_size("99999999999T").is_err());
    }
}
