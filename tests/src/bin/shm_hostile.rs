//! Test plugin attacking the fast vcpu channel: it asks for the channel over
//! the raw protocol, then corrupts the shared ring the host reads
//! (`shm_hostile head|length|garbage|flood`), or runs a guest that takes
//! port-IO exits in a loop on every vcpu and corrupts the ring of the last
//! vcpu mid-run (`shm_hostile run-head|run-tail|run-length [MARKER]`). The
//! host must report the failure once, stop the VM and exit 1; the plugin
//! then waits to be told to shut down.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use plugin_proto::framing;
use plugin_proto::protobuf::Message;
use plugin_proto::shm::{ShmChannel, Side, RING_SIZE};
use plugin_proto::{
    vcpu_request, AddressSpace, MainRequest, MainResponse, VcpuRequest, VcpuResponse,
};
use zerocopy::IntoBytes;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if let Some(attack) = mode.strip_prefix("run-") {
        run_and_corrupt(attack);
        return;
    }
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

/// Real-mode guest at 0x1000: `out 0x3f8, al; inc al` forever.
const LOOP_GUEST: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xee, // l: out dx, al
    0xfe, 0xc0, // inc al
    0xeb, 0xfb, // jmp l
];

/// Exits the attacked vcpu serves normally before it corrupts its ring.
const EXITS_BEFORE_ATTACK: u32 = 2000;

fn vcpu_call(shm: &mut ShmChannel, req: &VcpuRequest) -> VcpuResponse {
    let mut never = || false;
    shm.send(&req.write_to_bytes().unwrap(), &mut never)
        .expect("vcpu send");
    VcpuResponse::parse_from_bytes(shm.recv(&mut never).expect("vcpu recv")).expect("decode")
}

/// Takes the vcpu through Init into the guest loop.
fn enter_guest(shm: &mut ShmChannel) {
    let mut w = VcpuRequest::new();
    w.mut_wait();
    assert!(vcpu_call(shm, &w).wait().has_init(), "expected init");
    let mut g = VcpuRequest::new();
    g.mut_get_state().set = vcpu_request::StateSet::SREGS.into();
    let r = vcpu_call(shm, &g);
    assert_eq!(r.errno, 0, "GetState");
    let mut sregs =
        <kvm_bindings::kvm_sregs as zerocopy::FromBytes>::read_from_bytes(&r.get_state().state)
            .unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    // Application processors wait for a SIPI under the in-kernel irqchip:
    // make every vcpu runnable.
    let mp = kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    };
    let mut set = VcpuRequest::new();
    let ss = set.mut_set_state();
    ss.set = vcpu_request::StateSet::MP.into();
    ss.state = mp.as_bytes().to_vec();
    assert_eq!(vcpu_call(shm, &set).errno, 0, "SetState MP");
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    let mut res = VcpuRequest::new();
    let rs = res.mut_resume();
    rs.regs = regs.as_bytes().to_vec();
    rs.sregs = sregs.as_bytes().to_vec();
    let mut never = || false;
    shm.send(&res.write_to_bytes().unwrap(), &mut never)
        .expect("vcpu send");
}

/// Waits for the next port-IO exit; `None` once the host stopped serving
/// (the VM is going down).
fn next_io(shm: &mut ShmChannel, stop: &AtomicBool) -> Option<()> {
    let mut stopping = || stop.load(Ordering::Relaxed);
    let body = shm.recv(&mut stopping).ok()?;
    let r = VcpuResponse::parse_from_bytes(body).ok()?;
    let io = r.wait().io();
    assert_eq!(io.address, 0x3f8, "unexpected exit {r:?}");
    Some(())
}

fn resume(shm: &mut ShmChannel, stop: &AtomicBool) -> Option<()> {
    let mut res = VcpuRequest::new();
    res.set_resume(Default::default());
    let mut stopping = || stop.load(Ordering::Relaxed);
    shm.send(&res.write_to_bytes().unwrap(), &mut stopping).ok()
}

