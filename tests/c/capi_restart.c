/*
 * C API test plugin: taking over io events and irq events after a restart
 * (crosvm_ext.h, docs/protocol-extensions.md section 9), and the write
 * tracker's writes into guest memory. Run under vmm --on-plugin-crash
 * restart:1 (one vcpu):
 *
 *  1. Generation 0 (a fresh boot): crosvm_attached_take_io_event and
 *     _irq_event with nothing kept, NULL handles and NULL out-pointers are
 *     -EINVAL (as NULLs are for the other hot-restart functions). It creates guest memory (object 0), an any-value io event on
 *     port IOE_PORT (object 1) and an irq event on GSI 5 (object 2),
 *     declares itself restartable with a checkpoint, and aborts at the
 *     guest's first exit (CRASH_PORT) after committing its failure count.
 *  2. Generation 1 (kind CRASH): unknown ids, an id of another kind and an
 *     id taken already are -EINVAL and keep the object; it takes the three
 *     objects. The re-delivered CRASH_PORT exit comes first; then the
 *     guest's write to IOE_PORT (no exit) must have counted on the taken
 *     eventfd, and a write of the taken irq trigger must raise IRQ 5 on the
 *     PIC. A value written through crosvm_write_tracker_write must be what
 *     the guest reads. Both taken events are destroyed as usual.
 */
#include "capi_test.h"
#include "crosvm_ext.h"

#define CODE 0x1000
#define CELL 0x3000   /* the tracker writes here, the guest reads it */
#define IOE_PORT 0x700 /* io event: counts writes, no exit */
#define CRASH_PORT 0x701
#define CHECK_PORT 0x702
#define VALUE_PORT 0x703
#define DONE_PORT 0x704
#define IRQ 5
#define WRITTEN 0xa5

static void bad_arguments_on(struct crosvm_attached *a, uint32_t id) {
  struct crosvm_io *io = NULL;
  struct crosvm_irq *irq = NULL;
  CHECK_EQ(crosvm_attached_take_io_event(a, id, &io), -EINVAL);
  CHECK_EQ(crosvm_attached_take_irq_event(a, id, &irq), -EINVAL);
  CHECK(io == NULL && irq == NULL);
  CHECK_EQ(crosvm_attached_take_io_event(NULL, id, &io), -EINVAL);
  CHECK_EQ(crosvm_attached_take_irq_event(NULL, id, &irq), -EINVAL);
  CHECK_EQ(crosvm_attached_take_io_event(a, id, NULL), -EINVAL);
  CHECK_EQ(crosvm_attached_take_irq_event(a, id, NULL), -EINVAL);
}

static void write_program(uint8_t *mem) {
  struct asm16 a = {.buf = mem, .pc = CODE};
  out8(&a, CRASH_PORT, 1);
  out8(&a, IOE_PORT, 0x55);
  out8(&a, CHECK_PORT, 2);
  load_al(&a, SEG_NONE, CELL);
  mov_dx(&a, VALUE_PORT);
  out_dx_al(&a);
  out8(&a, DONE_PORT, 4);
  uint16_t top = a.pc;
  hlt(&a);
  jump_back(&a, JMP, top);
}

