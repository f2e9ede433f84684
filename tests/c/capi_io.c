/*
 * C API test plugin: objects, reservations and interrupts on a real guest
 * (one vcpu).
 *
 *  1. io events: an any-length ioeventfd on a port, a 1-byte datamatch one
 *     on another port and a 4-byte datamatch one on MMIO. Their addresses
 *     are also reserved, so a write the kernel does not match reaches the
 *     plugin as an IO_ACCESS event: matching writes must count on the
 *     eventfd and produce no event. Destroying an io event makes its writes
 *     exit again.
 *  2. memory: a dirty-logged region (from a memfd offset) whose bitmap shows
 *     exactly the pages the guest wrote and is reset by each call; a
 *     read-only region the guest reads as memory and whose writes exit as
 *     MMIO.
 *  3. async write ranges (port and MMIO): several writes are queued while
 *     the guest keeps running, reported with no_resume; reads there are not
 *     reported and return 0. Unreserving stops the events.
 *  4. interrupts: an irq event on a level-triggered PIC line (ELCR set with
 *     crosvm_set_pic_state, LAPIC LINT0 in ExtINT mode): the guest takes the
 *     interrupt when the plugin writes the trigger eventfd, and the resample
 *     eventfd fires exactly when the guest EOIs. crosvm_set_irq raises
 *     another line. An irq event on an MSI route delivers a vector through
 *     the local APIC.
 */
#include "capi_test.h"

#define CODE 0x1000
#define H_IRQ5 0x1c00
#define H_IRQ6 0x1d00
#define H_MSI 0x1e00
#define IRQ5_COUNT 0x3010
#define IRQ6_COUNT 0x3011
#define MSI_COUNT 0x3012
#define ASYNC_DONE 0x3021

#define CHK 0x690  /* checkpoints: al = number */
#define VAL 0x691  /* value reports */
#define IOE_ANY 0x6a0
#define IOE_MATCH 0x6a2
#define IRQ_READY 0x6b0
#define IRQ5_ENTRY 0x6b5
#define IRQ6_ENTRY 0x6b6
#define IRQ5_EOID 0x6b7
#define MSI_ENTRY 0x6b8
#define ASYNC_PORT 0x6c0
#define SYNC_PORT 0x6d0
#define DONE_PORT 0x6ff

#define DIRTY_GPA 0x100000 /* ES base */
#define RO_GPA 0x200000    /* FS base */
#define MMIO_GPA 0xd0000000u /* GS base */
#define ASYNC_MMIO (MMIO_GPA + 0x1000)
#define MSI_GSI 24
#define MSI_VECTOR 0x41

static struct crosvm *crosvm;
static struct guest_ram ram;
static struct crosvm_io *ioe_any, *ioe_match, *ioe_mmio;
static struct crosvm_memory *dirty_mem, *ro_mem;
static struct crosvm_irq *irq5, *irq_msi;

