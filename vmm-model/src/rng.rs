//! Deterministic fuzzing without libFuzzer: a seeded PRNG makes the bytes,
//! `arbitrary` gives them structure, and the same harnesses as the fuzz
//! targets check the result. Used by the fuzz smoke tests in the normal test
//! suite.

use super::main_harness::{run_model_session, MainStats};
use super::vcpu_harness::{run_vcpu_session, VcpuStats};
use super::{check_seqpacket, check_stream, ModelError};
use vmm::record::{encode_record, FdKind, RecordKind};

/// SplitMix64: tiny, fast, and good enough to drive a fuzzer.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// A main session of about `requests` requests: mostly generated ones, some
/// raw random packets with random descriptors, some connection closes.
pub fn main_session(rng: &mut SplitMix64, requests: usize) -> Vec<u8> {
    let mut s = Vec::new();
    for _ in 0..requests {
        match rng.below(100) {
            0..=89 => {
                let len = 8 + rng.below(56) as usize;
                let payload = rng.bytes(len);
                encode_record(
                    &mut s,
                    RecordKind::MainStructured,
                    FdKind::None,
                    0,
                    &payload,
                );
            }
            90..=97 => {
                let len = rng.below(40) as usize;
                let payload = rng.bytes(len);
                let kind = FdKind::from_byte(rng.below(256) as u8);
                let arg = rng.below(32) as u16;
                encode_record(&mut s, RecordKind::MainRequest, kind, arg, &payload);
            }
            _ => encode_record(&mut s, RecordKind::CloseConnection, FdKind::None, 0, &[]),
        }
    }
    s
}

/// A vcpu session: requests (mostly generated) interleaved with exits.
pub fn vcpu_session(rng: &mut SplitMix64, requests: usize) -> Vec<u8> {
    let mut s = Vec::new();
    // VcpuRequest{wait{}}
    encode_record(
        &mut s,
        RecordKind::VcpuRequest,
        FdKind::None,
        0,
        &[0x0a, 0x00],
    );
    for _ in 0..requests {
        match rng.below(100) {
            0..=74 => {
                let n = 8 + rng.below(24) as usize;
                let payload = rng.bytes(n);
                encode_record(
                    &mut s,
                    RecordKind::VcpuStructured,
                    FdKind::None,
                    0,
                    &payload,
                );
            }
            75..=82 => {
                // A plain Wait: starts Init on a fresh vcpu.
                encode_record(
                    &mut s,
                    RecordKind::VcpuRequest,
                    FdKind::None,
                    0,
                    &[0x0a, 0x00],
                );
            }
            83..=87 => {
                let n = rng.below(24) as usize;
                let payload = rng.bytes(n);
                encode_record(&mut s, RecordKind::VcpuRequest, FdKind::None, 0, &payload);
            }
            _ => {
                let payload = rng.bytes(24);
                encode_record(
                    &mut s,
                    RecordKind::VcpuExitStructured,
                    FdKind::None,
                    0,
                    &payload,
                );
            }
        }
    }
    s
}

/// At least `total` main requests in sessions of `per_session`, each on a
/// fresh harness with the leak check. Returns the merged statistics.
pub fn smoke_main(seed: u64, total: usize, per_session: usize) -> Result<MainStats, ModelError> {
    let mut rng = SplitMix64::new(seed);
    let mut stats = MainStats::default();
    let mut session = 0u64;
    while (stats.requests as usize) < total {
        let data = main_session(&mut rng, per_session);
        // Mostly 2 vcpus; now and then enough for chunked GetVcpus.
        let vcpus = if session % 50 == 7 { 130 } else { 2 };
        let slots = if session.is_multiple_of(3) { 4 } else { 32 };
        let s = run_model_session(&data, vcpus, slots).map_err(|e| {
            ModelError::Invariant(format!("seed {seed:#x}, session {session}: {e}"))
        })?;
        stats.merge(&s);
        session += 1;
    }
    Ok(stats)
}

/// At least `total` vcpu requests, in sessions of `per_session`.
pub fn smoke_vcpu(seed: u64, total: usize, per_session: usize) -> Result<VcpuStats, ModelError> {
    let mut rng = SplitMix64::new(seed);
    let mut stats = VcpuStats::default();
    let mut session = 0u64;
    while (stats.requests as usize) < total {
        let data = vcpu_session(&mut rng, per_session);
        let s = run_vcpu_session(&data).map_err(|e| {
            ModelError::Invariant(format!("seed {seed:#x}, session {session}: {e}"))
        })?;
        stats.merge(&s);
        session += 1;
    }
    Ok(stats)
}

/// At least `frames` stream frames and `packets` seqpacket packets.
pub fn smoke_framing(
    seed: u64,
    frames: usize,
    packets: usize,
) -> Result<(usize, usize), ModelError> {
    let mut rng = SplitMix64::new(seed);
    let (mut f, mut p) = (0, 0);
    let mut round = 0u64;
    while f < frames || p < packets {
        let err =
            |e: ModelError| ModelError::Invariant(format!("seed {seed:#x}, round {round}: {e}"));
        if f < frames {
            // Half random bytes, half a valid-looking framed stream.
            let n = 16 + rng.below(2048) as usize;
            let data = rng.bytes(n);
            f += check_stream(&data).map_err(err)?;
        }
        if p < packets {
            let data = rng.bytes(64);
            p += check_seqpacket(&data).map_err(err)?;
        }
        round += 1;
    }
    Ok((f, p))
}
