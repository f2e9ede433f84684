//! Hot restart end to end (issue 13, docs/protocol-extensions.md §9): the
//! jailed `longrun` machine under a real `vmm`, its plugin replaced with
//! `vmm ctl S upgrade` by other builds, and SIGKILLed under
//! `--on-plugin-crash restart`; the guest ends with the result of an
//! uninterrupted run. Plus the limits: descriptors and processes across
//! 100 restarts, a restart loop, a corrupted checkpoint, a replacing
//! plugin for another vcpu count, plugins that never declared. The C
//! machine `longrun_c` (`crosvm_ext.h`) is upgraded and SIGKILLed too.
//!
//! "Random points": the pauses between restarts come from a seed printed
//! by each test (`seed N`), so a failure can be replayed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{bin, longrun_model, Background, TempDir, HANG_GUARD};
use serde_json::Value;

/// Long enough that 10 restarts at random points fit well inside the run.
const ROUNDS: u32 = 200;
/// `longrun_c`'s run: a few restarts at random points fit inside it.
const ROUNDS_C: u32 = 100;

/// `vmm ctl --json SOCKET ARGS...`.
fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    e2e_tests::vmm_ctl(socket, &[&["--json"], args].concat())
}

/// A small deterministic generator for the restart points.
struct Points(u64);

impl Points {
    fn new() -> Points {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        println!("seed {seed}");
        Points(seed)
    }

    /// A pause of 20 to 150 ms.
    fn pause(&mut self) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(20 + self.0 % 131)
    }
}

/// A `vmm` in the background; stdout lines arrive on a channel.
struct Vm {
    bg: Background,
    socket: PathBuf,
}

impl Vm {
    /// Starts `vmm --api-socket DIR/api.sock VMM_ARGS --plugin PLUGIN
    /// --plugin-args ARGS` and waits for the guest's first progress line.
    fn start(dir: &TempDir, vmm_args: &[&str], plugin: &Path, args: &[&str]) -> Vm {
        let socket = dir.0.join("api.sock");
        let bg = Background::spawn(
            Command::new(bin("vmm"))
                .arg("--api-socket")
                .arg(&socket)
                .args(vmm_args)
                .arg("--plugin")
                .arg(plugin)
                .arg("--plugin-args")
                .args(args),
        );
        let mut vm = Vm { bg, socket };
        vm.wait_line("progress ");
        vm
    }

    fn wait_line(&mut self, prefix: &str) -> String {
        self.bg.wait_line(prefix)
    }

    fn ctl_json(&self, args: &[&str]) -> Result<Value, String> {
        let (code, out, err) = ctl(&self.socket, args);
        if code != Some(0) {
            return Err(format!("vmm ctl {args:?}: {out}{err}"));
        }
        serde_json::from_str(&out).map_err(|e| format!("vmm ctl {args:?}: {e}: {out}"))
    }

    fn status(&self) -> Value {
        self.ctl_json(&["status"]).expect("status")
    }

    fn vmm_pid(&self) -> i32 {
        self.bg.child.id() as i32
    }

    /// Waits for vmm to exit: its status and stderr (stdout lines stay in
    /// `self.bg.seen`).
    fn finish(&mut self) -> (Option<i32>, String) {
        let run = self.bg.finish();
        (run.code, run.stderr)
    }
}

fn result_line(rounds: u32) -> String {
    format!("result={:#018x}", longrun_model(rounds))
}

