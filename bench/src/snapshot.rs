//! Snapshot and restore time against guest memory size (issue 12,
//! `vmm-bench --only snapshot`): `bench-snap` (jailed) with 64 MiB to 2 GiB
//! of guest RAM, every page holding data (`full`, the worst case) or half
//! of them (`half`: every page touched, a pseudo-random half non-zero).
//!
//! - snapshot: `vmm ctl --json S snapshot DIR without_device_state`, timed
//!   from spawning `vmm ctl` to its exit (request to reply, plus the ctl
//!   process's own start), and the writer's own `ms` from the reply;
//! - restore: `vmm --restore DIR`, timed from the spawn to the guest's
//!   first exit after the restore (the plugin's `exit_ns`), and the host's
//!   own `restored guest memory and VM state ... in N ms` (loading the
//!   images into the plugin's memory, after opening and verifying them);
//! - the floor, in the same directory on the same disk: `dd bs=1M` writing
//!   the same number of data bytes from a tmpfs file (what guest memory
//!   is) to a file, and reading it back into tmpfs.
//!
//! Sync policy, the same for both sides: writes are not synced (the
//! snapshot writer does not fdatasync; neither does `dd` here), so both
//! measure writing into the page cache. Before each read the files are
//! fsync'ed and dropped from the page cache (`posix_fadvise(DONTNEED)` on
//! those files only, untimed), so restore and `dd` both read from the disk.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::{field, median, monotonic_ns, target_dir};

/// Guest memory sizes (MiB).
const SIZES: [u64; 4] = [64, 256, 1024, 2048];

/// One measured round.
#[derive(Clone, Copy, Default)]
struct Round {
    /// `vmm ctl ... snapshot` spawn to exit.
    snapshot_ms: f64,
    /// The writer's own time (the reply's `ms`).
    writer_ms: f64,
    /// `vmm --restore` spawn to the guest's first exit.
    restore_ms: f64,
    /// The host's image loading (its log line).
    load_ms: f64,
    /// `dd` writing the data bytes.
    floor_write_ms: f64,
    /// `dd` reading them back (cold cache).
    floor_read_ms: f64,
    /// Bytes of guest data the snapshot holds.
    data_bytes: u64,
}

fn vmm() -> Command {
    Command::new(target_dir().join("vmm"))
}

/// fsyncs every file under `path` (a file or a directory) and drops it
/// from the page cache.
fn sync_and_drop(path: &Path) {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .expect("read the snapshot directory")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        let file = std::fs::File::open(&f).expect("open for sync");
        file.sync_all().expect("fsync");
        nix::fcntl::posix_fadvise(
            file.as_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .expect("posix_fadvise(DONTNEED)");
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn dd(input: &Path, output: &Path) -> f64 {
    let t = Instant::now();
    let status = Command::new("dd")
        .arg(format!("if={}", input.display()))
        .arg(format!("of={}", output.display()))
        .args(["bs=1M", "status=none"])
        .status()
        .expect("run dd");
    let ms = ms_since(t);
    assert!(status.success(), "dd {input:?} -> {output:?} failed");
    ms
}

/// The floor for `bytes` of data: (write ms, read ms).
fn floor(dir: &Path, bytes: u64) -> (f64, f64) {
    let shm = PathBuf::from(format!("/dev/shm/vmm-bench-snap-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&shm).expect("tmpfs source");
        let mut chunk = vec![0u8; 1 << 20];
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i as u8) | 0x80;
        }
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            std::io::Write::write_all(&mut f, &chunk[..n]).expect("fill the tmpfs source");
            left -= n as u64;
        }
    }
    let file = dir.join("floor.bin");
    let write = dd(&shm, &file);
    sync_and_drop(&file);
    let _ = std::fs::remove_file(&shm);
    let read = dd(&file, &shm);
    let _ = std::fs::remove_file(&shm);
    let _ = std::fs::remove_file(&file);
    (write, read)
}

/// Waits for a stdout line starting with `prefix`.
fn wait_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .expect("read the plugin's stdout");
        assert!(n > 0, "vmm ended before printing {prefix:?}");
        if line.starts_with(prefix) {
            // Keep draining so the plugin never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return line;
        }
    }
}

