//! Recognises a Rust panic in the plugin's forwarded stderr, so that vmm
//! reports "the plugin panicked: MESSAGE" instead of a bare exit status (or
//! SIGABRT with `panic = "abort"`).
//!
//! std prints `thread 'NAME' panicked at FILE:LINE:COL:` (since Rust 1.73;
//! newer releases add the thread id: `thread 'NAME' (ID) panicked at …:`),
//! then the message on the following line(s), then the backtrace or the
//! `note: run with RUST_BACKTRACE=1` hint.

/// The first panic seen on the plugin's stderr.
#[derive(Debug, Default)]
pub struct PanicWatch {
    /// "thread 'main' at FILE:LINE:COL", waiting for its message line.
    pending: Option<String>,
    found: Option<String>,
}

/// Longest panic message kept (the rest is in the forwarded log anyway).
const MAX_MESSAGE: usize = 1024;

impl PanicWatch {
    /// Looks at one forwarded line (without its newline).
    pub fn line(&mut self, line: &str) {
        if self.found.is_some() {
            return;
        }
        if let Some(header) = self.pending.take() {
            let mut msg: String = line.chars().take(MAX_MESSAGE).collect();
            if msg.is_empty() {
                msg = "(no message)".into();
            }
            self.found = Some(format!("{msg} ({header})"));
            return;
        }
        let Some(rest) = line.strip_prefix("thread '") else {
            return;
        };
        let Some((name, after)) = rest.split_once('\'') else {
            return;
        };
        // An optional " (ID)" before " panicked at ".
        let after = match after.strip_prefix(" (") {
            Some(r) => r.split_once(')').map_or("", |(_, t)| t),
            None => after,
        };
        if let Some(at) = after.strip_prefix(" panicked at ") {
            let location = at.strip_suffix(':').unwrap_or(at);
            self.pending = Some(format!("thread '{name}' at {location}"));
        }
    }

    /// The panic, if one was seen ("MESSAGE (thread 'main' at FILE:L:C)").
    pub fn panic(&self) -> Option<&str> {
        self.found
            .as_deref()
            .or(self.pending.as_deref().map(|_| "(no message)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_and_new_formats() {
        let mut w = PanicWatch::default();
        w.line("some output");
        assert_eq!(w.panic(), None);
        w.line("thread 'main' panicked at src/main.rs:3:5:");
        w.line("boom: 42");
        w.line("thread 'other' panicked at x.rs:1:1:");
        assert_eq!(
            w.panic(),
            Some("boom: 42 (thread 'main' at src/main.rs:3:5)")
        );
        let mut w = PanicWatch::default();
        w.line("thread 'vcpu 0' (4711) panicked at a/b.rs:10:2:");
        w.line("index out of bounds");
        assert_eq!(
            w.panic(),
            Some("index out of bounds (thread 'vcpu 0' at a/b.rs:10:2)")
        );
        let mut w = PanicWatch::default();
        w.line("thread 'main' is fine");
        w.line("thread 'x");
        assert_eq!(w.panic(), None);
    }
}
