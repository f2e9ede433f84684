//! Snapshot and restore end to end (issue 12, phase 1, host side): the
//! jailed `longrun` machine under a real `vmm --api-socket`, snapshotted
//! mid-run with the real `vmm ctl S snapshot DIR`, restored with `vmm
//! --restore DIR`, and the bad-input list for snapshots.
//!
//! `longrun` and `longrun_c` hand over their device state (SAVE_STATE) and
//! restore to the uninterrupted result; taken `without_device_state`, the
//! restored guest continues where it stopped but the device's accumulator
//! starts afresh, so the result differs — the device state matters.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e_tests::{bin, result_of, run_vmm, Background, TempDir};
use serde_json::Value;

const ROUNDS: &str = "60";

fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    e2e_tests::vmm_ctl(socket, args)
}

/// A `vmm` in the background whose stdout lines arrive on a channel.
struct Vm {
    bg: Background,
    socket: PathBuf,
}

impl Vm {
    fn start(socket: &Path, plugin: &str, args: &[&str]) -> Vm {
        let bg = Background::spawn(
            Command::new(bin("vmm"))
                .arg("--api-socket")
                .arg(socket)
                .arg("--plugin")
                .arg(bin(plugin))
                .arg("--plugin-args")
                .args(args),
        );
        Vm {
            bg,
            socket: socket.to_path_buf(),
        }
    }

    /// Waits for a stdout line with `prefix`; returns it.
    fn wait_line(&mut self, prefix: &str) -> String {
        self.bg.wait_line(prefix)
    }

    fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        ctl(&self.socket, args)
    }

    fn ctl_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let (code, out, err) = self.ctl(&full);
        assert_eq!(code, Some(0), "vmm ctl {args:?} failed: {out}\n{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("vmm ctl {args:?}: {e}: {out}"))
    }
}

fn progress_of(line: &str) -> u32 {
    line.trim_start_matches("progress ")
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a progress line: {line:?}"))
}

/// Restores `snap` into `plugin` (which must succeed); returns the run and
/// the round of its first progress line.
fn restore(snap: &Path, plugin: &str) -> (e2e_tests::VmmRun, u32) {
    let restored = run_vmm(
        &["--restore", snap.to_str().unwrap()],
        &bin(plugin),
        &[ROUNDS],
    );
    restored.assert_success();
    let first = restored
        .stdout
        .lines()
        .find(|l| l.starts_with("progress "))
        .map(progress_of)
        .unwrap_or_else(|| panic!("no progress after restore: {restored:#?}"));
    (restored, first)
}

/// Takes a `longrun` snapshot after `progress 3` into `dir/snap`; the
/// original vmm is killed. Returns the snapshot's round and the reply.
fn take_snapshot(dir: &TempDir) -> (PathBuf, u32, Value) {
    let mut vm = Vm::start(&dir.0.join("vm.sock"), "longrun", &[ROUNDS]);
    vm.wait_line("progress 3");
    let snap = dir.0.join("snap");
    let v = vm.ctl_json(&["snapshot", snap.to_str().unwrap(), "without_device_state"]);
    // The machine kept running after the snapshot.
    let later = progress_of(&vm.wait_line("progress "));
    assert!(later >= 3, "{later}");
    drop(vm);
    // The progress at the snapshot: what a restored run starts after.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["vcpus"], 1, "{manifest}");
    assert_eq!(manifest["facts"]["plugin"], "longrun", "{manifest}");
    // Every vcpu record is there, the XSAVE image and MSRs included.
    let vcpu =
        vmm_snapshot::Records::decode(&std::fs::read(snap.join("vcpu0.state")).unwrap()).unwrap();
    for name in [
        "regs",
        "sregs",
        "fpu",
        "xcrs",
        "debugregs",
        "lapic",
        "mp-state",
        "events",
        "msrs",
        "cpuid",
        "xsave",
    ] {
        assert!(vcpu.get(name).is_some(), "no {name} record");
    }
    assert!(vcpu.get("msrs").unwrap().len() >= 12 * 10, "few MSRs saved");
    (snap, later, v)
}

