//! A plugin that speaks the wire protocol directly, without the SDK, so tests
//! can make it misbehave in precise ways. `rawplug SCENARIO [ARGS]`.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use plugin_proto::framing::{self, FrameReader};
use plugin_proto::protobuf::Message;
use plugin_proto::*;
use zerocopy::IntoBytes;

struct Conn {
    sock: OwnedFd,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl Conn {
    fn from_env() -> Conn {
        let fd: i32 = std::env::var("CROSVM_SOCKET")
            .expect("CROSVM_SOCKET")
            .parse()
            .expect("fd");
        // SAFETY: the host passed us this descriptor; we own it from now on.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Conn {
            sock,
            buf: vec![0; framing::MAX_MESSAGE_SIZE],
            scratch: Vec::new(),
        }
    }

    fn call(&mut self, req: &MainRequest, fds: &[BorrowedFd<'_>]) -> (MainResponse, Vec<OwnedFd>) {
        framing::send_message(self.sock.as_fd(), req, fds, &mut self.scratch).expect("send");
        let p = framing::recv_packet(self.sock.as_fd(), &mut self.buf, framing::SCM_MAX_FD)
            .expect("recv");
        (
            MainResponse::parse_from_bytes(&self.buf[..p.len]).expect("decode"),
            p.fds,
        )
    }
}

struct VcpuChan {
    req: OwnedFd,
    resp: OwnedFd,
    reader: FrameReader,
    scratch: Vec<u8>,
}

impl VcpuChan {
    fn send(&mut self, r: &VcpuRequest) {
        framing::write_vcpu_request(self.req.as_fd(), r, &mut self.scratch).expect("vcpu write");
    }
    fn recv(&mut self) -> VcpuResponse {
        let body = self
            .reader
            .next_frame(self.resp.as_fd())
            .expect("vcpu read");
        VcpuResponse::parse_from_bytes(body).expect("vcpu decode")
    }
}

fn get_vcpus(c: &mut Conn) -> Vec<VcpuChan> {
    let mut r = MainRequest::new();
    r.mut_get_vcpus().accept_chunked_fds = true;
    let (resp, mut fds) = c.call(&r, &[]);
    assert_eq!(resp.errno, 0);
    let n = resp.get_vcpus().vcpu_count as usize;
    while fds.len() < 2 * n {
        let p = framing::recv_packet(c.sock.as_fd(), &mut c.buf, framing::SCM_MAX_FD)
            .expect("recv chunk");
        fds.extend(p.fds);
    }
    let mut it = fds.into_iter();
    (0..n)
        .map(|_| VcpuChan {
            req: it.next().unwrap(),
            resp: it.next().unwrap(),
            reader: FrameReader::new(),
            scratch: Vec::new(),
        })
        .collect()
}

fn memfd(size: u64) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(
        c"guest",
        nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING | nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .unwrap();
    nix::unistd::ftruncate(&fd, size as i64).unwrap();
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK),
    )
    .unwrap();
    fd
}

fn create_memory(c: &mut Conn, id: u32, fd: &OwnedFd, start: u64, len: u64) -> i32 {
    let mut r = MainRequest::new();
    let cr = r.mut_create();
    cr.id = id;
    let m = cr.mut_memory();
    m.start = start;
    m.length = len;
    c.call(&r, &[fd.as_fd()]).0.errno
}

fn reserve(c: &mut Conn, space: AddressSpace, start: u64, len: u64, async_write: bool) -> i32 {
    let mut r = MainRequest::new();
    let rr = r.mut_reserve_range();
    rr.space = space.into();
    rr.start = start;
    rr.length = len;
    rr.async_write = async_write;
    c.call(&r, &[]).0.errno
}

fn simple(c: &mut Conn, f: impl FnOnce(&mut MainRequest)) -> i32 {
    let mut r = MainRequest::new();
    f(&mut r);
    c.call(&r, &[]).0.errno
}

/// Real-mode guest at 0x1000: writes "ok" to port 0x3f8, then 1 to port 0x501.
const GUEST: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'o', 0xee, // mov al,'o'; out dx,al
    0xb0, b'k', 0xee, // mov al,'k'; out dx,al
    0xba, 0x01, 0x05, // mov dx, 0x501
    0xb0, 0x01, 0xee, // mov al,1; out dx,al
    0xf4, // hlt
];

