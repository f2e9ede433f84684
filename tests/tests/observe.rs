//! Seeing inside a running machine (issue 14): `--trace` lines, `--stats`
//! counts of known workloads, and `vmm replay` of committed sessions. Real
//! `vmm`, real guests, plugins jailed unless a test says why not.

use std::collections::BTreeSet;

use e2e_tests::{bin, repo_root, run_command, run_vmm, TempDir};

/// The trace lines of `text` with their latency cut off: `(12µs)` at the
/// end of a line is timing, everything before it is exact.
fn lines_without_latency(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("main[") || l.starts_with("vcpu"))
        .map(|l| match l.rfind(" (") {
            Some(i) if l.ends_with(')') => l[..i].to_string(),
            _ => l.to_string(),
        })
        .collect()
}

#[test]
fn trace_shows_each_request_event_and_resume_of_the_smoke_plugin() {
    let r = run_vmm(&["--trace"], &bin("rawplug"), &["smoke"]);
    r.assert_success();
    let lines = lines_without_latency(&r.stderr);
    let main: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("main"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        main,
        [
            "main[0] GetVcpus{accept_chunked_fds} = 0 {vcpu_count: 1, fast_channel: false} +2 fds",
            "main[0] Create{id: 1, Memory{start: 0x0, length: 0x10000, offset: 0x0}} = 0",
            "main[0] ReserveRange{space: IoPort, start: 0x3f8, length: 0x8} = 0",
            "main[0] ReserveRange{space: IoPort, start: 0x501, length: 0x1} = 0",
            "main[0] Start{} = 0",
        ],
        "{}",
        r.stderr
    );
    let vcpu: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("vcpu"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        vcpu,
        [
            "vcpu0 -> Wait{} = Init{}",
            "vcpu0 -> GetState{set: SREGS} = 0 {state: 312 bytes}",
            "vcpu0 -> Resume{regs: 144 bytes, sregs: 312 bytes}",
            "vcpu0 <- Io{IoPort 0x3f8 write [0x6f]}",
            "vcpu0 -> Resume{}",
            "vcpu0 <- Io{IoPort 0x3f8 write [0x6b]}",
            "vcpu0 -> Resume{}",
            "vcpu0 <- Io{IoPort 0x501 write [0x1]}",
        ],
        "{}",
        r.stderr
    );
    // Every request line ends with its latency.
    for l in r.stderr.lines().filter(|l| l.contains(" = ")) {
        assert!(l.ends_with("s)") && l.contains(" ("), "no latency in {l:?}");
    }
    // Without --trace nothing is traced; --log-level trace implies it.
    let quiet = run_vmm(&[], &bin("rawplug"), &["smoke"]);
    quiet.assert_success();
    assert!(
        lines_without_latency(&quiet.stderr).is_empty(),
        "{quiet:#?}"
    );
    let implied = run_vmm(&["--log-level", "trace"], &bin("rawplug"), &["smoke"]);
    implied.assert_success();
    assert!(
        implied
            .stderr
            .lines()
            .any(|l| l.starts_with("main[0] Start{} = 0 (")),
        "{implied:#?}"
    );
}