static void write_guest(void) {
  struct asm16 a = {.buf = ram.mem, .pc = CODE};
  /* 1. io events */
  mov_dx(&a, IOE_ANY);
  out_dx_al(&a);
  out_dx_ax(&a);
  out_dx_eax(&a); /* three matches of any width */
  mov_dx(&a, IOE_MATCH);
  mov_al(&a, 0x42);
  out_dx_al(&a);
  out_dx_al(&a); /* two matches */
  mov_al(&a, 0x43);
  out_dx_al(&a);                               /* E1: no match -> exit */
  store32(&a, SEG_GS, 0, 0xdeadbeef);          /* match */
  store32(&a, SEG_GS, 0, 0x12345678);          /* E2: wrong value */
  store16(&a, SEG_GS, 0, 0xbeef);              /* E3: wrong width */
  out8(&a, CHK, 1);                            /* plugin destroys ioe_any */
  mov_dx(&a, IOE_ANY);
  out_dx_al(&a);                               /* E4: now exits */
  /* 2. memory */
  store8(&a, SEG_ES, 0x1000, 1);
  store8(&a, SEG_ES, 0x3000, 2);
  store8(&a, SEG_ES, 0xa000, 3);
  load_al(&a, SEG_FS, 0);                      /* read-only memory reads */
  store_al(&a, SEG_FS, 4);                     /* E5: write exits as MMIO */
  out8(&a, CHK, 2);                            /* dirty pages 1, 3, 10 */
  store8(&a, SEG_ES, 0x3008, 4);
  out8(&a, CHK, 3);                            /* dirty page 3 */
  /* 3. async writes */
  mov_dx(&a, ASYNC_PORT);
  for (uint8_t v = 1; v <= 5; v++) {
    mov_al(&a, v);
    out_dx_al(&a);
  }
  store8(&a, SEG_GS, 0x1000, 0x11);
  store8(&a, SEG_GS, 0x1001, 0x22);
  in_al_dx(&a);                                /* not reported: 0 */
  store8(&a, SEG_NONE, ASYNC_DONE, 1);
  mov_dx(&a, VAL);
  out_dx_al(&a);                               /* value read: 0 */
  mov_dx(&a, SYNC_PORT);
  in_al_dx(&a);                                /* reported, plugin answers 0x99 */
  mov_dx(&a, VAL);
  out_dx_al(&a);
  out8(&a, CHK, 4);                            /* plugin unreserves */
  mov_dx(&a, SYNC_PORT);
  out_dx_al(&a);
  in_al_dx(&a);                                /* unreserved: 0, no event */
  mov_dx(&a, ASYNC_PORT);
  out_dx_al(&a);
  store8(&a, SEG_GS, 0x1000, 0x33);
  mov_dx(&a, VAL);
  out_dx_al(&a);                               /* 0 */
  /* 4. interrupts: PICs at vectors 8 and 0x70, IRQ5 and IRQ6 unmasked */
  const uint8_t pic[][2] = {{0x20, 0x11}, {0x21, 0x08}, {0x21, 0x04}, {0x21, 0x01},
                            {0x21, 0x9f}, {0xa0, 0x11}, {0xa1, 0x70}, {0xa1, 0x02},
                            {0xa1, 0x01}, {0xa1, 0xff}};
  for (unsigned i = 0; i < sizeof(pic) / sizeof(pic[0]); i++) {
    mov_al(&a, pic[i][1]);
    out_imm_al(&a, pic[i][0]);
  }
  sti(&a);
  mov_dx(&a, IRQ_READY);
  out_dx_al(&a);                               /* plugin triggers IRQ5 */
  wait_flag_irq(&a, IRQ5_COUNT, 2);
  out8(&a, CHK, 5);                            /* plugin raises IRQ6 */
  wait_flag_irq(&a, IRQ6_COUNT, 1);
  out8(&a, CHK, 6);                            /* plugin triggers the MSI */
  wait_flag_irq(&a, MSI_COUNT, 1);
  mov_dx(&a, DONE_PORT);
  out_dx_al(&a);
  hlt(&a);

  /* IRQ5: report, EOI, report, count. */
  a.pc = H_IRQ5;
  push_ax(&a);
  push_dx(&a);
  mov_dx(&a, IRQ5_ENTRY);
  out_dx_al(&a);
  mov_al(&a, 0x20);
  out_imm_al(&a, 0x20);
  mov_dx(&a, IRQ5_EOID);
  out_dx_al(&a);
  inc8(&a, IRQ5_COUNT);
  pop_dx(&a);
  pop_ax(&a);
  iret(&a);
  /* IRQ6: report, EOI, count. */
  a.pc = H_IRQ6;
  push_ax(&a);
  push_dx(&a);
  mov_dx(&a, IRQ6_ENTRY);
  out_dx_al(&a);
  mov_al(&a, 0x20);
  out_imm_al(&a, 0x20);
  inc8(&a, IRQ6_COUNT);
  pop_dx(&a);
  pop_ax(&a);
  iret(&a);
  /* MSI: report, count (the last interrupt: no LAPIC EOI needed). */
  a.pc = H_MSI;
  push_ax(&a);
  push_dx(&a);
  mov_dx(&a, MSI_ENTRY);
  out_dx_al(&a);
  inc8(&a, MSI_COUNT);
  pop_dx(&a);
  pop_ax(&a);
  iret(&a);
  set_ivt(ram.mem, 8 + 5, H_IRQ5);
  set_ivt(ram.mem, 8 + 6, H_IRQ6);
  set_ivt(ram.mem, MSI_VECTOR, H_MSI);
}

/* ------------------------------------------------------------------------ */

static void expect_chk(struct crosvm_vcpu *vcpu, uint8_t n) {
  struct crosvm_vcpu_event evt;
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, CHK, 1);
  CHECK_EQ(io_value(&evt), n);
}