#[test]
fn longrun_snapshotted_mid_run_continues_after_restore_and_lost_device_state_shows() {
    let dir = TempDir::new("snap-longrun");
    let reference = run_vmm(&[], &bin("longrun"), &[ROUNDS]);
    reference.assert_success();
    let expected = result_of(&reference.stdout);

    let (snap, _, reply) = take_snapshot(&dir);
    assert!(reply["memory_pages"].as_u64().unwrap() > 0, "{reply}");
    assert!(reply["bytes"].as_u64().unwrap() > 0, "{reply}");
    assert_eq!(reply["dir"], snap.to_str().unwrap(), "{reply}");

    let (restored, first) = restore(&snap, "longrun");
    // The guest continued where it stopped: its first progress line is past
    // the rounds done before the snapshot, not round 1.
    assert!(first > 3, "the restored guest restarted: {restored:#?}");
    assert!(
        restored.stdout.contains(&format!("progress {ROUNDS}")),
        "{restored:#?}"
    );
    // Without the device's accumulator the result is another one.
    assert_ne!(result_of(&restored.stdout), expected, "{restored:#?}");
}

#[test]
fn snapshot_without_a_control_channel_is_refused_and_the_vm_keeps_running() {
    // ctl_spin never opens the plugin's control channel (a crosvm-era
    // plugin would not either): it cannot hand over its device state.
    let dir = TempDir::new("snap-refused");
    let mut vm = Vm::start(&dir.0.join("vm.sock"), "ctl_spin", &["0"]);
    vm.wait_line("ctl_spin: running");
    let snap = dir.0.join("snap");
    let (code, out, err) = vm.ctl(&["snapshot", snap.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("does not take part in snapshots"),
        "{out}{err}"
    );
    assert!(!snap.join("manifest.json").exists());
    // Unharmed: it runs on.
    let exits = |vm: &Vm| {
        let v = vm.ctl_json(&["status"]);
        assert_eq!(v["state"], "running", "{v}");
        v["exits"][0].as_u64().expect("exits")
    };
    let before = exits(&vm);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        exits(&vm) > before,
        "the guest makes progress after the refusal"
    );
    // Taken without device state, the same machine snapshots fine.
    let v = vm.ctl_json(&["snapshot", snap.to_str().unwrap(), "without_device_state"]);
    assert!(v["memory_pages"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn snapshot_while_paused_leaves_it_paused_and_a_second_into_the_same_dir_fails() {
    let dir = TempDir::new("snap-paused");
    let mut vm = Vm::start(&dir.0.join("vm.sock"), "longrun", &[ROUNDS]);
    vm.wait_line("progress 1");
    vm.ctl_json(&["pause"]);
    let snap = dir.0.join("snap");
    let s = snap.to_str().unwrap();
    vm.ctl_json(&["snapshot", s, "without_device_state"]);
    let v = vm.ctl_json(&["status"]);
    assert_eq!(v["state"], "paused", "{v}");
    let (code, out, err) = vm.ctl(&["snapshot", s, "without_device_state"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("already holds a snapshot"), "{err}");
    vm.ctl_json(&["resume"]);
    vm.wait_line("result=");
    // Sparse: the images take less space than the regions they hold.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    for p in manifest["parts"].as_array().unwrap() {
        if p["kind"] == "memory" {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(snap.join(p["file"].as_str().unwrap())).unwrap();
            assert!(m.blocks() * 512 < m.len(), "{p} is not sparse");
        }
    }
}

/// Copies a snapshot directory.
fn copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn part_file(snap: &Path, kind: &str) -> PathBuf {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    let p = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} part"));
    snap.join(p["file"].as_str().unwrap())
}

/// Restoring `snap` fails with status 1, a message containing `needle`,
/// and no guest instruction ran (no progress line).
fn restore_fails(snap: &Path, extra: &[&str], needle: &str) {
    let mut args = vec!["--restore", snap.to_str().unwrap()];
    args.extend_from_slice(extra);
    let r = run_vmm(&args, &bin("longrun"), &[ROUNDS]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains(needle), "expected {needle:?}: {r:#?}");
    assert!(!r.stdout.contains("progress"), "the guest ran: {r:#?}");
}

#[test]
fn restore_refuses_every_kind_of_bad_snapshot_before_anything_runs() {
    let dir = TempDir::new("snap-bad");
    let (snap, _, _) = take_snapshot(&dir);
    let case = |name: &str| {
        let d = dir.0.join(name);
        copy(&snap, &d);
        d
    };

    // A truncated state part.
    let d = case("truncated");
    let f = d.join("vcpu0.state");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    restore_fails(&d, &[], "vcpu0");

    // A flipped byte in guest memory (a data page: the image's first one).
    let d = case("flipped-memory");
    let f = part_file(&d, "memory");
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes
        .iter()
        .position(|&b| b != 0)
        .expect("a data byte in memory");
    bytes[at] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    restore_fails(&d, &[], "ram");

    // A flipped byte in the VM state.
    let d = case("flipped-state");
    let f = d.join("vm.state");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    restore_fails(&d, &[], "vm");

    // No manifest: an unfinished snapshot.
    let d = case("no-manifest");
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    restore_fails(&d, &[], "manifest");

    // Another format version.
    let d = case("version");
    let mut m: Value =
        serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["version"], 1, "{m}");
    m["version"] = Value::from(7);
    std::fs::write(d.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    restore_fails(&d, &[], "version");

    // Another vcpu count.
    restore_fails(&snap, &["--cpus", "2"], "--cpus asks for 2");
}

/// Rewrites record `record` of state part `part` (file `PART.state`) with
/// `edit`, and the part's size and checksum in the manifest, so that the
/// snapshot stays consistent and only the edit is wrong with it.
fn rewrite_record(snap: &Path, part: &str, record: &str, edit: impl FnOnce(&[u8]) -> Vec<u8>) {
    let state = snap.join(format!("{part}.state"));
    let records = vmm_snapshot::Records::decode(&std::fs::read(&state).unwrap()).unwrap();
    let mut out = vmm_snapshot::Records::new();
    let mut edit = Some(edit);
    for (name, data) in records.iter() {
        let data = match edit.take_if(|_| name == record) {
            Some(f) => f(data),
            None => data.to_vec(),
        };
        out.push(name, data).unwrap();
    }
    assert!(edit.is_none(), "no record {record} in {part}");
    store_records(snap, part, &out);
}

/// Adds record `record` to state part `part`, keeping the manifest
/// consistent.
fn add_record(snap: &Path, part: &str, record: &str, data: Vec<u8>) {
    let state = snap.join(format!("{part}.state"));
    let mut records = vmm_snapshot::Records::decode(&std::fs::read(&state).unwrap()).unwrap();
    records.push(record, data).unwrap();
    store_records(snap, part, &records);
}

/// Writes state part `part` and its size and checksum in the manifest.
fn store_records(snap: &Path, part: &str, out: &vmm_snapshot::Records) {
    let state = snap.join(format!("{part}.state"));
    let bytes = out.encode();
    std::fs::write(&state, &bytes).unwrap();
    let mpath = snap.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for p in m["parts"].as_array_mut().unwrap() {
        if p["name"] == part {
            p["bytes"] = Value::from(bytes.len() as u64);
            p["crc32"] = Value::from(crc32(&bytes));
        }
    }
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn restore_into_a_machine_with_other_memory_names_the_region() {
    let dir = TempDir::new("snap-layout");
    let (snap, _, _) = take_snapshot(&dir);
    // A consistent snapshot of a machine with 128 KiB at 0 (the plugin sets
    // up 64 KiB): the memory record, the part and its image all grow; the
    // checksums are recomputed where they change.
    rewrite_record(&snap, "vm", "memory", |data| {
        let mut v: Value = serde_json::from_slice(data).unwrap();
        v[0]["size"] = Value::from(0x20000u64);
        serde_json::to_vec(&v).unwrap()
    });
    let mpath = snap.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for p in m["parts"].as_array_mut().unwrap() {
        if p["kind"] == "memory" {
            p["bytes"] = Value::from(0x20000u64);
            std::fs::OpenOptions::new()
                .write(true)
                .open(snap.join(p["file"].as_str().unwrap()))
                .unwrap()
                .set_len(0x20000)
                .unwrap();
        }
    }
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let r = run_vmm(
        &["--restore", snap.to_str().unwrap()],
        &bin("longrun"),
        &[ROUNDS],
    );
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("memory layout differs") && r.stderr.contains("region at 0x0 (0x20000"),
        "{r:#?}"
    );
    assert!(!r.stdout.contains("progress"), "the guest ran: {r:#?}");
}

/// CRC-32 (IEEE), for the checksum of an edited part.
fn crc32(b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in b {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn snapshot_into_a_dir_vmm_cannot_create_is_a_clear_error_and_the_vm_runs_on() {
    let dir = TempDir::new("snap-args");
    let mut vm = Vm::start(&dir.0.join("vm.sock"), "longrun", &[ROUNDS]);
    vm.wait_line("progress 1");
    // A directory vmm cannot create.
    let (code, _, err) = vm.ctl(&["snapshot", "/proc/no/such/dir", "without_device_state"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot create the snapshot directory"),
        "{err}"
    );
    let v = vm.ctl_json(&["status"]);
    assert_eq!(v["state"], "running", "{v}");
    vm.wait_line("result=");
}

// The `snap_dev` machine takes part in snapshots: its device state goes
// into the snapshot and comes back on restore.

const DEV_ROUNDS: &str = "400";

fn dev_snapshot(dir: &TempDir, mode: &str) -> PathBuf {
    let mut vm = Vm::start(&dir.0.join("vm.sock"), "snap_dev", &[mode, DEV_ROUNDS]);
    vm.wait_line("progress 20");
    let snap = dir.0.join("snap");
    let v = vm.ctl_json(&["snapshot", snap.to_str().unwrap()]);
    assert!(v["ms"].is_u64(), "{v}");
    // The plugin heard that the snapshot is done, and the guest goes on.
    vm.wait_line("snap_dev: resumed");
    vm.wait_line("progress ");
    drop(vm);
    snap
}

fn dev_restores_to_the_uninterrupted_result(mode: &str) {
    let dir = TempDir::new(&format!("snap-dev-{mode}"));
    let reference = run_vmm(&[], &bin("snap_dev"), &[mode, DEV_ROUNDS]);
    reference.assert_success();
    assert!(!reference.stdout.contains("restoring"), "{reference:#?}");
    let snap = dev_snapshot(&dir, mode);
    let r = run_vmm(
        &["--restore", snap.to_str().unwrap()],
        &bin("snap_dev"),
        &[mode, DEV_ROUNDS],
    );
    r.assert_success();
    assert!(r.stdout.contains("snap_dev: restoring"), "{r:#?}");
    let first = r
        .stdout
        .lines()
        .find(|l| l.starts_with("progress "))
        .map(progress_of)
        .unwrap_or_else(|| panic!("no progress after restore: {r:#?}"));
    assert!(first > 20, "the restored guest restarted: {r:#?}");
    assert_eq!(result_of(&r.stdout), result_of(&reference.stdout), "{r:#?}");
}

#[test]
fn a_machine_with_device_state_restores_to_the_uninterrupted_result() {
    dev_restores_to_the_uninterrupted_result("good");
}

#[test]
fn a_device_state_bigger_than_any_other_control_packet_is_taken_whole() {
    dev_restores_to_the_uninterrupted_result("big");
}

#[test]
fn a_plugin_answering_save_state_badly_fails_the_snapshot_and_the_vm_runs_on() {
    for (mode, needle) in [
        ("refuse", "refused to hand over its device state"),
        ("garbage", "did not hand over its device state within"),
        ("never", "did not hand over its device state within"),
    ] {
        let dir = TempDir::new(&format!("snap-bad-{mode}"));
        let mut vm = Vm::start(&dir.0.join("vm.sock"), "snap_dev", &[mode, "4000"]);
        vm.wait_line("progress 5");
        let snap = dir.0.join("snap");
        let (code, out, err) = vm.ctl(&["snapshot", snap.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{mode}: {out}{err}");
        assert!(err.contains(needle), "{mode}: {err}");
        assert!(!snap.join("manifest.json").exists(), "{mode}");
        // Unharmed: resumed, running, making progress.
        vm.wait_line("snap_dev: resumed");
        let v = vm.ctl_json(&["status"]);
        assert_eq!(v["state"], "running", "{mode}: {v}");
        let a = progress_of(&vm.wait_line("progress "));
        let b = progress_of(&vm.wait_line("progress "));
        assert!(b > a, "{mode}: {a} {b}");
    }
}

#[test]
fn restoring_device_state_into_a_plugin_that_never_asks_for_it_fails() {
    let dir = TempDir::new("snap-noask");
    let snap = dev_snapshot(&dir, "good");
    let r = run_vmm(
        &["--restore", snap.to_str().unwrap()],
        &bin("snap_dev"),
        &["noask", DEV_ROUNDS],
    );
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("never asked for it (GetRestoreState)"),
        "{r:#?}"
    );
    assert!(!r.stdout.contains("progress"), "the guest ran: {r:#?}");
}

/// Issue 12's first "done when": `longrun` snapshotted mid-run (device
/// state included) and restored in a new `vmm` prints the same `result=`
/// as an uninterrupted run; the original is killed after the snapshot.
fn same_result_after_restore(plugin: &str) {
    let dir = TempDir::new(&format!("snap-same-{plugin}"));
    let reference = run_vmm(&[], &bin(plugin), &[ROUNDS]);
    reference.assert_success();
    let expected = result_of(&reference.stdout);

    let mut vm = Vm::start(&dir.0.join("vm.sock"), plugin, &[ROUNDS]);
    vm.wait_line("progress 5");
    let snap = dir.0.join("snap");
    let reply = vm.ctl_json(&["snapshot", snap.to_str().unwrap()]);
    assert!(reply["memory_pages"].as_u64().unwrap() > 0, "{reply}");
    // Killed mid-run: only the snapshot carries the machine on.
    let (code, _, err) = vm.ctl(&["kill"]);
    assert_eq!(code, Some(0), "{err}");
    drop(vm);

    let (restored, first) = restore(&snap, plugin);
    assert!(first > 5, "the restored guest restarted: {restored:#?}");
    assert_eq!(result_of(&restored.stdout), expected, "{restored:#?}");
    assert!(
        restored.stderr.contains("restoring a snapshot"),
        "the plugin learned it was restoring: {restored:#?}"
    );
}

#[test]
fn longrun_snapshotted_and_restored_prints_the_uninterrupted_result() {
    same_result_after_restore("longrun");
}

#[test]
fn longrun_c_snapshotted_and_restored_prints_the_uninterrupted_result() {
    same_result_after_restore("longrun_c");
}

/// A snapshot whose guest ran with a CPUID this host cannot offer (another
/// CPU vendor; a feature bit KVM does not support) is refused before any
/// guest instruction runs, naming the vcpu and the leaf.
#[test]
fn restore_refuses_a_snapshot_from_another_cpu() {
    let dir = TempDir::new("snap-cpu");
    let (snap, _, _) = take_snapshot(&dir);
    // One kvm_cpuid_entry2 image: function, index, flags, eax, ebx, ecx,
    // edx, 3 x padding (40 bytes).
    let entry = |function: u32, regs: [u32; 4]| {
        let mut e = Vec::with_capacity(40);
        for w in [function, 0, 0, regs[0], regs[1], regs[2], regs[3], 0, 0, 0] {
            e.extend_from_slice(&w.to_le_bytes());
        }
        e
    };
    let with_cpuid = |name: &str, extra: Vec<u8>| -> PathBuf {
        let d = dir.0.join(name);
        copy(&snap, &d);
        rewrite_record(&d, "vcpu0", "cpuid", |data| {
            let mut data = data.to_vec();
            data.extend_from_slice(&extra);
            data
        });
        d
    };
    // "FakeVendorXY" is no CPU's vendor string.
    let vendor = |s: &[u8; 12]| {
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        [0x10, w(0), w(8), w(4)]
    };
    let d = with_cpuid("vendor", entry(0, vendor(b"FakeVendorXY")));
    restore_fails(
        &d,
        &[],
        "the snapshot comes from another CPU: vcpu 0's CPU vendor is \"FakeVendorXY\"",
    );
    // Every feature bit of leaf 0x80000001: no KVM supports them all.
    let d = with_cpuid("features", entry(0x8000_0001, [0, 0, u32::MAX, u32::MAX]));
    restore_fails(&d, &[], "CPUID leaf 0x80000001");
}

#[test]
fn the_snapshots_identity_map_address_is_applied_before_the_vcpus_exist() {
    let dir = TempDir::new("snap-identity");
    let (snap, _, _) = take_snapshot(&dir);
    let bad = dir.0.join("bad");
    copy(&snap, &bad);
    // longrun never sets one: the snapshot's machine "did", at the address
    // the old crosvm plugins use.
    add_record(
        &snap,
        "vm",
        "identity-map",
        0xfeff_c000u64.to_le_bytes().to_vec(),
    );
    // KVM refuses KVM_SET_IDENTITY_MAP_ADDR once a vcpu exists (EBUSY):
    // the restore succeeding with the address set shows where it goes.
    let r = run_vmm(
        &["--log-level", "debug", "--restore", snap.to_str().unwrap()],
        &bin("longrun"),
        &[ROUNDS],
    );
    r.assert_success();
    assert!(
        r.stderr.contains("restore: identity map set at 0xfeffc000"),
        "{r:#?}"
    );
    assert!(r.stdout.contains(&format!("progress {ROUNDS}")), "{r:#?}");
    // A malformed address is refused before anything runs, by name.
    add_record(
        &bad,
        "vm",
        "identity-map",
        0xfeff_c123u64.to_le_bytes().to_vec(),
    );
    restore_fails(&bad, &[], "record identity-map is malformed");
}
