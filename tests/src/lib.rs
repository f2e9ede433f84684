//! Helpers shared by the end-to-end tests: locating the built binaries,
//! compiling C plugins against `crosvm.h`, and running `vmm` with a plugin
//! under a hang guard.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The cargo target directory of the current profile (where `vmm`, the
/// examples and `libcrosvm_plugin.so` are built).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a built binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace)",
        p.display()
    );
    p
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// A scratch directory for one test, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "vmm-e2e-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared C-compile helper (one file, also used by the SDK's tests).
#[path = "../../plugin-sdk/tests/common/cc.rs"]
pub mod cc;

/// Compiles a C plugin with `cc` against `plugin-sdk/include/crosvm.h` and
/// `libcrosvm_plugin.so`, exactly as a user would.
pub fn compile_c(source: &Path, out: &Path) -> PathBuf {
    cc::CBuild::c()
        .flags(["-std=gnu11"])
        .source(source)
        .output(out)
        .link_sdk()
        .run();
    out.to_path_buf()
}

/// True when the suite runs in CI (`VMM_CI=1`, set by `.ci/run`).
pub fn in_ci() -> bool {
    std::env::var_os("VMM_CI").is_some_and(|v| v == "1")
}

/// Checks a requirement of a test that some machines lack. Returns `true`
/// when it is met. When it is not:
///
/// * in CI (`VMM_CI=1`), where root, `/dev/net/tun`, a static libc and a
///   recent kernel are provided, it panics: the test fails instead of
///   passing without running;
/// * elsewhere it prints a `SKIPPED` banner to stderr and appends the test
///   and the reason to `<target>/<profile>/skipped-tests.txt`, which
///   `scripts/test.sh` prints at the end of the run; the caller returns.
///
/// ```no_run
/// if !e2e_tests::require(vmm::net::taps_available(), "tap devices (root and /dev/net/tun)") {
///     return;
/// }
/// ```
pub fn require(met: bool, what: &str) -> bool {
    if met {
        return true;
    }
    let test = current_test();
    if in_ci() {
        panic!("{test}: this machine lacks {what}, which CI (VMM_CI=1) provides");
    }
    skip(&format!("this machine lacks {what}"));
    false
}

/// The running test's name (libtest names the thread after it; nextest
/// runs one test per process and passes its name as an argument).
fn current_test() -> String {
    match std::thread::current().name() {
        Some(n) if n != "main" => n.to_string(),
        _ => std::env::args()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .unwrap_or_else(|| "<unknown test>".to_string()),
    }
}

/// Reports loudly that the running test did not run, and why: a banner on
/// stderr and a line in `<target>/<profile>/skipped-tests.txt` (or the file
/// named by `VMM_SKIP_LOG`), which
/// `scripts/test.sh` prints at the end. The caller returns afterwards.
/// Prefer [`require`], which fails instead in CI.
pub fn skip(reason: &str) {
    let line = format!("SKIPPED {}: {reason}", current_test());
    eprintln!("\n{0}\n{line}\n{0}\n", "*".repeat(line.len().min(100)));
    use std::io::Write;
    let log = std::env::var_os("VMM_SKIP_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("skipped-tests.txt"));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// The address triple that makes `vmm` create a tap (`vmtap%d`) for the
/// tests that need a real one.
pub const TAP_ARGS: [&str; 6] = [
    "--host-ip",
    "100.115.92.5",
    "--netmask",
    "255.255.255.252",
    "--mac",
    "de:21:e8:47:6b:6a",
];

/// [`require`] for the tests that need a real tap device.
pub fn require_taps() -> bool {
    require(
        vmm::net::taps_available(),
        "tap devices (needs root and /dev/net/tun)",
    )
}

/// The result of one `vmm` run.
#[derive(Debug)]
pub struct VmmRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl VmmRun {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with the whole output unless `vmm` exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "vmm failed: {self:#?}");
        self
    }
}

/// Longest a single `vmm` run may take before the test declares it hung.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Runs `vmm [vmm_args] --plugin PLUGIN --plugin-args PLUGIN_ARGS`. A run
/// that outlives [`HANG_GUARD`] is killed and fails the test.
pub fn run_vmm(vmm_args: &[&str], plugin: &Path, plugin_args: &[&str]) -> VmmRun {
    run_vmm_with_guard(vmm_args, plugin, plugin_args, HANG_GUARD)
}

/// [`run_vmm`] with a different hang guard, for runs that are long by
/// design.
pub fn run_vmm_with_guard(
    vmm_args: &[&str],
    plugin: &Path,
    plugin_args: &[&str],
    guard: Duration,
) -> VmmRun {
    let mut cmd = Command::new(bin("vmm"));
    cmd.args(vmm_args).arg("--plugin").arg(plugin);
    if !plugin_args.is_empty() {
        cmd.arg("--plugin-args").args(plugin_args);
    }
    run_command_with_guard(cmd, guard)
}

/// Runs a prepared command with captured output under the hang guard.
pub fn run_command(cmd: Command) -> VmmRun {
    run_command_with_guard(cmd, HANG_GUARD)
}

