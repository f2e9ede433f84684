//! The Rust SDK against a fake host speaking the real protocol.

mod common;

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use common::*;
use crosvm_plugin::kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pic_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
};
use crosvm_plugin::{
    AddressSpace, CallHint, Connection, Datamatch, HintDetail, IrqRoute, IrqRouteKind, StateImage,
    VcpuEvent,
};
use plugin_proto::main_request::{self, create::Constructor};
use plugin_proto::main_response;
use plugin_proto::vcpu_request;
use plugin_proto::vcpu_response::{self, wait};
use plugin_proto::{CpuidEntry, MainRequest, MainResponse, VcpuRequest, VcpuResponse};

fn requests(host: &FakeHost) -> Vec<MainRequest> {
    host.log.lock().unwrap().clone()
}

fn last_request(host: &FakeHost) -> MainRequest {
    host.log.lock().unwrap().last().cloned().expect("a request")
}

// ---------------------------------------------------------------------------
// Vcpu-response builders.

fn wait_response(exit: wait::Exit) -> VcpuResponse {
    let mut r = VcpuResponse::new();
    r.mut_wait().exit = Some(exit);
    r
}

fn init() -> Reply {
    Reply::Msg(wait_response(wait::Exit::Init(Default::default())))
}

fn io_event(
    space: plugin_proto::AddressSpace,
    address: u64,
    is_write: bool,
    data: &[u8],
) -> wait::Io {
    wait::Io {
        space: space.into(),
        address,
        is_write,
        data: data.to_vec(),
        ..Default::default()
    }
}

fn io(io: wait::Io) -> Reply {
    Reply::Msg(wait_response(wait::Exit::Io(io)))
}

fn get_state_reply(bytes: &[u8]) -> Reply {
    let mut r = VcpuResponse::new();
    r.mut_get_state().state = bytes.to_vec();
    Reply::Msg(r)
}

fn vcpu_ok(msg: vcpu_response::Message) -> Reply {
    Reply::Msg(VcpuResponse {
        message: Some(msg),
        ..Default::default()
    })
}

fn vcpu_errno(errno: i32) -> Reply {
    Reply::Msg(VcpuResponse {
        errno,
        ..Default::default()
    })
}

fn regs_with(rax: u64) -> kvm_regs {
    kvm_regs {
        rax,
        rip: 0x1000 + rax,
        rflags: 2,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Connecting.

#[test]
fn connect_sends_get_vcpus_and_builds_the_table() {
    let (conn, host) = connect(2, Delivery::Single, default_handler());
    assert_eq!(conn.vcpu_count(), 2);
    let log = requests(&host);
    assert_eq!(log.len(), 2);
    match &log[0].message {
        Some(main_request::Message::GetVcpus(g)) => assert!(g.accept_chunked_fds),
        other => panic!("first request is {other:?}"),
    }
    // The SDK's own shutdown eventfd, polled by every vcpu wait.
    assert!(matches!(
        &log[1].message,
        Some(main_request::Message::GetShutdownEventfd(_))
    ));
    assert_eq!(conn.vcpu(1).unwrap().id(), 1);
    assert_eq!(conn.vcpu(2).unwrap_err().errno(), libc::ENOENT);
}

#[test]
fn connect_legacy_host_without_vcpu_count() {
    let (conn, _host) = connect(3, Delivery::Legacy, default_handler());
    assert_eq!(conn.vcpu_count(), 3);
}

/// 40 vcpus (80 descriptors) delivered in packets of 32, 32 and 16
/// descriptors; each vcpu must end up on its own pipes, in order.
#[test]
fn connect_chunked_forty_vcpus() {
    let (conn, mut host) = connect(40, Delivery::Chunked(32), default_handler());
    assert_eq!(conn.vcpu_count(), 40);
    let mut threads = Vec::new();
    for (i, hv) in host.vcpus.drain(..).enumerate() {
        threads.push(serve_vcpu(hv, move |req| match &req.message {
            Some(vcpu_request::Message::Wait(_)) => {
                vec![Reply::Msg(wait_response(wait::Exit::User(wait::User {
                    user: i as u64,
                    ..Default::default()
                })))]
            }
            _ => vec![],
        }));
    }
    for i in 0..40u32 {
        let vcpu = conn.vcpu(i).unwrap();
        let mut g = vcpu.lock();
        assert_eq!(g.wait().unwrap(), VcpuEvent::Paused { user: i.into() });
    }
    drop(conn);
    for t in threads {
        assert_eq!(t.join().unwrap().len(), 1);
    }
}

#[test]
fn connect_chunked_odd_chunks() {
    // Chunks that split a vcpu's pair across packets still work.
    let (conn, _host) = connect(5, Delivery::Chunked(3), default_handler());
    assert_eq!(conn.vcpu_count(), 5);
}

fn connect_with_get_vcpus_reply(resp: MainResponse, fds: usize) -> crosvm_plugin::Error {
    let (host, plugin) = seqpacket_pair();
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let _ = plugin_proto::framing::recv_packet(host.as_fd(), &mut buf, 8).unwrap();
        let owned: Vec<OwnedFd> = (0..fds).map(|_| eventfd()).collect();
        let borrowed: Vec<_> = owned.iter().map(|f| f.as_fd()).collect();
        let mut scratch = Vec::new();
        plugin_proto::framing::send_message(host.as_fd(), &resp, &borrowed, &mut scratch).unwrap();
        // Closing right away: the queued reply stays readable.
    });
    let err = Connection::from_fd(plugin).unwrap_err();
    t.join().unwrap();
    err
}

#[test]
fn connect_rejects_bad_get_vcpus_replies() {
    let mut ok = MainResponse::new();
    ok.mut_get_vcpus();
    // Zero descriptors.
    assert_eq!(
        connect_with_get_vcpus_reply(ok.clone(), 0).errno(),
        libc::EPROTO
    );
    // Odd descriptor count.
    assert_eq!(
        connect_with_get_vcpus_reply(ok.clone(), 3).errno(),
        libc::EPROTO
    );
    // Missing member.
    assert_eq!(
        connect_with_get_vcpus_reply(MainResponse::new(), 2).errno(),
        libc::EPROTO
    );
    // Host errno.
    assert_eq!(
        connect_with_get_vcpus_reply(errno_response(libc::EIO), 0).errno(),
        libc::EIO
    );
    // vcpu_count larger than what follows: the host closes → error, no hang.
    let mut claims = MainResponse::new();
    claims.mut_get_vcpus().vcpu_count = 2;
    let err = connect_with_get_vcpus_reply(claims, 2);
    assert!(err.errno() > 0);
}

// ---------------------------------------------------------------------------
// Object ids.

fn create_ids(host: &FakeHost) -> Vec<u32> {
    requests(host)
        .iter()
        .filter_map(|r| match &r.message {
            Some(main_request::Message::Create(c)) => Some(c.id),
            _ => None,
        })
        .collect()
}

