//! The control protocol's messages (docs/control-api.md).
//!
//! A connection is a `SOCK_STREAM` unix socket carrying one JSON object per
//! line (`\n`-terminated, at most [`MAX_MESSAGE`] bytes with the newline).
//! The server speaks first with a [`Greeting`]; then the client sends
//! [`Request`]s and the server answers each with a [`Response`] carrying
//! the request's id, in any order, and pushes [`Event`]s to clients that
//! subscribed. Descriptors ride with a request as `SCM_RIGHTS` ancillary
//! data of the `sendmsg` that carries the request line (at most [`MAX_FDS`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this crate speaks. A request may name the version
/// it was written for (`"protocol": 1`); the server refuses another one.
pub const PROTOCOL_VERSION: u32 = 1;

/// Most bytes of one message line, newline included, in either direction.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Most descriptors carried by one request.
pub const MAX_FDS: usize = 8;

/// Most vcpus a `pause`/`resume` list may name.
pub const MAX_VCPU_LIST: usize = 1024;

/// Most bytes of a plugin command's name.
pub const MAX_PLUGIN_NAME: usize = 64;

/// Longest snapshot directory path (`snapshot`).
pub const MAX_SNAPSHOT_DIR: usize = 4096;

/// The first line the server sends: `{"greeting": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// [`PROTOCOL_VERSION`] of the server.
    pub protocol: u32,
    /// vmm's version (`CARGO_PKG_VERSION`).
    pub vmm: String,
    /// vmm's process id.
    pub pid: u32,
}

/// A request id: a JSON number or string chosen by the client, echoed in
/// the response. Absent ids are answered with `"id": null`.
pub type Id = Value;

/// A request line: `{"id": 7, "command": "pause", "args": {"vcpus": [0]}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub id: Id,
    pub command: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

/// The commands, typed (what [`parse_request`] makes of a [`Request`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// State, vcpus, plugin pid, uptime, exits per vcpu, live objects.
    Status,
    /// Pause all vcpus (`None`) or the listed ones.
    Pause { vcpus: Option<Vec<u32>> },
    /// Resume all vcpus (`None`) or the listed ones.
    Resume { vcpus: Option<Vec<u32>> },
    /// Orderly shutdown, as when the VM ends on its own.
    Stop,
    /// End the VM at once.
    Kill,
    /// Thread ids of the vcpu threads.
    VcpuTids,
    /// Request and exit statistics.
    Stats,
    /// Subscribe this connection to events (`subscribe: false` ends it).
    Events { subscribe: bool },
    /// The power button, forwarded to the plugin.
    PowerButton,
    /// The sleep button, forwarded to the plugin.
    SleepButton,
    /// A command of the plugin's own, with its JSON arguments.
    Plugin { name: String, args: Value },
    /// Snapshot the machine into directory `dir` (docs/snapshot-format.md);
    /// `without_device_state`: without asking the plugin for its state.
    Snapshot {
        dir: String,
        without_device_state: bool,
    },
    /// Live-migrate the machine to `to` (`unix:PATH` or `tcp:HOST:PORT`,
    /// where `vmm --incoming` waits), stopping the guest for at most about
    /// `downtime_ms` (docs/migration-stream.md).
    Migrate { to: String, downtime_ms: u64 },
    /// Replace the running plugin by `plugin args...` (hot restart,
    /// docs/protocol-extensions.md §9).
    Upgrade { plugin: String, args: Vec<String> },
}

/// Longest migration address (`migrate`).
pub const MAX_MIGRATE_ADDR: usize = 4096;
/// Default downtime target of `migrate`, in milliseconds.
pub const DEFAULT_DOWNTIME_MS: u64 = 20;
/// Largest downtime target of `migrate`, in milliseconds.
pub const MAX_DOWNTIME_MS: u64 = 60_000;

/// Most arguments of `upgrade`, and bytes of its path and of each argument.
pub const MAX_UPGRADE_ARGS: usize = 256;
pub const MAX_UPGRADE_ARG: usize = 4096;

