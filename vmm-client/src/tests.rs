//! The client against the fake server of [`crate::fake`] (a real unix
//! socket, a thread speaking the protocol).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use crate::fake::{FakeConn, FakeServer};
use crate::proto::{Command, ErrorCode, Greeting, Response, ServerMessage, MAX_MESSAGE};
use crate::{error_chain, Client, ClientError};

/// A fresh socket path in a directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmm-client-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Dir(p)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("vm.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chain(e: &ClientError) -> String {
    error_chain(e)
}

fn connect(server: &FakeServer) -> Client {
    Client::connect_timeout(server.path(), Some(Duration::from_secs(20))).expect("connect")
}

#[test]
fn out_of_order_responses_are_matched_by_id() {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), |mut c: FakeConn| {
        c.greet().unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r = c.recv().unwrap().expect("a request");
            let (id, cmd) = r.parse().expect("a valid request");
            ids.push((id, cmd.name()));
        }
        // Answer in reverse order, with events in between.
        for (n, (id, name)) in ids.into_iter().rev().enumerate() {
            c.event(n as u64 + 1, "paused", json!({"vcpus": [n]}))
                .unwrap();
            c.respond(Response::ok(id, json!({ "answer": name })))
                .unwrap();
        }
        while let Ok(Some(_)) = c.recv() {}
    })
    .unwrap();
    let mut c = connect(&server);
    let a = c.send(&Command::Status, &[]).unwrap();
    let b = c.send(&Command::VcpuTids, &[]).unwrap();
    let s = c.send(&Command::Stats, &[]).unwrap();
    assert_eq!(
        (a.clone(), b.clone(), s.clone()),
        (json!(1), json!(2), json!(3))
    );
    // Wait for the first one sent, which comes last: the others and the
    // events are kept.
    let ra = c.wait_response(&a).unwrap();
    assert_eq!(ra.ok, Some(json!({"answer": "status"})));
    let rb = c.wait_response(&b).unwrap();
    assert_eq!(rb.ok, Some(json!({"answer": "vcpu-tids"})));
    // What is left comes out of recv in arrival order: event 1, the stats
    // response, event 2, event 3.
    let order: Vec<String> = (0..4)
        .map(|_| match c.recv().unwrap() {
            ServerMessage::Event(e) => format!("event {}", e.seq),
            ServerMessage::Response(r) => format!("response {}", r.id),
            ServerMessage::Greeting(_) => "greeting".into(),
        })
        .collect();
    assert_eq!(order, ["event 1", "response 3", "event 2", "event 3"]);
}

#[test]
fn request_keeps_interleaved_events_for_the_event_stream() {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), |mut c: FakeConn| {
        c.greet().unwrap();
        while let Ok(Some(r)) = c.recv() {
            let (id, cmd) = r.parse().unwrap();
            if cmd == (Command::Events { subscribe: true }) {
                c.respond(Response::ok(id, Value::Null)).unwrap();
                continue;
            }
            c.event(1, "paused", json!({"vcpus": [0]})).unwrap();
            // A response to an id nobody asked for, then the events.
            c.respond(Response::ok(json!("other"), json!(0))).unwrap();
            c.event(2, "resumed", json!({"vcpus": [0]})).unwrap();
            c.respond(Response::ok(
                id,
                serde_json::to_value(crate::fake::sample_status()).unwrap(),
            ))
            .unwrap();
            c.event(3, "plugin-exited", json!({"pid": 4242, "status": 0}))
                .unwrap();
            return; // close: the VM exited
        }
    })
    .unwrap();
    let mut c = connect(&server);
    c.subscribe().unwrap();
    let st = c.status().unwrap();
    assert_eq!((st.state.as_str(), st.plugin_pid), ("running", 4242));
    let events: Vec<(u64, String)> = c
        .events()
        .map(|e| e.map(|e| (e.seq, e.event)).unwrap())
        .collect();
    assert_eq!(
        events,
        [
            (1, "paused".to_string()),
            (2, "resumed".to_string()),
            (3, "plugin-exited".to_string())
        ]
    );
    // The stray response is still there for recv.
    match c.recv().unwrap() {
        ServerMessage::Response(r) => assert_eq!(r.id, json!("other")),
        m => panic!("{m:?}"),
    }
    assert!(matches!(c.recv(), Err(ClientError::Closed)));
}

/// A pipe whose read end carries `token`.
fn token_pipe(token: &str) -> OwnedFd {
    let (r, w) = nix::unistd::pipe().unwrap();
    let mut w = std::fs::File::from(w);
    w.write_all(token.as_bytes()).unwrap();
    r
}

