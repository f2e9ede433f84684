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

    /// Sends raw bytes and waits for the reply; `Err` when the host dropped
    /// the connection (EOF) or anything else went wrong.
    fn try_raw(
        &mut self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(MainResponse, Vec<OwnedFd>), framing::FramingError> {
        framing::send_packet(self.sock.as_fd(), bytes, fds)?;
        let p = framing::recv_packet(self.sock.as_fd(), &mut self.buf, framing::SCM_MAX_FD)?;
        let r = MainResponse::parse_from_bytes(&self.buf[..p.len])
            .map_err(framing::FramingError::Decode)?;
        Ok((r, p.fds))
    }

    /// Opens another main connection.
    fn new_connection(&mut self) -> Conn {
        let mut r = MainRequest::new();
        r.set_new_connection(Default::default());
        let (resp, mut fds) = self.call(&r, &[]);
        assert_eq!(resp.errno, 0, "NewConnection failed");
        assert_eq!(fds.len(), 1, "NewConnection reply without its descriptor");
        Conn {
            sock: fds.remove(0),
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

// ---------------------------------------------------------------------------
// Hostile scenarios (tests/tests/faults.rs).

const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const E2BIG: i32 = 7;
const EBADF: i32 = 9;
const EEXIST: i32 = 17;
const EINVAL: i32 = 22;
const ENOTTY: i32 = 25;
const ESPIPE: i32 = 29;
const EPROTO: i32 = 71;
const ENOMEM: i32 = 12;
const EOVERFLOW: i32 = 75;

/// The host process (our parent: the plugin is started unjailed).
fn host_pid() -> i32 {
    nix::unistd::getppid().as_raw()
}

/// Open descriptors of the host.
fn host_fds() -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", host_pid()))
        .expect("read the host's fd directory")
        .count()
}

/// A `kB` field of the host's /proc status.
fn host_status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", host_pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in the host's status"))
}

fn memfd_with(size: u64, seals: nix::fcntl::SealFlag) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(
        c"guest",
        nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING | nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .unwrap();
    nix::unistd::ftruncate(&fd, size as i64).unwrap();
    if !seals.is_empty() {
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_ADD_SEALS(seals)).unwrap();
    }
    fd
}

fn memory_request(id: u32, offset: u64, start: u64, length: u64, read_only: bool) -> MainRequest {
    let mut r = MainRequest::new();
    let c = r.mut_create();
    c.id = id;
    let m = c.mut_memory();
    m.offset = offset;
    m.start = start;
    m.length = length;
    m.read_only = read_only;
    r
}

fn errno_of(c: &mut Conn, r: &MainRequest, fds: &[BorrowedFd<'_>]) -> i32 {
    c.call(r, fds).0.errno
}

/// Gets the VM's vcpus and exits 0 without starting it.
fn exit_before_start() {
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    println!("leaving before Start");
}

/// Undecodable packets make the host drop that connection (no reply); the
/// other connections, and the VM, are unaffected.
fn malformed() {
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    let cut = {
        let mut b = memory_request(1, 0, 0, 0x1000, false)
            .write_to_bytes()
            .unwrap();
        b.truncate(b.len() - 3);
        b
    };
    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "a truncated length-delimited field",
            vec![0x0a, 0xff, 0xff, 0xff],
        ),
        ("a request cut short", cut),
        ("a key cut short", vec![0x8a]),
        ("wire type 7", vec![0x0f, 0x00]),
        ("wire type 6", vec![0x0e, 0x00]),
        (
            "an 11-byte varint",
            vec![0x08; 1]
                .into_iter()
                .chain([0xff; 10])
                .chain([0x01])
                .collect(),
        ),
        ("an unterminated group", vec![0x0b]),
        (
            "a nested length beyond its parent",
            vec![0x0a, 0x03, 0x1a, 0x09, 0x08],
        ),
        (
            "a huge length claim",
            vec![0x62, 0x05, 0x0a, 0xff, 0xac, 0xe2, 0x04],
        ),
    ];
    for (what, bytes) in &bad {
        // A fresh connection each time: the host drops it.
        let mut c2 = c.new_connection();
        // The new connection is an ordinary blocking socket that works.
        let mut r = MainRequest::new();
        r.set_get_shutdown_eventfd(Default::default());
        let (resp, fds) = c2
            .try_raw(&r.write_to_bytes().unwrap(), &[])
            .unwrap_or_else(|e| panic!("a fresh connection fails: {e}"));
        assert_eq!((resp.errno, fds.len()), (0, 1));
        match c2.try_raw(bytes, &[]) {
            Err(framing::FramingError::Closed) => {}
            other => panic!("{what}: expected the connection to be dropped, got {other:?}"),
        }
    }
    // A known member with the wrong wire type is an unknown field (protobuf
    // rules): the request has no member.
    let (resp, _) = c.try_raw(&[0x08, 0x01], &[]).expect("wrong wire type");
    assert_eq!(resp.errno, ENOTTY);
    // A zero-length packet carrying a descriptor is a request with no member.
    let mem = memfd(0x1000);
    let (resp, fds) = c.try_raw(&[], &[mem.as_fd()]).expect("empty packet");
    assert_eq!((resp.errno, fds.len()), (ENOTTY, 0));
    // An unknown member is ENOTTY, and the connection stays.
    let (resp, _) = c.try_raw(&[0xea, 0x04, 0x00], &[]).expect("unknown member");
    assert_eq!(resp.errno, ENOTTY);
    assert_eq!(
        simple(&mut c, |r| r.set_get_shutdown_eventfd(Default::default())),
        0
    );
    println!(
        "malformed ok: {} bad packets, connections dropped",
        bad.len()
    );
}