fn init_vcpu(v: &mut VcpuChan) {
    let mut w = VcpuRequest::new();
    w.set_wait(Default::default());
    v.send(&w);
    let r = v.recv();
    assert!(r.wait().has_init(), "expected init, got {r:?}");
    let mut g = VcpuRequest::new();
    g.mut_get_state().set = vcpu_request::StateSet::SREGS.into();
    v.send(&g);
    let r = v.recv();
    assert_eq!(r.errno, 0);
    let mut sregs =
        <kvm_bindings::kvm_sregs as zerocopy::FromBytes>::read_from_bytes(&r.get_state().state)
            .unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    let mut res = VcpuRequest::new();
    let rs = res.mut_resume();
    rs.regs = regs.as_bytes().to_vec();
    rs.sregs = sregs.as_bytes().to_vec();
    v.send(&res);
}

fn smoke() {
    let mut c = Conn::from_env();
    let mut vcpus = get_vcpus(&mut c);
    let mem = memfd(0x10000);
    nix::sys::uio::pwrite(&mem, GUEST, 0x1000).unwrap();
    assert_eq!(create_memory(&mut c, 1, &mem, 0, 0x10000), 0);
    assert_eq!(reserve(&mut c, AddressSpace::IOPORT, 0x3f8, 8, false), 0);
    assert_eq!(reserve(&mut c, AddressSpace::IOPORT, 0x501, 1, false), 0);
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    let v = &mut vcpus[0];
    init_vcpu(v);
    let mut out = Vec::new();
    loop {
        let r = v.recv();
        let io = r.wait().io();
        if io.address == 0x501 {
            break;
        }
        out.extend_from_slice(&io.data);
        let mut res = VcpuRequest::new();
        res.set_resume(Default::default());
        v.send(&res);
    }
    println!("guest said: {}", String::from_utf8_lossy(&out));
    assert_eq!(out, b"ok");
}

fn destroy(c: &mut Conn, id: u32) -> i32 {
    simple(c, |r| r.mut_destroy().id = id)
}

/// Bad requests get errnos, and the connection stays usable.
fn errnos() {
    const ENOENT: i32 = 2;
    const EBADF: i32 = 9;
    const EEXIST: i32 = 17;
    const EINVAL: i32 = 22;
    const ENOTTY: i32 = 25;
    const EPERM: i32 = 1;
    const EOVERFLOW: i32 = 75;
    const ESPIPE: i32 = 29;
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    // Unknown id.
    assert_eq!(destroy(&mut c, 77), ENOENT);
    // Overlapping reservations, including the reference's missed case.
    assert_eq!(reserve(&mut c, AddressSpace::IOPORT, 0x100, 0x10, false), 0);
    assert_eq!(
        reserve(&mut c, AddressSpace::IOPORT, 0x108, 1, false),
        EPERM
    );
    assert_eq!(
        reserve(&mut c, AddressSpace::IOPORT, 0xf1, 0x10, false),
        EPERM
    );
    assert_eq!(
        reserve(&mut c, AddressSpace::MMIO, u64::MAX - 1, 4, false),
        EINVAL
    );
    assert_eq!(
        reserve(&mut c, AddressSpace::IOPORT, 0x300, 0, false),
        ENOENT
    );
    // Memory without a descriptor, with two, with a bad one, unsealed.
    let mut r = MainRequest::new();
    r.mut_create().id = 1;
    r.mut_create().mut_memory().length = 0x1000;
    assert_eq!(c.call(&r, &[]).0.errno, EBADF);
    let mem = memfd(0x2000);
    assert_eq!(c.call(&r, &[mem.as_fd(), mem.as_fd()]).0.errno, EBADF);
    // A pipe cannot be sized (lseek fails: ESPIPE, passed through).
    let (rd, _wr) = nix::unistd::pipe().unwrap();
    assert_eq!(c.call(&r, &[rd.as_fd()]).0.errno, ESPIPE);
    // A regular file has no seals (F_GET_SEALS fails: EINVAL).
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    assert_eq!(c.call(&r, &[file.as_fd()]).0.errno, EINVAL);
    let unsealed =
        nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&unsealed, 0x1000).unwrap();
    assert_eq!(c.call(&r, &[unsealed.as_fd()]).0.errno, EPERM);
    // Too short, wrapping.
    assert_eq!(create_memory(&mut c, 1, &mem, 0, 0x3000), EINVAL);
    let mut r2 = r.clone();
    r2.mut_create().mut_memory().offset = u64::MAX - 0xfff;
    assert_eq!(c.call(&r2, &[mem.as_fd()]).0.errno, EOVERFLOW);
    // Reused id.
    assert_eq!(create_memory(&mut c, 1, &mem, 0, 0x1000), 0);
    assert_eq!(create_memory(&mut c, 1, &mem, 0x1000, 0x1000), EEXIST);
    // Overlapping memory slot (KVM refuses).
    assert_ne!(create_memory(&mut c, 2, &mem, 0, 0x1000), 0);
    assert_eq!(destroy(&mut c, 1), 0);
    assert_eq!(destroy(&mut c, 1), ENOENT);
    // Unknown request member.
    let (resp, _) = {
        framing::send_packet(c.sock.as_fd(), &[0xea, 0x04, 0x00], &[]).unwrap();
        let p = framing::recv_packet(c.sock.as_fd(), &mut c.buf, 4).unwrap();
        (
            MainResponse::parse_from_bytes(&c.buf[..p.len]).unwrap(),
            p.fds,
        )
    };
    assert_eq!(resp.errno, ENOTTY);
    // Start twice.
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), EINVAL);
    println!("errnos ok");
}

