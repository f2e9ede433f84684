/* A C plugin run by tests/c_program.rs against the fake VMM: exercises the
 * event structs as laid out by the C compiler. Exit status = failed step. */
#include <errno.h>
#include <stdio.h>

#include "crosvm.h"

#define STEP(n, cond)                              \
  do {                                             \
    if (!(cond)) {                                 \
      fprintf(stderr, "step %d failed: %s\n", n, #cond); \
      return n;                                    \
    }                                              \
  } while (0)

int main(void) {
  struct crosvm *crosvm = NULL;
  struct crosvm_vcpu *vcpu = NULL, *none = NULL;
  struct crosvm_vcpu_event ev;
  struct kvm_regs regs = {0};
  int fd;

  STEP(10, crosvm_connect(&crosvm) == 0);
  STEP(11, crosvm_get_vcpu(crosvm, 0, &vcpu) == 0 && vcpu != NULL);
  STEP(12, crosvm_get_vcpu(crosvm, 1, &none) == -ENOENT && none == NULL);
  STEP(13, crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, 0x3f8, 8) == 0);
  fd = crosvm_get_shutdown_eventfd(crosvm);
  STEP(14, fd >= 0);
  STEP(15, crosvm_start(crosvm) == 0);

  STEP(20, crosvm_vcpu_wait(vcpu, &ev) == 0);
  STEP(21, ev.kind == CROSVM_VCPU_EVENT_KIND_INIT);
  regs.rip = 0x1000;
  regs.rflags = 2;
  STEP(22, crosvm_vcpu_set_regs(vcpu, &regs) == 0);
  STEP(23, crosvm_vcpu_resume(vcpu) == 0);

  STEP(30, crosvm_vcpu_wait(vcpu, &ev) == 0);
  STEP(31, ev.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS);
  STEP(32, ev.io_access.address_space == CROSVM_ADDRESS_SPACE_IOPORT);
  STEP(33, ev.io_access.address == 0x3f9 && ev.io_access.length == 2);
  STEP(34, !ev.io_access.is_write && !ev.io_access.no_resume);
  STEP(35, ev.io_access.data[0] == 0 && ev.io_access.data[1] == 0);
  ev.io_access.data[0] = 0x12;
  ev.io_access.data[1] = 0x34;
  STEP(36, crosvm_vcpu_resume(vcpu) == 0);

  STEP(40, crosvm_vcpu_wait(vcpu, &ev) == 0);
  STEP(41, ev.kind == CROSVM_VCPU_EVENT_KIND_HYPERV_HCALL);
  STEP(42, ev.hyperv_call.input == 9 && *ev.hyperv_call.result == 0);
  *ev.hyperv_call.result = ev.hyperv_call.params[0] + ev.hyperv_call.params[1];
  STEP(43, crosvm_vcpu_resume(vcpu) == 0);

  STEP(50, crosvm_vcpu_wait(vcpu, &ev) == 0);
  STEP(51, ev.kind == CROSVM_VCPU_EVENT_KIND_PAUSED);
  STEP(52, ev.user == (void *)0x77);
  STEP(53, crosvm_vcpu_resume(vcpu) == 0);

  STEP(60, crosvm_vcpu_wait(vcpu, &ev) == 0);
  STEP(61, ev.kind == CROSVM_VCPU_EVENT_KIND_HYPERV_SYNIC);
  STEP(62, ev.hyperv_synic.msr == 0x40000083 && ev.hyperv_synic._reserved == 0);
  STEP(63, ev.hyperv_synic.control == 1 && ev.hyperv_synic.evt_page == 2 &&
               ev.hyperv_synic.msg_page == 3);

  STEP(70, crosvm_destroy_connection(&crosvm) == 0 && crosvm == NULL);
  printf("flow ok\n");
  return 0;
}
