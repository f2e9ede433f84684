//! The fast vcpu channel (a compatible protocol extension, see
//! `docs/protocol-extensions.md`): one shared memfd per vcpu holding two
//! single-producer/single-consumer byte rings, host→plugin and plugin→host.
//! Each ring carries the same varint-delimited protobuf messages as the pipe
//! channel; only the transport changes. A waiting side spins briefly (the
//! budget adapts to how often spinning pays off) and then sleeps on a futex.
//!
//! Both processes map the memfd; each treats the other as untrusted: indices
//! are validated, messages are copied out before they are parsed, and the
//! host seals the memfd so it cannot be shrunk under its mapping.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::framing::{decode_varint, put_varint};
use vm_memory::VolatileSlice;

/// "VFC1" in little endian.
pub const MAGIC: u32 = 0x3143_4656;
pub const VERSION: u32 = 1;
/// Bytes of each ring.
pub const RING_SIZE: u32 = 64 * 1024;
/// The control page before the rings.
pub const HEADER_SIZE: usize = 4096;
/// Size of the shared memfd.
pub const SHM_SIZE: usize = HEADER_SIZE + 2 * RING_SIZE as usize;
/// Longest message a ring carries (prefix included).
pub const MAX_MESSAGE: usize = RING_SIZE as usize;

// Control page layout (byte offsets). Each index and flag sits on its own
// cache line so the two sides do not false-share.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_RING_SIZE: usize = 8;
/// Ring `r`'s control block: head, tail, consumer-waiting, producer-waiting.
const fn ring_ctl(r: usize) -> usize {
    64 + r * 256
}
const HEAD: usize = 0;
const TAIL: usize = 64;
const CONSUMER_WAITING: usize = 128;
const PRODUCER_WAITING: usize = 192;

/// Ring 0 carries host→plugin messages, ring 1 plugin→host.
const TO_PLUGIN: usize = 0;
const TO_HOST: usize = 1;

/// Which end of the channel this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Host,
    Plugin,
}

/// Errors of the fast channel.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("creating the shared channel failed")]
    Create(#[source] Errno),
    #[error("mapping the shared channel failed")]
    Map(#[source] Errno),
    #[error("the shared channel is not a valid version-{VERSION} channel")]
    BadHeader,
    #[error("the peer corrupted the shared ring")]
    Corrupt,
    #[error("a message of {0} bytes does not fit the ring")]
    TooLarge(usize),
    #[error("waiting was aborted")]
    Aborted,
}

/// What a waiting side is told to do when it wakes without progress.
pub type AbortCheck<'a> = &'a mut dyn FnMut() -> bool;

/// How long a waiting side spins before sleeping; adapts to outcomes.
#[derive(Debug, Clone)]
pub struct SpinPolicy {
    budget: Duration,
    max: Duration,
    idle_waits: u32,
}

/// CPUs this thread may run on, from `sched_getaffinity` alone: std's
/// `available_parallelism()` also reads cgroup files (`statx`, `openat`),
/// calls the seccomp policies of crosvm-era plugins do not allow.
fn usable_cpus() -> usize {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&i| set.is_set(i).unwrap_or(false))
            .count()
            .max(1),
        Err(_) => 1,
    }
}

impl SpinPolicy {
    /// Spinning up to `max`; none at all on a single-CPU machine.
    pub fn new(max: Duration) -> SpinPolicy {
        static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cpus = *CPUS.get_or_init(usable_cpus);
        let max = if cpus < 2 { Duration::ZERO } else { max };
        // No spinning until a probe has shown that it pays: a channel's
        // first waits are the start-up exchanges, when the peer is busy
        // starting (spinning then only burns CPU that many VMs starting at
        // once need); the first probe comes at wait FIRST_PROBE.
        SpinPolicy {
            budget: Duration::ZERO,
            max,
            idle_waits: PROBE_EVERY - FIRST_PROBE,
        }
    }

