//! The exit path's codec: encodes `VcpuResponse{wait{io}}` and decodes a
//! canonical `VcpuRequest{resume}` without building protobuf messages, so an
//! exit that crosses into the plugin allocates nothing on the host. Anything
//! that is not the canonical shape goes through the generated code instead;
//! the tests check both agree.

pub use plugin_proto::framing::{put_varint, varint_len};

fn len_field_size(field_len: usize) -> usize {
    1 + varint_len(field_len as u64) + field_len
}

fn put_len_field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// One `Wait.Io` event.
pub struct IoEvent<'a> {
    pub space: i32,
    pub address: u64,
    pub is_write: bool,
    pub no_resume: bool,
    pub data: &'a [u8],
    pub regs: &'a [u8],
    pub sregs: &'a [u8],
    pub debugregs: &'a [u8],
}

/// Appends the serialized `VcpuResponse{wait{io{...}}}` (no length prefix),
/// byte-identical to what the generated code produces.
pub fn encode_io_event(out: &mut Vec<u8>, e: &IoEvent<'_>) {
    // Wait.Io fields: space 1 (varint), address 2, is_write 3, no_resume 4,
    // data 5, regs 6, sregs 7, debugregs 8 (bytes); defaults are omitted.
    let mut io_len = 0;
    if e.space != 0 {
        io_len += 1 + varint_len(e.space as i64 as u64);
    }
    if e.address != 0 {
        io_len += 1 + varint_len(e.address);
    }
    io_len += 2 * usize::from(e.is_write) + 2 * usize::from(e.no_resume);
    for b in [e.data, e.regs, e.sregs, e.debugregs] {
        if !b.is_empty() {
            io_len += len_field_size(b.len());
        }
    }
    let wait_len = len_field_size(io_len);
    // VcpuResponse.wait = field 2; Wait.io = field 2: both tag 0x12.
    out.push(0x12);
    put_varint(out, wait_len as u64);
    out.push(0x12);
    put_varint(out, io_len as u64);
    if e.space != 0 {
        out.push(0x08);
        put_varint(out, e.space as i64 as u64);
    }
    if e.address != 0 {
        out.push(0x10);
        put_varint(out, e.address);
    }
    if e.is_write {
        out.extend_from_slice(&[0x18, 1]);
    }
    if e.no_resume {
        out.extend_from_slice(&[0x20, 1]);
    }
    for (tag, b) in [
        (0x2a, e.data),
        (0x32, e.regs),
        (0x3a, e.sregs),
        (0x42, e.debugregs),
    ] {
        if !b.is_empty() {
            put_len_field(out, tag, b);
        }
    }
}

/// Appends the serialized `VcpuResponse{wait{coalesced_writes{records}}}`
/// (no length prefix), byte-identical to the generated code's; `records` is
/// the packed batch of docs/protocol-extensions.md §4.3.
pub fn encode_coalesced_writes(out: &mut Vec<u8>, records: &[u8]) {
    // Wait.coalesced_writes is field 1000 (tag 8002, varint c2 3e);
    // CoalescedWrites.records is field 1 (tag 0x0a), omitted when empty.
    const TAG: [u8; 2] = [0xc2, 0x3e];
    let inner = if records.is_empty() {
        0
    } else {
        len_field_size(records.len())
    };
    let wait_len = TAG.len() + varint_len(inner as u64) + inner;
    out.push(0x12);
    put_varint(out, wait_len as u64);
    out.extend_from_slice(&TAG);
    put_varint(out, inner as u64);
    if !records.is_empty() {
        put_len_field(out, 0x0a, records);
    }
}

/// The fields of a `Resume`, borrowed from the request buffer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResumeRef<'a> {
    pub data: &'a [u8],
    pub regs: &'a [u8],
    pub sregs: &'a [u8],
    pub debugregs: &'a [u8],
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let (v, n) = plugin_proto::framing::decode_varint(buf.get(*pos..)?).ok()??;
    *pos += n;
    Some(v)
}

fn read_len<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = usize::try_from(read_varint(buf, pos)?).ok()?;
    let end = pos.checked_add(len)?;
    let s = buf.get(*pos..end)?;
    *pos = end;
    Some(s)
}