impl Command {
    /// The command's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::Stop => "stop",
            Command::Kill => "kill",
            Command::VcpuTids => "vcpu-tids",
            Command::Stats => "stats",
            Command::Events { .. } => "events",
            Command::PowerButton => "powerbtn",
            Command::SleepButton => "sleepbtn",
            Command::Plugin { .. } => "plugin",
            Command::Snapshot { .. } => "snapshot",
            Command::Migrate { .. } => "migrate",
            Command::Upgrade { .. } => "upgrade",
        }
    }

    /// The request line for this command (without the newline).
    pub fn to_request(&self, id: Id) -> Request {
        let args = match self {
            Command::Pause { vcpus: Some(v) } | Command::Resume { vcpus: Some(v) } => {
                serde_json::json!({ "vcpus": v })
            }
            Command::Events { subscribe: false } => serde_json::json!({ "subscribe": false }),
            Command::Plugin { name, args } => serde_json::json!({ "name": name, "args": args }),
            Command::Snapshot {
                dir,
                without_device_state,
            } => serde_json::json!({ "dir": dir, "without_device_state": without_device_state }),
            Command::Migrate { to, downtime_ms } => {
                serde_json::json!({ "to": to, "downtime_ms": downtime_ms })
            }
            Command::Upgrade { plugin, args } => {
                serde_json::json!({ "plugin": plugin, "args": args })
            }
            _ => Value::Null,
        };
        Request {
            id,
            command: self.name().to_string(),
            args,
            protocol: Some(PROTOCOL_VERSION),
        }
    }
}

/// Why a request was refused; the `code` of an error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The line is not JSON.
    ParseError,
    /// JSON, but not a request (not an object, no `command`, a bad id).
    BadRequest,
    UnknownCommand,
    /// An argument is missing, unknown, of the wrong type or out of range.
    BadArgument,
    /// The line is longer than [`MAX_MESSAGE`].
    TooLarge,
    /// More than [`MAX_FDS`] descriptors, or descriptors a command does
    /// not take.
    BadDescriptors,
    /// The client's uid may not command this VM.
    PermissionDenied,
    UnsupportedProtocol,
    /// Too many requests outstanding on this connection or in the VM.
    Busy,
    /// The command does not apply in the VM's current state (e.g. `pause`
    /// while `starting` or `stopping`).
    InvalidState,
    /// The plugin does not take control commands (it never opened its
    /// control channel: an older plugin).
    NotSupported,
    /// The plugin answered with an error.
    PluginError,
    /// The plugin did not answer in time.
    Timeout,
    /// The host failed to carry out the command.
    Internal,
}

/// An error response's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// What went wrong, for a person: names the command and argument.
    pub message: String,
}

/// A response line: `{"id": 7, "ok": {...}}` or
/// `{"id": 7, "error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: Id,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    pub fn ok(id: Id, value: Value) -> Self {
        Response {
            id,
            ok: Some(value),
            error: None,
        }
    }

    pub fn error(id: Id, code: ErrorCode, message: impl Into<String>) -> Self {
        Response {
            id,
            ok: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}

/// An event line: `{"event": "paused", "seq": 3, "uptime_ms": 1520, "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// One of [`EVENT_NAMES`].
    pub event: String,
    /// Increases by one per event of the VM, from 1: a subscriber sees
    /// gaps only when it was dropped for not reading.
    pub seq: u64,
    /// Milliseconds since vmm started.
    pub uptime_ms: u64,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

/// The events a subscriber receives and their `data`:
/// - `running`: the vcpus started; `{"vcpus": N}`
/// - `paused` / `resumed`: `{"vcpus": [ids]}`, after the vcpus stopped
///   running guest code / were let go
/// - `vcpu-stopped`: `{"vcpu": id, "reason": "..."}`
/// - `stopping`: the VM is shutting down; `{"reason": "..."}`
/// - `plugin-exited`: `{"pid": P, "status": S}` or `{"pid": P, "signal": "SIGKILL"}`
/// - `error`: `{"message": "..."}` (a failure that ends or harms the run)
/// - `snapshot-started`: `{"dir": "..."}`
/// - `snapshot-done`: `{"dir", "bytes", "ms", "memory_pages"}` or
///   `{"dir", "error"}`
/// - `migration-started`: `{"to": ADDR}`
/// - `migration-done`: `{"to", "downtime_ms", "total_ms", "rounds",
///   "pages", "bytes"}` (the VM ends next)
/// - `migration-failed`: `{"to", "error"}` (the VM goes on, unless the
///   error says the target may be running)
pub const EVENT_NAMES: &[&str] = &[
    "running",
    "paused",
    "resumed",
    "vcpu-stopped",
    "stopping",
    "plugin-exited",
    "error",
    "snapshot-started",
    "snapshot-done",
    "migration-started",
    "migration-done",
    "migration-failed",
];

/// Any line the server sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Greeting(Greeting),
    Response(Response),
    Event(Event),
}

