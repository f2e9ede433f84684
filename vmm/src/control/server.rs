//! The control thread: the listening socket (created 0600, stale files
//! replaced, live ones refused), the peer check (`SO_PEERCRED`), line
//! framing with the descriptors that came with each line, and the bounded
//! per-client queues. Parsed requests go to the main loop; its answers and
//! events come back and are written out without ever blocking.

use std::collections::{HashMap, VecDeque};
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::SigSet;
use nix::sys::socket::{
    getsockopt, recvmsg, send, sockopt, ControlMessageOwned, MsgFlags, UnixAddr,
};
use nix::sys::stat::{umask, Mode};
use vmm_client::proto::{
    self, ErrorCode, Greeting, Response, ServerMessage, MAX_FDS, MAX_MESSAGE, PROTOCOL_VERSION,
};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ApiRequest, ControlError, ToServer, FLUSH_AT_EXIT, MAX_CLIENTS, MAX_OUTSTANDING, MAX_UNSENT,
};

const TOKEN_LISTENER: u64 = 0;
const TOKEN_WAKE: u64 = 1;
const FIRST_CLIENT: u64 = 16;

fn new_eventfd(what: &'static str) -> Result<EventFd, ControlError> {
    EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).map_err(|e| ControlError::Resource {
        what,
        source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
    })
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The main loop's end of the link with the control thread.
pub struct Link {
    requests: Receiver<ApiRequest>,
    wake: EventFd,
    to_server: Sender<ToServer>,
    server_wake: Arc<EventFd>,
}

impl Link {
    /// Readable when requests wait (the main loop's epoll watches it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        crate::vm::borrow_fd(&self.wake)
    }

    /// The requests that arrived.
    pub fn take(&self) -> Vec<ApiRequest> {
        let _ = self.wake.read();
        let mut out = Vec::new();
        while let Ok(r) = self.requests.try_recv() {
            out.push(r);
        }
        out
    }

    /// Sends answers, subscriptions and events to the control thread.
    pub fn send(&self, msgs: impl IntoIterator<Item = ToServer>) {
        let mut any = false;
        for m in msgs {
            any = true;
            if self.to_server.send(m).is_err() {
                return;
            }
        }
        if any {
            let _ = self.server_wake.write(1);
        }
    }
}

/// The control socket of a run: serves until dropped, then flushes the
/// last events (at most [`FLUSH_AT_EXIT`]), ends the control thread and
/// removes the socket file (if it is still the one vmm created).
pub struct ControlSocket {
    path: PathBuf,
    ident: (u64, u64),
    thread: Option<JoinHandle<()>>,
    to_server: Sender<ToServer>,
    server_wake: Arc<EventFd>,
    link: Option<Link>,
}