#[test]
fn object_ids_are_shared_and_reused_only_when_most_recent() {
    let (conn, host) = connect(1, Delivery::Single, default_handler());
    let a = conn
        .create_io_event(AddressSpace::IoPort, 0x10, Datamatch::Any)
        .unwrap();
    let b = conn.create_irq_event(5).unwrap();
    let c = conn.create_irq_event(6).unwrap();
    assert_eq!((a.id(), b.id(), c.id()), (0, 1, 2));
    // Destroying the most recent id gives it back.
    c.destroy().unwrap();
    let c2 = conn.create_irq_event(7).unwrap();
    assert_eq!(c2.id(), 2);
    // Destroying an older one does not.
    a.destroy().unwrap();
    // A derived connection shares the counter.
    let conn2 = conn.new_connection().unwrap();
    let d = conn2.create_irq_event(8).unwrap();
    assert_eq!(d.id(), 3);
    assert_eq!(create_ids(&host), vec![0, 1, 2, 2, 3]);
    drop((b, c2, d));
}

#[test]
fn failed_create_gives_the_id_back() {
    let fail = Arc::new(Mutex::new(false));
    let f = fail.clone();
    let base = default_handler();
    let handler: MainHandler = Arc::new(move |req, fds| {
        if *f.lock().unwrap() {
            (errno_response(libc::EEXIST), vec![])
        } else {
            base(req, fds)
        }
    });
    let (conn, host) = connect(1, Delivery::Single, handler);
    let a = conn.create_irq_event(1).unwrap();
    *fail.lock().unwrap() = true;
    let err = conn.create_irq_event(2).unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    assert!(err.is_host_errno(libc::EEXIST));
    *fail.lock().unwrap() = false;
    let b = conn.create_irq_event(3).unwrap();
    assert_eq!((a.id(), b.id()), (0, 1));
    assert_eq!(create_ids(&host), vec![0, 1, 1]);
}

#[test]
fn destroy_failure_hands_the_handle_back_and_drop_destroys() {
    let fail = Arc::new(Mutex::new(false));
    let f = fail.clone();
    let base = default_handler();
    let handler: MainHandler = Arc::new(move |req, fds| {
        let is_destroy = matches!(req.message, Some(main_request::Message::Destroy(_)));
        if is_destroy && *f.lock().unwrap() {
            (errno_response(libc::ENOENT), vec![])
        } else {
            base(req, fds)
        }
    });
    let (conn, host) = connect(1, Delivery::Single, handler);
    let other = conn.new_connection().unwrap();
    let irq = conn.create_irq_event(4).unwrap();
    *fail.lock().unwrap() = true;
    let (irq, err) = irq.destroy_via(&other).unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
    // Still usable.
    assert!(irq.fd().as_raw_fd() >= 0 && irq.resample_fd().as_raw_fd() >= 0);
    *fail.lock().unwrap() = false;
    drop(irq);
    let destroys: Vec<u32> = requests(&host)
        .iter()
        .filter_map(|r| match &r.message {
            Some(main_request::Message::Destroy(d)) => Some(d.id),
            _ => None,
        })
        .collect();
    assert_eq!(destroys, vec![0, 0]);
}

#[test]
fn missing_descriptors_are_eproto() {
    let handler: MainHandler = Arc::new(|req, _| (ok_response(req), vec![]));
    let (conn, _host) = connect(1, Delivery::Single, handler);
    assert_eq!(
        conn.create_io_event(AddressSpace::Mmio, 0x1000, Datamatch::U32(1))
            .unwrap_err()
            .errno(),
        libc::EPROTO
    );
    assert_eq!(conn.create_irq_event(1).unwrap_err().errno(), libc::EPROTO);
    assert_eq!(
        conn.get_shutdown_eventfd().unwrap_err().errno(),
        libc::EPROTO
    );
    // The half-created objects were destroyed again, ids reused.
    let handler: MainHandler = Arc::new(|req, _| (ok_response(req), vec![]));
    let (conn, host) = connect(1, Delivery::Single, handler);
    let _ = conn.create_irq_event(1);
    let _ = conn.create_irq_event(1);
    assert_eq!(create_ids(&host), vec![0, 0]);
}

// ---------------------------------------------------------------------------
// Main requests: encoding and reply decoding.