#[test]
fn trace_file_gets_every_request_kind_decoded_with_errnos() {
    let dir = TempDir::new("trace");
    let file = dir.0.join("trace.txt");
    let file_arg = file.to_str().unwrap();
    let runs: [(&[&str], &str, &[&str]); 5] = [
        (&[], "rawplug", &["errnos"]),
        (&[], "sdk_api", &["io"]),
        // The vcpu mode counts the pipe writes of its register cache.
        (&["--no-fast-channel"], "sdk_api", &["vcpu"]),
        // The vm mode opens /dev/kvm itself (to compare CPUID and MSR
        // lists), which the jail does not offer.
        (&["--disable-sandbox"], "sdk_api", &["vm"]),
        (&["--cpus", "2"], "multi-vcpu", &[]),
    ];
    for (vmm_args, plugin, plugin_args) in runs {
        let mut args = vec!["--trace-file", file_arg];
        args.extend_from_slice(vmm_args);
        let r = run_vmm(&args, &bin(plugin), plugin_args);
        r.assert_success();
        assert!(
            lines_without_latency(&r.stderr).is_empty(),
            "trace lines went to stderr: {r:#?}"
        );
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let lines = lines_without_latency(&text);
    // Each line is whole: a connection or vcpu, then a request or event.
    let mut kinds = BTreeSet::new();
    for l in &lines {
        let (who, rest) = l.split_once(' ').unwrap();
        assert!(who.starts_with("main[") || who.starts_with("vcpu"), "{l}");
        let rest = rest
            .strip_prefix("-> ")
            .or_else(|| rest.strip_prefix("<- "))
            .unwrap_or(rest);
        let kind = rest.split(['{', ' ']).next().unwrap();
        kinds.insert(format!("{} {kind}", &who[..4]));
    }
    let expected_main = [
        "Create",
        "Destroy",
        "NewConnection",
        "GetShutdownEventfd",
        "CheckExtension",
        "GetSupportedCpuid",
        "GetEmulatedCpuid",
        "GetMsrIndexList",
        "GetNetConfig",
        "ReserveRange",
        "SetIrq",
        "SetIrqRouting",
        "GetState",
        "SetState",
        "SetIdentityMapAddr",
        "PauseVcpus",
        "GetVcpus",
        "Start",
        "SetCallHint",
        "DirtyLog",
    ];
    let expected_vcpu = [
        "Wait",
        "Resume",
        "GetState",
        "SetState",
        "GetMsrs",
        "SetMsrs",
        "SetCpuid",
        "GetHypervCpuid",
        "EnableCapability",
        "Io",
        "User",
    ];
    for k in expected_main {
        assert!(
            kinds.contains(&format!("main {k}")),
            "no main {k}: {kinds:?}"
        );
    }
    for k in expected_vcpu {
        assert!(
            kinds.contains(&format!("vcpu {k}")),
            "no vcpu {k}: {kinds:?}"
        );
    }
    // Decoded fields and errno names (rawplug errnos).
    for want in [
        "main[0] Destroy{id: 77} = ENOENT",
        "main[0] ReserveRange{space: IoPort, start: 0x108, length: 0x1} = EPERM",
        "main[0] ReserveRange{space: Mmio, start: 0xfffffffffffffffe, length: 0x4} = EINVAL",
        "main[0] Create{id: 1, Memory{start: 0x0, length: 0x1000, offset: 0x0}} = EBADF",
        "main[0] Unknown{} = ENOTTY",
        "main[0] Start{} = EINVAL",
    ] {
        assert!(lines.iter().any(|l| l == want), "no {want:?} in\n{text}");
    }
    // Pauses reach each vcpu as User events (multi-vcpu).
    assert!(
        lines.iter().any(|l| l.starts_with("vcpu1 <- User{user: ")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("main[0] PauseVcpus{cpu_mask: 0x3, ")),
        "{text}"
    );
}

/// The `count` and `errors` columns of one request row of the table.
fn request_row(table: &str, channel: &str, request: &str) -> Option<(u64, u64)> {
    table.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 7 && f[0] == channel && f[1] == request)
            .then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
    })
}