/// Requests at the size limit are served; one byte more drops the
/// connection. Lists over their limits get E2BIG.
fn oversized() {
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    let mut big = c.new_connection();
    nix::sys::socket::setsockopt(&big.sock, nix::sys::socket::sockopt::SndBuf, &(1 << 20)).unwrap();
    // CheckExtension padded with an unknown bytes field up to the limit.
    let limit = framing::MAX_MESSAGE_SIZE;
    let mut r = MainRequest::new();
    r.mut_check_extension().extension = 1;
    let head = r.write_to_bytes().unwrap();
    let pad_len = limit - head.len() - 1 - 3; // key byte + 3-byte length
    let mut packet = head.clone();
    packet.push(0xfa); // field 31, length-delimited (unknown to the host)
    packet.extend_from_slice(&[
        (pad_len as u8) | 0x80,
        ((pad_len >> 7) as u8) | 0x80,
        (pad_len >> 14) as u8,
    ]);
    packet.resize(limit, 0x55);
    let (resp, _) = big
        .try_raw(&packet, &[])
        .expect("a request of exactly the limit");
    assert_eq!(resp.errno, 0);
    packet.push(0);
    match big.try_raw(&packet, &[]) {
        Err(framing::FramingError::Closed) => {}
        other => panic!("one byte over the limit: {other:?}"),
    }
    // Over-long lists.
    let mut r = MainRequest::new();
    for i in 0..4097u32 {
        let mut route = main_request::set_irq_routing::Route::new();
        route.irq_id = i % 24;
        route.mut_irqchip().irqchip = 2;
        route.mut_irqchip().pin = i % 24;
        r.mut_set_irq_routing().routes.push(route);
    }
    assert_eq!(errno_of(&mut c, &r, &[]), E2BIG);
    let mut r = MainRequest::new();
    r.mut_set_call_hint().address = 0x3f8;
    r.mut_set_call_hint().hints = vec![Default::default(); 257];
    assert_eq!(errno_of(&mut c, &r, &[]), E2BIG);
    // Within the limits they work.
    r.mut_set_call_hint().hints.truncate(256);
    assert_eq!(errno_of(&mut c, &r, &[]), 0);
    println!("oversized ok");
}

/// Every wrong descriptor where a memfd is expected gets an errno, and the
/// host keeps none of them.
fn bad_fds() {
    use nix::fcntl::SealFlag;
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    // Warm up: the first memory slot makes KVM allocate its own state.
    let warm = memfd(0x1000);
    assert_eq!(
        errno_of(
            &mut c,
            &memory_request(99, 0, 0x100000, 0x1000, false),
            &[warm.as_fd()]
        ),
        0
    );
    assert_eq!(destroy(&mut c, 99), 0);
    let before = host_fds();
    let req = memory_request(1, 0, 0, 0x2000, false);
    let sealed = memfd(0x2000);
    let short = memfd(0x1000);
    let unsealed = memfd_with(0x2000, SealFlag::empty());
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let (sock, _sock2) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::empty(),
    )
    .unwrap();
    let efd = nix::sys::eventfd::EventFd::new().unwrap();
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let many: Vec<OwnedFd> = (0..10).map(|_| memfd(0x2000)).collect();
    let many_b: Vec<BorrowedFd<'_>> = many.iter().map(|f| f.as_fd()).collect();
    let cases: Vec<(&str, Vec<BorrowedFd<'_>>, i32)> = vec![
        ("no descriptor", vec![], EBADF),
        (
            "two descriptors",
            vec![sealed.as_fd(), sealed.as_fd()],
            EBADF,
        ),
        ("ten descriptors", many_b.clone(), EBADF),
        ("a pipe", vec![pipe_r.as_fd()], ESPIPE),
        ("a socket", vec![sock.as_fd()], ESPIPE),
        // lseek on an eventfd: ESPIPE or EINVAL depending on the kernel.
        ("an eventfd", vec![efd.as_fd()], -1),
        ("a regular file", vec![file.as_fd()], EINVAL),
        ("/dev/null", vec![null.as_fd()], EINVAL),
        ("an unsealed memfd", vec![unsealed.as_fd()], EPERM),
        (
            "a memfd shorter than the range",
            vec![short.as_fd()],
            EINVAL,
        ),
    ];
    for (what, fds, want) in &cases {
        let got = errno_of(&mut c, &req, fds);
        if *want == -1 {
            assert!(got == ESPIPE || got == EINVAL, "{what}: {got}");
        } else {
            assert_eq!(got, *want, "{what}");
        }
    }
    let ranges: Vec<(&str, MainRequest, i32)> = vec![
        ("zero length", memory_request(1, 0, 0, 0, false), EINVAL),
        (
            "offset + length wraps",
            memory_request(1, u64::MAX - 0xfff, 0, 0x2000, false),
            EOVERFLOW,
        ),
        (
            "start + length wraps",
            memory_request(1, 0, u64::MAX - 0xfff, 0x2000, false),
            EOVERFLOW,
        ),
        (
            "unaligned start",
            memory_request(1, 0, 0x800, 0x1000, false),
            EINVAL,
        ),
        (
            "unaligned length",
            memory_request(1, 0, 0, 0x1800, false),
            EINVAL,
        ),
        (
            "unaligned offset",
            memory_request(1, 0x800, 0, 0x1000, false),
            EINVAL,
        ),
        (
            "offset past the end",
            memory_request(1, 0x2000, 0, 0x1000, false),
            EINVAL,
        ),
    ];
    for (what, r, want) in &ranges {
        assert_eq!(errno_of(&mut c, r, &[sealed.as_fd()]), *want, "{what}");
    }
    // A write-sealed memfd can back read-only memory only.
    let ro = memfd_with(0x2000, SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_WRITE);
    assert_eq!(
        errno_of(
            &mut c,
            &memory_request(1, 0, 0, 0x2000, false),
            &[ro.as_fd()]
        ),
        EPERM
    );
    assert_eq!(
        errno_of(
            &mut c,
            &memory_request(1, 0, 0, 0x2000, true),
            &[ro.as_fd()]
        ),
        0
    );
    // Descriptors attached to requests that take none are closed.
    let mut r = MainRequest::new();
    r.set_get_shutdown_eventfd(Default::default());
    let (resp, fds) = c.call(&r, &[sealed.as_fd()]);
    assert_eq!(resp.errno, 0);
    drop(fds);
    assert_eq!(destroy(&mut c, 1), 0);
    let after = host_fds();
    assert_eq!(before, after, "the host kept descriptors it was sent");
    println!(
        "bad fds ok: {} cases, host fds {before} -> {after}",
        cases.len() + ranges.len() + 1
    );
}

