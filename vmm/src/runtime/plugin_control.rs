//! The plugin's control channel (docs/protocol-extensions.md §5): control
//! commands forwarded to the plugin (`powerbtn`, `sleepbtn`, `plugin NAME`)
//! and the plugin's replies. A plugin opts in by asking for the channel;
//! an older plugin never does, and forwarding to it is `ENOTSUP`.
//!
//! Owned by the main loop; never blocks it: the host's end is non-blocking,
//! at most [`MAX_PENDING`] commands wait for a reply, and a reply that does
//! not come within [`REPLY_TIMEOUT`] times out.
//!
//! Everything the plugin sends is hostile: a reply to an id that is not
//! waiting, an undecodable or oversize packet, a flood of packets, or
//! descriptors attached to a packet are dropped (with a log line) and
//! change nothing; the channel closing answers every waiting command
//! `Closed`. A single [`PluginControl::on_readable`] call reads at most
//! [`MAX_PACKETS_PER_CALL`] packets, so a flood cannot hold the main loop
//! (epoll is level-triggered: the rest is read on the next round).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::socket::{recv, send, MsgFlags};
use plugin_proto::control_command::Kind;
use plugin_proto::protobuf::{EnumOrUnknown, Message};
use plugin_proto::{ControlCommand, ControlReply};
use serde_json::Value;

/// Most forwarded commands waiting for the plugin's reply.
pub const MAX_PENDING: usize = 64;

/// How long the plugin has to answer a forwarded command.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest JSON document in a command or a reply (the arguments the host
/// sends, the result the plugin sends).
pub const MAX_JSON: usize = 60 * 1024;

/// Longest custom command name (`plugin NAME`).
pub const MAX_NAME: usize = 256;

/// Longest refusal message kept from a reply; longer ones are cut.
pub const MAX_MESSAGE: usize = 1024;

/// Largest packet on the channel in either direction: a command or reply
/// with [`MAX_JSON`] of JSON plus its other fields. A bigger reply is
/// dropped unread.
pub const MAX_PACKET: usize = MAX_JSON + 4096;

/// Most packets one [`PluginControl::on_readable`] call reads.
pub const MAX_PACKETS_PER_CALL: usize = 128;

/// What is forwarded: the dispatcher's commands for the plugin.
pub use crate::control::dispatch::Forward;

/// The plugin's answer to a forwarded command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Success, with the plugin's JSON result (`null` when it sent none).
    Ok(Value),
    /// The device state answering `SaveState` (at most
    /// [`crate::snapshot::MAX_DEVICE_STATE`] bytes).
    State(Vec<u8>),
    /// The pages the plugin wrote since the previous `DirtyPages`
    /// (guest-physical addresses, unchecked: the migration checks them).
    DirtyPages(Vec<u64>),
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
    /// `EPIPE`: the plugin closed its channel; `EMSGSIZE`: the arguments
    /// exceed [`MAX_JSON`] or the name [`MAX_NAME`]; `EAGAIN`: the plugin
    /// does not read its channel and the socket buffer is full.
    #[error("cannot send the command to the plugin")]
    Send(#[source] Errno),
}

/// A command waiting for its reply.
struct Pending {
    tag: u64,
    deadline: Instant,
    /// It is a `SaveState`: the reply's `state` is what counts.
    save_state: bool,
    /// It is a `DirtyPages` (§8): the reply's `dirty_pages` count.
    dirty: bool,
}

/// Largest packet while a `SaveState` waits: the device state and the
/// reply's other fields.
pub const MAX_STATE_PACKET: usize = crate::snapshot::MAX_DEVICE_STATE + 4096;

