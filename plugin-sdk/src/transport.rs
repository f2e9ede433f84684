//! The channel carrying one vcpu's requests and responses.
//!
//! The protocol logic in [`crate::vcpu`] only sees [`VcpuTransport`]; the
//! pipe pair of the wire protocol is [`PipeTransport`]. A faster transport
//! (e.g. shared memory negotiated through a protocol extension) can be slotted
//! in behind the same trait without touching the vcpu logic or the C API.

use std::cell::Cell;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use plugin_proto::framing::{write_vcpu_request, FrameReader};
use plugin_proto::protobuf::Message;
use plugin_proto::shm::{ShmChannel, ShmError, Side};
use plugin_proto::VcpuRequest;

use crate::error::{Error, Result};

/// Moves whole messages over one vcpu channel.
pub(crate) trait VcpuTransport: Send {
    /// Sends one request (no reply is awaited here).
    fn send(&mut self, request: &VcpuRequest) -> Result<()>;

    /// Blocks until the next response arrives and returns its serialized
    /// `VcpuResponse` (valid until the next call). Fails with
    /// [`Error::Shutdown`] when the host signalled its shutdown eventfd and
    /// no response is pending.
    fn recv_frame(&mut self) -> Result<&[u8]>;
}

/// The VM's shutdown eventfd, shared by every vcpu channel of a connection
/// (`None` when the host did not hand one out). It is only polled, never
/// read, so every waiter sees it.
pub(crate) type ShutdownFd = Option<Arc<OwnedFd>>;

/// True when `fd` is readable right now (the host signalled shutdown).
fn signalled(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Blocks until `response` has data (or hung up), or `shutdown` is
/// signalled first. A pending response wins over the shutdown, so nothing
/// the host sent is lost.
///
/// Cost: one `poll` per wait besides the read. Under the shared load of
/// the development machine the measurements disagree (one run: 54 µs per
/// exit against a bare pipe round trip of 17 µs; the next: 47 against 47),
/// so the plain-protocol rows need re-measuring on an idle machine. `epoll`
/// is not an option: the built-in and crosvm-era seccomp policies allow only
/// `poll`; and a bare read would never end, since the host keeps the pipe
/// open after a shutdown. The fast channel (the default) pays nothing.
fn wait_readable(response: BorrowedFd<'_>, shutdown: Option<BorrowedFd<'_>>) -> Result<()> {
    let Some(shutdown) = shutdown else {
        return Ok(());
    };
    loop {
        let mut fds = [
            PollFd::new(response, PollFlags::POLLIN),
            PollFd::new(shutdown, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(source) => {
                return Err(Error::Sys {
                    op: "polling a vcpu response pipe",
                    source,
                })
            }
        }
        let response = fds[0].revents().unwrap_or(PollFlags::empty());
        // Data first; then the shutdown (the host's vcpu thread may have
        // closed its pipe end as it stopped: that hang-up is the shutdown,
        // not a lost host); a bare hang-up or error is read as EOF below.
        if response.contains(PollFlags::POLLIN) {
            return Ok(());
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Err(Error::Shutdown {
                op: "reading a vcpu response",
            });
        }
        if !response.is_empty() {
            return Ok(());
        }
    }
}

/// The wire protocol's transport: bare requests written to the request pipe,
/// varint-delimited responses read from the response pipe.
pub(crate) struct PipeTransport {
    request: OwnedFd,
    response: OwnedFd,
    scratch: Vec<u8>,
    reader: Option<FrameReader>,
    shutdown: ShutdownFd,
}

impl PipeTransport {
    /// `request` is the write end of the request pipe, `response` the read
    /// end of the response pipe.
    pub(crate) fn new(request: OwnedFd, response: OwnedFd, shutdown: ShutdownFd) -> PipeTransport {
        PipeTransport {
            request,
            response,
            shutdown,
            scratch: Vec::with_capacity(512),
            // The 256 KiB read buffer is only allocated once the vcpu is used.
            reader: None,
        }
    }
}

impl VcpuTransport for PipeTransport {
    fn send(&mut self, request: &VcpuRequest) -> Result<()> {
        write_vcpu_request(self.request.as_fd(), request, &mut self.scratch)
            .map_err(Error::transport("writing a vcpu request"))
    }

    fn recv_frame(&mut self) -> Result<&[u8]> {
        let reader = self.reader.get_or_insert_with(FrameReader::new);
        if !reader.has_buffered() {
            // The host writes each response whole, so once the pipe is
            // readable (or a partial frame is buffered) the read below
            // completes without waiting on the host.
            wait_readable(
                self.response.as_fd(),
                self.shutdown.as_deref().map(AsFd::as_fd),
            )?;
        }
        reader
            .next_frame(self.response.as_fd())
            .map_err(Error::transport("reading a vcpu response"))
    }
}

/// The shared-memory fast channel (protocol extension, see
/// `docs/protocol-extensions.md`): the same messages, carried by two rings
/// in a memfd the host created, with spin-then-futex waiting.
pub(crate) struct ShmTransport {
    channel: ShmChannel,
    /// The response pipe, unused for data: its hang-up tells that the host
    /// is gone, so a waiting vcpu returns instead of sleeping forever.
    liveness: OwnedFd,
    shutdown: ShutdownFd,
    scratch: Vec<u8>,
}

impl ShmTransport {
    pub(crate) fn new(
        memfd: &OwnedFd,
        response_pipe: OwnedFd,
        shutdown: ShutdownFd,
    ) -> Result<ShmTransport> {
        let channel = ShmChannel::map(memfd.as_fd(), Side::Plugin)
            .map_err(|e| Error::FastChannel("mapping the vcpu channel", e))?;
        Ok(ShmTransport {
            channel,
            liveness: response_pipe,
            shutdown,
            scratch: Vec::with_capacity(512),
        })
    }
}

/// True once the host closed its end of `pipe` (it exited).
fn host_gone(pipe: &OwnedFd) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        pipe.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().is_some_and(|r| {
            r.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR)
        }),
        Err(_) => false,
    }
}

