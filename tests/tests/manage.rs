//! Managing a running VM end to end (issue 11's "done when"): the jailed
//! `counter` example machines (Rust and C) under a real `vmm` with
//! `--api-socket`, driven by the real `vmm ctl` binary and, for the event
//! stream, by a raw client on the socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{bin, wait_guarded, TempDir, HANG_GUARD};
use serde_json::Value;

/// A `vmm` running a plugin in the background with a control socket.
struct RunningVm {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn drain(r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut r = r;
        let _ = r.read_to_string(&mut s);
        s
    })
}

impl RunningVm {
    fn start(tag: &str, plugin: &Path, vmm_args: &[&str]) -> RunningVm {
        let dir = TempDir::new(tag);
        let socket = dir.0.join("vm.sock");
        let mut cmd = Command::new(bin("vmm"));
        cmd.arg("--api-socket")
            .arg(&socket)
            .args(vmm_args)
            .arg("--plugin")
            .arg(plugin)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vmm");
        let stdout = Some(drain(child.stdout.take().expect("stdout")));
        let stderr = Some(drain(child.stderr.take().expect("stderr")));
        let mut vm = RunningVm {
            child,
            socket,
            _dir: dir,
            stdout,
            stderr,
        };
        vm.wait_running();
        vm
    }

    /// Waits until `status` says the vcpus run.
    fn wait_running(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                let end = self.wait_end(Duration::from_secs(5));
                panic!(
                    "vmm ended before running: {:?}\n{}\n{}",
                    end.code, end.stdout, end.stderr
                );
            }
            if self.socket.exists() {
                let (code, out, _) = ctl(&self.socket, &["--json", "status"]);
                if code == Some(0) {
                    let v: Value = serde_json::from_str(&out).expect("status --json is JSON");
                    if v["state"] == "running" {
                        return;
                    }
                }
            }
            assert!(start.elapsed() < HANG_GUARD, "the VM never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        ctl(&self.socket, args)
    }

    fn ctl_ok_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let (code, out, err) = self.ctl(&full);
        assert_eq!(code, Some(0), "vmm ctl {args:?} failed: {out}\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("vmm ctl {args:?}: {e}: {out}"))
    }