#[test]
fn object_creation_encoding() {
    let (conn, host) = connect(1, Delivery::Single, default_handler());
    let io = conn
        .create_io_event(AddressSpace::Mmio, 0xfee0_0000, Datamatch::U16(0xbeef))
        .unwrap();
    match last_request(&host).message {
        Some(main_request::Message::Create(c)) => match c.constructor {
            Some(Constructor::IoEvent(e)) => {
                assert_eq!(e.space.value(), 1);
                assert_eq!((e.address, e.length, e.datamatch), (0xfee0_0000, 2, 0xbeef));
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert!(io.fd().as_raw_fd() >= 0);

    let memfd =
        nix::sys::memfd::memfd_create(c"test", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING)
            .unwrap();
    let mem = conn
        .create_memory(memfd.as_fd(), 0x2000, 0x3000, 0x10_0000, true, true)
        .unwrap();
    match last_request(&host).message {
        Some(main_request::Message::Create(c)) => match c.constructor {
            Some(Constructor::Memory(m)) => {
                assert_eq!((m.offset, m.start, m.length), (0x2000, 0x10_0000, 0x3000));
                assert!(m.read_only && m.dirty_log);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(mem.length(), 0x3000);
    assert_eq!(mem.dirty_log_len(), 1);

    // Unaligned offset / length: EINVAL and nothing sent.
    let before = requests(&host).len();
    for (off, len) in [(1, 0x1000), (0x1000, 0x1001)] {
        let err = conn
            .create_memory(memfd.as_fd(), off, len, 0, false, false)
            .unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL);
    }
    assert_eq!(requests(&host).len(), before);

    let irq = conn.create_irq_event(9).unwrap();
    match last_request(&host).message {
        Some(main_request::Message::Create(c)) => match c.constructor {
            Some(Constructor::IrqEvent(e)) => assert!(e.irq_id == 9 && e.resample),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    drop(irq);
}

/// The memfd attached to Create{memory} reaches the host.
#[test]
fn memory_create_attaches_exactly_one_descriptor() {
    let got = Arc::new(Mutex::new(None));
    let g = got.clone();
    let base = default_handler();
    let handler: MainHandler = Arc::new(move |req, fds| {
        if let Some(main_request::Message::Create(_)) = &req.message {
            *g.lock().unwrap() = Some(fds.len());
        }
        base(req, vec![])
    });
    let (conn, _host) = connect(1, Delivery::Single, handler);
    let memfd = nix::sys::memfd::memfd_create(c"m", nix::sys::memfd::MFdFlags::empty()).unwrap();
    let _mem = conn
        .create_memory(memfd.as_fd(), 0, 0x1000, 0, false, false)
        .unwrap();
    assert_eq!(*got.lock().unwrap(), Some(1));
}

/// A handler returning canned responses for the query requests.
fn query_handler() -> MainHandler {
    Arc::new(|req, _| {
        use main_request::Message as Rq;
        let mut resp = ok_response(req);
        let mut fds = vec![];
        match &req.message {
            Some(Rq::CheckExtension(c)) => {
                resp.mut_check_extension().has_extension = c.extension == 1;
            }
            Some(Rq::GetSupportedCpuid(_)) | Some(Rq::GetEmulatedCpuid(_)) => {
                let entries = vec![
                    CpuidEntry {
                        function: 7,
                        has_index: true,
                        index: 1,
                        eax: 0xa,
                        ..Default::default()
                    },
                    CpuidEntry {
                        function: 0x8000_0001,
                        index: 3,
                        edx: 0xd,
                        ..Default::default()
                    },
                ];
                match resp.message.as_mut() {
                    Some(main_response::Message::GetSupportedCpuid(c))
                    | Some(main_response::Message::GetEmulatedCpuid(c)) => c.entries = entries,
                    _ => unreachable!(),
                }
            }
            Some(Rq::GetMsrIndexList(_)) => {
                resp.mut_get_msr_index_list().indices = vec![0x10, 0xc000_0080];
            }
            Some(Rq::GetNetConfig(_)) => {
                let n = resp.mut_get_net_config();
                n.host_mac_address = vec![0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a];
                n.host_ipv4_address = 0x055C_7364;
                n.netmask = 0xFCFF_FFFF;
                fds.push(eventfd());
            }
            Some(Rq::GetState(g)) => {
                let len = match g.set.value() {
                    0 | 1 => 16,
                    2 => 216,
                    3 => 112,
                    4 => 47, // wrong clock size → EPROTO
                    _ => 0,
                };
                let mut state = vec![0u8; len];
                if let Some(b) = state.first_mut() {
                    *b = 0x5a + g.set.value() as u8;
                }
                resp.mut_get_state().state = state;
            }
            Some(Rq::DirtyLog(_)) => {
                resp.mut_dirty_log().bitmap = vec![0x81; 2];
            }
            Some(Rq::Create(_)) => {}
            _ => {}
        }
        (resp, fds)
    })
}

#[test]
fn query_replies_are_decoded() {
    let (conn, host) = connect(1, Delivery::Single, query_handler());
    assert!(conn.check_extension(1).unwrap());
    assert!(!conn.check_extension(2).unwrap());
    match last_request(&host).message {
        Some(main_request::Message::CheckExtension(c)) => assert_eq!(c.extension, 2),
        other => panic!("{other:?}"),
    }

    for cpuid in [
        conn.get_supported_cpuid().unwrap(),
        conn.get_emulated_cpuid().unwrap(),
    ] {
        assert_eq!(cpuid.len(), 2);
        assert_eq!(
            cpuid[0],
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: 0xa,
                ..Default::default()
            }
        );
        assert_eq!((cpuid[1].index, cpuid[1].flags, cpuid[1].edx), (3, 0, 0xd));
    }
    assert!(matches!(
        last_request(&host).message,
        Some(main_request::Message::GetEmulatedCpuid(_))
    ));
    assert_eq!(conn.get_msr_index_list().unwrap(), vec![0x10, 0xc000_0080]);

    let net = conn.get_net_config().unwrap();
    assert_eq!(net.host_ip, Ipv4Addr::new(100, 115, 92, 5));
    assert_eq!(net.netmask, Ipv4Addr::new(255, 255, 255, 252));
    assert_eq!(net.host_mac, [0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a]);
    assert!(net.tap.as_raw_fd() >= 0);

    let pic = conn.get_pic_state(true).unwrap();
    assert_eq!(pic.last_irr, 0x5a);
    match last_request(&host).message {
        Some(main_request::Message::GetState(g)) => assert_eq!(g.set.value(), 0),
        other => panic!("{other:?}"),
    }
    assert_eq!(conn.get_pic_state(false).unwrap().last_irr, 0x5b);
    assert_eq!(conn.get_ioapic_state().unwrap().base_address & 0xff, 0x5c);
    assert_eq!(conn.get_pit_state().unwrap().channels[0].count & 0xff, 0x5d);
    assert_eq!(conn.get_clock().unwrap_err().errno(), libc::EPROTO);

    let memfd = nix::sys::memfd::memfd_create(c"m", nix::sys::memfd::MFdFlags::empty()).unwrap();
    // The host always answers with a 2-byte bitmap.
    // 0x9000 bytes = 9 pages → 2 bytes: accepted.
    let mem = conn
        .create_memory(memfd.as_fd(), 0, 0x9000, 0, false, true)
        .unwrap();
    assert_eq!(mem.dirty_log().unwrap(), vec![0x81, 0x81]);
    match last_request(&host).message {
        Some(main_request::Message::DirtyLog(d)) => assert_eq!(d.id, mem.id()),
        other => panic!("{other:?}"),
    }
    // One page → 1 byte expected: EPROTO.
    let small = conn
        .create_memory(memfd.as_fd(), 0, 0x1000, 0x10000, false, true)
        .unwrap();
    assert_eq!(
        conn.get_dirty_log(&small).unwrap_err().errno(),
        libc::EPROTO
    );
}

#[test]
fn simple_requests_are_encoded() {
    let (conn, host) = connect(1, Delivery::Single, default_handler());
    conn.reserve_range(AddressSpace::IoPort, 0x3f8, 1).unwrap();
    conn.reserve_async_write_range(AddressSpace::Mmio, 0xd000_0000, 0x1000)
        .unwrap();
    conn.unreserve_range(AddressSpace::Mmio, 0xd000_0000)
        .unwrap();
    conn.set_irq(4, true).unwrap();
    conn.set_irq_routing(&[
        IrqRoute {
            irq_id: 1,
            kind: IrqRouteKind::Irqchip { irqchip: 2, pin: 5 },
        },
        IrqRoute {
            irq_id: 24,
            kind: IrqRouteKind::Msi {
                address: 0x1_fee0_0000,
                data: 0x4041,
            },
        },
    ])
    .unwrap();
    conn.set_irq_routing(&[]).unwrap();
    conn.set_call_hint(&CallHint {
        space: AddressSpace::IoPort,
        address: 0xb2,
        on_write: true,
        details: vec![HintDetail {
            match_rax: true,
            rax: 0x11,
            rcx: 7,
            send_sregs: true,
            ..Default::default()
        }],
    })
    .unwrap();
    conn.clear_call_hint().unwrap();
    conn.set_pic_state(
        false,
        &kvm_pic_state {
            imr: 0xff,
            ..Default::default()
        },
    )
    .unwrap();
    conn.set_clock(&kvm_clock_data {
        clock: 0x1234,
        ..Default::default()
    })
    .unwrap();
    conn.set_identity_map_addr(0xfeff_c000).unwrap();
    conn.pause_vcpus(0b101, 0xdead_beef_0000).unwrap();
    conn.start().unwrap();
    let _fd = conn.get_shutdown_eventfd().unwrap();

    let log = requests(&host);
    use main_request::Message as Rq;
    // Skips GetVcpus and the SDK's own GetShutdownEventfd.
    let mut it = log.into_iter().skip(2).map(|r| r.message.expect("member"));
    match it.next() {
        Some(Rq::ReserveRange(r)) => {
            assert_eq!(
                (r.space.value(), r.start, r.length, r.async_write),
                (0, 0x3f8, 1, false)
            )
        }
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::ReserveRange(r)) => assert_eq!(
            (r.space.value(), r.start, r.length, r.async_write),
            (1, 0xd000_0000, 0x1000, true)
        ),
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::ReserveRange(r)) => {
            assert_eq!((r.space.value(), r.start, r.length), (1, 0xd000_0000, 0))
        }
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::SetIrq(s)) => assert!(s.irq_id == 4 && s.active),
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::SetIrqRouting(s)) => {
            use main_request::set_irq_routing::route::Route;
            assert_eq!(s.routes.len(), 2);
            assert_eq!(s.routes[0].irq_id, 1);
            match &s.routes[0].route {
                Some(Route::Irqchip(c)) => assert_eq!((c.irqchip, c.pin), (2, 5)),
                other => panic!("{other:?}"),
            }
            match &s.routes[1].route {
                Some(Route::Msi(m)) => assert_eq!((m.address, m.data), (0x1_fee0_0000, 0x4041)),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::SetIrqRouting(s)) => assert!(s.routes.is_empty()),
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::SetCallHint(h)) => {
            assert_eq!((h.space.value(), h.address, h.on_write), (0, 0xb2, true));
            assert_eq!(h.hints.len(), 1);
            let d = &h.hints[0];
            assert!(d.match_rax && !d.match_rcx && d.send_sregs && !d.send_debugregs);
            assert_eq!((d.rax, d.rcx), (0x11, 7));
        }
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::SetCallHint(h)) => {
            assert_eq!((h.address, h.on_write, h.hints.len()), (0, false, 0))
        }
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::SetState(s)) => {
            assert_eq!(s.set.value(), 1);
            assert_eq!(s.state.len(), 16);
            assert_eq!(s.state[2], 0xff);
        }
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::SetState(s)) => {
            assert_eq!(s.set.value(), 4);
            assert_eq!(s.state.len(), 48);
            assert_eq!(&s.state[..8], &0x1234u64.to_le_bytes());
        }
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::SetIdentityMapAddr(s)) => assert_eq!(s.address, 0xfeff_c000),
        other => panic!("{other:?}"),
    }
    match it.next() {
        Some(Rq::PauseVcpus(p)) => assert_eq!((p.cpu_mask, p.user), (0b101, 0xdead_beef_0000)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(it.next(), Some(Rq::Start(_))));
    assert!(matches!(it.next(), Some(Rq::GetShutdownEventfd(_))));
    assert!(it.next().is_none());
}

