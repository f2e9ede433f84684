//! The plugin's output as the host passes it on: its stdout (a pipe the host
//! copies to its own stdout) and its stderr (a pipe the host logs line by
//! line). Both are hostile bytes on their way to a terminal, so control
//! characters are made visible: a plugin must not move the cursor, rewrite
//! the `[vmm …] plugin:` prefix with `\r`, or send escape sequences to the
//! user's terminal.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;

use log::warn;
use nix::errno::Errno;

use crate::limits;

/// Appends `input` to `out` with every control character escaped: C0
/// controls other than `\t` and `\n`, DEL (`\x7f`) and bytes that are not
/// UTF-8 as `\xNN`; C1 controls (U+0080–U+009F) as `\u{NN}`; a backslash
/// stays as it is. Returns how many bytes were consumed: when `partial` is
/// set, an incomplete UTF-8 sequence at the end is left for the next call
/// (its bytes may still arrive); otherwise it is escaped too.
pub fn escape_into(out: &mut Vec<u8>, input: &[u8], partial: bool) -> usize {
    let mut rest = input;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                escape_str(out, s);
                return input.len();
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                // `good` ends at `valid_up_to`, so it is valid UTF-8.
                escape_str(out, std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        for b in &bad[..n] {
                            hex(out, *b);
                        }
                        rest = &bad[n..];
                    }
                    None if partial => return input.len() - bad.len(),
                    None => {
                        for b in bad {
                            hex(out, *b);
                        }
                        return input.len();
                    }
                }
            }
        }
    }
}

/// `input` escaped as by [`escape_into`], as a whole.
pub fn escape(input: &[u8]) -> String {
    let mut out = Vec::with_capacity(input.len());
    escape_into(&mut out, input, false);
    // Only valid UTF-8 and ASCII escapes were written.
    String::from_utf8(out).unwrap_or_default()
}

fn escape_str(out: &mut Vec<u8>, s: &str) {
    for c in s.chars() {
        match c {
            '\t' | '\n' => out.push(c as u8),
            '\0'..='\x1f' | '\x7f' => hex(out, c as u8),
            '\u{80}'..='\u{9f}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            _ => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
}

fn hex(out: &mut Vec<u8>, b: u8) {
    let _ = write!(out, "\\x{b:02x}");
}

/// Copies the plugin's stdout pipe to the host's stdout, escaped, on its own
/// thread: a slow reader of vmm's stdout must not stall the main loop (which
/// then could not handle signals). The thread ends when every writer of the
/// pipe is gone (the plugin and all it started).
pub fn forward_stdout(pipe: OwnedFd) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vmm_stdout".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            let mut carry = 0usize;
            let mut out = Vec::with_capacity(8192);
            let stdout = std::io::stdout();
            loop {
                match nix::unistd::read(pipe.as_fd(), &mut buf[carry..]) {
                    Ok(0) => {
                        out.clear();
                        escape_into(&mut out, &buf[..carry], false);
                        let _ = stdout.lock().write_all(&out);
                        let _ = stdout.lock().flush();
                        return;
                    }
                    Ok(n) => {
                        let have = carry + n;
                        out.clear();
                        let used = escape_into(&mut out, &buf[..have], true);
                        buf.copy_within(used..have, 0);
                        carry = have - used;
                        let mut lock = stdout.lock();
                        if lock.write_all(&out).and_then(|()| lock.flush()).is_err() {
                            // vmm's stdout is gone: keep draining so the
                            // plugin never blocks on a full pipe.
                            continue;
                        }
                    }
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        warn!("cannot read the plugin's stdout: {e}");
                        return;
                    }
                }
            }
        })
}

/// Forwards the plugin's stderr into the log, line by line.
pub(super) struct StderrForwarder {
    pub(super) fd: OwnedFd,
    pub(super) carry: Vec<u8>,
    pub(super) open: bool,
    pub(super) panic: super::panic::PanicWatch,
    /// The level the lines are logged at (`--plugin-stderr-level`).
    pub(super) level: log::Level,
}

impl StderrForwarder {
    fn emit(&self, line: &[u8]) {
        // Control characters (a `\r` that would rewrite the prefix, escape
        // sequences) are shown escaped, never sent to the terminal.
        log::log!(self.level, "plugin: {}", escape(line));
    }

    /// Reads what is available; returns false once the pipe hung up.
    pub(super) fn drain(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(self.fd.as_fd(), &mut buf) {
                Ok(0) => {
                    self.flush();
                    self.open = false;
                    return false;
                }
                Ok(n) => {
                    self.carry.extend_from_slice(&buf[..n]);
                    while let Some(pos) = self.carry.iter().position(|&b| b == b'\n') {
                        self.panic.line(&escape(&self.carry[..pos]));
                        self.emit(&self.carry[..pos]);
                        self.carry.drain(..=pos);
                    }
                    if self.carry.len() >= limits::MAX_STDERR_LINE {
                        self.flush();
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => return true,
            }
        }
    }

    pub(super) fn flush(&mut self) {
        if !self.carry.is_empty() {
            self.panic.line(&escape(&self.carry));
            self.emit(&self.carry);
            self.carry.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_visibly() {
        assert_eq!(escape(b"plain text\tok\n"), "plain text\tok\n");
        assert_eq!(
            escape(b"\r\x1b[2K\x07\x7f\0"),
            "\\x0d\\x1b[2K\\x07\\x7f\\x00"
        );
        assert_eq!(escape("é ü \u{9b}31m".as_bytes()), "é ü \\u{9b}31m");
        assert_eq!(escape(b"\xff\xfe"), "\\xff\\xfe");
        assert_eq!(escape(b"\xe2\x82"), "\\xe2\\x82");
    }

    #[test]
    fn split_utf8_sequence_is_carried() {
        let euro = "€".as_bytes();
        let mut out = Vec::new();
        let used = escape_into(&mut out, &[b'a', euro[0], euro[1]], true);
        assert_eq!(used, 1);
        assert_eq!(out, b"a");
        out.clear();
        assert_eq!(escape_into(&mut out, euro, true), 3);
        assert_eq!(out, euro);
    }
}
