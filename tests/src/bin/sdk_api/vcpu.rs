//! `sdk_api vcpu`: vcpu state on a real guest (one vcpu). Mirrors
//! `tests/c/capi_vcpu.c`: get -> set -> get of every state set at Init,
//! values the guest observes after a set, then call hints and the register
//! cache (requests counted as write syscalls of the vcpu thread).

use crosvm_plugin::kvm_bindings::{
    kvm_cpuid_entry2, kvm_mp_state, kvm_msr_entry, KVM_MP_STATE_RUNNABLE,
    KVM_VCPUEVENT_VALID_NMI_PENDING,
};
use crosvm_plugin::{AddressSpace, CallHint, Connection, HintDetail, VcpuEvent, VcpuGuard};
use iced_x86::code_asm::*;
use plugin_examples::{assemble16, exit_on_host_shutdown, GuestRam};

use crate::guest::{expect_io, le, next, requests, resume, set_ivt};

const CODE: u64 = 0x1000;
const NMI_HANDLER: u64 = 0x1800;
const NMI_FLAG: u64 = 0x3000;
const FCW_STORE: u64 = 0x3004;
const REPORT: u64 = 0x600;
const HINT_PORT: u64 = 0x700;
const OTHER_PORT: u64 = 0x701;
const DONE_PORT: u64 = 0x6ff;
const LAPIC_BASE: u64 = 0xfee0_0000;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_SYSENTER_CS: u32 = 0x174;
const MSR_SYSENTER_ESP: u32 = 0x175;
const EFER_SCE: u64 = 1;
const IO: AddressSpace = AddressSpace::IoPort;

const RAX_VALUE: u32 = 0xa1b2_c3d4;
const RSI_VALUE: u32 = 0x5566_7788;
const DR0_VALUE: u32 = 0x1234_abcd;
const FCW_VALUE: u16 = 0x027f;
const TSC_AUX_VALUE: u64 = 0x5a5a;
const SYSENTER_ESP_VALUE: u32 = 0x8bad_f00d;
const CPUID_VALUE: u32 = 0x6463_6261; // "abcd"
const TPR_VALUE: u8 = 0x20;
const KVM_CAP_HYPERV_SYNIC: u32 = 123;
const KVM_CAP_HYPERV_SYNIC2: u32 = 148;

fn guest(has_rdtscp: bool) -> plugin_examples::Result<Vec<u8>> {
    assemble16(CODE, |a| {
        a.mov(dx, REPORT as u32)?;
        a.out(dx, eax)?; // 1: RAX
        a.mov(eax, esi)?;
        a.out(dx, eax)?; // 2: RSI
        a.mov(eax, dr0)?;
        a.out(dx, eax)?; // 3: DR0
        a.fnstcw(word_ptr(FCW_STORE))?;
        a.mov(ax, word_ptr(FCW_STORE))?;
        a.out(dx, ax)?; // 4: x87 control word
                        // rdmsr, rdtscp and cpuid overwrite EDX: reload the port each time.
        a.mov(ecx, MSR_SYSENTER_ESP)?;
        a.rdmsr()?;
        a.mov(dx, REPORT as u32)?;
        a.out(dx, eax)?; // 5: SYSENTER_ESP
        if has_rdtscp {
            a.rdtscp()?;
            a.mov(eax, ecx)?;
            a.mov(dx, REPORT as u32)?;
            a.out(dx, eax)?; // TSC_AUX by rdtscp
            a.mov(ecx, MSR_TSC_AUX)?;
            a.rdmsr()?;
            a.mov(dx, REPORT as u32)?;
            a.out(dx, eax)?; // TSC_AUX by rdmsr
        }
        a.mov(eax, 0x8000_0002u32)?;
        a.cpuid()?;
        a.mov(dx, REPORT as u32)?;
        a.out(dx, eax)?; // 6: CPUID 0x80000002 EAX
        a.mov(eax, dword_ptr(0x80).es())?;
        a.out(dx, eax)?; // 7: LAPIC TPR through MMIO
        a.mov(al, byte_ptr(NMI_FLAG))?;
        a.out(dx, al)?; // 8: the NMI handler ran

        a.mov(dx, HINT_PORT as u32)?;
        a.mov(eax, 0xaau32)?;
        a.out(dx, al)?; // H1: regs + sregs + debugregs
        a.mov(dx, REPORT as u32)?;
        a.out(dx, eax)?; // RAX as set during H1
        a.mov(dx, HINT_PORT as u32)?;
        a.mov(eax, 0xbbu32)?;
        a.mov(ebx, 0x77u32)?;
        a.out(dx, al)?; // H2: regs + sregs
        a.mov(eax, 0xccu32)?;
        a.out(dx, al)?; // H3: regs only
        a.mov(dx, OTHER_PORT as u32)?;
        a.out(dx, al)?; // H4: another port
        a.mov(dx, HINT_PORT as u32)?;
        a.in_(al, dx)?; // H5: a read, the hint is for writes
        a.mov(dx, REPORT as u32)?;
        a.out(dx, al)?; // the value the plugin gave the read
        a.mov(dx, HINT_PORT as u32)?;
        a.mov(eax, 0xaau32)?;
        a.out(dx, al)?; // H6: the hint was cleared
        a.mov(dx, DONE_PORT as u32)?;
        a.out(dx, al)?;
        a.hlt()?;
        Ok(())
    })
}