impl ControlSocket {
    /// Creates the socket at `path` and starts the control thread.
    pub fn start(path: &Path) -> Result<ControlSocket, ControlError> {
        let listener = bind(path)?;
        let ident = std::fs::symlink_metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .unwrap_or((0, 0));
        // From here on the file is removed on every path out.
        let mut guard = ControlSocket {
            path: path.to_path_buf(),
            ident,
            thread: None,
            to_server: channel().0,
            server_wake: Arc::new(new_eventfd("the wake-up eventfd")?),
            link: None,
        };
        let (req_tx, req_rx) = channel();
        let (out_tx, out_rx) = channel();
        let main_wake = new_eventfd("the request eventfd")?;
        let main_wake_clone = main_wake.try_clone().map_err(|e| ControlError::Resource {
            what: "the request eventfd",
            source: io_errno(&e),
        })?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|source| {
            ControlError::Resource {
                what: "the epoll set",
                source,
            }
        })?;
        let reg = |fd: BorrowedFd<'_>, token| {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                .map_err(|source| ControlError::Resource {
                    what: "an epoll registration",
                    source,
                })
        };
        reg(listener.as_fd(), TOKEN_LISTENER)?;
        reg(crate::vm::borrow_fd(&*guard.server_wake), TOKEN_WAKE)?;
        let server = Server {
            listener,
            epoll,
            wake: Arc::clone(&guard.server_wake),
            from_main: out_rx,
            to_main: req_tx,
            main_wake: main_wake_clone,
            clients: HashMap::new(),
            next: FIRST_CLIENT,
            euid: nix::unistd::geteuid().as_raw(),
            greeting: ServerMessage::Greeting(Greeting {
                protocol: PROTOCOL_VERSION,
                vmm: env!("CARGO_PKG_VERSION").to_string(),
                pid: std::process::id(),
            })
            .to_line(),
            buf: vec![0; MAX_MESSAGE],
        };
        guard.to_server = out_tx.clone();
        guard.link = Some(Link {
            requests: req_rx,
            wake: main_wake,
            to_server: out_tx,
            server_wake: Arc::clone(&guard.server_wake),
        });
        // The thread starts with every signal blocked: SIGTERM, SIGINT and
        // SIGCHLD are for the main loop's signalfd (a signal delivered to
        // this thread would take the default action and end vmm without
        // its clean-up), the kick signal for vcpu threads.
        let old = SigSet::thread_get_mask().map_err(|source| ControlError::Resource {
            what: "the control thread's signal mask",
            source,
        })?;
        SigSet::all()
            .thread_block()
            .map_err(|source| ControlError::Resource {
                what: "the control thread's signal mask",
                source,
            })?;
        let spawned = std::thread::Builder::new()
            .name("vmm_control".into())
            .spawn(move || server.run());
        let _ = old.thread_set_mask();
        let thread = spawned.map_err(|e| ControlError::Resource {
            what: "the control thread",
            source: io_errno(&e),
        })?;
        guard.thread = Some(thread);
        info!("control socket {}", path.display());
        Ok(guard)
    }

    /// The main loop's end (once).
    pub fn take_link(&mut self) -> Option<Link> {
        self.link.take()
    }

    /// Sends messages to the control thread (for events after the main
    /// loop's end).
    pub fn send(&self, msgs: impl IntoIterator<Item = ToServer>) {
        for m in msgs {
            let _ = self.to_server.send(m);
        }
        let _ = self.server_wake.write(1);
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.link = None;
        self.send([ToServer::Shutdown]);
        if let Some(t) = self.thread.take() {
            // The thread ends within FLUSH_AT_EXIT of the shutdown.
            let _ = t.join();
        }
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.ident)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!(
                    "cannot remove the control socket {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// Binds the listening socket at `path` with mode 0600: a stale socket
/// file (nobody accepts) is replaced, a live one or any other file is an
/// error.
fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ControlError::Live {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                info!("replacing the stale control socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| ControlError::Unlink {
                    path: path.to_path_buf(),
                    source: io_errno(&e),
                })?;
            }
            Err(e) => {
                return Err(ControlError::Bind {
                    path: path.to_path_buf(),
                    source: io_errno(&e),
                })
            }
        },
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ControlError::Stat {
                path: path.to_path_buf(),
                source: io_errno(&e),
            })
        }
    }
    // The file must never exist with a wider mode than 0600, not even
    // between bind and a chmod: bind under a umask that masks the rest.
    // vmm has no other thread yet that creates files.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|e| ControlError::Bind {
        path: path.to_path_buf(),
        source: io_errno(&e),
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ControlError::Bind {
            path: path.to_path_buf(),
            source: io_errno(&e),
        })?;
    Ok(listener)
}

