//! Readable one-line forms of protocol messages, shared by `--trace` and
//! `vmm replay`: `ReserveRange{space: IoPort, start: 0x3f8, length: 0x8}`,
//! `Io{IoPort 0x3f8 write [0x48]}`, `Resume{data: [0x2a, 0x0]}`.
//!
//! Every function takes already-decoded messages (decoding hostile bytes is
//! the caller's, with its own error), never panics, and bounds its output:
//! byte strings show at most [`MAX_SHOWN_BYTES`] bytes, lists their length.

use std::fmt::Write;

use nix::errno::Errno;
use plugin_proto::protobuf::{Enum, EnumOrUnknown};
use plugin_proto::{
    main_request, main_response, vcpu_request, vcpu_response, AddressSpace, MainRequest,
    MainResponse, VcpuRequest, VcpuResponse,
};

/// Most bytes of a byte string printed in full.
pub const MAX_SHOWN_BYTES: usize = 16;

/// The request kind of a main request, as named in traces and statistics.
pub fn main_kind(req: &MainRequest) -> &'static str {
    use main_request::Message as Q;
    match &req.message {
        None => "Unknown",
        Some(Q::Create(_)) => "Create",
        Some(Q::Destroy(_)) => "Destroy",
        Some(Q::NewConnection(_)) => "NewConnection",
        Some(Q::GetShutdownEventfd(_)) => "GetShutdownEventfd",
        Some(Q::CheckExtension(_)) => "CheckExtension",
        Some(Q::GetSupportedCpuid(_)) => "GetSupportedCpuid",
        Some(Q::GetEmulatedCpuid(_)) => "GetEmulatedCpuid",
        Some(Q::GetMsrIndexList(_)) => "GetMsrIndexList",
        Some(Q::GetNetConfig(_)) => "GetNetConfig",
        Some(Q::ReserveRange(_)) => "ReserveRange",
        Some(Q::SetIrq(_)) => "SetIrq",
        Some(Q::SetIrqRouting(_)) => "SetIrqRouting",
        Some(Q::GetState(_)) => "GetState",
        Some(Q::SetState(_)) => "SetState",
        Some(Q::SetIdentityMapAddr(_)) => "SetIdentityMapAddr",
        Some(Q::PauseVcpus(_)) => "PauseVcpus",
        Some(Q::GetVcpus(_)) => "GetVcpus",
        Some(Q::Start(_)) => "Start",
        Some(Q::SetCallHint(_)) => "SetCallHint",
        Some(Q::DirtyLog(_)) => "DirtyLog",
        Some(Q::GetControlSocket(_)) => "GetControlSocket",
        Some(Q::GetRestoreState(_)) => "GetRestoreState",
        #[allow(unreachable_patterns)]
        Some(_) => "Unknown",
    }
}

/// The request kind of a vcpu request.
pub fn vcpu_kind(req: &VcpuRequest) -> &'static str {
    use vcpu_request::Message as Q;
    match &req.message {
        None => "Unknown",
        Some(Q::Wait(_)) => "Wait",
        Some(Q::Resume(_)) => "Resume",
        Some(Q::GetState(_)) => "GetState",
        Some(Q::SetState(_)) => "SetState",
        Some(Q::GetMsrs(_)) => "GetMsrs",
        Some(Q::SetMsrs(_)) => "SetMsrs",
        Some(Q::SetCpuid(_)) => "SetCpuid",
        Some(Q::Shutdown(_)) => "Shutdown",
        Some(Q::GetHypervCpuid(_)) => "GetHypervCpuid",
        Some(Q::EnableCapability(_)) => "EnableCapability",
        #[allow(unreachable_patterns)]
        Some(_) => "Unknown",
    }
}

fn space(s: EnumOrUnknown<AddressSpace>) -> String {
    match s.enum_value() {
        Ok(AddressSpace::IOPORT) => "IoPort".into(),
        Ok(AddressSpace::MMIO) => "Mmio".into(),
        Err(v) => format!("Space({v})"),
    }
}

fn enum_name<E: Enum + std::fmt::Debug>(v: EnumOrUnknown<E>) -> String {
    match v.enum_value() {
        Ok(e) => format!("{e:?}"),
        Err(v) => format!("Unknown({v})"),
    }
}

/// `[0x1, 0x2]`, or `[0x1, …] (300 bytes)` past [`MAX_SHOWN_BYTES`].
pub fn bytes(out: &mut String, b: &[u8]) {
    out.push('[');
    for (i, x) in b.iter().take(MAX_SHOWN_BYTES).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{x:#x}");
    }
    if b.len() > MAX_SHOWN_BYTES {
        let _ = write!(out, ", …] ({} bytes)", b.len());
    } else {
        out.push(']');
    }
}