fn nmi_handler() -> plugin_examples::Result<Vec<u8>> {
    assemble16(NMI_HANDLER, |a| {
        a.mov(byte_ptr(NMI_FLAG), 1u32)?;
        a.iret()?;
        Ok(())
    })
}

fn init_state(v: &mut VcpuGuard<'_>, mut cpuid: Vec<kvm_cpuid_entry2>) {
    let (n, regs) = requests(|| v.get_regs());
    check_eq!(n, 1); // Init invalidated the cache
    let regs = require!(regs);

    for e in cpuid.iter_mut().filter(|e| e.function == 0x8000_0002) {
        e.eax = CPUID_VALUE;
    }
    ok!(v.set_cpuid(&cpuid));

    // Hyper-V is not available here: clean errors.
    check!(v.get_hyperv_cpuid().is_err());
    check!(v
        .enable_capability(KVM_CAP_HYPERV_SYNIC, 0, [0; 4])
        .is_err());
    check!(v
        .enable_capability(KVM_CAP_HYPERV_SYNIC2, 0, [0; 4])
        .is_err());
    check_errno!(
        v.enable_capability(KVM_CAP_HYPERV_SYNIC, 1, [0; 4]),
        libc::EINVAL
    );
    check_errno!(
        v.enable_capability(KVM_CAP_HYPERV_SYNIC, 0, [0, 0, 1, 0]),
        libc::EINVAL
    );
    check_errno!(v.enable_capability(0, 0, [0; 4]), libc::EINVAL);

    // REGS: the last of two sets wins; a get flushes it (SetState, then
    // GetState) and returns exactly the image set.
    let mut r1 = regs;
    r1.rax = 0xdead;
    v.set_regs(&r1);
    r1.rax = RAX_VALUE.into();
    r1.rsi = RSI_VALUE.into();
    r1.rip = CODE;
    r1.rsp = 0x8000;
    r1.rflags = 2;
    let (n, ()) = requests(|| v.set_regs(&r1));
    check_eq!(n, 0); // setters are deferred
    let (n, back) = requests(|| v.get_regs());
    check_eq!(n, 2);
    check_eq!(ok!(back), Some(r1));

    // SREGS: real mode at segment 0, ES at the local APIC, EFER.SCE clear.
    if let Some(mut sregs) = ok!(v.get_sregs()) {
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        sregs.es.base = LAPIC_BASE;
        sregs.es.selector = 0;
        sregs.efer &= !EFER_SCE;
        v.set_sregs(&sregs);
        check_eq!(ok!(v.get_sregs()), Some(sregs));
    }

    // FPU: the control word (observed by the guest) and XMM3.
    if let Some(mut fpu) = ok!(v.get_fpu()) {
        check_eq!(fpu.fcw, 0x37f);
        fpu.fcw = FCW_VALUE;
        for (i, b) in fpu.xmm[3].iter_mut().enumerate() {
            *b = 0x10 + i as u8;
        }
        ok!(v.set_fpu(&fpu));
        if let Some(back) = ok!(v.get_fpu()) {
            check_eq!((back.fcw, back.xmm), (fpu.fcw, fpu.xmm));
            check!(
                crosvm_plugin::StateImage::as_image(&back)
                    == crosvm_plugin::StateImage::as_image(&fpu)
            );
        }
    }

    // DEBUGREGS: deferred like regs.
    if let Some(mut dr) = ok!(v.get_debugregs()) {
        dr.db[0] = DR0_VALUE.into();
        dr.db[1] = 0x2000;
        dr.db[3] = 0x3000;
        v.set_debugregs(&dr);
        check_eq!(ok!(v.get_debugregs()), Some(dr));
    }

    // XCREGS: SSE state in XCR0 (allowed by the CPUID set above).
    if let Some(mut xcrs) = ok!(v.get_xcrs()) {
        check_eq!(
            (xcrs.nr_xcrs, xcrs.xcrs[0].xcr, xcrs.xcrs[0].value),
            (1, 0, 1)
        );
        xcrs.xcrs[0].value = 3;
        ok!(v.set_xcrs(&xcrs));
        check_eq!(ok!(v.get_xcrs()), Some(xcrs));
    }

    // LAPIC: task priority (KVM derives the processor priority from it).
    if let Some(mut lapic) = ok!(v.get_lapic_state()) {
        lapic.regs[0x80] = TPR_VALUE as _;
        ok!(v.set_lapic_state(&lapic));
        lapic.regs[0xa0] = TPR_VALUE as _;
        if let Some(back) = ok!(v.get_lapic_state()) {
            check!(back.regs == lapic.regs);
        }
    }

    // MP state of the bootstrap processor.
    let mp = ok!(v.get_mp_state()).map(|m| m.mp_state);
    check_eq!(mp, Some(KVM_MP_STATE_RUNNABLE));
    ok!(v.set_mp_state(&kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE
    }));
    check_eq!(
        ok!(v.get_mp_state()).map(|m| m.mp_state),
        Some(KVM_MP_STATE_RUNNABLE)
    );

    // EVENTS: a pending NMI, delivered when the guest starts.
    if let Some(mut events) = ok!(v.get_vcpu_events()) {
        check_eq!(events.nmi.pending, 0);
        events.nmi.pending = 1;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
        ok!(v.set_vcpu_events(&events));
        check_eq!(ok!(v.get_vcpu_events()), Some(events));
    }

    // MSRs; a read stops at the first MSR KVM does not know.
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    ok!(v.set_msrs(&[
        entry(MSR_TSC_AUX, TSC_AUX_VALUE),
        entry(MSR_SYSENTER_CS, 0x10),
        entry(MSR_SYSENTER_ESP, SYSENTER_ESP_VALUE.into()),
    ]));
    check_eq!(
        ok!(v.get_msrs(&[MSR_SYSENTER_CS, MSR_TSC_AUX])),
        Some(vec![0x10, TSC_AUX_VALUE])
    );
    check_eq!(
        ok!(v.get_msrs(&[MSR_TSC_AUX, 0xdead_beef, MSR_SYSENTER_CS])),
        Some(vec![TSC_AUX_VALUE])
    );

    // Left for the resume to carry (the get above flushed the first set).
    v.set_regs(&r1);
}

