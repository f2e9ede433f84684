//! The real `vmm ctl` binary (and crosvm's `vmm stop|suspend|resume|powerbtn
//! PATH`) against a fake control socket (`vmm_client::fake`, a thread in
//! this test speaking the protocol): human and `--json` output, exit
//! statuses 0/1/2, the requests each spelling sends, clear errors. The
//! end-to-end tests against a real vmm are in the host's test files.

use std::path::PathBuf;
use std::process::Command;

use e2e_tests::{bin, run_command, TempDir, VmmRun};
use vmm_client::fake::{FakeConn, FakeServer};
use vmm_client::serde_json::{self, json, Value};

fn vmm(args: &[&str]) -> VmmRun {
    let mut cmd = Command::new(bin("vmm"));
    cmd.args(args);
    run_command(cmd)
}

// Fields drop in order: the server before its directory.
struct Fixture {
    server: FakeServer,
    sock: String,
    _dir: TempDir,
}

fn fake(tag: &str) -> Fixture {
    let dir = TempDir::new(&format!("ctl-{tag}"));
    let path: PathBuf = dir.0.join("vm.sock");
    let server = FakeServer::like_vmm(&path).expect("fake server");
    Fixture {
        _dir: dir,
        server,
        sock: path.to_string_lossy().into_owned(),
    }
}

impl Fixture {
    fn ctl(&self, args: &[&str]) -> VmmRun {
        let mut v = vec!["ctl", self.sock.as_str()];
        v.extend_from_slice(args);
        vmm(&v)
    }

    /// The requests the server received, without ids and protocol.
    fn requests(&self) -> Vec<Value> {
        self.server
            .received()
            .iter()
            .map(|l| {
                let mut v = l.json();
                assert_eq!(v["protocol"], json!(1), "{l:?}");
                let o = v.as_object_mut().expect("an object");
                o.remove("id");
                o.remove("protocol");
                v
            })
            .collect()
    }
}

fn assert_code(r: &VmmRun, code: i32) {
    assert_eq!(r.code, Some(code), "{r:#?}");
}

#[test]
fn status_human_and_json() {
    let f = fake("status");
    let r = f.ctl(&["status"]);
    assert_code(&r, 0);
    for line in [
        "state:         running\n",
        "vcpus:         2\n",
        "paused vcpus:  none\n",
        "plugin pid:    4242\n",
        "jail init pid: 4241\n",
        "plugin:        /usr/libexec/counter\n",
        "uptime:        1.234s\n",
        "exits:         vcpu0 10, vcpu1 20\n",
        "objects:       ioevent 2, memory 1\n",
    ] {
        assert!(r.stdout.contains(line), "`{line}` in {r:#?}");
    }
    assert!(r.stderr.is_empty(), "{r:#?}");
    let r = f.ctl(&["--json", "status"]);
    assert_code(&r, 0);
    let v: Value = serde_json::from_str(&r.stdout).expect("--json prints JSON");
    assert_eq!(v["plugin_pid"], json!(4242));
    assert_eq!(v["state"], json!("running"));
    assert_eq!(r.stdout.lines().count(), 1, "{r:#?}");
    // --json after the command works too.
    let r = f.ctl(&["status", "--json"]);
    assert_code(&r, 0);
    assert!(serde_json::from_str::<Value>(&r.stdout).is_ok(), "{r:#?}");
}

#[test]
fn vcpu_tids_and_stats_tables() {
    let f = fake("tables");
    let r = f.ctl(&["vcpu-tids"]);
    assert_code(&r, 0);
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [vec!["vcpu", "tid"], vec!["0", "5001"], vec!["1", "5002"]],
        "{r:#?}"
    );
    let r = f.ctl(&["--json", "vcpu-tids"]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["vcpus"][1], json!({"vcpu": 1, "tid": 5002}));

    let r = f.ctl(&["stats"]);
    assert_code(&r, 0);
    let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    let lines: Vec<Vec<String>> = r.stdout.lines().map(words).collect();
    assert_eq!(
        lines[0],
        words("channel request count errors p50 p99 max"),
        "{r:#?}"
    );
    assert_eq!(
        lines[2],
        words("vcpu resume 300 2 3.0µs 9.0µs 15.0µs"),
        "{r:#?}"
    );
    assert!(
        r.stdout
            .contains("vcpu0: 300 resumed event(s), 900.0µs waiting on the plugin"),
        "{r:#?}"
    );
    assert_eq!(
        words(r.stdout.lines().find(|l| l.contains("IoPort")).unwrap()),
        words("IoPort 0x500..0x504 300 exit(s)")
    );
    assert!(r.stdout.contains("unreserved"), "{r:#?}");
}

#[test]
fn events_one_per_line_until_the_vm_exits() {
    let f = fake("events");
    let r = f.ctl(&["events"]);
    assert_code(&r, 0);
    assert_eq!(
        r.stdout,
        "#1 0.010s paused vcpus=[0,1]\n#2 0.020s resumed vcpus=[0,1]\n\
         #3 0.030s plugin-exited pid=4242 status=0\n",
        "{r:#?}"
    );
    let r = f.ctl(&["--json", "events"]);
    assert_code(&r, 0);
    let events: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["paused", "resumed", "plugin-exited"]);
    assert_eq!(events[2]["data"]["status"], json!(0));
    let r = f.ctl(&["events", "--count", "2"]);
    assert_code(&r, 0);
    assert_eq!(r.stdout.lines().count(), 2, "{r:#?}");
    assert!(
        f.requests()
            .iter()
            .all(|v| *v == json!({"command": "events"})),
        "{:?}",
        f.requests()
    );
}

