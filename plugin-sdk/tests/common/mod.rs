//! A fake VMM for testing the client: real `SOCK_SEQPACKET` main connections
//! and vcpu pipes speaking the real protobuf messages, served by threads
//! whose answers come from test-supplied closures.

#![allow(dead_code)]

pub mod cc;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use plugin_proto::framing::{
    encode_delimited, read_vcpu_request, recv_packet, send_message, write_all_once,
    MAX_MESSAGE_SIZE,
};
use plugin_proto::protobuf::Message;
use plugin_proto::vcpu_response::wait;
use plugin_proto::{
    main_request, main_response, vcpu_request, MainRequest, MainResponse, VcpuRequest, VcpuResponse,
};

/// Answers one main request: the response and descriptors to attach.
pub type MainHandler =
    Arc<dyn Fn(&MainRequest, Vec<OwnedFd>) -> (MainResponse, Vec<OwnedFd>) + Send + Sync>;

/// How the fake host hands out the vcpu descriptors.
#[derive(Clone, Copy, Debug)]
pub enum Delivery {
    /// One packet, `vcpu_count` set.
    Single,
    /// One packet, `vcpu_count` left 0 (a host predating the extension).
    Legacy,
    /// `vcpu_count` set, descriptors spread over packets of at most `n`.
    Chunked(usize),
}

/// Host ends of one vcpu channel.
pub struct HostVcpu {
    /// Read end of the request pipe.
    pub requests: OwnedFd,
    /// Write end of the response pipe.
    pub responses: OwnedFd,
}

/// Everything a test needs: the log of main requests (GetVcpus included)
/// and the host ends of the vcpu pipes.
pub struct FakeHost {
    pub log: Arc<Mutex<Vec<MainRequest>>>,
    pub vcpus: Vec<HostVcpu>,
    pub threads: Vec<JoinHandle<()>>,
}

pub fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().expect("pipe")
}

pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

/// A handler that answers every request with success and the matching
/// empty response member, attaching nothing.
pub fn ok_response(req: &MainRequest) -> MainResponse {
    use main_request::Message as Rq;
    use main_response::Message as Rs;
    let mut resp = MainResponse::new();
    resp.message = req.message.as_ref().map(|m| match m {
        Rq::Create(_) => Rs::Create(Default::default()),
        Rq::Destroy(_) => Rs::Destroy(Default::default()),
        Rq::NewConnection(_) => Rs::NewConnection(Default::default()),
        Rq::GetShutdownEventfd(_) => Rs::GetShutdownEventfd(Default::default()),
        Rq::CheckExtension(_) => Rs::CheckExtension(Default::default()),
        Rq::GetSupportedCpuid(_) => Rs::GetSupportedCpuid(Default::default()),
        Rq::GetEmulatedCpuid(_) => Rs::GetEmulatedCpuid(Default::default()),
        Rq::GetMsrIndexList(_) => Rs::GetMsrIndexList(Default::default()),
        Rq::GetNetConfig(_) => Rs::GetNetConfig(Default::default()),
        Rq::ReserveRange(_) => Rs::ReserveRange(Default::default()),
        Rq::SetIrq(_) => Rs::SetIrq(Default::default()),
        Rq::SetIrqRouting(_) => Rs::SetIrqRouting(Default::default()),
        Rq::GetState(_) => Rs::GetState(Default::default()),
        Rq::SetState(_) => Rs::SetState(Default::default()),
        Rq::SetIdentityMapAddr(_) => Rs::SetIdentityMapAddr(Default::default()),
        Rq::PauseVcpus(_) => Rs::PauseVcpus(Default::default()),
        Rq::GetVcpus(_) => Rs::GetVcpus(Default::default()),
        Rq::Start(_) => Rs::Start(Default::default()),
        Rq::SetCallHint(_) => Rs::SetCallHint(Default::default()),
        Rq::DirtyLog(_) => Rs::DirtyLog(Default::default()),
        _ => Rs::Start(Default::default()),
    });
    resp
}

pub fn errno_response(errno: i32) -> MainResponse {
    MainResponse {
        errno,
        ..Default::default()
    }
}

/// A fresh eventfd (stands in for the VMM's descriptors).
pub fn eventfd() -> OwnedFd {
    nix::sys::eventfd::EventFd::new().expect("eventfd").into()
}

/// Serves one main connection until the plugin closes it.
fn serve(
    sock: OwnedFd,
    plugin_vcpu_fds: Arc<Vec<OwnedFd>>,
    delivery: Delivery,
    handler: MainHandler,
    log: Arc<Mutex<Vec<MainRequest>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let mut scratch = Vec::new();
    loop {
        let packet = match recv_packet(sock.as_fd(), &mut buf, 253) {
            Ok(p) => p,
            Err(_) => return,
        };
        let req = MainRequest::parse_from_bytes(&buf[..packet.len]).expect("request decodes");
        log.lock().unwrap().push(req.clone());
        if let Some(main_request::Message::GetVcpus(_)) = &req.message {
            let vcpu_count = plugin_vcpu_fds.len() / 2;
            let fds: Vec<_> = plugin_vcpu_fds.iter().map(|f| f.as_fd()).collect();
            let mut resp = MainResponse::new();
            resp.mut_get_vcpus().vcpu_count = match delivery {
                Delivery::Legacy => 0,
                _ => vcpu_count as u32,
            };
            let chunk = match delivery {
                Delivery::Chunked(n) => n,
                _ => fds.len().max(1),
            };
            let mut chunks = fds.chunks(chunk);
            let first = chunks.next().unwrap_or(&[]);
            send_message(sock.as_fd(), &resp, first, &mut scratch).expect("send");
            let mut follow = MainResponse::new();
            follow.mut_get_vcpus();
            for c in chunks {
                send_message(sock.as_fd(), &follow, c, &mut scratch).expect("send");
            }
            continue;
        }
        if let Some(main_request::Message::NewConnection(_)) = &req.message {
            let (host, plugin) = seqpacket_pair();
            let (fds, h, l, t) = (
                plugin_vcpu_fds.clone(),
                handler.clone(),
                log.clone(),
                threads.clone(),
            );
            let th = std::thread::spawn(move || serve(host, fds, delivery, h, l, t));
            threads.lock().unwrap().push(th);
            let resp = ok_response(&req);
            send_message(sock.as_fd(), &resp, &[plugin.as_fd()], &mut scratch).expect("send");
            continue;
        }
        let (resp, fds) = handler(&req, packet.fds);
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if send_message(sock.as_fd(), &resp, &borrowed, &mut scratch).is_err() {
            return;
        }
    }
}