fn io_event(
    c: &mut Conn,
    id: u32,
    space: AddressSpace,
    addr: u64,
    len: u32,
    datamatch: u64,
) -> i32 {
    let mut r = MainRequest::new();
    let cr = r.mut_create();
    cr.id = id;
    let io = cr.mut_io_event();
    io.space = space.into();
    io.address = addr;
    io.length = len;
    io.datamatch = datamatch;
    c.call(&r, &[]).0.errno
}

/// Zero-length, wrapping and overlapping ranges; reused and unknown ids.
fn ranges_and_ids() {
    use AddressSpace::{IOPORT, MMIO};
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    // Reservations.
    assert_eq!(reserve(&mut c, IOPORT, 0x10, 0, false), ENOENT); // nothing to unreserve
    assert_eq!(reserve(&mut c, IOPORT, 0x10, 0x10, false), 0);
    for (start, len) in [
        (0x0f, 0x10),
        (0x10, 0x10),
        (0x10, 0x15),
        (0x12, 0x15),
        (0x12, 1),
        (0, 0x20),
        (0x1f, 1),
        (0x01, 0x10),
    ] {
        assert_eq!(
            reserve(&mut c, IOPORT, start, len, false),
            EPERM,
            "{start:#x}+{len:#x}"
        );
    }
    assert_eq!(reserve(&mut c, IOPORT, 0x20, 5, true), 0);
    assert_eq!(reserve(&mut c, IOPORT, 0, 0x10, false), 0);
    assert_eq!(reserve(&mut c, MMIO, 0x10, 0x10, false), 0); // spaces are independent
    assert_eq!(reserve(&mut c, MMIO, u64::MAX, 2, false), EINVAL);
    assert_eq!(reserve(&mut c, MMIO, u64::MAX - 1, u64::MAX, false), EINVAL);
    // [MAX, MAX] itself: its end (start + length) overflows, so EINVAL too.
    assert_eq!(reserve(&mut c, MMIO, u64::MAX, 1, false), EINVAL);
    assert_eq!(reserve(&mut c, MMIO, u64::MAX - 1, 1, false), 0);
    assert_eq!(reserve(&mut c, IOPORT, 0x11, 0, false), ENOENT); // not a range start
    assert_eq!(reserve(&mut c, IOPORT, 0x10, 0, false), 0);
    assert_eq!(reserve(&mut c, IOPORT, 0x10, 0, false), ENOENT);
    assert_eq!(reserve(&mut c, IOPORT, 0x10, 0x10, false), 0);
    let mut r = MainRequest::new();
    r.mut_reserve_range().space = plugin_proto::protobuf::EnumOrUnknown::from_i32(2);
    r.mut_reserve_range().length = 1;
    assert_eq!(errno_of(&mut c, &r, &[]), EINVAL);
    // Io events.
    assert_eq!(io_event(&mut c, 1, IOPORT, 0x400, 3, 0), EINVAL);
    assert_eq!(io_event(&mut c, 1, IOPORT, 0x400, 1, 0x1ff), 0);
    assert_eq!(io_event(&mut c, 2, IOPORT, 0x400, 1, 0xff), EEXIST); // KVM: same match
    assert_eq!(io_event(&mut c, 2, MMIO, u64::MAX - 3, 8, 0), EINVAL); // wraps
                                                                       // Ids: shared by all kinds, reuse refused, unknown ones ENOENT.
    assert_eq!(io_event(&mut c, 1, IOPORT, 0x500, 0, 0), EEXIST);
    let mem = memfd(0x4000);
    assert_eq!(create_memory(&mut c, 1, &mem, 0, 0x1000), EEXIST);
    assert_eq!(create_memory(&mut c, u32::MAX, &mem, 0, 0x2000), 0);
    assert_eq!(create_memory(&mut c, 3, &mem, 0x1000, 0x1000), libc::EEXIST); // overlaps (KVM)
    assert_eq!(create_memory(&mut c, 3, &mem, 0x2000, 0x2000), 0); // adjacent
    let mut r = MainRequest::new();
    r.mut_create().id = 4;
    assert_eq!(errno_of(&mut c, &r, &[]), ENOTTY); // no constructor
    let mut r = MainRequest::new();
    r.mut_dirty_log().id = 1;
    assert_eq!(errno_of(&mut c, &r, &[]), ENOENT); // not memory
    r.mut_dirty_log().id = 3;
    assert_eq!(errno_of(&mut c, &r, &[]), ENOENT); // no dirty logging (KVM)
    r.mut_dirty_log().id = 77;
    assert_eq!(errno_of(&mut c, &r, &[]), ENOENT);
    for id in [1, u32::MAX, 3] {
        assert_eq!(destroy(&mut c, id), 0);
        assert_eq!(destroy(&mut c, id), ENOENT);
    }
    assert_eq!(destroy(&mut c, 12345), ENOENT);
    // After destroy the id and the range are free again.
    assert_eq!(create_memory(&mut c, 1, &mem, 0x1000, 0x1000), 0);
    assert_eq!(destroy(&mut c, 1), 0);
    // Dirty logging: the bitmap bounds the region (6 GiB); without it a
    // large (sparse, never touched) region is fine.
    let big = memfd(64 << 30);
    let mut r = memory_request(5, 0, 1 << 40, 64 << 30, false);
    r.mut_create().mut_memory().dirty_log = true;
    assert_eq!(errno_of(&mut c, &r, &[big.as_fd()]), E2BIG);
    r.mut_create().mut_memory().length = 6 << 30;
    assert_eq!(errno_of(&mut c, &r, &[big.as_fd()]), 0);
    let mut d = MainRequest::new();
    d.mut_dirty_log().id = 5;
    let (resp, _) = c.call(&d, &[]);
    assert_eq!(
        (resp.errno, resp.dirty_log().bitmap.len()),
        (0, 6 << 30 >> 15)
    );
    assert_eq!(destroy(&mut c, 5), 0);
    // Without dirty logging a large region is fine within the guest
    // memory bound (default: the host's RAM; tested in hostile.rs).
    let r = memory_request(5, 0, 1 << 40, 4 << 30, false);
    assert_eq!(errno_of(&mut c, &r, &[big.as_fd()]), 0);
    assert_eq!(destroy(&mut c, 5), 0);
    println!("ranges and ids ok");
}

