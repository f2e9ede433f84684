//! The live-migration table (issue 12, docs/migration-stream.md): downtime
//! and total time of `vmm ctl S migrate unix:PATH` between two jailed
//! `vmm`s on this machine, for `longrun` with 256 MiB more guest memory
//! (every page data), idle apart from the guest's own 16 KiB working set,
//! and with the plugin's writing load (about 5,000 page writes a second
//! through the SDK's tracker). Median of `runs`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vmm(dir: &Path, vmm_args: &[&str], plugin_args: &[&str]) -> Kill {
    Kill(
        Command::new(dir.join("vmm"))
            .args(vmm_args)
            .arg("--plugin")
            .arg(dir.join("longrun"))
            .arg("--plugin-args")
            .args(plugin_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vmm"),
    )
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One migration: its reply.
fn migrate(dir: &Path, plugin_args: &[&str]) -> Value {
    let tmp = std::env::temp_dir().join(format!("vmm-bench-mig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let target_sock = tmp.join("in.sock");
    let api = tmp.join("src.sock");
    let addr = format!("unix:{}", target_sock.display());
    let _target = vmm(dir, &["--incoming", &addr], plugin_args);
    wait_for(&target_sock);
    let mut src = vmm(dir, &["--api-socket", api.to_str().unwrap()], plugin_args);
    // Running: its second progress line.
    let out = src.0.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    for l in lines.by_ref() {
        if l.expect("read the source's output")
            .starts_with("progress 2")
        {
            break;
        }
    }
    let out = Command::new(dir.join("vmm"))
        .args(["ctl", "--json"])
        .arg(&api)
        .args(["migrate", &addr])
        .output()
        .expect("vmm ctl migrate");
    assert!(out.status.success(), "migrate failed: {out:?}");
    let _ = std::fs::remove_dir_all(&tmp);
    serde_json::from_slice(&out.stdout).expect("the migrate reply")
}

/// Prints the table.
pub fn run(dir: &Path, runs: usize) {
    println!(
        "\nLive migration (longrun + 256 MiB of data pages, jailed, unix socket on this machine, \
         downtime target 20 ms, median of {runs})\n"
    );
    println!("| guest | downtime | total | rounds | MiB sent |");
    println!("|---|---:|---:|---:|---:|");
    for (name, args) in [
        (
            "idle (only its 16 KiB working set)",
            &["100000", "mem=256"][..],
        ),
        (
            "plugin writing ~5,000 pages/s",
            &["100000", "mem=256", "load"][..],
        ),
    ] {
        let r: Vec<Value> = (0..runs.max(1)).map(|_| migrate(dir, args)).collect();
        let f = |k: &str| super::median(r.iter().map(|v| v[k].as_f64().unwrap_or(0.0)).collect());
        let (down, total, rounds, bytes) =
            (f("downtime_ms"), f("total_ms"), f("rounds"), f("bytes"));
        eprintln!("migration, {name}: downtime {down:.1} ms, total {total:.0} ms");
        println!(
            "| {name} | {down:.1} ms | {total:.0} ms | {rounds:.0} | {:.1} |",
            bytes / f64::from(1 << 20)
        );
    }
}
