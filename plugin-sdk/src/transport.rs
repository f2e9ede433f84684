//! The channel carrying one vcpu's requests and responses.
//!
//! The protocol logic in [`crate::vcpu`] only sees [`VcpuTransport`]; the
//! pipe pair of the wire protocol is [`PipeTransport`]. A faster transport
//! (e.g. shared memory negotiated through a protocol extension) can be slotted
//! in behind the same trait without touching the vcpu logic or the C API.

use std::os::fd::{AsFd, OwnedFd};

use plugin_proto::framing::{write_vcpu_request, FrameReader};
use plugin_proto::protobuf::Message;
use plugin_proto::{VcpuRequest, VcpuResponse};

use crate::error::{Error, Result};

/// Moves whole messages over one vcpu channel.
pub(crate) trait VcpuTransport: Send {
    /// Sends one request (no reply is awaited here).
    fn send(&mut self, request: &VcpuRequest) -> Result<()>;

    /// Blocks until the next response arrives and decodes it into
    /// `response` (which is cleared first, so its allocations can be reused
    /// by implementations that support it).
    fn recv(&mut self, response: &mut VcpuResponse) -> Result<()>;
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

    fn recv(&mut self, response: &mut VcpuResponse) -> Result<()> {
        let reader = self.reader.get_or_insert_with(FrameReader::new);
        let frame = reader
            .next_frame(self.response.as_fd())
            .map_err(Error::transport("reading a vcpu response"))?;
        response.clear();
        response
            .merge_from_bytes(frame)
            .map_err(Error::decode("a vcpu response"))
    }
}