/// Requests only valid before Start, sent after it.
fn after_start() {
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    let mut c2 = c.new_connection();
    assert_eq!(
        simple(&mut c, |r| r.mut_set_identity_map_addr().address =
            0xfffbc000),
        0
    );
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    assert_eq!(
        simple(&mut c, |r| r.mut_set_identity_map_addr().address =
            0xfffbc000),
        EINVAL
    );
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), EINVAL);
    // On another connection too.
    assert_eq!(simple(&mut c2, |r| r.set_start(Default::default())), EINVAL);
    assert_eq!(
        simple(&mut c2, |r| r.mut_set_identity_map_addr().address = 0),
        EINVAL
    );
    println!("after start ok");
}

/// Real-mode guest for `vcpu-misuse`: three 4-byte port reads echoed to
/// 0x3f8, a write to 0x61 and one to 0x62, then the done port 0x501.
const MISUSE_GUEST: &[u8] = &[
    0x66, 0xb8, 0xff, 0xff, 0xff, 0xff, // mov eax, 0xffffffff
    0xba, 0x60, 0x00, // mov dx, 0x60
    0x66, 0xed, // in eax, dx
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x66, 0xef, // out dx, eax
    0x66, 0xb8, 0xff, 0xff, 0xff, 0xff, // mov eax, 0xffffffff
    0xba, 0x60, 0x00, // mov dx, 0x60
    0x66, 0xed, // in eax, dx
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x66, 0xef, // out dx, eax
    0x66, 0xb8, 0xff, 0xff, 0xff, 0xff, // mov eax, 0xffffffff
    0xba, 0x60, 0x00, // mov dx, 0x60
    0x66, 0xed, // in eax, dx
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x66, 0xef, // out dx, eax
    0xba, 0x61, 0x00, // mov dx, 0x61
    0xee, // out dx, al
    0xba, 0x62, 0x00, // mov dx, 0x62
    0xee, // out dx, al
    0xba, 0x01, 0x05, // mov dx, 0x501
    0xee, // out dx, al
    0xf4, // hlt
];

fn vcpu_call(v: &mut VcpuChan, f: impl FnOnce(&mut VcpuRequest)) -> VcpuResponse {
    let mut r = VcpuRequest::new();
    f(&mut r);
    v.send(&r);
    v.recv()
}

fn resume_with(v: &mut VcpuChan, f: impl FnOnce(&mut vcpu_request::Resume)) {
    let mut r = VcpuRequest::new();
    f(r.mut_resume());
    v.send(&r);
}

fn next_io(v: &mut VcpuChan) -> vcpu_response::wait::Io {
    let r = v.recv();
    assert!(r.wait().has_io(), "expected an io exit, got {r:?}");
    r.wait().io().clone()
}

/// Vcpu requests out of order and resume data of the wrong length.
fn vcpu_misuse() {
    let mut c = Conn::from_env();
    let mut vcpus = get_vcpus(&mut c);
    let mem = memfd(0x10000);
    nix::sys::uio::pwrite(&mem, MISUSE_GUEST, 0x1000).unwrap();
    assert_eq!(create_memory(&mut c, 1, &mem, 0, 0x10000), 0);
    for port in [0x60, 0x61, 0x62, 0x3f8, 0x501] {
        assert_eq!(reserve(&mut c, AddressSpace::IOPORT, port, 1, false), 0);
    }
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    let v = &mut vcpus[0];
    // Before the first Wait: everything else is EPROTO, Init stays pending.
    for (what, f) in [
        (
            "resume",
            Box::new(|r: &mut VcpuRequest| r.set_resume(Default::default()))
                as Box<dyn Fn(&mut VcpuRequest)>,
        ),
        (
            "shutdown",
            Box::new(|r: &mut VcpuRequest| r.set_shutdown(Default::default())),
        ),
        (
            "get_state",
            Box::new(|r: &mut VcpuRequest| {
                r.mut_get_state().set = vcpu_request::StateSet::REGS.into()
            }),
        ),
    ] {
        let r = vcpu_call(v, |r| f(r));
        assert_eq!(r.errno, EPROTO, "{what} before Wait");
        assert!(r.message.is_none());
    }
    let r = vcpu_call(v, |r| r.set_wait(Default::default()));
    assert!(r.wait().has_init());
    // A second Wait has nothing to wait for.
    assert_eq!(
        vcpu_call(v, |r| r.set_wait(Default::default())).errno,
        EPROTO
    );
    // An unknown member (an empty request cannot travel: a 0-byte pipe
    // write is a no-op).
    framing::write_all_once(v.req.as_fd(), &[0xea, 0x04, 0x00]).unwrap();
    assert_eq!(v.recv().errno, ENOTTY);
    assert_eq!(
        vcpu_call(v, |r| r.mut_get_state().set =
            plugin_proto::protobuf::EnumOrUnknown::from_i32(99))
        .errno,
        EINVAL
    );
    assert_eq!(
        vcpu_call(v, |r| {
            r.mut_set_state().set = vcpu_request::StateSet::REGS.into();
            r.mut_set_state().state = vec![0; 100];
        })
        .errno,
        EINVAL
    );
    assert_eq!(
        vcpu_call(v, |r| r.mut_get_msrs().entry_indices = vec![0x10; 257]).errno,
        E2BIG
    );
    assert_eq!(
        vcpu_call(v, |r| r.mut_set_cpuid().entries =
            vec![Default::default(); 257])
        .errno,
        E2BIG
    );
    assert_eq!(
        vcpu_call(v, |r| r.mut_enable_capability().capability = 5).errno,
        EINVAL
    );
    // Set up real mode and go.
    let r = vcpu_call(v, |r| {
        r.mut_get_state().set = vcpu_request::StateSet::SREGS.into()
    });
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
    resume_with(v, |rs| {
        rs.regs = regs.as_bytes().to_vec();
        rs.sregs = sregs.as_bytes().to_vec();
    });
    // Three reads answered short, empty and long.
    let mut echoed = Vec::new();
    for reply in [vec![0x41u8], vec![], vec![1, 2, 3, 4, 5, 6, 7, 8, 9]] {
        let io = next_io(v);
        assert_eq!((io.address, io.is_write, io.data.len()), (0x60, false, 4));
        resume_with(v, |rs| rs.data = reply);
        let io = next_io(v);
        assert_eq!(io.address, 0x3f8);
        echoed.push(u32::from_le_bytes(io.data[..4].try_into().unwrap()));
        resume_with(v, |_| {});
    }
    assert_eq!(
        echoed,
        vec![0x41, 0, 0x0403_0201],
        "short reads must read as zeros"
    );
    // A bad register image in Resume: servicing fails, the guest goes on.
    let io = next_io(v);
    assert_eq!(io.address, 0x61);
    resume_with(v, |rs| rs.regs = vec![0; 10]);
    // Garbage, then an oversized packed claim: undecodable, the guest goes on.
    let io = next_io(v);
    assert_eq!(io.address, 0x62);
    framing::write_all_once(v.req.as_fd(), &[0xff, 0xff, 0xff]).unwrap();
    let io = next_io(v);
    assert_eq!(io.address, 0x501);
    println!("vcpu misuse ok: echoed {echoed:x?}");
}