/// Every vcpu runs the port-IO loop over its fast channel; the last one,
/// after `EXITS_BEFORE_ATTACK` exits, corrupts its ring while the host
/// is servicing its exits:
/// * `head`: the plugin→host head claims more than the ring holds;
/// * `tail`: the host→plugin tail moves past the host's head;
/// * `length`: a frame whose length prefix claims more than was published.
fn run_and_corrupt(attack: &str) {
    let fd: i32 = std::env::var("CROSVM_SOCKET")
        .expect("CROSVM_SOCKET")
        .parse()
        .expect("fd");
    // SAFETY: the host passed us this descriptor; we own it from now on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut buf = vec![0; framing::MAX_MESSAGE_SIZE];
    let mut scratch = Vec::new();
    let mut call = |req: &MainRequest, fds: &[std::os::fd::BorrowedFd<'_>]| {
        framing::send_message(sock.as_fd(), req, fds, &mut scratch).expect("send");
        let mut p =
            framing::recv_packet(sock.as_fd(), &mut buf, framing::SCM_MAX_FD).expect("recv");
        let resp = MainResponse::parse_from_bytes(&buf[..p.len]).expect("decode");
        // GetVcpus may send its descriptors in chunks after the reply.
        if resp.has_get_vcpus() && resp.get_vcpus().fast_channel {
            let want = 3 * resp.get_vcpus().vcpu_count as usize;
            while p.fds.len() < want {
                let more = framing::recv_packet(sock.as_fd(), &mut buf, framing::SCM_MAX_FD)
                    .expect("recv chunk");
                p.fds.extend(more.fds);
            }
        }
        (resp, p.fds)
    };
    let mut r = MainRequest::new();
    let gv = r.mut_get_vcpus();
    gv.request_fast_channel = true;
    gv.accept_chunked_fds = true;
    let (resp, fds) = call(&r, &[]);
    assert_eq!(resp.errno, 0, "GetVcpus");
    assert!(
        resp.get_vcpus().fast_channel,
        "the host did not grant the fast channel"
    );
    let n = resp.get_vcpus().vcpu_count as usize;
    let channels: Vec<ShmChannel> = (0..n)
        .map(|i| ShmChannel::map(fds[3 * i + 2].as_fd(), Side::Plugin).expect("map"))
        .collect();

    let mem = nix::sys::memfd::memfd_create(
        c"guest",
        nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING | nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .unwrap();
    nix::unistd::ftruncate(&mem, 0x10000).unwrap();
    nix::sys::uio::pwrite(&mem, LOOP_GUEST, 0x1000).unwrap();
    nix::fcntl::fcntl(
        &mem,
        nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK),
    )
    .unwrap();
    let mut r = MainRequest::new();
    let cr = r.mut_create();
    cr.id = 1;
    let m = cr.mut_memory();
    m.start = 0;
    m.length = 0x10000;
    assert_eq!(call(&r, &[mem.as_fd()]).0.errno, 0, "CreateMemory");
    let mut r = MainRequest::new();
    let rr = r.mut_reserve_range();
    rr.space = AddressSpace::IOPORT.into();
    rr.start = 0x3f8;
    rr.length = 1;
    assert_eq!(call(&r, &[]).0.errno, 0, "ReserveRange");
    let mut r = MainRequest::new();
    r.mut_get_shutdown_eventfd();
    let (_, shutdown) = call(&r, &[]);
    let mut r = MainRequest::new();
    r.mut_start();
    assert_eq!(call(&r, &[]).0.errno, 0, "Start");

    let stop = Arc::new(AtomicBool::new(false));
    let attacked = n - 1;
    let attack = attack.to_string();
    let threads: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(i, mut shm)| {
            let stop = Arc::clone(&stop);
            let attack = attack.clone();
            std::thread::spawn(move || {
                enter_guest(&mut shm);
                let mut exits = 0u32;
                loop {
                    if next_io(&mut shm, &stop).is_none() {
                        println!("vcpu {i}: served {exits} exits");
                        return;
                    }
                    exits += 1;
                    if i == attacked && exits == EXITS_BEFORE_ATTACK {
                        break;
                    }
                    if resume(&mut shm, &stop).is_none() {
                        println!("vcpu {i}: served {exits} exits");
                        return;
                    }
                }
                // The host is servicing this vcpu's exit and waits for the
                // resume: corrupt the ring instead.
                match attack.as_str() {
                    "head" => {
                        let tail = shm.peek_control(true, false);
                        shm.poke_control(true, true, tail.wrapping_add(RING_SIZE + 4096));
                    }
                    "tail" => {
                        let head = shm.peek_control(false, true);
                        shm.poke_control(false, false, head.wrapping_add(64));
                        // The resume is fine; the host's next send fails.
                        let _ = resume(&mut shm, &stop);
                    }
                    "length" => {
                        let mut res = VcpuRequest::new();
                        res.set_resume(Default::default());
                        let body = res.write_to_bytes().unwrap();
                        let mut frame = Vec::new();
                        plugin_proto::framing::put_varint(&mut frame, 1000);
                        frame.extend_from_slice(&body);
                        let mut never = || false;
                        shm.send_unframed(&frame, &mut never).unwrap();
                    }
                    other => panic!("unknown attack {other}"),
                }
                println!("vcpu {i}: ring corrupted after {exits} exits");
            })
        })
        .collect();
    // Wait for the host to shut the VM down (it must notice the corruption).
    let mut v = [0u8; 8];
    nix::unistd::read(&shutdown[0], &mut v).expect("read shutdown eventfd");
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    println!("host shut down the VM");
}
