//! A scripted stand-in for vmm's control socket, for testing management
//! software (and this crate) without a VM: a listener thread at a path,
//! one thread per connection running a script over a [`FakeConn`].
//!
//! [`FakeConn::recv`] reads requests with `recvmsg` and applies the
//! protocol's descriptor rule (docs/control-api.md): descriptors that one
//! `recvmsg` returned belong to the request line holding the last byte
//! that `recvmsg` returned. [`FakeConn::serve_like_vmm`] answers every
//! command of the protocol with fixed, plausible values ([`answer`]).
//!
//! Built with the `fake-server` feature (and for this crate's tests).

use std::collections::VecDeque;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use serde_json::{json, Value};

use crate::proto::{
    parse_request, Command, ErrorCode, Event, Greeting, Id, RequestError, Response, ServerMessage,
    Status, VcpuTid, VcpuTids, MAX_FDS, PROTOCOL_VERSION,
};

/// One request line as the fake server received it.
#[derive(Debug)]
pub struct Received {
    /// The line without its newline.
    pub line: Vec<u8>,
    /// The descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Received {
    pub fn parse(&self) -> Result<(Id, Command), RequestError> {
        parse_request(&self.line)
    }
}

/// What the server logged of each request: the line and its descriptor
/// count.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    pub line: String,
    pub fds: usize,
}

impl Logged {
    /// The line as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.line).unwrap_or(Value::Null)
    }
}

type Log = Arc<Mutex<Vec<Logged>>>;

/// One accepted connection.
pub struct FakeConn {
    stream: UnixStream,
    complete: VecDeque<Received>,
    partial: Vec<u8>,
    partial_fds: Vec<OwnedFd>,
    log: Log,
}

/// The greeting of a protocol-1 server with this process's pid.
pub fn greeting() -> Greeting {
    Greeting {
        protocol: PROTOCOL_VERSION,
        vmm: "0.1.0-fake".into(),
        pid: std::process::id(),
    }
}

impl FakeConn {
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends the greeting of [`greeting`].
    pub fn greet(&mut self) -> std::io::Result<()> {
        self.send(&ServerMessage::Greeting(greeting()))
    }

    pub fn send(&mut self, m: &ServerMessage) -> std::io::Result<()> {
        self.stream.write_all(&m.to_line())
    }

    /// Sends bytes as they are (for malformed or over-long lines).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn respond(&mut self, r: Response) -> std::io::Result<()> {
        self.send(&ServerMessage::Response(r))
    }

    pub fn event(&mut self, seq: u64, name: &str, data: Value) -> std::io::Result<()> {
        self.send(&ServerMessage::Event(Event {
            event: name.into(),
            seq,
            uptime_ms: seq * 10,
            data,
        }))
    }

    /// The next request line with its descriptors; `None` when the client
    /// closed the connection.
    pub fn recv(&mut self) -> std::io::Result<Option<Received>> {
        loop {
            if let Some(r) = self.complete.pop_front() {
                self.log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Logged {
                        line: String::from_utf8_lossy(&r.line).into_owned(),
                        fds: r.fds.len(),
                    });
                return Ok(Some(r));
            }
            let mut data = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
            let (n, fds) = {
                let mut iov = [IoSliceMut::new(&mut data)];
                let msg = match recvmsg::<UnixAddr>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                };
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: SCM_RIGHTS gave this process a new
                            // descriptor that nothing else owns.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                (msg.bytes, fds)
            };
            if n == 0 {
                return Ok(None);
            }
            self.take(&data[..n], fds);
        }
    }

    /// Splits what one `recvmsg` returned into lines; its descriptors go
    /// to the line holding its last byte.
    fn take(&mut self, data: &[u8], fds: Vec<OwnedFd>) {
        let ends_line = data.last() == Some(&b'\n');
        let mut rest = data;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.partial.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            self.complete.push_back(Received {
                line: std::mem::take(&mut self.partial),
                fds: std::mem::take(&mut self.partial_fds),
            });
        }
        self.partial.extend_from_slice(rest);
        if ends_line {
            if let Some(last) = self.complete.back_mut() {
                last.fds.extend(fds);
            }
        } else {
            self.partial_fds.extend(fds);
        }
    }

    /// Greets, then answers every request with [`answer`] until the client
    /// leaves. A subscription is followed by the events `paused`,
    /// `resumed` and `plugin-exited`, then the connection is closed (as
    /// vmm does when the VM exits).
    pub fn serve_like_vmm(mut self) {
        if self.greet().is_err() {
            return;
        }
        while let Ok(Some(r)) = self.recv() {
            let (id, cmd) = match r.parse() {
                Ok(x) => x,
                Err(e) => {
                    if self.respond(e.into_response()).is_err() {
                        return;
                    }
                    continue;
                }
            };
            let response = if !r.fds.is_empty() {
                Response::error(
                    id,
                    ErrorCode::BadDescriptors,
                    format!("{}: takes no descriptors", cmd.name()),
                )
            } else {
                match answer(&cmd) {
                    Ok(v) => Response::ok(id, v),
                    Err((code, m)) => Response::error(id, code, m),
                }
            };
            if self.respond(response).is_err() {
                return;
            }
            if cmd == (Command::Events { subscribe: true }) {
                let _ = self.event(1, "paused", json!({"vcpus": [0, 1]}));
                let _ = self.event(2, "resumed", json!({"vcpus": [0, 1]}));
                let _ = self.event(3, "plugin-exited", json!({"pid": 4242, "status": 0}));
                return;
            }
        }
    }
}