/// Crashes while the guest is stopped in an IO exit.
fn segv_in_io() {
    let mut c = Conn::from_env();
    let mut vcpus = get_vcpus(&mut c);
    let mem = memfd(0x10000);
    nix::sys::uio::pwrite(&mem, GUEST, 0x1000).unwrap();
    assert_eq!(create_memory(&mut c, 1, &mem, 0, 0x10000), 0);
    assert_eq!(reserve(&mut c, AddressSpace::IOPORT, 0x3f8, 8, false), 0);
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    init_vcpu(&mut vcpus[0]);
    let r = vcpus[0].recv();
    assert!(r.wait().has_io());
    eprintln!("rawplug: crashing in the middle of an IO exit");
    // Rust's runtime handles SIGSEGV itself (stack overflow detection); take
    // the default action so the process really dies of it.
    // SAFETY: restoring the default disposition of a signal is always sound.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGSEGV,
            nix::sys::signal::SigHandler::SigDfl,
        )
        .unwrap();
    }
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV).unwrap();
    unreachable!("SIGSEGV did not kill the plugin");
}

/// Starts the VM and exits without ever sending Wait (the reference host hung).
fn exit_after_start() {
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    std::thread::sleep(std::time::Duration::from_millis(100));
}

/// The vcpu's Init fails (a Resume with a malformed register image), so the
/// vcpu stops and the host shuts the VM down; the plugin ignores the
/// shutdown eventfd and hangs. The host must kill it after the grace period.
fn hang_after_shutdown() {
    let mut c = Conn::from_env();
    let mut vcpus = get_vcpus(&mut c);
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    let v = &mut vcpus[0];
    let mut w = VcpuRequest::new();
    w.set_wait(Default::default());
    v.send(&w);
    assert!(v.recv().wait().has_init());
    let mut res = VcpuRequest::new();
    res.mut_resume().regs = vec![0; 10];
    v.send(&res);
    eprintln!("rawplug: hanging and ignoring the shutdown eventfd");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn main() {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    match scenario.as_str() {
        "smoke" => smoke(),
        "errnos" => errnos(),
        "segv-in-io" => segv_in_io(),
        "exit-after-start" => exit_after_start(),
        "exit-early" => std::process::exit(3),
        "hang-after-shutdown" => hang_after_shutdown(),
        "close-and-linger" => {
            drop(Conn::from_env());
            eprintln!("rawplug: closed the socket, lingering");
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        other => {
            eprintln!("unknown scenario `{other}`");
            std::process::exit(2);
        }
    }
}
