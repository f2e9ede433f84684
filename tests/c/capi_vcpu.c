/*
 * C API test plugin: vcpu state on a real guest (one vcpu).
 *
 * At Init every vcpu state set goes through get -> set -> get (REGS, SREGS,
 * FPU, DEBUGREGS, XCREGS, LAPIC, MP, EVENTS, MSRs), the CPUID table is
 * replaced, Hyper-V queries and capabilities fail cleanly. The guest then
 * reports what it observes of that state through port REPORT:
 *   RAX and RSI (set_regs), DR0 (set_debugregs), the x87 control word
 *   (set_fpu),
 *   SYSENTER_ESP via rdmsr and, where the CPU offers RDTSCP, TSC_AUX via
 *   rdtscp and rdmsr (set_msrs), CPUID leaf 0x80000002 (set_cpuid), the
 *   LAPIC TPR through MMIO (set_lapic_state; ES base from set_sregs), and
 *   whether the NMI injected with set_vcpu_events ran its handler.
 * Then the call hint and the register cache (docs/c-api.md §9.3): writes to the
 * hinted port carry registers as the hint's details say, and getters for
 * images that came with the event send nothing to the VMM. Requests are
 * counted as write system calls of the vcpu thread.
 */
#include "capi_test.h"

#define CODE 0x1000
#define NMI_HANDLER 0x1800
#define NMI_FLAG 0x3000
#define FCW_STORE 0x3004
#define REPORT 0x600
#define HINT_PORT 0x700
#define OTHER_PORT 0x701
#define DONE_PORT 0x6ff
#define LAPIC_BASE 0xfee00000u
#define MSR_TSC_AUX 0xc0000103u
#define MSR_EFER 0xc0000080u
#define MSR_SYSENTER_CS 0x174u
#define MSR_SYSENTER_ESP 0x175u
#define EFER_SCE 1u

#define RAX_VALUE 0xa1b2c3d4u
#define RSI_VALUE 0x55667788u
#define DR0_VALUE 0x1234abcdu
#define TSC_AUX_VALUE 0x5a5au
#define SYSENTER_ESP_VALUE 0x8badf00du
#define CPUID_VALUE 0x64636261u /* "abcd" */
#define TPR_VALUE 0x20u
#define FCW_VALUE 0x027fu /* default 0x037f with 53-bit precision */

static struct crosvm *crosvm;
static struct kvm_cpuid_entry2 cpuid_table[256];
static uint32_t cpuid_count;
/* RDTSCP in KVM's supported CPUID (CPUID 0x80000001 EDX bit 27). Without
 * it the guest cannot read TSC_AUX (rdtscp #UDs, rdmsr #GPs). */
static bool has_rdtscp;

static void write_guest(struct guest_ram *ram) {
  struct asm16 a = {.buf = ram->mem, .pc = CODE};
  mov_dx(&a, REPORT);
  out_dx_eax(&a); /* 1: RAX */
  mov_eax_esi(&a);
  out_dx_eax(&a); /* 2: RSI */
  mov_eax_dr0(&a);
  out_dx_eax(&a); /* 3: DR0 */
  fnstcw(&a, FCW_STORE);
  load_ax(&a, SEG_NONE, FCW_STORE);
  out_dx_ax(&a); /* 4: x87 control word */
  /* rdmsr, rdtscp and cpuid overwrite EDX: reload the port each time. */
  mov_ecx(&a, MSR_SYSENTER_ESP);
  rdmsr(&a);
  mov_dx(&a, REPORT);
  out_dx_eax(&a); /* 5: SYSENTER_ESP by rdmsr */
  if (has_rdtscp) {
    rdtscp(&a);
    mov_eax_ecx(&a);
    mov_dx(&a, REPORT);
    out_dx_eax(&a); /* 6: TSC_AUX by rdtscp */
    mov_ecx(&a, MSR_TSC_AUX);
    rdmsr(&a);
    mov_dx(&a, REPORT);
    out_dx_eax(&a); /* 7: TSC_AUX by rdmsr */
  }
  mov_eax(&a, 0x80000002);
  cpuid(&a);
  mov_dx(&a, REPORT);
  out_dx_eax(&a); /* 7: CPUID 0x80000002 EAX */
  load_eax(&a, SEG_ES, 0x80);
  out_dx_eax(&a); /* 8: LAPIC TPR */
  load_al(&a, SEG_NONE, NMI_FLAG);
  out_dx_al(&a); /* 9: NMI handler ran */

  /* Hint section. */
  mov_dx(&a, HINT_PORT);
  mov_eax(&a, 0xaa);
  out_dx_al(&a); /* H1: regs + sregs + debugregs */
  mov_dx(&a, REPORT);
  out_dx_eax(&a); /* 10: RAX as set during H1 */
  mov_dx(&a, HINT_PORT);
  mov_eax(&a, 0xbb);
  mov_ebx(&a, 0x77);
  out_dx_al(&a); /* H2: regs + sregs */
  mov_eax(&a, 0xcc);
  out_dx_al(&a); /* H3: regs only */
  mov_dx(&a, OTHER_PORT);
  out_dx_al(&a); /* H4: another port: nothing */
  mov_dx(&a, HINT_PORT);
  in_al_dx(&a); /* H5: a read, the hint is for writes: nothing */
  mov_dx(&a, REPORT);
  out_dx_al(&a); /* 11: the value the plugin gave the read */
  mov_dx(&a, HINT_PORT);
  mov_eax(&a, 0xaa);
  out_dx_al(&a); /* H6: the hint was cleared: nothing */
  mov_dx(&a, DONE_PORT);
  out_dx_al(&a);
  hlt(&a);

  a.pc = NMI_HANDLER;
  store8(&a, SEG_NONE, NMI_FLAG, 1);
  iret(&a);
  set_ivt(ram->mem, 2, NMI_HANDLER);
}

