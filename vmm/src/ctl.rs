//! `vmm ctl [--json] [--timeout SECS] PATH COMMAND [ARGS]`: commands a
//! running vmm through its control socket (`--api-socket PATH`), with
//! `vmm_client`; and crosvm's spellings `vmm stop|suspend|resume|powerbtn
//! PATH`. Human output by default, `--json` for scripts
//! (docs/control-api.md §8).
//!
//! Exit status: 0 on success; 1 with `vmm ctl: error: <cause chain>` on
//! stderr otherwise; [`USAGE_STATUS`] for a command line that does not
//! parse.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;
use vmm_client::proto::{Command, Event, StatsReport, Status, VcpuTids};
use vmm_client::{Client, ClientError};

/// Exit status of `vmm ctl` for a command line that does not parse
/// (clap's).
pub const USAGE_STATUS: u8 = 2;

/// The default wait for an answer, in seconds.
pub const DEFAULT_TIMEOUT_SECS: f64 = 30.0;

/// Commands a running vmm through its control socket.
#[derive(Debug, Parser)]
#[command(
    name = "vmm ctl",
    version,
    about = "Commands a running vmm through its control socket (vmm --api-socket PATH)",
    long_about = None,
    after_help = "crosvm spellings: vmm stop PATH, vmm suspend PATH (pause all), vmm resume PATH, vmm powerbtn PATH"
)]
pub struct CtlArgs {
    /// Print the raw JSON result (events: one JSON object per line).
    #[arg(long, global = true)]
    pub json: bool,

    /// Longest wait for vmm's answer, in seconds; 0 waits forever
    /// (default 30; for `events`, the wait between events is unbounded
    /// unless given).
    #[arg(long, value_name = "SECS", global = true, value_parser = parse_secs)]
    pub timeout: Option<f64>,

    /// vmm's control socket (`vmm --api-socket PATH`).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,