/// The name of an errno value (`EPERM`), or its number when unknown.
pub fn errno_name(e: i32) -> String {
    let errno = Errno::from_raw(e.wrapping_abs());
    if errno == Errno::UnknownErrno {
        format!("errno {e}")
    } else {
        format!("{errno:?}")
    }
}

/// A main request with its fields.
pub fn main_request(out: &mut String, req: &MainRequest) {
    use main_request::Message as Q;
    let kind = main_kind(req);
    out.push_str(kind);
    out.push('{');
    match &req.message {
        Some(Q::Create(c)) => {
            use main_request::create::Constructor as C;
            let _ = write!(out, "id: {}", c.id);
            match &c.constructor {
                Some(C::IoEvent(io)) => {
                    let _ = write!(
                        out,
                        ", IoEvent{{space: {}, address: {:#x}, length: {}, datamatch: {:#x}}}",
                        space(io.space),
                        io.address,
                        io.length,
                        io.datamatch
                    );
                }
                Some(C::Memory(m)) => {
                    let _ = write!(
                        out,
                        ", Memory{{start: {:#x}, length: {:#x}, offset: {:#x}{}{}}}",
                        m.start,
                        m.length,
                        m.offset,
                        if m.read_only { ", read_only" } else { "" },
                        if m.dirty_log { ", dirty_log" } else { "" }
                    );
                }
                Some(C::IrqEvent(i)) => {
                    let _ = write!(
                        out,
                        ", IrqEvent{{irq_id: {}, resample: {}}}",
                        i.irq_id, i.resample
                    );
                }
                #[allow(unreachable_patterns)]
                Some(_) => out.push_str(", unknown constructor"),
                None => out.push_str(", no constructor"),
            }
        }
        Some(Q::Destroy(d)) => {
            let _ = write!(out, "id: {}", d.id);
        }
        Some(Q::CheckExtension(c)) => {
            let _ = write!(out, "extension: {}", c.extension);
        }
        Some(Q::ReserveRange(r)) => {
            let _ = write!(
                out,
                "space: {}, start: {:#x}, length: {:#x}{}",
                space(r.space),
                r.start,
                r.length,
                if r.coalesced {
                    ", coalesced"
                } else if r.async_write {
                    ", async_write"
                } else {
                    ""
                }
            );
        }
        Some(Q::SetIrq(s)) => {
            let _ = write!(out, "irq_id: {}, active: {}", s.irq_id, s.active);
        }
        Some(Q::SetIrqRouting(s)) => {
            use main_request::set_irq_routing::route::Route as R;
            let _ = write!(out, "routes: {}", s.routes.len());
            for r in s.routes.iter().take(4) {
                match &r.route {
                    Some(R::Irqchip(c)) => {
                        let _ = write!(out, ", {}→irqchip{}:{}", r.irq_id, c.irqchip, c.pin);
                    }
                    Some(R::Msi(m)) => {
                        let _ = write!(out, ", {}→msi{:#x}:{:#x}", r.irq_id, m.address, m.data);
                    }
                    _ => {
                        let _ = write!(out, ", {}→none", r.irq_id);
                    }
                }
            }
            if s.routes.len() > 4 {
                out.push_str(", …");
            }
        }
        Some(Q::GetState(g)) => {
            let _ = write!(out, "set: {}", enum_name(g.set));
        }
        Some(Q::SetState(s)) => {
            let _ = write!(
                out,
                "set: {}, state: {} bytes",
                enum_name(s.set),
                s.state.len()
            );
        }
        Some(Q::SetIdentityMapAddr(s)) => {
            let _ = write!(out, "address: {:#x}", s.address);
        }
        Some(Q::PauseVcpus(p)) => {
            let _ = write!(out, "cpu_mask: {:#x}, user: {:#x}", p.cpu_mask, p.user);
        }
        Some(Q::GetVcpus(g)) => {
            let mut sep = "";
            if g.accept_chunked_fds {
                out.push_str("accept_chunked_fds");
                sep = ", ";
            }
            if g.request_fast_channel {
                let _ = write!(out, "{sep}request_fast_channel");
            }
        }
        Some(Q::SetCallHint(h)) => {
            let _ = write!(
                out,
                "space: {}, address: {:#x}, on_write: {}, hints: {}",
                space(h.space),
                h.address,
                h.on_write,
                h.hints.len()
            );
        }
        Some(Q::DirtyLog(d)) => {
            let _ = write!(out, "id: {}", d.id);
        }
        _ => {}
    }
    out.push('}');
}

