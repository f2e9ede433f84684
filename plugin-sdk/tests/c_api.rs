//! The C API functions, called in-process against the fake host. One test
//! only: `crosvm_connect` adopts the process-wide `CROSVM_SOCKET`.

mod common;

use std::ffi::c_void;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::ptr::{null, null_mut};
use std::sync::{Arc, Mutex};

use common::*;
use crosvm_plugin::c_api::*;
use crosvm_plugin::kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, kvm_pic_state, kvm_regs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
};
use crosvm_plugin::StateImage;
use plugin_proto::main_request::{self, create::Constructor};
use plugin_proto::vcpu_request;
use plugin_proto::vcpu_response::{self, wait};
use plugin_proto::{CpuidEntry, MainRequest, VcpuResponse};

fn handler(fail_destroy: Arc<Mutex<bool>>) -> MainHandler {
    let base = default_handler();
    Arc::new(move |req, fds| {
        use main_request::Message as Rq;
        let (mut resp, out_fds) = base(req, fds);
        match &req.message {
            Some(Rq::Destroy(_)) if *fail_destroy.lock().unwrap() => {
                return (errno_response(libc::EBUSY), vec![]);
            }
            Some(Rq::CheckExtension(c)) => {
                resp.mut_check_extension().has_extension = c.extension == 7;
            }
            Some(Rq::GetSupportedCpuid(_)) => {
                resp.mut_get_supported_cpuid().entries = vec![
                    CpuidEntry {
                        function: 4,
                        has_index: true,
                        index: 2,
                        ebx: 0xb,
                        ..Default::default()
                    },
                    CpuidEntry {
                        function: 0,
                        eax: 0xd,
                        ..Default::default()
                    },
                ];
            }
            Some(Rq::GetMsrIndexList(_)) => {
                resp.mut_get_msr_index_list().indices = vec![1, 2, 3];
            }
            Some(Rq::GetNetConfig(_)) => {
                let n = resp.mut_get_net_config();
                n.host_mac_address = vec![0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a];
                n.host_ipv4_address = 0x055C_7364;
                n.netmask = 0xFCFF_FFFF;
                return (resp, vec![eventfd(), eventfd()]);
            }
            Some(Rq::GetState(_)) => {
                let mut image = vec![0u8; 16];
                image[2] = 0x33;
                resp.mut_get_state().state = image;
            }
            Some(Rq::DirtyLog(_)) => {
                resp.mut_dirty_log().bitmap = vec![0xf0, 0x01];
            }
            // The first ask is answered as by a host without the extension,
            // the second as a fresh boot, the later ones as a restore.
            Some(Rq::GetRestoreState(_)) => {
                static ASKED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                match ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                    0 => return (errno_response(libc::ENOTTY), vec![]),
                    1 => {
                        resp.mut_get_restore_state().restoring = false;
                    }
                    _ => {
                        let r = resp.mut_get_restore_state();
                        r.restoring = true;
                        r.state = b"dev-state".to_vec();
                    }
                }
            }
            _ => {}
        }
        (resp, out_fds)
    })
}

fn last(log: &Arc<Mutex<Vec<MainRequest>>>) -> main_request::Message {
    log.lock()
        .unwrap()
        .last()
        .and_then(|r| r.message.clone())
        .expect("a request")
}