/// Why a wait on the fast channel was given up (the abort check runs after
/// every sleep slice).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gone {
    No,
    HostExited,
    Shutdown,
}

fn abort_check<'a>(
    liveness: &'a OwnedFd,
    shutdown: &'a ShutdownFd,
    why: &'a Cell<Gone>,
) -> impl FnMut() -> bool + 'a {
    move || {
        if shutdown.as_deref().is_some_and(|fd| signalled(fd.as_fd())) {
            why.set(Gone::Shutdown);
        } else if host_gone(liveness) {
            why.set(Gone::HostExited);
        }
        why.get() != Gone::No
    }
}

fn shm_error(what: &'static str, why: Gone) -> impl FnOnce(ShmError) -> Error {
    move |e| match e {
        ShmError::Aborted if why == Gone::Shutdown => Error::Shutdown { op: what },
        // The host went away: the same as EOF on the response pipe.
        ShmError::Aborted => Error::Transport {
            op: what,
            source: plugin_proto::framing::FramingError::Closed,
        },
        e => Error::FastChannel(what, e),
    }
}

impl VcpuTransport for ShmTransport {
    fn send(&mut self, request: &VcpuRequest) -> Result<()> {
        self.scratch.clear();
        request
            .write_to_vec(&mut self.scratch)
            .map_err(|_| Error::Protocol("encoding a vcpu request failed"))?;
        let why = Cell::new(Gone::No);
        let mut abort = abort_check(&self.liveness, &self.shutdown, &why);
        let result = self.channel.send(&self.scratch, &mut abort);
        result.map_err(shm_error("sending a vcpu request", why.get()))
    }

    fn recv_frame(&mut self) -> Result<&[u8]> {
        let why = Cell::new(Gone::No);
        let mut abort = abort_check(&self.liveness, &self.shutdown, &why);
        let result = self.channel.recv(&mut abort);
        result.map_err(shm_error("receiving a vcpu response", why.get()))
    }
}