/* ------------------------------------------------------------------------ */

static void init_state(struct crosvm_vcpu *vcpu) {
  long s0 = thread_syscw();
  struct kvm_regs regs;
  CHECK_EQ(crosvm_vcpu_get_regs(vcpu, &regs), 0);
  CHECK_EQ(thread_syscw() - s0, 1); /* Init invalidated the cache: a request */

  /* CPUID first: XCR0 and TSC_AUX validity depend on it. */
  for (uint32_t i = 0; i < cpuid_count; i++) {
    if (cpuid_table[i].function == 0x80000002) cpuid_table[i].eax = CPUID_VALUE;
  }
  CHECK_EQ(crosvm_vcpu_set_cpuid(vcpu, cpuid_count, cpuid_table), 0);

  /* Hyper-V is not available here: clean errors, no events. */
  static struct kvm_cpuid_entry2 hv[256];
  uint32_t hv_count = 77;
  int ret = crosvm_get_hyperv_cpuid(vcpu, 256, hv, &hv_count);
  CHECK(ret < 0);
  CHECK_EQ(hv_count, 0);
  uint64_t args[4] = {0, 0, 0, 0};
  CHECK(crosvm_vcpu_enable_capability(vcpu, KVM_CAP_HYPERV_SYNIC, 0, args) < 0);
  CHECK(crosvm_vcpu_enable_capability(vcpu, KVM_CAP_HYPERV_SYNIC2, 0, args) < 0);
  CHECK_EQ(crosvm_vcpu_enable_capability(vcpu, KVM_CAP_HYPERV_SYNIC, 1, args), -EINVAL);
  args[2] = 1;
  CHECK_EQ(crosvm_vcpu_enable_capability(vcpu, KVM_CAP_HYPERV_SYNIC, 0, args), -EINVAL);
  args[2] = 0;
  CHECK_EQ(crosvm_vcpu_enable_capability(vcpu, KVM_CAP_IRQCHIP, 0, args), -EINVAL);

  /* REGS: the last of two sets wins; a get flushes it first (SetState, then
   * GetState: two requests) and returns exactly the image set. */
  struct kvm_regs r1 = regs, back;
  r1.rax = 0xdead;
  CHECK_EQ(crosvm_vcpu_set_regs(vcpu, &r1), 0);
  r1.rax = RAX_VALUE;
  r1.rsi = RSI_VALUE;
  r1.rip = CODE;
  r1.rsp = 0x8000;
  r1.rflags = 2;
  s0 = thread_syscw();
  CHECK_EQ(crosvm_vcpu_set_regs(vcpu, &r1), 0);
  CHECK_EQ(thread_syscw() - s0, 0); /* setters are deferred */
  CHECK_EQ(crosvm_vcpu_get_regs(vcpu, &back), 0);
  CHECK_EQ(thread_syscw() - s0, 2);
  CHECK(memcmp(&r1, &back, sizeof(back)) == 0);

  /* SREGS: real mode at segment 0, ES at the local APIC, EFER.SCE clear
   * (see the hint section). */
  struct kvm_sregs sregs, sregs_back;
  CHECK_EQ(crosvm_vcpu_get_sregs(vcpu, &sregs), 0);
  struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.fs, &sregs.gs, &sregs.ss};
  for (unsigned i = 0; i < 5; i++) segs[i]->base = 0, segs[i]->selector = 0;
  sregs.es.base = LAPIC_BASE;
  sregs.es.selector = 0;
  sregs.efer &= ~(uint64_t)EFER_SCE;
  CHECK_EQ(crosvm_vcpu_set_sregs(vcpu, &sregs), 0);
  CHECK_EQ(crosvm_vcpu_get_sregs(vcpu, &sregs_back), 0);
  CHECK(memcmp(&sregs, &sregs_back, sizeof(sregs)) == 0);

  /* FPU: the control word (observed by the guest) and a pattern in XMM3. */
  struct kvm_fpu fpu, fpu_back;
  CHECK_EQ(crosvm_vcpu_get_fpu(vcpu, &fpu), 0);
  CHECK_EQ(fpu.fcw, 0x37f);
  fpu.fcw = FCW_VALUE;
  for (int i = 0; i < 16; i++) fpu.xmm[3][i] = 0x10 + i;
  CHECK_EQ(crosvm_vcpu_set_fpu(vcpu, &fpu), 0);
  CHECK_EQ(crosvm_vcpu_get_fpu(vcpu, &fpu_back), 0);
  CHECK(memcmp(&fpu, &fpu_back, sizeof(fpu)) == 0);

  /* DEBUGREGS: deferred like regs. */
  struct kvm_debugregs dr, dr_back;
  CHECK_EQ(crosvm_vcpu_get_debugregs(vcpu, &dr), 0);
  dr.db[0] = DR0_VALUE;
  dr.db[1] = 0x2000;
  dr.db[3] = 0x3000;
  CHECK_EQ(crosvm_vcpu_set_debugregs(vcpu, &dr), 0);
  CHECK_EQ(crosvm_vcpu_get_debugregs(vcpu, &dr_back), 0);
  CHECK(memcmp(&dr, &dr_back, sizeof(dr)) == 0);

  /* XCREGS: enable SSE state in XCR0 (allowed by the CPUID just set). */
  struct kvm_xcrs xcrs, xcrs_back;
  CHECK_EQ(crosvm_vcpu_get_xcrs(vcpu, &xcrs), 0);
  CHECK_EQ(xcrs.nr_xcrs, 1);
  CHECK_EQ(xcrs.xcrs[0].xcr, 0);
  CHECK_EQ(xcrs.xcrs[0].value, 1);
  xcrs.xcrs[0].value = 3;
  CHECK_EQ(crosvm_vcpu_set_xcrs(vcpu, &xcrs), 0);
  CHECK_EQ(crosvm_vcpu_get_xcrs(vcpu, &xcrs_back), 0);
  CHECK(memcmp(&xcrs, &xcrs_back, sizeof(xcrs)) == 0);

  /* LAPIC: task priority. */
  struct kvm_lapic_state lapic, lapic_back;
  CHECK_EQ(crosvm_vcpu_get_lapic_state(vcpu, &lapic), 0);
  lapic.regs[0x80] = TPR_VALUE;
  /* KVM derives the processor priority (PPR, 0xa0) from TPR: expect it. */
  lapic.regs[0xa0] = TPR_VALUE;
  CHECK_EQ(crosvm_vcpu_set_lapic_state(vcpu, &lapic), 0);
  CHECK_EQ(crosvm_vcpu_get_lapic_state(vcpu, &lapic_back), 0);
  CHECK(memcmp(&lapic, &lapic_back, sizeof(lapic)) == 0);

  /* MP state of the bootstrap processor. */
  struct kvm_mp_state mp = {.mp_state = 99}, mp_back = {.mp_state = 99};
  CHECK_EQ(crosvm_vcpu_get_mp_state(vcpu, &mp), 0);
  CHECK_EQ(mp.mp_state, KVM_MP_STATE_RUNNABLE);
  CHECK_EQ(crosvm_vcpu_set_mp_state(vcpu, &mp), 0);
  CHECK_EQ(crosvm_vcpu_get_mp_state(vcpu, &mp_back), 0);
  CHECK_EQ(mp_back.mp_state, KVM_MP_STATE_RUNNABLE);

  /* EVENTS: a pending NMI, delivered when the guest starts. */
  struct kvm_vcpu_events events, events_back;
  CHECK_EQ(crosvm_vcpu_get_vcpu_events(vcpu, &events), 0);
  CHECK_EQ(events.nmi.pending, 0);
  events.nmi.pending = 1;
  events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
  CHECK_EQ(crosvm_vcpu_set_vcpu_events(vcpu, &events), 0);
  CHECK_EQ(crosvm_vcpu_get_vcpu_events(vcpu, &events_back), 0);
  CHECK(memcmp(&events, &events_back, sizeof(events)) == 0);

  /* MSRs; a read stops at the first MSR KVM does not know. */
  struct kvm_msr_entry msrs[3] = {{.index = MSR_TSC_AUX, .data = TSC_AUX_VALUE},
                                  {.index = MSR_SYSENTER_CS, .data = 0x10},
                                  {.index = MSR_SYSENTER_ESP, .data = SYSENTER_ESP_VALUE}};
  CHECK_EQ(crosvm_vcpu_set_msrs(vcpu, 3, msrs), 0);
  struct kvm_msr_entry get[3] = {{.index = MSR_SYSENTER_CS}, {.index = MSR_TSC_AUX}};
  uint32_t count = 99;
  CHECK_EQ(crosvm_vcpu_get_msrs(vcpu, 2, get, &count), 0);
  CHECK_EQ(count, 2);
  CHECK_EQ(get[0].data, 0x10);
  CHECK_EQ(get[1].data, TSC_AUX_VALUE);
  CHECK_EQ(get[0].index, MSR_SYSENTER_CS);
  struct kvm_msr_entry partial[3] = {{.index = MSR_TSC_AUX}, {.index = 0xdeadbeef},
                                     {.index = MSR_SYSENTER_CS, .data = 0x4242}};
  count = 99;
  CHECK_EQ(crosvm_vcpu_get_msrs(vcpu, 3, partial, &count), 0);
  CHECK_EQ(count, 1);
  CHECK_EQ(partial[0].data, TSC_AUX_VALUE);
  CHECK_EQ(partial[2].data, 0x4242); /* not returned: untouched */

  /* The regs set above were flushed by the get; setting them again leaves
   * them for the resume to carry. */
  CHECK_EQ(crosvm_vcpu_set_regs(vcpu, &r1), 0);
}