/// A copy of the example `name` whose build mark (`NAME-build-00000001`)
/// is `n`.
fn patched_build(dir: &TempDir, name: &str, n: u32) -> PathBuf {
    let image = std::fs::read(bin(name)).expect("read the example");
    let from = format!("{name}-build-00000001");
    let (from, to) = (from.as_bytes(), format!("{name}-build-{n:08}"));
    let mut out = Vec::with_capacity(image.len());
    let mut i = 0;
    let mut found = 0;
    while i < image.len() {
        if image[i..].starts_with(from) {
            out.extend_from_slice(to.as_bytes());
            i += from.len();
            found += 1;
        } else {
            out.push(image[i]);
            i += 1;
        }
    }
    assert!(found > 0, "{name} has no build mark");
    let path = dir.0.join(format!("{name}-{n}"));
    std::fs::write(&path, out).expect("write the build");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

#[test]
fn longrun_upgraded_10_times_to_changed_builds_prints_the_uninterrupted_result() {
    let stderr = upgraded_to_changed_builds("longrun", ROUNDS, 11);
    for n in 1..=11u32 {
        let mark = format!("longrun build longrun-build-{n:08}, generation {}", n - 1);
        assert!(stderr.contains(&mark), "no {mark:?}: {stderr}");
    }
}

/// Runs `plugin ROUNDS` under `--hot-restart` and upgrades it to builds
/// 2..=`last` of itself (each another binary, `patched_build`), checking
/// each answer, the result and the take-overs; returns vmm's stderr.
fn upgraded_to_changed_builds(plugin: &str, rounds: u32, last: u32) -> String {
    let dir = TempDir::new(&format!("restart-upgrade-{plugin}"));
    let arg = rounds.to_string();
    let mut vm = Vm::start(&dir, &["--hot-restart"], &bin(plugin), &[&arg]);
    let mut points = Points::new();
    for n in 2..=last {
        let build = patched_build(&dir, plugin, n);
        std::thread::sleep(points.pause());
        let reply = vm
            .ctl_json(&["upgrade", build.to_str().unwrap(), &arg])
            .unwrap_or_else(|e| panic!("upgrade {n}: {e}: {}", vm.finish().1));
        assert_eq!(reply["reason"], "upgrade", "{reply}");
        assert_eq!(reply["generation"], n - 1, "{reply}");
        assert!(reply["blackout_us"].as_u64().is_some(), "{reply}");
        assert_eq!(vm.status()["plugin"], build.to_str().unwrap());
    }
    let result = vm.wait_line("result=");
    let (code, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(result, result_line(rounds), "{stderr}");
    assert_eq!(
        stderr.matches("took over the running VM (Upgrade)").count(),
        last as usize - 1,
        "{stderr}"
    );
    stderr
}

/// The status's plugin pid, once it differs from `old` and the VM runs.
fn new_plugin_pid(vm: &mut Vm, old: i64) -> i64 {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let s = vm.status();
        let pid = s["plugin_pid"].as_i64().unwrap_or(0);
        if pid != old && pid != 0 && s["state"] == "running" {
            return pid;
        }
        assert!(Instant::now() < deadline, "no new plugin: {s}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn sigkill(pid: i64) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the plugin");
}

#[test]
fn longrun_sigkilled_10_times_under_restart_prints_the_uninterrupted_result() {
    sigkilled_under_restart("longrun", ROUNDS, 10);
}

/// Runs `plugin ROUNDS` under `--on-plugin-crash restart:20`, SIGKILLs its
/// plugin `kills` times at random points, and checks each replacement took
/// over and the guest ended with the uninterrupted result.
fn sigkilled_under_restart(plugin: &str, rounds: u32, kills: usize) {
    let dir = TempDir::new(&format!("restart-crash-{plugin}"));
    let mut vm = Vm::start(
        &dir,
        &["--on-plugin-crash", "restart:20"],
        &bin(plugin),
        &[&rounds.to_string()],
    );
    let mut points = Points::new();
    let mut pid = vm.status()["plugin_pid"].as_i64().expect("plugin pid");
    for _ in 0..kills {
        std::thread::sleep(points.pause());
        sigkill(pid);
        pid = new_plugin_pid(&mut vm, pid);
    }
    let result = vm.wait_line("result=");
    let (code, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(result, result_line(rounds), "{stderr}");
    assert_eq!(
        stderr.matches("took over the running VM (Crash)").count(),
        kills,
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("restarting it ({kills} of at most 20")),
        "{stderr}"
    );
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Processes whose parent is `pid`, and their children (the jail's init and
/// the plugin).
fn descendants(pid: i32) -> usize {
    let parent_of = |p: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let after = stat.rsplit_once(')')?.1;
        after.split_whitespace().nth(1)?.parse().ok()
    };
    let all: Vec<i32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut set = vec![pid];
    let mut grew = true;
    while grew {
        grew = false;
        for &p in &all {
            if !set.contains(&p) && parent_of(p).is_some_and(|pp| set.contains(&pp)) {
                set.push(p);
                grew = true;
            }
        }
    }
    set.len() - 1
}

/// The fewest descriptors vmm holds over a few samples (a control client
/// that just left may still be counted once).
fn settled_fds(pid: i32) -> usize {
    (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            fd_count(pid)
        })
        .min()
        .unwrap_or(0)
}

#[test]
fn host_descriptors_and_processes_are_flat_across_100_restarts() {
    let dir = TempDir::new("restart-leaks");
    let mut vm = Vm::start(
        &dir,
        &["--on-plugin-crash", "restart:1000"],
        &bin("longrun"),
        &["100000"],
    );
    let vmm = vm.vmm_pid();
    let mut pid = vm.status()["plugin_pid"].as_i64().expect("plugin pid");
    // One restart first: everything a restart allocates once exists.
    sigkill(pid);
    pid = new_plugin_pid(&mut vm, pid);
    vm.wait_line("progress ");
    let (fds, procs) = (settled_fds(vmm), descendants(vmm));
    for _ in 0..100 {
        sigkill(pid);
        pid = new_plugin_pid(&mut vm, pid);
    }
    vm.wait_line("progress ");
    let (fds_after, procs_after) = (settled_fds(vmm), descendants(vmm));
    assert_eq!(
        (fds_after, procs_after),
        (fds, procs),
        "descriptors and processes of vmm after 1 and after 101 restarts"
    );
    assert_eq!(vm.status()["state"], "running");
    let _ = ctl(&vm.socket, &["kill"]);
    let (_, stderr) = vm.finish();
    assert!(stderr.contains("restart 101 (crash) done"), "{stderr}");
}

#[test]
fn a_plugin_that_always_crashes_ends_the_vm_after_max_restarts_with_the_reason() {
    let r = e2e_tests::run_vmm(
        &["--on-plugin-crash", "restart:3"],
        &bin("restart_probe"),
        &["crash"],
    );
    assert_ne!(r.code, Some(0), "{r:#?}");
    assert_eq!(r.stderr.matches("restarting it (").count(), 3, "{r:#?}");
    assert!(
        r.stderr.contains(
            "the plugin crashed 4 times within 60s (the last time it was killed by SIGABRT"
        ),
        "{r:#?}"
    );
    // Every generation attached to the same VM.
    assert!(
        r.stderr
            .contains("restart_probe crash: generation 3, Crash"),
        "{r:#?}"
    );
}

/// The vmm-held memfd named `name` (its /proc path).
fn memfd_of(pid: i32, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with(&format!("/memfd:{name}")))
        })
        .map(|e| e.path())
}