impl ServerMessage {
    /// Parses one server line (without the newline).
    pub fn parse(line: &[u8]) -> Result<ServerMessage, serde_json::Error> {
        #[derive(Deserialize)]
        struct GreetingLine {
            greeting: Greeting,
        }
        let v: Value = serde_json::from_slice(line)?;
        if v.get("greeting").is_some() {
            return serde_json::from_value::<GreetingLine>(v)
                .map(|g| ServerMessage::Greeting(g.greeting));
        }
        if v.get("event").is_some() {
            return serde_json::from_value(v).map(ServerMessage::Event);
        }
        serde_json::from_value(v).map(ServerMessage::Response)
    }

    /// The line for this message, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = match self {
            ServerMessage::Greeting(g) => serde_json::to_vec(&serde_json::json!({ "greeting": g })),
            ServerMessage::Response(r) => serde_json::to_vec(r),
            ServerMessage::Event(e) => serde_json::to_vec(e),
        }
        .unwrap_or_else(|_| b"{}".to_vec());
        out.push(b'\n');
        out
    }
}

/// A refused request: the id (when one could be read) and the error.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub id: Id,
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    fn new(id: &Id, code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            id: id.clone(),
            code,
            message: message.into(),
        }
    }

    /// The response that refuses the request.
    pub fn into_response(self) -> Response {
        Response::error(self.id, self.code, self.message)
    }
}

/// Parses one request line (without the newline) into its id and typed
/// command. Never panics; every refusal names the command and argument.
pub fn parse_request(line: &[u8]) -> Result<(Id, Command), RequestError> {
    let null = Value::Null;
    if line.len() >= MAX_MESSAGE {
        return Err(RequestError::new(
            &null,
            ErrorCode::TooLarge,
            format!("a request is at most {} bytes", MAX_MESSAGE - 1),
        ));
    }
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| RequestError::new(&null, ErrorCode::ParseError, format!("not JSON: {e}")))?;
    let Value::Object(mut obj) = v else {
        return Err(RequestError::new(
            &null,
            ErrorCode::BadRequest,
            "a request is a JSON object with \"command\"",
        ));
    };
    let id = obj.remove("id").unwrap_or(Value::Null);
    if !matches!(id, Value::Null | Value::Number(_) | Value::String(_)) {
        return Err(RequestError::new(
            &null,
            ErrorCode::BadRequest,
            "\"id\" must be a number or a string",
        ));
    }
    for key in obj.keys() {
        if !matches!(key.as_str(), "command" | "args" | "protocol") {
            return Err(RequestError::new(
                &id,
                ErrorCode::BadRequest,
                format!("unknown request field \"{}\"", truncate(key, 64)),
            ));
        }
    }
    if let Some(p) = obj.get("protocol") {
        match p.as_u64() {
            Some(p) if p == u64::from(PROTOCOL_VERSION) => {}
            _ => {
                return Err(RequestError::new(
                    &id,
                    ErrorCode::UnsupportedProtocol,
                    format!(
                        "protocol {} is not supported; this vmm speaks protocol {PROTOCOL_VERSION}",
                        truncate(&p.to_string(), 32)
                    ),
                ))
            }
        }
    }
    let command = match obj.get("command") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(RequestError::new(
                &id,
                ErrorCode::BadRequest,
                "\"command\" must be a string",
            ))
        }
        None => {
            return Err(RequestError::new(
                &id,
                ErrorCode::BadRequest,
                "a request needs \"command\"",
            ))
        }
    };
    let args = obj.remove("args").unwrap_or(Value::Null);
    let cmd = parse_command(&command, args).map_err(|(code, m)| RequestError::new(&id, code, m))?;
    Ok((id, cmd))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

type ArgError = (ErrorCode, String);

fn bad(command: &str, message: impl std::fmt::Display) -> ArgError {
    (ErrorCode::BadArgument, format!("{command}: {message}"))
}

/// The args object of `command`; `allowed` lists its keys.
fn args_object(
    command: &str,
    args: Value,
    allowed: &[&str],
) -> Result<serde_json::Map<String, Value>, ArgError> {
    let obj = match args {
        Value::Null => serde_json::Map::new(),
        Value::Object(o) => o,
        _ => return Err(bad(command, "\"args\" must be an object")),
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(if allowed.is_empty() {
            bad(
                command,
                format!("takes no arguments (got \"{}\")", truncate(k, 64)),
            )
        } else {
            bad(
                command,
                format!(
                    "unknown argument \"{}\" (takes {})",
                    truncate(k, 64),
                    allowed.join(", ")
                ),
            )
        });
    }
    Ok(obj)
}

