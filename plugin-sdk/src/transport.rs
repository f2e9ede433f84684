//! The channel carrying one vcpu's requests and responses.
//!
//! The protocol logic in [`crate::vcpu`] only sees [`VcpuTransport`]; the
//! pipe pair of the wire protocol is [`PipeTransport`]. A faster transport
//! (e.g. shared memory negotiated through a protocol extension) can be slotted
//! in behind the same trait without touching the vcpu logic or the C API.

use std::os::fd::{AsFd, OwnedFd};

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
    /// `VcpuResponse` (valid until the next call).
    fn recv_frame(&mut self) -> Result<&[u8]>;
}

/// The wire protocol's transport: bare requests written to the request pipe,
/// varint-delimited responses read from the response pipe.
pub(crate) struct PipeTransport {
    request: OwnedFd,
    response: OwnedFd,
    scratch: Vec<u8>,
    reader: Option<FrameReader>,
}

impl PipeTransport {
    /// `request` is the write end of the request pipe, `response` the read
    /// end of the response pipe.
    pub(crate) fn new(request: OwnedFd, response: OwnedFd) -> PipeTransport {
        PipeTransport {
            request,
            response,
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
    scratch: Vec<u8>,
}

impl ShmTransport {
    pub(crate) fn new(memfd: &OwnedFd, response_pipe: OwnedFd) -> Result<ShmTransport> {
        let channel = ShmChannel::map(memfd.as_fd(), Side::Plugin)
            .map_err(|e| Error::FastChannel("mapping the vcpu channel", e))?;
        Ok(ShmTransport {
            channel,
            liveness: response_pipe,
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

fn shm_error(what: &'static str) -> impl FnOnce(ShmError) -> Error {
    move |e| match e {
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
        let liveness = &self.liveness;
        let mut abort = || host_gone(liveness);
        self.channel
            .send(&self.scratch, &mut abort)
            .map_err(shm_error("sending a vcpu request"))
    }

    fn recv_frame(&mut self) -> Result<&[u8]> {
        let liveness = &self.liveness;
        let mut abort = || host_gone(liveness);
        self.channel
            .recv(&mut abort)
            .map_err(shm_error("receiving a vcpu response"))
    }
}