static void expect_val(struct crosvm_vcpu *vcpu, uint8_t v) {
  struct crosvm_vcpu_event evt;
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, VAL, 1);
  CHECK_EQ(io_value(&evt), v);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
}

static void expect_write(struct crosvm_vcpu *vcpu, uint32_t space, uint64_t addr, uint32_t len,
                         uint64_t value) {
  struct crosvm_vcpu_event evt;
  expect_io(vcpu, &evt, space, addr, 1);
  CHECK_EQ(evt.io_access.length, len);
  CHECK_EQ(io_value(&evt), value);
  CHECK_EQ(evt.io_access.no_resume, 0);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
}

static void check_dirty_log(uint8_t byte0, uint8_t byte1) {
  uint8_t log[3] = {0xee, 0xee, 0xee}; /* 16 pages: 2 bytes written */
  CHECK_EQ(crosvm_memory_get_dirty_log(crosvm, dirty_mem, log), 0);
  CHECK_EQ(log[0], byte0);
  CHECK_EQ(log[1], byte1);
  CHECK_EQ(log[2], 0xee);
}

static void io_and_memory(struct crosvm_vcpu *vcpu) {
  const uint32_t IO = CROSVM_ADDRESS_SPACE_IOPORT, MMIO = CROSVM_ADDRESS_SPACE_MMIO;
  struct crosvm_vcpu_event evt;

  expect_write(vcpu, IO, IOE_MATCH, 1, 0x43);                     /* E1 */
  expect_write(vcpu, MMIO, MMIO_GPA, 4, 0x12345678);              /* E2 */
  expect_write(vcpu, MMIO, MMIO_GPA, 2, 0xbeef);                  /* E3 */
  expect_chk(vcpu, 1);
  CHECK_EQ(eventfd_take(crosvm_io_event_fd(ioe_any)), 3);
  CHECK_EQ(eventfd_take(crosvm_io_event_fd(ioe_match)), 2);
  CHECK_EQ(eventfd_take(crosvm_io_event_fd(ioe_mmio)), 1);
  CHECK_EQ(crosvm_destroy_io_event(crosvm, &ioe_any), 0);
  CHECK(ioe_any == NULL);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_write(vcpu, IO, IOE_ANY, 1, 1);                          /* E4 (al = 1) */

  expect_write(vcpu, MMIO, RO_GPA + 4, 1, 0x5a);                  /* E5 */
  expect_chk(vcpu, 2);
  check_dirty_log(0x0a, 0x04); /* pages 1, 3 and 10 */
  check_dirty_log(0, 0);       /* reset by the previous call */
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_chk(vcpu, 3);
  check_dirty_log(0x08, 0);    /* page 3 again */
  CHECK_EQ(ram.mem[0x11000], 1);
  CHECK_EQ(ram.mem[0x13000], 2);
  CHECK_EQ(ram.mem[0x1a000], 3);
  CHECK_EQ(ram.mem[0x13008], 4);
  CHECK_EQ(ram.mem[0x20004], 0); /* the read-only page was not written */
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);

  /* Async writes: let the guest run until it has made them all, so the
   * events are queued in the pipe several at a time, then read them. */
  REQUIRE(wait_guest_byte(&ram, ASYNC_DONE, 1));
  for (uint8_t v = 1; v <= 5; v++) {
    wait_event(vcpu, &evt);
    CHECK_EQ(evt.kind, CROSVM_VCPU_EVENT_KIND_IO_ACCESS);
    CHECK_EQ(evt.io_access.address, ASYNC_PORT);
    CHECK_EQ(evt.io_access.no_resume, 1);
    CHECK_EQ(evt.io_access.is_write, 1);
    CHECK_EQ(io_value(&evt), v);
    /* No resume: the guest already went on. */
  }
  for (uint8_t i = 0; i < 2; i++) {
    wait_event(vcpu, &evt);
    CHECK_EQ(evt.io_access.address_space, MMIO);
    CHECK_EQ(evt.io_access.address, ASYNC_MMIO + i);
    CHECK_EQ(evt.io_access.no_resume, 1);
    CHECK_EQ(io_value(&evt), 0x11u * (i + 1));
  }
  expect_val(vcpu, 0); /* the read of the async port was not reported */
  expect_io(vcpu, &evt, IO, SYNC_PORT, 0);
  CHECK_EQ(evt.io_access.length, 1);
  CHECK_EQ(evt.io_access.data[0], 0);
  evt.io_access.data[0] = 0x99;
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_val(vcpu, 0x99);
  expect_chk(vcpu, 4);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, SYNC_PORT, 0), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, ASYNC_PORT, 0), 0);
  CHECK_EQ(crosvm_reserve_async_write_range(crosvm, MMIO, ASYNC_MMIO, 0), 0);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_val(vcpu, 0); /* and nothing in between */
}