fn vcpu_list(
    command: &str,
    obj: &serde_json::Map<String, Value>,
) -> Result<Option<Vec<u32>>, ArgError> {
    let Some(v) = obj.get("vcpus") else {
        return Ok(None);
    };
    let Value::Array(items) = v else {
        return Err(bad(command, "\"vcpus\" must be an array of vcpu ids"));
    };
    if items.len() > MAX_VCPU_LIST {
        return Err(bad(
            command,
            format!("\"vcpus\" lists at most {MAX_VCPU_LIST} ids"),
        ));
    }
    let mut ids = Vec::with_capacity(items.len());
    for item in items {
        match item.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => ids.push(n),
            None => {
                return Err(bad(
                    command,
                    format!(
                        "\"vcpus\" holds {}, not a vcpu id",
                        truncate(&item.to_string(), 32)
                    ),
                ))
            }
        }
    }
    Ok(Some(ids))
}

/// Types the arguments of `command`.
pub fn parse_command(command: &str, args: Value) -> Result<Command, (ErrorCode, String)> {
    let simple = |c: Command, args: Value| args_object(command, args, &[]).map(|_| c);
    match command {
        "status" => simple(Command::Status, args),
        "stop" => simple(Command::Stop, args),
        "kill" => simple(Command::Kill, args),
        "vcpu-tids" => simple(Command::VcpuTids, args),
        "stats" => simple(Command::Stats, args),
        "powerbtn" => simple(Command::PowerButton, args),
        "sleepbtn" => simple(Command::SleepButton, args),
        "pause" | "resume" => {
            let obj = args_object(command, args, &["vcpus"])?;
            let vcpus = vcpu_list(command, &obj)?;
            Ok(if command == "pause" {
                Command::Pause { vcpus }
            } else {
                Command::Resume { vcpus }
            })
        }
        "events" => {
            let obj = args_object(command, args, &["subscribe"])?;
            let subscribe = match obj.get("subscribe") {
                None => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad(command, "\"subscribe\" must be true or false")),
            };
            Ok(Command::Events { subscribe })
        }
        "plugin" => {
            let mut obj = args_object(command, args, &["name", "args"])?;
            let name = match obj.remove("name") {
                Some(Value::String(s)) => s,
                Some(_) => return Err(bad(command, "\"name\" must be a string")),
                None => return Err(bad(command, "needs \"name\", the plugin's command")),
            };
            if name.is_empty()
                || name.len() > MAX_PLUGIN_NAME
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(bad(
                    command,
                    format!(
                        "\"name\" is 1 to {MAX_PLUGIN_NAME} characters of [A-Za-z0-9._-] (got \"{}\")",
                        truncate(&name, 64).escape_debug()
                    ),
                ));
            }
            let args = obj.remove("args").unwrap_or(Value::Null);
            Ok(Command::Plugin { name, args })
        }
        "snapshot" => {
            let mut obj = args_object(command, args, &["dir", "without_device_state"])?;
            let dir = match obj.remove("dir") {
                Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_SNAPSHOT_DIR => s,
                Some(Value::String(_)) => {
                    return Err(bad(
                        command,
                        format!("\"dir\" is 1 to {MAX_SNAPSHOT_DIR} bytes"),
                    ))
                }
                Some(_) => return Err(bad(command, "\"dir\" must be a string")),
                None => return Err(bad(command, "needs \"dir\", the snapshot directory")),
            };
            if dir.contains('\0') {
                return Err(bad(command, "\"dir\" contains a NUL byte"));
            }
            let without_device_state = match obj.remove("without_device_state") {
                None => false,
                Some(Value::Bool(b)) => b,
                Some(_) => {
                    return Err(bad(
                        command,
                        "\"without_device_state\" must be true or false",
                    ))
                }
            };
            Ok(Command::Snapshot {
                dir,
                without_device_state,
            })
        }
        "migrate" => {
            let mut obj = args_object(command, args, &["to", "downtime_ms"])?;
            let to = match obj.remove("to") {
                Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_MIGRATE_ADDR => s,
                Some(Value::String(_)) => {
                    return Err(bad(
                        command,
                        format!("\"to\" is 1 to {MAX_MIGRATE_ADDR} bytes"),
                    ))
                }
                Some(_) => return Err(bad(command, "\"to\" must be a string")),
                None => {
                    return Err(bad(
                        command,
                        "needs \"to\", the target's address (unix:PATH or tcp:HOST:PORT)",
                    ))
                }
            };
            if to.contains('\0') {
                return Err(bad(command, "\"to\" contains a NUL byte"));
            }
            if !(to.starts_with("unix:") || to.starts_with("tcp:")) {
                return Err(bad(
                    command,
                    format!(
                        "\"to\" is unix:PATH or tcp:HOST:PORT (got \"{}\")",
                        truncate(&to, 64).escape_debug()
                    ),
                ));
            }
            let downtime_ms = match obj.remove("downtime_ms") {
                None | Some(Value::Null) => DEFAULT_DOWNTIME_MS,
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=MAX_DOWNTIME_MS).contains(&n) => n,
                    _ => {
                        return Err(bad(
                            command,
                            format!("\"downtime_ms\" is 1 to {MAX_DOWNTIME_MS}"),
                        ))
                    }
                },
            };
            Ok(Command::Migrate { to, downtime_ms })
        }
        "upgrade" => {
            let mut obj = args_object(command, args, &["plugin", "args"])?;
            let ok_str = |s: &str| !s.is_empty() && s.len() <= MAX_UPGRADE_ARG && !s.contains('\0');
            let plugin = match obj.remove("plugin") {
                Some(Value::String(s)) if ok_str(&s) => s,
                Some(_) => {
                    return Err(bad(
                        command,
                        format!("\"plugin\" is a path of 1 to {MAX_UPGRADE_ARG} bytes without NUL"),
                    ))
                }
                None => return Err(bad(command, "needs \"plugin\", the new plugin's path")),
            };
            let args = match obj.remove("args") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) if a.len() <= MAX_UPGRADE_ARGS => {
                    let mut out = Vec::with_capacity(a.len());
                    for v in a {
                        match v {
                            Value::String(s) if s.len() <= MAX_UPGRADE_ARG && !s.contains('\0') => {
                                out.push(s)
                            }
                            _ => {
                                return Err(bad(
                                    command,
                                    format!(
                                        "\"args\" are strings of at most {MAX_UPGRADE_ARG} bytes without NUL"
                                    ),
                                ))
                            }
                        }
                    }
                    out
                }
                Some(_) => {
                    return Err(bad(
                        command,
                        format!("\"args\" is an array of at most {MAX_UPGRADE_ARGS} strings"),
                    ))
                }
            };
            Ok(Command::Upgrade { plugin, args })
        }
        other => Err((
            ErrorCode::UnknownCommand,
            format!(
                "unknown command \"{}\" (commands: status, pause, resume, stop, kill, vcpu-tids, \
                 stats, events, powerbtn, sleepbtn, plugin, snapshot, migrate, upgrade)",
                truncate(other, 64).escape_debug()
            ),
        )),
    }
}