#[test]
fn descriptors_arrive_with_their_request() {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), |mut c: FakeConn| {
        c.greet().unwrap();
        while let Ok(Some(r)) = c.recv() {
            let (id, _) = r.parse().expect("a whole request line");
            let tokens: Vec<String> = r
                .fds
                .into_iter()
                .map(|fd| {
                    let mut s = String::new();
                    std::fs::File::from(fd).read_to_string(&mut s).unwrap();
                    s
                })
                .collect();
            c.respond(Response::ok(id, json!(tokens))).unwrap();
        }
    })
    .unwrap();
    let mut c = connect(&server);
    // Sent back to back, so the server's reads see several lines at once;
    // the big one spans many of its 4 KiB reads and several skbs.
    let big_args = json!({ "blob": "x".repeat(MAX_MESSAGE - 200) });
    let plan: Vec<(Command, Vec<&str>)> = vec![
        (Command::Status, vec![]),
        (Command::Stats, vec!["b0", "b1"]),
        (Command::VcpuTids, vec![]),
        (
            Command::Plugin {
                name: "big".into(),
                args: big_args,
            },
            vec!["big0"],
        ),
        (Command::Status, vec!["d0", "d1", "d2"]),
        (Command::Status, vec![]),
    ];
    let mut ids = Vec::new();
    for (cmd, tokens) in &plan {
        let fds: Vec<OwnedFd> = tokens.iter().map(|t| token_pipe(t)).collect();
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        ids.push(c.send(cmd, &borrowed).unwrap());
        // Our copies close here; the server holds its own.
    }
    for (id, (_, tokens)) in ids.iter().zip(&plan) {
        let r = c.wait_response(id).unwrap();
        assert_eq!(r.ok, Some(json!(tokens)), "request {id}");
    }
}

#[test]
fn over_long_server_line_is_an_error_not_unbounded_memory() {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), |mut c: FakeConn| {
        c.greet().unwrap();
        if let Ok(Some(_)) = c.recv() {
            // Far more than the bound, without a newline: the client must
            // give up at the bound, not buffer it all.
            let junk = vec![b'a'; 16 * 1024];
            for _ in 0..64 {
                if c.send_raw(&junk).is_err() {
                    return;
                }
            }
        }
    })
    .unwrap();
    let mut c = connect(&server);
    let e = c.status().unwrap_err();
    assert!(matches!(e, ClientError::LineTooLong), "{e:?}");
    assert!(
        chain(&e).contains("longer than the protocol's 65536 bytes"),
        "{}",
        chain(&e)
    );
    assert!(c.buf.len() <= MAX_MESSAGE, "{}", c.buf.len());
    // No resync: the connection is done.
    assert!(matches!(c.status(), Err(ClientError::Broken)));
}

#[test]
fn over_long_line_with_a_newline_is_an_error_too() {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), |mut c: FakeConn| {
        c.greet().unwrap();
        if let Ok(Some(_)) = c.recv() {
            let mut line = format!(r#"{{"id":1,"ok":"{}"}}"#, "a".repeat(MAX_MESSAGE)).into_bytes();
            line.push(b'\n');
            let _ = c.send_raw(&line);
        }
    })
    .unwrap();
    let mut c = connect(&server);
    assert!(matches!(c.status(), Err(ClientError::LineTooLong)));
}

fn connect_error(script: impl Fn(FakeConn) + Send + Sync + 'static) -> String {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), script).unwrap();
    let e = Client::connect_timeout(server.path(), Some(Duration::from_secs(20))).unwrap_err();
    let s = chain(&e);
    assert!(
        s.starts_with(&format!("cannot connect to {}: ", d.sock().display())),
        "{s}"
    );
    s
}

#[test]
fn greeting_mismatch_is_a_clear_error() {
    let s = connect_error(|mut c| {
        let _ = c.send(&ServerMessage::Greeting(Greeting {
            protocol: 2,
            vmm: "9.0.0".into(),
            pid: 1,
        }));
    });
    assert!(
        s.ends_with(
            "protocol mismatch: vmm 9.0.0 speaks protocol 2, this client speaks protocol 1"
        ),
        "{s}"
    );
    let s = connect_error(|mut c| {
        let _ = c.send_raw(b"SSH-2.0-OpenSSH_9.6\r\n");
    });
    assert!(
        s.contains("not a vmm control socket: its first line is not a greeting (SSH-2.0"),
        "{s}"
    );
    let s = connect_error(|mut c| {
        let _ = c.respond(Response::error(
            Value::Null,
            ErrorCode::PermissionDenied,
            "uid 1000 may not command this VM",
        ));
    });
    assert!(
        s.ends_with(
            "vmm refused the connection: permission-denied: uid 1000 may not command this VM"
        ),
        "{s}"
    );
    let s = connect_error(drop);
    assert!(s.ends_with("no greeting: vmm closed the connection"), "{s}");
}

#[test]
fn connect_errors_name_the_path_and_cause() {
    let d = Dir::new();
    let p = d.sock();
    let e = chain(&Client::connect(&p).unwrap_err());
    assert!(
        e.starts_with(&format!("cannot connect to {}: no such file", p.display())),
        "{e}"
    );
    std::fs::write(&p, b"not a socket").unwrap();
    let e = chain(&Client::connect(&p).unwrap_err());
    assert_eq!(
        e,
        format!("cannot connect to {}: not a socket", p.display())
    );
    std::fs::remove_file(&p).unwrap();
    // A socket file nobody serves.
    drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
    let e = chain(&Client::connect(&p).unwrap_err());
    assert!(e.contains(": nobody serves it (a stale socket"), "{e}");
}

