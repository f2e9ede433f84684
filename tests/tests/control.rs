//! The control socket (`--api-socket`, docs/control-api.md) on a real vmm
//! with a jailed plugin on KVM: `ctl_spin`, whose guest makes one port
//! exit after another forever, so its progress is the exit count of
//! `status`. The tests talk to the socket with the raw client below
//! (std `UnixStream` and serde_json: one JSON object per line).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{bin, wait_guarded, TempDir};
use serde_json::{json, Value};

const GUARD: Duration = Duration::from_secs(30);

/// A running `vmm --api-socket` with `ctl_spin`.
struct Vm {
    child: Option<Child>,
    socket: PathBuf,
    stderr: PathBuf,
    _dir: TempDir,
}

impl Vm {
    fn start(tag: &str, plugin_args: &[&str]) -> Vm {
        Vm::start_with(tag, &[], plugin_args)
    }

    fn start_with(tag: &str, vmm_args: &[&str], plugin_args: &[&str]) -> Vm {
        let dir = TempDir::new(tag);
        let socket = dir.0.join("vmm.sock");
        let vm = Vm::spawn(dir, socket, vmm_args, plugin_args);
        vm.wait_for_socket();
        vm
    }

    fn spawn(dir: TempDir, socket: PathBuf, vmm_args: &[&str], plugin_args: &[&str]) -> Vm {
        let stderr = dir.0.join("stderr");
        let mut cmd = Command::new(bin("vmm"));
        cmd.arg("--api-socket")
            .arg(&socket)
            .args(vmm_args)
            .arg("--plugin")
            .arg(bin("ctl_spin"));
        if !plugin_args.is_empty() {
            cmd.arg("--plugin-args").args(plugin_args);
        }
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.0.join("stdout")).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        Vm {
            child: Some(cmd.spawn().expect("spawn vmm")),
            socket,
            stderr,
            _dir: dir,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn wait_for_socket(&self) {
        let start = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                start.elapsed() < GUARD,
                "the control socket never came up: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket)
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for vmm to exit (hang guard: [`GUARD`]).
    fn wait(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("vmm running");
        let status = wait_guarded(child, GUARD).expect("vmm hung");
        self.child = None;
        status
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw protocol client: lines of JSON.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    events: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let c = Client::connect_raw(path);
        let mut c = c;
        let g = c.line().expect("greeting");
        assert_eq!(g["greeting"]["protocol"], 1, "{g}");
        c
    }

    fn connect_raw(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(GUARD)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client {
            stream,
            reader,
            events: VecDeque::new(),
            next_id: 1,
        }
    }

    /// The next line, parsed; `None` at EOF.
    fn line(&mut self) -> Option<Value> {
        let mut s = String::new();
        match self.reader.read_line(&mut s) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"))),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading the control socket: {e}"),
        }
    }

    fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).expect("send");
        self.stream.write_all(b"\n").expect("send");
    }

    /// Sends a request, returns its id.
    fn request(&mut self, command: &str, args: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut r = json!({"id": id, "command": command, "protocol": 1});
        if !args.is_null() {
            r["args"] = args;
        }
        self.send(&r.to_string());
        id
    }

    /// The response with `id` (events on the way are kept).
    fn response(&mut self, id: u64) -> Value {
        loop {
            let v = self.line().expect("connection closed before the response");
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            assert_eq!(v["id"], id, "responses come for the request sent: {v}");
            return v;
        }
    }

    fn call(&mut self, command: &str, args: Value) -> Value {
        let id = self.request(command, args);
        self.response(id)
    }

    /// `ok` of a call that must succeed.
    fn ok(&mut self, command: &str, args: Value) -> Value {
        let r = self.call(command, args);
        assert!(r.get("error").is_none(), "{command} failed: {r}");
        r["ok"].clone()
    }

    fn exits(&mut self) -> u64 {
        self.ok("status", Value::Null)["exits"][0]
            .as_u64()
            .expect("exits")
    }

    /// Waits for the VM to run (the guest has taken exits).
    fn wait_running(&mut self) {
        let start = Instant::now();
        loop {
            let s = self.ok("status", Value::Null);
            if s["state"] == "running" && s["exits"][0].as_u64().unwrap_or(0) > 0 {
                return;
            }
            assert!(start.elapsed() < GUARD, "the VM never ran: {s}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn error_code(r: &Value) -> &str {
    r["error"]["code"].as_str().unwrap_or("")
}

/// The guest progresses: its exit count grows over 250 ms.
fn assert_progress(c: &mut Client) {
    let a = c.exits();
    std::thread::sleep(Duration::from_millis(250));
    let b = c.exits();
    assert!(b > a, "the guest made no progress ({a} -> {b})");
}

#[test]
fn socket_is_0600_and_stop_ends_the_vm_with_status_0_and_removes_it() {
    // Under the most permissive umask the socket is still 0600 (each test
    // is a process of its own under nextest: the umask is this test's).
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let mut vm = Vm::start("ctl-stop", &[]);
    nix::sys::stat::umask(old);
    let meta = std::fs::symlink_metadata(&vm.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let mut c = vm.client();
    c.wait_running();
    let r = c.ok("stop", Value::Null);
    assert_eq!(r["state"], "stopping");
    let asked = Instant::now();
    let status = vm.wait();
    assert_eq!(status.code(), Some(0), "{}", vm.stderr_text());
    // Generous bound (hang detection only): the 1 s grace plus teardown.
    assert!(asked.elapsed() < Duration::from_secs(10));
    assert!(
        vm.stderr_text().contains("stopped over the control socket"),
        "{}",
        vm.stderr_text()
    );
    assert!(!vm.socket.exists(), "the socket outlived vmm");
}

#[test]
fn socket_is_removed_after_sigterm_and_after_a_failed_run() {
    let mut vm = Vm::start("ctl-term", &[]);
    vm.client().wait_running();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = vm.wait();
    assert_eq!(status.code(), Some(1));
    assert!(vm.stderr_text().contains("stopped by SIGTERM"));
    assert!(!vm.socket.exists(), "the socket outlived SIGTERM");

    // A run that fails after the socket exists (too many vcpus).
    let dir = TempDir::new("ctl-err");
    let socket = dir.0.join("vmm.sock");
    let mut vm = Vm::spawn(dir, socket, &["--cpus", "100000"], &[]);
    let status = vm.wait();
    assert_eq!(status.code(), Some(1));
    assert!(
        vm.stderr_text().contains("vcpus requested"),
        "{}",
        vm.stderr_text()
    );
    assert!(!vm.socket.exists(), "the socket outlived a failed run");
}

#[test]
fn stale_socket_is_replaced_live_one_and_other_files_are_errors() {
    let dir = TempDir::new("ctl-stale");
    let socket = dir.0.join("vmm.sock");
    // A socket file nobody serves any more.
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut vm = Vm::spawn(dir, socket.clone(), &[], &[]);
    vm.wait_for_socket();
    let mut c = vm.client();
    c.wait_running();

    // A second vmm on the live socket: a clear error, the first unharmed.
    let second = Command::new(bin("vmm"))
        .arg("--socket")
        .arg(&socket)
        .arg("--plugin")
        .arg(bin("ctl_spin"))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another vmm serves this control socket") && err.contains("vmm.sock"),
        "{err}"
    );
    assert_progress(&mut c);

    // A regular file at the path is neither used nor removed.
    let file = vm._dir.0.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let third = Command::new(bin("vmm"))
        .arg("--api-socket")
        .arg(&file)
        .arg("--plugin")
        .arg(bin("ctl_spin"))
        .output()
        .unwrap();
    assert_eq!(third.status.code(), Some(1));
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

#[test]
fn status_names_the_plugin_and_start_up_commands_are_answered() {
    // The plugin waits 1.5 s before it starts the VM.
    let mut vm = Vm::start("ctl-status", &["1500"]);
    let mut c = vm.client();
    let s = c.ok("status", Value::Null);
    assert_eq!(s["state"], "starting", "{s}");
    assert_eq!(s["vcpus"], 1);
    assert_eq!(s["vmm_pid"], vm.pid());
    assert_eq!(c.ok("vcpu-tids", Value::Null)["vcpus"], json!([]));
    let r = c.call("pause", Value::Null);
    assert_eq!(error_code(&r), "invalid-state", "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("starting"));
    let s = c.ok("stats", Value::Null);
    assert!(s["requests"].is_array());
    assert_eq!(s["collecting"], false, "{s}");
    c.wait_running();
    let s = c.ok("status", Value::Null);
    let pid = s["plugin_pid"].as_i64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("ctl_spin"),
        "pid {pid} is not the plugin"
    );
    let init = s["jail_init_pid"]
        .as_i64()
        .expect("jailed: the jail's init pid");
    assert_ne!(init, pid);
    let log = vm.stderr_text();
    assert!(
        log.contains(&format!("(pid {pid}, jailed; jail init pid {init})")),
        "{log}"
    );
    assert_eq!(s["objects"]["memory"], 1, "{s}");
    assert!(s["uptime_ms"].as_u64().unwrap() >= 1500);
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

#[test]
fn pause_stops_the_guest_resume_restores_it_and_events_come_in_order() {
    let mut vm = Vm::start("ctl-pause", &[]);
    let mut sub = vm.client();
    let r = sub.ok("events", Value::Null);
    assert_eq!(r["subscribed"], true);
    let mut c = vm.client();
    c.wait_running();
    assert_progress(&mut c);

    let p = c.ok("pause", Value::Null);
    assert_eq!(p["paused"], json!([0]));
    let s = c.ok("status", Value::Null);
    assert_eq!(
        (s["state"].clone(), s["paused_vcpus"].clone()),
        (json!("paused"), json!([0]))
    );
    let a = c.exits();
    std::thread::sleep(Duration::from_millis(300));
    let b = c.exits();
    assert_eq!(a, b, "the guest ran while paused");
    // Idempotent.
    c.ok("pause", json!({"vcpus": [0]}));
    assert_eq!(c.exits(), a);
    let r = c.call("pause", json!({"vcpus": [7]}));
    assert_eq!(error_code(&r), "bad-argument", "{r}");

    c.ok("resume", Value::Null);
    assert_progress(&mut c);
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));

    let mut names = Vec::new();
    let mut last = 0;
    while let Some(e) = sub.events.pop_front().or_else(|| sub.line()) {
        let seq = e["seq"].as_u64().unwrap();
        assert!(seq > last, "seq goes up: {e}");
        if last > 0 {
            assert_eq!(seq, last + 1, "no gap: {e}");
        }
        last = seq;
        names.push(e["event"].as_str().unwrap().to_string());
        if e["event"] == "plugin-exited" {
            assert_eq!(e["data"]["status"], 0, "{e}");
        }
    }
    let order: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| ["paused", "resumed", "stopping", "plugin-exited"].contains(n))
        .collect();
    assert_eq!(
        order,
        ["paused", "paused", "resumed", "stopping", "plugin-exited"],
        "{names:?}"
    );
    assert!(names.contains(&"vcpu-stopped".to_string()), "{names:?}");
}

#[test]
fn vcpu_tids_are_the_vcpu_threads() {
    let mut vm = Vm::start("ctl-tids", &[]);
    let mut c = vm.client();
    c.wait_running();
    let t = c.ok("vcpu-tids", Value::Null);
    assert_eq!(t["pid"], vm.pid());
    let vcpus = t["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 1);
    for v in vcpus {
        let (id, tid) = (v["vcpu"].as_u64().unwrap(), v["tid"].as_i64().unwrap());
        let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", vm.pid())).unwrap();
        assert_eq!(comm.trim(), format!("vmm_vcpu{id}"));
    }
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

#[test]
fn kill_ends_the_vm_at_once_with_the_reason() {
    let mut vm = Vm::start("ctl-kill", &[]);
    let mut c = vm.client();
    c.wait_running();
    c.ok("events", Value::Null);
    let r = c.ok("kill", Value::Null);
    assert_eq!(r["killed"], true);
    let status = vm.wait();
    assert_eq!(status.code(), Some(1));
    let log = vm.stderr_text();
    assert!(
        log.contains("vmm: error: killed over the control socket"),
        "{log}"
    );
    let mut exited = None;
    while let Some(e) = c.events.pop_front().or_else(|| c.line()) {
        if e["event"] == "plugin-exited" {
            exited = Some(e);
        }
    }
    let e = exited.expect("plugin-exited reached the subscriber");
    assert_eq!(e["data"]["signal"], "SIGKILL", "{e}");
    assert!(!vm.socket.exists());
}

#[test]
fn bad_input_gets_clear_errors_and_leaves_the_vm_running() {
    let mut vm = Vm::start("ctl-bad", &[]);
    let mut c = vm.client();
    c.wait_running();

    c.send("{not json");
    assert_eq!(error_code(&c.line().unwrap()), "parse-error");
    c.send(r#"{"id":1,"command":"frobnicate"}"#);
    let r = c.line().unwrap();
    assert_eq!(
        (error_code(&r), r["id"].clone()),
        ("unknown-command", json!(1))
    );
    c.send(r#"{"id":2,"command":"pause","args":{"vcpus":"all"}}"#);
    assert_eq!(error_code(&c.line().unwrap()), "bad-argument");
    c.send(r#"{"id":3,"command":"status","args":{"verbose":true}}"#);
    assert_eq!(error_code(&c.line().unwrap()), "bad-argument");
    c.send(r#"{"id":"x","command":"status","protocol":99}"#);
    assert_eq!(error_code(&c.line().unwrap()), "unsupported-protocol");
    c.send("");
    assert_progress(&mut c);

    // Descriptors with a command that takes none: refused, closed here.
    let (a, _b) = UnixStream::pair().unwrap();
    let line = b"{\"id\":9,\"command\":\"status\"}\n";
    let fds = [a.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    nix::sys::socket::sendmsg::<()>(
        c.stream.as_raw_fd(),
        &[std::io::IoSlice::new(line)],
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    let r = c.line().unwrap();
    assert_eq!(
        (error_code(&r), r["id"].clone()),
        ("bad-descriptors", json!(9)),
        "{r}"
    );
    assert_progress(&mut c);

    // A client that pauses and leaves before the answer: the pause holds,
    // nothing breaks; another client resumes.
    let mut gone = vm.client();
    gone.request("pause", Value::Null);
    drop(gone);
    let start = Instant::now();
    while c.ok("status", Value::Null)["state"] != "paused" {
        assert!(start.elapsed() < GUARD);
        std::thread::sleep(Duration::from_millis(5));
    }
    c.ok("resume", Value::Null);
    assert_progress(&mut c);

    // An over-long line: too-large, then the connection is closed.
    let mut big = vm.client();
    let long = format!(
        r#"{{"id":1,"command":"status","pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let _ = big.stream.write_all(long.as_bytes());
    let r = big.line().expect("an answer before the close");
    assert_eq!(error_code(&r), "too-large", "{r}");
    assert!(big.line().is_none(), "the connection stays open");

    assert_eq!(c.ok("status", Value::Null)["state"], "running");
    assert_progress(&mut c);
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

#[test]
fn a_hundred_clients_at_once_each_get_their_status() {
    let mut vm = Vm::start("ctl-many", &[]);
    let mut c = vm.client();
    c.wait_running();
    let mut clients: Vec<Client> = (0..100).map(|_| vm.client()).collect();
    for (i, cl) in clients.iter_mut().enumerate() {
        cl.next_id = 1000 + i as u64;
        cl.request("status", Value::Null);
    }
    for (i, cl) in clients.iter_mut().enumerate() {
        let r = cl.response(1000 + i as u64);
        assert_eq!(r["ok"]["state"], "running", "{r}");
    }
    drop(clients);
    assert_progress(&mut c);
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_client_that_never_reads_is_dropped_and_the_vm_is_fine() {
    let mut vm = Vm::start("ctl-slow", &[]);
    let mut c = vm.client();
    c.wait_running();
    let before = rss_kib(vm.pid());
    // Subscribed, then asks for a great deal and reads none of it.
    let mut slow = vm.client();
    slow.request("events", Value::Null);
    let req = format!("{}\n", json!({"id": 1, "command": "status"}));
    let many = req.repeat(4000);
    slow.stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = slow.stream.write_all(many.as_bytes());
    // Events for the subscriber meanwhile.
    for _ in 0..20 {
        c.ok("pause", Value::Null);
        c.ok("resume", Value::Null);
    }
    // vmm dropped it: reading now ends (after what the kernel buffered).
    let mut sink = Vec::new();
    slow.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = slow.reader.read_to_end(&mut sink);
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert!(
        sink.len() < 4000 * 300,
        "it was not dropped: {} bytes",
        sink.len()
    );
    assert!(
        vm.stderr_text().contains("does not read what it is sent"),
        "{}",
        vm.stderr_text()
    );
    let after = rss_kib(vm.pid());
    assert!(
        after < before + 64 * 1024,
        "vmm grew from {before} to {after} KiB"
    );
    assert_progress(&mut c);
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

#[test]
fn commands_during_shutdown_are_answered() {
    let mut vm = Vm::start("ctl-shutdown", &[]);
    let mut c = vm.client();
    c.wait_running();
    let stop = c.request("stop", Value::Null);
    let status = c.request("status", Value::Null);
    let pause = c.request("pause", Value::Null);
    let again = c.request("stop", Value::Null);
    assert_eq!(c.response(stop)["ok"]["state"], "stopping");
    let s = c.response(status);
    assert_eq!(s["ok"]["state"], "stopping", "{s}");
    let p = c.response(pause);
    assert_eq!(error_code(&p), "invalid-state", "{p}");
    assert_eq!(c.response(again)["ok"]["state"], "stopping");
    assert_eq!(vm.wait().code(), Some(0));
}

/// Connects to `path` as uid/gid 65534 in a forked child; returns what
/// it read (`Err(errno)` when the connect failed).
fn connect_as_nobody(path: &Path) -> Result<String, i32> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // Everything the child needs is prepared before the fork: it makes
    // only system calls.
    // SAFETY: a zeroed sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let (r, w) = nix::unistd::pipe().unwrap();
    let mut buf = [0u8; 512];
    // SAFETY: the child makes only async-signal-safe system calls on
    // memory prepared before the fork, and ends with _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            // SAFETY: plain system calls on valid arguments.
            unsafe {
                let fail = |e: i32, w: i32| {
                    let msg = [b'E', e as u8];
                    libc::write(w, msg.as_ptr().cast(), 2);
                    libc::_exit(0);
                };
                let wfd = w.as_raw_fd();
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    fail(255, wfd);
                }
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(s, (&raw const addr).cast(), len) != 0 {
                    fail(*libc::__errno_location(), wfd);
                }
                libc::write(wfd, b"O".as_ptr().cast(), 1);
                loop {
                    let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
                    if n <= 0 {
                        break;
                    }
                    libc::write(wfd, buf.as_ptr().cast(), n as usize);
                }
                libc::_exit(0);
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut out = Vec::new();
            let mut f = std::fs::File::from(r);
            f.read_to_end(&mut out).unwrap();
            nix::sys::wait::waitpid(child, None).unwrap();
            match out.first() {
                Some(b'O') => Ok(String::from_utf8_lossy(&out[1..]).into_owned()),
                Some(b'E') => Err(i32::from(out[1])),
                _ => panic!("the child said nothing"),
            }
        }
    }
}

#[test]
fn another_uid_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        e2e_tests::skip("another_uid_is_refused needs root to become uid 65534");
        return;
    }
    let mut vm = Vm::start("ctl-uid", &[]);
    // The directory must let uid 65534 reach the socket at all.
    std::fs::set_permissions(&vm._dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = vm.client();
    c.wait_running();
    // Mode 0600: the kernel refuses the connect.
    assert_eq!(connect_as_nobody(&vm.socket), Err(libc::EACCES));
    // Opened up: vmm's own check refuses it with a line.
    std::fs::set_permissions(&vm.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let got = connect_as_nobody(&vm.socket).expect("connects once the mode allows");
    let v: Value = serde_json::from_str(got.lines().next().expect("one line")).unwrap();
    assert_eq!(v["id"], Value::Null);
    assert_eq!(error_code(&v), "permission-denied", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("uid 65534"));
    assert_eq!(got.lines().count(), 1, "nothing else is sent: {got}");
    assert_progress(&mut c);
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

#[test]
fn connection_bounds_hold() {
    let mut vm = Vm::start("ctl-bounds", &[]);
    let mut c = vm.client();
    c.wait_running();
    // At most 128 clients at once (this one included); the next is told
    // and closed. (The connection that found the socket up at start-up
    // may still count for a moment: vmm sees its close asynchronously.)
    let mut others: Vec<Client> = Vec::new();
    loop {
        let mut cl = Client::connect_raw(&vm.socket);
        let first = cl.line().expect("a line");
        if first.get("greeting").is_some() {
            others.push(cl);
            assert!(others.len() < 128, "more than 128 clients were served");
            continue;
        }
        assert_eq!(error_code(&first), "busy", "{first}");
        assert!(cl.line().is_none(), "a refused client is closed");
        break;
    }
    assert!(
        others.len() + 1 >= 127,
        "refused with only {} clients",
        others.len() + 1
    );
    drop(others.pop());
    // A slot is free again (the close is seen asynchronously).
    let start = Instant::now();
    loop {
        let mut again = Client::connect_raw(&vm.socket);
        let first = again.line().expect("a line");
        if first.get("greeting").is_some() {
            break;
        }
        assert!(start.elapsed() < GUARD, "no slot came free: {first}");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(others);

    // Descriptors sent ahead of their line are bounded too. (The 127
    // clients just closed free their slots asynchronously.)
    let start = Instant::now();
    let mut flood = loop {
        let mut cl = Client::connect_raw(&vm.socket);
        match cl.line() {
            Some(first) if first.get("greeting").is_some() => break cl,
            other => {
                assert!(start.elapsed() < GUARD, "no slot came free: {other:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let (a, _b) = UnixStream::pair().unwrap();
    let fds = [a.as_raw_fd(); 4];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    for _ in 0..3 {
        let sent = nix::sys::socket::sendmsg::<()>(
            flood.stream.as_raw_fd(),
            &[std::io::IoSlice::new(b" ")],
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        );
        if sent.is_err() {
            break;
        }
    }
    let r = flood.line().expect("an answer before the close");
    assert_eq!(error_code(&r), "bad-descriptors", "{r}");
    assert!(flood.line().is_none());

    assert_progress(&mut c);
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

#[test]
fn stats_are_live_and_commands_for_an_old_plugin_are_not_supported() {
    let mut vm = Vm::start_with("ctl-stats", &["--stats"], &[]);
    let mut c = vm.client();
    c.wait_running();
    let vcpu_exits = |c: &mut Client| -> u64 {
        let s = c.ok("stats", Value::Null);
        assert_eq!(s["collecting"], true, "{s}");
        s["vcpus"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|v| v["exits"].as_array().cloned().unwrap_or_default())
            .map(|e| e["exits"].as_u64().unwrap_or(0))
            .sum()
    };
    // The vcpus publish their numbers when kicked (every 500 ms).
    let start = Instant::now();
    let first = loop {
        let n = vcpu_exits(&mut c);
        if n > 0 {
            break n;
        }
        assert!(start.elapsed() < GUARD, "no live vcpu statistics");
        std::thread::sleep(Duration::from_millis(50));
    };
    let start = Instant::now();
    while vcpu_exits(&mut c) <= first {
        assert!(start.elapsed() < GUARD, "the live statistics do not move");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = c.ok("stats", Value::Null);
    let rows = s["requests"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["channel"] == "main" && r["request"] == "Start"),
        "{s}"
    );

    // ctl_spin never opened its control channel: nothing reaches it.
    for (command, args) in [
        ("powerbtn", Value::Null),
        ("sleepbtn", Value::Null),
        ("plugin", json!({"name": "count", "args": {"x": 1}})),
    ] {
        let r = c.call(command, args);
        assert_eq!(error_code(&r), "not-supported", "{r}");
        assert!(r["error"]["message"].as_str().unwrap().starts_with(command));
    }
    assert_progress(&mut c);
    c.ok("stop", Value::Null);
    assert_eq!(vm.wait().code(), Some(0));
}

#[test]
fn stop_and_kill_during_start_up_end_the_vm() {
    // The plugin would wait 20 s before starting the VM.
    let mut vm = Vm::start("ctl-early-stop", &["20000"]);
    let mut c = vm.client();
    assert_eq!(c.ok("status", Value::Null)["state"], "starting");
    assert_eq!(c.ok("stop", Value::Null)["state"], "stopping");
    let status = vm.wait();
    // The plugin ignores the shutdown while it sleeps: killed after the
    // grace period, as a VM that ends on its own would be.
    assert_eq!(status.code(), Some(1));
    let log = vm.stderr_text();
    assert!(
        log.contains("shutting down: stopped over the control socket"),
        "{log}"
    );
    assert!(!vm.socket.exists());

    let mut vm = Vm::start("ctl-early-kill", &["20000"]);
    let mut c = vm.client();
    c.ok("kill", Value::Null);
    assert_eq!(vm.wait().code(), Some(1));
    let log = vm.stderr_text();
    assert!(
        log.contains("vmm: error: killed over the control socket"),
        "{log}"
    );
    assert!(!vm.socket.exists());
}

/// `multi-vcpu` (plugin-examples) on two vcpus: the plugin itself pauses
/// its vcpus round after round (`PauseVcpus`), printing `round N` lines.
#[test]
fn host_pause_of_some_vcpus_and_the_plugins_own_pauses() {
    let dir = TempDir::new("ctl-multi");
    let socket = dir.0.join("vmm.sock");
    let stdout = dir.0.join("stdout");
    let mut child = Command::new(bin("vmm"))
        .arg("--api-socket")
        .arg(&socket)
        .args(["--cpus", "2", "--plugin"])
        .arg(bin("multi-vcpu"))
        .args(["--plugin-args", "100000000"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let rounds = || {
        std::fs::read_to_string(&stdout)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("round "))
            .count()
    };
    let start = Instant::now();
    while rounds() < 2 {
        assert!(start.elapsed() < GUARD, "multi-vcpu never ran its rounds");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = Client::connect(&socket);
    let t = c.ok("vcpu-tids", Value::Null);
    let vcpus = t["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2, "{t}");
    for v in vcpus {
        let (id, tid) = (v["vcpu"].as_u64().unwrap(), v["tid"].as_i64().unwrap());
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim(), format!("vmm_vcpu{id}"));
    }

    // Some vcpus: the VM is still running, with the list.
    assert_eq!(c.ok("pause", json!({"vcpus": [1]}))["paused"], json!([1]));
    let s = c.ok("status", Value::Null);
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["paused_vcpus"], json!([1]));
    // All of them: the plugin's next pause cannot complete, so its rounds
    // stop; after the resume they go on.
    c.ok("pause", Value::Null);
    assert_eq!(c.ok("status", Value::Null)["state"], "paused");
    std::thread::sleep(Duration::from_millis(100));
    let a = rounds();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rounds() <= a + 1,
        "rounds went on while every vcpu was paused"
    );
    assert_eq!(c.ok("resume", Value::Null)["resumed"], json!([0, 1]));
    let b = rounds();
    let start = Instant::now();
    while rounds() < b + 2 {
        assert!(
            start.elapsed() < GUARD,
            "the rounds did not go on after the resume"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c.ok("kill", Value::Null);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < GUARD, "vmm hung after kill");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(1));
    assert!(!socket.exists());
}