#[test]
fn call_hint_is_validated_client_side() {
    let (conn, host) = connect(1, Delivery::Single, default_handler());
    let before = requests(&host).len();
    let mut hint = CallHint {
        space: AddressSpace::Mmio,
        address: 0,
        on_write: false,
        details: vec![],
    };
    assert_eq!(conn.set_call_hint(&hint).unwrap_err().errno(), libc::EINVAL);
    hint.address = 0x1000;
    hint.details = vec![HintDetail::default(); 33];
    assert_eq!(conn.set_call_hint(&hint).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(requests(&host).len(), before);
    hint.details.truncate(32);
    conn.set_call_hint(&hint).unwrap();
}

#[test]
fn host_errno_is_propagated() {
    let handler: MainHandler = Arc::new(|req, _| match &req.message {
        Some(main_request::Message::ReserveRange(_)) => (errno_response(libc::EPERM), vec![]),
        Some(main_request::Message::Start(_)) => (errno_response(libc::EINVAL), vec![]),
        Some(main_request::Message::GetNetConfig(_)) => (errno_response(libc::ENODATA), vec![]),
        Some(main_request::Message::CheckExtension(_)) => {
            let mut wrong = MainResponse::new();
            wrong.mut_start();
            (wrong, vec![])
        }
        _ => (ok_response(req), vec![]),
    });
    let (conn, _host) = connect(1, Delivery::Single, handler);
    let err = conn.reserve_range(AddressSpace::IoPort, 1, 1).unwrap_err();
    assert_eq!(err.errno(), libc::EPERM);
    assert_eq!(
        err.to_string(),
        "reserve_range(IoPort, 0x1, 1): EPERM: Operation not permitted"
    );
    assert!(err.is_host_errno(libc::EPERM));
    assert_eq!(conn.start().unwrap_err().errno(), libc::EINVAL);
    assert_eq!(conn.get_net_config().unwrap_err().errno(), libc::ENODATA);
    // A reply without the expected member.
    assert_eq!(conn.check_extension(1).unwrap_err().errno(), libc::EPROTO);
}

#[test]
fn net_config_needs_a_descriptor_and_a_six_byte_mac() {
    let handler: MainHandler = Arc::new(|req, _| {
        let mut resp = ok_response(req);
        resp.mut_get_net_config().host_mac_address = vec![1, 2, 3];
        (resp, vec![eventfd()])
    });
    let (conn, _host) = connect(1, Delivery::Single, handler);
    assert_eq!(conn.get_net_config().unwrap_err().errno(), libc::EPROTO);
    let handler: MainHandler = Arc::new(|req, _| {
        let mut resp = ok_response(req);
        resp.mut_get_net_config().host_mac_address = vec![1, 2, 3, 4, 5, 6];
        (resp, vec![])
    });
    let (conn, _host) = connect(1, Delivery::Single, handler);
    assert_eq!(conn.get_net_config().unwrap_err().errno(), libc::EPROTO);
}

#[test]
fn undecodable_main_reply_is_einval() {
    let (host, plugin) = seqpacket_pair();
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let mut scratch = Vec::new();
        plugin_proto::framing::recv_packet(host.as_fd(), &mut buf, 8).unwrap();
        let mut resp = MainResponse::new();
        resp.mut_get_vcpus();
        let (a, b) = pipe();
        plugin_proto::framing::send_message(
            host.as_fd(),
            &resp,
            &[b.as_fd(), a.as_fd()],
            &mut scratch,
        )
        .unwrap();
        plugin_proto::framing::recv_packet(host.as_fd(), &mut buf, 8).unwrap();
        // A truncated varint is not a valid message.
        plugin_proto::framing::send_packet(host.as_fd(), &[0x08, 0xff], &[]).unwrap();
        let _ = plugin_proto::framing::recv_packet(host.as_fd(), &mut buf, 8);
    });
    let conn = Connection::from_fd(plugin).unwrap();
    assert_eq!(conn.start().unwrap_err().errno(), libc::EINVAL);
    drop(conn);
    t.join().unwrap();
}

// ---------------------------------------------------------------------------
// Vcpu events.

