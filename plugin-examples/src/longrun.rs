//! The `longrun` machine's guest code and device, shared by the Rust
//! plugin (`src/bin/longrun.rs`) and the tests that check the C twin
//! (`c/longrun.c`) carries the same guest bytes. The computation is
//! described in `src/bin/longrun.rs`.

use crosvm_plugin::{DeviceState, Error as SdkError};
use iced_x86::code_asm::*;

use crate::{assemble16, Result};

/// The accumulator device: a write mixes a dword in, a read returns a dword
/// of the accumulator.
pub const ACC_PORT: u64 = 0x620;
/// `out` of the finished round number.
pub const PROGRESS_PORT: u64 = 0x624;
/// `out` of the buffer fold, then of `x` at `RESULT_PORT + 4`.
pub const RESULT_PORT: u64 = 0x628;
pub const SHUTDOWN_PORT: u64 = 0x501;

pub const MEM_SIZE: u64 = 0x10000;
pub const CODE: u64 = 0x1000;
pub const HANDLER: u64 = 0x1800;
/// Timer ticks counted by the IRQ0 handler (never read by the computation).
pub const TICKS: u64 = 0x3000;
/// The round counter and the number of rounds `N` (written by the plugin).
pub const ROUND: u64 = 0x3010;
pub const ROUNDS: u64 = 0x3014;
/// The 4,096-dword buffer.
pub const BUF: u64 = 0x4000;
pub const BUF_DWORDS: u32 = 4096;
pub const STEPS_PER_ROUND: u32 = 4096;
pub const STACK: u16 = 0xfff0;
/// PIT input clock / 1193 ≈ 1 kHz.
pub const PIT_DIVISOR: u16 = 1193;
/// Offset of LVT LINT0 in the local APIC register page, and ExtINT mode.
pub const APIC_LVT0: usize = 0x350;
pub const LVT_EXTINT: u32 = 0x700;

/// The guest's main program.
pub fn guest_main() -> Result<Vec<u8>> {
    assemble16(CODE, |a| {
        let mut fill = a.create_label();
        let mut round = a.create_label();
        let mut step = a.create_label();
        let mut no_device = a.create_label();
        let mut fold = a.create_label();
        a.cli()?;
        // IVT entry 8 (IRQ0 at PIC base 8) -> 0000:HANDLER.
        a.mov(word_ptr(8 * 4), HANDLER as u32)?;
        a.mov(word_ptr(8 * 4 + 2), 0u32)?;
        // Master PIC: base 8, slave on 2, 8086 mode, only IRQ0 unmasked;
        // slave PIC: base 0x70, all masked.
        for (port, value) in [
            (0x20u32, 0x11u32),
            (0x21, 0x08),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xfe),
            (0xa0, 0x11),
            (0xa1, 0x70),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0xa1, 0xff),
        ] {
            a.mov(al, value)?;
            a.out(port, al)?;
        }
        // PIT channel 0: lobyte/hibyte, mode 2 (rate generator), ~1 kHz.
        a.mov(al, 0x34u32)?;
        a.out(0x43u32, al)?;
        a.mov(al, u32::from(PIT_DIVISOR & 0xff))?;
        a.out(0x40u32, al)?;
        a.mov(al, u32::from(PIT_DIVISOR >> 8))?;
        a.out(0x40u32, al)?;
        a.sti()?;

        // buf[i] = i * golden ratio.
        a.xor(ebx, ebx)?;
        a.set_label(&mut fill)?;
        a.imul_3(eax, ebx, 0x9e37_79b9u32 as i32)?;
        a.mov(dword_ptr(ebx * 4 + BUF as i32), eax)?;
        a.inc(ebx)?;
        a.cmp(ebx, BUF_DWORDS as i32)?;
        a.jb(fill)?;

        a.mov(esi, 0x1234_5678u32 as i32)?; // x
        a.xor(edi, edi)?; // step number
        a.mov(dword_ptr(ROUND as i32), 0)?;
        a.set_label(&mut round)?;
        a.mov(ecx, STEPS_PER_ROUND as i32)?;
        a.set_label(&mut step)?;
        // x ^= x << 13; x ^= x >> 17; x ^= x << 5
        a.mov(eax, esi)?;
        a.shl(eax, 13)?;
        a.xor(esi, eax)?;
        a.mov(eax, esi)?;
        a.shr(eax, 17)?;
        a.xor(esi, eax)?;
        a.mov(eax, esi)?;
        a.shl(eax, 5)?;
        a.xor(esi, eax)?;
        // buf[x & 4095] ^= x + step
        a.mov(ebx, esi)?;
        a.and(ebx, (BUF_DWORDS - 1) as i32)?;
        a.mov(eax, esi)?;
        a.add(eax, edi)?;
        a.xor(dword_ptr(ebx * 4 + BUF as i32), eax)?;
        a.inc(edi)?;
        // Every 64th step: the dword goes to the device, its answer into x.
        a.test(edi, 63)?;
        a.jnz(no_device)?;
        a.mov(eax, dword_ptr(ebx * 4 + BUF as i32))?;
        a.mov(dx, ACC_PORT as u32)?;
        a.out(dx, eax)?;
        a.in_(eax, dx)?;
        a.xor(esi, eax)?;
        a.jnz(no_device)?; // xorshift must never hold 0
        a.mov(esi, 1)?;
        a.set_label(&mut no_device)?;
        a.dec(ecx)?;
        a.jnz(step)?;
        // Round done.
        a.mov(eax, dword_ptr(ROUND as i32))?;
        a.inc(eax)?;
        a.mov(dword_ptr(ROUND as i32), eax)?;
        a.mov(dx, PROGRESS_PORT as u32)?;
        a.out(dx, eax)?;
        a.cmp(eax, dword_ptr(ROUNDS as i32))?;
        a.jb(round)?;

        // Fold the buffer (order-dependent) and report it and x.
        a.xor(eax, eax)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut fold)?;
        a.rol(eax, 5)?;
        a.add(eax, dword_ptr(ebx * 4 + BUF as i32))?;
        a.inc(ebx)?;
        a.cmp(ebx, BUF_DWORDS as i32)?;
        a.jb(fold)?;
        a.mov(dx, RESULT_PORT as u32)?;
        a.out(dx, eax)?;
        a.mov(eax, esi)?;
        a.mov(dx, (RESULT_PORT + 4) as u32)?;
        a.out(dx, eax)?;
        a.cli()?;
        a.mov(dx, SHUTDOWN_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    })
}

