//! Allocation-free decoding of `VcpuResponse` frames on the exit path.
//!
//! `wait` is the hot path: every guest exit handled by the plugin is one
//! framed `VcpuResponse{wait{...}}`. The generated decoder builds fresh
//! nested messages (and byte vectors) per frame; this one writes into
//! buffers that are reused from one event to the next. It follows the
//! generated code's semantics: exact tags only, unknown fields skipped, the
//! last oneof member wins. Frames that are not wait events are reported as
//! [`Member::Other`] and decoded with the generated code by the caller.

use plugin_proto::protobuf::rt::WireType;
use plugin_proto::protobuf::{CodedInputStream, Result};

/// Which `VcpuResponse` oneof member the frame selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Member {
    None,
    Wait,
    Other,
}

/// The `VcpuResponse.Wait` exit, without its byte fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Init,
    Io {
        space: i32,
        address: u64,
        is_write: bool,
        no_resume: bool,
    },
    User {
        user: u64,
    },
    HypervCall {
        input: u64,
        params0: u64,
        params1: u64,
    },
    HypervSynic {
        msr: u32,
        control: u64,
        evt_page: u64,
        msg_page: u64,
    },
    /// Extension: a batch of coalesced writes; the records are in `data`.
    CoalescedWrites,
}

/// Reusable decode target for one vcpu channel.
#[derive(Debug)]
pub(crate) struct WaitDecoder {
    pub(crate) errno: i32,
    pub(crate) member: Member,
    pub(crate) exit: Option<Exit>,
    /// `Io.data`, `Io.regs`, `Io.sregs`, `Io.debugregs` of the last frame.
    pub(crate) data: Vec<u8>,
    pub(crate) regs: Vec<u8>,
    pub(crate) sregs: Vec<u8>,
    pub(crate) debugregs: Vec<u8>,
}

const VARINT: u32 = WireType::Varint as u32;
const LEN: u32 = WireType::LengthDelimited as u32;

const fn tag(field: u32, wire_type: u32) -> u32 {
    (field << 3) | wire_type
}

/// Skips an unknown field of raw tag `raw`.
fn skip(is: &mut CodedInputStream<'_>, raw: u32) -> Result<()> {
    match WireType::new(raw & 7) {
        Some(wt) => is.skip_field(wt),
        // An invalid wire type cannot be skipped: let the generated code
        // produce the error.
        None => Err(plugin_proto::protobuf::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid wire type",
        ))),
    }
}