#[test]
fn a_corrupted_checkpoint_is_an_error_and_the_guest_does_not_run_on() {
    let dir = TempDir::new("restart-corrupt");
    let mut vm = Vm::start(
        &dir,
        &["--on-plugin-crash", "restart:2"],
        &bin("longrun"),
        &["100000"],
    );
    let vmm = vm.vmm_pid();
    let ckpt = memfd_of(vmm, "crosvm-checkpoint").expect("vmm holds the checkpoint memfd");
    // The plugin commits at every exit: stop it, write over both slots
    // (header intact) as a hostile process could, then the crash.
    let pid = vm.status()["plugin_pid"].as_i64().expect("plugin pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("stop the plugin");
    std::thread::sleep(Duration::from_millis(50));
    let mut bytes = std::fs::read(&ckpt).expect("read the checkpoint");
    for b in bytes.iter_mut().skip(64) {
        *b ^= 0x5a;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ckpt)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .expect("corrupt the checkpoint");
    sigkill(pid);
    let (code, stderr) = vm.finish();
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("the checkpoint is corrupted"),
        "the new plugin names the corruption: {stderr}"
    );
    assert!(stderr.contains("not restarting it again"), "{stderr}");
    assert!(
        !stderr.contains("took over the running VM"),
        "no plugin resumed the guest on a corrupted state: {stderr}"
    );
    assert!(!vm.bg.seen.iter().any(|l| l.starts_with("result=")));
}

#[test]
fn an_upgrade_to_a_plugin_for_another_vcpu_count_ends_the_vm_with_the_reason() {
    let dir = TempDir::new("restart-vcpus");
    let mut vm = Vm::start(&dir, &["--hot-restart"], &bin("longrun"), &["100000"]);
    let err = vm
        .ctl_json(&[
            "upgrade",
            bin("restart_probe").to_str().unwrap(),
            "two-vcpus",
        ])
        .expect_err("the upgrade fails");
    assert!(err.contains("the new plugin exited with status 2"), "{err}");
    let (code, stderr) = vm.finish();
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("this machine needs 2 vcpus, the VM has 1"),
        "{stderr}"
    );
    assert!(stderr.contains("hot restart failed"), "{stderr}");
}

