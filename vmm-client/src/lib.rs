//! vmm's control socket (docs/control-api.md): the wire types both sides
//! use ([`proto`]) and a client for management software ([`Client`]).
//!
//! The host parses requests with [`proto::parse_request`], so the host and
//! every client built on this crate read the same protocol.
//!
//! ```no_run
//! let mut c = vmm_client::Client::connect("/tmp/vm.sock")?;
//! println!("{}", c.status()?.state);
//! c.pause(None)?;
//! c.resume(None)?;
//! c.subscribe()?;
//! for event in c.events() {
//!     println!("{}", event?.event);
//! }
//! # Ok::<(), vmm_client::ClientError>(())
//! ```

pub mod proto;

/// The JSON crate of this API's `Value`s.
pub use serde_json;

#[cfg(any(test, feature = "fake-server"))]
pub mod fake;

use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use serde::de::DeserializeOwned;
use serde_json::Value;

use proto::{
    Command, ErrorCode, Event, Greeting, Id, Response, ServerMessage, Status, VcpuTids, MAX_FDS,
    MAX_MESSAGE, PROTOCOL_VERSION,
};

/// The kebab-case wire name of an error code (`invalid-state`).
pub fn code_name(code: ErrorCode) -> String {
    match serde_json::to_value(code) {
        Ok(Value::String(s)) => s,
        _ => format!("{code:?}"),
    }
}