/// Descriptors that came with the bytes up to `last` (an absolute offset
/// in the client's input stream).
struct FdMark {
    last: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

struct Client {
    stream: UnixStream,
    /// Unparsed input; `base` is the stream offset of `input[0]`.
    input: Vec<u8>,
    base: u64,
    marks: VecDeque<FdMark>,
    /// Unsent output from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    outstanding: usize,
    subscribed: bool,
    /// No more input: close once the output is out.
    closing: bool,
    /// The epoll interest registered now.
    interest: EpollFlags,
}

impl Client {
    fn unsent(&self) -> usize {
        self.out.len() - self.out_pos
    }
}

/// What to do with a client after handling it.
#[derive(PartialEq)]
enum Keep {
    Yes,
    Drop(&'static str),
}

struct Server {
    listener: UnixListener,
    epoll: Epoll,
    wake: Arc<EventFd>,
    from_main: Receiver<ToServer>,
    to_main: Sender<ApiRequest>,
    main_wake: EventFd,
    clients: HashMap<u64, Client>,
    next: u64,
    euid: u32,
    greeting: Vec<u8>,
    buf: Vec<u8>,
}

fn error_line(id: proto::Id, code: ErrorCode, message: impl Into<String>) -> Vec<u8> {
    ServerMessage::Response(Response::error(id, code, message)).to_line()
}

impl Server {
    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut ending: Option<Instant> = None;
        loop {
            let timeout = match ending {
                None => EpollTimeout::NONE,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || self.clients.values().all(|c| c.unsent() == 0) {
                        return;
                    }
                    EpollTimeout::try_from(left.as_millis().max(1) as u64)
                        .unwrap_or(EpollTimeout::NONE)
                }
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("control socket: waiting for events failed: {e}; closing it");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_LISTENER if ending.is_none() => self.accept(),
                    TOKEN_LISTENER => {}
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        if self.take_from_main() && ending.is_none() {
                            ending = Some(Instant::now() + FLUSH_AT_EXIT);
                            let _ = self.epoll.delete(&self.listener);
                            // No more input: only what is queued goes out.
                            for c in self.clients.values_mut() {
                                c.closing = true;
                            }
                            let tokens: Vec<u64> = self.clients.keys().copied().collect();
                            for t in tokens {
                                self.flush(t);
                            }
                        }
                    }
                    token => self.on_client(token, ev.events()),
                }
            }
        }
    }

    /// Takes what the main loop sent; true when it asked to end (or is
    /// gone).
    fn take_from_main(&mut self) -> bool {
        loop {
            match self.from_main.try_recv() {
                Ok(ToServer::Response { client, response }) => {
                    if let Some(c) = self.clients.get_mut(&client) {
                        c.outstanding = c.outstanding.saturating_sub(1);
                        let line = ServerMessage::Response(response).to_line();
                        self.push(client, &line);
                    }
                }
                Ok(ToServer::Subscribe { client, on }) => {
                    if let Some(c) = self.clients.get_mut(&client) {
                        c.subscribed = on;
                    }
                }
                Ok(ToServer::Event(e)) => {
                    let line = ServerMessage::Event(e).to_line();
                    let subs: Vec<u64> = self
                        .clients
                        .iter()
                        .filter(|(_, c)| c.subscribed)
                        .map(|(t, _)| *t)
                        .collect();
                    for t in subs {
                        self.push(t, &line);
                    }
                }
                Ok(ToServer::Shutdown) | Err(TryRecvError::Disconnected) => return true,
                Err(TryRecvError::Empty) => return false,
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the client waits in the backlog.
                    warn!("control socket: cannot accept a client: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let uid = match getsockopt(&stream, sockopt::PeerCredentials) {
                Ok(cred) => cred.uid(),
                Err(e) => {
                    warn!("control socket: cannot read a client's credentials: {e}");
                    continue;
                }
            };
            if uid != self.euid && uid != 0 {
                info!("control socket: refused a client of uid {uid}");
                let line = error_line(
                    proto::Id::Null,
                    ErrorCode::PermissionDenied,
                    format!(
                        "uid {uid} may not command this VM (only uid {} and root may)",
                        self.euid
                    ),
                );
                let _ = send_some(stream.as_fd(), &line);
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                info!("control socket: {MAX_CLIENTS} clients connected; refusing another");
                let line = error_line(
                    proto::Id::Null,
                    ErrorCode::Busy,
                    format!("{MAX_CLIENTS} clients are connected; try again later"),
                );
                let _ = send_some(stream.as_fd(), &line);
                continue;
            }
            let token = self.next;
            self.next += 1;
            if let Err(e) = self
                .epoll
                .add(stream.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
            {
                warn!("control socket: cannot watch a client: {e}");
                continue;
            }
            debug!("control socket: client {token} connected (uid {uid})");
            self.clients.insert(
                token,
                Client {
                    stream,
                    input: Vec::new(),
                    base: 0,
                    marks: VecDeque::new(),
                    out: Vec::new(),
                    out_pos: 0,
                    outstanding: 0,
                    subscribed: false,
                    closing: false,
                    interest: EpollFlags::EPOLLIN,
                },
            );
            let greeting = self.greeting.clone();
            self.push(token, &greeting);
        }
    }

    fn on_client(&mut self, token: u64, events: EpollFlags) {
        if events.contains(EpollFlags::EPOLLOUT) {
            self.flush(token);
        }
        if events.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR)
            && self.clients.get(&token).is_some_and(|c| c.closing)
        {
            self.drop_client(token, "it hung up");
            return;
        }
        let readable =
            events.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
        if readable && self.clients.get(&token).is_some_and(|c| !c.closing) {
            match self.read(token) {
                Keep::Yes => {}
                Keep::Drop(why) => self.drop_client(token, why),
            }
        }
    }

    /// One `recvmsg` of a client, and the complete lines it finished.
    fn read(&mut self, token: u64) -> Keep {
        let Some(c) = self.clients.get_mut(&token) else {
            return Keep::Yes;
        };
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut self.buf)];
        let (n, fds, truncated) = match recvmsg::<UnixAddr>(
            c.stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for m in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = m {
                            for fd in raw {
                                // SAFETY: the kernel just installed `fd` in
                                // this process for this message; nothing
                                // else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                }
                (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC))
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => return Keep::Yes,
            Err(_) => return Keep::Drop("its connection failed"),
        };
        if n == 0 {
            return Keep::Drop("it closed the connection");
        }
        c.input.extend_from_slice(&self.buf[..n]);
        if !fds.is_empty() || truncated {
            // The descriptors belong to the line holding the last byte this
            // recvmsg returned.
            c.marks.push_back(FdMark {
                last: c.base + c.input.len() as u64 - 1,
                fds,
                truncated,
            });
            // Descriptors held for lines not complete yet are bounded as
            // one request's are: a client cannot fill vmm's descriptor
            // table with descriptors sent ahead of their line.
            let held: usize = c.marks.iter().map(|m| m.fds.len()).sum();
            if held > MAX_FDS {
                c.closing = true;
                c.input = Vec::new();
                c.marks.clear();
                let line = error_line(
                    proto::Id::Null,
                    ErrorCode::BadDescriptors,
                    format!(
                        "more than {MAX_FDS} descriptors sent for one request; closing the connection"
                    ),
                );
                self.push(token, &line);
                return Keep::Yes;
            }
        }
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut requests = Vec::new();
        while let Some(pos) = c.input.iter().position(|&b| b == b'\n') {
            let end = c.base + pos as u64;
            let mut fds = Vec::new();
            let mut fds_truncated = false;
            while c.marks.front().is_some_and(|m| m.last <= end) {
                if let Some(m) = c.marks.pop_front() {
                    fds.extend(m.fds);
                    fds_truncated |= m.truncated;
                }
            }
            let mut line = &c.input[..pos];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if !line.iter().all(u8::is_ascii_whitespace) {
                match proto::parse_request(line) {
                    Err(e) => replies.push(ServerMessage::Response(e.into_response()).to_line()),
                    Ok((id, _)) if c.outstanding >= MAX_OUTSTANDING => replies.push(error_line(
                        id,
                        ErrorCode::Busy,
                        format!("{MAX_OUTSTANDING} requests of this connection are outstanding"),
                    )),
                    Ok((id, command)) => {
                        c.outstanding += 1;
                        requests.push(ApiRequest {
                            client: token,
                            id,
                            command,
                            fds,
                            fds_truncated,
                        });
                    }
                }
            }
            c.input.drain(..=pos);
            c.base += pos as u64 + 1;
        }
        let too_large = c.input.len() >= MAX_MESSAGE;
        if too_large {
            c.closing = true;
            c.input = Vec::new();
            c.marks.clear();
            replies.push(error_line(
                proto::Id::Null,
                ErrorCode::TooLarge,
                format!(
                    "a line is at most {MAX_MESSAGE} bytes with its newline; closing the connection"
                ),
            ));
        }
        if !requests.is_empty() {
            for r in requests {
                if self.to_main.send(r).is_err() {
                    break;
                }
            }
            let _ = self.main_wake.write(1);
        }
        for line in replies {
            self.push(token, &line);
        }
        if too_large {
            self.flush(token);
        }
        Keep::Yes
    }

    /// Queues `line` for client `token`; a client whose unread output
    /// would pass [`MAX_UNSENT`] is dropped.
    fn push(&mut self, token: u64, line: &[u8]) {
        let Some(c) = self.clients.get_mut(&token) else {
            return;
        };
        if c.unsent() + line.len() > MAX_UNSENT {
            self.drop_client(token, "it does not read what it is sent");
            return;
        }
        if c.out_pos > 0 && c.out_pos * 2 >= c.out.len() {
            c.out.drain(..c.out_pos);
            c.out_pos = 0;
        }
        c.out.extend_from_slice(line);
        self.flush(token);
    }

    /// Writes what the client can take now.
    fn flush(&mut self, token: u64) {
        let Some(c) = self.clients.get_mut(&token) else {
            return;
        };
        while c.unsent() > 0 {
            match send_some(c.stream.as_fd(), &c.out[c.out_pos..]) {
                Ok(n) => c.out_pos += n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => {
                    self.drop_client(token, "its connection failed");
                    return;
                }
            }
        }
        if c.unsent() == 0 {
            c.out.clear();
            c.out_pos = 0;
            if c.closing {
                self.drop_client(token, "the connection is closed after an error");
                return;
            }
        }
        // Read while open, write while output waits. A closing client is
        // never watched for input (it would be reported readable over and
        // over).
        let mut want = EpollFlags::empty();
        if !c.closing {
            want |= EpollFlags::EPOLLIN;
        }
        if c.unsent() > 0 {
            want |= EpollFlags::EPOLLOUT;
        }
        if want != c.interest {
            c.interest = want;
            let mut ev = EpollEvent::new(want, token);
            let _ = self.epoll.modify(c.stream.as_fd(), &mut ev);
        }
    }

    fn drop_client(&mut self, token: u64, why: &str) {
        if let Some(c) = self.clients.remove(&token) {
            let _ = self.epoll.delete(c.stream.as_fd());
            if why.starts_with("it does not read") {
                info!(
                    "control socket: dropping client {token}: {why} ({} bytes unsent)",
                    c.unsent()
                );
            } else {
                debug!("control socket: client {token} gone: {why}");
            }
        }
    }
}

/// One non-blocking send without SIGPIPE.
fn send_some(fd: BorrowedFd<'_>, bytes: &[u8]) -> Result<usize, Errno> {
    send(
        fd.as_raw_fd(),
        bytes,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    )
}
