//! Live migration end to end (issue 12): the jailed `longrun` machine
//! under a real `vmm --api-socket`, migrated mid-run with the real `vmm
//! ctl S migrate ADDR` into a real `vmm --incoming ADDR`, over a unix
//! socket and over TCP on 127.0.0.1; and the failures: a target that drops
//! the connection, a target that answers garbage, a target whose plugin
//! sets up other memory (the source goes on unharmed in each), and a
//! source that sends garbage or another version (the target exits 1
//! naming it, before its plugin ran any guest instruction). `longrun` and
//! the C `longrun_c` migrate under a writing load of the plugin's own.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::{bin, result_of, run_vmm, Background, TempDir, VmmRun, HANG_GUARD};
use serde_json::Value;

/// Rounds: long enough that the migration happens mid-run.
const ROUNDS: &str = "150";

/// `E2E_MIGRATE_LOG=LEVEL` (default: unset, vmm's own default) runs the
/// source and target vmms with `--log-level LEVEL`, for chasing a failure
/// in their stderr (printed when a migration fails).
fn log_args() -> Vec<String> {
    match std::env::var("E2E_MIGRATE_LOG") {
        Ok(level) if !level.is_empty() => vec!["--log-level".into(), level],
        _ => Vec::new(),
    }
}

/// A `vmm` in the background; its stdout lines arrive on a channel.
type Vm = Background;

/// Starts `vmm [log] VMM_ARGS --plugin PLUGIN --plugin-args ARGS`.
fn start(vmm_args: &[&str], plugin: &str, args: &[&str]) -> Vm {
    Background::spawn(
        Command::new(bin("vmm"))
            .args(log_args())
            .args(vmm_args)
            .arg("--plugin")
            .arg(bin(plugin))
            .arg("--plugin-args")
            .args(args),
    )
}

/// `vmm ctl --json SOCKET ARGS...`.
fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    e2e_tests::vmm_ctl(socket, &[&["--json"], args].concat())
}

fn first_progress(stdout: &str) -> u32 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("progress "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no progress line in {stdout:?}"))
}

/// A source `vmm` with a control socket in `dir`, past `progress 5`.
fn source(dir: &Path, plugin: &str, args: &[&str]) -> (Vm, PathBuf) {
    let socket = dir.join("src.sock");
    let mut vm = start(&["--api-socket", socket.to_str().unwrap()], plugin, args);
    vm.wait_line("progress 5");
    (vm, socket)
}