/// ` = 0`, ` = EPERM`, plus what a successful reply carries
/// (` {vcpu_count: 1, fast_channel: true}`) and the descriptors it passes.
pub fn main_result(out: &mut String, resp: &MainResponse, fds: usize) {
    use main_response::Message as R;
    if resp.errno != 0 {
        let _ = write!(out, " = {}", errno_name(resp.errno));
        return;
    }
    out.push_str(" = 0");
    match &resp.message {
        Some(R::CheckExtension(c)) => {
            let _ = write!(out, " {{has_extension: {}}}", c.has_extension);
        }
        Some(R::GetSupportedCpuid(c)) | Some(R::GetEmulatedCpuid(c)) => {
            let _ = write!(out, " {{entries: {}}}", c.entries.len());
        }
        Some(R::GetMsrIndexList(m)) => {
            let _ = write!(out, " {{indices: {}}}", m.indices.len());
        }
        Some(R::GetState(g)) => {
            let _ = write!(out, " {{state: {} bytes}}", g.state.len());
        }
        Some(R::GetVcpus(g)) => {
            let _ = write!(
                out,
                " {{vcpu_count: {}, fast_channel: {}}}",
                g.vcpu_count, g.fast_channel
            );
        }
        Some(R::DirtyLog(d)) => {
            let _ = write!(out, " {{bitmap: {} bytes}}", d.bitmap.len());
        }
        Some(R::GetNetConfig(n)) => {
            let ip = n.host_ipv4_address.to_le_bytes();
            let _ = write!(out, " {{ip: {}.{}.{}.{}}}", ip[0], ip[1], ip[2], ip[3]);
        }
        _ => {}
    }
    if fds > 0 {
        let _ = write!(out, " +{fds} fd{}", if fds == 1 { "" } else { "s" });
    }
}

/// A vcpu request with its fields.
pub fn vcpu_request(out: &mut String, req: &VcpuRequest) {
    use vcpu_request::Message as Q;
    out.push_str(vcpu_kind(req));
    out.push('{');
    match &req.message {
        Some(Q::Resume(r)) => {
            let mut sep = "";
            if !r.data.is_empty() {
                out.push_str("data: ");
                bytes(out, &r.data);
                sep = ", ";
            }
            for (name, image) in [
                ("regs", &r.regs),
                ("sregs", &r.sregs),
                ("debugregs", &r.debugregs),
            ] {
                if !image.is_empty() {
                    let _ = write!(out, "{sep}{name}: {} bytes", image.len());
                    sep = ", ";
                }
            }
        }
        Some(Q::GetState(g)) => {
            let _ = write!(out, "set: {}", enum_name(g.set));
        }
        Some(Q::SetState(s)) => {
            let _ = write!(
                out,
                "set: {}, state: {} bytes",
                enum_name(s.set),
                s.state.len()
            );
        }
        Some(Q::GetMsrs(g)) => {
            let _ = write!(out, "entries: {}", g.entry_indices.len());
            if let Some(first) = g.entry_indices.first() {
                let _ = write!(out, ", first: {first:#x}");
            }
        }
        Some(Q::SetMsrs(s)) => {
            let _ = write!(out, "entries: {}", s.entries.len());
            if let Some(first) = s.entries.first() {
                let _ = write!(out, ", first: {:#x}={:#x}", first.index, first.data);
            }
        }
        Some(Q::SetCpuid(s)) => {
            let _ = write!(out, "entries: {}", s.entries.len());
        }
        Some(Q::EnableCapability(c)) => {
            let _ = write!(out, "capability: {}", c.capability);
        }
        _ => {}
    }
    out.push('}');
}

/// A wait reason the host delivers: `Init{}`, `Io{IoPort 0x3f8 write
/// [0x48]}`, `Io{Mmio 0xd0000000 read 4}`, `User{user: 0x1}`.
pub fn wait(out: &mut String, w: &vcpu_response::Wait) {
    use vcpu_response::wait::Exit as E;
    match &w.exit {
        Some(E::Init(_)) => out.push_str("Init{}"),
        Some(E::Io(io)) => {
            let _ = write!(out, "Io{{{} {:#x} ", space(io.space), io.address);
            if io.is_write {
                out.push_str("write ");
                bytes(out, &io.data);
            } else {
                let _ = write!(out, "read {}", io.data.len());
            }
            if io.no_resume {
                out.push_str(" posted");
            }
            for (name, image) in [
                ("regs", &io.regs),
                ("sregs", &io.sregs),
                ("debugregs", &io.debugregs),
            ] {
                if !image.is_empty() {
                    let _ = write!(out, " +{name}");
                }
            }
            out.push('}');
        }
        Some(E::User(u)) => {
            let _ = write!(out, "User{{user: {:#x}}}", u.user);
        }
        Some(E::HypervCall(c)) => {
            let _ = write!(
                out,
                "HypervCall{{input: {:#x}, params: [{:#x}, {:#x}]}}",
                c.input, c.params0, c.params1
            );
        }
        Some(E::HypervSynic(s)) => {
            let _ = write!(
                out,
                "HypervSynic{{msr: {:#x}, control: {:#x}, evt_page: {:#x}, msg_page: {:#x}}}",
                s.msr, s.control, s.evt_page, s.msg_page
            );
        }
        Some(E::CoalescedWrites(c)) => {
            let _ = write!(
                out,
                "CoalescedWrites{{{} writes{}}}",
                c.records.len() / 24,
                if c.records.len().is_multiple_of(24) {
                    ""
                } else {
                    ", malformed"
                }
            );
        }
        #[allow(unreachable_patterns)]
        Some(_) => out.push_str("UnknownWait{}"),
        None => out.push_str("Wait{}"),
    }
}