/// An error with its whole `source()` chain: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// Why [`Client::connect`] failed (the source of [`ClientError::Connect`]).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no such file (is vmm running with --api-socket at this path?)")]
    NotFound(#[source] std::io::Error),
    #[error("permission denied")]
    PermissionDenied(#[source] std::io::Error),
    #[error("not a socket")]
    NotASocket,
    #[error("nobody serves it (a stale socket: its vmm is gone)")]
    Stale(#[source] std::io::Error),
    #[error("cannot connect")]
    Io(#[source] std::io::Error),
    #[error("not a vmm control socket: its first line is not a greeting ({0})")]
    NotVmm(String),
    #[error(
        "protocol mismatch: vmm {vmm} speaks protocol {server}, this client speaks protocol {PROTOCOL_VERSION}"
    )]
    ProtocolMismatch { server: u32, vmm: String },
    #[error("vmm refused the connection: {}: {message}", code_name(*code))]
    Refused { code: ErrorCode, message: String },
    #[error("no greeting")]
    NoGreeting(#[source] Box<ClientError>),
}

/// What went wrong talking to vmm. `Display` names the command; the
/// `source()` chain gives the cause.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: ConnectError,
    },
    /// vmm answered the command with an error response.
    #[error("{command}: refused by vmm: {}: {message}", code_name(*code))]
    Refused {
        command: String,
        code: ErrorCode,
        message: String,
    },
    #[error("{command}: cannot send the request")]
    Send {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command}: the request line is {len} bytes, more than the protocol's {max}")]
    RequestTooLarge {
        command: String,
        len: usize,
        max: usize,
    },
    #[error("{command}: {count} descriptors, more than the protocol's {MAX_FDS}")]
    TooManyFds { command: String, count: usize },
    #[error("cannot read from vmm")]
    Read(#[source] std::io::Error),
    #[error("no answer from vmm within {0:?}")]
    TimedOut(Duration),
    #[error("vmm closed the connection")]
    Closed,
    /// vmm closed the connection with `command` sent and not answered (a
    /// vmm that ends answers every request first: this one crashed, was
    /// killed, or is older).
    #[error("{command}: vmm closed the connection before answering it")]
    Unanswered { command: String },
    #[error("vmm closed the connection in the middle of a line")]
    Truncated,
    #[error("vmm sent a line longer than the protocol's {MAX_MESSAGE} bytes")]
    LineTooLong,
    #[error("vmm sent a line that is not a protocol message: {excerpt}")]
    BadMessage {
        excerpt: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("vmm sent a second greeting")]
    UnexpectedGreeting,
    #[error("{command}: unexpected result {excerpt}")]
    BadResult {
        command: String,
        excerpt: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the connection is unusable after an earlier error")]
    Broken,
}

impl ClientError {
    /// The server's error code, for a refused command.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn excerpt(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned();
    if b.len() > 120 {
        format!("{s}...")
    } else {
        s
    }
}

/// The key responses are matched by: ids are compared as JSON values.
fn same_id(a: &Id, b: &Id) -> bool {
    a == b
}

/// A connection to vmm's control socket.
///
/// [`request`](Client::request) sends one command and waits for its
/// response; responses to other requests and events that arrive
/// meanwhile are kept, in order, for [`recv`](Client::recv) and
/// [`next_event`](Client::next_event). For many requests outstanding at
/// once, [`send`](Client::send) them and [`recv`](Client::recv) the
/// answers; ids are assigned by the client (1, 2, ...).
pub struct Client {
    stream: UnixStream,
    greeting: Greeting,
    /// Bytes read but not yet split into lines.
    buf: Vec<u8>,
    /// Messages read but not yet handed out, in arrival order.
    pending: VecDeque<ServerMessage>,
    next_id: u64,
    timeout: Option<Duration>,
    broken: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("greeting", &self.greeting)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Client {
    /// Connects to the socket at `path` and reads its greeting, waiting at
    /// most 10 s for it.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_timeout(path, Some(Duration::from_secs(10)))
    }

    /// Connects; `timeout` bounds the wait for the greeting and becomes
    /// the client's read timeout ([`set_timeout`](Client::set_timeout)).
    pub fn connect_timeout(
        path: impl AsRef<Path>,
        timeout: Option<Duration>,
    ) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let fail = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(|e| {
            fail(match e.kind() {
                std::io::ErrorKind::NotFound => ConnectError::NotFound(e),
                std::io::ErrorKind::PermissionDenied => ConnectError::PermissionDenied(e),
                std::io::ErrorKind::ConnectionRefused => {
                    // Linux answers ECONNREFUSED for a file that is not a
                    // socket too.
                    match std::fs::symlink_metadata(path) {
                        Ok(m) if !m.file_type().is_socket() => ConnectError::NotASocket,
                        _ => ConnectError::Stale(e),
                    }
                }
                _ => ConnectError::Io(e),
            })
        })?;
        Self::from_stream(stream, timeout).map_err(|e| match e {
            ClientError::Connect { source, .. } => fail(source),
            other => fail(ConnectError::NoGreeting(Box::new(other))),
        })
    }

    /// Wraps a connected stream (e.g. one end of a socketpair) and reads
    /// its greeting.
    pub fn from_stream(
        stream: UnixStream,
        timeout: Option<Duration>,
    ) -> Result<Client, ClientError> {
        let mut c = Client {
            stream,
            greeting: Greeting {
                protocol: 0,
                vmm: String::new(),
                pid: 0,
            },
            buf: Vec::new(),
            pending: VecDeque::new(),
            next_id: 1,
            timeout,
            broken: false,
        };
        let connect = |source| ClientError::Connect {
            path: PathBuf::new(),
            source,
        };
        let deadline = c.deadline();
        let line = match c.read_line(deadline) {
            Ok(l) => l,
            Err(ClientError::LineTooLong) => {
                return Err(connect(ConnectError::NotVmm(format!(
                    "a line of more than {MAX_MESSAGE} bytes"
                ))))
            }
            Err(e) => return Err(e),
        };
        match ServerMessage::parse(&line) {
            Ok(ServerMessage::Greeting(g)) => {
                if g.protocol != PROTOCOL_VERSION {
                    return Err(connect(ConnectError::ProtocolMismatch {
                        server: g.protocol,
                        vmm: g.vmm,
                    }));
                }
                c.greeting = g;
                Ok(c)
            }
            Ok(ServerMessage::Response(Response {
                error: Some(err), ..
            })) => Err(connect(ConnectError::Refused {
                code: err.code,
                message: err.message,
            })),
            _ => Err(connect(ConnectError::NotVmm(excerpt(&line)))),
        }
    }

    /// The server's greeting (its protocol, vmm version and pid).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The longest a call waits for the server (`None`: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn deadline(&self) -> Option<Instant> {
        self.timeout.map(|t| Instant::now() + t)
    }

    /// Sends `command` with `fds` (`SCM_RIGHTS` on the one `sendmsg` that
    /// carries the start of the request line) and returns its id; the
    /// answer comes from [`recv`](Client::recv).
    pub fn send(&mut self, command: &Command, fds: &[BorrowedFd<'_>]) -> Result<Id, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let name = command.name().to_string();
        if fds.len() > MAX_FDS {
            return Err(ClientError::TooManyFds {
                command: name,
                count: fds.len(),
            });
        }
        let id = Id::from(self.next_id);
        self.next_id += 1;
        let mut line =
            serde_json::to_vec(&command.to_request(id.clone())).map_err(|e| ClientError::Send {
                command: name.clone(),
                source: std::io::Error::other(e),
            })?;
        line.push(b'\n');
        if line.len() > MAX_MESSAGE {
            return Err(ClientError::RequestTooLarge {
                command: name,
                len: line.len(),
                max: MAX_MESSAGE,
            });
        }
        self.send_line(&line, fds)
            .map_err(|source| ClientError::Send {
                command: name,
                source,
            })?;
        Ok(id)
    }

    /// Writes one whole line: the first `sendmsg` carries the descriptors;
    /// a short write is finished with plain writes (the descriptors are on
    /// the first segment, so they still belong to this line).
    fn send_line(&mut self, line: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        if fds.is_empty() {
            return self.stream.write_all(line);
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let sent = loop {
            match sendmsg::<UnixAddr>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(line)],
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(std::io::Error::from(e)),
            }
        };
        self.stream.write_all(&line[sent..])
    }

    /// The next message from the server: buffered ones first, in the order
    /// they arrived, then from the socket.
    pub fn recv(&mut self) -> Result<ServerMessage, ClientError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        let deadline = self.deadline();
        self.read_message(deadline)
    }

    /// Sends `command` and waits for its response: the `ok` value, or
    /// [`ClientError::Refused`] naming the command.
    pub fn request(&mut self, command: &Command) -> Result<Value, ClientError> {
        self.request_with_fds(command, &[])
    }

    /// [`request`](Client::request) with descriptors.
    pub fn request_with_fds(
        &mut self,
        command: &Command,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, ClientError> {
        let id = self.send(command, fds)?;
        let response = self.wait_response(&id).map_err(|e| match e {
            ClientError::Closed => ClientError::Unanswered {
                command: command.name().to_string(),
            },
            e => e,
        })?;
        Self::result(command.name(), response)
    }

    /// The response to `id`, reading (and keeping) whatever comes first.
    /// An error response with a null id (the server could not read our
    /// line's id: a bound or a framing error) answers it too.
    pub fn wait_response(&mut self, id: &Id) -> Result<Response, ClientError> {
        if let Some(i) = self.pending.iter().position(
            |m| matches!(m, ServerMessage::Response(r) if same_id(&r.id, id) || (r.id.is_null() && r.error.is_some())),
        ) {
            if let Some(ServerMessage::Response(r)) = self.pending.remove(i) {
                return Ok(r);
            }
        }
        let deadline = self.deadline();
        loop {
            match self.read_message(deadline)? {
                ServerMessage::Response(r)
                    if same_id(&r.id, id) || (r.id.is_null() && r.error.is_some()) =>
                {
                    return Ok(r)
                }
                other => self.pending.push_back(other),
            }
        }
    }

    /// A response as the result of `command`.
    pub fn result(command: &str, response: Response) -> Result<Value, ClientError> {
        if let Some(e) = response.error {
            return Err(ClientError::Refused {
                command: command.to_string(),
                code: e.code,
                message: e.message,
            });
        }
        Ok(response.ok.unwrap_or(Value::Null))
    }

    fn typed<T: DeserializeOwned>(&mut self, command: &Command) -> Result<T, ClientError> {
        let v = self.request(command)?;
        serde_json::from_value(v.clone()).map_err(|source| ClientError::BadResult {
            command: command.name().to_string(),
            excerpt: excerpt(v.to_string().as_bytes()),
            source,
        })
    }

    pub fn status(&mut self) -> Result<Status, ClientError> {
        self.typed(&Command::Status)
    }

    pub fn vcpu_tids(&mut self) -> Result<VcpuTids, ClientError> {
        self.typed(&Command::VcpuTids)
    }

    pub fn stats(&mut self) -> Result<proto::StatsReport, ClientError> {
        self.typed(&Command::Stats)
    }

    /// Pauses all vcpus (`None`) or the listed ones; returns once they run
    /// no guest code.
    pub fn pause(&mut self, vcpus: Option<&[u32]>) -> Result<Value, ClientError> {
        self.request(&Command::Pause {
            vcpus: vcpus.map(<[u32]>::to_vec),
        })
    }

    pub fn resume(&mut self, vcpus: Option<&[u32]>) -> Result<Value, ClientError> {
        self.request(&Command::Resume {
            vcpus: vcpus.map(<[u32]>::to_vec),
        })
    }

    pub fn stop(&mut self) -> Result<Value, ClientError> {
        self.request(&Command::Stop)
    }

    pub fn kill(&mut self) -> Result<Value, ClientError> {
        self.request(&Command::Kill)
    }

    pub fn power_button(&mut self) -> Result<Value, ClientError> {
        self.request(&Command::PowerButton)
    }

    pub fn sleep_button(&mut self) -> Result<Value, ClientError> {
        self.request(&Command::SleepButton)
    }

    /// A command of the plugin's own.
    pub fn plugin(&mut self, name: &str, args: Value) -> Result<Value, ClientError> {
        self.request(&Command::Plugin {
            name: name.to_string(),
            args,
        })
    }

    /// Subscribes this connection to events; read them with
    /// [`next_event`](Client::next_event) or [`events`](Client::events).
    pub fn subscribe(&mut self) -> Result<(), ClientError> {
        self.request(&Command::Events { subscribe: true })
            .map(|_| ())
    }

    pub fn unsubscribe(&mut self) -> Result<(), ClientError> {
        self.request(&Command::Events { subscribe: false })
            .map(|_| ())
    }

    /// The next event; responses that arrive meanwhile are kept for
    /// [`recv`](Client::recv) / [`wait_response`](Client::wait_response).
    /// [`ClientError::Closed`] when vmm closed the connection (it exited).
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(i) = self
            .pending
            .iter()
            .position(|m| matches!(m, ServerMessage::Event(_)))
        {
            if let Some(ServerMessage::Event(e)) = self.pending.remove(i) {
                return Ok(e);
            }
        }
        let deadline = self.deadline();
        loop {
            match self.read_message(deadline)? {
                ServerMessage::Event(e) => return Ok(e),
                other => self.pending.push_back(other),
            }
        }
    }

    /// The event stream: ends when vmm closes the connection; an error
    /// ends it too (after being yielded).
    pub fn events(&mut self) -> Events<'_> {
        Events {
            client: self,
            done: false,
        }
    }

    fn read_message(&mut self, deadline: Option<Instant>) -> Result<ServerMessage, ClientError> {
        let line = self.read_line(deadline)?;
        match ServerMessage::parse(&line) {
            Ok(ServerMessage::Greeting(_)) => Err(ClientError::UnexpectedGreeting),
            Ok(m) => Ok(m),
            Err(source) => Err(ClientError::BadMessage {
                excerpt: excerpt(&line),
                source,
            }),
        }
    }

    /// One line without its newline; at most [`MAX_MESSAGE`] bytes with
    /// it. A longer line leaves the connection unusable (no resync).
    fn read_line(&mut self, deadline: Option<Instant>) -> Result<Vec<u8>, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                if end + 1 > MAX_MESSAGE {
                    self.broken = true;
                    return Err(ClientError::LineTooLong);
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                return Ok(line);
            }
            scanned = self.buf.len();
            if self.buf.len() >= MAX_MESSAGE {
                self.broken = true;
                return Err(ClientError::LineTooLong);
            }
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::TimedOut(self.timeout.unwrap_or_default()));
                    }
                    Some(left)
                }
                None => None,
            };
            self.stream
                .set_read_timeout(wait)
                .map_err(ClientError::Read)?;
            let mut chunk = [0u8; 16 * 1024];
            // Never read past the bound of the current line.
            let room = (MAX_MESSAGE - self.buf.len()).min(chunk.len());
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => {
                    return Err(if self.buf.is_empty() {
                        ClientError::Closed
                    } else {
                        ClientError::Truncated
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::TimedOut(self.timeout.unwrap_or_default()))
                }
                Err(e) => return Err(ClientError::Read(e)),
            }
        }
    }
}

/// The iterator of [`Client::events`].
pub struct Events<'a> {
    client: &'a mut Client,
    done: bool,
}

impl Iterator for Events<'_> {
    type Item = Result<Event, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.client.next_event() {
            Ok(e) => Some(Ok(e)),
            Err(ClientError::Closed) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests;
