//! One-line descriptions of requests for error messages: the operation and
//! its key arguments, e.g. `reserve_range(IoPort, 0x3f8, 8)`. Built only
//! when a request was refused (by the SDK for its errors, by the host for
//! its debug log), so the success path never formats.

use crate::main_request::{self, create, set_irq_routing};
use crate::MainRequest;
use protobuf::EnumOrUnknown;

fn space(s: &EnumOrUnknown<crate::AddressSpace>) -> String {
    match s.enum_value() {
        Ok(crate::AddressSpace::IOPORT) => "IoPort".into(),
        Ok(crate::AddressSpace::MMIO) => "Mmio".into(),
        Err(v) => format!("space {v}"),
    }
}

fn state_set(s: &EnumOrUnknown<main_request::StateSet>) -> String {
    match s.enum_value() {
        Ok(v) => format!("{v:?}"),
        Err(v) => format!("set {v}"),
    }
}

/// Describes a main request.
pub fn main_request(request: &MainRequest) -> String {
    use main_request::Message as M;
    match &request.message {
        Some(M::Create(c)) => match &c.constructor {
            Some(create::Constructor::Memory(m)) => format!(
                "create memory #{} (memfd offset {:#x}, guest {:#x}, length {:#x}{}{})",
                c.id,
                m.offset,
                m.start,
                m.length,
                if m.read_only { ", read-only" } else { "" },
                if m.dirty_log { ", dirty log" } else { "" }
            ),
            Some(create::Constructor::IoEvent(e)) => format!(
                "create io_event #{} ({}, {:#x}, length {}, datamatch {:#x})",
                c.id,
                space(&e.space),
                e.address,
                e.length,
                e.datamatch
            ),
            Some(create::Constructor::IrqEvent(e)) => format!(
                "create irq_event #{} (irq {}{})",
                c.id,
                e.irq_id,
                if e.resample { ", resample" } else { "" }
            ),
            _ => format!("create #{}", c.id),
        },
        Some(M::Destroy(d)) => format!("destroy #{}", d.id),
        Some(M::CheckExtension(c)) => format!("check_extension({})", c.extension),
        Some(M::ReserveRange(r)) => {
            let what = if r.length == 0 {
                "unreserve_range"
            } else if r.async_write {
                "reserve_async_write_range"
            } else {
                "reserve_range"
            };
            if r.length == 0 {
                format!("{what}({}, {:#x})", space(&r.space), r.start)
            } else {
                format!("{what}({}, {:#x}, {})", space(&r.space), r.start, r.length)
            }
        }
        Some(M::SetIrq(s)) => format!("set_irq({}, {})", s.irq_id, s.active),
        Some(M::SetIrqRouting(r)) => {
            let routes: Vec<String> = r
                .routes
                .iter()
                .take(4)
                .map(|rt| match &rt.route {
                    Some(set_irq_routing::route::Route::Irqchip(i)) => {
                        format!("{}→chip {} pin {}", rt.irq_id, i.irqchip, i.pin)
                    }
                    Some(set_irq_routing::route::Route::Msi(m)) => {
                        format!("{}→msi {:#x}", rt.irq_id, m.address)
                    }
                    _ => format!("{}→?", rt.irq_id),
                })
                .collect();
            let more = if r.routes.len() > 4 { ", ..." } else { "" };
            format!(
                "set_irq_routing({} routes: {}{more})",
                r.routes.len(),
                routes.join(", ")
            )
        }
        Some(M::GetState(g)) => format!("get_state({})", state_set(&g.set)),
        Some(M::SetState(s)) => {
            format!("set_state({}, {} bytes)", state_set(&s.set), s.state.len())
        }
        Some(M::SetIdentityMapAddr(a)) => format!("set_identity_map_addr({:#x})", a.address),
        Some(M::PauseVcpus(p)) => {
            format!("pause_vcpus(mask {:#x}, user {:#x})", p.cpu_mask, p.user)
        }
        Some(M::SetCallHint(h)) => format!(
            "set_call_hint({}, {:#x}, {} hints)",
            space(&h.space),
            h.address,
            h.hints.len()
        ),
        Some(M::DirtyLog(d)) => format!("dirty_log(memory #{})", d.id),
        Some(M::NewConnection(_)) => "new_connection".into(),
        Some(M::GetShutdownEventfd(_)) => "get_shutdown_eventfd".into(),
        Some(M::GetSupportedCpuid(_)) => "get_supported_cpuid".into(),
        Some(M::GetEmulatedCpuid(_)) => "get_emulated_cpuid".into(),
        Some(M::GetMsrIndexList(_)) => "get_msr_index_list".into(),
        Some(M::GetNetConfig(_)) => "get_net_config".into(),
        Some(M::GetVcpus(_)) => "get_vcpus".into(),
        Some(M::Start(_)) => "start".into(),
        Some(M::GetControlSocket(_)) => "get_control_socket".into(),
        Some(M::GetRestoreState(_)) => "get_restore_state".into(),
        Some(M::SnapshotInMemory(_)) => "snapshot_in_memory".into(),
        Some(M::DeclareRestartable(_)) => "declare_restartable".into(),
        Some(M::Attach(_)) => "attach".into(),
        Some(M::ResetToSnapshot(r)) => {
            format!(
                "reset_to_snapshot ({} plugin pages)",
                r.plugin_dirty_pages.len()
            )
        }
        None => "an empty main request".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_range_names_its_arguments() {
        let mut req = MainRequest::new();
        let r = req.mut_reserve_range();
        r.space = EnumOrUnknown::new(crate::AddressSpace::IOPORT);
        r.start = 0x3f8;
        r.length = 8;
        assert_eq!(main_request(&req), "reserve_range(IoPort, 0x3f8, 8)");
    }

    #[test]
    fn get_control_socket_is_named() {
        let mut req = MainRequest::new();
        req.set_get_control_socket(Default::default());
        assert_eq!(main_request(&req), "get_control_socket");
    }
}
