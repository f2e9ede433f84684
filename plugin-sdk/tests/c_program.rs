//! A C plugin (tests/c/flow.c) linked against libcrosvm_plugin.so runs as a
//! child process against the fake VMM, inheriting its socket through
//! CROSVM_SOCKET like a real plugin.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use crosvm_plugin::kvm_bindings::kvm_regs;
use crosvm_plugin::StateImage;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use plugin_proto::main_request;
use plugin_proto::vcpu_request;
use plugin_proto::vcpu_response::wait;
use plugin_proto::VcpuResponse;

fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .to_path_buf()
}

/// Directory of the package's cdylib (see tests/c_header.rs).
fn library_dir() -> PathBuf {
    let profile = profile_dir();
    [profile.join("deps"), profile.clone()]
        .into_iter()
        .find(|d| d.join("libcrosvm_plugin.so").exists())
        .expect("libcrosvm_plugin.so not built")
}

fn build_flow() -> PathBuf {
    let dir = library_dir();
    let out = profile_dir().join("c-api-tests");
    std::fs::create_dir_all(&out).unwrap();
    let exe = out.join("flow");
    let sdk = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-pthread", "-I"])
        .arg(sdk.join("include"))
        .arg(sdk.join("tests/c/flow.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&dir)
        .arg("-Wl,-rpath")
        .arg(&dir)
        .arg("-lcrosvm_plugin")
        .status()
        .expect("cc");
    assert!(status.success());
    exe
}

fn wait_reply(exit: wait::Exit) -> Reply {
    let mut r = VcpuResponse::new();
    r.mut_wait().exit = Some(exit);
    Reply::Msg(r)
}

#[test]
fn c_plugin_runs_against_fake_host() {
    let exe = build_flow();
    let (plugin, mut host) = start_host(1, Delivery::Single, default_handler());
    let mut step = 0;
    let vcpu_host = serve_vcpu(host.vcpus.remove(0), move |req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) | Some(vcpu_request::Message::Resume(_)) => {
            step += 1;
            match step {
                1 => vec![wait_reply(wait::Exit::Init(Default::default()))],
                2 => vec![wait_reply(wait::Exit::Io(wait::Io {
                    address: 0x3f9,
                    data: vec![0; 2],
                    ..Default::default()
                }))],
                3 => vec![wait_reply(wait::Exit::HypervCall(wait::HypervCall {
                    input: 9,
                    params0: 40,
                    params1: 2,
                    ..Default::default()
                }))],
                4 => vec![wait_reply(wait::Exit::User(wait::User {
                    user: 0x77,
                    ..Default::default()
                }))],
                5 => vec![wait_reply(wait::Exit::HypervSynic(wait::HypervSynic {
                    msr: 0x4000_0083,
                    control: 1,
                    evt_page: 2,
                    msg_page: 3,
                    ..Default::default()
                }))],
                _ => vec![],
            }
        }
        _ => vec![],
    });

    // The child inherits the plugin end (not close-on-exec) under its number.
    fcntl(&plugin, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let output = Command::new(&exe)
        .env("CROSVM_SOCKET", plugin.as_raw_fd().to_string())
        .output()
        .expect("run flow");
    drop::<OwnedFd>(plugin);
    assert!(
        output.status.success(),
        "flow failed with {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("flow ok"));

    let requests = vcpu_host.join().unwrap();
    let resumes: Vec<&vcpu_request::Resume> = requests
        .iter()
        .filter_map(|r| match &r.message {
            Some(vcpu_request::Message::Resume(r)) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(resumes.len(), 4);
    let regs = kvm_regs::from_image(&resumes[0].regs).unwrap();
    assert_eq!((regs.rip, regs.rflags), (0x1000, 2));
    assert_eq!(resumes[1].data, vec![0x12, 0x34]);
    assert_eq!(resumes[2].data, 42u64.to_le_bytes().to_vec());

    let main: Vec<_> = host
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|r| match &r.message {
            Some(main_request::Message::GetVcpus(_)) => "get_vcpus",
            Some(main_request::Message::ReserveRange(_)) => "reserve_range",
            Some(main_request::Message::GetShutdownEventfd(_)) => "get_shutdown_eventfd",
            Some(main_request::Message::Start(_)) => "start",
            _ => "other",
        })
        .collect();
    assert_eq!(
        main,
        [
            "get_vcpus",
            // The library's own, polled by crosvm_vcpu_wait.
            "get_shutdown_eventfd",
            "reserve_range",
            "get_shutdown_eventfd",
            "start"
        ]
    );
}