#[test]
fn c_api_against_fake_host() {
    let fail_destroy = Arc::new(Mutex::new(false));
    let (plugin, mut host) = start_host(2, Delivery::Single, handler(fail_destroy.clone()));
    let log = host.log.clone();
    std::env::set_var("CROSVM_SOCKET", plugin.into_raw_fd().to_string());

    // Vcpu 0 answers: Wait → io read; Resume → hcall; Resume → pause;
    // Resume → synic; Resume → init; GetMsrs → too many / fewer values.
    let vcpu_host = serve_vcpu(
        host.vcpus.remove(0),
        scripted_exits(
            vec![
                wait::Exit::Io(wait::Io {
                    space: plugin_proto::AddressSpace::MMIO.into(),
                    address: 0xfee0_0030,
                    data: vec![0; 4],
                    ..Default::default()
                }),
                wait::Exit::HypervCall(wait::HypervCall {
                    input: 0x5,
                    params0: 6,
                    params1: 7,
                    ..Default::default()
                }),
                wait::Exit::User(wait::User {
                    user: 0x1234_5678,
                    ..Default::default()
                }),
                wait::Exit::HypervSynic(wait::HypervSynic {
                    msr: 0x4000_0080,
                    control: 1,
                    evt_page: 2,
                    msg_page: 3,
                    ..Default::default()
                }),
                wait::Exit::Init(Default::default()),
            ],
            |req| {
                use vcpu_request::Message as Rq;
                match &req.message {
                    Some(Rq::GetMsrs(g)) => {
                        let n = if g.entry_indices.len() == 1 { 2 } else { 1 };
                        vec![Reply::Msg(VcpuResponse {
                            message: Some(vcpu_response::Message::GetMsrs(
                                vcpu_response::GetMsrs {
                                    entry_data: (0..n).map(|i| 0x100 + i).collect(),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        })]
                    }
                    Some(Rq::GetState(_)) => {
                        let mut r = VcpuResponse::new();
                        r.mut_get_state().state = kvm_regs {
                            rip: 0xfff0,
                            ..Default::default()
                        }
                        .as_image()
                        .to_vec();
                        vec![Reply::Msg(r)]
                    }
                    _ => vec![],
                }
            },
        ),
    );

    // SAFETY: every call below passes valid pointers as the C API requires.
    unsafe {
        // -- Connections --------------------------------------------------
        let mut crosvm: *mut crosvm = null_mut();
        assert_eq!(crosvm_connect(&mut crosvm), 0);
        assert!(!crosvm.is_null());
        let mut second: *mut crosvm = null_mut();
        assert_eq!(crosvm_new_connection(crosvm, &mut second), 0);

        let mut v0: *mut crosvm_vcpu = null_mut();
        let mut v0_again: *mut crosvm_vcpu = null_mut();
        let mut v1: *mut crosvm_vcpu = null_mut();
        assert_eq!(crosvm_get_vcpu(crosvm, 0, &mut v0), 0);
        assert_eq!(crosvm_get_vcpu(second, 0, &mut v0_again), 0);
        assert_eq!(crosvm_get_vcpu(crosvm, 1, &mut v1), 0);
        assert_eq!(v0, v0_again);
        assert_ne!(v0, v1);
        let mut none: *mut crosvm_vcpu = null_mut();
        assert_eq!(crosvm_get_vcpu(crosvm, 2, &mut none), -libc::ENOENT);
        assert!(none.is_null());

        let fd = crosvm_get_shutdown_eventfd(crosvm);
        assert!(fd >= 0);
        libc::close(fd);

        // -- Queries --------------------------------------------------------
        let mut has = false;
        assert_eq!(crosvm_check_extension(crosvm, 7, &mut has), 0);
        assert!(has);
        assert_eq!(crosvm_check_extension(crosvm, 8, &mut has), 0);
        assert!(!has);
        let mut args = [0u64; 4];
        assert_eq!(
            crosvm_enable_capability(crosvm, 1, 0, args.as_mut_ptr()),
            -libc::EINVAL
        );

        let mut entries = [kvm_cpuid_entry2::default(); 4];
        let mut count = 99u32;
        assert_eq!(
            crosvm_get_supported_cpuid(crosvm, 1, entries.as_mut_ptr(), &mut count),
            -libc::E2BIG
        );
        assert_eq!(count, 2);
        assert_eq!(entries[0], kvm_cpuid_entry2::default());
        assert_eq!(
            crosvm_get_supported_cpuid(crosvm, 4, entries.as_mut_ptr(), &mut count),
            0
        );
        assert_eq!(count, 2);
        assert_eq!(
            (
                entries[0].function,
                entries[0].index,
                entries[0].flags,
                entries[0].ebx
            ),
            (4, 2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0xb)
        );
        assert_eq!((entries[1].flags, entries[1].eax), (0, 0xd));
        // An empty list: out_count is written (0).
        count = 99;
        assert_eq!(
            crosvm_get_emulated_cpuid(crosvm, 4, entries.as_mut_ptr(), &mut count),
            0
        );
        assert_eq!(count, 0);

        let mut msrs = [0u32; 3];
        assert_eq!(
            crosvm_get_msr_index_list(crosvm, 2, msrs.as_mut_ptr(), &mut count),
            -libc::E2BIG
        );
        assert_eq!(count, 3);
        assert_eq!(
            crosvm_get_msr_index_list(crosvm, 3, msrs.as_mut_ptr(), &mut count),
            0
        );
        assert_eq!(msrs, [1, 2, 3]);

        let mut net = crosvm_net_config {
            _padding: [9; 2],
            ..Default::default()
        };
        assert_eq!(crosvm_net_get_config(crosvm, &mut net), 0);
        assert!(net.tap_fd >= 0);
        assert_eq!(net.host_ip.to_ne_bytes(), [100, 115, 92, 5]);
        assert_eq!(net.netmask.to_ne_bytes(), [255, 255, 255, 252]);
        assert_eq!(net.host_mac_address, [0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a]);
        assert_eq!(net._padding, [0; 2]);
        libc::close(net.tap_fd);

        // -- Reservations and hints -----------------------------------------
        let before = log.lock().unwrap().len();
        assert_eq!(crosvm_reserve_range(crosvm, 2, 0x10, 1), -libc::EINVAL);
        assert_eq!(
            crosvm_reserve_async_write_range(crosvm, 7, 0x10, 1),
            -libc::EINVAL
        );
        assert_eq!(log.lock().unwrap().len(), before);
        assert_eq!(crosvm_reserve_range(crosvm, 0, 0x3f8, 8), 0);
        assert_eq!(crosvm_reserve_async_write_range(crosvm, 1, 0x1000, 0x10), 0);
        match last(&log) {
            main_request::Message::ReserveRange(r) => {
                assert_eq!(
                    (r.space.value(), r.start, r.length, r.async_write),
                    (1, 0x1000, 0x10, true)
                )
            }
            other => panic!("{other:?}"),
        }

        let mut details = [crosvm_hint_detail {
            match_rax: 1,
            rax: 0x55,
            send_debugregs: 1,
            ..Default::default()
        }];
        let good = crosvm_hint {
            hint_version: 0,
            _reserved: 0,
            address_space: 0,
            address_flags: CROSVM_HINT_ON_WRITE,
            details_count: 1,
            address: 0xb2,
            details: crosvm_hint_details {
                details: details.as_mut_ptr(),
            },
        };
        let before = log.lock().unwrap().len();
        assert_eq!(crosvm_set_hypercall_hint(crosvm, 2, &good), -libc::EINVAL);
        for bad in [
            crosvm_hint {
                hint_version: 1,
                ..good
            },
            crosvm_hint {
                _reserved: 1,
                ..good
            },
            crosvm_hint { address: 0, ..good },
            crosvm_hint {
                address_flags: 2,
                ..good
            },
            crosvm_hint {
                details_count: 33,
                ..good
            },
            crosvm_hint {
                address_space: 2,
                ..good
            },
        ] {
            assert_eq!(crosvm_set_hypercall_hint(crosvm, 1, &bad), -libc::EINVAL);
        }
        assert_eq!(log.lock().unwrap().len(), before);
        assert_eq!(crosvm_set_hypercall_hint(crosvm, 1, &good), 0);
        match last(&log) {
            main_request::Message::SetCallHint(h) => {
                assert_eq!((h.space.value(), h.address, h.on_write), (0, 0xb2, true));
                assert_eq!(h.hints.len(), 1);
                assert!(h.hints[0].match_rax && h.hints[0].send_debugregs);
                assert_eq!(h.hints[0].rax, 0x55);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(crosvm_set_hypercall_hint(crosvm, 0, null()), 0);
        match last(&log) {
            main_request::Message::SetCallHint(h) => {
                assert_eq!(
                    (h.space.value(), h.address, h.on_write, h.hints.len()),
                    (0, 0, false, 0)
                )
            }
            other => panic!("{other:?}"),
        }

        // -- Interrupts -----------------------------------------------------
        assert_eq!(crosvm_set_irq(crosvm, 3, true), 0);
        let routes = [
            crosvm_irq_route {
                irq_id: 1,
                kind: CROSVM_IRQ_ROUTE_IRQCHIP,
                route: crosvm_irq_route_union {
                    irqchip: crosvm_irq_route_irqchip { irqchip: 2, pin: 1 },
                },
            },
            crosvm_irq_route {
                irq_id: 30,
                kind: CROSVM_IRQ_ROUTE_MSI,
                route: crosvm_irq_route_union {
                    msi: crosvm_irq_route_msi {
                        address: 0xfee0_1000,
                        data: 0x31,
                        _reserved: [0; 4],
                    },
                },
            },
        ];
        assert_eq!(crosvm_set_irq_routing(crosvm, 2, routes.as_ptr()), 0);
        match last(&log) {
            main_request::Message::SetIrqRouting(r) => assert_eq!(r.routes.len(), 2),
            other => panic!("{other:?}"),
        }
        let bad_route = [crosvm_irq_route {
            kind: 2,
            ..routes[0]
        }];
        assert_eq!(
            crosvm_set_irq_routing(crosvm, 1, bad_route.as_ptr()),
            -libc::EINVAL
        );
        assert_eq!(crosvm_set_irq_routing(crosvm, 0, null()), 0);

        // -- VM state and run control ---------------------------------------
        let mut pic = kvm_pic_state::default();
        assert_eq!(crosvm_get_pic_state(crosvm, false, &mut pic), 0);
        assert_eq!(pic.imr, 0x33);
        assert_eq!(crosvm_set_pic_state(crosvm, true, &pic), 0);
        match last(&log) {
            main_request::Message::SetState(s) => {
                assert_eq!((s.set.value(), s.state[2]), (0, 0x33))
            }
            other => panic!("{other:?}"),
        }
        let mut clock = crosvm_plugin::kvm_bindings::kvm_clock_data::default();
        // The fake host answers with a 16-byte image: wrong size for a clock.
        assert_eq!(crosvm_get_clock(crosvm, &mut clock), -libc::EPROTO);
        assert_eq!(crosvm_set_identity_map_addr(crosvm, 0xfffb_c000), 0);
        let user = 0x1234_5678usize as *mut c_void;
        assert_eq!(crosvm_pause_vcpus(crosvm, 1, user), 0);
        match last(&log) {
            main_request::Message::PauseVcpus(p) => {
                assert_eq!((p.cpu_mask, p.user), (1, 0x1234_5678))
            }
            other => panic!("{other:?}"),
        }

        // -- Objects ----------------------------------------------------------
        let mut io: *mut crosvm_io = null_mut();
        assert_eq!(
            crosvm_create_io_event(crosvm, 0, 0x80, 3, null(), &mut io),
            -libc::EINVAL
        );
        assert_eq!(
            crosvm_create_io_event(crosvm, 5, 0x80, 0, null(), &mut io),
            -libc::EINVAL
        );
        assert!(io.is_null());
        // NULL datamatch with a width means "any value".
        assert_eq!(
            crosvm_create_io_event(crosvm, 0, 0x80, 4, null(), &mut io),
            0
        );
        match last(&log) {
            main_request::Message::Create(c) => match c.constructor {
                Some(Constructor::IoEvent(e)) => assert_eq!((e.length, e.datamatch), (0, 0)),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert!(crosvm_io_event_fd(io) >= 0);
        let mut io2: *mut crosvm_io = null_mut();
        let bytes = [0x34u8, 0x12, 0xff];
        assert_eq!(
            crosvm_create_io_event(crosvm, 1, 0x90, 2, bytes.as_ptr(), &mut io2),
            0
        );
        match last(&log) {
            main_request::Message::Create(c) => {
                assert_eq!(c.id, 1);
                match c.constructor {
                    Some(Constructor::IoEvent(e)) => {
                        assert_eq!(
                            (e.space.value(), e.address, e.length, e.datamatch),
                            (1, 0x90, 2, 0x1234)
                        )
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }

        let memfd =
            nix::sys::memfd::memfd_create(c"c", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let mut mem: *mut crosvm_memory = null_mut();
        let before = log.lock().unwrap().len();
        assert_eq!(
            crosvm_create_memory(
                crosvm,
                memfd.as_raw_fd(),
                0x800,
                0x1000,
                0,
                false,
                false,
                &mut mem
            ),
            -libc::EINVAL
        );
        assert_eq!(log.lock().unwrap().len(), before);
        assert_eq!(
            crosvm_create_memory(
                crosvm,
                memfd.as_raw_fd(),
                0,
                0x10000,
                0,
                false,
                true,
                &mut mem
            ),
            0
        );
        let mut bitmap = [0u8; 2];
        assert_eq!(
            crosvm_memory_get_dirty_log(second, mem, bitmap.as_mut_ptr()),
            0
        );
        assert_eq!(bitmap, [0xf0, 0x01]);

        let mut irq: *mut crosvm_irq = null_mut();
        assert_eq!(crosvm_create_irq_event(crosvm, 4, &mut irq), 0);
        let (a, b) = (
            crosvm_irq_event_get_fd(irq),
            crosvm_irq_event_get_resample_fd(irq),
        );
        assert!(a >= 0 && b >= 0 && a != b);

        // Destroy failure leaves the handle intact; success clears it.
        *fail_destroy.lock().unwrap() = true;
        let irq_before = irq;
        assert_eq!(crosvm_destroy_irq_event(second, &mut irq), -libc::EBUSY);
        assert_eq!(irq, irq_before);
        assert_eq!(crosvm_irq_event_get_fd(irq), a);
        *fail_destroy.lock().unwrap() = false;
        assert_eq!(crosvm_destroy_irq_event(second, &mut irq), 0);
        assert!(irq.is_null());
        assert_eq!(crosvm_destroy_memory(crosvm, &mut mem), 0);
        assert!(mem.is_null());
        assert_eq!(crosvm_destroy_io_event(crosvm, &mut io2), 0);
        assert_eq!(crosvm_destroy_io_event(crosvm, &mut io), 0);
        assert!(io.is_null() && io2.is_null());
        // Destroyed newest first, so every id was given back.
        let mut io3: *mut crosvm_io = null_mut();
        assert_eq!(
            crosvm_create_io_event(crosvm, 0, 0x70, 1, bytes.as_ptr(), &mut io3),
            0
        );
        match last(&log) {
            main_request::Message::Create(c) => assert_eq!(c.id, 0),
            other => panic!("{other:?}"),
        }

        // -- Vcpu events ------------------------------------------------------
        let mut event: crosvm_vcpu_event = std::mem::zeroed();
        event._padding = [0xee; 4];
        assert_eq!(crosvm_vcpu_wait(v0, &mut event), 0);
        assert_eq!(event.kind, CROSVM_VCPU_EVENT_KIND_IO_ACCESS);
        assert_eq!(event._padding, [0xee; 4]);
        let acc = event.event.io_access;
        assert_eq!(
            (acc.address_space, acc.address, acc.length),
            (1, 0xfee0_0030, 4)
        );
        assert_eq!((acc.is_write, acc.no_resume), (0, 0));
        let mut regs = kvm_regs::default();
        assert_eq!(crosvm_vcpu_get_regs(v0, &mut regs), 0);
        assert_eq!(regs.rip, 0xfff0);
        regs.rax = 0x77;
        assert_eq!(crosvm_vcpu_set_regs(v0, &regs), 0);
        std::ptr::copy_nonoverlapping([1u8, 2, 3, 4].as_ptr(), acc.data, 4);
        assert_eq!(crosvm_vcpu_resume(v0), 0);

        assert_eq!(crosvm_vcpu_wait(v0, &mut event), 0);
        assert_eq!(event.kind, CROSVM_VCPU_EVENT_KIND_HYPERV_HCALL);
        let call = event.event.hyperv_call;
        assert_eq!((call.input, call.params), (5, [6, 7]));
        assert_eq!(*call.result, 0);
        *call.result = 0xabcdef;
        assert_eq!(crosvm_vcpu_resume(v0), 0);

        assert_eq!(crosvm_vcpu_wait(v0, &mut event), 0);
        assert_eq!(event.kind, CROSVM_VCPU_EVENT_KIND_PAUSED);
        assert_eq!(event.event.user, user);
        // MSRs: the host returns 2 values for 1 index → E2BIG.
        let mut msr = [kvm_msr_entry {
            index: 0x10,
            data: 1,
            ..Default::default()
        }; 3];
        let mut n = 0u32;
        assert_eq!(
            crosvm_vcpu_get_msrs(v0, 1, msr.as_mut_ptr(), &mut n),
            -libc::E2BIG
        );
        assert_eq!((n, msr[0].data), (2, 1));
        // Fewer values than asked: only those are written.
        assert_eq!(crosvm_vcpu_get_msrs(v0, 3, msr.as_mut_ptr(), &mut n), 0);
        assert_eq!((n, msr[0].data, msr[1].data), (1, 0x100, 1));
        assert_eq!(msr[0].index, 0x10);
        // Capability flags are checked before args is read (NULL here).
        assert_eq!(
            crosvm_vcpu_enable_capability(v0, 123, 1, null_mut()),
            -libc::EINVAL
        );
        args[3] = 1;
        assert_eq!(
            crosvm_vcpu_enable_capability(v0, 123, 0, args.as_mut_ptr()),
            -libc::EINVAL
        );
        assert_eq!(crosvm_vcpu_resume(v0), 0);

        event.event._reserved = [0xaa; 64];
        assert_eq!(crosvm_vcpu_wait(v0, &mut event), 0);
        assert_eq!(event.kind, CROSVM_VCPU_EVENT_KIND_HYPERV_SYNIC);
        let synic = event.event.hyperv_synic;
        assert_eq!(
            (
                synic.msr,
                synic._reserved,
                synic.control,
                synic.evt_page,
                synic.msg_page
            ),
            (0x4000_0080, 0, 1, 2, 3)
        );
        assert_eq!(crosvm_vcpu_resume(v0), 0);

        event.event._reserved = [0xaa; 64];
        assert_eq!(crosvm_vcpu_wait(v0, &mut event), 0);
        assert_eq!(event.kind, CROSVM_VCPU_EVENT_KIND_INIT);
        // INIT leaves the union untouched.
        assert_eq!(event.event._reserved, [0xaa; 64]);

        // -- Restore state (§6) ---------------------------------------------
        let mut blob = [0u8; 16];
        let mut n = 99usize;
        // An old host, then a fresh boot: 0, nothing.
        for _ in 0..2 {
            n = 99;
            assert_eq!(
                crosvm_get_restore_state(crosvm, blob.as_mut_ptr().cast(), blob.len(), &mut n),
                0
            );
            assert_eq!(n, 0);
        }
        // Restoring: the size alone, too small a buffer, then the blob.
        assert_eq!(
            crosvm_get_restore_state(crosvm, null_mut(), 0, &mut n),
            -libc::E2BIG
        );
        assert_eq!(n, 9);
        assert_eq!(
            crosvm_get_restore_state(crosvm, blob.as_mut_ptr().cast(), 8, &mut n),
            -libc::E2BIG
        );
        assert_eq!(blob, [0; 16], "nothing copied");
        assert_eq!(
            crosvm_get_restore_state(crosvm, blob.as_mut_ptr().cast(), blob.len(), &mut n),
            1
        );
        assert_eq!(&blob[..n], b"dev-state");
        assert!(matches!(
            last(&log),
            main_request::Message::GetRestoreState(_)
        ));

        // -- Teardown -----------------------------------------------------------
        assert_eq!(crosvm_destroy_io_event(crosvm, &mut io3), 0);
        assert_eq!(crosvm_destroy_connection(&mut second), 0);
        assert!(second.is_null());
        assert_eq!(crosvm_destroy_connection(&mut crosvm), 0);
        assert!(crosvm.is_null());
    }

    let requests = vcpu_host.join().unwrap();
    let resumes: Vec<&vcpu_request::Resume> = requests
        .iter()
        .filter_map(|r| match &r.message {
            Some(vcpu_request::Message::Resume(r)) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(resumes.len(), 4);
    // The io read answer written through io_access.data, with the deferred
    // registers.
    assert_eq!(resumes[0].data, vec![1, 2, 3, 4]);
    let sent = kvm_regs::from_image(&resumes[0].regs).unwrap();
    assert_eq!((sent.rip, sent.rax), (0xfff0, 0x77));
    // The hypercall result written through hyperv_call.result.
    assert_eq!(resumes[1].data, 0xabcdefu64.to_le_bytes().to_vec());
    assert!(resumes[2].data.is_empty() && resumes[2].regs.is_empty());
}
