//! The hot-restart table (issue 13, docs/protocol-extensions.md §9), jailed,
//! a 1 GiB guest: the guest's blackout during `upgrade` (vcpus not running,
//! from the park request to the resume, as vmm reports it), and from the
//! plugin's SIGKILL (sent here) to the guest running again (the
//! `plugin-restarted` event, read here), each against the time to start a
//! trivial plugin (a whole `vmm` life of the same plugin with a 1 MiB guest
//! that starts the VM and exits). Median of `runs`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GUEST_MIB: &str = match option_env!("BENCH_RESTART_MIB") {
    Some(m) => m,
    None => "1024",
};

fn ctl(dir: &Path, socket: &Path, args: &[&str]) -> String {
    let out = Command::new(dir.join("vmm"))
        .arg("ctl")
        .arg("--json")
        .arg(socket)
        .args(args)
        .output()
        .expect("run vmm ctl");
    assert!(out.status.success(), "vmm ctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_u64(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\""))?;
    let rest = text[at + key.len() + 2..].trim_start_matches([':', ' ']);
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn wait_running(dir: &Path, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(dir.join("vmm"))
            .args(["ctl", "--json"])
            .arg(socket)
            .arg("status")
            .output()
            .expect("vmm ctl status");
        if String::from_utf8_lossy(&out.stdout).contains("\"running\"") {
            return;
        }
        assert!(Instant::now() < deadline, "the benchmark VM did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_vm(dir: &Path, socket: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(dir.join("vmm"))
        .arg("--api-socket")
        .arg(socket)
        .args(["--on-plugin-crash", "restart:1000"])
        .arg("--plugin")
        .arg(dir.join("bench-restart"))
        .args(["--plugin-args", GUEST_MIB])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmm");
    wait_running(dir, socket);
    child
}

fn trivial_start(dir: &Path) -> Duration {
    let t = Instant::now();
    let st = Command::new(dir.join("vmm"))
        .arg("--plugin")
        .arg(dir.join("bench-restart"))
        .args(["--plugin-args", "1", "quit"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run vmm");
    assert!(st.success(), "the trivial plugin failed");
    t.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints the table.
pub fn run(dir: &Path, tmp: &Path, runs: usize) {
    let socket = tmp.join("restart.sock");
    let mut vm = start_vm(dir, &socket);
    let plugin = dir.join("bench-restart");
    let mut upgrades = Vec::new();
    for _ in 0..runs {
        let reply = ctl(
            dir,
            &socket,
            &["upgrade", plugin.to_str().unwrap(), GUEST_MIB],
        );
        let us = json_u64(&reply, "blackout_us").expect("blackout_us in the reply");
        upgrades.push(us as f64 / 1000.0);
    }
    // SIGKILL to running: the events stream says when the vcpus run again.
    let mut events = Command::new(dir.join("vmm"))
        .args(["ctl", "--json"])
        .arg(&socket)
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vmm ctl events");
    let mut lines = BufReader::new(events.stdout.take().expect("events stdout")).lines();
    let mut kills = Vec::new();
    let mut host = Vec::new();
    for _ in 0..runs {
        let status = ctl(dir, &socket, &["status"]);
        let pid = json_u64(&status, "plugin_pid").expect("plugin_pid") as i32;
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the plugin");
        loop {
            let l = lines
                .next()
                .expect("the events stream ended")
                .expect("read an event");
            if l.contains("plugin-restarted") {
                host.push(json_u64(&l, "blackout_us").unwrap_or(0) as f64 / 1000.0);
                break;
            }
        }
        kills.push(ms(t.elapsed()));
    }
    let _ = events.kill();
    let _ = events.wait();
    let _ = ctl(dir, &socket, &["kill"]);
    let _ = vm.wait();
    let trivial: Vec<f64> = (0..runs).map(|_| ms(trivial_start(dir))).collect();
    eprintln!("SIGKILL to running {kills:?} ms; the host's part (reap to resume) {host:?} ms");
    let (u, k, h, t) = (
        super::median(upgrades),
        super::median(kills),
        super::median(host),
        super::median(trivial),
    );
    eprintln!("upgrade blackout {u:.2} ms, SIGKILL to running {k:.2} ms, trivial start {t:.2} ms");
    println!("\nHot restart (jailed, 1 GiB guest, median of {runs})\n");
    println!("| what | ms | / trivial plugin start |");
    println!("|---|---:|---:|");
    println!(
        "| guest blackout during `upgrade` (park to resume) | {u:.2} | {:.2} |",
        u / t
    );
    println!(
        "| plugin SIGKILL to guest running again (seen by a control client) | {k:.2} | {:.2} |",
        k / t
    );
    println!(
        "| of which the host's restart (reap to resume) | {h:.2} | {:.2} |",
        h / t
    );
    println!("| trivial plugin start (whole `vmm` life, 1 MiB guest) | {t:.2} | 1.00 |");
}