/// [`run_command`] with a different hang guard.
pub fn run_command_with_guard(mut cmd: Command, guard: Duration) -> VmmRun {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn vmm");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let Some(status) = wait_guarded(&mut child, guard) else {
        panic!("vmm hung for more than {guard:?}: {cmd:?}");
    };
    VmmRun {
        code: status.code(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Waits for `child` to end, for at most `guard`: its status, or `None`
/// when it was still running (it is then killed and reaped, and the caller
/// fails the test naming what hung).
pub fn wait_guarded(
    child: &mut std::process::Child,
    guard: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        if start.elapsed() > guard {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every process whose command line mentions `needle` (for leak checks).
pub fn processes_matching(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(needle) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// The `result=` line of a run's stdout (panics naming the output if
/// there is none).
pub fn result_of(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with("result="))
        .unwrap_or_else(|| panic!("no result line in {stdout:?}"))
        .to_string()
}

/// `longrun`'s `result=` for `rounds`: the guest's computation and the
/// plugin's accumulator, re-implemented (tests/tests/longrun.rs checks it).
pub fn longrun_model(rounds: u32) -> u64 {
    let mut buf: Vec<u32> = (0..4096u32).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
    let (mut x, mut step, mut acc) = (0x1234_5678u32, 0u32, 0u64);
    for _ in 0..rounds {
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let idx = (x & 4095) as usize;
            buf[idx] ^= x.wrapping_add(step);
            step = step.wrapping_add(1);
            if step & 63 == 0 {
                acc =
                    (acc.rotate_left(7) ^ u64::from(buf[idx])).wrapping_mul(0x0000_0100_0000_01b3);
                x ^= (acc >> 16) as u32;
                if x == 0 {
                    x = 1;
                }
            }
        }
    }
    let fold = buf
        .iter()
        .fold(0u32, |f, v| f.rotate_left(5).wrapping_add(*v));
    acc ^ (u64::from(fold) << 32 | u64::from(x))
}

/// Runs `vmm ctl OPTIONS... SOCKET COMMAND...`: the leading `--` words of
/// `args` are the options (placed before the socket), the rest is the
/// command. Returns the exit status, stdout and stderr.
pub fn vmm_ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let n = args.iter().take_while(|a| a.starts_with("--")).count();
    let out = Command::new(bin("vmm"))
        .arg("ctl")
        .args(&args[..n])
        .arg(socket)
        .args(&args[n..])
        .output()
        .expect("run vmm ctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A program (a `vmm`) running in the background: its stdout lines
/// arrive on a channel and are kept in `seen` as they are read, its stderr
/// is collected; it is killed when dropped.
pub struct Background {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stdout line read so far.
    pub seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Background {
    /// Spawns `cmd` with stdin closed and stdout and stderr piped.
    pub fn spawn(cmd: &mut Command) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the background program");
        let (lines, stderr) = pipe_output(&mut child);
        Background {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits (under [`HANG_GUARD`]) for a stdout line starting with
    /// `prefix` and returns it; otherwise kills the program and panics with
    /// its output.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no line starting with {prefix:?}: {:#?}", self.finish());
                }
            }
        }
    }

    /// Waits for the program to end (under [`HANG_GUARD`]: a program that
    /// outlives it is killed and fails the test): its exit code, every
    /// stdout line it printed, its stderr.
    pub fn finish(&mut self) -> VmmRun {
        let Some(status) = wait_guarded(&mut self.child, HANG_GUARD) else {
            panic!("the background program hung for more than {HANG_GUARD:?}");
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        VmmRun {
            code: status.code(),
            stdout: self.seen.join("\n"),
            stderr: self
                .stderr
                .take()
                .map(|t| t.join().unwrap_or_default())
                .unwrap_or_default(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Takes a spawned child's stdout and stderr: stdout arrives line by line
/// on the channel (a thread reads it), stderr is collected whole by the
/// returned thread (join it after the child ended).
pub fn pipe_output(
    child: &mut std::process::Child,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<String>,
) {
    use std::io::{BufRead, Read};
    let out = child.stdout.take().expect("the child's stdout is piped");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut err = child.stderr.take().expect("the child's stderr is piped");
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    (lines, stderr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_requirement_is_reported_and_fails_in_ci() {
        let tmp = TempDir::new("require");
        let log = tmp.0.join("skipped.txt");
        std::env::set_var("VMM_SKIP_LOG", &log);
        std::env::remove_var("VMM_CI");
        assert!(require(true, "nothing"));
        assert!(!log.exists(), "a met requirement is not reported");
        assert!(!require(false, "a thing this test pretends to need"));
        let text = std::fs::read_to_string(&log).expect("the skip is recorded");
        assert_eq!(
            text,
            "SKIPPED tests::a_missing_requirement_is_reported_and_fails_in_ci: \
             this machine lacks a thing this test pretends to need\n"
        );
        std::env::set_var("VMM_CI", "1");
        let failed = std::panic::catch_unwind(|| require(false, "a thing CI has"));
        assert!(
            failed.is_err(),
            "in CI a missing requirement fails the test"
        );
        std::env::set_var("VMM_CI", "0");
        assert!(!require(false, "a thing CI has"));
    }
}
