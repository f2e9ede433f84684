//! Descriptors in flight to the plugin: sent by the host in replies the
//! plugin has not received yet.
//!
//! The kernel counts every descriptor sitting in a unix socket's queue
//! against a per-uid limit (the sender's `RLIMIT_NOFILE`, shared by every
//! process of that uid; `ETOOMANYREFS` beyond it). A plugin that asks for
//! descriptors and never reads its replies (even on a connection the host
//! has dropped, as long as the plugin keeps its end) would make every other
//! process of the host's uid unable to pass descriptors, e.g. another `vmm`
//! unable to start. So the host keeps its own count, per connection, and
//! refuses requests whose replies would exceed a small budget.
//!
//! A connection's count is cleared when its send queue is empty
//! (`SIOCOUTQ` = 0: every reply was received, so none of its descriptors is
//! in flight any more). A dropped connection with descriptors still queued
//! keeps its host end open, unserved, until its queue is empty, so its
//! descriptors stay counted.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Bytes queued on `fd` that its peer has not received yet.
fn unread_bytes(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer,
    // which points at a live local; `fd` is a valid descriptor for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (r == 0).then_some(n)
}

/// The host's count of descriptors in flight to the plugin.
pub struct InFlight {
    budget: usize,
    /// Connection token → descriptors sent since its queue was last empty.
    pending: HashMap<u64, usize>,
    /// Dropped connections whose queues still hold descriptors.
    lingering: Vec<(OwnedFd, usize)>,
}

impl InFlight {
    pub fn new(budget: usize) -> Self {
        InFlight {
            budget,
            pending: HashMap::new(),
            lingering: Vec::new(),
        }
    }

    /// Clears the counts of connections whose replies were all received.
    pub fn refresh(&mut self, connections: &HashMap<u64, OwnedFd>) {
        self.pending.retain(|token, _| {
            connections
                .get(token)
                .is_some_and(|fd| unread_bytes(fd.as_fd()) != Some(0))
        });
        self.lingering
            .retain(|(fd, _)| unread_bytes(fd.as_fd()) != Some(0));
    }

    /// Descriptors currently counted.
    pub fn total(&self) -> usize {
        self.pending.values().sum::<usize>() + self.lingering.iter().map(|(_, n)| n).sum::<usize>()
    }

    /// Whether `n` more descriptors fit in the budget.
    pub fn fits(&self, n: usize) -> bool {
        self.total().saturating_add(n) <= self.budget
    }

    /// Records `n` descriptors sent on connection `token`.
    pub fn sent(&mut self, token: u64, n: usize) {
        if n > 0 {
            *self.pending.entry(token).or_default() += n;
        }
    }

    /// The host stops serving connection `token`; if descriptors are still
    /// queued on it, its end is kept (unserved) so they stay counted.
    pub fn dropped(&mut self, token: u64, fd: OwnedFd) {
        if let Some(n) = self.pending.remove(&token) {
            if unread_bytes(fd.as_fd()) != Some(0) {
                self.lingering.push((fd, n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    #[test]
    fn counts_clear_when_the_peer_reads_and_survive_a_drop() {
        let (host, plugin) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (host2, plugin2) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut f = InFlight::new(4);
        let mut conns = HashMap::new();
        let extra = nix::unistd::dup(&host).unwrap();
        plugin_proto::framing::send_packet(host.as_fd(), b"x", &[extra.as_fd()]).unwrap();
        conns.insert(1, host);
        f.sent(1, 1);
        f.refresh(&conns);
        assert_eq!(f.total(), 1, "unread: still in flight");
        let mut buf = [0u8; 16];
        plugin_proto::framing::recv_packet(plugin.as_fd(), &mut buf, 4).unwrap();
        f.refresh(&conns);
        assert_eq!(f.total(), 0, "received: no longer in flight");

        // A dropped connection keeps its unread descriptors counted.
        plugin_proto::framing::send_packet(host2.as_fd(), b"y", &[extra.as_fd()]).unwrap();
        f.sent(2, 3);
        f.dropped(2, host2);
        f.refresh(&conns);
        assert_eq!(f.total(), 3);
        assert!(f.fits(1) && !f.fits(2));
        plugin_proto::framing::recv_packet(plugin2.as_fd(), &mut buf, 4).unwrap();
        f.refresh(&conns);
        assert_eq!(f.total(), 0);
    }
}