#[test]
fn a_refused_command_names_the_command_and_code() {
    let d = Dir::new();
    let server = FakeServer::like_vmm(d.sock()).unwrap();
    let mut c = connect(&server);
    let e = c.sleep_button().unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotSupported));
    assert_eq!(
        chain(&e),
        "sleepbtn: refused by vmm: not-supported: sleepbtn: the plugin does not take control commands"
    );
    // Descriptors with a command that takes none.
    let fd = token_pipe("x");
    let e = c
        .request_with_fds(&Command::Status, &[fd.as_fd()])
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadDescriptors), "{e:?}");
    // The connection stays usable.
    assert_eq!(c.status().unwrap().plugin_pid, 4242);
}

#[test]
fn typed_helpers_read_the_results() {
    let d = Dir::new();
    let server = FakeServer::like_vmm(d.sock()).unwrap();
    let mut c = connect(&server);
    assert_eq!(c.greeting().protocol, 1);
    assert_eq!(c.status().unwrap(), crate::fake::sample_status());
    let t = c.vcpu_tids().unwrap();
    assert_eq!(
        t.vcpus.iter().map(|v| v.tid).collect::<Vec<_>>(),
        [5001, 5002]
    );
    let s = c.stats().unwrap();
    assert_eq!(s.requests.len(), 2);
    assert_eq!(s.vcpus[0].exits[0].start, Some(1280));
    assert_eq!(
        c.plugin("count", json!({"x": 1})).unwrap(),
        json!({"count": 42, "args": {"x": 1}})
    );
    assert_eq!(c.pause(Some(&[1])).unwrap(), json!({"paused": [1]}));
    assert_eq!(c.stop().unwrap(), json!({"state": "stopping"}));
    let sent: Vec<Value> = server.received().iter().map(|l| l.json()).collect();
    assert_eq!(
        sent[0],
        json!({"id": 1, "command": "status", "protocol": 1})
    );
    assert_eq!(
        sent[4],
        json!({"id": 5, "command": "pause", "args": {"vcpus": [1]}, "protocol": 1})
    );
}

#[test]
fn a_silent_server_times_out() {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), |mut c: FakeConn| {
        c.greet().unwrap();
        while let Ok(Some(_)) = c.recv() {}
    })
    .unwrap();
    let mut c = connect(&server);
    c.set_timeout(Some(Duration::from_millis(200)));
    let e = c.status().unwrap_err();
    assert!(matches!(e, ClientError::TimedOut(_)), "{e:?}");
    assert!(
        chain(&e).starts_with("no answer from vmm within 200ms"),
        "{}",
        chain(&e)
    );
}

#[test]
fn local_bounds_are_checked_before_sending() {
    let d = Dir::new();
    let server = FakeServer::like_vmm(d.sock()).unwrap();
    let mut c = connect(&server);
    let fds: Vec<OwnedFd> = (0..9).map(|_| token_pipe("x")).collect();
    let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let e = c.send(&Command::Status, &b).unwrap_err();
    assert_eq!(
        chain(&e),
        "status: 9 descriptors, more than the protocol's 8"
    );
    let e = c.plugin("n", json!("y".repeat(MAX_MESSAGE))).unwrap_err();
    assert!(matches!(e, ClientError::RequestTooLarge { .. }), "{e:?}");
    // Nothing was sent; the connection works.
    assert_eq!(c.status().unwrap().vcpus, 2);
    assert_eq!(server.received().len(), 1);
}

#[test]
fn a_line_cut_by_the_server_is_truncated() {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), |mut c: FakeConn| {
        c.greet().unwrap();
        if let Ok(Some(_)) = c.recv() {
            let _ = c.send_raw(br#"{"id":1,"ok""#);
        }
    })
    .unwrap();
    let mut c = connect(&server);
    assert!(matches!(c.status(), Err(ClientError::Truncated)));
}

#[test]
fn a_request_the_server_drops_unanswered_names_the_command() {
    let d = Dir::new();
    let server = FakeServer::start(d.sock(), |mut c: FakeConn| {
        c.greet().unwrap();
        // Reads the request, then the connection closes unanswered.
        let _ = c.recv();
    })
    .unwrap();
    let mut c = connect(&server);
    let e = c
        .request(&Command::Migrate {
            to: "unix:/t".into(),
            downtime_ms: 20,
        })
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Unanswered { command } if command == "migrate"),
        "{e:?}"
    );
    assert_eq!(
        error_chain(&e),
        "migrate: vmm closed the connection before answering it"
    );
    // Reading on is plain `Closed`.
    assert!(matches!(c.recv(), Err(ClientError::Closed)));
}