/// Starts a fake host with `vcpus` vcpus and returns the plugin end of the
/// first main connection plus the host state.
pub fn start_host(vcpus: usize, delivery: Delivery, handler: MainHandler) -> (OwnedFd, FakeHost) {
    let (host, plugin) = seqpacket_pair();
    let mut plugin_vcpu_fds = Vec::new();
    let mut host_vcpus = Vec::new();
    for _ in 0..vcpus {
        let (req_read, req_write) = pipe();
        let (resp_read, resp_write) = pipe();
        plugin_vcpu_fds.push(req_write);
        plugin_vcpu_fds.push(resp_read);
        host_vcpus.push(HostVcpu {
            requests: req_read,
            responses: resp_write,
        });
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let threads = Arc::new(Mutex::new(Vec::new()));
    let fds = Arc::new(plugin_vcpu_fds);
    let (l, t) = (log.clone(), threads.clone());
    let th = std::thread::spawn(move || serve(host, fds, delivery, handler, l, t));
    threads.lock().unwrap().push(th);
    (
        plugin,
        FakeHost {
            log,
            vcpus: host_vcpus,
            threads: Vec::new(),
        },
    )
}

/// Starts a fake host and connects the SDK to it.
pub fn connect(
    vcpus: usize,
    delivery: Delivery,
    handler: MainHandler,
) -> (crosvm_plugin::Connection, FakeHost) {
    let (plugin, host) = start_host(vcpus, delivery, handler);
    let conn = crosvm_plugin::Connection::from_fd(plugin).expect("connect");
    (conn, host)
}

/// Handler answering everything with success (and fds where the protocol
/// requires them).
pub fn default_handler() -> MainHandler {
    Arc::new(|req, _fds| {
        let resp = ok_response(req);
        let fds = match &req.message {
            Some(main_request::Message::Create(c)) => match &c.constructor {
                Some(main_request::create::Constructor::IoEvent(_)) => vec![eventfd()],
                Some(main_request::create::Constructor::IrqEvent(_)) => {
                    vec![eventfd(), eventfd()]
                }
                _ => vec![],
            },
            Some(main_request::Message::GetShutdownEventfd(_)) => vec![eventfd()],
            _ => vec![],
        };
        (resp, fds)
    })
}

/// What a fake vcpu thread sends back for one request.
pub enum Reply {
    /// A framed response written with its own `write()`.
    Msg(VcpuResponse),
    /// Raw bytes in one `write()` (e.g. several frames at once).
    Raw(Vec<u8>),
    /// Close the response pipe (the plugin sees EOF).
    Close,
}

/// Frames `msg` like the host does.
pub fn frame(msg: &VcpuResponse) -> Vec<u8> {
    let mut out = Vec::new();
    encode_delimited(msg, &mut out).expect("encode");
    out
}

/// Serves one vcpu channel: every request is recorded and answered by
/// `handler`. Returns the recorded requests once the plugin closes its
/// request pipe end (or the handler asked to close).
pub fn serve_vcpu(
    vcpu: HostVcpu,
    mut handler: impl FnMut(&VcpuRequest) -> Vec<Reply> + Send + 'static,
) -> JoinHandle<Vec<VcpuRequest>> {
    std::thread::spawn(move || {
        let mut log = Vec::new();
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        let mut responses = Some(vcpu.responses);
        while let Ok(n) = read_vcpu_request(vcpu.requests.as_fd(), &mut buf) {
            let req = VcpuRequest::parse_from_bytes(&buf[..n]).expect("vcpu request decodes");
            let replies = handler(&req);
            log.push(req);
            for r in replies {
                let Some(out) = responses.as_ref() else { break };
                match r {
                    Reply::Msg(m) => write_all_once(out.as_fd(), &frame(&m)).expect("write"),
                    Reply::Raw(b) => write_all_once(out.as_fd(), &b).expect("write"),
                    Reply::Close => responses = None,
                }
            }
        }
        log
    })
}

/// An unsolicited `Wait` response carrying `exit`.
pub fn wait_reply(exit: wait::Exit) -> Reply {
    let mut r = VcpuResponse::new();
    r.mut_wait().exit = Some(exit);
    Reply::Msg(r)
}

/// A vcpu script: the n-th `Wait` or `Resume` the plugin sends is answered
/// with the n-th of `exits` (nothing once they run out); any other request
/// goes to `other`.
pub fn scripted_exits(
    exits: Vec<wait::Exit>,
    mut other: impl FnMut(&VcpuRequest) -> Vec<Reply> + Send + 'static,
) -> impl FnMut(&VcpuRequest) -> Vec<Reply> + Send + 'static {
    let mut exits = exits.into_iter();
    move |req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) | Some(vcpu_request::Message::Resume(_)) => {
            exits.next().map(wait_reply).into_iter().collect()
        }
        _ => other(req),
    }
}