/// The result of `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `starting`, `running`, `paused` or `stopping`. `paused` when every
    /// vcpu is paused; a partial pause is `running` with `paused_vcpus`.
    pub state: String,
    pub vcpus: u32,
    pub paused_vcpus: Vec<u32>,
    /// The plugin's pid as the host sees it.
    pub plugin_pid: i32,
    /// The jail's init process (the host's child) when jailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_init_pid: Option<i32>,
    /// The plugin's path.
    pub plugin: String,
    pub vmm_pid: u32,
    pub uptime_ms: u64,
    /// Exits taken by each vcpu so far (index = vcpu id).
    pub exits: Vec<u64>,
    /// Live objects by kind (`memory`, `ioevent`, `irqevent`, ...).
    pub objects: std::collections::BTreeMap<String, u64>,
}

/// One vcpu thread in the result of `vcpu-tids`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuTid {
    pub vcpu: u32,
    pub tid: i32,
}

/// The result of `vcpu-tids`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuTids {
    pub pid: u32,
    pub vcpus: Vec<VcpuTid>,
}

/// The result of `stats` (the host's `vmm::stats::Report`): per request
/// type the count, errors and latency; per vcpu its exits by range.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StatsReport {
    pub requests: Vec<StatsRequest>,
    pub vcpus: Vec<StatsVcpu>,
    /// False when vmm runs without `--stats` (nothing is counted); absent
    /// in `--stats`' own report at exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collecting: Option<bool>,
    /// Why nothing is counted, when `collecting` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One request type of a [`StatsReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRequest {
    /// `main` or `vcpu`.
    pub channel: String,
    pub request: String,
    pub count: u64,
    pub errors: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// One vcpu of a [`StatsReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsVcpu {
    pub id: u32,
    pub exits: Vec<StatsExits>,
    /// Events the plugin resumed, and the time the vcpu waited for them.
    pub resumed_events: u64,
    pub waiting_on_plugin_ns: u64,
    pub wait_p50_ns: u64,
    pub wait_p99_ns: u64,
    pub wait_max_ns: u64,
}

