//! A C plugin (tests/c/flow.c) linked against libcrosvm_plugin.so runs as a
//! child process against the fake VMM, inheriting its socket through
//! CROSVM_SOCKET like a real plugin.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;

use common::*;
use crosvm_plugin::kvm_bindings::kvm_regs;
use crosvm_plugin::StateImage;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use plugin_proto::main_request;
use plugin_proto::vcpu_request;
use plugin_proto::vcpu_response::wait;

fn build_flow() -> PathBuf {
    let exe = cc::out_dir().join("flow");
    let sdk = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    cc::CBuild::c()
        .flags(["-std=c11"])
        .source(&sdk.join("tests/c/flow.c"))
        .output(&exe)
        .link_sdk()
        .run();
    exe
}

#[test]
fn c_plugin_runs_against_fake_host() {
    let exe = build_flow();
    let (plugin, mut host) = start_host(1, Delivery::Single, default_handler());
    let vcpu_host = serve_vcpu(
        host.vcpus.remove(0),
        scripted_exits(
            vec![
                wait::Exit::Init(Default::default()),
                wait::Exit::Io(wait::Io {
                    address: 0x3f9,
                    data: vec![0; 2],
                    ..Default::default()
                }),
                wait::Exit::HypervCall(wait::HypervCall {
                    input: 9,
                    params0: 40,
                    params1: 2,
                    ..Default::default()
                }),
                wait::Exit::User(wait::User {
                    user: 0x77,
                    ..Default::default()
                }),
                wait::Exit::HypervSynic(wait::HypervSynic {
                    msr: 0x4000_0083,
                    control: 1,
                    evt_page: 2,
                    msg_page: 3,
                    ..Default::default()
                }),
            ],
            |_| vec![],
        ),
    );

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
