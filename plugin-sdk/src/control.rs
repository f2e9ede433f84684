//! The plugin's control channel (protocol extension,
//! docs/protocol-extensions.md §5): commands a management client sent to
//! vmm's control socket (`powerbtn`, `sleepbtn`, `plugin NAME [JSON]`),
//! forwarded to the plugin, and the plugin's replies.
//!
//! ```no_run
//! use crosvm_plugin::{Connection, ControlKind};
//!
//! let conn = Connection::from_env()?;
//! let control = conn.control_channel()?;
//! let handler = control.spawn_handler(|cmd| match &cmd.kind {
//!     ControlKind::PowerButton => Ok(b"null".to_vec()),
//!     ControlKind::Custom(name) if name == "ping" => Ok(br#""pong""#.to_vec()),
//!     _ => Err((libc::ENOTSUP, "unknown command".into())),
//! })?;
//! # drop(handler);
//! # Ok::<(), crosvm_plugin::Error>(())
//! ```

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::thread::JoinHandle;

use nix::errno::Errno;
use std::io::{IoSlice, IoSliceMut};

use nix::sys::socket::{recvmsg, sendmsg, MsgFlags};
use plugin_proto::control_command::Kind;
use plugin_proto::main_request;
use plugin_proto::protobuf::Message;
use plugin_proto::{ControlCommand as WireCommand, ControlReply};

use crate::error::{Error, Result};
use crate::Connection;

/// Largest JSON document in a command or a reply (the host drops bigger
/// replies).
pub const CONTROL_MAX_JSON: usize = 60 * 1024;

/// Largest packet the host sends on the channel.
const MAX_PACKET: usize = CONTROL_MAX_JSON + 4096;

/// What a forwarded command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlKind {
    /// `powerbtn`: the machine's power button was pressed.
    PowerButton,
    /// `sleepbtn`: the machine's sleep button was pressed.
    SleepButton,
    /// `plugin NAME [JSON]`: a command the plugin defines.
    Custom(String),
    /// A kind this SDK does not know (a newer host); answer it `ENOTSUP`.
    Unknown(i32),
}

/// A forwarded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlCommand {
    /// Pass it back to [`ControlChannel::reply_ok`] / [`ControlChannel::reply_error`].
    pub id: u64,
    pub kind: ControlKind,
    /// The arguments, a UTF-8 JSON document (`null` when there are none).
    pub args: Vec<u8>,
}

/// The plugin's end of the control channel, from
/// [`Connection::control_channel`]. `recv` and the replies may be called
/// from different threads (each takes `&self`).
#[derive(Debug)]
pub struct ControlChannel {
    sock: OwnedFd,
    buf: Mutex<Vec<u8>>,
}

impl Connection {
    /// Opens the control channel (`GetControlSocket`): from now on the
    /// host forwards control commands to this plugin instead of answering
    /// them `not-supported`. `EEXIST` if the plugin already holds one;
    /// `ENOTTY` (or `ENOTSUP`) from a host without the extension.
    pub fn control_channel(&self) -> Result<ControlChannel> {
        let mut req = plugin_proto::MainRequest::new();
        req.set_get_control_socket(main_request::GetControlSocket::new());
        let (_, fds) = self.transact("get_control_socket", &req, &[])?;
        let sock = fds.into_iter().next().ok_or(Error::Protocol(
            "get_control_socket reply carries no descriptor",
        ))?;
        Ok(ControlChannel::from_fd(sock))
    }
}

impl ControlChannel {
    /// Uses `sock`, the plugin's end of a control channel.
    pub fn from_fd(sock: OwnedFd) -> ControlChannel {
        ControlChannel {
            sock,
            buf: Mutex::new(Vec::new()),
        }
    }

    /// The descriptor to poll: readable when a command (or the host's
    /// hang-up) is there.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Waits for the next command. `Ok(None)`: the host closed the channel
    /// (vmm is exiting).
    pub fn recv(&self) -> Result<Option<ControlCommand>> {
        self.recv_with(MsgFlags::empty())
    }

    /// The next command if one is there; `Err` with `EAGAIN` if none is.
    pub fn try_recv(&self) -> Result<Option<ControlCommand>> {
        self.recv_with(MsgFlags::MSG_DONTWAIT)
    }