/* ------------------------------------------------------------------------ */

static void expect_report(struct crosvm_vcpu *vcpu, uint32_t length, uint64_t value) {
  struct crosvm_vcpu_event evt;
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, REPORT, 1);
  CHECK_EQ(evt.io_access.length, length);
  CHECK_EQ(io_value(&evt), value);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
}

/* Requests sent by one getter call. */
#define REQUESTS(call)               \
  ({                                 \
    long before_ = thread_syscw();   \
    CHECK_EQ((call), 0);             \
    thread_syscw() - before_;        \
  })

static void hint_section(struct crosvm_vcpu *vcpu) {
  struct crosvm_vcpu_event evt;
  struct kvm_regs regs;
  struct kvm_sregs sregs;
  struct kvm_debugregs dr;

  /* H1: rax matches detail 0: all three images came with the event. */
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, HINT_PORT, 1);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_regs(vcpu, &regs)), 0);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_sregs(vcpu, &sregs)), 0);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_debugregs(vcpu, &dr)), 0);
  CHECK_EQ(regs.rax, 0xaa);
  CHECK_EQ(dr.db[0], DR0_VALUE);
  CHECK_EQ(sregs.efer & EFER_SCE, 0);
  /* Proof that sregs are served from the event's image: change EFER behind
   * the cache (an MSR write), the cached image still shows the old value. */
  struct kvm_msr_entry efer = {.index = MSR_EFER, .data = sregs.efer | EFER_SCE};
  CHECK_EQ(crosvm_vcpu_set_msrs(vcpu, 1, &efer), 0);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_sregs(vcpu, &sregs)), 0);
  CHECK_EQ(sregs.efer & EFER_SCE, 0);
  /* A set invalidates the image: the get flushes it and asks the VMM. */
  regs.rax = 0x1aa;
  CHECK_EQ(crosvm_vcpu_set_regs(vcpu, &regs), 0);
  struct kvm_regs back;
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_regs(vcpu, &back)), 2);
  CHECK_EQ(back.rax, 0x1aa);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_report(vcpu, 4, 0x1aa); /* 10 */

  /* H2: detail 1 matches (rax and rbx): regs and sregs, no debugregs. */
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, HINT_PORT, 1);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_regs(vcpu, &regs)), 0);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_sregs(vcpu, &sregs)), 0);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_debugregs(vcpu, &dr)), 1);
  CHECK_EQ(regs.rax, 0xbb);
  CHECK_EQ(regs.rbx, 0x77);
  CHECK_EQ(sregs.efer & EFER_SCE, EFER_SCE); /* captured after the MSR write */
  CHECK_EQ(dr.db[0], DR0_VALUE);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);

  /* H3: no detail matches: regs only. */
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, HINT_PORT, 1);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_regs(vcpu, &regs)), 0);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_sregs(vcpu, &sregs)), 1);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_debugregs(vcpu, &dr)), 1);
  CHECK_EQ(regs.rax, 0xcc);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);

  /* H4: not the hinted port. */
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, OTHER_PORT, 1);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_regs(vcpu, &regs)), 1);
  CHECK_EQ(regs.rax, 0xcc);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);

  /* H5: the hinted port, but a read. Clear the hint while here. */
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, HINT_PORT, 0);
  CHECK_EQ(evt.io_access.length, 1);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_regs(vcpu, &regs)), 1);
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 0, NULL), 0);
  evt.io_access.data[0] = 0x5e;
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_report(vcpu, 1, 0x5e); /* 11 */

  /* H6: the hint is gone. */
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, HINT_PORT, 1);
  CHECK_EQ(REQUESTS(crosvm_vcpu_get_regs(vcpu, &regs)), 1);
  CHECK_EQ(regs.rax, 0xaa);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
}

