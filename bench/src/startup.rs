//! Start-up and density against the floor (`vmm-bench --only startup`, also
//! part of the full run): the whole life of `bench-floor` (a bare program
//! creating the same VM) against `vmm` running a trivial *jailed* plugin
//! (C against crosvm.h, and the Rust SDK), with a per-phase breakdown; 50 of
//! each started at once; and the memory a VM costs the host.
//!
//! Phases come from CLOCK_MONOTONIC timestamps the programs print in their
//! `RESULT` line (`main_ns`, `connected_ns`, `init_ns`, `exit_ns`,
//! `done_ns`), taken against the benchmark's own clock around `spawn` and
//! `wait`, and from vmm's `--log-level debug` line `jail ready in ...`
//! (nothing is added to the host: without `--log-level debug` none of this
//! costs anything).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{median, monotonic_ns, target_dir};

/// What is started: the floor or `vmm` with a jailed plugin.
#[derive(Clone)]
pub enum Subject {
    Floor,
    /// `jailed: false` runs it with `--disable-sandbox` (the jail's share).
    Vmm {
        plugin: PathBuf,
        args: Vec<String>,
        jailed: bool,
    },
}

impl Subject {
    /// The same subject run with `--disable-sandbox` (the floor has no jail).
    fn unjailed(&self) -> Subject {
        match self {
            Subject::Floor => Subject::Floor,
            Subject::Vmm { plugin, args, .. } => Subject::Vmm {
                plugin: plugin.clone(),
                args: args.clone(),
                jailed: false,
            },
        }
    }

    fn command(&self, hold: bool, debug: bool) -> Command {
        match self {
            Subject::Floor => {
                let mut c = Command::new(target_dir().join("bench-floor"));
                if hold {
                    c.arg("hold");
                }
                c
            }
            Subject::Vmm {
                plugin,
                args,
                jailed,
            } => {
                let mut c = Command::new(target_dir().join("vmm"));
                if debug {
                    c.args(["--log-level", "debug"]);
                }
                if !jailed {
                    c.arg("--disable-sandbox");
                }
                c.arg("--plugin")
                    .arg(plugin)
                    .arg("--plugin-args")
                    .args(args);
                c
            }
        }
    }
}

/// One whole life, in ms relative to the spawn (`None`: not reported).
#[derive(Default, Clone, Copy)]
struct Life {
    main: f64,
    connected: Option<f64>,
    init: Option<f64>,
    first_exit: f64,
    done: f64,
    exited: f64,
    /// vmm's `jail ready in` (ms).
    jail: Option<f64>,
    /// The floor's own VM set-up phases (ms): VM+irqchip+PIT, memory, vcpu.
    floor_phases: Option<[f64; 3]>,
    /// The floor's close of the vcpu and the VM (ms).
    floor_close: Option<f64>,
}

