//! The channel carrying one vcpu's requests and responses.
//!
//! The protocol logic in [`crate::vcpu`] only sees [`VcpuTransport`]; the
//! pipe pair of the wire protocol is [`PipeTransport`]. A faster transport
//! (e.g. shared memory negotiated through a protocol extension) can be slotted
//! in behind the same trait without touching the vcpu logic or the C API.

use std::os::fd::{AsFd, OwnedFd};

use plugin_proto::framing::{write_vcpu_request, FrameReader};
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