/// The result part of a reply to a vcpu request: ` = 0 {state: 512
/// bytes}`, ` = EINVAL`, ` = Init{}` (a `Wait` answered with its reason).
pub fn vcpu_result(out: &mut String, resp: &VcpuResponse) {
    use vcpu_response::Message as R;
    if resp.errno != 0 {
        let _ = write!(out, " = {}", errno_name(resp.errno));
        return;
    }
    match &resp.message {
        Some(R::Wait(w)) => {
            out.push_str(" = ");
            wait(out, w);
        }
        Some(R::GetState(g)) => {
            let _ = write!(out, " = 0 {{state: {} bytes}}", g.state.len());
        }
        Some(R::GetMsrs(m)) => {
            let _ = write!(out, " = 0 {{entries: {}}}", m.entry_data.len());
        }
        Some(R::GetHypervCpuid(c)) => {
            let _ = write!(out, " = 0 {{entries: {}}}", c.entries.len());
        }
        _ => out.push_str(" = 0"),
    }
}

/// A latency the way traces print it: `850ns`, `12µs`, `3.4ms`, `2.1s`.
pub fn duration(out: &mut String, d: std::time::Duration) {
    let ns = d.as_nanos();
    let _ = match ns {
        0..=999 => write!(out, "{ns}ns"),
        1_000..=999_999 => write!(out, "{}µs", ns / 1_000),
        1_000_000..=999_999_999 => write!(out, "{:.1}ms", ns as f64 / 1e6),
        _ => write!(out, "{:.1}s", ns as f64 / 1e9),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_requests_read_as_documented() {
        let mut q = MainRequest::new();
        let r = q.mut_reserve_range();
        r.space = EnumOrUnknown::new(AddressSpace::IOPORT);
        r.start = 0x3f8;
        r.length = 8;
        let mut s = String::new();
        main_request(&mut s, &q);
        assert_eq!(s, "ReserveRange{space: IoPort, start: 0x3f8, length: 0x8}");
        let mut resp = MainResponse::new();
        resp.errno = Errno::EPERM as i32;
        let mut s = String::new();
        main_result(&mut s, &resp, 0);
        assert_eq!(s, " = EPERM");
        resp.errno = 0;
        resp.mut_get_vcpus().vcpu_count = 2;
        let mut s = String::new();
        main_result(&mut s, &resp, 4);
        assert_eq!(s, " = 0 {vcpu_count: 2, fast_channel: false} +4 fds");
        // An unknown address space value is shown, not refused.
        let mut q = MainRequest::new();
        q.mut_reserve_range().space = EnumOrUnknown::from_i32(7);
        let mut s = String::new();
        main_request(&mut s, &q);
        assert!(s.starts_with("ReserveRange{space: Space(7),"), "{s}");
    }

    #[test]
    fn vcpu_messages_read_as_documented() {
        let mut w = vcpu_response::Wait::new();
        let io = w.mut_io();
        io.space = EnumOrUnknown::new(AddressSpace::IOPORT);
        io.address = 0x3f8;
        io.is_write = true;
        io.data = vec![0x48];
        let mut s = String::new();
        wait(&mut s, &w);
        assert_eq!(s, "Io{IoPort 0x3f8 write [0x48]}");
        let mut q = VcpuRequest::new();
        q.mut_resume().data = (0..20).collect();
        let mut s = String::new();
        vcpu_request(&mut s, &q);
        assert!(s.starts_with("Resume{data: [0x0, 0x1,"), "{s}");
        assert!(s.ends_with(", …] (20 bytes)}"), "{s}");
        let mut s = String::new();
        duration(&mut s, std::time::Duration::from_micros(12));
        assert_eq!(s, "12µs");
        assert_eq!(errno_name(1), "EPERM");
        assert_eq!(errno_name(100000), "errno 100000");
    }
}