static int fresh(struct crosvm *crosvm, struct crosvm_attached *attached) {
  bad_arguments_on(attached, 0);
  bad_arguments_on(attached, 1);
  CHECK_EQ(crosvm_attached_destroy(&attached), 0);

  struct guest_ram ram = guest_ram_new(0x10000);
  write_program(ram.mem);
  struct crosvm_memory *mem;
  REQUIRE(crosvm_create_memory(crosvm, ram.fd, 0, ram.size, 0, false, false, &mem) == 0);
  struct crosvm_io *io;
  REQUIRE(crosvm_create_io_event(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, IOE_PORT, 0, NULL, &io) ==
          0);
  struct crosvm_irq *irq;
  REQUIRE(crosvm_create_irq_event(crosvm, IRQ, &irq) == 0);
  REQUIRE(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, CRASH_PORT, 4) == 0);
  struct crosvm_checkpoint *ckpt;
  REQUIRE(crosvm_checkpoint_new(64, &ckpt) == 0);
  CHECK_EQ(crosvm_declare_restartable(NULL, ckpt), -EINVAL);
  REQUIRE(crosvm_declare_restartable(crosvm, ckpt) == 0);
  /* The rest of the hot-restart functions refuse NULL too. */
  CHECK_EQ(crosvm_attach(crosvm, NULL), -EINVAL);
  CHECK_EQ(crosvm_attached_kind(NULL), -EINVAL);
  int fd;
  CHECK_EQ(crosvm_attached_take_memory(NULL, 0, &mem, &fd), -EINVAL);
  struct crosvm_checkpoint *none;
  CHECK_EQ(crosvm_attached_take_checkpoint(NULL, &none), -EINVAL);
  CHECK_EQ(crosvm_attached_destroy(NULL), -EINVAL);
  CHECK_EQ(crosvm_checkpoint_new(64, NULL), -EINVAL);
  CHECK_EQ(crosvm_checkpoint_commit(NULL, 1, "x", 1), -EINVAL);
  CHECK_EQ(crosvm_checkpoint_commit(ckpt, 1, NULL, 1), -EINVAL);
  uint64_t serial = 0;
  size_t len = 0;
  CHECK_EQ(crosvm_checkpoint_load(NULL, &serial, NULL, 0, &len), -EINVAL);
  CHECK_EQ(crosvm_checkpoint_load(ckpt, &serial, NULL, 0, &len), 0); /* nothing yet */
  CHECK_EQ(crosvm_checkpoint_destroy(NULL), -EINVAL);
  CHECK_EQ(crosvm_vcpu_serial(NULL, &serial), -EINVAL);

  struct crosvm_vcpu *vcpu;
  REQUIRE(crosvm_get_vcpu(crosvm, 0, &vcpu) == 0);
  REQUIRE(crosvm_start(crosvm) == 0);
  struct crosvm_vcpu_event evt;
  wait_event(vcpu, &evt);
  REQUIRE(evt.kind == CROSVM_VCPU_EVENT_KIND_INIT);
  enter_real_mode(vcpu, CODE, 0xfff0, 0, 0, 0);
  REQUIRE(crosvm_vcpu_resume(vcpu) == 0);
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, CRASH_PORT, 1);
  /* The next generation counts this one's failures. */
  CHECK_EQ(crosvm_vcpu_serial(vcpu, NULL), -EINVAL);
  CHECK_EQ(crosvm_vcpu_serial(vcpu, &serial), 0);
  pthread_mutex_lock(&test_lock);
  int32_t failures = test_failures;
  pthread_mutex_unlock(&test_lock);
  REQUIRE(crosvm_checkpoint_commit(ckpt, serial, &failures, sizeof(failures)) == 0);
  fprintf(stderr, "capi_restart: generation 0 crashes at exit %" PRIu64 "\n", serial);
  abort();
}

static int pic_irr(struct crosvm *crosvm) {
  struct kvm_pic_state pic;
  REQUIRE(crosvm_get_pic_state(crosvm, true, &pic) == 0);
  return pic.irr;
}