fn expect_report(v: &mut VcpuGuard<'_>, want: &[u8]) {
    let data = expect_io(v, IO, REPORT, true);
    check_eq!(data, want.to_vec());
    resume(v);
}

fn hint_section(v: &mut VcpuGuard<'_>, conn: &Connection) {
    // H1: rax matches detail 0: all three images came with the event.
    expect_io(v, IO, HINT_PORT, true);
    let (n, regs) = requests(|| v.get_regs());
    check_eq!(n, 0);
    let (n, sregs) = requests(|| v.get_sregs());
    check_eq!(n, 0);
    let (n, dr) = requests(|| v.get_debugregs());
    check_eq!(n, 0);
    let (mut regs, sregs, dr) = (require!(regs), require!(sregs), require!(dr));
    check_eq!(regs.rax, 0xaa);
    check_eq!(dr.db[0], u64::from(DR0_VALUE));
    check_eq!(sregs.efer & EFER_SCE, 0);
    // Proof that sregs come from the event's image: EFER changed behind the
    // cache (an MSR write) does not show.
    ok!(v.set_msrs(&[kvm_msr_entry {
        index: MSR_EFER,
        data: sregs.efer | EFER_SCE,
        ..Default::default()
    }]));
    let (n, cached) = requests(|| v.get_sregs());
    check_eq!(n, 0);
    check_eq!(ok!(cached).map(|s| s.efer & EFER_SCE), Some(0));
    // A set invalidates the image: the get flushes it and asks the VMM.
    regs.rax = 0x1aa;
    v.set_regs(&regs);
    let (n, back) = requests(|| v.get_regs());
    check_eq!(n, 2);
    check_eq!(ok!(back).map(|r| r.rax), Some(0x1aa));
    resume(v);
    expect_report(v, &0x1aau32.to_le_bytes());

    // H2: detail 1 matches (rax and rbx): regs and sregs, no debugregs.
    expect_io(v, IO, HINT_PORT, true);
    let (n, regs) = requests(|| v.get_regs());
    check_eq!(n, 0);
    check_eq!(ok!(regs).map(|r| (r.rax, r.rbx)), Some((0xbb, 0x77)));
    let (n, sregs) = requests(|| v.get_sregs());
    check_eq!(n, 0);
    check_eq!(ok!(sregs).map(|s| s.efer & EFER_SCE), Some(EFER_SCE));
    let (n, dr) = requests(|| v.get_debugregs());
    check_eq!(n, 1);
    check_eq!(ok!(dr).map(|d| d.db[0]), Some(u64::from(DR0_VALUE)));
    resume(v);

    // H3: no detail matches: regs only.
    expect_io(v, IO, HINT_PORT, true);
    let (n, regs) = requests(|| v.get_regs());
    check_eq!(n, 0);
    check_eq!(ok!(regs).map(|r| r.rax), Some(0xcc));
    check_eq!(requests(|| v.get_sregs()).0, 1);
    check_eq!(requests(|| v.get_debugregs()).0, 1);
    resume(v);

    // H4: not the hinted port.
    expect_io(v, IO, OTHER_PORT, true);
    check_eq!(requests(|| v.get_regs()).0, 1);
    resume(v);

    // H5: the hinted port, but a read. Clear the hint while here.
    let data = expect_io(v, IO, HINT_PORT, false);
    check_eq!(data, vec![0]);
    check_eq!(requests(|| v.get_regs()).0, 1);
    ok!(conn.clear_call_hint());
    ok!(v.resume_io_read(&[0x5e]));
    expect_report(v, &[0x5e]);

    // H6: the hint is gone.
    expect_io(v, IO, HINT_PORT, true);
    let (n, regs) = requests(|| v.get_regs());
    check_eq!(n, 1);
    check_eq!(ok!(regs).map(|r| r.rax), Some(0xaa));
    resume(v);
}