fn ctl(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = vmm()
        .arg("ctl")
        .arg("--json")
        .arg(socket)
        .args(args)
        .output()
        .expect("run vmm ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `N` out of `... in N ms`.
fn load_ms(stderr: &str) -> f64 {
    stderr
        .lines()
        .find(|l| l.contains("restored guest memory and VM state"))
        .and_then(|l| l.rsplit(" in ").next())
        .and_then(|v| v.trim().strip_suffix("ms"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn round(tmp: &Path, mib: u64, fill: &str) -> Round {
    let dir = tmp.join(format!("snap-{mib}-{fill}"));
    let _ = std::fs::remove_dir_all(&dir);
    let socket = tmp.join("snap.sock");
    let plugin = target_dir().join("bench-snap");
    let mut vm = vmm()
        .arg("--api-socket")
        .arg(&socket)
        .arg("--plugin")
        .arg(&plugin)
        .arg("--plugin-args")
        .args([mib.to_string(), fill.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmm");
    wait_line(&mut vm, "bench-snap: running");
    let t = Instant::now();
    let (ok, reply) = ctl(
        &socket,
        &[
            "snapshot",
            dir.to_str().expect("utf-8 path"),
            "without_device_state",
        ],
    );
    let snapshot_ms = ms_since(t);
    assert!(ok, "snapshot failed: {reply}");
    let json: serde_json::Value = serde_json::from_str(reply.trim()).expect("snapshot reply");
    let writer_ms = json["ms"].as_f64().unwrap_or(f64::NAN);
    let data_bytes = json["memory_pages"].as_u64().unwrap_or(0) * 4096;
    let _ = ctl(&socket, &["kill"]);
    let _ = vm.wait();
    let _ = std::fs::remove_file(&socket);
    sync_and_drop(&dir);

    let spawned = monotonic_ns();
    let mut restored = vmm()
        .arg("--restore")
        .arg(&dir)
        .arg("--plugin")
        .arg(&plugin)
        .arg("--plugin-args")
        .args([mib.to_string(), "restore".to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm --restore");
    let line = wait_line(&mut restored, "RESULT");
    let restore_ms = (field(&line, "exit_ns").unwrap_or(f64::NAN) - spawned as f64) / 1e6;
    let mut stderr = String::new();
    if let Some(mut e) = restored.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = restored.wait().expect("wait for vmm --restore");
    assert!(status.success(), "vmm --restore failed: {stderr}");
    let load_ms = load_ms(&stderr);
    let _ = std::fs::remove_dir_all(&dir);

    let (floor_write_ms, floor_read_ms) = floor(tmp, data_bytes);
    Round {
        snapshot_ms,
        writer_ms,
        restore_ms,
        load_ms,
        floor_write_ms,
        floor_read_ms,
        data_bytes,
    }
}

/// Prints the table; `runs` rounds per row (median).
pub fn run(runs: usize) {
    // On the disk (not tmpfs): the snapshot and the floor share it.
    let tmp = PathBuf::from(format!("/var/tmp/vmm-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("bench directory");
    let mut rows = Vec::new();
    for fill in ["full", "half"] {
        for mib in SIZES {
            let rounds: Vec<Round> = (0..runs.max(1)).map(|_| round(&tmp, mib, fill)).collect();
            let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
            let r = Round {
                snapshot_ms: m(|r| r.snapshot_ms),
                writer_ms: m(|r| r.writer_ms),
                restore_ms: m(|r| r.restore_ms),
                load_ms: m(|r| r.load_ms),
                floor_write_ms: m(|r| r.floor_write_ms),
                floor_read_ms: m(|r| r.floor_read_ms),
                data_bytes: rounds[0].data_bytes,
            };
            eprintln!(
                "snapshot {mib} MiB {fill}: snapshot {:.0} ms (dd {:.0}), restore {:.0} ms (load {:.0}, dd {:.0})",
                r.snapshot_ms, r.floor_write_ms, r.restore_ms, r.load_ms, r.floor_read_ms
            );
            rows.push((mib, fill, r));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!(
        "\nSnapshot and restore against guest memory size (bench-snap, jailed; median of {runs}; \
         floor: dd bs=1M of the same data bytes on the same disk; writes unsynced on both sides, \
         reads from a dropped page cache)\n"
    );
    println!("| guest RAM | pages with data | snapshot (ctl request → reply) | writer | dd write | snapshot vs dd (goal ≤ 1.5x) | restore (spawn → first guest exit) | of which loading | dd read | restore vs dd (goal ≤ 1.5x) |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mib, fill, r) in rows {
        let what = match fill {
            "full" => "all".to_string(),
            _ => format!("half ({} MiB)", r.data_bytes >> 20),
        };
        println!(
            "| {mib} MiB | {what} | {:.0} ms | {:.0} ms | {:.0} ms | {:.2}x | {:.0} ms | {:.0} ms | {:.0} ms | {:.2}x |",
            r.snapshot_ms,
            r.writer_ms,
            r.floor_write_ms,
            r.snapshot_ms / r.floor_write_ms,
            r.restore_ms,
            r.load_ms,
            r.floor_read_ms,
            r.restore_ms / r.floor_read_ms,
        );
    }
}
