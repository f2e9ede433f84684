//! Test plugin attacking the fast vcpu channel: it asks for the channel over
//! the raw protocol, then corrupts the shared ring the host reads
//! (`shm_hostile head|length|garbage|flood`). The host must log the failure, stop the
//! VM and exit cleanly; the plugin then waits to be told to shut down.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use plugin_proto::framing;
use plugin_proto::protobuf::Message;
use plugin_proto::shm::{ShmChannel, Side, RING_SIZE};
use plugin_proto::{MainRequest, MainResponse, VcpuRequest};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let fd: i32 = std::env::var("CROSVM_SOCKET")
        .expect("CROSVM_SOCKET")
        .parse()
        .expect("fd");
    // SAFETY: the host passed us this descriptor; we own it from now on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut buf = vec![0; framing::MAX_MESSAGE_SIZE];
    let mut scratch = Vec::new();
    let mut call = |req: &MainRequest| {
        framing::send_message(sock.as_fd(), req, &[], &mut scratch).expect("send");
        let p = framing::recv_packet(sock.as_fd(), &mut buf, framing::SCM_MAX_FD).expect("recv");
        (
            MainResponse::parse_from_bytes(&buf[..p.len]).expect("decode"),
            p.fds,
        )
    };
    let mut r = MainRequest::new();
    r.mut_get_vcpus().request_fast_channel = true;
    let (resp, fds) = call(&r);
    assert!(
        resp.get_vcpus().fast_channel,
        "the host did not grant the fast channel"
    );
    let mut shm = ShmChannel::map(fds[2].as_fd(), Side::Plugin).expect("map");
    let mut r = MainRequest::new();
    r.mut_get_shutdown_eventfd();
    let (_, shutdown) = call(&r);
    let mut r = MainRequest::new();
    r.mut_start();
    assert_eq!(call(&r).0.errno, 0);

    let mut never = || false;
    match mode.as_str() {
        // A head index the ring cannot hold.
        "head" => shm.poke_control(true, true, RING_SIZE * 3),
        // A frame whose length prefix claims more than was published.
        "length" => {
            let mut w = VcpuRequest::new();
            w.mut_wait();
            shm.send(&w.write_to_bytes().unwrap(), &mut never).unwrap();
            shm.poke_control(true, true, 1);
        }
        // Bytes that are not a protobuf message: servicing ends, as on pipes.
        "garbage" => shm.send(&[0xff, 0xff, 0xff], &mut never).unwrap(),
        // Empty requests (no member selected) while Init is pending: each is
        // answered with EPROTO and the channel stays up.
        "flood" => {
            for _ in 0..10_000 {
                shm.send(&[], &mut never).unwrap();
                let reply =
                    plugin_proto::VcpuResponse::parse_from_bytes(shm.recv(&mut never).unwrap())
                        .unwrap();
                assert_eq!(reply.errno, 71, "expected EPROTO");
            }
            println!("flood answered");
            std::process::exit(0);
        }
        other => panic!("unknown mode {other}"),
    }
    // Wait for the host to shut the VM down (it must notice the corruption).
    let mut v = [0u8; 8];
    nix::unistd::read(&shutdown[0], &mut v).expect("read shutdown eventfd");
    println!("host shut down the VM");
}