fn one_vcpu(
    handler: impl FnMut(&VcpuRequest) -> Vec<Reply> + Send + 'static,
) -> (Connection, std::thread::JoinHandle<Vec<VcpuRequest>>) {
    let (conn, mut host) = connect(1, Delivery::Single, default_handler());
    let t = serve_vcpu(host.vcpus.remove(0), handler);
    (conn, t)
}

fn resume_of(req: &VcpuRequest) -> &vcpu_request::Resume {
    match &req.message {
        Some(vcpu_request::Message::Resume(r)) => r,
        other => panic!("expected resume, got {other:?}"),
    }
}

#[test]
fn every_wait_kind_is_decoded() {
    let mut step = 0;
    let (conn, t) = one_vcpu(move |req| {
        step += 1;
        match (&req.message, step) {
            (Some(vcpu_request::Message::Wait(_)), 1) => vec![init()],
            (Some(vcpu_request::Message::Resume(_)), 2) => {
                let mut e = io_event(plugin_proto::AddressSpace::IOPORT, 0x3f8, true, &[9]);
                e.no_resume = false;
                vec![io(e)]
            }
            (Some(vcpu_request::Message::Resume(_)), 3) => vec![io(io_event(
                plugin_proto::AddressSpace::MMIO,
                0xfed0_0000,
                false,
                &[0; 4],
            ))],
            (Some(vcpu_request::Message::Resume(_)), 4) => {
                vec![Reply::Msg(wait_response(wait::Exit::User(wait::User {
                    user: u64::MAX,
                    ..Default::default()
                })))]
            }
            (Some(vcpu_request::Message::Resume(_)), 5) => {
                vec![Reply::Msg(wait_response(wait::Exit::HypervCall(
                    wait::HypervCall {
                        input: 0x10001,
                        params0: 2,
                        params1: 3,
                        ..Default::default()
                    },
                )))]
            }
            (Some(vcpu_request::Message::Resume(_)), 6) => {
                vec![Reply::Msg(wait_response(wait::Exit::HypervSynic(
                    wait::HypervSynic {
                        msr: 0x4000_0080,
                        control: 1,
                        evt_page: 0x2000,
                        msg_page: 0x3000,
                        ..Default::default()
                    },
                )))]
            }
            _ => vec![],
        }
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    assert_eq!(v.wait().unwrap(), VcpuEvent::Init);
    assert!(v.event_data().is_empty());
    v.resume().unwrap();
    assert_eq!(
        v.wait().unwrap(),
        VcpuEvent::Io {
            space: AddressSpace::IoPort,
            address: 0x3f8,
            is_write: true,
            no_resume: false,
            data: &[9],
        }
    );
    v.resume().unwrap();
    let ev = v.wait().unwrap();
    assert_eq!(
        ev,
        VcpuEvent::Io {
            space: AddressSpace::Mmio,
            address: 0xfed0_0000,
            is_write: false,
            no_resume: false,
            data: &[0; 4],
        }
    );
    assert!(ev.needs_resume());
    v.resume_io_read(&[1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!(v.wait().unwrap(), VcpuEvent::Paused { user: u64::MAX });
    v.resume().unwrap();
    assert_eq!(
        v.wait().unwrap(),
        VcpuEvent::HypervCall {
            input: 0x10001,
            params: [2, 3]
        }
    );
    assert_eq!(v.event_data(), &[0; 8]);
    v.resume_hypercall(0x0123_4567_89ab_cdef).unwrap();
    assert_eq!(
        v.wait().unwrap(),
        VcpuEvent::HypervSynic {
            msr: 0x4000_0080,
            control: 1,
            evt_page: 0x2000,
            msg_page: 0x3000
        }
    );
    drop(v);
    drop(vcpu);
    drop(conn);
    let log = t.join().unwrap();
    assert_eq!(log.len(), 6);
    assert!(matches!(
        log[0].message,
        Some(vcpu_request::Message::Wait(_))
    ));
    assert_eq!(resume_of(&log[1]).data, Vec::<u8>::new());
    assert_eq!(resume_of(&log[2]).data, vec![9]);
    // The read answer: truncated to the 4-byte access.
    assert_eq!(resume_of(&log[3]).data, vec![1, 2, 3, 4]);
    assert_eq!(
        resume_of(&log[5]).data,
        0x0123_4567_89ab_cdefu64.to_le_bytes().to_vec()
    );
    for r in &log[1..] {
        let r = resume_of(r);
        assert!(r.regs.is_empty() && r.sregs.is_empty() && r.debugregs.is_empty());
    }
}

#[test]
fn short_io_read_answer_is_zero_padded() {
    let (conn, t) = one_vcpu(|req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => vec![io(io_event(
            plugin_proto::AddressSpace::IOPORT,
            0x60,
            false,
            &[0; 4],
        ))],
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    v.wait().unwrap();
    v.event_data_mut().copy_from_slice(&[7, 7, 7, 7]);
    v.resume_io_read(&[0xaa]).unwrap();
    drop(v);
    drop((vcpu, conn));
    let log = t.join().unwrap();
    assert_eq!(resume_of(&log[1]).data, vec![0xaa, 0, 0, 0]);
}

/// Async-write notifications queued in the pipe (several frames in one
/// write, then one more) are delivered one by one, and only one Wait is
/// ever sent.
#[test]
fn queued_frames_are_consumed_in_order() {
    let (conn, t) = one_vcpu(|req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => {
            let mut raw = Vec::new();
            for i in 0..3u8 {
                let mut e = io_event(
                    plugin_proto::AddressSpace::MMIO,
                    0x1000 + u64::from(i),
                    true,
                    &[i],
                );
                e.no_resume = true;
                raw.extend(frame(&wait_response(wait::Exit::Io(e))));
            }
            let mut last = io_event(
                plugin_proto::AddressSpace::IOPORT,
                0x80,
                true,
                &[0xff, 0xee],
            );
            last.no_resume = true;
            vec![Reply::Raw(raw), io(last)]
        }
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    for i in 0..3u8 {
        let ev = v.wait().unwrap();
        assert!(!ev.needs_resume());
        assert_eq!(
            ev,
            VcpuEvent::Io {
                space: AddressSpace::Mmio,
                address: 0x1000 + u64::from(i),
                is_write: true,
                no_resume: true,
                data: &[i],
            }
        );
    }
    match v.wait().unwrap() {
        VcpuEvent::Io { address, data, .. } => {
            assert_eq!((address, data), (0x80, &[0xff, 0xee][..]))
        }
        other => panic!("{other:?}"),
    }
    drop(v);
    drop((vcpu, conn));
    assert_eq!(t.join().unwrap().len(), 1);
}

#[test]
fn eof_on_the_response_pipe_is_einval() {
    let (conn, t) = one_vcpu(|req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => vec![init()],
        _ => vec![Reply::Close],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    assert_eq!(v.wait().unwrap(), VcpuEvent::Init);
    v.resume().unwrap();
    assert_eq!(v.wait().unwrap_err().errno(), libc::EINVAL);
    drop(v);
    drop((vcpu, conn));
    t.join().unwrap();
}

#[test]
fn truncated_frame_then_eof_is_einval() {
    let (conn, t) = one_vcpu(|req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => {
            let mut bytes = frame(&wait_response(wait::Exit::Init(Default::default())));
            bytes.pop();
            vec![Reply::Raw(bytes), Reply::Close]
        }
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    assert_eq!(vcpu.lock().wait().unwrap_err().errno(), libc::EINVAL);
    drop((vcpu, conn));
    t.join().unwrap();
}

#[test]
fn bad_wait_replies() {
    let mut n = 0;
    let (conn, t) = one_vcpu(move |_req| {
        n += 1;
        match n {
            // errno, then a non-wait message, then a wait without exit,
            // then an undecodable frame.
            1 => vec![
                vcpu_errno(libc::EPROTO),
                vcpu_ok(vcpu_response::Message::SetState(Default::default())),
                Reply::Msg(wait_response_without_exit()),
                Reply::Raw(vec![2, 0x08, 0xff]),
            ],
            _ => vec![],
        }
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    let err = v.wait().unwrap_err();
    assert!(err.is_host_errno(libc::EPROTO));
    assert_eq!(v.wait().unwrap_err().errno(), libc::EPROTO);
    assert_eq!(v.wait().unwrap_err().errno(), libc::EPROTO);
    assert_eq!(v.wait().unwrap_err().errno(), libc::EINVAL);
    drop(v);
    drop((vcpu, conn));
    // Only the first call sent Wait.
    assert_eq!(t.join().unwrap().len(), 1);
}

fn wait_response_without_exit() -> VcpuResponse {
    let mut r = VcpuResponse::new();
    r.mut_wait();
    r
}

// ---------------------------------------------------------------------------
// Register cache.

#[test]
fn register_sets_are_deferred_into_resume() {
    let (conn, t) = one_vcpu(|req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => vec![init()],
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    assert_eq!(v.wait().unwrap(), VcpuEvent::Init);
    v.set_regs(&regs_with(1));
    v.set_regs(&regs_with(2)); // the last set wins
    let sregs = kvm_sregs {
        cr0: 0x11,
        efer: 0x500,
        ..Default::default()
    };
    v.set_sregs(&sregs);
    let dregs = kvm_debugregs {
        dr7: 0x400,
        ..Default::default()
    };
    v.set_debugregs(&dregs);
    v.resume().unwrap();
    drop(v);
    drop((vcpu, conn));
    let log = t.join().unwrap();
    // Setters did not talk to the host: Wait, then Resume only.
    assert_eq!(log.len(), 2);
    let r = resume_of(&log[1]);
    assert_eq!(r.regs, regs_with(2).as_image());
    assert_eq!(r.sregs, sregs.as_image());
    assert_eq!(r.debugregs, dregs.as_image());
}

#[test]
fn get_after_set_flushes_with_set_state() {
    let regs_from_host = regs_with(0x77);
    let (conn, t) = one_vcpu(move |req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => vec![init()],
        Some(vcpu_request::Message::SetState(_)) => {
            vec![vcpu_ok(
                vcpu_response::Message::SetState(Default::default()),
            )]
        }
        Some(vcpu_request::Message::GetState(_)) => {
            vec![get_state_reply(regs_from_host.as_image())]
        }
        Some(vcpu_request::Message::Resume(_)) => vec![init()],
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    v.wait().unwrap();
    v.set_regs(&regs_with(5));
    assert_eq!(v.get_regs().unwrap(), regs_from_host);
    // The flushed image is not sent again with the resume.
    v.resume().unwrap();
    v.wait().unwrap();
    drop(v);
    drop((vcpu, conn));
    let log = t.join().unwrap();
    assert_eq!(log.len(), 4);
    match &log[1].message {
        Some(vcpu_request::Message::SetState(s)) => {
            assert_eq!(s.set.value(), 0);
            assert_eq!(s.state, regs_with(5).as_image());
        }
        other => panic!("{other:?}"),
    }
    match &log[2].message {
        Some(vcpu_request::Message::GetState(g)) => assert_eq!(g.set.value(), 0),
        other => panic!("{other:?}"),
    }
    assert!(resume_of(&log[3]).regs.is_empty());
}

#[test]
fn failed_flush_is_reported_and_consumed() {
    let (conn, t) = one_vcpu(|req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => vec![init()],
        Some(vcpu_request::Message::SetState(_)) => vec![vcpu_errno(libc::EINVAL)],
        Some(vcpu_request::Message::GetState(_)) => {
            vec![get_state_reply(kvm_sregs::default().as_image())]
        }
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    v.wait().unwrap();
    v.set_sregs(&kvm_sregs::default());
    assert_eq!(v.get_sregs().unwrap_err().errno(), libc::EINVAL);
    // Consumed: the next get is a plain round trip.
    v.get_sregs().unwrap();
    v.resume().unwrap();
    drop(v);
    drop((vcpu, conn));
    let log = t.join().unwrap();
    assert_eq!(log.len(), 4);
    assert!(resume_of(&log[3]).sregs.is_empty());
}

#[test]
fn eager_images_answer_getters_locally() {
    let eager_regs = regs_with(0x42);
    let eager_sregs = kvm_sregs {
        cr3: 0x9000,
        ..Default::default()
    };
    let (conn, t) = one_vcpu(move |req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => {
            let mut e = io_event(plugin_proto::AddressSpace::IOPORT, 0xb2, true, &[1]);
            e.regs = eager_regs.as_image().to_vec();
            e.sregs = eager_sregs.as_image().to_vec();
            vec![io(e)]
        }
        Some(vcpu_request::Message::GetState(g)) => match g.set.value() {
            3 => vec![get_state_reply(kvm_debugregs::default().as_image())],
            _ => vec![get_state_reply(regs_with(0x99).as_image())],
        },
        Some(vcpu_request::Message::SetState(_)) => {
            vec![vcpu_ok(
                vcpu_response::Message::SetState(Default::default()),
            )]
        }
        // Next event: an io event without images, then Init-like user event.
        Some(vcpu_request::Message::Resume(_)) => vec![io(io_event(
            plugin_proto::AddressSpace::IOPORT,
            0xb2,
            true,
            &[2],
        ))],
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    v.wait().unwrap();
    assert_eq!(v.get_regs().unwrap(), eager_regs);
    assert_eq!(v.get_regs().unwrap(), eager_regs);
    assert_eq!(v.get_sregs().unwrap(), eager_sregs);
    // Not sent eagerly: round trip.
    v.get_debugregs().unwrap();
    // A set invalidates the eager image: flush + round trip.
    v.set_regs(&regs_with(3));
    assert_eq!(v.get_regs().unwrap(), regs_with(0x99));
    v.resume().unwrap();
    // The next io event carries no image: getters go to the host.
    v.wait().unwrap();
    assert_eq!(v.get_regs().unwrap(), regs_with(0x99));
    drop(v);
    drop((vcpu, conn));
    let log = t.join().unwrap();
    let kinds: Vec<&str> = log
        .iter()
        .map(|r| match &r.message {
            Some(vcpu_request::Message::Wait(_)) => "wait",
            Some(vcpu_request::Message::GetState(_)) => "get",
            Some(vcpu_request::Message::SetState(_)) => "set",
            Some(vcpu_request::Message::Resume(_)) => "resume",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["wait", "get", "set", "get", "resume", "get"]);
}

#[test]
fn wrong_image_size_is_eproto() {
    let (conn, t) = one_vcpu(|req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => {
            let mut e = io_event(plugin_proto::AddressSpace::IOPORT, 0xb2, true, &[1]);
            e.regs = vec![0; 10];
            vec![io(e)]
        }
        Some(vcpu_request::Message::GetState(_)) => vec![get_state_reply(&[0; 3])],
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    v.wait().unwrap();
    assert_eq!(v.get_regs().unwrap_err().errno(), libc::EPROTO);
    assert_eq!(v.get_fpu().unwrap_err().errno(), libc::EPROTO);
    drop(v);
    drop((vcpu, conn));
    t.join().unwrap();
}

// ---------------------------------------------------------------------------
// Other vcpu requests.

#[test]
fn vcpu_state_round_trips() {
    let (conn, t) = one_vcpu(|req| {
        use vcpu_request::Message as Rq;
        use vcpu_response::Message as Rs;
        match &req.message {
            Some(Rq::Wait(_)) => vec![init()],
            Some(Rq::GetState(g)) => {
                let len = match g.set.value() {
                    2 => 416,
                    4 => 1024,
                    5 => 4,
                    6 => 392,
                    7 => 64,
                    _ => 0,
                };
                let mut image = vec![0u8; len];
                image[0] = g.set.value() as u8;
                vec![get_state_reply(&image)]
            }
            Some(Rq::SetState(_)) => vec![vcpu_ok(Rs::SetState(Default::default()))],
            Some(Rq::GetMsrs(g)) => vec![vcpu_ok(Rs::GetMsrs(vcpu_response::GetMsrs {
                entry_data: g
                    .entry_indices
                    .iter()
                    .map(|&i| u64::from(i) * 2)
                    .take(2)
                    .collect(),
                ..Default::default()
            }))],
            Some(Rq::SetMsrs(_)) => vec![vcpu_ok(Rs::SetMsrs(Default::default()))],
            Some(Rq::SetCpuid(_)) => vec![vcpu_ok(Rs::SetCpuid(Default::default()))],
            Some(Rq::GetHypervCpuid(_)) => {
                vec![vcpu_ok(Rs::GetHypervCpuid(vcpu_response::CpuidResponse {
                    entries: vec![CpuidEntry {
                        function: 0x4000_0000,
                        eax: 0x4000_000a,
                        ..Default::default()
                    }],
                    ..Default::default()
                }))]
            }
            Some(Rq::EnableCapability(c)) if c.capability == 123 => {
                vec![vcpu_ok(Rs::EnableCapability(Default::default()))]
            }
            Some(Rq::EnableCapability(_)) => vec![vcpu_errno(libc::EINVAL)],
            _ => vec![],
        }
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    v.wait().unwrap();
    assert_eq!(v.get_fpu().unwrap().fpr[0][0], 2);
    assert_eq!(v.get_lapic_state().unwrap().regs[0], 4);
    assert_eq!(v.get_mp_state().unwrap().mp_state, 5);
    assert_eq!(v.get_xcrs().unwrap().nr_xcrs, 6);
    assert_eq!(v.get_vcpu_events().unwrap().exception.injected, 7);
    v.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        ..Default::default()
    })
    .unwrap();
    v.set_xcrs(&kvm_xcrs::default()).unwrap();
    v.set_lapic_state(&kvm_lapic_state::default()).unwrap();
    v.set_mp_state(&kvm_mp_state { mp_state: 3 }).unwrap();
    v.set_vcpu_events(&kvm_vcpu_events::default()).unwrap();
    assert_eq!(v.get_msrs(&[0x10, 0x20, 0x30]).unwrap(), vec![0x20, 0x40]);
    v.set_msrs(&[kvm_msr_entry {
        index: 0x174,
        data: 0x10,
        ..Default::default()
    }])
    .unwrap();
    v.set_cpuid(&[kvm_cpuid_entry2 {
        function: 1,
        index: 9,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        ecx: 0x8000_0000,
        ..Default::default()
    }])
    .unwrap();
    let hv = v.get_hyperv_cpuid().unwrap();
    assert_eq!(
        (hv[0].function, hv[0].eax, hv[0].flags),
        (0x4000_0000, 0x4000_000a, 0)
    );
    v.enable_capability(123, 0, [0; 4]).unwrap();
    assert_eq!(
        v.enable_capability(5, 0, [0; 4]).unwrap_err().errno(),
        libc::EINVAL
    );
    // Client-side validation: nothing sent.
    assert_eq!(
        v.enable_capability(123, 1, [0; 4]).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        v.enable_capability(123, 0, [0, 0, 1, 0])
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
    drop(v);
    drop((vcpu, conn));
    let log = t.join().unwrap();
    use vcpu_request::Message as Rq;
    let msgs: Vec<_> = log
        .into_iter()
        .map(|r| r.message.expect("member"))
        .collect();
    assert_eq!(msgs.len(), 17);
    match &msgs[6] {
        Rq::SetState(s) => {
            assert_eq!(s.set.value(), 2);
            assert_eq!(s.state.len(), 416);
            assert_eq!(&s.state[128..130], &0x37fu16.to_le_bytes());
        }
        other => panic!("{other:?}"),
    }
    let sets: Vec<(i32, usize)> = msgs[6..11]
        .iter()
        .map(|m| match m {
            Rq::SetState(s) => (s.set.value(), s.state.len()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sets, vec![(2, 416), (6, 392), (4, 1024), (5, 4), (7, 64)]);
    match &msgs[11] {
        Rq::GetMsrs(g) => assert_eq!(g.entry_indices, vec![0x10, 0x20, 0x30]),
        other => panic!("{other:?}"),
    }
    match &msgs[12] {
        Rq::SetMsrs(s) => assert_eq!((s.entries[0].index, s.entries[0].data), (0x174, 0x10)),
        other => panic!("{other:?}"),
    }
    match &msgs[13] {
        Rq::SetCpuid(s) => {
            let e = &s.entries[0];
            assert!(e.has_index);
            assert_eq!((e.function, e.index, e.ecx), (1, 9, 0x8000_0000));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&msgs[14], Rq::GetHypervCpuid(_)));
    let caps: Vec<u32> = msgs[15..]
        .iter()
        .map(|m| match m {
            Rq::EnableCapability(c) => c.capability,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(caps, vec![123, 5]);
}

/// Two vcpus driven from two threads at the same time.
#[test]
fn vcpus_run_concurrently() {
    let (conn, mut host) = connect(2, Delivery::Single, default_handler());
    let mut hosts = Vec::new();
    for hv in host.vcpus.drain(..) {
        let mut count = 0u64;
        hosts.push(serve_vcpu(hv, move |req| match &req.message {
            Some(vcpu_request::Message::Wait(_)) => vec![init()],
            Some(vcpu_request::Message::Resume(_)) if count < 100 => {
                count += 1;
                vec![io(io_event(
                    plugin_proto::AddressSpace::IOPORT,
                    count,
                    false,
                    &[0; 1],
                ))]
            }
            _ => vec![],
        }));
    }
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let vcpu = conn.vcpu(i).unwrap();
            std::thread::spawn(move || {
                let mut v = vcpu.lock();
                assert_eq!(v.wait().unwrap(), VcpuEvent::Init);
                v.resume().unwrap();
                for n in 1..=100u64 {
                    match v.wait().unwrap() {
                        VcpuEvent::Io { address, .. } => assert_eq!(address, n),
                        other => panic!("{other:?}"),
                    }
                    v.resume_io_read(&[i as u8]).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    drop(conn);
    for h in hosts {
        assert_eq!(h.join().unwrap().len(), 102);
    }
}

#[test]
fn vcpu_handles_share_one_channel() {
    let (conn, _host) = connect(1, Delivery::Single, default_handler());
    let a = conn.vcpu(0).unwrap();
    let b = conn.new_connection().unwrap().vcpu(0).unwrap();
    let guard = a.lock();
    assert!(b.try_lock().is_none());
    drop(guard);
    assert!(b.try_lock().is_some());
}

// ---------------------------------------------------------------------------
// Shutdown and owed resumes.

/// A fake host whose shutdown eventfd the test holds.
fn host_with_shutdown() -> (Connection, FakeHost, Arc<OwnedFd>) {
    let shutdown: Arc<OwnedFd> = Arc::new(eventfd());
    let s = shutdown.clone();
    let handler: MainHandler = Arc::new(move |req, _| {
        let fds = match &req.message {
            Some(main_request::Message::GetShutdownEventfd(_)) => {
                vec![s.try_clone().expect("dup")]
            }
            _ => vec![],
        };
        (ok_response(req), fds)
    });
    let (conn, host) = connect(1, Delivery::Single, handler);
    (conn, host, shutdown)
}

#[test]
fn wait_returns_shutdown_when_the_host_signals_it() {
    let (conn, mut host, shutdown) = host_with_shutdown();
    let t = serve_vcpu(host.vcpus.remove(0), |req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => vec![init()],
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    assert_eq!(v.wait().unwrap(), VcpuEvent::Init);
    v.resume().unwrap();
    // The vcpu thread blocks in wait (nothing more comes) until the host
    // signals shutdown from another thread.
    let signaller = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        nix::unistd::write(shutdown.as_fd(), &1u64.to_ne_bytes()).unwrap();
    });
    assert_eq!(v.wait().unwrap(), VcpuEvent::Shutdown);
    assert!(!VcpuEvent::Shutdown.needs_resume());
    // Sticky: every later wait says the same, without blocking.
    assert_eq!(v.wait().unwrap(), VcpuEvent::Shutdown);
    signaller.join().unwrap();
    drop(v);
    drop((vcpu, conn));
    t.join().unwrap();
}

#[test]
fn wait_while_a_resume_is_owed_names_the_pending_event() {
    let (conn, t) = one_vcpu(|req| match &req.message {
        Some(vcpu_request::Message::Wait(_)) => vec![init()],
        Some(vcpu_request::Message::Resume(_)) => {
            let mut e = io_event(plugin_proto::AddressSpace::IOPORT, 0x3f8, true, &[7]);
            e.no_resume = false;
            vec![io(e)]
        }
        _ => vec![],
    });
    let vcpu = conn.vcpu(0).unwrap();
    let mut v = vcpu.lock();
    assert_eq!(v.wait().unwrap(), VcpuEvent::Init);
    let err = v.wait().unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY);
    assert!(
        err.to_string()
            .contains("resume is still owed for its Init event"),
        "{err}"
    );
    v.resume().unwrap();
    assert!(matches!(
        v.wait().unwrap(),
        VcpuEvent::Io { address: 0x3f8, .. }
    ));
    let err = v.wait().unwrap_err();
    assert!(
        err.to_string()
            .contains("Io (1 byte write to port 0x3f8) event"),
        "{err}"
    );
    drop(v);
    drop((vcpu, conn));
    drop(t);
}

// ---------------------------------------------------------------------------
// Restore (docs/protocol-extensions.md §6).

fn restore_host(restoring: bool, state: &'static [u8], errno: i32) -> (Connection, FakeHost) {
    let handler: MainHandler = Arc::new(move |req, _| match &req.message {
        Some(main_request::Message::GetRestoreState(_)) if errno != 0 => {
            (errno_response(errno), vec![])
        }
        Some(main_request::Message::GetRestoreState(_)) => {
            let mut r = MainResponse::new();
            let s = r.mut_get_restore_state();
            s.restoring = restoring;
            s.state = state.to_vec();
            (r, vec![])
        }
        _ => (ok_response(req), vec![]),
    });
    connect(1, Delivery::Single, handler)
}

#[test]
fn restore_state_is_none_on_a_fresh_boot_and_from_an_old_host() {
    assert_eq!(restore_host(false, b"", 0).0.restore_state().unwrap(), None);
    // A host without the extension: "unknown request".
    for errno in [libc::ENOTTY, libc::ENOTSUP, libc::ENOSYS] {
        assert_eq!(
            restore_host(false, b"", errno).0.restore_state().unwrap(),
            None
        );
    }
    // Any other refusal is an error naming the request.
    let err = restore_host(false, b"", libc::EBUSY)
        .0
        .restore_state()
        .unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY);
    assert!(err.to_string().starts_with("get_restore_state"), "{err}");
}

#[test]
fn restore_state_returns_the_blob_when_restoring() {
    let (conn, _host) = restore_host(true, b"\x00device\xff", 0);
    assert_eq!(
        conn.restore_state().unwrap().as_deref(),
        Some(&b"\x00device\xff"[..])
    );
    // A snapshot taken without device state.
    assert_eq!(
        restore_host(true, b"", 0).0.restore_state().unwrap(),
        Some(vec![])
    );
    // State without restoring is a confused host.
    let err = restore_host(false, b"x", 0).0.restore_state().unwrap_err();
    assert_eq!(err.errno(), libc::EPROTO, "{err}");
}

#[test]
fn restore_state_reply_without_its_member_is_eproto() {
    let handler: MainHandler = Arc::new(|req, _| {
        let mut wrong = MainResponse::new();
        wrong.mut_start();
        let _ = req;
        (wrong, vec![])
    });
    let (conn, _host) = connect(1, Delivery::Single, handler);
    assert_eq!(conn.restore_state().unwrap_err().errno(), libc::EPROTO);
    assert!(matches!(
        last_request(&_host).message,
        Some(main_request::Message::GetRestoreState(_))
    ));
}