/// The fixed answers of [`FakeConn::serve_like_vmm`]: a running VM with 2
/// vcpus whose plugin (pid 4242) knows the command `count`.
pub fn answer(cmd: &Command) -> Result<Value, (ErrorCode, String)> {
    let v = match cmd {
        Command::Status => serde_json::to_value(sample_status()).unwrap_or_default(),
        Command::Pause { vcpus } => json!({ "paused": vcpus.clone().unwrap_or(vec![0, 1]) }),
        Command::Resume { vcpus } => json!({ "resumed": vcpus.clone().unwrap_or(vec![0, 1]) }),
        Command::Stop | Command::Kill => json!({ "state": "stopping" }),
        Command::VcpuTids => serde_json::to_value(VcpuTids {
            pid: std::process::id(),
            vcpus: vec![
                VcpuTid { vcpu: 0, tid: 5001 },
                VcpuTid { vcpu: 1, tid: 5002 },
            ],
        })
        .unwrap_or_default(),
        Command::Stats => json!({
            "requests": [
                {"channel": "main", "request": "create_memory", "count": 1, "errors": 0,
                 "p50_ns": 12000, "p99_ns": 12000, "max_ns": 12000},
                {"channel": "vcpu", "request": "resume", "count": 300, "errors": 2,
                 "p50_ns": 3000, "p99_ns": 9000, "max_ns": 15000}
            ],
            "vcpus": [
                {"id": 0, "exits": [
                    {"space": "IoPort", "start": 1280, "length": 4, "exits": 300},
                    {"space": "Mmio", "start": null, "length": null, "exits": 1}
                 ], "resumed_events": 300, "waiting_on_plugin_ns": 900000,
                 "wait_p50_ns": 3000, "wait_p99_ns": 9000, "wait_max_ns": 15000}
            ]
        }),
        Command::Events { .. } => Value::Null,
        Command::PowerButton => Value::Null,
        Command::SleepButton => {
            return Err((
                ErrorCode::NotSupported,
                "sleepbtn: the plugin does not take control commands".into(),
            ))
        }
        Command::Plugin { name, args } if name == "count" => {
            json!({ "count": 42, "args": args })
        }
        Command::Plugin { name, .. } => {
            return Err((
                ErrorCode::PluginError,
                format!("plugin {name}: EINVAL: no such command"),
            ))
        }
        Command::Snapshot { dir, .. } => {
            json!({ "dir": dir, "bytes": 65536, "ms": 3, "memory_pages": 16 })
        }
        Command::Migrate { to, .. } => {
            json!({ "to": to, "downtime_ms": 4, "total_ms": 80, "rounds": 2, "pages": 16, "bytes": 65536 })
        }
        Command::Upgrade { .. } => {
            json!({ "generation": 1, "reason": "upgrade", "pid": 4243, "blackout_us": 5000 })
        }
    };
    Ok(v)
}

/// The status [`answer`] gives.
pub fn sample_status() -> Status {
    Status {
        state: "running".into(),
        vcpus: 2,
        paused_vcpus: vec![],
        plugin_pid: 4242,
        jail_init_pid: Some(4241),
        plugin: "/usr/libexec/counter".into(),
        vmm_pid: std::process::id(),
        uptime_ms: 1234,
        exits: vec![10, 20],
        objects: [("memory".to_string(), 1), ("ioevent".to_string(), 2)]
            .into_iter()
            .collect(),
    }
}

/// A listener at a path serving each connection with a script on its own
/// thread. Dropping it stops accepting and removes the socket file.
pub struct FakeServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    log: Log,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    /// Binds `path` and serves every connection with `script`.
    pub fn start<F>(path: impl AsRef<Path>, script: F) -> std::io::Result<FakeServer>
    where
        F: Fn(FakeConn) + Send + Sync + 'static,
    {
        let path = path.as_ref().to_path_buf();
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let log: Log = Arc::default();
        let script = Arc::new(script);
        let (stop2, log2) = (stop.clone(), log.clone());
        // Non-blocking accept polled with a short timeout, so the thread
        // ends when the server is dropped, even if the socket file is gone.
        listener.set_nonblocking(true)?;
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let mut fds = [nix::poll::PollFd::new(
                            listener.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8));
                        continue;
                    }
                    Err(_) => continue,
                };
                if stream.set_nonblocking(false).is_err() {
                    continue;
                }
                let conn = FakeConn {
                    stream,
                    complete: VecDeque::new(),
                    partial: Vec::new(),
                    partial_fds: Vec::new(),
                    log: log2.clone(),
                };
                let script = script.clone();
                std::thread::spawn(move || script(conn));
            }
        });
        Ok(FakeServer {
            path,
            stop,
            log,
            thread: Some(thread),
        })
    }

    /// A server that answers like vmm ([`FakeConn::serve_like_vmm`]).
    pub fn like_vmm(path: impl AsRef<Path>) -> std::io::Result<FakeServer> {
        Self::start(path, FakeConn::serve_like_vmm)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every request line received so far, over all connections.
    pub fn received(&self) -> Vec<Logged> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