#[test]
fn upgrade_is_refused_without_hot_restart_or_a_declaration_and_the_vm_runs_on() {
    // counter never declares it can be restarted (as any crosvm plugin).
    let dir = TempDir::new("restart-refused-2");
    let socket = dir.0.join("api.sock");
    let mut child = Command::new(bin("vmm"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--hot-restart")
        .arg("--plugin")
        .arg(bin("counter"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmm");
    let deadline = Instant::now() + HANG_GUARD;
    while !ctl(&socket, &["status"]).1.contains("\"running\"") {
        assert!(Instant::now() < deadline, "counter did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = ctl(&socket, &["upgrade", bin("counter").to_str().unwrap()]);
    assert_ne!(code, Some(0));
    assert!(
        (out.clone() + &err).contains("did not declare it can be restarted"),
        "{out}{err}"
    );
    assert_eq!(ctl(&socket, &["status"]).0, Some(0), "the VM runs on");
    let _ = ctl(&socket, &["kill"]);
    let _ = child.wait();

    // Without --hot-restart the same command names the missing option.
    let dir = TempDir::new("restart-refused-3");
    let vm = Vm::start(&dir, &[], &bin("longrun"), &["100000"]);
    let err = vm
        .ctl_json(&["upgrade", bin("longrun").to_str().unwrap()])
        .expect_err("refused");
    assert!(err.contains("without --hot-restart"), "{err}");
    assert_eq!(vm.status()["state"], "running");
}

#[test]
fn longrun_on_pipe_channels_survives_sigkills_and_an_upgrade() {
    let dir = TempDir::new("restart-pipes");
    let rounds = ROUNDS.to_string();
    let mut vm = Vm::start(
        &dir,
        &[
            "--plugin-env",
            "CROSVM_FAST_CHANNEL=0",
            "--on-plugin-crash",
            "restart:20",
        ],
        &bin("longrun"),
        &[&rounds],
    );
    let mut points = Points::new();
    let mut pid = vm.status()["plugin_pid"].as_i64().expect("plugin pid");
    for _ in 0..3 {
        std::thread::sleep(points.pause());
        sigkill(pid);
        pid = new_plugin_pid(&mut vm, pid);
    }
    std::thread::sleep(points.pause());
    let reply = vm
        .ctl_json(&["upgrade", bin("longrun").to_str().unwrap(), &rounds])
        .unwrap_or_else(|e| panic!("upgrade: {e}"));
    assert_eq!(reply["generation"], 4, "{reply}");
    let result = vm.wait_line("result=");
    let (code, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("on pipe channels"), "{stderr}");
    assert_eq!(result, result_line(ROUNDS), "{stderr}");
}

/// `longrun_c` (the C machine, `crosvm_ext.h`) replaced by `vmm ctl S
/// upgrade` with changed builds of itself: the guest ends with the
/// uninterrupted result.
#[test]
fn longrun_c_upgraded_prints_the_uninterrupted_result() {
    let stderr = upgraded_to_changed_builds("longrun_c", ROUNDS_C, 4);
    assert!(
        stderr.contains("longrun_c build longrun_c-build-00000001, fresh"),
        "{stderr}"
    );
    for n in 2..=4u32 {
        let mark = format!("longrun_c build longrun_c-build-{n:08}, upgrade");
        assert!(stderr.contains(&mark), "no {mark:?}: {stderr}");
    }
}

/// `longrun_c` SIGKILLed at random points under `--on-plugin-crash
/// restart`: each replacement takes over from the checkpoint and the guest
/// ends with the uninterrupted result.
#[test]
fn longrun_c_sigkilled_under_restart_prints_the_uninterrupted_result() {
    sigkilled_under_restart("longrun_c", ROUNDS_C, 4);
}

/// `longrun_c` killed right after committing an exit and before resuming
/// it (the plugin SIGKILLs itself there): the replacing plugin gets that
/// exit again with a state that has it already, answers it without
/// applying it twice, and the guest ends with the uninterrupted result.
/// Once at an accumulator write, once at the read that follows it.
#[test]
fn longrun_c_killed_between_commit_and_resume_applies_the_exit_once() {
    let rounds = 20;
    // 129 exits a round (64 accumulator writes, each with its read, then
    // the progress write): exit 1001 is a read, 1002 the next write.
    for serial in [1001u64, 1002] {
        let env = format!("LONGRUN_C_DIE_AFTER_COMMIT={serial}");
        let r = e2e_tests::run_vmm(
            &["--plugin-env", &env, "--on-plugin-crash", "restart:1"],
            &bin("longrun_c"),
            &[&rounds.to_string()],
        );
        r.assert_success();
        assert!(
            r.stdout.contains(&result_line(rounds)),
            "exit {serial}: {r:#?}"
        );
        assert!(
            r.stderr
                .contains(&format!("dying after the commit of exit {serial}")),
            "{r:#?}"
        );
        let took_over = "took over the running VM (Crash)";
        assert_eq!(r.stderr.matches(took_over).count(), 1, "{r:#?}");
        assert!(
            r.stderr.contains(&format!(
                "exits {} answered, {serial} in the state",
                serial - 1
            )),
            "the re-delivered exit is covered by the state: {r:#?}"
        );
    }
}