/// Runs `f` on the length-delimited sub-message at the cursor.
fn nested(
    is: &mut CodedInputStream<'_>,
    f: impl FnOnce(&mut CodedInputStream<'_>) -> Result<()>,
) -> Result<()> {
    let len = is.read_raw_varint64()?;
    let old = is.push_limit(len)?;
    f(is)?;
    is.pop_limit(old);
    Ok(())
}

impl WaitDecoder {
    /// `capacity`: initial size of the data buffer.
    pub(crate) fn new(capacity: usize) -> WaitDecoder {
        WaitDecoder {
            errno: 0,
            member: Member::None,
            exit: None,
            data: Vec::with_capacity(capacity),
            regs: Vec::new(),
            sregs: Vec::new(),
            debugregs: Vec::new(),
        }
    }

    fn clear_io(&mut self) {
        self.data.clear();
        self.regs.clear();
        self.sregs.clear();
        self.debugregs.clear();
    }

    /// Decodes one frame body.
    pub(crate) fn decode(&mut self, frame: &[u8]) -> Result<()> {
        self.errno = 0;
        self.member = Member::None;
        self.exit = None;
        self.clear_io();
        let mut is = CodedInputStream::from_bytes(frame);
        while let Some(raw) = is.read_raw_tag_or_eof()? {
            match raw {
                t if t == tag(1, VARINT) => self.errno = is.read_sint32()?,
                t if t == tag(2, LEN) => {
                    self.member = Member::Wait;
                    self.exit = None;
                    self.clear_io();
                    nested(&mut is, |is| self.decode_wait(is))?;
                }
                // The other members of the `message` oneof (4..=10).
                t if t & 7 == LEN && (4..=10).contains(&(t >> 3)) => {
                    self.member = Member::Other;
                    is.skip_field(WireType::LengthDelimited)?;
                }
                other => skip(&mut is, other)?,
            }
        }
        Ok(())
    }

    fn decode_wait(&mut self, is: &mut CodedInputStream<'_>) -> Result<()> {
        while let Some(raw) = is.read_raw_tag_or_eof()? {
            match raw {
                t if t == tag(1, LEN) => {
                    nested(is, skip_all)?;
                    self.clear_io();
                    self.exit = Some(Exit::Init);
                }
                t if t == tag(2, LEN) => {
                    self.clear_io();
                    let mut io = (0i32, 0u64, false, false);
                    nested(is, |is| self.decode_io(is, &mut io))?;
                    self.exit = Some(Exit::Io {
                        space: io.0,
                        address: io.1,
                        is_write: io.2,
                        no_resume: io.3,
                    });
                }
                t if t == tag(3, LEN) => {
                    let mut user = 0;
                    nested(is, |is| {
                        while let Some(raw) = is.read_raw_tag_or_eof()? {
                            match raw {
                                t if t == tag(1, VARINT) => user = is.read_uint64()?,
                                other => skip(is, other)?,
                            }
                        }
                        Ok(())
                    })?;
                    self.clear_io();
                    self.exit = Some(Exit::User { user });
                }
                t if t == tag(4, LEN) => {
                    let mut v = [0u64; 3];
                    nested(is, |is| {
                        while let Some(raw) = is.read_raw_tag_or_eof()? {
                            match raw {
                                t if t == tag(1, VARINT) => v[0] = is.read_uint64()?,
                                t if t == tag(2, VARINT) => v[1] = is.read_uint64()?,
                                t if t == tag(3, VARINT) => v[2] = is.read_uint64()?,
                                other => skip(is, other)?,
                            }
                        }
                        Ok(())
                    })?;
                    self.clear_io();
                    self.exit = Some(Exit::HypervCall {
                        input: v[0],
                        params0: v[1],
                        params1: v[2],
                    });
                }
                t if t == tag(5, LEN) => {
                    let mut msr = 0;
                    let mut v = [0u64; 3];
                    nested(is, |is| {
                        while let Some(raw) = is.read_raw_tag_or_eof()? {
                            match raw {
                                t if t == tag(1, VARINT) => msr = is.read_uint32()?,
                                t if t == tag(2, VARINT) => v[0] = is.read_uint64()?,
                                t if t == tag(3, VARINT) => v[1] = is.read_uint64()?,
                                t if t == tag(4, VARINT) => v[2] = is.read_uint64()?,
                                other => skip(is, other)?,
                            }
                        }
                        Ok(())
                    })?;
                    self.clear_io();
                    self.exit = Some(Exit::HypervSynic {
                        msr,
                        control: v[0],
                        evt_page: v[1],
                        msg_page: v[2],
                    });
                }
                t if t == tag(1000, LEN) => {
                    self.clear_io();
                    nested(is, |is| {
                        while let Some(raw) = is.read_raw_tag_or_eof()? {
                            match raw {
                                t if t == tag(1, LEN) => is.read_bytes_into(&mut self.data)?,
                                other => skip(is, other)?,
                            }
                        }
                        Ok(())
                    })?;
                    self.exit = Some(Exit::CoalescedWrites);
                }
                other => skip(is, other)?,
            }
        }
        Ok(())
    }

    fn decode_io(
        &mut self,
        is: &mut CodedInputStream<'_>,
        io: &mut (i32, u64, bool, bool),
    ) -> Result<()> {
        while let Some(raw) = is.read_raw_tag_or_eof()? {
            match raw {
                t if t == tag(1, VARINT) => io.0 = is.read_int32()?,
                t if t == tag(2, VARINT) => io.1 = is.read_uint64()?,
                t if t == tag(3, VARINT) => io.2 = is.read_bool()?,
                t if t == tag(4, VARINT) => io.3 = is.read_bool()?,
                t if t == tag(5, LEN) => is.read_bytes_into(&mut self.data)?,
                t if t == tag(6, LEN) => is.read_bytes_into(&mut self.regs)?,
                t if t == tag(7, LEN) => is.read_bytes_into(&mut self.sregs)?,
                t if t == tag(8, LEN) => is.read_bytes_into(&mut self.debugregs)?,
                other => skip(is, other)?,
            }
        }
        Ok(())
    }
}

/// Skips every field of a message whose content does not matter.
fn skip_all(is: &mut CodedInputStream<'_>) -> Result<()> {
    while let Some(raw) = is.read_raw_tag_or_eof()? {
        skip(is, raw)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use plugin_proto::protobuf::{EnumOrUnknown, Message};
    use plugin_proto::vcpu_response::{self, wait, Wait};
    use plugin_proto::VcpuResponse;

    use super::*;

    /// errno, member, exit and the four byte fields.
    type Decoded = (i32, Member, Option<Exit>, [Vec<u8>; 4]);

    /// What the generated decoder makes of `bytes`, in decoder terms.
    fn reference(bytes: &[u8]) -> Option<Decoded> {
        let r = VcpuResponse::parse_from_bytes(bytes).ok()?;
        let mut bufs: [Vec<u8>; 4] = Default::default();
        let (member, exit) = match &r.message {
            None => (Member::None, None),
            Some(vcpu_response::Message::Wait(w)) => {
                let exit = match &w.exit {
                    None => None,
                    Some(wait::Exit::Init(_)) => Some(Exit::Init),
                    Some(wait::Exit::Io(io)) => {
                        bufs = [
                            io.data.clone(),
                            io.regs.clone(),
                            io.sregs.clone(),
                            io.debugregs.clone(),
                        ];
                        Some(Exit::Io {
                            space: io.space.value(),
                            address: io.address,
                            is_write: io.is_write,
                            no_resume: io.no_resume,
                        })
                    }
                    Some(wait::Exit::User(u)) => Some(Exit::User { user: u.user }),
                    Some(wait::Exit::HypervCall(h)) => Some(Exit::HypervCall {
                        input: h.input,
                        params0: h.params0,
                        params1: h.params1,
                    }),
                    Some(wait::Exit::HypervSynic(s)) => Some(Exit::HypervSynic {
                        msr: s.msr,
                        control: s.control,
                        evt_page: s.evt_page,
                        msg_page: s.msg_page,
                    }),
                    Some(_) => None,
                };
                (Member::Wait, exit)
            }
            Some(_) => (Member::Other, None),
        };
        Some((r.errno, member, exit, bufs))
    }

    fn check(bytes: &[u8], dec: &mut WaitDecoder) {
        let want = reference(bytes);
        let got = dec.decode(bytes).ok().map(|()| {
            (
                dec.errno,
                dec.member,
                dec.exit,
                [
                    dec.data.clone(),
                    dec.regs.clone(),
                    dec.sregs.clone(),
                    dec.debugregs.clone(),
                ],
            )
        });
        match (&want, &got) {
            // Non-wait members: only the member and errno matter.
            (Some(w), Some(g)) if w.1 == Member::Other => assert_eq!((w.0, w.1), (g.0, g.1)),
            _ => assert_eq!(want, got, "frame {bytes:02x?}"),
        }
    }

    fn wait_msg(exit: wait::Exit) -> VcpuResponse {
        let mut r = VcpuResponse::new();
        r.set_wait(Wait {
            exit: Some(exit),
            ..Default::default()
        });
        r
    }

    fn samples() -> Vec<Vec<u8>> {
        let io = wait::Io {
            space: EnumOrUnknown::from_i32(1),
            address: 0xfee0_0000,
            is_write: true,
            no_resume: true,
            data: vec![1, 2, 3, 4],
            regs: vec![5; 144],
            sregs: vec![6; 312],
            debugregs: vec![7; 128],
            ..Default::default()
        };
        let msgs = vec![
            VcpuResponse::new(),
            VcpuResponse {
                errno: 71,
                ..Default::default()
            },
            VcpuResponse {
                errno: -5,
                ..Default::default()
            },
            wait_msg(wait::Exit::Init(Default::default())),
            wait_msg(wait::Exit::Io(io.clone())),
            wait_msg(wait::Exit::Io(wait::Io {
                space: EnumOrUnknown::from_i32(7),
                ..Default::default()
            })),
            wait_msg(wait::Exit::User(wait::User {
                user: u64::MAX,
                ..Default::default()
            })),
            wait_msg(wait::Exit::HypervCall(wait::HypervCall {
                input: 1,
                params0: 2,
                params1: 3,
                ..Default::default()
            })),
            wait_msg(wait::Exit::HypervSynic(wait::HypervSynic {
                msr: 0x4000_0080,
                control: 4,
                evt_page: 5,
                msg_page: 6,
                ..Default::default()
            })),
            {
                let mut r = VcpuResponse::new();
                r.mut_wait();
                r
            },
            {
                let mut r = VcpuResponse::new();
                r.mut_get_state().state = vec![1; 16];
                r
            },
            {
                let mut r = VcpuResponse::new();
                r.mut_set_state();
                r.errno = 22;
                r
            },
        ];
        let mut out: Vec<Vec<u8>> = msgs.iter().map(|m| m.write_to_bytes().unwrap()).collect();
        // Unknown fields everywhere, a wait followed by another member and
        // vice versa, a repeated exit, and an unknown exit member.
        let io_bytes = wait_msg(wait::Exit::Io(io)).write_to_bytes().unwrap();
        let mut extra = vec![0xb8, 0x3e, 0x05]; // field 999, varint
        extra.extend(&io_bytes);
        extra.extend([0xc2, 0x3e, 0x02, 0xaa, 0xbb]); // field 1000, bytes
        out.push(extra);
        let mut then_other = io_bytes.clone();
        then_other.extend(msgs[10].write_to_bytes().unwrap());
        out.push(then_other);
        let mut other_then_wait = msgs[10].write_to_bytes().unwrap();
        other_then_wait.extend(&io_bytes);
        out.push(other_then_wait);
        // wait{ io{..}, init{} }: the last exit wins.
        out.push(vec![0x12, 0x06, 0x12, 0x02, 0x10, 0x05, 0x0a, 0x00]);
        // wait{ field 6 {} }: no known exit.
        out.push(vec![0x12, 0x02, 0x32, 0x00]);
        // Io with an unknown fixed32 and fixed64 field.
        out.push(vec![
            0x12, 0x11, 0x12, 0x0f, 0x10, 0x07, 0x4d, 1, 2, 3, 4, 0x51, 1, 2, 3, 4, 5, 6, 7, 8,
        ]);
        out
    }

    #[test]
    fn agrees_with_the_generated_decoder() {
        let mut dec = WaitDecoder::new(256);
        for bytes in samples() {
            check(&bytes, &mut dec);
        }
    }

    /// Truncated frames: no panic, and whenever both decoders accept one
    /// they agree. (The generated decoder accepts a nested message cut off
    /// by the end of the frame; this one rejects a skipped member that is.)
    #[test]
    fn truncated_and_garbage_frames_never_panic() {
        let mut dec = WaitDecoder::new(256);
        for bytes in samples() {
            for cut in 0..bytes.len() {
                let short = &bytes[..cut];
                let ok = dec.decode(short).is_ok();
                let reference_ok = VcpuResponse::parse_from_bytes(short).is_ok();
                if ok && reference_ok {
                    check(short, &mut dec);
                }
            }
            // Flip each byte.
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= 0xff;
                let _ = dec.decode(&b);
            }
        }
    }

    #[test]
    fn buffers_are_reused() {
        let mut dec = WaitDecoder::new(256);
        let bytes = samples().swap_remove(4);
        dec.decode(&bytes).unwrap();
        let ptrs = (dec.data.as_ptr(), dec.regs.as_ptr());
        dec.decode(&bytes).unwrap();
        assert_eq!(ptrs, (dec.data.as_ptr(), dec.regs.as_ptr()));
    }
}