/// Decodes `VcpuRequest{resume{...}}` when it is in the canonical form the
/// SDKs produce: the request is one `resume` field, and the resume holds at
/// most one of each of its four bytes fields. Anything else (other requests,
/// repeated or unknown fields) returns `None` and is decoded by the generated
/// code, which then defines the meaning.
pub fn parse_resume(buf: &[u8]) -> Option<ResumeRef<'_>> {
    let mut pos = 0;
    if *buf.first()? != 0x12 {
        return None;
    }
    pos += 1;
    let body = read_len(buf, &mut pos)?;
    if pos != buf.len() {
        return None;
    }
    let mut r = ResumeRef::default();
    let mut seen = 0u8;
    let mut p = 0;
    while p < body.len() {
        let tag = body[p];
        p += 1;
        let slot = match tag {
            0x0a => &mut r.data,
            0x12 => &mut r.regs,
            0x1a => &mut r.sregs,
            0x22 => &mut r.debugregs,
            _ => return None,
        };
        let bit = 1 << (tag >> 3);
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        *slot = read_len(body, &mut p)?;
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use plugin_proto::protobuf::Message;
    use plugin_proto::{vcpu_request, vcpu_response, VcpuRequest, VcpuResponse};

    use super::*;

    #[test]
    fn coalesced_writes_encode_as_the_generated_code() {
        for n in [0usize, 1, 5, 170, 300] {
            let records: Vec<u8> = (0..n * 24).map(|i| (i * 7) as u8).collect();
            let mut c = vcpu_response::wait::CoalescedWrites::new();
            c.records = records.clone();
            let mut w = vcpu_response::Wait::new();
            w.set_coalesced_writes(c);
            let mut r = VcpuResponse::new();
            r.set_wait(w);
            let mut out = Vec::new();
            encode_coalesced_writes(&mut out, &records);
            assert_eq!(out, r.write_to_bytes().unwrap(), "{n} records");
        }
    }

    fn generated_io(e: &IoEvent<'_>) -> Vec<u8> {
        let mut io = vcpu_response::wait::Io::new();
        io.space = plugin_proto::protobuf::EnumOrUnknown::from_i32(e.space);
        io.address = e.address;
        io.is_write = e.is_write;
        io.no_resume = e.no_resume;
        io.data = e.data.to_vec();
        io.regs = e.regs.to_vec();
        io.sregs = e.sregs.to_vec();
        io.debugregs = e.debugregs.to_vec();
        let mut w = vcpu_response::Wait::new();
        w.set_io(io);
        let mut r = VcpuResponse::new();
        r.set_wait(w);
        r.write_to_bytes().unwrap()
    }

    #[test]
    fn io_events_match_the_generated_encoder() {
        let big = vec![0xabu8; 312];
        let addresses = [0u64, 1, 0x3f8, 0x7f, 0x80, 0xfee0_0000, u64::MAX];
        for space in [0, 1] {
            for &address in &addresses {
                for flags in 0..4 {
                    for data_len in [0usize, 1, 2, 4, 8, 127, 128, 256] {
                        let data = vec![0x5a; data_len];
                        let (regs, sregs): (&[u8], &[u8]) = if data_len == 8 {
                            (&big[..144], &big)
                        } else {
                            (&[], &[])
                        };
                        let e = IoEvent {
                            space,
                            address,
                            is_write: flags & 1 != 0,
                            no_resume: flags & 2 != 0,
                            data: &data,
                            regs,
                            sregs,
                            debugregs: if data_len == 4 { &big[..128] } else { &[] },
                        };
                        let mut out = Vec::new();
                        encode_io_event(&mut out, &e);
                        assert_eq!(
                            out,
                            generated_io(&e),
                            "space {space} addr {address:#x} flags {flags} len {data_len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }

    fn resume_bytes(data: &[u8], regs: &[u8], sregs: &[u8], debugregs: &[u8]) -> Vec<u8> {
        let mut r = VcpuRequest::new();
        let res = r.mut_resume();
        res.data = data.to_vec();
        res.regs = regs.to_vec();
        res.sregs = sregs.to_vec();
        res.debugregs = debugregs.to_vec();
        r.write_to_bytes().unwrap()
    }

    #[test]
    fn canonical_resumes_decode_like_the_generated_code() {
        let regs = [7u8; 144];
        for (d, r, s, g) in [
            (&[][..], &[][..], &[][..], &[][..]),
            (&[1, 2, 3, 4][..], &[][..], &[][..], &[][..]),
            (&[9][..], &regs[..], &[][..], &[1; 128][..]),
            (&[][..], &regs[..], &[2; 312][..], &[][..]),
        ] {
            let bytes = resume_bytes(d, r, s, g);
            let fast = parse_resume(&bytes).expect("canonical resume");
            let slow = VcpuRequest::parse_from_bytes(&bytes).unwrap();
            let slow: &vcpu_request::Resume = slow.resume();
            assert_eq!(
                (fast.data, fast.regs, fast.sregs, fast.debugregs),
                (
                    &slow.data[..],
                    &slow.regs[..],
                    &slow.sregs[..],
                    &slow.debugregs[..]
                )
            );
        }
    }

    #[test]
    fn anything_else_falls_back() {
        let mut wait = VcpuRequest::new();
        wait.mut_wait();
        assert!(parse_resume(&wait.write_to_bytes().unwrap()).is_none());
        assert!(parse_resume(&[]).is_none());
        // Truncated, trailing bytes, repeated field, unknown field.
        let good = resume_bytes(&[1, 2], &[], &[], &[]);
        assert!(parse_resume(&good[..good.len() - 1]).is_none());
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0x12, 0x00]);
        assert!(parse_resume(&trailing).is_none());
        assert!(parse_resume(&[0x12, 0x06, 0x0a, 0x01, 0x01, 0x0a, 0x01, 0x02]).is_none());
        assert!(parse_resume(&[0x12, 0x02, 0x28, 0x01]).is_none());
        // Length prefixes pointing past the end.
        assert!(parse_resume(&[0x12, 0x7f]).is_none());
        assert!(parse_resume(&[0x12, 0x02, 0x0a, 0x05]).is_none());
    }
}