/// Makes the VM shut down (failed Init), ignores every polite signal, forks
/// a child that hangs too, and hangs. The host must SIGKILL both.
fn hang_ignoring_signals() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: ignoring a signal installs no handler code.
        unsafe { signal(s, SigHandler::SigIgn) }.unwrap();
    }
    // SAFETY: the child only sleeps (async-signal-safe) until killed.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        nix::unistd::ForkResult::Parent { .. } => {}
    }
    hang_after_shutdown();
}

/// Floods the main loop: four connections hammer it concurrently with
/// 5,000 requests each (strict request/reply), and a fifth keeps up to 64
/// requests in flight (not allowed by the protocol, but within what the
/// socket queues hold). Every request is answered, in order.
fn flood_main() {
    const PER_CONN: usize = 5_000;
    const WINDOW: usize = 64;
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    let request = |i: usize| {
        let mut r = MainRequest::new();
        // Alternate a request that works and one that fails.
        if i.is_multiple_of(2) {
            r.mut_check_extension().extension = i as u32;
        } else {
            r.mut_destroy().id = 1_000_000 + i as u32;
        }
        r
    };
    let expected = |i: usize| if i.is_multiple_of(2) { 0 } else { ENOENT };
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut conn = c.new_connection();
        workers.push(std::thread::spawn(move || {
            for i in 0..PER_CONN {
                let (r, _) = conn.call(&request(i), &[]);
                assert_eq!(r.errno, expected(i), "reply {i}");
            }
        }));
    }
    let pipelined = c.new_connection();
    let writer_sock = pipelined.sock.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(WINDOW);
    let writer = std::thread::spawn(move || {
        let mut scratch = Vec::new();
        for i in 0..PER_CONN {
            tx.send(()).unwrap();
            framing::send_message(writer_sock.as_fd(), &request(i), &[], &mut scratch)
                .expect("pipelined send");
        }
    });
    let mut buf = vec![0; framing::MAX_MESSAGE_SIZE];
    for i in 0..PER_CONN {
        let p = framing::recv_packet(pipelined.sock.as_fd(), &mut buf, 4).expect("pipelined recv");
        let r = MainResponse::parse_from_bytes(&buf[..p.len]).unwrap();
        assert_eq!(r.errno, expected(i), "pipelined reply {i}");
        rx.recv().unwrap();
    }
    writer.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        simple(&mut c, |r| r.set_get_shutdown_eventfd(Default::default())),
        0
    );
    println!("flood main ok: {} requests answered", 5 * PER_CONN);
}