static void interrupts(struct crosvm_vcpu *vcpu) {
  const uint32_t IO = CROSVM_ADDRESS_SPACE_IOPORT;
  struct crosvm_vcpu_event evt;
  int trigger = crosvm_irq_event_get_fd(irq5), resample = crosvm_irq_event_get_resample_fd(irq5);
  uint64_t one = 1;

  expect_io(vcpu, &evt, IO, IRQ_READY, 1);
  CHECK(write(trigger, &one, sizeof(one)) == sizeof(one));
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  for (int round = 0; round < 2; round++) {
    expect_io(vcpu, &evt, IO, IRQ5_ENTRY, 1);
    CHECK_EQ(eventfd_take(resample), 0); /* not acknowledged yet */
    CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
    expect_io(vcpu, &evt, IO, IRQ5_EOID, 1);
    CHECK_EQ(eventfd_take(resample), 1); /* the EOI resampled the line */
    if (round == 0) CHECK(write(trigger, &one, sizeof(one)) == sizeof(one));
    CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  }
  expect_chk(vcpu, 5);
  CHECK_EQ(guest_byte(&ram, IRQ5_COUNT), 2);
  CHECK_EQ(crosvm_set_irq(crosvm, 6, true), 0);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_io(vcpu, &evt, IO, IRQ6_ENTRY, 1);
  CHECK_EQ(crosvm_set_irq(crosvm, 6, false), 0);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_chk(vcpu, 6);
  CHECK(write(crosvm_irq_event_get_fd(irq_msi), &one, sizeof(one)) == sizeof(one));
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_io(vcpu, &evt, IO, MSI_ENTRY, 1);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_io(vcpu, &evt, IO, DONE_PORT, 1);
  CHECK_EQ(guest_byte(&ram, IRQ6_COUNT), 1);
  CHECK_EQ(guest_byte(&ram, MSI_COUNT), 1);
}

static void *vcpu_thread(void *arg) {
  struct crosvm_vcpu *vcpu = arg;
  struct crosvm_vcpu_event evt;
  wait_event(vcpu, &evt);
  REQUIRE(evt.kind == CROSVM_VCPU_EVENT_KIND_INIT);
  enter_real_mode(vcpu, CODE, 0x8000, DIRTY_GPA, RO_GPA, MMIO_GPA);
  /* PIC interrupts reach the CPU through LINT0 in ExtINT mode; MSIs need
   * the APIC software-enabled. */
  struct kvm_lapic_state lapic;
  CHECK_EQ(crosvm_vcpu_get_lapic_state(vcpu, &lapic), 0);
  uint32_t lvt0 = 0x700, spiv = 0x1ff;
  memcpy(&lapic.regs[0x350], &lvt0, 4);
  memcpy(&lapic.regs[0xf0], &spiv, 4);
  CHECK_EQ(crosvm_vcpu_set_lapic_state(vcpu, &lapic), 0);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);

  io_and_memory(vcpu);
  interrupts(vcpu);
  /* The vcpu stays parked in the done event while the plugin exits. */
  return NULL;
}