    fn count(&self) -> u64 {
        let v = self.ctl_ok_json(&["plugin", "count"]);
        v["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("no count in {v}"))
    }

    fn wait_end(&mut self, guard: Duration) -> Ended {
        let start = Instant::now();
        let Some(status) = wait_guarded(&mut self.child, guard) else {
            panic!("vmm did not end within {guard:?}");
        };
        Ended {
            code: status.code(),
            took: start.elapsed(),
            stdout: self
                .stdout
                .take()
                .map(|t| t.join().unwrap())
                .unwrap_or_default(),
            stderr: self
                .stderr
                .take()
                .map(|t| t.join().unwrap())
                .unwrap_or_default(),
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    e2e_tests::vmm_ctl(socket, args)
}

/// A raw protocol client (for the event stream).
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut raw = Raw {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let g = raw.line();
        assert_eq!(g["greeting"]["protocol"], 1, "{g}");
        raw
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        let n = self.reader.read_line(&mut l).expect("read a line");
        assert!(n > 0, "the server closed the connection");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    }

    fn request(&mut self, id: u64, command: &str) -> Value {
        writeln!(self.writer, r#"{{"id":{id},"command":"{command}"}}"#).unwrap();
        loop {
            let v = self.line();
            if v["id"] == id {
                return v;
            }
        }
    }
}

#[test]
fn pause_stops_the_guest_and_resume_restores_it() {
    let vm = RunningVm::start("manage-pause", &bin("counter"), &[]);
    let a = vm.count();
    std::thread::sleep(Duration::from_millis(250));
    let b = vm.count();
    assert!(
        b > a,
        "the guest makes progress while running: {a} then {b}"
    );

    let paused = vm.ctl_ok_json(&["pause"]);
    assert!(paused.is_object(), "{paused}");
    let st = vm.ctl_ok_json(&["status"]);
    assert_eq!(st["state"], "paused", "{st}");
    let c = vm.count();
    std::thread::sleep(Duration::from_millis(300));
    let d = vm.count();
    assert_eq!(c, d, "no guest progress over 300 ms while paused");

    vm.ctl_ok_json(&["resume"]);
    std::thread::sleep(Duration::from_millis(250));
    let e = vm.count();
    assert!(e > d, "progress again after resume: {d} then {e}");
    let st = vm.ctl_ok_json(&["status"]);
    assert_eq!(st["state"], "running", "{st}");
}

#[test]
fn stop_ends_the_vm_with_status_zero_within_the_grace_period() {
    let mut vm = RunningVm::start("manage-stop", &bin("counter"), &[]);
    let (code, out, err) = vm.ctl(&["stop"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let end = vm.wait_end(Duration::from_secs(10));
    assert_eq!(end.code, Some(0), "{}\n{}", end.stdout, end.stderr);
    assert!(
        end.took < Duration::from_millis(1500),
        "vmm took {:?} to stop (grace period 1 s)",
        end.took
    );
    assert!(!vm.socket.exists(), "the socket is removed at exit");
}

#[test]
fn status_json_names_the_plugin_pid() {
    let vm = RunningVm::start("manage-status", &bin("counter"), &[]);
    let st = vm.ctl_ok_json(&["status"]);
    let pid = st["plugin_pid"].as_i64().expect("plugin_pid") as i32;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the plugin pid exists");
    let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap()).into_owned();
    assert!(argv0.ends_with("counter"), "pid {pid} runs {argv0:?}");
    // It is jailed: in a pid namespace other than ours.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).unwrap();
    assert_ne!(
        ns(&pid.to_string()),
        ns("self"),
        "the plugin runs in its jail"
    );
    assert_eq!(st["vcpus"], 1, "{st}");
    assert_eq!(st["vmm_pid"], vm.child.id(), "{st}");
}

#[test]
fn events_deliver_paused_resumed_and_exited_in_order() {
    let mut vm = RunningVm::start("manage-events", &bin("counter"), &[]);
    let mut sub = Raw::connect(&vm.socket);
    let r = sub.request(1, "events");
    assert!(r["ok"].is_object() || r["ok"].is_boolean(), "{r}");
    vm.ctl_ok_json(&["pause"]);
    vm.ctl_ok_json(&["resume"]);
    let (code, _, err) = vm.ctl(&["stop"]);
    assert_eq!(code, Some(0), "{err}");
    let mut seen = Vec::new();
    let mut last_seq = 0;
    while !seen.iter().any(|e| e == "plugin-exited") {
        let v = sub.line();
        let Some(name) = v["event"].as_str() else {
            continue;
        };
        let seq = v["seq"].as_u64().expect("seq");
        assert!(seq > last_seq, "seq increases: {seq} after {last_seq}");
        last_seq = seq;
        if name == "plugin-exited" {
            assert_eq!(v["data"]["status"], 0, "{v}");
        }
        seen.push(name.to_string());
    }
    let pos = |n: &str| {
        seen.iter()
            .position(|e| e == n)
            .unwrap_or_else(|| panic!("no {n} event in {seen:?}"))
    };
    assert!(pos("paused") < pos("resumed"), "{seen:?}");
    assert!(pos("resumed") < pos("stopping"), "{seen:?}");
    assert!(pos("stopping") < pos("plugin-exited"), "{seen:?}");
    let end = vm.wait_end(Duration::from_secs(10));
    assert_eq!(end.code, Some(0), "{}", end.stderr);
}

fn powerbtn_shuts_the_guest_down(plugin: &str) {
    let mut vm = RunningVm::start(&format!("manage-pwr-{plugin}"), &bin(plugin), &[]);
    let (code, out, err) = vm.ctl(&["powerbtn"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let end = vm.wait_end(Duration::from_secs(20));
    assert_eq!(end.code, Some(0), "{}\n{}", end.stdout, end.stderr);
    assert!(
        end.stdout.contains("guest shut down cleanly"),
        "stdout: {}\nstderr: {}",
        end.stdout,
        end.stderr
    );
}

#[test]
fn powerbtn_makes_the_rust_counter_guest_shut_down_cleanly() {
    powerbtn_shuts_the_guest_down("counter");
}

#[test]
fn powerbtn_makes_the_c_counter_guest_shut_down_cleanly() {
    powerbtn_shuts_the_guest_down("counter_c");
}

#[test]
fn crosvm_spellings_suspend_resume_and_stop() {
    let mut vm = RunningVm::start("manage-crosvm", &bin("counter"), &[]);
    let run = |word: &str| {
        let out = Command::new(bin("vmm"))
            .arg(word)
            .arg(&vm.socket)
            .output()
            .expect("run vmm");
        assert!(out.status.success(), "vmm {word}: {out:?}");
    };
    run("suspend");
    assert_eq!(vm.ctl_ok_json(&["status"])["state"], "paused");
    run("resume");
    assert_eq!(vm.ctl_ok_json(&["status"])["state"], "running");
    run("stop");
    let end = vm.wait_end(Duration::from_secs(10));
    assert_eq!(end.code, Some(0), "{}", end.stderr);
}

#[test]
fn ctl_reports_a_refused_command_with_status_one() {
    let vm = RunningVm::start("manage-refused", &bin("counter"), &[]);
    let (code, _, err) = vm.ctl(&["pause", "7"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("vmm ctl: error:"), "{err}");
    assert!(err.contains('7'), "names the vcpu: {err}");
    // The VM is unaffected.
    let a = vm.count();
    std::thread::sleep(Duration::from_millis(100));
    assert!(vm.count() > a);
}