/// Exits of one vcpu through one range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsExits {
    /// `IoPort` or `Mmio`.
    pub space: String,
    /// The reserved range; `None` for accesses to no reserved range.
    pub start: Option<u64>,
    pub length: Option<u64>,
    pub exits: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<(Id, Command), RequestError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn commands_and_ids() {
        assert_eq!(
            parse(r#"{"id":1,"command":"status"}"#).unwrap(),
            (Value::from(1), Command::Status)
        );
        assert_eq!(
            parse(r#"{"id":"a","command":"pause","args":{"vcpus":[0,2]}}"#).unwrap(),
            (
                Value::from("a"),
                Command::Pause {
                    vcpus: Some(vec![0, 2])
                }
            )
        );
        assert_eq!(
            parse(r#"{"command":"plugin","args":{"name":"count","args":{"x":1}}}"#)
                .unwrap()
                .1,
            Command::Plugin {
                name: "count".into(),
                args: serde_json::json!({"x": 1})
            }
        );
        assert_eq!(
            parse(r#"{"command":"events","args":{"subscribe":false}}"#)
                .unwrap()
                .1,
            Command::Events { subscribe: false }
        );
    }

    #[test]
    fn refusals_name_the_cause() {
        let e = parse("{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::ParseError);
        let e = parse(r#"{"id":5,"command":"frobnicate"}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::UnknownCommand, Value::from(5)));
        assert!(e.message.contains("frobnicate"), "{}", e.message);
        let e = parse(r#"{"id":5,"command":"pause","args":{"vcpus":"all"}}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgument);
        assert!(e.message.starts_with("pause: "), "{}", e.message);
        let e = parse(r#"{"id":5,"command":"pause","args":{"vcpus":[-1]}}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgument);
        let e = parse(r#"{"id":5,"command":"status","args":{"x":1}}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgument);
        let e = parse(r#"{"id":{"a":1},"command":"status"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse(r#"{"id":1,"command":"status","protocol":2}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedProtocol);
        let e = parse(r#"{"id":1,"command":"plugin","args":{"name":"a b"}}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadArgument);
        let big = format!(
            r#"{{"command":"status","x":"{}"}}"#,
            "a".repeat(MAX_MESSAGE)
        );
        assert_eq!(parse(&big).unwrap_err().code, ErrorCode::TooLarge);
    }

    #[test]
    fn requests_round_trip() {
        for c in [
            Command::Status,
            Command::Pause { vcpus: None },
            Command::Resume {
                vcpus: Some(vec![1]),
            },
            Command::Events { subscribe: true },
            Command::Events { subscribe: false },
            Command::Plugin {
                name: "n".into(),
                args: serde_json::json!([1]),
            },
            Command::PowerButton,
        ] {
            let line = serde_json::to_vec(&c.to_request(Value::from(9))).unwrap();
            assert_eq!(parse_request(&line).unwrap(), (Value::from(9), c));
        }
    }

    #[test]
    fn server_lines_round_trip() {
        for m in [
            ServerMessage::Greeting(Greeting {
                protocol: 1,
                vmm: "0.1.0".into(),
                pid: 4,
            }),
            ServerMessage::Response(Response::ok(Value::from(1), serde_json::json!({"a": 1}))),
            ServerMessage::Response(Response::error(
                Value::from("x"),
                ErrorCode::InvalidState,
                "pause: the VM is starting",
            )),
            ServerMessage::Event(Event {
                event: "paused".into(),
                seq: 1,
                uptime_ms: 2,
                data: serde_json::json!({"vcpus": [0]}),
            }),
        ] {
            let line = m.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(ServerMessage::parse(&line[..line.len() - 1]).unwrap(), m);
        }
    }
}