pub fn run() -> ! {
    let conn = require!(Connection::from_env());
    require!(exit_on_host_shutdown(&conn));
    let cpuid = require!(conn.get_supported_cpuid());
    // RDTSCP (CPUID 0x80000001 EDX bit 27) in KVM's supported CPUID; without
    // it the guest cannot read TSC_AUX (rdtscp #UDs, rdmsr #GPs).
    let has_rdtscp = cpuid
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 27) != 0);
    if !has_rdtscp {
        println!("sdk_api vcpu: no RDTSCP here: TSC_AUX is checked through get_msrs only");
    }
    let ram = require!(GuestRam::new(0x10000));
    require!(ram.write(CODE, &require!(guest(has_rdtscp))));
    require!(ram.write(NMI_HANDLER, &require!(nmi_handler())));
    set_ivt(&ram, 2, NMI_HANDLER as u16);
    let _ram = require!(ram.map(&conn));
    ok!(conn.reserve_range(IO, REPORT, 1));
    ok!(conn.reserve_range(IO, HINT_PORT, 2));
    ok!(conn.reserve_range(IO, DONE_PORT, 1));
    ok!(conn.set_call_hint(&CallHint {
        space: IO,
        address: HINT_PORT,
        on_write: true,
        details: vec![
            HintDetail {
                match_rax: true,
                rax: 0xaa,
                send_sregs: true,
                send_debugregs: true,
                ..Default::default()
            },
            HintDetail {
                match_rax: true,
                rax: 0xbb,
                match_rbx: true,
                rbx: 0x77,
                send_sregs: true,
                ..Default::default()
            },
        ],
    }));

    let vcpu = require!(conn.vcpu(0));
    let conn2 = conn.clone();
    let t = std::thread::spawn(move || {
        let mut v = vcpu.lock();
        check!(matches!(next(&mut v), VcpuEvent::Init));
        init_state(&mut v, cpuid);
        resume(&mut v);
        expect_report(&mut v, &RAX_VALUE.to_le_bytes());
        expect_report(&mut v, &RSI_VALUE.to_le_bytes());
        expect_report(&mut v, &DR0_VALUE.to_le_bytes());
        expect_report(&mut v, &FCW_VALUE.to_le_bytes());
        expect_report(&mut v, &SYSENTER_ESP_VALUE.to_le_bytes());
        if has_rdtscp {
            expect_report(&mut v, &(TSC_AUX_VALUE as u32).to_le_bytes());
            expect_report(&mut v, &(TSC_AUX_VALUE as u32).to_le_bytes());
        }
        expect_report(&mut v, &CPUID_VALUE.to_le_bytes());
        expect_report(&mut v, &u32::from(TPR_VALUE).to_le_bytes());
        expect_report(&mut v, &[1]);
        hint_section(&mut v, &conn2);
        let done = expect_io(&mut v, IO, DONE_PORT, true);
        check_eq!(le(&done), 0xaa);
        // The vcpu stays parked in this event while the plugin exits.
    });
    ok!(conn.start());
    check!(t.join().is_ok());
    crate::finish("sdk_api vcpu")
}
