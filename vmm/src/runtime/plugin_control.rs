//! The plugin's control channel (docs/protocol-extensions.md §5): control
//! commands forwarded to the plugin (`powerbtn`, `sleepbtn`, `plugin NAME`)
//! and the plugin's replies. A plugin opts in by asking for the channel;
//! an older plugin never does, and forwarding to it is `ENOTSUP`.
//!
//! Owned by the main loop; never blocks it: the host's end is non-blocking,
//! at most [`MAX_PENDING`] commands wait for a reply, and a reply that does
//! not come within [`REPLY_TIMEOUT`] times out.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde_json::Value;

/// Most forwarded commands waiting for the plugin's reply.
pub const MAX_PENDING: usize = 64;

/// How long the plugin has to answer a forwarded command.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What is forwarded.
#[derive(Debug, Clone, PartialEq)]
pub enum Forward {
    PowerButton,
    SleepButton,
    Plugin { name: String, args: Value },
}

/// The plugin's answer to a forwarded command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Success, with the plugin's JSON result (`null` when it sent none).
    Ok(Value),
    /// The plugin refused it: its errno and message.
    Refused { errno: i32, message: String },
    /// No reply within [`REPLY_TIMEOUT`].
    TimedOut,
    /// The channel closed (the plugin exited or closed it) before a reply.
    Closed,
}

/// Why a command could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the plugin does not take control commands (it never opened its control channel)")]
    NotSupported,
    #[error("{MAX_PENDING} commands already wait for the plugin's reply")]
    Busy,
    #[error("cannot send the command to the plugin")]
    Send(#[source] Errno),
}

/// The host's side of the channel.
#[derive(Default)]
pub struct PluginControl {
    _private: (),
}

impl PluginControl {
    /// The descriptor the main loop watches for replies, once the plugin
    /// opened the channel.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Forwards `what`; `tag` comes back with its [`Reply`].
    pub fn forward(&mut self, what: Forward, tag: u64) -> Result<(), ForwardError> {
        let _ = (what, tag);
        Err(ForwardError::NotSupported)
    }

    /// Reads what the plugin sent (call when [`Self::fd`] is readable):
    /// the replies that arrived, by tag.
    pub fn on_readable(&mut self) -> Vec<(u64, Reply)> {
        Vec::new()
    }

    /// Commands whose reply is overdue at `now`, answered `TimedOut`.
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, Reply)> {
        let _ = now;
        Vec::new()
    }

    /// When the next reply falls due (for the main loop's timeout).
    pub fn next_deadline(&self) -> Option<Instant> {
        None
    }
}