    fn recv_with(&self, flags: MsgFlags) -> Result<Option<ControlCommand>> {
        const OP: &str = "control channel receive";
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if buf.len() < MAX_PACKET {
            buf.resize(MAX_PACKET, 0);
        }
        // recvmsg, not recv: the jail's seccomp policy allows the calls the
        // main connection uses. No control buffer: descriptors attached to
        // a packet are closed by the kernel.
        let (n, truncated) = loop {
            let mut iov = [IoSliceMut::new(&mut buf[..])];
            match recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, None, flags) {
                Ok(m) => break (m.bytes, m.flags.contains(MsgFlags::MSG_TRUNC)),
                Err(Errno::EINTR) => continue,
                Err(source) => return Err(Error::Sys { op: OP, source }),
            }
        };
        if truncated {
            return Err(Error::Protocol(
                "the host sent a control command larger than the protocol allows",
            ));
        }
        if n == 0 {
            return Ok(None);
        }
        let bytes = &buf[..n];
        plugin_proto::framing::check_lengths(bytes, &[])
            .map_err(|_| Error::Protocol("the host sent a malformed control command"))?;
        let wire = WireCommand::parse_from_bytes(bytes).map_err(Error::decode(OP))?;
        let kind = match wire.kind.enum_value() {
            Ok(Kind::POWER_BUTTON) => ControlKind::PowerButton,
            Ok(Kind::SLEEP_BUTTON) => ControlKind::SleepButton,
            Ok(Kind::CUSTOM) => ControlKind::Custom(wire.name),
            // Issue 12 (§6) kinds: delivered as unknown until the SDK
            // serves them.
            Ok(k @ (Kind::SAVE_STATE | Kind::RESUMED)) => ControlKind::Unknown(k as i32),
            Err(v) => ControlKind::Unknown(v),
        };
        let args = if wire.json.is_empty() {
            b"null".to_vec()
        } else {
            wire.json
        };
        Ok(Some(ControlCommand {
            id: wire.id,
            kind,
            args,
        }))
    }

    fn send_reply(&self, reply: ControlReply) -> Result<()> {
        const OP: &str = "control channel reply";
        let bytes = reply
            .write_to_bytes()
            .map_err(|source| Error::Encode { op: OP, source })?;
        loop {
            let iov = [IoSlice::new(&bytes)];
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                &[],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(source) => return Err(Error::Sys { op: OP, source }),
            }
        }
    }

    /// Answers command `id` with success and `json` (a UTF-8 JSON document,
    /// at most [`CONTROL_MAX_JSON`] bytes; empty means `null`). Not checked
    /// to be JSON here: the host refuses an invalid one to the client.
    pub fn reply_ok(&self, id: u64, json: &[u8]) -> Result<()> {
        if json.len() > CONTROL_MAX_JSON {
            return Err(Error::InvalidArgument(
                "the reply's JSON exceeds CONTROL_MAX_JSON",
            ));
        }
        self.send_reply(ControlReply {
            id,
            json: json.to_vec(),
            ..Default::default()
        })
    }

    /// Refuses command `id` with a positive `errno` and a message for the
    /// client.
    pub fn reply_error(&self, id: u64, errno: i32, message: &str) -> Result<()> {
        if errno <= 0 {
            return Err(Error::InvalidArgument("a refusal needs a positive errno"));
        }
        let mut message = message;
        if message.len() > CONTROL_MAX_JSON {
            let mut cut = CONTROL_MAX_JSON;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message = &message[..cut];
        }
        self.send_reply(ControlReply {
            id,
            errno,
            message: message.to_owned(),
            ..Default::default()
        })
    }

    /// Serves the channel on a thread of its own: every command is given
    /// to `handler`, whose `Ok(json)` or `Err((errno, message))` is sent
    /// back. Commands of unknown kinds are refused `ENOTSUP` without
    /// calling it. The thread ends with `Ok(())` when the host closes the
    /// channel, or with the first receive or send error.
    pub fn spawn_handler<F>(self, mut handler: F) -> Result<JoinHandle<Result<()>>>
    where
        F: FnMut(&ControlCommand) -> std::result::Result<Vec<u8>, (i32, String)> + Send + 'static,
    {
        std::thread::Builder::new()
            .name("crosvm_control".into())
            .spawn(move || {
                while let Some(cmd) = self.recv()? {
                    if let ControlKind::Unknown(k) = cmd.kind {
                        self.reply_error(
                            cmd.id,
                            libc::ENOTSUP,
                            &format!("unknown control command kind {k}"),
                        )?;
                        continue;
                    }
                    match handler(&cmd) {
                        Ok(json) if json.len() > CONTROL_MAX_JSON => self.reply_error(
                            cmd.id,
                            libc::EMSGSIZE,
                            &format!(
                                "the plugin's result is {} bytes, more than {CONTROL_MAX_JSON}",
                                json.len()
                            ),
                        )?,
                        Ok(json) => self.reply_ok(cmd.id, &json)?,
                        Err((errno, message)) => self.reply_error(cmd.id, errno, &message)?,
                    }
                }
                Ok(())
            })
            .map_err(|e| Error::Sys {
                op: "spawning the control handler thread",
                source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
            })
    }
}