static void *vcpu_thread(void *arg) {
  struct crosvm_vcpu *vcpu = arg;
  struct crosvm_vcpu_event evt;
  wait_event(vcpu, &evt);
  REQUIRE(evt.kind == CROSVM_VCPU_EVENT_KIND_INIT);
  init_state(vcpu);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);

  expect_report(vcpu, 4, RAX_VALUE);
  expect_report(vcpu, 4, RSI_VALUE);
  expect_report(vcpu, 4, DR0_VALUE);
  expect_report(vcpu, 2, FCW_VALUE);
  expect_report(vcpu, 4, SYSENTER_ESP_VALUE);
  if (has_rdtscp) {
    expect_report(vcpu, 4, TSC_AUX_VALUE);
    expect_report(vcpu, 4, TSC_AUX_VALUE);
  }
  expect_report(vcpu, 4, CPUID_VALUE);
  expect_report(vcpu, 4, TPR_VALUE);
  expect_report(vcpu, 1, 1);
  hint_section(vcpu);
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, DONE_PORT, 1);
  /* Stop here: the vcpu stays parked in this event while the plugin exits. */
  return NULL;
}

int main(void) {
  REQUIRE(crosvm_connect(&crosvm) == 0);
  watch_shutdown(crosvm);
  REQUIRE(crosvm_get_supported_cpuid(crosvm, 256, cpuid_table, &cpuid_count) == 0);
  for (uint32_t i = 0; i < cpuid_count; i++) {
    if (cpuid_table[i].function == 0x80000001) has_rdtscp = (cpuid_table[i].edx >> 27) & 1;
  }
  if (!has_rdtscp) printf("capi_vcpu: no RDTSCP here: TSC_AUX is checked through get_msrs only\n");
  struct guest_ram ram = guest_ram_new(0x10000);
  write_guest(&ram);
  struct crosvm_memory *ram_obj = NULL;
  REQUIRE(crosvm_create_memory(crosvm, ram.fd, 0, ram.size, 0, false, false, &ram_obj) == 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, REPORT, 1), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, HINT_PORT, 2), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, DONE_PORT, 1), 0);

  struct crosvm_hint_detail details[2];
  memset(details, 0, sizeof(details));
  details[0].match_rax = true;
  details[0].rax = 0xaa;
  details[0].send_sregs = true;
  details[0].send_debugregs = true;
  details[1].match_rax = true;
  details[1].rax = 0xbb;
  details[1].match_rbx = true;
  details[1].rbx = 0x77;
  details[1].send_sregs = true;
  struct crosvm_hint hint = {.address_space = CROSVM_ADDRESS_SPACE_IOPORT,
                             .address_flags = CROSVM_HINT_ON_WRITE,
                             .details_count = 2,
                             .address = HINT_PORT,
                             .details = details};
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &hint), 0);

  struct crosvm_vcpu *vcpu = NULL;
  REQUIRE(crosvm_get_vcpu(crosvm, 0, &vcpu) == 0);
  pthread_t t;
  REQUIRE(pthread_create(&t, NULL, vcpu_thread, vcpu) == 0);
  CHECK_EQ(crosvm_start(crosvm), 0);
  pthread_join(t, NULL);
  return test_finish("capi_vcpu");
}