int main(void) {
  const uint32_t IO = CROSVM_ADDRESS_SPACE_IOPORT, MMIO = CROSVM_ADDRESS_SPACE_MMIO;
  REQUIRE(crosvm_connect(&crosvm) == 0);
  watch_shutdown(crosvm);

  /* memfd layout: RAM | dirty-logged region | read-only page */
  ram = guest_ram_new(0x21000);
  write_guest();
  ram.mem[0x20000] = 0x5a;
  struct crosvm_memory *ram_obj = NULL;
  REQUIRE(crosvm_create_memory(crosvm, ram.fd, 0, 0x10000, 0, false, false, &ram_obj) == 0);
  REQUIRE(crosvm_create_memory(crosvm, ram.fd, 0x10000, 0x10000, DIRTY_GPA, false, true,
                               &dirty_mem) == 0);
  REQUIRE(crosvm_create_memory(crosvm, ram.fd, 0x20000, 0x1000, RO_GPA, true, false, &ro_mem) ==
          0);

  uint8_t match8 = 0x42;
  uint8_t match32[4] = {0xef, 0xbe, 0xad, 0xde};
  REQUIRE(crosvm_create_io_event(crosvm, IO, IOE_ANY, 0, NULL, &ioe_any) == 0);
  REQUIRE(crosvm_create_io_event(crosvm, IO, IOE_MATCH, 1, &match8, &ioe_match) == 0);
  REQUIRE(crosvm_create_io_event(crosvm, MMIO, MMIO_GPA, 4, match32, &ioe_mmio) == 0);

  CHECK_EQ(crosvm_reserve_range(crosvm, IO, CHK, 2), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, IOE_ANY, 4), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, IRQ_READY, 0x10), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, SYNC_PORT, 1), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, DONE_PORT, 1), 0);
  CHECK_EQ(crosvm_reserve_async_write_range(crosvm, IO, ASYNC_PORT, 1), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, MMIO, MMIO_GPA, 0x10), 0);
  CHECK_EQ(crosvm_reserve_async_write_range(crosvm, MMIO, ASYNC_MMIO, 8), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, MMIO, RO_GPA, 0x1000), 0);

  /* PC routing for GSIs 0-15, plus an MSI route. */
  struct crosvm_irq_route routes[33];
  unsigned n = 0;
  for (uint32_t irq = 0; irq < 16; irq++) {
    memset(&routes[n], 0, 2 * sizeof(routes[0]));
    routes[n].irq_id = irq;
    routes[n].kind = CROSVM_IRQ_ROUTE_IRQCHIP;
    routes[n].irqchip.irqchip = irq < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE;
    routes[n].irqchip.pin = irq & 7;
    n++;
    routes[n].irq_id = irq;
    routes[n].kind = CROSVM_IRQ_ROUTE_IRQCHIP;
    routes[n].irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
    routes[n].irqchip.pin = irq == 0 ? 2 : irq;
    n++;
  }
  memset(&routes[n], 0, sizeof(routes[n]));
  routes[n].irq_id = MSI_GSI;
  routes[n].kind = CROSVM_IRQ_ROUTE_MSI;
  routes[n].msi.address = 0xfee00000;
  routes[n].msi.data = MSI_VECTOR;
  n++;
  CHECK_EQ(crosvm_set_irq_routing(crosvm, n, routes), 0);
  REQUIRE(crosvm_create_irq_event(crosvm, 5, &irq5) == 0);
  REQUIRE(crosvm_create_irq_event(crosvm, MSI_GSI, &irq_msi) == 0);
  /* IRQ5 level-triggered: ELCR bit 5 of the primary PIC. */
  struct kvm_pic_state pic;
  CHECK_EQ(crosvm_get_pic_state(crosvm, true, &pic), 0);
  pic.elcr |= 1 << 5;
  CHECK_EQ(crosvm_set_pic_state(crosvm, true, &pic), 0);

  struct crosvm_vcpu *vcpu = NULL;
  REQUIRE(crosvm_get_vcpu(crosvm, 0, &vcpu) == 0);
  pthread_t t;
  REQUIRE(pthread_create(&t, NULL, vcpu_thread, vcpu) == 0);
  CHECK_EQ(crosvm_start(crosvm), 0);
  pthread_join(t, NULL);

  /* The vcpu is stopped in its last event: tear the objects down. */
  CHECK_EQ(crosvm_destroy_io_event(crosvm, &ioe_match), 0);
  CHECK_EQ(crosvm_destroy_io_event(crosvm, &ioe_mmio), 0);
  CHECK_EQ(crosvm_destroy_irq_event(crosvm, &irq5), 0);
  CHECK_EQ(crosvm_destroy_irq_event(crosvm, &irq_msi), 0);
  CHECK_EQ(crosvm_destroy_memory(crosvm, &dirty_mem), 0);
  CHECK_EQ(crosvm_destroy_memory(crosvm, &ro_mem), 0);
  CHECK(!ioe_match && !ioe_mmio && !irq5 && !irq_msi && !dirty_mem && !ro_mem);
  return test_finish("capi_io");
}