/// Floods a vcpu request pipe (during Init and after) without ever reading
/// the responses, checks the main loop still answers, then exits 0.
fn flood_vcpu() {
    let mut c = Conn::from_env();
    let mut vcpus = get_vcpus(&mut c);
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    let v = vcpus.remove(0);
    let req = v.req;
    let flooder = std::thread::spawn(move || {
        let mut scratch = Vec::new();
        let mut r = VcpuRequest::new();
        r.set_wait(Default::default());
        let _ = framing::write_vcpu_request(req.as_fd(), &r, &mut scratch);
        let mut g = VcpuRequest::new();
        g.mut_get_state().set = vcpu_request::StateSet::LAPIC.into();
        // Blocks once both pipes are full; the process exit ends it.
        for _ in 0..1_000_000 {
            if framing::write_vcpu_request(req.as_fd(), &g, &mut scratch).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    for _ in 0..100 {
        assert_eq!(
            simple(&mut c, |r| r.set_get_shutdown_eventfd(Default::default())),
            0
        );
    }
    assert!(
        !flooder.is_finished(),
        "the flood should be blocked on full pipes"
    );
    println!("flood vcpu ok: main loop responsive while the vcpu channel is jammed");
    std::process::exit(0);
}

/// Sends requests on a second connection and never reads a reply: the host
/// must drop that connection rather than block, and keep serving.
fn never_read() {
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    let c2 = c.new_connection();
    let mut scratch = Vec::new();
    let mut r = MainRequest::new();
    r.mut_check_extension().extension = 1;
    let mut sent = 0;
    for _ in 0..1_000_000 {
        match framing::send_message(c2.sock.as_fd(), &r, &[], &mut scratch) {
            Ok(()) => sent += 1,
            Err(_) => break, // the host dropped the connection
        }
    }
    assert!(sent < 1_000_000, "the host never dropped the connection");
    // The dropped connection reads its queued replies, then EOF.
    let mut buf = vec![0; framing::MAX_MESSAGE_SIZE];
    let mut replies = 0;
    loop {
        match framing::recv_packet(c2.sock.as_fd(), &mut buf, 4) {
            Ok(_) => replies += 1,
            Err(framing::FramingError::Closed) => break,
            Err(e) => panic!("after the drop: {e}"),
        }
    }
    assert!(replies < sent);
    assert_eq!(
        simple(&mut c, |r| r.set_get_shutdown_eventfd(Default::default())),
        0
    );
    println!("never read ok: dropped after {sent} requests, {replies} replies queued");
}

/// Host resources before/after many create/destroy cycles.
struct HostUsage {
    fds: usize,
    rss_kb: u64,
    vm_kb: u64,
}

fn host_usage() -> HostUsage {
    HostUsage {
        fds: host_fds(),
        rss_kb: host_status_kb("VmRSS:"),
        vm_kb: host_status_kb("VmSize:"),
    }
}

/// `leaks CYCLES CONNECTIONS`: create/destroy every object kind CYCLES times
/// and open/close CONNECTIONS connections; report the host's usage.
fn leaks() {
    let args: Vec<String> = std::env::args().collect();
    let cycles: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let conns: u32 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let mut c = Conn::from_env();
    let _vcpus = get_vcpus(&mut c);
    let mem = memfd(0x10000);
    let cycle = |c: &mut Conn, i: u32| {
        assert_eq!(
            create_memory(c, 1, &mem, 0x10_0000, 0x10000),
            0,
            "memory {i}"
        );
        assert_eq!(destroy(c, 1), 0);
        let mut r = MainRequest::new();
        let io = r.mut_create();
        io.id = 2;
        io.mut_io_event().address = 0x600;
        io.mut_io_event().length = 1;
        let (resp, fds) = c.call(&r, &[]);
        assert_eq!((resp.errno, fds.len()), (0, 1), "io_event {i}");
        drop(fds);
        assert_eq!(destroy(c, 2), 0);
        let mut r = MainRequest::new();
        let irq = r.mut_create();
        irq.id = 3;
        irq.mut_irq_event().irq_id = 5;
        irq.mut_irq_event().resample = true;
        let (resp, fds) = c.call(&r, &[]);
        assert_eq!((resp.errno, fds.len()), (0, 2), "irq_event {i}");
        drop(fds);
        assert_eq!(destroy(c, 3), 0);
    };
    // Warm up allocators and KVM's own structures.
    for i in 0..200 {
        cycle(&mut c, i);
    }
    let before = host_usage();
    for i in 0..cycles {
        cycle(&mut c, i);
    }
    for _ in 0..conns {
        let mut c2 = c.new_connection();
        assert_eq!(
            simple(&mut c2, |r| r.mut_check_extension().extension = 1),
            0
        );
    }
    // The host notices closed connections asynchronously: wait until its
    // descriptor count settles (bounded).
    let mut after = host_usage();
    for _ in 0..500 {
        if after.fds <= before.fds {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert_eq!(simple(&mut c, |r| r.mut_check_extension().extension = 1), 0);
        after = host_usage();
    }
    println!(
        "leaks: cycles={cycles} connections={conns} fds {}->{} rss_kb {}->{} vm_kb {}->{}",
        before.fds, after.fds, before.rss_kb, after.rss_kb, before.vm_kb, after.vm_kb
    );
}

/// 32-bit guest for `hypercall`: sets the Hyper-V guest OS id, makes two
/// `HVCALL_POST_MESSAGE` hypercalls (KVM hands them to userspace when SynIC
/// is active), and writes each result (EAX, then EDX) to port 0x3f8; then
/// the done port 0x501. `$HCALL` is patched with vmcall or vmmcall.
fn hypercall_guest(amd: bool) -> Vec<u8> {
    let hcall: &[u8] = if amd {
        &[0x0f, 0x01, 0xd9]
    } else {
        &[0x0f, 0x01, 0xc1]
    };
    let mut g = vec![
        0xb9, 0x00, 0x00, 0x00, 0x40, // mov ecx, 0x40000000 (HV_X64_MSR_GUEST_OS_ID)
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x31, 0xd2, // xor edx, edx
        0x0f, 0x30, // wrmsr
    ];
    for _ in 0..2 {
        g.extend_from_slice(&[
            0xb8, 0x5c, 0x00, 0x00, 0x00, // mov eax, 0x5c (HVCALL_POST_MESSAGE)
            0x31, 0xd2, // xor edx, edx
            0x31, 0xdb, // xor ebx, ebx
            0xb9, 0x00, 0x20, 0x00, 0x00, // mov ecx, 0x2000 (input page)
            0x31, 0xff, // xor edi, edi
            0x31, 0xf6, // xor esi, esi
        ]);
        g.extend_from_slice(hcall);
        g.extend_from_slice(&[
            0x89, 0xd3, // mov ebx, edx
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xef, // out dx, eax
            0x89, 0xd8, // mov eax, ebx
            0xef, // out dx, eax
        ]);
    }
    g.extend_from_slice(&[
        0x66, 0xba, 0x01, 0x05, // mov dx, 0x501
        0xee, // out dx, al
        0xf4, // hlt
    ]);
    g
}

/// Flat 32-bit protected mode (segment caches set directly, no GDT needed).
fn flat_protected_mode(sregs: &mut kvm_bindings::kvm_sregs) {
    let seg = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x8, 0xb);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = seg(0x10, 0x3);
    }
    sregs.cr0 |= 1;
}

/// Hyper-V hypercall exits with resume data of the right and the wrong
/// length: 8 bytes are the result, anything else reads as 0.
fn hypercall() {
    let amd = {
        let r = std::arch::x86_64::__cpuid(0);
        r.ebx == u32::from_le_bytes(*b"Auth")
    };
    let mut c = Conn::from_env();
    let mut vcpus = get_vcpus(&mut c);
    let mem = memfd(0x10000);
    nix::sys::uio::pwrite(&mem, &hypercall_guest(amd), 0x1000).unwrap();
    assert_eq!(create_memory(&mut c, 1, &mem, 0, 0x10000), 0);
    assert_eq!(reserve(&mut c, AddressSpace::IOPORT, 0x3f8, 1, false), 0);
    assert_eq!(reserve(&mut c, AddressSpace::IOPORT, 0x501, 1, false), 0);
    let mut r = MainRequest::new();
    r.set_get_supported_cpuid(Default::default());
    let (resp, _) = c.call(&r, &[]);
    assert_eq!(resp.errno, 0);
    let mut cpuid = resp.get_supported_cpuid().entries.clone();
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    let v = &mut vcpus[0];
    assert!(vcpu_call(v, |r| r.set_wait(Default::default()))
        .wait()
        .has_init());
    // Hyper-V leaves (signature "Hv#1") make KVM treat the guest as Hyper-V.
    let hv = vcpu_call(v, |r| r.set_get_hyperv_cpuid(Default::default()));
    if hv.errno != 0 {
        println!(
            "hypercall skipped: no Hyper-V emulation (errno {})",
            hv.errno
        );
        std::process::exit(0);
    }
    cpuid.retain(|e| e.function < 0x4000_0000 || e.function >= 0x5000_0000);
    cpuid.extend(hv.get_hyperv_cpuid().entries.iter().cloned());
    cpuid.truncate(256);
    let r = vcpu_call(v, |r| r.mut_set_cpuid().entries = cpuid);
    assert_eq!(r.errno, 0, "SetCpuid");
    let r = vcpu_call(v, |r| r.mut_enable_capability().capability = 123);
    assert_eq!(r.errno, 0, "enabling SynIC");
    let r = vcpu_call(v, |r| {
        r.mut_get_state().set = vcpu_request::StateSet::SREGS.into()
    });
    let mut sregs =
        <kvm_bindings::kvm_sregs as zerocopy::FromBytes>::read_from_bytes(&r.get_state().state)
            .unwrap();
    flat_protected_mode(&mut sregs);
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    resume_with(v, |rs| {
        rs.regs = regs.as_bytes().to_vec();
        rs.sregs = sregs.as_bytes().to_vec();
    });
    let mut results = Vec::new();
    for data in [
        0x1122_3344_5566_7788u64.to_le_bytes().to_vec(),
        vec![0xff; 3],
    ] {
        let w = v.recv();
        assert!(
            w.wait().has_hyperv_call(),
            "expected a hypercall, got {w:?}"
        );
        assert_eq!(w.wait().hyperv_call().input & 0xffff, 0x5c);
        assert_eq!(w.wait().hyperv_call().params0, 0x2000);
        resume_with(v, |rs| rs.data = data);
        let mut halves = Vec::new();
        for _ in 0..2 {
            let io = next_io(v);
            assert_eq!(io.address, 0x3f8);
            halves.push(u32::from_le_bytes(io.data[..4].try_into().unwrap()));
            resume_with(v, |_| {});
        }
        results.push(u64::from(halves[1]) << 32 | u64::from(halves[0]));
    }
    assert_eq!(next_io(v).address, 0x501);
    assert_eq!(
        results,
        vec![0x1122_3344_5566_7788, 0],
        "wrong-length result must read as 0"
    );
    println!("hypercall ok: results {results:x?}");
}

/// Starts the VM, closes every main connection, lets the guest triple-fault
/// (a `ud2` with no IDT in protected mode: the vcpu stops, the VM shuts
/// down), and lingers ignoring the shutdown eventfd: the host must still
/// end it after the grace period.
fn close_after_start() {
    let mut c = Conn::from_env();
    let mut vcpus = get_vcpus(&mut c);
    let mem = memfd(0x10000);
    nix::sys::uio::pwrite(&mem, &[0x0f, 0x0b], 0x1000).unwrap(); // ud2
    assert_eq!(create_memory(&mut c, 1, &mem, 0, 0x10000), 0);
    assert_eq!(simple(&mut c, |r| r.set_start(Default::default())), 0);
    drop(c);
    let v = &mut vcpus[0];
    assert!(vcpu_call(v, |r| r.set_wait(Default::default()))
        .wait()
        .has_init());
    let r = vcpu_call(v, |r| {
        r.mut_get_state().set = vcpu_request::StateSet::SREGS.into()
    });
    let mut sregs =
        <kvm_bindings::kvm_sregs as zerocopy::FromBytes>::read_from_bytes(&r.get_state().state)
            .unwrap();
    flat_protected_mode(&mut sregs);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    resume_with(v, |rs| {
        rs.regs = regs.as_bytes().to_vec();
        rs.sregs = sregs.as_bytes().to_vec();
    });
    eprintln!("rawplug: connections closed after Start, lingering");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Prints a line on stdout and flushes it (the test reads it while we run).
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn linger() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Sets the shared shutdown eventfd to its maximum, so that the host's own
/// `write(1)` to it would block forever; then `close` closes the last
/// connection before Start, `start` starts the VM and lingers (the test
/// stops vmm with SIGTERM).
fn shutdown_max(then: &str) {
    let mut c = Conn::from_env();
    let mut r = MainRequest::new();
    r.mut_get_shutdown_eventfd();
    let (resp, fds) = c.call(&r, &[]);
    assert_eq!(resp.errno, 0);
    let v: u64 = 0xffff_ffff_ffff_fffe;
    nix::unistd::write(&fds[0], &v.to_ne_bytes()).expect("write the shutdown eventfd");
    match then {
        "close" => {
            drop(c);
            say("rawplug: shutdown eventfd at its maximum, connection closed");
        }
        _ => {
            let _vcpus = get_vcpus(&mut c);
            let mut r = MainRequest::new();
            r.mut_start();
            assert_eq!(c.call(&r, &[]).0.errno, 0);
            say("rawplug: shutdown eventfd at its maximum, started");
        }
    }
    linger()
}

/// Probes fd 1: it must be a pipe, reopening it through /proc must reach
/// only that pipe, and changing its flags must not touch vmm's stdout.
/// Then prints control characters that the host must escape.
fn stdout_probe() {
    use nix::sys::stat::{fstat, SFlag};
    let st = fstat(std::io::stdout()).expect("fstat fd 1");
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    say(&format!(
        "rawplug: fd 1 is a pipe: {}",
        kind == SFlag::S_IFIFO
    ));
    // Try to reach the file behind vmm's stdout: truncate and overwrite.
    match nix::fcntl::open(
        "/proc/self/fd/1",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_TRUNC,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => {
            let _ = nix::unistd::write(&fd, b"OVERWRITTEN\n");
        }
        Err(e) => say(&format!("rawplug: reopen of fd 1 failed: {e}")),
    }
    let _ = nix::fcntl::fcntl(
        std::io::stdout(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    say("rawplug: red\r\x1b[31mALERT\x1b[0m\x07 done");
    eprintln!("rawplug: err\r\x1b[2Kfake prefix\x7f");
    let mut c = Conn::from_env();
    let mut r = MainRequest::new();
    r.mut_start();
    assert_eq!(c.call(&r, &[]).0.errno, 0);
    std::process::exit(0);
}

fn set_irq(c: &mut Conn, irq: u32) -> i32 {
    let mut r = MainRequest::new();
    r.mut_set_irq().irq_id = irq;
    r.mut_set_irq().active = true;
    c.call(&r, &[]).0.errno
}

/// `SetIrq` beyond the routing table is EINVAL; within it, accepted.
fn irq_range() {
    let mut c = Conn::from_env();
    assert_eq!(set_irq(&mut c, 100_000), EINVAL, "line 100000");
    assert_eq!(set_irq(&mut c, 24), EINVAL, "line 24 (default table)");
    assert_eq!(set_irq(&mut c, 4), 0, "line 4 (default table)");
    // A table routing only GSI 40 (to IOAPIC pin 5).
    let mut r = MainRequest::new();
    let mut route = main_request::set_irq_routing::Route::new();
    route.irq_id = 40;
    route.mut_irqchip().irqchip = 2;
    route.mut_irqchip().pin = 5;
    r.mut_set_irq_routing().routes.push(route);
    assert_eq!(c.call(&r, &[]).0.errno, 0);
    assert_eq!(set_irq(&mut c, 40), 0, "line 40 (routed)");
    assert_eq!(set_irq(&mut c, 4), EINVAL, "line 4 (no longer routed)");
    say("rawplug: irq range ok");
    std::process::exit(0);
}

/// Guest memory beyond the bounds is ENOMEM. `limit` is the
/// `--max-guest-memory` the test gave vmm ("default": the host's RAM).
fn memory_bounds(limit: &str) {
    let mut c = Conn::from_env();
    if limit == "default" {
        // One 256 GiB sparse region: free for the plugin, costly for KVM.
        let fd = memfd(256 << 30);
        let t = std::time::Instant::now();
        assert_eq!(create_memory(&mut c, 1, &fd, 0, 256 << 30), ENOMEM);
        say(&format!(
            "rawplug: 256 GiB refused in {} us",
            t.elapsed().as_micros()
        ));
        // Four 128 GiB regions: each refused.
        for i in 0..4 {
            let fd = memfd(128 << 30);
            assert_eq!(
                create_memory(&mut c, 10 + i, &fd, (i as u64) << 40, 128 << 30),
                ENOMEM
            );
        }
    } else {
        // --max-guest-memory 64M.
        let mib = 1u64 << 20;
        let fd = memfd(128 * mib);
        assert_eq!(
            create_memory(&mut c, 1, &fd, 0, 65 * mib),
            ENOMEM,
            "per slot"
        );
        assert_eq!(create_memory(&mut c, 1, &fd, 0, 32 * mib), 0);
        assert_eq!(create_memory(&mut c, 2, &fd, 1 << 30, 32 * mib), 0);
        assert_eq!(
            create_memory(&mut c, 3, &fd, 2 << 30, 4096),
            ENOMEM,
            "total"
        );
        let mut r = MainRequest::new();
        r.mut_destroy().id = 2;
        assert_eq!(c.call(&r, &[]).0.errno, 0);
        assert_eq!(create_memory(&mut c, 3, &fd, 2 << 30, 32 * mib), 0, "freed");
    }
    say("rawplug: memory bounds ok");
    std::process::exit(0);
}

/// Floods `GetVcpus` on many connections and never reads the replies,
/// which would leave their descriptors in flight; then checks that the
/// host refuses descriptor-carrying replies (ETOOMANYREFS) and lingers,
/// holding what it got, for the test to start a second VM.
fn fd_flood(connections: usize, per_connection: usize) {
    let mut c = Conn::from_env();
    let mut conns: Vec<Conn> = (0..connections).map(|_| c.new_connection()).collect();
    let mut r = MainRequest::new();
    r.mut_get_vcpus().request_fast_channel = true;
    let bytes = r.write_to_bytes().unwrap();
    for conn in &mut conns {
        for _ in 0..per_connection {
            if framing::send_packet(conn.sock.as_fd(), &bytes, &[]).is_err() {
                break;
            }
        }
    }
    // Give the host time to answer (or refuse) all of it.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    // Count what the host answered on every other connection (the rest
    // stays unread, its descriptors in flight).
    let (mut granted, mut refused, mut fds_got) = (0, 0, 0);
    for conn in conns.iter_mut().step_by(2) {
        nix::fcntl::fcntl(
            &conn.sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        while let Ok(p) =
            framing::recv_packet(conn.sock.as_fd(), &mut conn.buf, framing::SCM_MAX_FD)
        {
            let resp = MainResponse::parse_from_bytes(&conn.buf[..p.len]).expect("decode");
            fds_got += p.fds.len();
            match resp.errno {
                0 => granted += 1,
                109 => refused += 1,
                e => panic!("unexpected errno {e}"),
            }
        }
    }
    let _ = &mut c;
    say(&format!(
        "rawplug: flooded; read half: granted {granted} refused {refused} fds {fds_got}"
    ));
    linger()
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
        "exit-before-start" => exit_before_start(),
        "malformed" => malformed(),
        "oversized" => oversized(),
        "bad-fds" => bad_fds(),
        "ranges-and-ids" => ranges_and_ids(),
        "after-start" => after_start(),
        "vcpu-misuse" => vcpu_misuse(),
        "hang-ignoring-signals" => hang_ignoring_signals(),
        "flood-main" => flood_main(),
        "flood-vcpu" => flood_vcpu(),
        "never-read" => never_read(),
        "leaks" => leaks(),
        "hypercall" => hypercall(),
        "close-after-start" => close_after_start(),
        "shutdown-max" => shutdown_max(&std::env::args().nth(2).unwrap_or_default()),
        "stdout-probe" => stdout_probe(),
        "irq-range" => irq_range(),
        "memory-bounds" => memory_bounds(&std::env::args().nth(2).unwrap_or_default()),
        "fd-flood" => {
            let n = |i: usize, d: usize| {
                std::env::args()
                    .nth(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(d)
            };
            fd_flood(n(2, 64), n(3, 400))
        }
        other => {
            eprintln!("unknown scenario `{other}`");
            std::process::exit(2);
        }
    }
}