/// The host's side of the channel.
#[derive(Default)]
pub struct PluginControl {
    /// The host's end (non-blocking), while the channel is open.
    sock: Option<OwnedFd>,
    /// The plugin opened a channel at some point (a closed channel makes
    /// forwarding `EPIPE`, not `NotSupported`).
    ever_opened: bool,
    /// Set by [`Self::open`], cleared by [`Self::newly_opened`].
    unwatched: bool,
    /// Wire id of the last command sent; ids start at 1 and are never
    /// reused, so a late reply to a timed-out command cannot answer a
    /// newer one.
    last_id: u64,
    /// Waiting commands by wire id. Every deadline is its send time plus
    /// the same timeout, so id order is deadline order.
    pending: BTreeMap<u64, Pending>,
    recv_buf: Vec<u8>,
    /// Packets dropped so far: the first few are logged as warnings, the
    /// rest at debug level, so a flood of garbage cannot flood the log.
    dropped: u64,
}

/// Dropped packets logged as warnings; later ones are logged at debug.
const WARN_DROPPED: u64 = 8;

impl PluginControl {
    /// The descriptor the main loop watches for replies, once the plugin
    /// opened the channel.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.sock.as_ref().map(|s| s.as_fd())
    }

    /// Whether the plugin's channel is open.
    pub fn is_open(&self) -> bool {
        self.sock.is_some()
    }

    /// `GetControlSocket`: creates the channel and returns the plugin's end
    /// (blocking, like its main connection; the host's end is not).
    /// `EEXIST` while a channel is open; after the plugin closed it, a new
    /// one may be opened.
    pub fn open(&mut self) -> Result<OwnedFd, Errno> {
        if self.sock.is_some() {
            return Err(Errno::EEXIST);
        }
        let (host, plugin) = super::main_handler::seqpacket_pair()?;
        self.sock = Some(host);
        self.ever_opened = true;
        self.unwatched = true;
        Ok(plugin)
    }

    /// The descriptor of a channel opened since the last call, once: for
    /// the main loop to add it to its epoll set. (A closed channel's
    /// descriptor leaves the set by itself when it is closed.)
    pub fn newly_opened(&mut self) -> Option<BorrowedFd<'_>> {
        if !std::mem::take(&mut self.unwatched) {
            return None;
        }
        self.fd()
    }

    /// Hot restart: closes the channel of a plugin being replaced; every
    /// waiting command is answered closed.
    pub fn detach(&mut self) -> Vec<(u64, Reply)> {
        let mut out = Vec::new();
        if self.sock.is_some() {
            self.close(&mut out);
        }
        out
    }

    /// Number of commands waiting for a reply.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Forwards `what`; `tag` comes back with its [`Reply`].
    pub fn forward(&mut self, what: Forward, tag: u64) -> Result<(), ForwardError> {
        let Some(sock) = &self.sock else {
            return Err(if self.ever_opened {
                ForwardError::Send(Errno::EPIPE)
            } else {
                ForwardError::NotSupported
            });
        };
        if self.pending.len() >= MAX_PENDING {
            return Err(ForwardError::Busy);
        }
        let id = self.last_id + 1;
        let mut cmd = ControlCommand {
            id,
            ..Default::default()
        };
        let save_state = what == Forward::SaveState;
        let dirty = what == Forward::DirtyPages;
        let wait = what != Forward::Resumed;
        match what {
            Forward::SaveState => {
                cmd.kind = EnumOrUnknown::new(Kind::SAVE_STATE);
                cmd.json = b"null".to_vec();
            }
            Forward::DirtyPages => {
                cmd.kind = EnumOrUnknown::new(Kind::DIRTY_PAGES);
                cmd.json = b"null".to_vec();
            }
            Forward::Resumed => {
                cmd.kind = EnumOrUnknown::new(Kind::RESUMED);
                cmd.json = b"null".to_vec();
            }
            Forward::PowerButton => {
                cmd.kind = EnumOrUnknown::new(Kind::POWER_BUTTON);
                cmd.json = b"null".to_vec();
            }
            Forward::SleepButton => {
                cmd.kind = EnumOrUnknown::new(Kind::SLEEP_BUTTON);
                cmd.json = b"null".to_vec();
            }
            Forward::Plugin { name, args } => {
                if name.len() > MAX_NAME {
                    return Err(ForwardError::Send(Errno::EMSGSIZE));
                }
                cmd.kind = EnumOrUnknown::new(Kind::CUSTOM);
                cmd.name = name;
                // Serializing a `Value` cannot fail (its keys are strings).
                cmd.json = serde_json::to_vec(&args).unwrap_or_else(|_| b"null".to_vec());
                if cmd.json.len() > MAX_JSON {
                    return Err(ForwardError::Send(Errno::EMSGSIZE));
                }
            }
        }
        let bytes = cmd
            .write_to_bytes()
            .map_err(|_| ForwardError::Send(Errno::EINVAL))?;
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match send(sock.as_raw_fd(), &bytes, flags) {
            Ok(n) if n == bytes.len() => {}
            Ok(_) => return Err(ForwardError::Send(Errno::EIO)),
            Err(e @ (Errno::EPIPE | Errno::ECONNRESET)) => {
                // The plugin is gone: what waits will never be answered.
                // The caller learns it from the next `on_readable`, which
                // sees the hang-up.
                return Err(ForwardError::Send(e));
            }
            Err(e) => return Err(ForwardError::Send(e)),
        }
        self.last_id = id;
        if wait {
            self.pending.insert(
                id,
                Pending {
                    tag,
                    deadline: Instant::now() + REPLY_TIMEOUT,
                    save_state,
                    dirty,
                },
            );
        }
        Ok(())
    }

    /// Reads what the plugin sent (call when [`Self::fd`] is readable):
    /// the replies that arrived, by tag.
    pub fn on_readable(&mut self) -> Vec<(u64, Reply)> {
        let mut out = Vec::new();
        if self.recv_buf.len() < MAX_PACKET {
            self.recv_buf = vec![0; MAX_PACKET];
        }
        for _ in 0..MAX_PACKETS_PER_CALL {
            let Some(sock) = &self.sock else {
                break;
            };
            // MSG_TRUNC: the packet's real length, so an oversize one is
            // recognised (and dropped whole). Descriptors attached to a
            // packet are closed by the kernel, since no control buffer is
            // given.
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC;
            if self.pending.values().any(|p| p.save_state || p.dirty) {
                // A device state may be bigger than any other packet: the
                // buffer grows to the packet's size (bounded), for as long
                // as it is needed.
                if let Ok(n) = recv(sock.as_raw_fd(), &mut [0u8; 1], flags | MsgFlags::MSG_PEEK) {
                    if n > self.recv_buf.len() && n <= MAX_STATE_PACKET {
                        self.recv_buf = vec![0; n];
                    }
                }
            }
            match recv(sock.as_raw_fd(), &mut self.recv_buf, flags) {
                // End of file, or an empty packet (which no reply is: ids
                // start at 1, so a reply always has a non-empty encoding).
                Ok(0) if !hung_up(sock.as_fd()) => {
                    debug!("control channel: dropping an empty packet from the plugin");
                }
                Ok(0) => {
                    debug!("the plugin closed its control channel");
                    self.close(&mut out);
                }
                Ok(n) if n > self.recv_buf.len() => {
                    self.dropped(format_args!(
                        "dropping a {n}-byte packet from the plugin (at most {MAX_PACKET}, \
                         {MAX_STATE_PACKET} for a device state or dirty pages)"
                    ));
                }
                Ok(n) => {
                    if let Some(r) = self.take_reply(n) {
                        out.push(r);
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("control channel: reading failed ({e}); closing it");
                    self.close(&mut out);
                }
            }
        }
        out
    }

    /// Decodes the `n`-byte packet in the buffer and matches it to its
    /// command.
    fn take_reply(&mut self, n: usize) -> Option<(u64, Reply)> {
        let bytes = &self.recv_buf[..n];
        let reply = match plugin_proto::framing::check_lengths(bytes, &[])
            .ok()
            .and_then(|()| ControlReply::parse_from_bytes(bytes).ok())
        {
            Some(r) => r,
            None => {
                self.dropped(format_args!(
                    "dropping an undecodable {n}-byte packet from the plugin"
                ));
                return None;
            }
        };
        let Some(p) = self.pending.remove(&reply.id) else {
            debug!(
                "control channel: dropping a reply to command {}, which is not waiting",
                reply.id
            );
            return None;
        };
        if self.recv_buf.len() > MAX_PACKET
            && !self.pending.values().any(|p| p.save_state || p.dirty)
        {
            self.recv_buf = vec![0; MAX_PACKET];
        }
        if p.save_state {
            return Some((p.tag, decode_state(reply)));
        }
        if p.dirty && reply.errno == 0 {
            return Some((p.tag, Reply::DirtyPages(reply.dirty_pages)));
        }
        Some((p.tag, decode_reply(reply)))
    }

    fn dropped(&mut self, what: std::fmt::Arguments<'_>) {
        self.dropped += 1;
        if self.dropped <= WARN_DROPPED {
            let more = if self.dropped == WARN_DROPPED {
                " (further dropped packets are logged at debug level)"
            } else {
                ""
            };
            warn!("control channel: {what}{more}");
        } else {
            debug!("control channel: {what}");
        }
    }

    /// The channel is gone: every waiting command is answered `Closed`.
    fn close(&mut self, out: &mut Vec<(u64, Reply)>) {
        self.sock = None;
        self.unwatched = false;
        out.extend(
            std::mem::take(&mut self.pending)
                .into_values()
                .map(|p| (p.tag, Reply::Closed)),
        );
    }

    /// Commands whose reply is overdue at `now`, answered `TimedOut`.
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, Reply)> {
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().deadline > now {
                break;
            }
            out.push((entry.remove().tag, Reply::TimedOut));
        }
        out
    }

    /// When the next reply falls due (for the main loop's timeout).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().next().map(|p| p.deadline)
    }
}

