//! The `longrun` example machine (the machine snapshot, migration and hot
//! restart are checked with): jailed, it prints `progress K` for every
//! round and a `result=` that matches an independent model of its guest
//! computation, so guest memory, registers and the plugin's device state
//! all took part.

use e2e_tests::{bin, longrun_model as model, run_vmm};

/// `name` (`longrun` or its C twin) prints every round and the modelled
/// result, and the PIT interrupted it.
fn reports_progress_and_the_modelled_result(name: &str) {
    for rounds in [1u32, 4] {
        let r = run_vmm(&[], &bin(name), &[&rounds.to_string()]);
        r.assert_success();
        let progress: Vec<&str> = r
            .stdout
            .lines()
            .filter(|l| l.starts_with("progress "))
            .collect();
        let want: Vec<String> = (1..=rounds).map(|k| format!("progress {k}")).collect();
        assert_eq!(progress, want, "{r:#?}");
        let last = r.stdout.lines().last().unwrap_or_default();
        assert_eq!(last, format!("result={:#018x}", model(rounds)), "{r:#?}");
        let ticks: u64 = r
            .stderr
            .split(&format!("{name}: "))
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no tick count: {r:#?}"));
        assert!(ticks > 0, "the PIT interrupted the computation: {r:#?}");
    }
}

#[test]
fn longrun_reports_progress_and_the_modelled_result() {
    reports_progress_and_the_modelled_result("longrun");
}

#[test]
fn longrun_c_reports_progress_and_the_same_modelled_result() {
    reports_progress_and_the_modelled_result("longrun_c");
}

#[test]
fn longrun_refuses_a_bad_round_count() {
    for name in ["longrun", "longrun_c"] {
        for bad in ["0", "100001", "x"] {
            let r = run_vmm(&[], &bin(name), &[bad]);
            assert_ne!(r.code, Some(0), "{name} {bad}: {r:#?}");
            let usage = format!("usage: vmm --plugin {name}");
            assert!(r.stderr.contains(&usage), "{name} {bad}: {r:#?}");
            assert!(r.stdout.is_empty(), "{name} {bad}: {r:#?}");
        }
    }
}

/// The bytes of the C array `static const uint8_t NAME[] = { ... };` in
/// `c/longrun.c` (comments stripped).
fn c_array(source: &str, name: &str) -> Vec<u8> {
    let start = source
        .find(&format!("static const uint8_t {name}[] = {{"))
        .unwrap_or_else(|| panic!("no array {name} in longrun.c"));
    let body = &source[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
    let mut text = String::new();
    let mut rest = body;
    while let Some(open) = rest.find("/*") {
        text.push_str(&rest[..open]);
        rest = &rest[open + rest[open..].find("*/").expect("closed comment") + 2..];
    }
    text.push_str(rest);
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let hex = t.strip_prefix("0x").unwrap_or_else(|| panic!("{t:?}"));
            u8::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("{t:?}"))
        })
        .collect()
}

/// `bytes` as the body of a C array, 12 to a line.
fn c_text(bytes: &[u8]) -> String {
    bytes
        .chunks(12)
        .map(|c| {
            let line: Vec<String> = c.iter().map(|b| format!("0x{b:02x},")).collect();
            format!("    {}\n", line.join(" "))
        })
        .collect()
}

#[test]
fn longrun_c_guest_bytes_equal_the_assembler_output() {
    use plugin_examples::longrun::{guest_handler, guest_main};
    let path = e2e_tests::repo_root().join("plugin-examples/c/longrun.c");
    let source = std::fs::read_to_string(&path).unwrap();
    for (name, want) in [
        ("guest_main", guest_main().unwrap()),
        ("guest_handler", guest_handler().unwrap()),
    ] {
        let got = c_array(&source, name);
        assert!(
            got == want,
            "{name} in {} differs from the assembler's {} bytes; it should read:\n{}",
            path.display(),
            want.len(),
            c_text(&want)
        );
    }
}

/// `vmm ctl SOCKET ARGS...`: status and stdout.
fn ctl(socket: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let (code, out, _) = e2e_tests::vmm_ctl(socket, &[&["--json"], args].concat());
    (code, out)
}

/// `name` serves its control channel from the thread that answers
/// `SAVE_STATE` (spawn_handler_with_state / crosvm_control_reply_state
/// on the same mutex): through the real vmm, its control socket and the
/// host's PluginControl, `plugin state` shows the device state the vcpu
/// thread keeps changing; other commands are refused.
fn serves_its_device_state_over_the_control_channel(name: &str) {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = e2e_tests::TempDir::new(&format!("{name}_state"));
    let socket = dir.0.join("vm.sock");
    let mut child = Command::new(bin("vmm"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--plugin")
        .arg(bin(name))
        .args(["--plugin-args", "100000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmm");
    let start = Instant::now();
    let mut accs = Vec::new();
    while accs.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name}: no changing device state: {accs:?}"
        );
        assert!(child.try_wait().unwrap().is_none(), "{name} ended early");
        if socket.exists() {
            let (code, out) = ctl(&socket, &["plugin", "state"]);
            if code == Some(0) {
                let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
                assert_eq!(v["fold"], serde_json::Value::Null, "{name}: {v}");
                assert_eq!(v["x"], serde_json::Value::Null, "{name}: {v}");
                let acc = v["acc"].as_str().expect("acc").to_owned();
                assert!(acc.starts_with("0x") && acc.len() == 18, "{name}: {v}");
                if acc != "0x0000000000000000" && accs.last() != Some(&acc) {
                    accs.push(acc);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, out) = ctl(&socket, &["plugin", "other"]);
    assert_eq!(code, Some(1), "{name}: {out}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn longrun_serves_its_device_state_over_the_control_channel() {
    serves_its_device_state_over_the_control_channel("longrun");
}

#[test]
fn longrun_c_serves_its_device_state_over_the_control_channel() {
    serves_its_device_state_over_the_control_channel("longrun_c");
}