/// Waits until `path` exists (the target's socket is bound).
fn wait_for(path: &Path) {
    let deadline = Instant::now() + HANG_GUARD;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Migrates `plugin args` mid-run from one vmm to another at `addr` and
/// checks the target prints the uninterrupted result and the source ends
/// with status 0.
fn migrates(plugin: &str, args: &[&str], addr: &str, unix_path: Option<&Path>, dir: &Path) {
    let reference = run_vmm(&[], &bin(plugin), args);
    reference.assert_success();
    let expected = result_of(&reference.stdout);

    let mut target = start(&["--incoming", addr], plugin, args);
    match unix_path {
        Some(p) => wait_for(p),
        None => std::thread::sleep(Duration::from_millis(300)),
    }
    let (mut src, socket) = source(dir, plugin, args);
    let (code, out, err) = ctl(&socket, &["migrate", addr]);
    if code != Some(0) {
        // Both vmms' sides of the story (the client only sees its own).
        let _ = src.child.kill();
        let _ = target.child.kill();
        panic!(
            "migrate failed: {out}\n{err}\nsource: {:#?}\ntarget: {:#?}",
            src.finish(),
            target.finish()
        );
    }
    let reply: Value = serde_json::from_str(&out).unwrap();
    for key in ["downtime_ms", "total_ms", "rounds", "pages", "bytes"] {
        assert!(reply[key].is_number(), "{key} missing: {reply}");
    }
    assert!(reply["pages"].as_u64().unwrap() > 0, "{reply}");
    let s = src.finish();
    assert_eq!(s.code, Some(0), "the source did not end well: {s:#?}");
    assert!(s.stderr.contains(&format!("migrated to {addr}")), "{s:#?}");
    assert!(
        !s.stdout.contains("result="),
        "the source finished too: {s:#?}"
    );
    let t = target.finish();
    assert_eq!(t.code, Some(0), "the target failed: {t:#?}");
    assert!(
        first_progress(&t.stdout) > 5,
        "the target restarted the guest: {t:#?}"
    );
    assert_eq!(result_of(&t.stdout), expected, "{t:#?}");
    if let Some(p) = unix_path {
        assert!(!p.exists(), "the target's socket file was left behind");
    }
    if args.contains(&"load") {
        // The target checked, before its own writer ran, that every page
        // holds the last write the source's device state accounts for (a
        // write the source did not report would be stale there; the check
        // at the end cannot see it, the target's writer rewrites every
        // page), and again at the end.
        let restored = t
            .stderr
            .lines()
            .find_map(|l| {
                let rest = l.split(&format!("{plugin}: restored, load: ")).nth(1)?;
                rest.strip_suffix(" writes, every page holds its last")
            })
            .unwrap_or_else(|| panic!("the target did not check the load's pages: {t:#?}"));
        let writes: u64 = restored.parse().unwrap();
        assert!(writes > 0, "the source's load wrote nothing: {t:#?}");
        assert!(
            t.stderr.contains("at the end, load: "),
            "no check at the end: {t:#?}"
        );
    }
}

#[test]
fn longrun_under_a_writing_load_migrates_over_unix_with_the_uninterrupted_result() {
    let dir = TempDir::new("mig-unix");
    let path = dir.0.join("in.sock");
    let addr = format!("unix:{}", path.display());
    migrates("longrun", &[ROUNDS, "load"], &addr, Some(&path), &dir.0);
}

#[test]
fn longrun_under_a_writing_load_migrates_over_tcp_with_the_uninterrupted_result() {
    let dir = TempDir::new("mig-tcp");
    // A free port (released just before the target binds it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("tcp:127.0.0.1:{port}");
    migrates("longrun", &[ROUNDS, "load"], &addr, None, &dir.0);
}

#[test]
fn longrun_c_migrates_over_unix_with_the_uninterrupted_result() {
    let dir = TempDir::new("mig-c");
    let path = dir.0.join("in.sock");
    let addr = format!("unix:{}", path.display());
    migrates("longrun_c", &[ROUNDS], &addr, Some(&path), &dir.0);
}

/// The C write tracker end to end: `longrun_c`'s writer thread writes guest
/// memory through `crosvm_write_tracker_write` while the migration copies
/// it (the pages are checked on the target as for longrun, in `migrates`).
#[test]
fn longrun_c_under_a_writing_load_migrates_over_unix_with_the_uninterrupted_result() {
    let dir = TempDir::new("mig-c-load");
    let path = dir.0.join("in.sock");
    let addr = format!("unix:{}", path.display());
    migrates("longrun_c", &[ROUNDS, "load"], &addr, Some(&path), &dir.0);
}

/// The source fails the migration (the error named), resumes, and its
/// guest finishes with the uninterrupted result.
fn source_survives(peer: impl FnOnce(UnixListener) + Send + 'static, want: &str) {
    let dir = TempDir::new("mig-fail");
    let args = [ROUNDS, "load"];
    let reference = run_vmm(&[], &bin("longrun"), &args);
    reference.assert_success();
    let path = dir.0.join("peer.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || peer(listener));
    let (mut src, socket) = source(&dir.0, "longrun", &args);
    let (code, out, err) = ctl(&socket, &["migrate", &format!("unix:{}", path.display())]);
    assert_eq!(code, Some(1), "the migration should fail: {out}\n{err}");
    assert!(
        err.contains(want),
        "the error names the cause ({want}): {err}"
    );
    // Still alive and running: status says so, and it finishes.
    let (code, out, err) = ctl(&socket, &["status"]);
    assert_eq!(code, Some(0), "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "running", "{status}");
    let s = src.finish();
    assert_eq!(s.code, Some(0), "{s:#?}");
    assert_eq!(result_of(&s.stdout), result_of(&reference.stdout), "{s:#?}");
    assert!(s.stderr.contains("every page holds its last"), "{s:#?}");
    peer.join().unwrap();
}

#[test]
fn a_target_that_drops_mid_way_leaves_the_source_running_unharmed() {
    source_survives(
        |l| {
            let (mut c, _) = l.accept().unwrap();
            let mut b = vec![0u8; 4096];
            let _ = c.read_exact(&mut b);
            // Dropped after the first 4 KiB.
        },
        "migrate:",
    );
}

#[test]
fn a_target_that_answers_garbage_leaves_the_source_running_unharmed() {
    source_survives(
        |l| {
            let (mut c, _) = l.accept().unwrap();
            let mut r = c.try_clone().unwrap();
            let drain = std::thread::spawn(move || {
                let mut b = vec![0u8; 1 << 16];
                while matches!(r.read(&mut b), Ok(n) if n > 0) {}
            });
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            drain.join().unwrap();
        },
        "unknown frame kind 0x48",
    );
}

/// A target that takes the stream but is slow to start receiving (its
/// plugin not up yet, as under a heavy load; here it never is): the
/// source's guest runs to its end meanwhile, its plugin exits and vmm
/// ends. The `migrate` command still gets its answer, naming why, before
/// the control socket goes; the client used to see "vmm closed the
/// connection" (the flake of the migration tests under load).
#[test]
fn a_guest_that_ends_mid_migration_still_gets_the_migrate_command_answered() {
    let dir = TempDir::new("mig-end");
    let args = ["40"];
    let reference = run_vmm(&[], &bin("longrun"), &args);
    reference.assert_success();
    let path = dir.0.join("slow.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        // Takes everything, never says `Receiving`; EOF once the source
        // gives up.
        let mut b = vec![0u8; 1 << 16];
        let mut got = 0usize;
        while let Ok(n @ 1..) = c.read(&mut b) {
            got += n;
        }
        got
    });
    let (mut src, socket) = source(&dir.0, "longrun", &args);
    let addr = format!("unix:{}", path.display());
    // The guest's end is the answer: wait for it however slow the host.
    let (code, out, err) = ctl(&socket, &["--timeout=300", "migrate", &addr]);
    let s = src.finish();
    assert_eq!(
        code,
        Some(1),
        "the migration cannot succeed: {out}\n{err}\n{s:#?}"
    );
    assert!(
        err.contains(
            "migrate: the VM ended before the migration finished (the plugin exited with status 0)"
        ),
        "the answer names why: {err}\nsource: {s:#?}"
    );
    assert_eq!(s.code, Some(0), "{s:#?}");
    assert_eq!(result_of(&s.stdout), result_of(&reference.stdout), "{s:#?}");
    assert!(!s.stderr.contains("migrated to"), "{s:#?}");
    assert!(peer.join().unwrap() > 0, "round 0 never reached the target");
}

/// A target whose plugin sets up other memory refuses the machine, naming
/// the region; the source hears it and goes on.
#[test]
fn a_target_with_other_memory_refuses_naming_the_region_and_the_source_goes_on() {
    let dir = TempDir::new("mig-layout");
    let path = dir.0.join("in.sock");
    let addr = format!("unix:{}", path.display());
    // The target's plugin has no load region.
    let mut target = start(&["--incoming", &addr], "longrun", &[ROUNDS]);
    wait_for(&path);
    let reference = run_vmm(&[], &bin("longrun"), &[ROUNDS, "load"]);
    let (mut src, socket) = source(&dir.0, "longrun", &[ROUNDS, "load"]);
    let (code, out, err) = ctl(&socket, &["migrate", &addr]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("at 0x100000 (0x40000 bytes) is not set up by the plugin"),
        "{err}"
    );
    let t = target.finish();
    assert_eq!(t.code, Some(1), "{t:#?}");
    assert!(t.stderr.contains("at 0x100000 (0x40000 bytes)"), "{t:#?}");
    assert!(
        !t.stdout.contains("progress"),
        "the target ran the guest: {t:#?}"
    );
    let s = src.finish();
    assert_eq!(s.code, Some(0), "{s:#?}");
    assert_eq!(result_of(&s.stdout), result_of(&reference.stdout));
}

/// Sends `bytes` to a `vmm --incoming` and returns its run.
fn incoming_with(bytes: &[u8]) -> VmmRun {
    let dir = TempDir::new("mig-in");
    let path = dir.0.join("in.sock");
    let addr = format!("unix:{}", path.display());
    let mut target = start(
        &["--incoming", &addr, "--incoming-timeout", "30"],
        "longrun",
        &[ROUNDS],
    );
    wait_for(&path);
    let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let _ = c.write_all(bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    let t = target.finish();
    assert!(!path.exists(), "the socket file was left behind");
    assert!(!t.stdout.contains("progress"), "a guest ran: {t:#?}");
    assert!(
        !t.stderr.contains("started 1 vcpu"),
        "vcpus started: {t:#?}"
    );
    t
}

#[test]
fn a_garbage_source_makes_the_target_exit_1_naming_it() {
    let t = incoming_with(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(t.code, Some(1), "{t:#?}");
    assert!(t.stderr.contains("not a vmm migration source"), "{t:#?}");
}

#[test]
fn a_source_of_another_version_makes_the_target_exit_1_naming_it() {
    let mut b = b"VMMMIGR\0".to_vec();
    b.extend_from_slice(&7u32.to_le_bytes());
    let t = incoming_with(&b);
    assert_eq!(t.code, Some(1), "{t:#?}");
    assert!(t.stderr.contains("version 7"), "{t:#?}");
}

#[test]
fn a_source_that_drops_mid_stream_makes_the_target_exit_1() {
    // A valid beginning (a header announcing the longrun layout), then a
    // cut-short page frame.
    let mut w = vmm_migration::Writer::new(Vec::new()).unwrap();
    w.header(&vmm_migration::Header {
        vcpus: 1,
        regions: vec![vmm_migration::Region {
            gpa: 0,
            size: 0x10000,
        }],
        facts: vmm_snapshot::Records::new(),
    })
    .unwrap();
    w.pages(0, 0, &[0x90; 4096]).unwrap();
    let mut b = std::mem::take(w.get_mut());
    b.truncate(b.len() - 1000);
    let t = incoming_with(&b);
    assert_eq!(t.code, Some(1), "{t:#?}");
    assert!(t.stderr.contains("closed the connection"), "{t:#?}");
}

/// A target that takes the whole machine, hears `Commit` and then drops
/// the connection: it may be running the machine, so the source must not
/// run it too. The source stays paused and says so; resumed by hand, it
/// finishes with the right result (this target never ran it).
#[test]
fn a_drop_after_commit_leaves_the_source_paused() {
    use vmm_migration::{Frame, Reader, Reply};
    let dir = TempDir::new("mig-commit");
    let args = [ROUNDS];
    let reference = run_vmm(&[], &bin("longrun"), &args);
    reference.assert_success();
    let path = dir.0.join("peer.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || {
        let (c, _) = listener.accept().unwrap();
        let mut w = c.try_clone().unwrap();
        let mut r = Reader::new(BufReader::new(c)).unwrap();
        vmm_migration::write_reply(&mut w, &Reply::Receiving).unwrap();
        while !matches!(r.next_frame().unwrap(), Frame::End { .. }) {}
        vmm_migration::write_reply(&mut w, &Reply::Ready).unwrap();
        assert_eq!(
            vmm_migration::read_reply(r.get_mut()).unwrap(),
            Reply::Commit
        );
        // Dropped without Done.
    });
    let (mut src, socket) = source(&dir.0, "longrun", &args);
    let (code, out, err) = ctl(&socket, &["migrate", &format!("unix:{}", path.display())]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("the target may be running the machine"),
        "{err}"
    );
    peer.join().unwrap();
    let (_, out, _) = ctl(&socket, &["status"]);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "paused", "{status}");
    let (code, _, err) = ctl(&socket, &["resume"]);
    assert_eq!(code, Some(0), "{err}");
    let s = src.finish();
    assert_eq!(s.code, Some(0), "{s:#?}");
    assert_eq!(result_of(&s.stdout), result_of(&reference.stdout));
}
