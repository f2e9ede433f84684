/* C counterpart of sdk_wait: a second wait while a resume is owed gets
 * -EBUSY; then the guest halts with interrupts off, the plugin prints
 * "running" and blocks in crosvm_vcpu_wait (no watcher thread) until the
 * test stops vmm with SIGTERM: the wait must return -ESHUTDOWN. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <fcntl.h>

#include "crosvm.h"

#define CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "sdk_wait_c: FAILED: " __VA_ARGS__); fputc('\n', stderr); exit(1); } } while (0)

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    /* cli; 1: hlt; jmp 1b */
    static const uint8_t code[] = {0xfa, 0xf4, 0xeb, 0xfd};
    struct crosvm *crosvm;
    int ret = crosvm_connect(&crosvm);
    CHECK(ret == 0, "connect: %d", ret);
    int memfd = memfd_create("guest", MFD_ALLOW_SEALING);
    CHECK(memfd >= 0 && ftruncate(memfd, 0x10000) == 0, "memfd");
    CHECK(fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK) == 0, "seal");
    CHECK(pwrite(memfd, code, sizeof code, 0x1000) == (ssize_t)sizeof code, "pwrite");
    struct crosvm_memory *mem;
    ret = crosvm_create_memory(crosvm, memfd, 0, 0x10000, 0, false, false, &mem);
    CHECK(ret == 0, "create_memory: %d", ret);
    struct crosvm_vcpu *vcpu;
    CHECK(crosvm_get_vcpu(crosvm, 0, &vcpu) == 0, "get_vcpu");
    CHECK(crosvm_start(crosvm) == 0, "start");

    struct crosvm_vcpu_event ev;
    ret = crosvm_vcpu_wait(vcpu, &ev);
    CHECK(ret == 0 && ev.kind == CROSVM_VCPU_EVENT_KIND_INIT, "init: %d", ret);
    ret = crosvm_vcpu_wait(vcpu, &ev);
    CHECK(ret == -EBUSY, "wait with a resume owed returned %d, not -EBUSY", ret);
    printf("sdk_wait_c: wait with a resume owed: -EBUSY\n");

    struct kvm_sregs sregs;
    CHECK(crosvm_vcpu_get_sregs(vcpu, &sregs) == 0, "get_sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    CHECK(crosvm_vcpu_set_sregs(vcpu, &sregs) == 0, "set_sregs");
    struct kvm_regs regs;
    CHECK(crosvm_vcpu_get_regs(vcpu, &regs) == 0, "get_regs");
    regs.rip = 0x1000;
    regs.rflags = 2;
    CHECK(crosvm_vcpu_set_regs(vcpu, &regs) == 0, "set_regs");
    CHECK(crosvm_vcpu_resume(vcpu) == 0, "resume");
    printf("sdk_wait_c: running\n");

    ret = crosvm_vcpu_wait(vcpu, &ev);
    CHECK(ret == -ESHUTDOWN, "wait at shutdown returned %d, not -ESHUTDOWN", ret);
    ret = crosvm_vcpu_wait(vcpu, &ev);
    CHECK(ret == -ESHUTDOWN, "second wait at shutdown returned %d", ret);
    printf("sdk_wait_c: shutdown reached vcpu 0: -ESHUTDOWN\n");
    return 0;
}
