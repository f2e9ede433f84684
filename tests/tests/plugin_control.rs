//! The plugin's control channel (docs/protocol-extensions.md §5), from the
//! plugin's side: the `counter` machines run jailed under real `vmm` and
//! make visible progress; a plugin that never asks for the channel runs as
//! before; a hostile plugin cannot harm the VM through it; and the SDK's
//! `ControlChannel` talks to the host's `PluginControl` over a real
//! socketpair (the forwarding path without the control socket).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crosvm_plugin::{ControlChannel, ControlKind};
use e2e_tests::{bin, run_vmm, VmmRun};
use serde_json::json;
use vmm::runtime::plugin_control::{Forward, PluginControl, Reply};

/// The `count N` lines of a run.
fn counts(r: &VmmRun) -> Vec<u64> {
    r.stdout
        .lines()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .collect()
}

/// `counter`/`counter_c` pressing their own power button after 1.6 s:
/// `count N` lines that increase, then a clean guest shutdown and status 0.
fn counter_runs_and_shuts_down(name: &str) {
    let r = run_vmm(&["--stats"], &bin(name), &["1600"]);
    r.assert_success();
    let c = counts(&r);
    assert!(c.len() >= 2, "fewer than two count lines: {r:#?}");
    assert!(
        c.windows(2).all(|w| w[0] < w[1]),
        "the counter did not increase: {c:?}"
    );
    assert!(c[0] > 0, "the guest made no progress: {c:?}");
    assert!(r.stdout.contains("power button pressed"), "{r:#?}");
    let last = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("guest shut down cleanly at count "))
        .unwrap_or_else(|| panic!("no clean shutdown: {r:#?}"));
    let last: u64 = last.parse().expect("a count");
    assert!(last >= *c.last().unwrap(), "{last} < {c:?}");
    // It asked for its control channel, and got it.
    let row = r
        .stderr
        .lines()
        .find(|l| l.contains("GetControlSocket"))
        .unwrap_or_else(|| panic!("no GetControlSocket in the statistics: {r:#?}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[2..4], ["1", "0"], "count and errors: {row}");
    // Cheap for the host: a poll every few ms, not per iteration.
    let polls: u64 = r
        .stderr
        .lines()
        .find(|l| l.contains("IoPort 0x510..0x511"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or_else(|| panic!("no status port exits: {r:#?}"));
    assert!(polls < 10_000, "{polls} status polls in about 2 s");
}

#[test]
fn counter_counts_up_and_its_power_button_shuts_it_down() {
    counter_runs_and_shuts_down("counter");
}

#[test]
fn counter_c_counts_up_and_its_power_button_shuts_it_down() {
    counter_runs_and_shuts_down("counter_c");
}

#[test]
fn a_plugin_that_never_asks_runs_as_before() {
    let r = run_vmm(&["--stats"], &bin("adder"), &["40", "2"]);
    r.assert_success();
    assert!(r.stdout.contains("40 + 2 = 42"), "{r:#?}");
    assert!(!r.stderr.contains("GetControlSocket"), "{r:#?}");
}

#[test]
fn a_hostile_control_plugin_cannot_harm_the_vm() {
    let r = run_vmm(&[], &bin("control_hostile"), &[]);
    r.assert_success();
    for line in [
        "control_hostile: control channel open",
        "control_hostile: second control_channel refused: get_control_socket: EEXIST",
        "control_hostile: control channel reopened",
        "control_hostile: the guest ran to its end",
    ] {
        assert!(r.stdout.contains(line), "missing {line:?}: {r:#?}");
    }
    assert!(r.stdout.contains("flooded "), "{r:#?}");
    // The garbage was reported, but the flood did not flood the log.
    assert!(r.stderr.contains("undecodable"), "{r:#?}");
    let warnings = r.stderr.matches("control channel:").count();
    assert!(warnings <= 8, "{warnings} control channel warnings: {r:#?}");
}

/// The host's end and the SDK's end of one channel.
fn channel() -> (PluginControl, ControlChannel) {
    let mut host = PluginControl::default();
    let plugin: OwnedFd = host.open().expect("open");
    (host, ControlChannel::from_fd(plugin))
}

/// Reads replies until `n` arrived (bounded, never asserts on time).
fn replies(host: &mut PluginControl, n: usize) -> Vec<(u64, Reply)> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replies lost: {out:?}"
        );
        out.extend(host.on_readable());
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

#[test]
fn sdk_control_channel_receives_what_the_host_forwards_and_replies() {
    let (mut host, plugin) = channel();
    host.forward(Forward::PowerButton, 1).unwrap();
    host.forward(
        Forward::Plugin {
            name: "count".into(),
            args: json!({"verbose": true}),
        },
        2,
    )
    .unwrap();
    host.forward(Forward::SleepButton, 3).unwrap();
    let a = plugin.recv().unwrap().expect("a command");
    assert_eq!(a.kind, ControlKind::PowerButton);
    assert_eq!(a.args, b"null");
    let b = plugin.recv().unwrap().expect("a command");
    assert_eq!(b.kind, ControlKind::Custom("count".into()));
    let args: serde_json::Value = serde_json::from_slice(&b.args).unwrap();
    assert_eq!(args, json!({"verbose": true}));
    let c = plugin.try_recv().unwrap().expect("a command");
    assert_eq!(c.kind, ControlKind::SleepButton);
    // Nothing more: try_recv says so without blocking.
    assert_eq!(plugin.try_recv().unwrap_err().errno(), libc::EAGAIN);
    plugin.reply_ok(b.id, br#"{"count": 42}"#).unwrap();
    plugin.reply_ok(a.id, b"").unwrap();
    plugin
        .reply_error(c.id, libc::ENOTSUP, "no sleep button")
        .unwrap();
    assert_eq!(
        replies(&mut host, 3),
        vec![
            (2, Reply::Ok(json!({"count": 42}))),
            (1, Reply::Ok(serde_json::Value::Null)),
            (
                3,
                Reply::Refused {
                    errno: libc::ENOTSUP,
                    message: "no sleep button".into()
                }
            ),
        ]
    );
    // A refusal needs a positive errno; a result is bounded.
    assert!(plugin.reply_error(c.id, 0, "x").is_err());
    assert!(plugin.reply_ok(c.id, &vec![b' '; 61 * 1024]).is_err());
    // The host closing its end ends the plugin's receive.
    drop(host);
    assert!(plugin.recv().unwrap().is_none());
}

#[test]
fn sdk_handler_thread_serves_commands_until_the_host_closes() {
    let (mut host, plugin) = channel();
    let handler = plugin
        .spawn_handler(|cmd| match &cmd.kind {
            ControlKind::Custom(n) if n == "echo" => Ok(cmd.args.clone()),
            ControlKind::Custom(n) if n == "huge" => Ok(vec![b'1'; 70 * 1024]),
            _ => Err((libc::EINVAL, "unknown".into())),
        })
        .unwrap();
    let echo = |tag| Forward::Plugin {
        name: "echo".into(),
        args: json!([tag]),
    };
    for tag in 0..10 {
        host.forward(echo(tag), tag).unwrap();
    }
    host.forward(
        Forward::Plugin {
            name: "huge".into(),
            args: json!(null),
        },
        10,
    )
    .unwrap();
    host.forward(Forward::PowerButton, 11).unwrap();
    let mut got = replies(&mut host, 12);
    got.sort_by_key(|(t, _)| *t);
    for (tag, r) in &got[..10] {
        assert_eq!(*r, Reply::Ok(json!([tag])));
    }
    assert!(
        matches!(&got[10].1, Reply::Refused { errno, .. } if *errno == libc::EMSGSIZE),
        "{:?}",
        got[10]
    );
    assert!(
        matches!(&got[11].1, Reply::Refused { errno, .. } if *errno == libc::EINVAL),
        "{:?}",
        got[11]
    );
    drop(host);
    handler.join().unwrap().unwrap();
}

#[test]
fn a_plugin_closing_its_channel_answers_waiting_commands_closed() {
    let (mut host, plugin) = channel();
    host.forward(Forward::PowerButton, 7).unwrap();
    let cmd = plugin.recv().unwrap().unwrap();
    assert_eq!(cmd.kind, ControlKind::PowerButton);
    drop(plugin);
    assert_eq!(replies(&mut host, 1), vec![(7, Reply::Closed)]);
    assert!(host.fd().is_none());
}

#[test]
fn counters_validate_their_arguments_and_vcpu_count() {
    // (example, plugin arguments, vmm options, expected stderr)
    let cases: &[(&str, &[&str], &[&str], &str)] = &[
        ("counter", &["abc"], &[], "bad argument \"abc\""),
        ("counter", &["1", "2"], &[], "usage: vmm --plugin counter"),
        ("counter_c", &["-5"], &[], "POWERBTN_MS must be a number"),
        (
            "counter_c",
            &["1", "2"],
            &[],
            "usage: vmm --plugin counter_c",
        ),
        ("counter", &[], &["--cpus", "2"], "run vmm with --cpus 1"),
        ("counter_c", &[], &["--cpus", "2"], "run vmm without --cpus"),
    ];
    for (name, args, opts, expected) in cases {
        let r = run_vmm(opts, &bin(name), args);
        assert_eq!(r.code, Some(1), "{name} {args:?} {opts:?}: {r:#?}");
        assert!(r.stdout.is_empty(), "{name} ran: {r:#?}");
        assert!(r.stderr.contains(expected), "{name} {args:?}: {r:#?}");
    }
}

/// The host stopping the VM (here SIGTERM; `vmm stop` takes the same path)
/// is an orderly end for the counter machines: they print where the
/// counter got to and exit 0 within the grace period.
#[test]
fn counters_end_in_order_when_the_host_stops_the_vm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    for name in ["counter", "counter_c"] {
        let mut child = Command::new(bin("vmm"))
            .arg("--plugin")
            .arg(bin(name))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // Running: the first count line.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("no count line");
        assert!(first.starts_with("count "), "{first}");
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut lines = vec![first];
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(30)) {
            lines.push(l);
        }
        let status = child.wait().unwrap();
        let stderr = err.join().unwrap();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("the host stopped the VM at count ")),
            "{name}: {lines:?}\n{stderr}"
        );
        // The plugin ended by itself (status 0), not killed after the grace.
        assert!(
            stderr.contains("plugin exited with status 0"),
            "{name}: {status:?}\n{stderr}"
        );
    }
}