fn field(line: &str, name: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// `jail ready in 5.69ms (...)` → 5.69; accepts the `Duration` debug units.
fn jail_ms(text: &str) -> Option<f64> {
    let rest = text.split("jail ready in ").nth(1)?;
    let d = rest.split_whitespace().next()?;
    let (num, scale) = if let Some(v) = d.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = d.strip_suffix("µs") {
        (v, 1e-3)
    } else if let Some(v) = d.strip_suffix("ns") {
        (v, 1e-6)
    } else {
        (d.strip_suffix('s')?, 1e3)
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

fn parse_life(spawned: u64, exited: u64, stdout: &str, stderr: &str) -> Life {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("no RESULT line in {stdout:?} (stderr {stderr:?})"));
    let at = |name: &str| {
        field(line, name)
            .filter(|&v| v > 0.0)
            .map(|v| (v - spawned as f64) / 1e6)
    };
    let ms = |name: &str| field(line, name).map(|v| v / 1e6);
    Life {
        main: at("main_ns").expect("main_ns"),
        connected: at("connected_ns"),
        init: at("init_ns"),
        first_exit: at("exit_ns").expect("exit_ns"),
        done: at("done_ns").expect("done_ns"),
        exited: (exited - spawned) as f64 / 1e6,
        jail: jail_ms(stderr),
        floor_phases: match (ms("kvm_ns"), ms("mem_ns"), ms("vcpu_ns")) {
            (Some(a), Some(b), Some(c)) => Some([a, b, c]),
            _ => None,
        },
        floor_close: ms("close_ns"),
    }
}

fn whole_life(s: &Subject) -> Life {
    let mut cmd = s.command(false, true);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let spawned = monotonic_ns();
    let out = cmd.output().expect("run the start-up subject");
    let exited = monotonic_ns();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "start-up run failed: {stderr}");
    parse_life(spawned, exited, &stdout, &stderr)
}

/// The per-phase table: each phase the median over `runs` lives.
pub fn life_table(subjects: &[(&str, Subject)], runs: usize) {
    let lives: Vec<Vec<Life>> = subjects
        .iter()
        .map(|(label, s)| {
            // One unmeasured run first (page cache, KVM module state).
            let _ = whole_life(s);
            let v: Vec<Life> = (0..runs).map(|_| whole_life(s)).collect();
            eprintln!(
                "  whole life, {label}: {:.2} ms",
                median(v.iter().map(|l| l.exited).collect())
            );
            v
        })
        .collect();
    let med = |i: usize, f: &dyn Fn(&Life) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = lives[i].iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    type Phase<'a> = (&'a str, Box<dyn Fn(&Life) -> Option<f64>>);
    let phases: Vec<Phase<'_>> = vec![
        (
            "spawn → program's `main` (vmm: exec, VM, jail, plugin exec and libraries)",
            Box::new(|l| Some(l.main)),
        ),
        (
            "  of which the jail (vmm's `jail ready in`)",
            Box::new(|l| l.jail),
        ),
        (
            "`main` → connected (SDK adopts the socket)",
            Box::new(|l| l.connected.map(|c| c - l.main)),
        ),
        (
            "set-up: floor: VM, irqchip, PIT; memory slot; vcpu — vmm: connected → vcpu Init (memory, ranges, vcpu, start)",
            Box::new(|l| match l.floor_phases {
                Some(p) => Some(p.iter().sum()),
                None => Some(l.init? - l.connected?),
            }),
        ),
        (
            "  floor: VM + irqchip + PIT",
            Box::new(|l| l.floor_phases.map(|p| p[0])),
        ),
        (
            "  floor: memfd + memory slot",
            Box::new(|l| l.floor_phases.map(|p| p[1])),
        ),
        (
            "  floor: vcpu + registers",
            Box::new(|l| l.floor_phases.map(|p| p[2])),
        ),
        (
            "→ first guest exit (vmm: Init → registers → first exit)",
            Box::new(|l| match l.floor_phases {
                Some(p) => Some(l.first_exit - l.main - p.iter().sum::<f64>()),
                None => Some(l.first_exit - l.init?),
            }),
        ),
        (
            "first exit → done exit",
            Box::new(|l| Some(l.done - l.first_exit)),
        ),
        (
            "teardown: done exit → process reaped",
            Box::new(|l| Some(l.exited - l.done)),
        ),
        (
            "  floor: closing the vcpu and the VM (kernel VM destruction)",
            Box::new(|l| l.floor_close),
        ),
        ("**whole life**", Box::new(|l| Some(l.exited))),
    ];
    println!(
        "\nStart-up against the floor: whole life and phases (ms, median of {runs} runs each; vmm plugins jailed)\n"
    );
    let head: Vec<&str> = subjects.iter().map(|(l, _)| *l).collect();
    println!("| phase | {} |", head.join(" | "));
    println!("|---|{}", "---:|".repeat(subjects.len()));
    for (name, f) in &phases {
        let cells: Vec<String> = (0..subjects.len())
            .map(|i| med(i, f.as_ref()).map_or("–".into(), |v| format!("{v:.2}")))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let floor = med(0, &|l: &Life| Some(l.exited)).unwrap_or(f64::NAN);
    let ratios: Vec<String> = (0..subjects.len())
        .map(|i| {
            format!(
                "{:.2}x",
                med(i, &|l: &Life| Some(l.exited)).unwrap_or(0.0) / floor
            )
        })
        .collect();
    println!(
        "| **whole life vs the floor** (goal ≤ 1.2x) | {} |",
        ratios.join(" | ")
    );
}