/// Whether the peer closed its end (checked without waiting).
fn hung_up(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => true,
    }
}

/// A reply to `SaveState`: its device state, or why there is none.
fn decode_state(r: ControlReply) -> Reply {
    if r.errno != 0 {
        return decode_reply(r);
    }
    if r.state.len() > crate::snapshot::MAX_DEVICE_STATE {
        return Reply::Refused {
            errno: libc::EMSGSIZE,
            message: format!(
                "the device state is {} bytes, more than {}",
                r.state.len(),
                crate::snapshot::MAX_DEVICE_STATE
            ),
        };
    }
    Reply::State(r.state)
}

/// What a reply means for the control client.
fn decode_reply(r: ControlReply) -> Reply {
    if r.errno != 0 {
        let mut message = r.message;
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        if r.errno < 0 {
            return Reply::Refused {
                errno: libc::EPROTO,
                message: format!(
                    "the plugin replied with a negative errno ({}): {message}",
                    r.errno
                ),
            };
        }
        return Reply::Refused {
            errno: r.errno,
            message,
        };
    }
    if r.json.is_empty() {
        return Reply::Ok(Value::Null);
    }
    if r.json.len() > MAX_JSON {
        return Reply::Refused {
            errno: libc::EMSGSIZE,
            message: format!(
                "the plugin's result is {} bytes of JSON, more than {MAX_JSON}",
                r.json.len()
            ),
        };
    }
    match serde_json::from_slice(&r.json) {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Refused {
            errno: libc::EPROTO,
            message: format!("the plugin's result is not valid JSON: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use serde_json::json;

    /// The plugin's end, read and written like a (possibly hostile) plugin.
    struct FakePlugin(OwnedFd);

    impl FakePlugin {
        fn recv(&self) -> ControlCommand {
            let mut buf = vec![0u8; MAX_PACKET];
            let n = recv(self.0.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).unwrap();
            ControlCommand::parse_from_bytes(&buf[..n]).unwrap()
        }
        fn send_raw(&self, bytes: &[u8]) {
            let n = send(self.0.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL).unwrap();
            assert_eq!(n, bytes.len());
        }
        fn reply(&self, id: u64, errno: i32, json: &[u8], message: &str) {
            let r = ControlReply {
                id,
                errno,
                json: json.to_vec(),
                message: message.into(),
                ..Default::default()
            };
            self.send_raw(&r.write_to_bytes().unwrap());
        }
    }

    fn opened() -> (PluginControl, FakePlugin) {
        let mut c = PluginControl::default();
        let plugin = c.open().unwrap();
        (c, FakePlugin(plugin))
    }

    fn flags(fd: BorrowedFd<'_>) -> OFlag {
        OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap())
    }

    #[test]
    fn a_plugin_that_never_asks_gets_nothing() {
        let mut c = PluginControl::default();
        assert!(c.fd().is_none());
        assert!(matches!(
            c.forward(Forward::PowerButton, 1),
            Err(ForwardError::NotSupported)
        ));
        assert!(c.on_readable().is_empty());
        assert!(c.next_deadline().is_none());
    }

    #[test]
    fn open_twice_is_eexist_and_host_end_does_not_block() {
        let (mut c, plugin) = opened();
        assert_eq!(c.open().unwrap_err(), Errno::EEXIST);
        assert!(flags(c.fd().unwrap()).contains(OFlag::O_NONBLOCK));
        assert!(!flags(plugin.0.as_fd()).contains(OFlag::O_NONBLOCK));
        // Watched once.
        assert!(c.newly_opened().is_some());
        assert!(c.newly_opened().is_none());
    }

    #[test]
    fn forward_and_reply_round_trip() {
        let (mut c, plugin) = opened();
        c.forward(Forward::PowerButton, 10).unwrap();
        c.forward(Forward::SleepButton, 11).unwrap();
        c.forward(
            Forward::Plugin {
                name: "count".into(),
                args: json!({"x": [1, 2]}),
            },
            12,
        )
        .unwrap();
        assert_eq!(c.pending(), 3);
        assert!(c.next_deadline().is_some());
        let a = plugin.recv();
        assert_eq!(a.kind.enum_value(), Ok(Kind::POWER_BUTTON));
        let b = plugin.recv();
        assert_eq!(b.kind.enum_value(), Ok(Kind::SLEEP_BUTTON));
        let p = plugin.recv();
        assert_eq!(p.kind.enum_value(), Ok(Kind::CUSTOM));
        assert_eq!(p.name, "count");
        let args: Value = serde_json::from_slice(&p.json).unwrap();
        assert_eq!(args, json!({"x": [1, 2]}));
        // Out of order, with each kind of answer.
        plugin.reply(p.id, 0, br#"{"count": 7}"#, "");
        plugin.reply(a.id, 0, b"", "");
        plugin.reply(b.id, libc::ENOTSUP, b"", "no sleep button");
        let replies = c.on_readable();
        assert_eq!(
            replies,
            vec![
                (12, Reply::Ok(json!({"count": 7}))),
                (10, Reply::Ok(Value::Null)),
                (
                    11,
                    Reply::Refused {
                        errno: libc::ENOTSUP,
                        message: "no sleep button".into()
                    }
                ),
            ]
        );
        assert_eq!(c.pending(), 0);
        assert!(c.next_deadline().is_none());
    }

    #[test]
    fn overdue_replies_time_out_and_late_ones_are_ignored() {
        let (mut c, plugin) = opened();
        let before = Instant::now();
        c.forward(Forward::PowerButton, 1).unwrap();
        c.forward(Forward::PowerButton, 2).unwrap();
        let deadline = c.next_deadline().unwrap();
        assert!(deadline >= before + REPLY_TIMEOUT);
        assert!(c.expire(before).is_empty());
        let later = deadline + REPLY_TIMEOUT;
        assert_eq!(
            c.expire(later),
            vec![(1, Reply::TimedOut), (2, Reply::TimedOut)]
        );
        assert!(c.next_deadline().is_none());
        // The late replies answer nothing, and a new command gets a new id.
        let first = plugin.recv();
        plugin.reply(first.id, 0, b"1", "");
        assert!(c.on_readable().is_empty());
        c.forward(Forward::PowerButton, 3).unwrap();
        let _second = plugin.recv();
        let third = plugin.recv();
        assert_ne!(third.id, first.id);
        plugin.reply(third.id, 0, b"3", "");
        assert_eq!(c.on_readable(), vec![(3, Reply::Ok(json!(3)))]);
    }

    #[test]
    fn garbage_unknown_ids_bad_json_and_oversize_are_harmless() {
        let (mut c, plugin) = opened();
        c.forward(Forward::PowerButton, 5).unwrap();
        let cmd = plugin.recv();
        // Undecodable: a field cut short, a bad wire type.
        plugin.send_raw(&[0x0a, 0x7f, 1, 2]);
        plugin.send_raw(&[0xff; 32]);
        // Unknown id, and an empty packet (id 0, which is never used).
        plugin.reply(cmd.id + 1000, 0, b"1", "");
        plugin.send_raw(&[]);
        // Oversize packet (whole, bigger than MAX_PACKET).
        plugin.send_raw(&vec![0u8; MAX_PACKET + 100]);
        assert!(c.on_readable().is_empty());
        assert_eq!(c.pending(), 1);
        // A reply with descriptors attached: the descriptor is not kept.
        let r = ControlReply {
            id: cmd.id,
            json: b"{not json".to_vec(),
            ..Default::default()
        };
        let bytes = r.write_to_bytes().unwrap();
        let extra = PluginControl::default().open().unwrap();
        plugin_proto::framing::send_packet(plugin.0.as_fd(), &bytes, &[extra.as_fd()]).unwrap();
        let replies = c.on_readable();
        assert_eq!(replies.len(), 1);
        match &replies[0] {
            (5, Reply::Refused { errno, message }) => {
                assert_eq!(*errno, libc::EPROTO);
                assert!(message.contains("not valid JSON"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The channel still works.
        c.forward(Forward::SleepButton, 6).unwrap();
        let cmd = plugin.recv();
        plugin.reply(cmd.id, -3, b"", &"x".repeat(10 * MAX_MESSAGE));
        match &c.on_readable()[..] {
            [(6, Reply::Refused { errno, message })] => {
                assert_eq!(*errno, libc::EPROTO);
                assert!(message.len() < 2 * MAX_MESSAGE);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_flood_is_read_in_bounded_rounds() {
        let (mut c, plugin) = opened();
        c.forward(Forward::PowerButton, 9).unwrap();
        let cmd = plugin.recv();
        // Fill the socket with replies to unknown ids (non-blocking so the
        // test stops when the buffer is full), then the real reply.
        let junk = ControlReply {
            id: u64::MAX,
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap();
        let mut sent = 0;
        while sent < 4 * MAX_PACKETS_PER_CALL
            && send(
                plugin.0.as_raw_fd(),
                &junk,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            )
            .is_ok()
        {
            sent += 1;
        }
        assert!(sent > MAX_PACKETS_PER_CALL, "only {sent} packets fit");
        // One round reads its bound of junk and nothing else.
        assert!(c.on_readable().is_empty());
        assert_eq!(c.pending(), 1);
        plugin.reply(cmd.id, 0, b"true", "");
        let mut got = Vec::new();
        let mut rounds = 1;
        while got.is_empty() {
            rounds += 1;
            assert!(rounds < 100, "the reply never came");
            got = c.on_readable();
        }
        assert!(
            rounds as usize >= sent.div_ceil(MAX_PACKETS_PER_CALL),
            "{rounds} rounds read {sent} packets: more than the bound per round"
        );
        assert_eq!(got, vec![(9, Reply::Ok(json!(true)))]);
    }

    #[test]
    fn closing_answers_every_waiting_command() {
        let (mut c, plugin) = opened();
        c.forward(Forward::PowerButton, 1).unwrap();
        c.forward(Forward::SleepButton, 2).unwrap();
        drop(plugin);
        assert_eq!(
            c.on_readable(),
            vec![(1, Reply::Closed), (2, Reply::Closed)]
        );
        assert!(c.fd().is_none());
        assert!(matches!(
            c.forward(Forward::PowerButton, 3),
            Err(ForwardError::Send(Errno::EPIPE))
        ));
        // A new channel may be opened after the old one closed.
        let plugin = FakePlugin(c.open().unwrap());
        c.forward(Forward::PowerButton, 4).unwrap();
        let cmd = plugin.recv();
        plugin.reply(cmd.id, 0, b"", "");
        assert_eq!(c.on_readable(), vec![(4, Reply::Ok(Value::Null))]);
    }

    #[test]
    fn at_most_max_pending_and_bounded_arguments() {
        let (mut c, _plugin) = opened();
        for tag in 0..MAX_PENDING as u64 {
            c.forward(Forward::PowerButton, tag).unwrap();
        }
        assert!(matches!(
            c.forward(Forward::PowerButton, 99),
            Err(ForwardError::Busy)
        ));
        let (mut c, _plugin) = opened();
        let big = Forward::Plugin {
            name: "x".into(),
            args: Value::String("a".repeat(MAX_JSON)),
        };
        assert!(matches!(
            c.forward(big, 1),
            Err(ForwardError::Send(Errno::EMSGSIZE))
        ));
        let long = Forward::Plugin {
            name: "n".repeat(MAX_NAME + 1),
            args: Value::Null,
        };
        assert!(matches!(
            c.forward(long, 1),
            Err(ForwardError::Send(Errno::EMSGSIZE))
        ));
        assert_eq!(c.pending(), 0);
    }

    fn state_reply(id: u64, state: Vec<u8>) -> Vec<u8> {
        ControlReply {
            id,
            state,
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap()
    }

    #[test]
    fn save_state_gets_the_state_resumed_waits_for_nothing() {
        let (mut c, plugin) = opened();
        c.forward(Forward::SaveState, 1).unwrap();
        let cmd = plugin.recv();
        assert_eq!(cmd.kind.enum_value(), Ok(Kind::SAVE_STATE));
        // Bigger than any other packet on the channel: read whole.
        let big: Vec<u8> = (0..200 * 1024).map(|i| i as u8).collect();
        plugin.send_raw(&state_reply(cmd.id, big.clone()));
        assert_eq!(c.on_readable(), vec![(1, Reply::State(big))]);
        c.forward(Forward::Resumed, 2).unwrap();
        assert_eq!(plugin.recv().kind.enum_value(), Ok(Kind::RESUMED));
        assert_eq!(c.pending(), 0, "RESUMED waits for no reply");
        // A reply to it anyway is dropped.
        plugin.reply(2, 0, b"", "");
        assert!(c.on_readable().is_empty());
        // An empty state is a state (the plugin has none).
        c.forward(Forward::SaveState, 3).unwrap();
        let cmd = plugin.recv();
        plugin.send_raw(&state_reply(cmd.id, Vec::new()));
        assert_eq!(c.on_readable(), vec![(3, Reply::State(Vec::new()))]);
    }

    #[test]
    fn save_state_refusals_garbage_and_oversize_states() {
        let (mut c, plugin) = opened();
        c.forward(Forward::SaveState, 1).unwrap();
        let cmd = plugin.recv();
        plugin.send_raw(&[0xff; 40]);
        plugin.reply(cmd.id, libc::EIO, b"", "disk on fire");
        assert_eq!(
            c.on_readable(),
            vec![(
                1,
                Reply::Refused {
                    errno: libc::EIO,
                    message: "disk on fire".into()
                }
            )]
        );
        // Over the bound: refused by size, whatever the channel carried.
        let r = ControlReply {
            id: 9,
            state: vec![0; crate::snapshot::MAX_DEVICE_STATE + 1],
            ..Default::default()
        };
        match decode_state(r) {
            Reply::Refused { errno, message } => {
                assert_eq!(errno, libc::EMSGSIZE);
                assert!(message.contains("device state"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // A plugin that never answers: timed out.
        c.forward(Forward::SaveState, 2).unwrap();
        let _ = plugin.recv();
        let later = Instant::now() + REPLY_TIMEOUT + Duration::from_millis(1);
        assert_eq!(c.expire(later), vec![(2, Reply::TimedOut)]);
    }
}