#[test]
fn simple_commands_send_their_requests() {
    let f = fake("simple");
    let cases: &[(&[&str], Value, &str)] = &[
        (&["pause"], json!({"command": "pause"}), "paused: [0,1]\n"),
        (
            &["pause", "1"],
            json!({"command": "pause", "args": {"vcpus": [1]}}),
            "paused: [1]\n",
        ),
        (
            &["resume", "0", "1"],
            json!({"command": "resume", "args": {"vcpus": [0, 1]}}),
            "resumed: [0,1]\n",
        ),
        (&["stop"], json!({"command": "stop"}), "state: stopping\n"),
        (&["kill"], json!({"command": "kill"}), "state: stopping\n"),
        (&["powerbtn"], json!({"command": "powerbtn"}), "ok\n"),
        (
            &["plugin", "count", r#"{"step": 2}"#],
            json!({"command": "plugin", "args": {"name": "count", "args": {"step": 2}}}),
            "args:  {\"step\":2}\ncount: 42\n",
        ),
    ];
    for (args, _, out) in cases {
        let r = f.ctl(args);
        assert_code(&r, 0);
        assert_eq!(r.stdout, *out, "{args:?}: {r:#?}");
    }
    let want: Vec<Value> = cases.iter().map(|c| c.1.clone()).collect();
    assert_eq!(f.requests(), want);
    let r = f.ctl(&["--json", "plugin", "count"]);
    assert_code(&r, 0);
    assert_eq!(r.stdout, "{\"args\":null,\"count\":42}\n");
}

#[test]
fn crosvm_spellings_map_to_the_right_requests() {
    let f = fake("crosvm");
    for word in ["stop", "suspend", "resume", "powerbtn"] {
        let r = vmm(&[word, &f.sock]);
        assert_code(&r, 0);
    }
    assert_eq!(
        f.requests(),
        [
            json!({"command": "stop"}),
            json!({"command": "pause"}),
            json!({"command": "resume"}),
            json!({"command": "powerbtn"}),
        ]
    );
}

#[test]
fn refused_commands_exit_1_with_the_servers_code_and_message() {
    let f = fake("refused");
    let r = f.ctl(&["sleepbtn"]);
    assert_code(&r, 1);
    assert_eq!(
        r.stderr,
        "vmm ctl: error: sleepbtn: refused by vmm: not-supported: sleepbtn: the plugin does not take control commands\n"
    );
    assert!(r.stdout.is_empty(), "{r:#?}");
    let r = f.ctl(&["--json", "plugin", "nope"]);
    assert_code(&r, 1);
    assert!(
        r.stderr
            .contains("plugin: refused by vmm: plugin-error: plugin nope: EINVAL"),
        "{r:#?}"
    );
    // Bad JSON arguments are caught before anything is sent.
    let n = f.requests().len();
    let r = f.ctl(&["plugin", "count", "{oops"]);
    assert_code(&r, 1);
    assert!(
        r.stderr
            .starts_with("vmm ctl: error: plugin count: the arguments are not JSON: "),
        "{r:#?}"
    );
    assert_eq!(f.requests().len(), n);
}

#[test]
fn usage_errors_exit_2() {
    let f = fake("usage");
    for args in [
        &["ctl"][..],
        &["ctl", &f.sock],
        &["ctl", &f.sock, "frobnicate"],
        &["ctl", &f.sock, "pause", "first"],
        &["ctl", &f.sock, "status", "--timeout", "soon"],
        &["ctl", &f.sock, "events", "--count", "-1"],
        &["stop"],
    ] {
        let r = vmm(args);
        assert_code(&r, 2);
        // A clap error, or the usage when nothing was given.
        assert!(
            r.stderr.starts_with("error: ") || r.stderr.contains("Usage: vmm ctl"),
            "{args:?}: {r:#?}"
        );
        assert!(r.stdout.is_empty(), "{args:?}: {r:#?}");
    }
    assert!(f.requests().is_empty());
    let r = vmm(&["ctl", "--help"]);
    assert_code(&r, 0);
    assert!(r.stdout.contains("vcpu-tids"), "{r:#?}");
}

#[test]
fn a_missing_socket_is_a_clear_error() {
    let dir = TempDir::new("ctl-missing");
    let p = dir.0.join("nobody.sock");
    let p = p.to_string_lossy();
    let r = vmm(&["ctl", &p, "status"]);
    assert_code(&r, 1);
    assert!(
        r.stderr.starts_with(&format!(
            "vmm ctl: error: cannot connect to {p}: no such file (is vmm running with --api-socket at this path?)"
        )),
        "{r:#?}"
    );
    let r = vmm(&["stop", &p]);
    assert_code(&r, 1);
    assert!(r.stderr.contains("cannot connect to"), "{r:#?}");
    // A regular file is named as such.
    std::fs::write(&*p, b"x").unwrap();
    let r = vmm(&["ctl", &p, "status"]);
    assert_code(&r, 1);
    assert_eq!(
        r.stderr,
        format!("vmm ctl: error: cannot connect to {p}: not a socket\n")
    );
}

#[test]
fn a_silent_vmm_times_out() {
    let dir = TempDir::new("ctl-silent");
    let path = dir.0.join("vm.sock");
    let _server = FakeServer::start(&path, |mut c: FakeConn| {
        let _ = c.greet();
        while let Ok(Some(_)) = c.recv() {}
    })
    .unwrap();
    let r = vmm(&["ctl", "--timeout", "0.3", &path.to_string_lossy(), "status"]);
    assert_code(&r, 1);
    assert_eq!(
        r.stderr, "vmm ctl: error: no answer from vmm within 300ms\n",
        "{r:#?}"
    );
}