/// The exit count of one range line of a vcpu (`IoPort 0x3f8..0x400 2 exit(s)`).
fn exits(table: &str, vcpu: u32, range: &str) -> Option<u64> {
    let mut in_vcpu = false;
    for l in table.lines() {
        if let Some(rest) = l.trim_start().strip_prefix("vcpu") {
            in_vcpu = rest.starts_with(&format!("{vcpu}:"));
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        if in_vcpu && f.len() == 4 && f[1] == range {
            return f[2].parse().ok();
        }
    }
    None
}

fn resumed(table: &str, vcpu: u32) -> Option<u64> {
    table.lines().find_map(|l| {
        l.trim_start()
            .strip_prefix(&format!("vcpu{vcpu}: "))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[test]
fn stats_count_a_known_workload_exactly() {
    // rawplug smoke: 5 main requests; Init, one state read, the resumes of
    // Init and of the 2 writes of "ok"; 3 exits (2 to the UART's range, 1
    // to the shutdown port, which the plugin leaves without resuming).
    let r = run_vmm(&["--stats"], &bin("rawplug"), &["smoke"]);
    r.assert_success();
    let t = &r.stderr;
    assert!(t.contains("vmm statistics"), "{t}");
    assert_eq!(request_row(t, "main", "GetVcpus"), Some((1, 0)), "{t}");
    assert_eq!(request_row(t, "main", "Create"), Some((1, 0)), "{t}");
    assert_eq!(request_row(t, "main", "ReserveRange"), Some((2, 0)), "{t}");
    assert_eq!(request_row(t, "main", "Start"), Some((1, 0)), "{t}");
    assert_eq!(request_row(t, "vcpu", "Wait"), Some((1, 0)), "{t}");
    assert_eq!(request_row(t, "vcpu", "GetState"), Some((1, 0)), "{t}");
    assert_eq!(request_row(t, "vcpu", "Resume"), Some((3, 0)), "{t}");
    assert_eq!(exits(t, 0, "0x3f8..0x400"), Some(2), "{t}");
    assert_eq!(exits(t, 0, "0x501..0x502"), Some(1), "{t}");
    assert_eq!(resumed(t, 0), Some(3), "{t}");

    // rawplug errnos: the failures are counted per request type.
    let r = run_vmm(&["--stats"], &bin("rawplug"), &["errnos"]);
    r.assert_success();
    let t = &r.stderr;
    assert_eq!(request_row(t, "main", "Destroy"), Some((3, 2)), "{t}");
    assert_eq!(request_row(t, "main", "ReserveRange"), Some((5, 4)), "{t}");
    assert_eq!(request_row(t, "main", "Start"), Some((2, 1)), "{t}");
    assert_eq!(request_row(t, "main", "Unknown"), Some((1, 1)), "{t}");

    // multi_io on 2 vcpus, 20 iterations: each vcpu writes its id 20 times
    // and once to the done port, all in the reserved 0x700..0x702.
    let r = run_vmm(&["--stats", "--cpus", "2"], &bin("multi_io"), &["20"]);
    r.assert_success();
    let t = &r.stderr;
    for v in 0..2 {
        assert_eq!(exits(t, v, "0x700..0x702"), Some(21), "{t}");
        // Init and the 20 data writes were resumed.
        assert_eq!(resumed(t, v), Some(21), "{t}");
    }
    // Without --stats there is no table.
    let r = run_vmm(&[], &bin("rawplug"), &["smoke"]);
    assert!(!r.stderr.contains("vmm statistics"), "{r:#?}");
}

fn vmm_replay(word: &str, files: &[&std::path::Path]) -> e2e_tests::VmmRun {
    let mut cmd = std::process::Command::new(bin("vmm"));
    cmd.arg(word).args(files);
    run_command(cmd)
}

#[test]
fn replay_prints_committed_sessions() {
    let seeds = repo_root().join("fuzz/seeds");
    let main = seeds.join("main_handler/rawplug_smoke-main.session");
    let r = vmm_replay("replay", &[&main]);
    r.assert_success();
    assert_eq!(
        r.stdout.lines().collect::<Vec<_>>(),
        [
            "#0 main GetVcpus{accept_chunked_fds}",
            "#1 main Create{id: 1, Memory{start: 0x0, length: 0x10000, offset: 0x0}} +SealedMemfd(16 pages)",
            "#2 main ReserveRange{space: IoPort, start: 0x3f8, length: 0x8}",
            "#3 main ReserveRange{space: IoPort, start: 0x501, length: 0x1}",
            "#4 main Start{}",
            "#5 main close connection",
        ]
    );
    let vcpu = seeds.join("vcpu_handler/rawplug_smoke-vcpu0.session");
    let r = vmm_replay("decode", &[&vcpu]);
    r.assert_success();
    assert_eq!(
        r.stdout.lines().collect::<Vec<_>>(),
        [
            "#0 vcpu -> Wait{}",
            "#1 vcpu -> GetState{set: SREGS}",
            "#2 vcpu -> Resume{regs: 144 bytes, sregs: 312 bytes}",
            "#3 vcpu <- Io{IoPort 0x3f8 write [0x6f]}",
            "#4 vcpu -> Resume{}",
            "#5 vcpu <- Io{IoPort 0x3f8 write [0x6b]}",
            "#6 vcpu -> Resume{}",
            "#7 vcpu <- Io{IoPort 0x501 write [0x1]}",
        ]
    );
    // Several files: each under its name.
    let r = vmm_replay("replay", &[&main, &vcpu]);
    r.assert_success();
    assert!(r
        .stdout
        .starts_with(&format!("==> {} <==\n#0 main", main.display())));
    // Every committed session decodes.
    for sub in ["main_handler", "vcpu_handler", "main_kvm"] {
        for e in std::fs::read_dir(seeds.join(sub)).unwrap().flatten() {
            let r = vmm_replay("replay", &[&e.path()]);
            r.assert_success();
            assert!(
                r.stdout.starts_with("#0 "),
                "{}: {r:#?}",
                e.path().display()
            );
        }
    }
}

#[test]
fn replay_of_a_corrupt_or_missing_file_is_a_clear_error() {
    let dir = TempDir::new("replay");
    let seed = repo_root().join("fuzz/seeds/main_handler/rawplug_smoke-main.session");
    let mut data = std::fs::read(&seed).unwrap();
    let good = data.len();
    data.extend_from_slice(&[0, 0, 0, 0, 0x40, 0, 1, 2, 3]);
    let cut = dir.0.join("cut.session");
    std::fs::write(&cut, &data).unwrap();
    let r = vmm_replay("replay", &[&cut]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains(&format!(
            "record 6 at byte {good}: truncated payload: the header says 64 bytes, 3 remain"
        )),
        "{r:#?}"
    );
    let bad = dir.0.join("bad.session");
    std::fs::write(&bad, [0xc8u8, 0, 0, 0, 0, 0]).unwrap();
    let r = vmm_replay("replay", &[&bad]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(
        r.stderr
            .contains("record 0 at byte 0: unknown record kind 200"),
        "{r:#?}"
    );
    let missing = dir.0.join("missing.session");
    let r = vmm_replay("replay", &[&missing]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("cannot read"), "{r:#?}");
    assert!(!r.stderr.contains("panicked"), "{r:#?}");
}

#[test]
fn long_help_documents_replay_and_the_record_directory() {
    let mut cmd = std::process::Command::new(bin("vmm"));
    cmd.arg("--help");
    let r = run_command(cmd);
    r.assert_success();
    for want in [
        "VMM_RECORD_DIR=DIR",
        "vmm replay FILE",
        "--trace-file",
        "--stats",
    ] {
        assert!(r.stdout.contains(want), "no {want:?} in {}", r.stdout);
    }
}