    #[command(subcommand)]
    pub command: CtlCommand,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1e9).contains(&v) => Ok(v),
        _ => Err(format!(
            "\"{s}\" is not a number of seconds (0 to 1e9; 0 = no limit)"
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum CtlCommand {
    /// State, vcpus, plugin pid, uptime, exits per vcpu, live objects.
    Status,
    /// Pause all vcpus, or the listed ones: no guest instruction runs.
    Pause {
        #[arg(value_name = "VCPU")]
        vcpus: Vec<u32>,
    },
    /// Resume all vcpus, or the listed ones.
    Resume {
        #[arg(value_name = "VCPU")]
        vcpus: Vec<u32>,
    },
    /// Orderly shutdown, as when the VM ends on its own.
    Stop,
    /// End the VM at once.
    Kill,
    /// Thread ids of the vcpu threads.
    VcpuTids,
    /// Per request type count, errors, latency; exits per vcpu by range.
    Stats,
    /// Print events as they come, until the VM exits or COUNT events.
    Events {
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Press the power button (forwarded to the plugin).
    Powerbtn,
    /// Press the sleep button (forwarded to the plugin).
    Sleepbtn,
    /// A command of the plugin's own, with JSON arguments.
    Plugin {
        /// The plugin's command.
        name: String,
        /// Its arguments, as JSON (e.g. '{"n": 3}').
        #[arg(value_name = "JSON")]
        args: Option<String>,
    },
    /// Snapshot the machine into DIR (docs/snapshot-format.md); restore it
    /// with `vmm --restore DIR --plugin P`.
    Snapshot {
        /// The snapshot directory (created; must not hold a snapshot).
        dir: PathBuf,
        /// `without_device_state`: do not ask the plugin for its device
        /// state (for plugins that do not take part in snapshots).
        #[arg(value_name = "without_device_state", value_parser = ["without_device_state"])]
        mode: Option<String>,
    },
    /// Live-migrate the machine to ADDR (`unix:PATH` or `tcp:HOST:PORT`)
    /// where `vmm --incoming ADDR --plugin P` waits; this VM ends when the
    /// target runs (docs/migration-stream.md).
    Migrate {
        /// The target's address.
        addr: String,
        /// The downtime target in milliseconds (default 20).
        #[arg(long = "downtime-ms", value_name = "N")]
        downtime_ms: Option<u64>,
    },
    /// Replace the running plugin by NEW_PLUGIN (hot restart; vmm runs
    /// with --hot-restart and the plugin declared it can be restarted)
    Upgrade {
        /// The new plugin's path (resolved here)
        plugin: PathBuf,
        /// Its arguments
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

impl CtlCommand {
    /// The protocol's request for this command.
    pub fn to_command(&self) -> Result<Command, CtlError> {
        let list = |v: &Vec<u32>| (!v.is_empty()).then(|| v.clone());
        Ok(match self {
            CtlCommand::Status => Command::Status,
            CtlCommand::Pause { vcpus } => Command::Pause { vcpus: list(vcpus) },
            CtlCommand::Resume { vcpus } => Command::Resume { vcpus: list(vcpus) },
            CtlCommand::Stop => Command::Stop,
            CtlCommand::Kill => Command::Kill,
            CtlCommand::VcpuTids => Command::VcpuTids,
            CtlCommand::Stats => Command::Stats,
            CtlCommand::Events { .. } => Command::Events { subscribe: true },
            CtlCommand::Powerbtn => Command::PowerButton,
            CtlCommand::Sleepbtn => Command::SleepButton,
            CtlCommand::Plugin { name, args } => Command::Plugin {
                name: name.clone(),
                args: match args {
                    None => Value::Null,
                    Some(s) => serde_json::from_str(s).map_err(|source| CtlError::BadJson {
                        name: name.clone(),
                        source,
                    })?,
                },
            },
            CtlCommand::Snapshot { dir, mode } => Command::Snapshot {
                // vmm resolves a relative path against its own directory:
                // send the one this command names.
                dir: std::path::absolute(dir)
                    .unwrap_or_else(|_| dir.clone())
                    .to_string_lossy()
                    .into_owned(),
                without_device_state: mode.is_some(),
            },
            CtlCommand::Migrate { addr, downtime_ms } => Command::Migrate {
                // A relative unix path is this command's, not vmm's.
                to: match addr.strip_prefix("unix:") {
                    Some(p) => format!(
                        "unix:{}",
                        std::path::absolute(p)
                            .map_or_else(|_| p.to_string(), |a| a.to_string_lossy().into_owned())
                    ),
                    None => addr.clone(),
                },
                downtime_ms: downtime_ms.unwrap_or(vmm_client::proto::DEFAULT_DOWNTIME_MS),
            },
            CtlCommand::Upgrade { plugin, args } => Command::Upgrade {
                plugin: std::path::absolute(plugin)
                    .unwrap_or_else(|_| plugin.clone())
                    .to_string_lossy()
                    .into_owned(),
                args: args.clone(),
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("plugin {name}: the arguments are not JSON")]
    BadJson {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{command}: unexpected result {excerpt}")]
    BadResult {
        command: &'static str,
        excerpt: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// crosvm's `vmm stop|suspend|resume|powerbtn [OPTIONS] PATH` as the
/// arguments of `vmm ctl` (`argv[0]` dropped); `None` for other words.
pub fn crosvm_spelling(argv: &[OsString]) -> Option<Vec<OsString>> {
    let word = argv.get(1)?.to_str()?;
    let command = match word {
        "stop" => "stop",
        "suspend" => "pause",
        "resume" => "resume",
        "powerbtn" => "powerbtn",
        _ => return None,
    };
    let mut out: Vec<OsString> = vec!["vmm ctl".into()];
    out.extend(argv[2..].iter().cloned());
    out.push(command.into());
    Some(out)
}

/// Runs `vmm ctl` with `args` (`args[0]` is the program name) and returns
/// the exit status.
pub fn main(args: Vec<OsString>) -> u8 {
    let parsed = match CtlArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let status = if e.use_stderr() { USAGE_STATUS } else { 0 };
            let _ = e.print();
            return status;
        }
    };
    let mut out = std::io::stdout().lock();
    match run(&parsed, &mut out) {
        Ok(()) => 0,
        // `vmm ctl ... events | head`: the reader left; not a failure.
        Err(CtlError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            let _ = out.flush();
            eprintln!("vmm ctl: error: {}", vmm_client::error_chain(&e));
            1
        }
    }
}

fn secs(s: f64) -> Option<Duration> {
    (s > 0.0).then(|| Duration::from_secs_f64(s))
}

/// Connects, sends the command, prints the result to `out`.
pub fn run(args: &CtlArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let command = args.command.to_command()?;
    let timeout = secs(args.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS));
    let mut client = Client::connect_timeout(&args.path, timeout)?;
    let w = |out: &mut dyn Write, s: String| out.write_all(s.as_bytes()).map_err(CtlError::Output);
    if let CtlCommand::Events { count } = args.command {
        client.subscribe()?;
        // Between events, wait as long as asked (default: forever).
        client.set_timeout(args.timeout.and_then(secs));
        let mut seen = 0u64;
        if count == Some(0) {
            return Ok(());
        }
        for event in client.events() {
            let event = event?;
            let line = if args.json {
                format!("{}\n", serde_json::to_string(&event).unwrap_or_default())
            } else {
                format_event(&event)
            };
            w(out, line)?;
            out.flush().map_err(CtlError::Output)?;
            seen += 1;
            if count == Some(seen) || event.event == "plugin-exited" {
                break;
            }
        }
        return Ok(());
    }
    let value = client.request(&command)?;
    if args.json {
        return w(out, format!("{value}\n"));
    }
    let text = match &args.command {
        CtlCommand::Status => format_status(&typed::<Status>("status", value)?),
        CtlCommand::VcpuTids => format_vcpu_tids(&typed::<VcpuTids>("vcpu-tids", value)?),
        CtlCommand::Stats => format_stats(&typed::<StatsReport>("stats", value)?),
        _ => format_value(&value),
    };
    w(out, text)
}

fn typed<T: serde::de::DeserializeOwned>(command: &'static str, v: Value) -> Result<T, CtlError> {
    serde_json::from_value(v.clone()).map_err(|source| CtlError::BadResult {
        command,
        excerpt: v.to_string().chars().take(120).collect(),
        source,
    })
}

/// `key: value` lines with the values aligned.
fn aligned(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut s = String::new();
    for (k, v) in rows {
        s.push_str(&format!("{:<width$} {v}\n", format!("{k}:")));
    }
    s
}

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// A duration for people: `950ns`, `12.5µs`, `3.20ms`, `1.234s`.
pub fn human_ns(ns: u64) -> String {
    let f = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.1}µs", f / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2}ms", f / 1e6)
    } else {
        format!("{:.3}s", f / 1e9)
    }
}

pub fn format_status(s: &Status) -> String {
    let mut rows = vec![
        ("state", s.state.clone()),
        ("vcpus", s.vcpus.to_string()),
        ("paused vcpus", list(&s.paused_vcpus)),
        ("plugin pid", s.plugin_pid.to_string()),
    ];
    if let Some(p) = s.jail_init_pid {
        rows.push(("jail init pid", p.to_string()));
    }
    rows.extend([
        ("plugin", s.plugin.clone()),
        ("vmm pid", s.vmm_pid.to_string()),
        ("uptime", human_ns(s.uptime_ms.saturating_mul(1_000_000))),
        (
            "exits",
            list(
                s.exits
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("vcpu{i} {n}")),
            ),
        ),
        (
            "objects",
            list(s.objects.iter().map(|(k, n)| format!("{k} {n}"))),
        ),
    ]);
    aligned(&rows)
}

pub fn format_vcpu_tids(t: &VcpuTids) -> String {
    let mut s = format!("vmm pid {}\n{:>6} {:>10}\n", t.pid, "vcpu", "tid");
    for v in &t.vcpus {
        s.push_str(&format!("{:>6} {:>10}\n", v.vcpu, v.tid));
    }
    s
}

pub fn format_stats(r: &StatsReport) -> String {
    if r.collecting == Some(false) {
        return format!(
            "{}\n",
            r.note
                .as_deref()
                .unwrap_or("vmm does not collect statistics (run it with --stats)")
        );
    }
    let mut s = format!(
        "{:<7} {:<24} {:>9} {:>7} {:>9} {:>9} {:>9}\n",
        "channel", "request", "count", "errors", "p50", "p99", "max"
    );
    for q in &r.requests {
        s.push_str(&format!(
            "{:<7} {:<24} {:>9} {:>7} {:>9} {:>9} {:>9}\n",
            q.channel,
            q.request,
            q.count,
            q.errors,
            human_ns(q.p50_ns),
            human_ns(q.p99_ns),
            human_ns(q.max_ns)
        ));
    }
    for v in &r.vcpus {
        s.push_str(&format!(
            "vcpu{}: {} resumed event(s), {} waiting on the plugin (p50 {}, p99 {}, max {})\n",
            v.id,
            v.resumed_events,
            human_ns(v.waiting_on_plugin_ns),
            human_ns(v.wait_p50_ns),
            human_ns(v.wait_p99_ns),
            human_ns(v.wait_max_ns)
        ));
        for e in &v.exits {
            let range = match (e.start, e.length) {
                (Some(a), Some(l)) => format!("{a:#x}..{:#x}", a.saturating_add(l)),
                _ => "unreserved".into(),
            };
            s.push_str(&format!(
                "  {:<6} {:<24} {:>10} exit(s)\n",
                e.space, range, e.exits
            ));
        }
    }
    s
}

/// A value without a dedicated format: `ok` for null, `key: value` lines
/// for an object, the JSON otherwise.
pub fn format_value(v: &Value) -> String {
    match v {
        Value::Null => "ok\n".into(),
        Value::Object(o) if !o.is_empty() => {
            let rows: Vec<(&str, String)> = o
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str(),
                        match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        },
                    )
                })
                .collect();
            aligned(&rows)
        }
        other => format!("{other}\n"),
    }
}