static int crashed(struct crosvm *crosvm, struct crosvm_attached *attached) {
  struct crosvm_checkpoint *ckpt;
  REQUIRE(crosvm_attached_take_checkpoint(attached, &ckpt) == 1);
  int32_t failures = -1;
  uint64_t serial = 0;
  size_t len = 0;
  REQUIRE(crosvm_checkpoint_load(ckpt, &serial, &failures, sizeof(failures), &len) == 1);
  CHECK_EQ(len, sizeof(failures));
  CHECK_EQ(serial, 1);
  if (failures) {
    fprintf(stderr, "capi_restart: generation 0 had %d failed check(s)\n", failures);
    test_failures += failures;
  }

  /* Unknown ids, ids of another kind: -EINVAL, and the objects stay kept. */
  bad_arguments_on(attached, 99);
  struct crosvm_io *io = NULL;
  struct crosvm_irq *irq = NULL;
  CHECK_EQ(crosvm_attached_take_io_event(attached, 0, &io), -EINVAL);  /* memory */
  CHECK_EQ(crosvm_attached_take_irq_event(attached, 1, &irq), -EINVAL); /* io event */
  CHECK_EQ(crosvm_attached_take_io_event(attached, 2, &io), -EINVAL);  /* irq event */
  CHECK_EQ(crosvm_attached_take_io_event(NULL, 1, &io), -EINVAL);
  CHECK_EQ(crosvm_attached_take_io_event(attached, 1, NULL), -EINVAL);
  CHECK_EQ(crosvm_attached_take_irq_event(attached, 2, NULL), -EINVAL);

  struct crosvm_memory *mem;
  int mem_fd = -1;
  REQUIRE(crosvm_attached_take_memory(attached, 0, &mem, &mem_fd) == 0);
  REQUIRE(crosvm_attached_take_io_event(attached, 1, &io) == 0);
  REQUIRE(crosvm_attached_take_irq_event(attached, 2, &irq) == 0);
  CHECK_EQ(crosvm_attached_take_io_event(attached, 1, &io), -EINVAL); /* taken */
  CHECK_EQ(crosvm_attached_take_irq_event(attached, 2, &irq), -EINVAL);
  CHECK_EQ(crosvm_attached_destroy(&attached), 0);
  int io_fd = crosvm_io_event_fd(io), trigger = crosvm_irq_event_get_fd(irq),
      resample = crosvm_irq_event_get_resample_fd(irq);
  CHECK(io_fd >= 0 && trigger >= 0 && resample >= 0);
  CHECK(fcntl(io_fd, F_GETFD) >= 0 && fcntl(trigger, F_GETFD) >= 0 &&
        fcntl(resample, F_GETFD) >= 0);
  CHECK(trigger != resample);
  uint8_t *ram = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
  REQUIRE(ram != MAP_FAILED);

  struct crosvm_vcpu *vcpu;
  REQUIRE(crosvm_get_vcpu(crosvm, 0, &vcpu) == 0);
  REQUIRE(crosvm_start(crosvm) == 0);
  struct crosvm_vcpu_event evt;
  /* The exit generation 0 died in comes again. */
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, CRASH_PORT, 1);
  REQUIRE(crosvm_vcpu_resume(vcpu) == 0);
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, CHECK_PORT, 1);
  CHECK_EQ(eventfd_take(io_fd), 1);

  /* The taken trigger raises IRQ 5 (the guest runs with interrupts off:
   * it stays requested in the PIC). */
  CHECK_EQ(pic_irr(crosvm) & (1 << IRQ), 0);
  uint64_t one = 1;
  CHECK_EQ(write(trigger, &one, sizeof(one)), sizeof(one));
  int raised = 0;
  for (int i = 0; i < 10000 && !raised; i++) {
    raised = (pic_irr(crosvm) & (1 << IRQ)) != 0;
    if (!raised)
      usleep(100);
  }
  CHECK(raised);

  /* The tracker writes guest memory; the guest reads it. */
  struct crosvm_write_tracker *tracker;
  REQUIRE(crosvm_write_tracker_new(&tracker) == 0);
  uint8_t value = WRITTEN;
  CHECK_EQ(crosvm_write_tracker_write(tracker, ram + CELL, CELL, &value, 1), 0);
  CHECK_EQ(crosvm_write_tracker_write(NULL, ram + CELL, CELL, &value, 1), -EINVAL);
  CHECK_EQ(crosvm_write_tracker_write(tracker, NULL, CELL, &value, 1), -EINVAL);
  CHECK_EQ(crosvm_write_tracker_mark(NULL, CELL, 1), -EINVAL);
  CHECK_EQ(crosvm_control_reply_tracked_pages(NULL, 1, tracker), -EINVAL);
  REQUIRE(crosvm_vcpu_resume(vcpu) == 0);
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, VALUE_PORT, 1);
  CHECK_EQ(io_value(&evt), WRITTEN);
  CHECK_EQ(crosvm_write_tracker_destroy(&tracker), 0);
  CHECK(tracker == NULL);

  /* Taken objects are destroyed as any. */
  CHECK_EQ(crosvm_destroy_io_event(crosvm, &io), 0);
  CHECK_EQ(crosvm_destroy_irq_event(crosvm, &irq), 0);
  CHECK(io == NULL && irq == NULL);
  REQUIRE(crosvm_vcpu_resume(vcpu) == 0);
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, DONE_PORT, 1);
  return test_finish("capi_restart");
}

int main(void) {
  struct crosvm *crosvm;
  REQUIRE(crosvm_connect(&crosvm) == 0);
  struct crosvm_attached *attached;
  REQUIRE(crosvm_attach(crosvm, &attached) == 0);
  int kind = crosvm_attached_kind(attached);
  fprintf(stderr, "capi_restart: kind %d\n", kind);
  if (kind == CROSVM_RESTART_FRESH)
    return fresh(crosvm, attached);
  REQUIRE(kind == CROSVM_RESTART_CRASH);
  /* exit, not return: the VM ends with the plugin. */
  exit(crashed(crosvm, attached));
}