/// The IRQ0 handler: counts a tick, acknowledges the PIC.
pub fn guest_handler() -> Result<Vec<u8>> {
    assemble16(HANDLER, |a| {
        a.push(ax)?;
        a.inc(dword_ptr(TICKS as i32))?;
        a.mov(al, 0x20u32)?; // non-specific EOI
        a.out(0x20u32, al)?;
        a.pop(ax)?;
        a.iret()?;
        Ok(())
    })
}

/// The accumulator device and the result pieces the guest reported: the
/// plugin's own state, which a snapshot must carry.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    pub acc: u64,
    /// The buffer fold, once the guest reported it.
    pub fold: Option<u32>,
    /// The final `x`, once the guest reported it.
    pub x: Option<u32>,
}

/// Version byte of [`Device`]'s blob.
const STATE_VERSION: u8 = 1;
/// The blob: version, `acc` (LE), then `fold` and `x` each as a presence
/// byte (0 or 1) and a little-endian dword (0 when absent). The C twin
/// writes the same layout.
pub const STATE_LEN: usize = 1 + 8 + 5 + 5;

impl Device {
    /// A guest write to the accumulator.
    pub fn write(&mut self, v: u32) {
        self.acc = (self.acc.rotate_left(7) ^ u64::from(v)).wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// A guest read of the accumulator.
    pub fn read(&self) -> u32 {
        (self.acc >> 16) as u32
    }

    /// The `result=` value, once both pieces were reported.
    pub fn result(&self) -> Option<u64> {
        Some(self.acc ^ (u64::from(self.fold?) << 32 | u64::from(self.x?)))
    }

    /// The `state` control command's answer: the device as JSON.
    pub fn to_json(&self) -> String {
        let opt = |v: Option<u32>| v.map_or("null".to_owned(), |v| v.to_string());
        format!(
            r#"{{"acc": "{:#018x}", "fold": {}, "x": {}}}"#,
            self.acc,
            opt(self.fold),
            opt(self.x)
        )
    }
}

fn put(out: &mut Vec<u8>, v: Option<u32>) {
    out.push(u8::from(v.is_some()));
    out.extend_from_slice(&v.unwrap_or(0).to_le_bytes());
}

fn take(piece: &[u8]) -> std::result::Result<Option<u32>, SdkError> {
    let v = u32::from_le_bytes([piece[1], piece[2], piece[3], piece[4]]);
    match piece[0] {
        0 if v == 0 => Ok(None),
        1 => Ok(Some(v)),
        p => Err(SdkError::BadDeviceState(format!(
            "longrun: presence byte {p} with value {v:#x} (0 with 0, or 1)"
        ))),
    }
}

impl DeviceState for Device {
    fn save(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_LEN);
        out.push(STATE_VERSION);
        out.extend_from_slice(&self.acc.to_le_bytes());
        put(&mut out, self.fold);
        put(&mut out, self.x);
        out
    }

    fn restore(&mut self, blob: &[u8]) -> crosvm_plugin::Result<()> {
        if blob.len() != STATE_LEN {
            return Err(SdkError::BadDeviceState(format!(
                "longrun: {} bytes, expected {STATE_LEN}",
                blob.len()
            )));
        }
        if blob[0] != STATE_VERSION {
            return Err(SdkError::BadDeviceState(format!(
                "longrun: version {}, this plugin reads version {STATE_VERSION}",
                blob[0]
            )));
        }
        let mut acc = [0u8; 8];
        acc.copy_from_slice(&blob[1..9]);
        *self = Device {
            acc: u64::from_le_bytes(acc),
            fold: take(&blob[9..14])?,
            x: take(&blob[14..19])?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_state_round_trips_and_refuses_bad_blobs() {
        let mut d = Device::default();
        for v in [1, 0xdead_beef, 7] {
            d.write(v);
        }
        d.fold = Some(0x1234);
        let blob = d.save();
        assert_eq!(blob.len(), STATE_LEN);
        let mut back = Device::default();
        back.restore(&blob).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.result(), None, "x is still missing");
        back.x = Some(0);
        let mut again = Device::default();
        again.restore(&back.save()).unwrap();
        assert_eq!(again.x, Some(0));
        assert_eq!(again.result(), Some(d.acc ^ 0x1234 << 32));

        let mut bad = blob.clone();
        bad[0] = 2;
        let err = again.restore(&bad).unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        assert!(again.restore(&blob[..5]).is_err());
        let mut bad = blob.clone();
        bad[9] = 7;
        assert!(again.restore(&bad).is_err());
        let mut bad = blob;
        bad[15] = 1; // absent x with a value
        assert!(again.restore(&bad).is_err());
        assert_eq!(again.x, Some(0), "a refused blob changes nothing");
        assert!(again.to_json().contains(r#""x": 0"#), "{}", again.to_json());
    }
}