    /// The default policy: spin up to 50 µs.
    pub fn default_policy() -> SpinPolicy {
        SpinPolicy::new(Duration::from_micros(50))
    }

    fn budget(&mut self) -> Duration {
        if self.budget.is_zero() && !self.max.is_zero() {
            // Probe now and then with the full budget, so a peer that is
            // running again (or a machine that became idle) is noticed.
            self.idle_waits += 1;
            if self.idle_waits.is_multiple_of(PROBE_EVERY) {
                return self.max;
            }
        }
        self.budget
    }

    /// The awaited change came while spinning, after `waited`: keep a budget
    /// that covers such waits with room to spare.
    fn hit(&mut self, waited: Duration) {
        let want = waited * 2 + Duration::from_micros(1);
        self.budget = want.max(self.budget).min(self.max);
    }

    /// Spinning did not pay off: the peer was not running.
    fn miss(&mut self) {
        self.budget /= 2;
        if self.budget < Duration::from_micros(1) {
            self.budget = Duration::ZERO;
        }
    }
}

/// With a zero spin budget, one wait in this many still spins (with the
/// full budget) to find out whether spinning pays off again.
const PROBE_EVERY: u32 = 128;
/// A new channel spins first at this wait (see `SpinPolicy::new`).
const FIRST_PROBE: u32 = 8;

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> Errno {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on an aligned u32 inside a live shared mapping (not
    // FUTEX_PRIVATE: the other process wakes it), with a valid timeout.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if r == 0 {
        Errno::UnknownErrno
    } else {
        Errno::last()
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on an aligned u32 inside a live shared mapping.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// One mapped channel.
pub struct ShmChannel {
    base: NonNull<u8>,
    side: Side,
    /// Our next write position in the outgoing ring (authoritative).
    tx_head: u32,
    /// Our next read position in the incoming ring (authoritative).
    rx_tail: u32,
    spin: SpinPolicy,
    /// How long one sleep lasts before the abort check runs.
    sleep_slice: Duration,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

// SAFETY: the mapping is owned by this value and only accessed through it;
// moving it to another thread moves that exclusive access.
unsafe impl Send for ShmChannel {}

impl Drop for ShmChannel {
    fn drop(&mut self) {
        // SAFETY: `base` is the start of a SHM_SIZE mapping made in `map` and
        // not referenced elsewhere.
        let _ = unsafe { munmap(self.base.cast(), SHM_SIZE) };
    }
}

/// Creates a channel's memfd (host side): sized, initialized and sealed.
pub fn create_memfd() -> Result<OwnedFd, ShmError> {
    let fd = memfd_create(
        c"vcpu-fast-channel",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(ShmError::Create)?;
    nix::unistd::ftruncate(&fd, SHM_SIZE as i64).map_err(ShmError::Create)?;
    let header = [
        MAGIC.to_le_bytes(),
        VERSION.to_le_bytes(),
        RING_SIZE.to_le_bytes(),
    ]
    .concat();
    nix::sys::uio::pwrite(&fd, &header, OFF_MAGIC as i64).map_err(ShmError::Create)?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(ShmError::Create)?;
    Ok(fd)
}

impl ShmChannel {
    /// Maps a channel memfd. The plugin side checks the size and header (a
    /// host's memfd must be sealed against shrinking, so the mapping stays
    /// valid).
    pub fn map(fd: BorrowedFd<'_>, side: Side) -> Result<ShmChannel, ShmError> {
        // The size from lseek, not fstat: glibc's fstat is `newfstatat`,
        // which the policies of crosvm-era plugins do not allow. Nobody
        // reads or writes the memfd through its offset.
        let size =
            nix::unistd::lseek(fd, 0, nix::unistd::Whence::SeekEnd).map_err(ShmError::Map)?;
        nix::unistd::lseek(fd, 0, nix::unistd::Whence::SeekSet).map_err(ShmError::Map)?;
        if (size as u64) < SHM_SIZE as u64 {
            return Err(ShmError::BadHeader);
        }
        let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(ShmError::Map)?;
        if !SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
            return Err(ShmError::BadHeader);
        }
        let len = std::num::NonZeroUsize::new(SHM_SIZE).ok_or(ShmError::BadHeader)?;
        // SAFETY: a fresh shared mapping of the whole (sealed, so never
        // shrinking) memfd; nothing else aliases it in this process.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(ShmError::Map)?;
        let ch = ShmChannel {
            base: base.cast(),
            side,
            tx_head: 0,
            rx_tail: 0,
            spin: SpinPolicy::default_policy(),
            sleep_slice: Duration::from_millis(100),
            rx_buf: Vec::with_capacity(512),
            tx_buf: Vec::with_capacity(512),
        };
        if ch.word(OFF_MAGIC).load(Ordering::Relaxed) != MAGIC
            || ch.word(OFF_VERSION).load(Ordering::Relaxed) != VERSION
            || ch.word(OFF_RING_SIZE).load(Ordering::Relaxed) != RING_SIZE
        {
            return Err(ShmError::BadHeader);
        }
        Ok(ch)
    }

    /// Replaces the spin policy (tests and benchmarks).
    pub fn set_spin_policy(&mut self, spin: SpinPolicy) {
        self.spin = spin;
    }

    /// The 32-bit word at `offset` of the control page.
    fn word(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset.is_multiple_of(4) && offset + 4 <= HEADER_SIZE);
        // SAFETY: offset is 4-aligned and inside the mapped control page
        // (page-aligned base); AtomicU32 accepts any bit pattern, and the
        // word is only accessed atomically by both processes.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn rings(&self) -> (usize, usize) {
        match self.side {
            Side::Host => (TO_PLUGIN, TO_HOST),
            Side::Plugin => (TO_HOST, TO_PLUGIN),
        }
    }

    fn ring_data(&self, ring: usize) -> *mut u8 {
        // SAFETY: both rings lie inside the SHM_SIZE mapping.
        unsafe {
            self.base
                .as_ptr()
                .add(HEADER_SIZE + ring * RING_SIZE as usize)
        }
    }

    /// The data area of ring `ring` as a volatile slice: the peer writes
    /// it concurrently, so it is only ever read and written with volatile
    /// accesses (vm-memory's `VolatileSlice`), never through references or
    /// plain copies.
    fn ring_slice(&self, ring: usize) -> VolatileSlice<'_> {
        // SAFETY: the ring's RING_SIZE bytes lie inside the SHM_SIZE mapping,
        // which lives as long as `self` (the slice borrows `self`); the slice
        // is only accessed with volatile operations.
        unsafe { VolatileSlice::new(self.ring_data(ring), RING_SIZE as usize) }
    }

    /// Copies `out.len()` bytes of ring `ring` starting at index `pos`. The
    /// bytes are a snapshot of memory the peer may write concurrently, which
    /// is why callers only trust them after validation.
    fn copy_out(&self, ring: usize, pos: u32, out: &mut [u8]) {
        let data = self.ring_slice(ring);
        let start = (pos % RING_SIZE) as usize;
        let first = out.len().min(RING_SIZE as usize - start);
        let (a, b) = out.split_at_mut(first);
        // Both ranges lie inside the ring (start + first <= RING_SIZE, and
        // the wrapped part is shorter than the ring), so the subslices exist.
        if let Ok(s) = data.subslice(start, a.len()) {
            s.copy_to(a);
        }
        if let Ok(s) = data.subslice(0, b.len()) {
            s.copy_to(b);
        }
    }

    /// Copies `bytes` into ring `ring` at index `pos`.
    fn copy_in(&self, ring: usize, pos: u32, bytes: &[u8]) {
        let data = self.ring_slice(ring);
        let start = (pos % RING_SIZE) as usize;
        let first = bytes.len().min(RING_SIZE as usize - start);
        let (a, b) = bytes.split_at(first);
        if let Ok(s) = data.subslice(start, a.len()) {
            s.copy_from(a);
        }
        if let Ok(s) = data.subslice(0, b.len()) {
            s.copy_from(b);
        }
    }

    /// Waits until the word at `offset` differs from `seen`: spin, then
    /// sleep with `waiting_offset` raised so the peer wakes us.
    fn wait_change(
        &mut self,
        offset: usize,
        seen: u32,
        waiting_offset: usize,
        abort: AbortCheck<'_>,
    ) -> Result<(), ShmError> {
        let budget = self.spin.budget();
        if !budget.is_zero() {
            let start = Instant::now();
            loop {
                for _ in 0..64 {
                    if self.word(offset).load(Ordering::Acquire) != seen {
                        self.spin.hit(start.elapsed());
                        return Ok(());
                    }
                    std::hint::spin_loop();
                }
                if start.elapsed() >= budget {
                    break;
                }
            }
            self.spin.miss();
        }
        self.word(waiting_offset).store(1, Ordering::SeqCst);
        let result = loop {
            if self.word(offset).load(Ordering::SeqCst) != seen {
                break Ok(());
            }
            match futex_wait(self.word(offset), seen, self.sleep_slice) {
                Errno::EINTR | Errno::ETIMEDOUT if abort() => break Err(ShmError::Aborted),
                _ => {}
            }
        };
        self.word(waiting_offset).store(0, Ordering::Relaxed);
        result
    }

    /// Sends one message (varint-delimited) on the outgoing ring, waiting
    /// for room if the ring is full.
    pub fn send(&mut self, msg: &[u8], abort: AbortCheck<'_>) -> Result<(), ShmError> {
        let (tx, _) = self.rings();
        let mut frame = std::mem::take(&mut self.tx_buf);
        frame.clear();
        put_varint(&mut frame, msg.len() as u64);
        frame.extend_from_slice(msg);
        let result = self.send_frame(tx, &frame, abort);
        self.tx_buf = frame;
        result
    }

    fn send_frame(
        &mut self,
        tx: usize,
        frame: &[u8],
        abort: AbortCheck<'_>,
    ) -> Result<(), ShmError> {
        if frame.len() > MAX_MESSAGE {
            return Err(ShmError::TooLarge(frame.len()));
        }
        let ctl = ring_ctl(tx);
        loop {
            let tail = self.word(ctl + TAIL).load(Ordering::Acquire);
            let used = self.tx_head.wrapping_sub(tail);
            if used > RING_SIZE {
                return Err(ShmError::Corrupt);
            }
            if (RING_SIZE - used) as usize >= frame.len() {
                break;
            }
            self.wait_change(ctl + TAIL, tail, ctl + PRODUCER_WAITING, abort)?;
        }
        self.copy_in(tx, self.tx_head, frame);
        self.tx_head = self.tx_head.wrapping_add(frame.len() as u32);
        self.word(ctl + HEAD).store(self.tx_head, Ordering::SeqCst);
        if self.word(ctl + CONSUMER_WAITING).load(Ordering::SeqCst) != 0 {
            futex_wake(self.word(ctl + HEAD));
        }
        Ok(())
    }

    /// Receives the next message from the incoming ring (valid until the
    /// next call), waiting for one if the ring is empty.
    pub fn recv(&mut self, abort: AbortCheck<'_>) -> Result<&[u8], ShmError> {
        let (_, rx) = self.rings();
        let ctl = ring_ctl(rx);
        let head = loop {
            let head = self.word(ctl + HEAD).load(Ordering::Acquire);
            if head != self.rx_tail {
                break head;
            }
            self.wait_change(ctl + HEAD, head, ctl + CONSUMER_WAITING, abort)?;
        };
        let avail = head.wrapping_sub(self.rx_tail);
        if avail > RING_SIZE {
            return Err(ShmError::Corrupt);
        }
        // The producer publishes whole frames, so the prefix and the body
        // must both be there.
        let mut prefix = [0u8; 10];
        let n = (avail as usize).min(prefix.len());
        self.copy_out(rx, self.rx_tail, &mut prefix[..n]);
        let (len, plen) = decode_varint(&prefix[..n])
            .map_err(|_| ShmError::Corrupt)?
            .ok_or(ShmError::Corrupt)?;
        let total = (plen as u64).checked_add(len).ok_or(ShmError::Corrupt)?;
        if total > u64::from(avail) {
            return Err(ShmError::Corrupt);
        }
        let mut body = std::mem::take(&mut self.rx_buf);
        body.resize(len as usize, 0);
        self.copy_out(rx, self.rx_tail.wrapping_add(plen as u32), &mut body);
        self.rx_buf = body;
        self.rx_tail = self.rx_tail.wrapping_add(total as u32);
        self.word(ctl + TAIL).store(self.rx_tail, Ordering::SeqCst);
        if self.word(ctl + PRODUCER_WAITING).load(Ordering::SeqCst) != 0 {
            futex_wake(self.word(ctl + TAIL));
        }
        Ok(&self.rx_buf)
    }

    /// The body [`Self::recv`] returned last.
    pub fn received(&self) -> &[u8] {
        &self.rx_buf
    }

    /// Test hook: overwrites a control word as a hostile peer could.
    #[doc(hidden)]
    pub fn poke_control(&self, ring_to_host: bool, head: bool, value: u32) {
        let ctl = ring_ctl(if ring_to_host { TO_HOST } else { TO_PLUGIN });
        self.word(ctl + if head { HEAD } else { TAIL })
            .store(value, Ordering::SeqCst);
    }

    /// Test hook: reads a control word (the counterpart of
    /// [`ShmChannel::poke_control`]).
    #[doc(hidden)]
    pub fn peek_control(&self, ring_to_host: bool, head: bool) -> u32 {
        let ctl = ring_ctl(if ring_to_host { TO_HOST } else { TO_PLUGIN });
        self.word(ctl + if head { HEAD } else { TAIL })
            .load(Ordering::SeqCst)
    }

    /// Test hook: publishes `frame` as it is, without a length prefix of
    /// its own, so a hostile peer can send a prefix that lies.
    #[doc(hidden)]
    pub fn send_unframed(&mut self, frame: &[u8], abort: AbortCheck<'_>) -> Result<(), ShmError> {
        let (tx, _) = self.rings();
        self.send_frame(tx, frame, abort)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (ShmChannel, ShmChannel) {
        let fd = create_memfd().unwrap();
        let host = ShmChannel::map(fd.as_fd(), Side::Host).unwrap();
        let plugin = ShmChannel::map(fd.as_fd(), Side::Plugin).unwrap();
        (host, plugin)
    }

    fn never() -> impl FnMut() -> bool {
        || false
    }

    #[test]
    fn a_new_channel_does_not_spin_until_a_probe_pays_off() {
        let max = Duration::from_micros(50);
        let mut p = SpinPolicy {
            budget: Duration::ZERO,
            max,
            idle_waits: PROBE_EVERY - FIRST_PROBE,
        };
        // What `new` builds on a machine with two CPUs or more.
        if usable_cpus() >= 2 {
            let n = SpinPolicy::new(max);
            assert_eq!(
                (n.budget, n.max, n.idle_waits),
                (p.budget, p.max, p.idle_waits)
            );
        }
        for wait in 1..FIRST_PROBE {
            assert_eq!(p.budget(), Duration::ZERO, "wait {wait} spun");
        }
        assert_eq!(p.budget(), max, "wait {FIRST_PROBE} is the first probe");
        p.hit(Duration::from_micros(4));
        assert_eq!(p.budget(), Duration::from_micros(9), "a hit keeps spinning");
        p.miss();
        p.miss();
        p.miss();
        p.miss();
        assert_eq!(p.budget(), Duration::ZERO, "misses end it");
    }

    #[test]
    fn round_trips_both_ways_with_wraparound() {
        let (mut host, mut plugin) = pair();
        let mut a = never();
        let mut b = never();
        // Enough traffic to wrap each ring several times.
        for i in 0..5000u32 {
            let msg = vec![(i % 251) as u8; (i % 700) as usize + 1];
            host.send(&msg, &mut a).unwrap();
            assert_eq!(plugin.recv(&mut b).unwrap(), &msg[..]);
            plugin.send(&msg, &mut b).unwrap();
            assert_eq!(host.recv(&mut a).unwrap(), &msg[..]);
        }
    }

    #[test]
    fn several_queued_messages_and_full_ring() {
        let (mut host, mut plugin) = pair();
        let msg = vec![7u8; 1000];
        let mut sent = 0;
        // Fill the ring without a reader.
        let mut give_up = || true;
        while host.send(&msg, &mut give_up).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, RING_SIZE as usize / 1002);
        let mut n = never();
        for _ in 0..sent {
            assert_eq!(plugin.recv(&mut n).unwrap(), &msg[..]);
        }
        host.send(&msg, &mut n).unwrap();
    }

    #[test]
    fn blocking_receive_is_woken_by_another_thread() {
        let (mut host, mut plugin) = pair();
        host.set_spin_policy(SpinPolicy::new(Duration::ZERO));
        let t = std::thread::spawn(move || {
            let mut n = || false;
            let got = host.recv(&mut n).unwrap().to_vec();
            host.send(&got, &mut n).unwrap();
        });
        std::thread::sleep(Duration::from_millis(20));
        let mut n = never();
        plugin.send(b"ping", &mut n).unwrap();
        assert_eq!(plugin.recv(&mut n).unwrap(), b"ping");
        t.join().unwrap();
    }

    #[test]
    fn hostile_indices_are_detected() {
        let (mut host, plugin) = pair();
        let mut n = never();
        // Head far beyond what the ring can hold.
        plugin.poke_control(true, true, RING_SIZE + 10);
        assert!(matches!(host.recv(&mut n), Err(ShmError::Corrupt)));
        // A frame whose length prefix exceeds what was published.
        let (mut host, mut plugin) = pair();
        plugin.send(&[1, 2, 3], &mut n).unwrap();
        plugin.poke_control(true, true, 2);
        assert!(matches!(host.recv(&mut n), Err(ShmError::Corrupt)));
        // The plugin moving the host→plugin tail past the head.
        let (mut host, plugin) = pair();
        plugin.poke_control(false, false, 12345);
        assert!(matches!(host.send(b"x", &mut n), Err(ShmError::Corrupt)));
    }

    #[test]
    fn oversized_messages_are_refused_and_abort_works() {
        let (mut host, _plugin) = pair();
        let mut n = never();
        assert!(matches!(
            host.send(&vec![0; MAX_MESSAGE], &mut n),
            Err(ShmError::TooLarge(_))
        ));
        host.sleep_slice = Duration::from_millis(5);
        let mut yes = || true;
        assert!(matches!(host.recv(&mut yes), Err(ShmError::Aborted)));
    }

    #[test]
    fn unsealed_or_wrong_memfds_are_refused() {
        let fd = memfd_create(c"x", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, SHM_SIZE as i64).unwrap();
        assert!(matches!(
            ShmChannel::map(fd.as_fd(), Side::Plugin),
            Err(ShmError::BadHeader)
        ));
        let fd = memfd_create(c"x", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, SHM_SIZE as i64).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        assert!(matches!(
            ShmChannel::map(fd.as_fd(), Side::Plugin),
            Err(ShmError::BadHeader)
        ));
    }
}
