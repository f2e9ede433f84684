//! The plugin's control channel (protocol extension,
//! docs/protocol-extensions.md §5): commands a management client sent to
//! vmm's control socket (`powerbtn`, `sleepbtn`, `plugin NAME [JSON]`),
//! forwarded to the plugin, and the plugin's replies; and the snapshot
//! commands `SAVE_STATE` / `RESUMED` (§6, see [`crate::DeviceState`]).
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
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::errno::Errno;
use std::io::{IoSlice, IoSliceMut};

use nix::sys::socket::{recvmsg, sendmsg, MsgFlags};
use plugin_proto::control_command::Kind;
use plugin_proto::main_request;
use plugin_proto::protobuf::Message;
use plugin_proto::{ControlCommand as WireCommand, ControlReply};

use crate::error::{Error, Result};
use crate::migrate::WriteTracker;
use crate::state::{DeviceState, DEVICE_STATE_MAX};
use crate::Connection;

/// Largest JSON document in a command or a reply (the host drops bigger
/// replies).
pub const CONTROL_MAX_JSON: usize = 60 * 1024;

/// Most pages one `DIRTY_PAGES` reply names (its packet stays within the
/// host's bound for a device state: 16 MiB, at most 10 bytes a page).
pub const DIRTY_PAGES_MAX: usize = 1_500_000;

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
    /// A snapshot is being taken (the vcpus are paused): reply with the
    /// device state ([`ControlChannel::reply_state`]). Until
    /// [`ControlKind::Resumed`] the plugin must not write guest memory.
    SaveState,
    /// The snapshot is done and the vcpus run again. Needs no reply (the
    /// host ignores one).
    Resumed,
    /// A live migration asks for the guest pages the plugin wrote itself
    /// since the previous ask (protocol extension §8).
    DirtyPages,
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
            Ok(Kind::SAVE_STATE) => ControlKind::SaveState,
            Ok(Kind::RESUMED) => ControlKind::Resumed,
            Ok(Kind::DIRTY_PAGES) => ControlKind::DirtyPages,
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

    /// Answers `SAVE_STATE` command `id` with the device state `blob`
    /// (at most [`DEVICE_STATE_MAX`] bytes; the host takes no more).
    ///
    /// The blob goes in one packet, so it is also bounded by the socket's
    /// send buffer (the host sizes the plugin's end; the jail does not let
    /// a plugin change it): a bigger blob fails with `EMSGSIZE`.
    pub fn reply_state(&self, id: u64, blob: &[u8]) -> Result<()> {
        if blob.len() > DEVICE_STATE_MAX {
            return Err(Error::InvalidArgument(
                "the device state exceeds DEVICE_STATE_MAX (16 MiB)",
            ));
        }
        self.send_reply(ControlReply {
            id,
            state: blob.to_vec(),
            ..Default::default()
        })
        .map_err(|e| match e {
            Error::Sys { source, .. } => Error::Sys {
                op: "control channel reply with the device state",
                source,
            },
            e => e,
        })
    }

    /// Answers `SAVE_STATE` command `id` from `device`: saves it under the
    /// lock and replies with the blob, or refuses the command `EMSGSIZE`
    /// if the blob is over [`DEVICE_STATE_MAX`]. Touches no guest memory.
    /// Answers `DIRTY_PAGES` command `id` (§8) with the guest-physical
    /// page addresses the plugin wrote since the previous one.
    pub fn reply_dirty_pages(&self, id: u64, pages: &[u64]) -> Result<()> {
        if pages.len() > DIRTY_PAGES_MAX {
            return Err(Error::InvalidArgument(
                "more written pages than DIRTY_PAGES_MAX in one reply",
            ));
        }
        self.send_reply(ControlReply {
            id,
            dirty_pages: pages.to_vec(),
            ..Default::default()
        })
        .map_err(|e| match e {
            Error::Sys { source, .. } => Error::Sys {
                op: "control channel reply with the written pages",
                source,
            },
            e => e,
        })
    }

    pub fn serve_save_state<D: DeviceState + ?Sized>(
        &self,
        id: u64,
        device: &Mutex<D>,
    ) -> Result<()> {
        let blob = device.lock().unwrap_or_else(|e| e.into_inner()).save();
        if blob.len() > DEVICE_STATE_MAX {
            return self.reply_error(
                id,
                libc::EMSGSIZE,
                &format!(
                    "the plugin's device state is {} bytes, more than {DEVICE_STATE_MAX}",
                    blob.len()
                ),
            );
        }
        self.reply_state(id, &blob)
    }

    /// Serves the channel on a thread of its own: every command is given
    /// to `handler`, whose `Ok(json)` or `Err((errno, message))` is sent
    /// back. Commands of unknown kinds are refused `ENOTSUP` without
    /// calling it, and so is `SAVE_STATE` (this plugin keeps no device
    /// state for snapshots: see [`ControlChannel::spawn_handler_with_state`]);
    /// `RESUMED` is given to `handler` but its answer is not sent (the
    /// host expects none). The thread ends with `Ok(())` when the host
    /// closes the channel, or with the first receive or send error.
    pub fn spawn_handler<F>(self, handler: F) -> Result<JoinHandle<Result<()>>>
    where
        F: FnMut(&ControlCommand) -> std::result::Result<Vec<u8>, (i32, String)> + Send + 'static,
    {
        self.spawn_serving(None::<Arc<Mutex<NoDeviceState>>>, handler)
    }

    /// [`ControlChannel::spawn_handler`] for a plugin taking part in
    /// snapshots: `SAVE_STATE` is answered from `device`
    /// ([`ControlChannel::serve_save_state`]) without calling `handler`.
    /// The vcpu threads share `device` through the same mutex.
    pub fn spawn_handler_with_state<D, F>(
        self,
        device: Arc<Mutex<D>>,
        handler: F,
    ) -> Result<JoinHandle<Result<()>>>
    where
        D: DeviceState + Send + 'static,
        F: FnMut(&ControlCommand) -> std::result::Result<Vec<u8>, (i32, String)> + Send + 'static,
    {
        self.spawn_serving(Some(device), handler)
    }

    /// [`Self::spawn_handler_with_state`] for a plugin that writes guest
    /// memory itself (§8): `DIRTY_PAGES` is answered from `tracker`,
    /// `SAVE_STATE` freezes it before the state is taken and `RESUMED`
    /// thaws it (after the handler saw it). Without a tracker the SDK
    /// answers `DIRTY_PAGES` with no pages: a plugin whose only guest
    /// writes are its set-up before `start` needs none.
    pub fn spawn_handler_tracked<D, F>(
        self,
        device: Arc<Mutex<D>>,
        tracker: Arc<WriteTracker>,
        handler: F,
    ) -> Result<JoinHandle<Result<()>>>
    where
        D: DeviceState + Send + 'static,
        F: FnMut(&ControlCommand) -> std::result::Result<Vec<u8>, (i32, String)> + Send + 'static,
    {
        self.spawn_serving_tracked(Some(device), Some(tracker), handler)
    }

    fn spawn_serving<D, F>(
        self,
        device: Option<Arc<Mutex<D>>>,
        handler: F,
    ) -> Result<JoinHandle<Result<()>>>
    where
        D: DeviceState + Send + 'static,
        F: FnMut(&ControlCommand) -> std::result::Result<Vec<u8>, (i32, String)> + Send + 'static,
    {
        self.spawn_serving_tracked(device, None, handler)
    }

    fn spawn_serving_tracked<D, F>(
        self,
        device: Option<Arc<Mutex<D>>>,
        tracker: Option<Arc<WriteTracker>>,
        mut handler: F,
    ) -> Result<JoinHandle<Result<()>>>
    where
        D: DeviceState + Send + 'static,
        F: FnMut(&ControlCommand) -> std::result::Result<Vec<u8>, (i32, String)> + Send + 'static,
    {
        std::thread::Builder::new()
            .name("crosvm_control".into())
            .spawn(move || {
                while let Some(cmd) = self.recv()? {
                    match (&cmd.kind, &device) {
                        (ControlKind::Unknown(k), _) => {
                            self.reply_error(
                                cmd.id,
                                libc::ENOTSUP,
                                &format!("unknown control command kind {k}"),
                            )?;
                            continue;
                        }
                        (ControlKind::SaveState, Some(device)) => {
                            if let Some(t) = &tracker {
                                t.freeze();
                            }
                            self.serve_save_state(cmd.id, device)?;
                            continue;
                        }
                        (ControlKind::DirtyPages, _) => {
                            let pages = tracker.as_ref().map(|t| t.take()).unwrap_or_default();
                            self.reply_dirty_pages(cmd.id, &pages)?;
                            continue;
                        }
                        (ControlKind::SaveState, None) => {
                            self.reply_error(
                                cmd.id,
                                libc::ENOTSUP,
                                "the plugin does not save its device state",
                            )?;
                            continue;
                        }
                        (ControlKind::Resumed, _) => {
                            let _ = handler(&cmd);
                            if let Some(t) = &tracker {
                                t.thaw();
                            }
                            continue;
                        }
                        _ => {}
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

/// The device of a plugin that saves none (never called).
struct NoDeviceState;

impl DeviceState for NoDeviceState {
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }

    fn restore(&mut self, _blob: &[u8]) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::{Arc, Mutex};

    use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
    use plugin_proto::control_command::Kind;
    use plugin_proto::protobuf::{EnumOrUnknown, Message};
    use plugin_proto::{ControlCommand as WireCommand, ControlReply};

    use super::*;

    /// The plugin's channel and the host's end of it.
    fn pair() -> (ControlChannel, OwnedFd) {
        let (host, plugin) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (ControlChannel::from_fd(plugin), host)
    }

    fn host_send(host: &OwnedFd, id: u64, kind: Kind) {
        let cmd = WireCommand {
            id,
            kind: EnumOrUnknown::new(kind),
            ..Default::default()
        };
        send(
            host.as_raw_fd(),
            &cmd.write_to_bytes().unwrap(),
            MsgFlags::empty(),
        )
        .unwrap();
    }

    fn host_recv(host: &OwnedFd) -> ControlReply {
        let mut buf = vec![0u8; 1 << 20];
        let n = recv(host.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        ControlReply::parse_from_bytes(&buf[..n]).unwrap()
    }

    /// A device whose blob is its bytes; `restore` refuses odd lengths.
    struct Bytes(Vec<u8>);

    impl DeviceState for Bytes {
        fn save(&self) -> Vec<u8> {
            self.0.clone()
        }

        fn restore(&mut self, blob: &[u8]) -> Result<()> {
            if blob.len() % 2 == 1 {
                return Err(Error::BadDeviceState(format!("{} bytes", blob.len())));
            }
            self.0 = blob.to_vec();
            Ok(())
        }
    }

    #[test]
    fn save_state_and_resumed_are_decoded() {
        let (plugin, host) = pair();
        host_send(&host, 1, Kind::SAVE_STATE);
        host_send(&host, 2, Kind::RESUMED);
        let a = plugin.recv().unwrap().unwrap();
        assert_eq!((a.id, &a.kind), (1, &ControlKind::SaveState));
        let b = plugin.recv().unwrap().unwrap();
        assert_eq!((b.id, &b.kind), (2, &ControlKind::Resumed));
    }

    #[test]
    fn reply_state_carries_the_blob_and_is_bounded() {
        let (plugin, host) = pair();
        plugin.reply_state(9, b"\x01\x02\x03").unwrap();
        let r = host_recv(&host);
        assert_eq!((r.id, r.errno, &r.state[..]), (9, 0, &b"\x01\x02\x03"[..]));
        assert!(r.json.is_empty());
        // An empty state is a valid one.
        plugin.reply_state(10, b"").unwrap();
        assert_eq!(host_recv(&host).id, 10);
        let err = plugin
            .reply_state(11, &vec![0; DEVICE_STATE_MAX + 1])
            .unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
        assert!(err.to_string().contains("DEVICE_STATE_MAX"), "{err}");
        // Larger than the socket's send buffer: EMSGSIZE naming the
        // operation, and the channel still works.
        let err = plugin.reply_state(12, &vec![7; 8 << 20]).unwrap_err();
        assert_eq!(err.errno(), libc::EMSGSIZE, "{err}");
        assert!(err.to_string().contains("device state"), "{err}");
        plugin.reply_state(13, &[1; 100_000]).unwrap();
        let r = host_recv(&host);
        assert_eq!((r.id, r.state.len()), (13, 100_000));
    }

    #[test]
    fn serve_save_state_saves_under_the_lock() {
        let (plugin, host) = pair();
        let device = Mutex::new(Bytes(b"abcd".to_vec()));
        plugin.serve_save_state(4, &device).unwrap();
        let r = host_recv(&host);
        assert_eq!((r.id, &r.state[..]), (4, &b"abcd"[..]));
        // A device too big for a snapshot is refused, not sent.
        *device.lock().unwrap() = Bytes(vec![0; DEVICE_STATE_MAX + 2]);
        plugin.serve_save_state(5, &device).unwrap();
        let r = host_recv(&host);
        assert_eq!((r.id, r.errno), (5, libc::EMSGSIZE));
        assert!(r.state.is_empty());
        assert!(r.message.contains("device state"), "{}", r.message);
    }

    #[test]
    fn handler_threads_answer_save_state_and_skip_resumed() {
        // With a device: SAVE_STATE from it, RESUMED reaches the handler
        // but gets no reply, custom commands go to the handler.
        let (plugin, host) = pair();
        let device = Arc::new(Mutex::new(Bytes(b"xy".to_vec())));
        let resumed = Arc::new(Mutex::new(0));
        let seen = resumed.clone();
        let thread = plugin
            .spawn_handler_with_state(device.clone(), move |cmd| {
                if cmd.kind == ControlKind::Resumed {
                    *seen.lock().unwrap() += 1;
                }
                Ok(b"1".to_vec())
            })
            .unwrap();
        host_send(&host, 1, Kind::SAVE_STATE);
        let r = host_recv(&host);
        assert_eq!((r.id, r.errno, &r.state[..]), (1, 0, &b"xy"[..]));
        // The vcpu thread changes the device; the next snapshot sees it.
        device.lock().unwrap().restore(b"zzzz").unwrap();
        assert!(device.lock().unwrap().restore(b"odd").is_err());
        host_send(&host, 2, Kind::RESUMED);
        host_send(&host, 3, Kind::SAVE_STATE);
        host_send(&host, 4, Kind::CUSTOM);
        let r = host_recv(&host);
        assert_eq!(
            (r.id, &r.state[..]),
            (3, &b"zzzz"[..]),
            "no reply to RESUMED"
        );
        let r = host_recv(&host);
        assert_eq!((r.id, &r.json[..]), (4, &b"1"[..]));
        assert_eq!(*resumed.lock().unwrap(), 1);
        drop(host);
        thread.join().unwrap().unwrap();

        // Without one: SAVE_STATE is refused ENOTSUP.
        let (plugin, host) = pair();
        let thread = plugin.spawn_handler(|_| Ok(b"null".to_vec())).unwrap();
        host_send(&host, 7, Kind::SAVE_STATE);
        let r = host_recv(&host);
        assert_eq!((r.id, r.errno), (7, libc::ENOTSUP));
        assert!(r.message.contains("device state"), "{}", r.message);
        drop(host);
        thread.join().unwrap().unwrap();
    }
}