/// CPU time (ms) of every child reaped so far and their reaped children.
fn children_cpu_ms() -> f64 {
    vmm_bench::cpu_ms(libc::RUSAGE_CHILDREN)
}

/// Starts `n` at once; returns (started per second: all `n` reached their
/// first guest exit, lives per second: all `n` reaped).
fn density_once(s: &Subject, n: usize) -> (f64, f64, f64) {
    let cpu0 = children_cpu_ms();
    let t0 = monotonic_ns();
    let children: Vec<Child> = (0..n)
        .map(|_| {
            let mut c = s.command(false, false);
            c.stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut last_exit = 0.0f64;
    let mut last_reaped = 0u64;
    for c in children {
        let out = c.wait_with_output().expect("wait");
        last_reaped = last_reaped.max(monotonic_ns());
        assert!(out.status.success(), "a density run failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .expect("RESULT line");
        let exit = field(line, "exit_ns").expect("exit_ns");
        last_exit = last_exit.max(exit);
    }
    let started = (last_exit - t0 as f64) / 1e9;
    let reaped = (last_reaped - t0) as f64 / 1e9;
    let cpu = (children_cpu_ms() - cpu0) / n as f64;
    (n as f64 / started, n as f64 / reaped, cpu)
}

/// Density: `n` started at once, median of `runs`; ratios to the first
/// subject (the floor).
pub fn density_table(subjects: &[(&str, Subject)], n: usize, runs: usize) -> Vec<f64> {
    let rows: Vec<(f64, f64, f64)> = subjects
        .iter()
        .map(|(label, s)| {
            let _ = density_once(s, 4);
            let v: Vec<(f64, f64, f64)> = (0..runs).map(|_| density_once(s, n)).collect();
            let r = (
                median(v.iter().map(|x| x.0).collect()),
                median(v.iter().map(|x| x.1).collect()),
                median(v.iter().map(|x| x.2).collect()),
            );
            eprintln!("  {n} at once, {label}: {:.0} started/s", r.0);
            r
        })
        .collect();
    println!("\nDensity: {n} started at once (median of {runs} rounds; vmm plugins jailed unless the row says otherwise)\n");
    println!("| subject | started/s (all {n} at their first guest exit) | vs floor (goal ≥ 0.7x) | whole lives/s (all {n} reaped) | vs floor | CPU per VM (user + system, every process) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for ((label, _), r) in subjects.iter().zip(&rows) {
        println!(
            "| {label} | {:.0} | {:.2}x | {:.0} | {:.2}x | {:.2} ms |",
            r.0,
            r.0 / rows[0].0,
            r.1,
            r.1 / rows[0].1,
            r.2
        );
    }
    rows.iter().map(|r| r.2).collect()
}

/// Mean CPU (ms) of `n` runs of `cmd` one after the other (exit status not
/// looked at: a plugin started without vmm fails at its connect).
fn cpu_of_runs(mut cmd: Command, n: usize) -> f64 {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _ = cmd.status();
    let cpu0 = children_cpu_ms();
    for _ in 0..n {
        let _ = cmd.status().expect("run");
    }
    (children_cpu_ms() - cpu0) / n as f64
}

/// Where a VM's CPU goes, against the floor: vmm and each plugin started on
/// their own (exec, dynamic linking, runtime start; the plugin until its
/// connect fails), the jail (jailed − unjailed), and the best density ratio
/// a design with two programs per VM could reach if everything else cost
/// nothing. `per_vm`: floor, jailed C, jailed Rust, unjailed C, unjailed Rust.
pub fn cost_table(c_plugin: &Path, per_vm: &[f64]) {
    const N: usize = 50;
    let vmm_alone = cpu_of_runs(
        {
            let mut c = Command::new(target_dir().join("vmm"));
            c.arg("--version");
            c
        },
        N,
    );
    let plugin_alone = |path: PathBuf, args: &[&str]| {
        let mut c = Command::new(path);
        c.args(args).env_remove("CROSVM_SOCKET");
        cpu_of_runs(c, N)
    };
    let c_alone = plugin_alone(c_plugin.to_path_buf(), &["trivial"]);
    let rust_plugin = target_dir().join("bench-plugin");
    let rust_alone = plugin_alone(rust_plugin.clone(), &["trivial", "1"]);
    let floor = per_vm[0];
    const PARTS: [(&str, &str); 4] = [
        ("the mount plan and `pivot_root`", "mounts"),
        ("the seccomp filter and its listener", "seccomp"),
        ("secure bits, capabilities, `no_new_privs`", "caps"),
        (
            "the namespaces but the user one (with the mounts)",
            "mounts,namespaces",
        ),
    ];
    let mut withouts = vec![""];
    withouts.extend(PARTS.iter().map(|p| p.1));
    let jail = jail_floors(
        &[(c_plugin, &["trivial"]), (&rust_plugin, &["trivial", "1"])],
        &withouts,
    );
    println!("\nCPU per VM, taken apart (mean of {N} runs one at a time; the VM's CPU from the density rounds above)\n");
    println!("| measure | C plugin (crosvm.h) | Rust SDK plugin |");
    println!("|---|---:|---:|");
    println!("| floor: the whole VM (one program) | {floor:.2} ms | {floor:.2} ms |");
    println!(
        "| vmm + jailed plugin: the whole VM | {:.2} ms | {:.2} ms |",
        per_vm[1], per_vm[2]
    );
    println!("| vmm on its own (`vmm --version`: exec, libraries, start-up) | {vmm_alone:.2} ms | {vmm_alone:.2} ms |");
    println!("| the plugin on its own (exec, libraries, runtime, until its connect fails) | {c_alone:.2} ms | {rust_alone:.2} ms |");
    println!(
        "| best density a second program allows (floor / (floor + plugin on its own)) | {:.2}x | {:.2}x |",
        floor / (floor + c_alone),
        floor / (floor + rust_alone)
    );
    println!(
        "| the jail in vmm (jailed − unjailed VM): namespaces, mounts, init, seccomp, the exec gate | {:.2} ms | {:.2} ms |",
        per_vm[1] - per_vm[3],
        per_vm[2] - per_vm[4]
    );
    match jail {
        Ok(ms) => {
            let (c, r) = (ms[0][0], ms[1][0]);
            println!("| a jailed plugin and nothing else (`bench-jail-floor`: vmm's namespaces, mount plan, capabilities and seccomp filter with its listener; the plugin as PID 1; no init, no VM, no vmm) | {c:.2} ms | {r:.2} ms |");
            println!(
                "| best density a jailed second program allows (floor / (floor + a jailed plugin and nothing else)) | {:.2}x | {:.2}x |",
                floor / (floor + c),
                floor / (floor + r)
            );
            for (i, (part, without)) in PARTS.iter().enumerate() {
                println!(
                    "|   of which {part} (`JAIL_FLOOR_WITHOUT={without}`) | {:.2} ms | {:.2} ms |",
                    c - ms[0][i + 1],
                    r - ms[1][i + 1]
                );
            }
        }
        Err(e) => {
            eprintln!("  JAIL FLOOR NOT MEASURED: {e}");
            println!("| a jailed plugin and nothing else: **not measured**: {e} | – | – |");
        }
    }
    println!(
        "| the rest (unjailed VM − floor − plugin on its own): vmm's start-up beyond the floor's, the spawn, the handshake, threads, the plugin's protocol work, teardown | {:.2} ms | {:.2} ms |",
        per_vm[3] - floor - c_alone,
        per_vm[4] - floor - rust_alone
    );
}

/// CPU per start (ms) of `bench-jail-floor` (the plugin in vmm's jail and
/// nothing else) for each plugin and each `JAIL_FLOOR_WITHOUT` value:
/// `[plugin][without]`, the least of 5 runs of 100 starts (a floor: what
/// else runs on the machine only adds to it), the runs of all of them
/// interleaved so that a drift of the machine hits each alike.
/// Err: why it did not run (e.g. not root).
fn jail_floors(plugins: &[(&Path, &[&str])], withouts: &[&str]) -> Result<Vec<Vec<f64>>, String> {
    let mut runs = vec![vec![Vec::new(); withouts.len()]; plugins.len()];
    for _ in 0..5 {
        for (p, (plugin, args)) in plugins.iter().enumerate() {
            for (w, without) in withouts.iter().enumerate() {
                let out = Command::new(target_dir().join("bench-jail-floor"))
                    .arg("100")
                    .arg(plugin)
                    .args(*args)
                    .env("JAIL_FLOOR_WITHOUT", without)
                    .stderr(Stdio::null())
                    .output()
                    .map_err(|e| format!("bench-jail-floor: {e}"))?;
                let text = String::from_utf8_lossy(&out.stdout);
                let line = text
                    .lines()
                    .find(|l| l.starts_with("JAILFLOOR"))
                    .ok_or_else(|| format!("bench-jail-floor printed nothing ({})", out.status))?;
                match field(line, "cpu_ms") {
                    Some(ms) if out.status.success() => runs[p][w].push(ms),
                    _ => return Err(line.trim_start_matches("JAILFLOOR ").to_string()),
                }
            }
        }
    }
    Ok(runs
        .into_iter()
        .map(|per| {
            per.into_iter()
                .map(|v| v.into_iter().fold(f64::INFINITY, f64::min))
                .collect()
        })
        .collect())
}

/// kB values of one process: (RssAnon + RssFile, Pss_Anon + Pss_File,
/// RssShmem, Pss_Anon).
fn memory_kb(pid: u32) -> (u64, u64, u64, u64) {
    let read =
        |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    let value = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let status = read("status");
    let rollup = read("smaps_rollup");
    (
        value(&status, "RssAnon:") + value(&status, "RssFile:"),
        value(&rollup, "Pss_Anon:") + value(&rollup, "Pss_File:"),
        value(&status, "RssShmem:"),
        value(&rollup, "Pss_Anon:"),
    )
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The process and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let kids = children_of(all[i]);
        all.extend(kids);
        i += 1;
    }
    all
}

/// Memory of one held VM, read once its RESULT line is out: (the top
/// process's RSS anon+file, every process's PSS anon+file summed, RSS shmem
/// summed (guest memory and the vcpu channels), processes) in kB.
/// (top RSS, PSS sum, shmem sum, processes): see `held_memory`.
type Held = (u64, u64, u64, usize);

fn held_memory(s: &Subject) -> Held {
    let mut c = s.command(true, false);
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while out.read_line(&mut line).expect("read") > 0 && !line.contains("RESULT") {
        line.clear();
    }
    let pids = tree(child.id());
    let per: Vec<(u64, u64, u64, u64)> = pids.iter().map(|&p| memory_kb(p)).collect();
    let r = (
        per[0].0,
        per.iter().map(|m| m.1).sum(),
        per.iter().map(|m| m.2).sum(),
        pids.len(),
    );
    let _ = std::io::copy(&mut out, &mut std::io::sink());
    assert!(child.wait().expect("wait").success());
    r
}

/// Memory per VM with `n` held at once: every process's PSS anon + file
/// summed over all `n` trees, divided by `n` (shared text and libraries
/// then count once per host, as they cost), and the private (anonymous)
/// part alone. In kB. The VMs hold `hold_ms` after their last exit; every
/// tree must still be whole when it is read.
fn held_many(s: &Subject, n: usize, hold_ms: u64) -> (u64, u64) {
    let with_time = |s: &Subject| -> Command {
        let mut c = s.command(true, false);
        c.arg(hold_ms.to_string());
        c
    };
    let mut children: Vec<Child> = (0..n)
        .map(|_| {
            with_time(s)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut outs = Vec::new();
    for c in &mut children {
        let mut out = BufReader::new(c.stdout.take().expect("stdout"));
        let mut line = String::new();
        while out.read_line(&mut line).expect("read") > 0 && !line.contains("RESULT") {
            line.clear();
        }
        assert!(
            line.contains("RESULT"),
            "a held VM ended without its RESULT"
        );
        outs.push(out);
    }
    let trees: Vec<Vec<u32>> = children.iter().map(|c| tree(c.id())).collect();
    let per: Vec<(u64, u64, u64, u64)> = trees.iter().flatten().map(|&p| memory_kb(p)).collect();
    let whole = trees.iter().all(|t| t.len() == trees[0].len());
    for (mut c, mut out) in children.into_iter().zip(outs) {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
        assert!(c.wait().expect("wait").success());
    }
    assert!(
        whole,
        "a held VM's processes were gone before they were read"
    );
    (
        per.iter().map(|m| m.1).sum::<u64>() / n as u64,
        per.iter().map(|m| m.3).sum::<u64>() / n as u64,
    )
}

pub fn memory_table(subjects: &[(&str, Subject)], runs: usize) {
    println!(
        "\nMemory per VM, guest memory excluded (median of {runs}, read while the VM is alive after its last exit)\n"
    );
    println!("| subject | processes | top process RSS anon + file (goal ≤ 4 MiB for vmm) | all processes PSS anon + file | shmem (guest RAM, channels), not counted |");
    println!("|---|---:|---:|---:|---:|");
    for (label, s) in subjects {
        let v: Vec<Held> = (0..runs).map(|_| held_memory(s)).collect();
        let mib =
            |f: &dyn Fn(&Held) -> u64| median(v.iter().map(|x| f(x) as f64).collect()) / 1024.0;
        println!(
            "| {label} | {} | {:.2} MiB | {:.2} MiB | {:.2} MiB |",
            v[0].3,
            mib(&|x| x.0),
            mib(&|x| x.1),
            mib(&|x| x.2)
        );
    }
    const MANY: usize = 20;
    println!(
        "\nMemory per VM with {MANY} VMs held at once (every process's PSS summed and divided by {MANY}: what one more VM costs the host; median of {runs})\n"
    );
    println!("| subject | PSS anon + file per VM (goal ≤ 4 MiB) | of which anonymous (private) |");
    println!("|---|---:|---:|");
    for (label, s) in subjects {
        let v: Vec<(u64, u64)> = (0..runs).map(|_| held_many(s, MANY, 3000)).collect();
        let mib = |f: &dyn Fn(&(u64, u64)) -> u64| {
            median(v.iter().map(|x| f(x) as f64).collect()) / 1024.0
        };
        println!(
            "| {label} | {:.2} MiB | {:.2} MiB |",
            mib(&|x| x.0),
            mib(&|x| x.1)
        );
    }
}

/// The subjects: the floor first, then vmm with the jailed trivial C and
/// Rust plugins (`hold`-able: the Rust one's `hold` mode).
pub fn subjects(c_plugin: &Path) -> Vec<(&'static str, Subject)> {
    vec![
        ("floor (bare program)", Subject::Floor),
        (
            "vmm + jailed C plugin (crosvm.h)",
            Subject::Vmm {
                plugin: c_plugin.to_path_buf(),
                args: vec!["trivial".into()],
                jailed: true,
            },
        ),
        (
            "vmm + jailed Rust SDK plugin",
            Subject::Vmm {
                plugin: target_dir().join("bench-plugin"),
                args: vec!["trivial".into(), "1".into()],
                jailed: true,
            },
        ),
    ]
}

/// The whole start-up section.
pub fn run(c_plugin: &Path, runs: usize) {
    let s = subjects(c_plugin);
    life_table(&s, runs);
    // The density rounds also run both plugins unjailed: the jail's share.
    let mut dense = s.clone();
    dense.push((
        "vmm + C plugin, unjailed (--disable-sandbox)",
        s[1].1.unjailed(),
    ));
    dense.push((
        "vmm + Rust SDK plugin, unjailed (--disable-sandbox)",
        s[2].1.unjailed(),
    ));
    let per_vm = density_table(&dense, 50, 3);
    cost_table(c_plugin, &per_vm);
    // Memory: the floor and the Rust plugin have a `hold` mode.
    let held = vec![
        s[0].clone(),
        (
            "vmm + jailed Rust SDK plugin",
            Subject::Vmm {
                plugin: target_dir().join("bench-plugin"),
                args: vec!["hold".into(), "1".into()],
                jailed: true,
            },
        ),
    ];
    memory_table(&held, 3);
}