/// One event on one line: `#3 1.520s paused vcpus=[0,1]`.
pub fn format_event(e: &Event) -> String {
    let mut s = format!(
        "#{} {}.{:03}s {}",
        e.seq,
        e.uptime_ms / 1000,
        e.uptime_ms % 1000,
        e.event
    );
    match &e.data {
        Value::Null => {}
        Value::Object(o) => {
            for (k, v) in o {
                match v {
                    Value::String(t) => s.push_str(&format!(" {k}={t}")),
                    other => s.push_str(&format!(" {k}={other}")),
                }
            }
        }
        other => s.push_str(&format!(" {other}")),
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        CtlArgs::try_parse_from(std::iter::once("vmm ctl").chain(args.iter().copied()))
    }

    #[test]
    fn migrate_takes_an_address_and_a_downtime_and_checks_them() {
        let a = parse(&[
            "/tmp/s",
            "migrate",
            "tcp:127.0.0.1:4000",
            "--downtime-ms",
            "5",
        ])
        .unwrap();
        let c = a.command.to_command().unwrap();
        assert_eq!(
            c,
            Command::Migrate {
                to: "tcp:127.0.0.1:4000".into(),
                downtime_ms: 5
            }
        );
        let a = parse(&["/tmp/s", "migrate", "unix:/tmp/in.sock"]).unwrap();
        let c = a.command.to_command().unwrap();
        assert_eq!(
            c,
            Command::Migrate {
                to: "unix:/tmp/in.sock".into(),
                downtime_ms: 20
            }
        );
        // The server side checks what any client sends.
        let refusal = |to: &str, downtime_ms: u64| {
            let req = Command::Migrate {
                to: to.into(),
                downtime_ms,
            }
            .to_request(serde_json::json!(1));
            let line = serde_json::to_vec(&req).unwrap();
            format!(
                "{:?}",
                vmm_client::proto::parse_request(&line)
                    .unwrap_err()
                    .into_response()
            )
        };
        let e = refusal("ftp:x", 20);
        assert!(e.contains("unix:PATH or tcp:HOST:PORT"), "{e}");
        let e = refusal("unix:/x", 0);
        assert!(e.contains("downtime_ms"), "{e}");
    }

    #[test]
    fn command_lines_map_to_requests() {
        let a = parse(&["/tmp/s", "pause", "0", "2"]).unwrap();
        assert_eq!(
            a.command.to_command().unwrap(),
            Command::Pause {
                vcpus: Some(vec![0, 2])
            }
        );
        let a = parse(&["--json", "/tmp/s", "resume"]).unwrap();
        assert!(a.json);
        assert_eq!(
            a.command.to_command().unwrap(),
            Command::Resume { vcpus: None }
        );
        // Options after the command work too.
        let a = parse(&["/tmp/s", "status", "--json", "--timeout", "1.5"]).unwrap();
        assert!(a.json);
        assert_eq!(a.timeout, Some(1.5));
        let a = parse(&["/tmp/s", "plugin", "count", r#"{"n":1}"#]).unwrap();
        assert_eq!(
            a.command.to_command().unwrap(),
            Command::Plugin {
                name: "count".into(),
                args: serde_json::json!({"n": 1})
            }
        );
        let a = parse(&["/tmp/s", "plugin", "count", "{oops"]).unwrap();
        let e = a.command.to_command().unwrap_err();
        assert!(
            vmm_client::error_chain(&e).starts_with("plugin count: the arguments are not JSON: "),
            "{e}"
        );
        let a = parse(&["/tmp/s", "events", "--count", "3"]).unwrap();
        assert_eq!(a.command, CtlCommand::Events { count: Some(3) });
        for bad in [
            &["/tmp/s"][..],
            &["/tmp/s", "frobnicate"],
            &["/tmp/s", "pause", "x"],
            &["/tmp/s", "status", "--timeout", "-1"],
            &["/tmp/s", "stop", "extra"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crosvm_spellings() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        for (word, cmd) in [
            ("stop", "stop"),
            ("suspend", "pause"),
            ("resume", "resume"),
            ("powerbtn", "powerbtn"),
        ] {
            assert_eq!(
                crosvm_spelling(&os(&["vmm", word, "/tmp/s"])),
                Some(os(&["vmm ctl", "/tmp/s", cmd]))
            );
        }
        assert_eq!(crosvm_spelling(&os(&["vmm", "run", "--plugin", "x"])), None);
        let a = CtlArgs::try_parse_from(crosvm_spelling(&os(&["vmm", "suspend", "/s"])).unwrap())
            .unwrap();
        assert_eq!(
            a.command.to_command().unwrap(),
            Command::Pause { vcpus: None }
        );
    }

    #[test]
    fn human_formats() {
        let s = Status {
            state: "paused".into(),
            vcpus: 2,
            paused_vcpus: vec![0, 1],
            plugin_pid: 7,
            jail_init_pid: None,
            plugin: "/bin/p".into(),
            vmm_pid: 6,
            uptime_ms: 1500,
            exits: vec![3, 4],
            objects: [("memory".to_string(), 1)].into_iter().collect(),
        };
        assert_eq!(
            format_status(&s),
            "state:        paused\nvcpus:        2\npaused vcpus: 0, 1\nplugin pid:   7\n\
             plugin:       /bin/p\nvmm pid:      6\nuptime:       1.500s\n\
             exits:        vcpu0 3, vcpu1 4\nobjects:      memory 1\n"
        );
        assert_eq!(format_value(&Value::Null), "ok\n");
        assert_eq!(
            format_value(&serde_json::json!({"state": "stopping"})),
            "state: stopping\n"
        );
        assert_eq!(
            format_event(&Event {
                event: "paused".into(),
                seq: 3,
                uptime_ms: 1520,
                data: serde_json::json!({"vcpus": [0, 1]})
            }),
            "#3 1.520s paused vcpus=[0,1]\n"
        );
        assert_eq!(human_ns(950), "950ns");
        assert_eq!(human_ns(12_500), "12.5µs");
        assert_eq!(human_ns(3_200_000), "3.20ms");
    }

    /// The host's `stats` result (`vmm::stats::Report` serialized) reads as
    /// the client's `StatsReport`: the two definitions agree.
    #[test]
    fn the_hosts_stats_report_reads_as_the_clients() {
        let mut v = crate::stats::VcpuStats::default();
        v.request("resume", false, Duration::from_micros(3));
        use crate::stats::ExitKey;
        v.exits.insert(
            ExitKey {
                mmio: false,
                range: Some((0x500, 4)),
            },
            1,
        );
        v.exits.insert(
            ExitKey {
                mmio: true,
                range: None,
            },
            1,
        );
        v.waited(Duration::from_micros(5));
        let mut main = crate::stats::RequestTable::new();
        main.entry("create_memory").or_default().errors = 1;
        let report = crate::stats::build(&main, &[(0, v)].into_iter().collect());
        let client: StatsReport = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(client.requests.len(), report.requests.len());
        assert_eq!(client.vcpus[0].exits.len(), 2);
        assert_eq!(client.vcpus[0].exits[0].start, Some(0x500));
        assert_eq!(client.vcpus[0].exits[1].start, None);
        assert_eq!(client.vcpus[0].resumed_events, 1);
        let t = format_stats(&client);
        assert!(t.contains("IoPort 0x500..0x504"), "{t}");
        assert!(t.contains("Mmio   unreserved"), "{t}");
    }
}
