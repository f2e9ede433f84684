//! The control socket (`--api-socket PATH`, docs/control-api.md): a control
//! thread that owns the listening socket and every client connection
//! ([`server`]), and the dispatcher that carries out the commands on the
//! main loop ([`dispatch`]).
//!
//! The main loop stays the single owner of the VM's state: the control
//! thread parses request lines and hands typed [`ApiRequest`]s to it through
//! an mpsc channel plus an eventfd the main loop's epoll watches; the main
//! loop answers with [`ToServer`] messages through a second channel plus an
//! eventfd the control thread watches. Every request carries its response
//! path (the client's token and the request's id).

pub mod dispatch;
pub mod server;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::errno::Errno;
use vmm_client::proto::{Command, Id};

pub use server::{ControlSocket, Link};

/// Most requests of one client waiting for their answer (more: `busy`).
pub const MAX_OUTSTANDING: usize = 64;

/// Most bytes a client may leave unread; beyond, it is dropped.
pub const MAX_UNSENT: usize = 256 * 1024;

/// Most clients at once (more: one `busy` line, then closed).
pub const MAX_CLIENTS: usize = 128;

/// How long vmm waits, at exit, for subscribers to take the last events
/// before the socket is removed.
pub const FLUSH_AT_EXIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{path}: another vmm serves this control socket")]
    Live { path: PathBuf },
    #[error("{path}: exists and is not a socket (not replaced)")]
    NotASocket { path: PathBuf },
    #[error("{path}: cannot inspect the control socket path")]
    Stat {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{path}: cannot remove the stale control socket")]
    Unlink {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{path}: cannot create the control socket")]
    Bind {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot create {what} of the control socket")]
    Resource {
        what: &'static str,
        #[source]
        source: Errno,
    },
}

/// A parsed request on its way to the main loop.
#[derive(Debug)]
pub struct ApiRequest {
    /// The connection it came on (never reused within a run).
    pub client: u64,
    pub id: Id,
    pub command: Command,
    /// Descriptors that came with the request line (`SCM_RIGHTS`).
    pub fds: Vec<OwnedFd>,
    /// More descriptors came than [`vmm_client::proto::MAX_FDS`]: the
    /// kernel dropped the rest.
    pub fds_truncated: bool,
}

/// What the main loop sends to the control thread.
#[derive(Debug)]
pub enum ToServer {
    /// The answer to one request of `client`.
    Response {
        client: u64,
        response: vmm_client::proto::Response,
    },
    /// Subscribe `client` to events (or end its subscription); sent before
    /// the response of its `events` request.
    Subscribe { client: u64, on: bool },
    /// One event for every subscriber.
    Event(vmm_client::proto::Event),
    /// vmm is ending: flush what is queued (at most [`FLUSH_AT_EXIT`]) and
    /// end the control thread.
    Shutdown,
}
