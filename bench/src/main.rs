//! `vmm-bench`: measures the vcpu exit path against its floors in one run and
//! prints a Markdown table. See README.md, section "Performance".
//!
//! `vmm-bench [--iterations N] [--runs R] [--life-runs L] [--only reserve|trace|startup|exits|reset|migrate|snapshot|restart]`:
//! each row is the median of R runs (default 3) of N guest exits (default
//! 50000); the start-up rows (`startup.rs`) of L whole lives (default 20).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use vmm_bench::floor::{self, Floor};
use vmm_bench::guest::{loop_code, Access};

mod migrate;
mod reset;
mod restart;
mod snapshot;
mod startup;

struct Options {
    iterations: u32,
    runs: usize,
    env: Vec<(String, String)>,
    /// Only the reservation-cost table (`--only reserve`).
    reserve_only: bool,
    /// `--only trace`: just the tracing-cost table.
    trace_only: bool,
    /// `--only startup`: just the start-up, density and memory tables.
    startup_only: bool,
    /// `--only reset`: just the fast-reset table (`reset.rs`).
    reset_only: bool,
    /// `--only migrate`: just the live-migration table (`migrate.rs`).
    migrate_only: bool,
    /// `--only snapshot`: just the snapshot and restore table (`snapshot.rs`).
    snapshot_only: bool,
    /// `--only restart`: just the hot-restart table (`restart.rs`).
    restart_only: bool,
    /// `--only exits`: just the exit tables and the short start-up table.
    exits_only: bool,
    /// Whole lives per start-up row.
    life_runs: usize,
}

/// One plugin run's report.
#[derive(Default, Clone, Copy)]
struct PluginResult {
    rate: f64,
    init_ns: u64,
    rss_anon_kb: u64,
    rss_file_kb: u64,
}

fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .expect("locate the target directory")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn field(line: &str, name: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Runs `vmm` with a benchmark plugin once.
fn run_plugin(opts: &Options, cpus: u32, plugin: &Path, args: &[String]) -> (PluginResult, u64) {
    run_plugin_env(opts, cpus, plugin, args, &[])
}

/// Runs `vmm` with a benchmark plugin once, with extra environment.
fn run_plugin_env(
    opts: &Options,
    cpus: u32,
    plugin: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> (PluginResult, u64) {
    run_plugin_with(opts, cpus, plugin, args, env, &[])
}

/// Runs `vmm [vmm_args]` with a benchmark plugin once.
fn run_plugin_with(
    opts: &Options,
    cpus: u32,
    plugin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    vmm_args: &[&str],
) -> (PluginResult, u64) {
    let mut cmd = Command::new(target_dir().join("vmm"));
    cmd.args(vmm_args)
        .args(["--disable-sandbox", "--cpus", &cpus.to_string(), "--plugin"])
        .arg(plugin)
        .arg("--plugin-args")
        .args(args)
        .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        // The `--stats` table is not the benchmark's output.
        .stderr(if vmm_args.is_empty() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    let spawned_ns = monotonic_ns();
    let out = cmd.output().expect("run vmm");
    assert!(
        out.status.success(),
        "vmm with {} {args:?} failed",
        plugin.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .expect("plugin RESULT line");
    let exits = field(line, "exits").unwrap_or(0.0);
    let secs = field(line, "secs").unwrap_or(f64::INFINITY);
    let r = PluginResult {
        rate: exits / secs,
        init_ns: field(line, "init_ns").unwrap_or(0.0) as u64,
        rss_anon_kb: field(line, "rss_anon_kb").unwrap_or(0.0) as u64,
        rss_file_kb: field(line, "rss_file_kb").unwrap_or(0.0) as u64,
    };
    (r, spawned_ns)
}

fn plugin_rate(
    opts: &Options,
    cpus: u32,
    plugin: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> f64 {
    median(
        (0..opts.runs)
            .map(|_| run_plugin_env(opts, cpus, plugin, args, env).0.rate)
            .collect(),
    )
}

fn floor_rate(opts: &Options, f: Floor) -> f64 {
    median(
        (0..opts.runs)
            .map(|_| floor::run(f, Access::PortOut, opts.iterations))
            .collect(),
    )
}

/// A process that keeps one core busy while it lives.
struct BusyLoop(nix::unistd::Pid);

impl BusyLoop {
    fn start() -> BusyLoop {
        // SAFETY: the orchestrator is single-threaded; the child only spins.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => loop {
                std::hint::spin_loop();
            },
            nix::unistd::ForkResult::Parent { child } => BusyLoop(child),
        }
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.0, None);
    }
}

fn compile_c_plugin(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf();
    let out = dir.join("bench_c");
    let lib = target_dir();
    let status = Command::new("cc")
        .arg(format!("-I{}", root.join("plugin-sdk/include").display()))
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(root.join("bench/c/bench.c"))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lcrosvm_plugin")
        .status()
        .expect("run cc");
    assert!(status.success(), "compiling the C benchmark plugin failed");
    out
}

/// One plugin row: label, vcpus, plugin, its arguments, extra environment.
type Row<'a> = (
    &'a str,
    u32,
    &'a Path,
    Vec<String>,
    &'a [(&'a str, &'a str)],
);

struct Table {
    rows: Vec<(String, f64)>,
}

impl Table {
    fn add(&mut self, label: &str, rate: f64) -> f64 {
        eprintln!("  {label}: {rate:.0} exits/s");
        self.rows.push((label.to_string(), rate));
        rate
    }

    fn print(&self, title: &str, in_process: f64, pipes: f64) {
        println!("\n{title}\n");
        println!("| row | exits/s | µs per exit | vs in-process | vs bare pipe |");
        println!("|---|---:|---:|---:|---:|");
        for (label, rate) in &self.rows {
            println!(
                "| {label} | {rate:.0} | {:.2} | {:.2}x | {:.2}x |",
                1e6 / rate,
                rate / in_process,
                rate / pipes
            );
        }
    }
}

fn main() {
    let mut opts = Options {
        iterations: 50_000,
        runs: 3,
        env: Vec::new(),
        reserve_only: false,
        trace_only: false,
        startup_only: false,
        reset_only: false,
        migrate_only: false,
        snapshot_only: false,
        restart_only: false,
        exits_only: false,
        life_runs: 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => {
                opts.iterations = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--iterations N")
            }
            "--runs" => opts.runs = args.next().and_then(|v| v.parse().ok()).expect("--runs R"),
            "--life-runs" => {
                opts.life_runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--life-runs L")
            }
            "--env" => {
                let kv = args.next().expect("--env K=V");
                let (k, v) = kv.split_once('=').expect("--env K=V");
                opts.env.push((k.to_string(), v.to_string()));
            }
            "--only" => {
                let what = args
                    .next()
                    .expect("--only reserve|trace|startup|exits|reset|migrate|snapshot|restart");
                match what.as_str() {
                    "reserve" => opts.reserve_only = true,
                    "trace" => opts.trace_only = true,
                    "startup" => opts.startup_only = true,
                    "reset" => opts.reset_only = true,
                    "migrate" => opts.migrate_only = true,
                    "snapshot" => opts.snapshot_only = true,
                    "restart" => opts.restart_only = true,
                    "exits" => opts.exits_only = true,
                    _ => panic!(
                        "--only takes `reserve`, `trace`, `startup`, `exits`, `reset`, `migrate`, `snapshot` or `restart`"
                    ),
                }
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let tmp = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let rust_plugin = target_dir().join("bench-plugin");
    if opts.reserve_only {
        reserve_table(&opts, &rust_plugin);
        return;
    }
    if opts.trace_only {
        trace_table(&opts, &rust_plugin);
        return;
    }
    if opts.migrate_only {
        migrate::run(&target_dir(), opts.runs);
        return;
    }
    if opts.reset_only {
        reset::run(&target_dir(), opts.runs);
        return;
    }
    if opts.snapshot_only {
        snapshot::run(opts.runs);
        return;
    }
    if opts.restart_only {
        restart::run(&target_dir(), &tmp, opts.runs.max(5));
        let _ = std::fs::remove_dir_all(&tmp);
        return;
    }
    let c_plugin = compile_c_plugin(&tmp);
    if opts.startup_only {
        startup::run(&c_plugin, opts.life_runs);
        let _ = std::fs::remove_dir_all(&tmp);
        return;
    }
    let code_file = tmp.join("pio.bin");
    std::fs::write(&code_file, loop_code(Access::PortOut, opts.iterations))
        .expect("write guest code");
    let n = opts.iterations.to_string();
    let rust = |mode: &str| vec![mode.to_string(), n.clone()];
    let c_args = vec![code_file.display().to_string(), n.clone()];

    eprintln!("idle second core:");
    let mut idle = Table { rows: Vec::new() };
    let in_process = idle.add(
        Floor::InProcess.label(),
        floor_rate(&opts, Floor::InProcess),
    );
    let pipes = idle.add(Floor::Pipes.label(), floor_rate(&opts, Floor::Pipes));
    for f in [Floor::Seqpacket, Floor::Futex, Floor::Spin] {
        idle.add(f.label(), floor_rate(&opts, f));
    }
    let plain = [("CROSVM_FAST_CHANNEL", "0")];
    let rows: [Row<'_>; 11] = [
        (
            "synchronous exits, plain protocol, Rust SDK: port out",
            1,
            &rust_plugin,
            rust("pio"),
            &plain,
        ),
        (
            "synchronous exits, plain protocol, C (crosvm.h): port out",
            1,
            &c_plugin,
            c_args.clone(),
            &plain,
        ),
        (
            "plain protocol, Rust SDK: MMIO read",
            1,
            &rust_plugin,
            rust("mmio-read"),
            &plain,
        ),
        (
            "synchronous exits, fast channel, Rust SDK: port out",
            1,
            &rust_plugin,
            rust("pio"),
            &[],
        ),
        (
            "synchronous exits, fast channel, C (crosvm.h): port out",
            1,
            &c_plugin,
            c_args.clone(),
            &[],
        ),
        (
            "fast channel, Rust SDK: MMIO write",
            1,
            &rust_plugin,
            rust("mmio-write"),
            &[],
        ),
        (
            "fast channel, Rust SDK: MMIO read",
            1,
            &rust_plugin,
            rust("mmio-read"),
            &[],
        ),
        (
            "fast channel, Rust SDK: async-write range",
            1,
            &rust_plugin,
            rust("async"),
            &[],
        ),
        (
            "Rust SDK: coalesced range (batched, no exit per write)",
            1,
            &rust_plugin,
            rust("coalesced"),
            &[],
        ),
        (
            "Rust SDK: ioeventfd (no exit reaches the plugin)",
            1,
            &rust_plugin,
            rust("ioeventfd"),
            &[],
        ),
        (
            "fast channel, Rust SDK: 2 vcpus, total",
            2,
            &rust_plugin,
            rust("pio2"),
            &[],
        ),
    ];
    for (label, cpus, plugin, args, env) in &rows {
        idle.add(label, plugin_rate(&opts, *cpus, plugin, args, env));
    }
    idle.print("Second core idle", in_process, pipes);

    eprintln!("second core busy:");
    let busy_rows = {
        let _busy = BusyLoop::start();
        let mut busy = Table { rows: Vec::new() };
        let in_process = busy.add(
            Floor::InProcess.label(),
            floor_rate(&opts, Floor::InProcess),
        );
        let pipes = busy.add(Floor::Pipes.label(), floor_rate(&opts, Floor::Pipes));
        for f in [Floor::Futex, Floor::Spin] {
            busy.add(f.label(), floor_rate(&opts, f));
        }
        for (label, cpus, plugin, args, env) in rows.iter().take(5) {
            busy.add(label, plugin_rate(&opts, *cpus, plugin, args, env));
        }
        (busy, in_process, pipes)
    };
    busy_rows.0.print(
        "Second core busy (another process spins on it)",
        busy_rows.1,
        busy_rows.2,
    );

    // Start-up, whole life of a trivial plugin, and host memory.
    let mut to_init = Vec::new();
    let mut life = Vec::new();
    let mut rss = PluginResult::default();
    for _ in 0..10 {
        let t = Instant::now();
        let (r, spawned) = run_plugin(&opts, 1, &rust_plugin, &rust("trivial"));
        life.push(t.elapsed().as_secs_f64() * 1e3);
        to_init.push((r.init_ns.saturating_sub(spawned)) as f64 / 1e6);
        rss = r;
    }
    let big = run_plugin(&opts, 1, &rust_plugin, &rust("pio")).0;
    println!("\nStart-up and memory\n");
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| vmm start → first vcpu Init event (median of 10) | {:.2} ms |",
        median(to_init)
    );
    println!("| whole life of a trivial plugin: start, connect, one exit, teardown (median of 10) | {:.2} ms |", median(life));
    println!(
        "| host RSS excluding guest memory (anon + file), trivial plugin | {:.2} MiB |",
        (rss.rss_anon_kb + rss.rss_file_kb) as f64 / 1024.0
    );
    println!(
        "| host RSS excluding guest memory (anon + file), after {} exits | {:.2} MiB |",
        opts.iterations,
        (big.rss_anon_kb + big.rss_file_kb) as f64 / 1024.0
    );
    if opts.exits_only {
        let _ = std::fs::remove_dir_all(&tmp);
        return;
    }
    startup::run(&c_plugin, opts.life_runs);
    reset::run(&target_dir(), opts.runs);
    snapshot::run(opts.runs);
    migrate::run(&target_dir(), opts.runs);
    restart::run(&target_dir(), &tmp, opts.runs.max(5));
    reserve_table(&opts, &rust_plugin);
    trace_table(&opts, &rust_plugin);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The cost of `--trace` and `--stats` on the exit path: the fast-channel
/// port-out rate with both off (the normal build: the hooks compiled in,
/// one relaxed atomic load each), with `--stats`, and with every line
/// formatted and written (`--trace-file /dev/null`).
fn trace_table(opts: &Options, plugin: &Path) {
    let args = vec!["pio".to_string(), opts.iterations.to_string()];
    let cases: [(&str, &[&str]); 3] = [
        ("off (default)", &[]),
        ("`--stats`", &["--stats"]),
        ("`--trace-file /dev/null`", &["--trace-file", "/dev/null"]),
    ];
    let rates: Vec<f64> = cases
        .iter()
        .map(|(label, vmm_args)| {
            let r = median(
                (0..opts.runs)
                    .map(|_| {
                        run_plugin_with(opts, 1, plugin, &args, &[], vmm_args)
                            .0
                            .rate
                    })
                    .collect(),
            );
            eprintln!("  tracing {label}: {r:.0} exits/s");
            r
        })
        .collect();
    println!(
        "\nTracing and statistics (fast channel, Rust SDK: port out, median of {} runs)\n",
        opts.runs
    );
    println!("| tracing | exits/s | vs off |");
    println!("|---|---:|---:|");
    for ((label, _), r) in cases.iter().zip(&rates) {
        println!("| {label} | {r:.0} | {:.2}× |", r / rates[0]);
    }
}

/// The cost of reserving many ranges, one `ReserveRange` request each (the
/// exit configuration every vcpu reads is updated after each one).
fn reserve_table(opts: &Options, plugin: &Path) {
    let counts = [1024u32, 4096, 16384];
    let secs: Vec<f64> = counts
        .iter()
        .map(|&n| {
            let args = vec!["reserve".to_string(), n.to_string()];
            let t = median(
                (0..opts.runs)
                    .map(|_| {
                        let r = run_plugin(opts, 1, plugin, &args).0;
                        f64::from(n) / r.rate
                    })
                    .collect(),
            );
            eprintln!("  reserve {n} ranges: {:.1} ms", t * 1e3);
            t
        })
        .collect();
    let host: Vec<f64> = counts
        .iter()
        .map(|&n| {
            median(
                (0..opts.runs.max(5))
                    .map(|_| host_reserve_secs(n))
                    .collect(),
            )
        })
        .collect();
    println!(
        "\nReserving ranges (one request each, median of {} runs; host side: the host's own work for the same requests, in process)\n",
        opts.runs
    );
    println!("| ranges | end to end | µs per range | vs 1024 | host side | µs per range | vs 1024 | n log n vs 1024 |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let nlogn = |n: u32| f64::from(n) * f64::from(n).log2();
    for ((&n, &t), &h) in counts.iter().zip(&secs).zip(&host) {
        println!(
            "| {n} | {:.1} ms | {:.2} | {:.1}x | {:.2} ms | {:.3} | {:.1}x | {:.1}x |",
            t * 1e3,
            t * 1e6 / f64::from(n),
            t / secs[0],
            h * 1e3,
            h * 1e6 / f64::from(n),
            h / host[0],
            nlogn(n) / nlogn(counts[0])
        );
    }
}

/// What the host does for each `ReserveRange` (main_handler's
/// `reserve_range`: reserve in the main thread's exit configuration, then
/// publish a snapshot for the vcpus), `n` times, in the same scattered order
/// as the plugin; returns the seconds.
fn host_reserve_secs(n: u32) -> f64 {
    use vmm::runtime::objects::{ExitConfig, SharedExitConfig};
    use vmm::vm::Space;
    let shared = SharedExitConfig::default();
    let mut config = ExitConfig::default();
    let slots = u64::from(n.next_power_of_two());
    let start = Instant::now();
    let (mut done, mut i) = (0, 0u64);
    while done < n {
        let slot = (i * 7919) % slots;
        i += 1;
        if slot >= u64::from(n) {
            continue;
        }
        config
            .reservations
            .reserve(Space::Mmio, 0x1_0000_0000 + slot * 16, 1, false)
            .expect("reserve");
        shared.publish(config.clone());
        done += 1;
    }
    start.elapsed().as_secs_f64()
}
