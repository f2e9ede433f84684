/*
 * C API smoke test plugin, written only against crosvm.h (API 0.22).
 *
 * Exercises: crosvm_connect, the shutdown eventfd, memfd-backed memory sealed
 * with F_SEAL_SHRINK, a reserved IO port and a reserved MMIO range, vcpu
 * wait/resume, and register get/set at Init and during an IO exit.
 *
 * Guest (real mode at 0x1000, DS base 0x20000):
 *   out 0x3f8, ax        ; AX was set to 0x1234 by the plugin at Init
 *   mov ax, [0]          ; MMIO read at 0x20000, the plugin answers 0x5678
 *   mov [2], ax          ; MMIO write at 0x20002
 *   out 0x3f9, al        ; "kill" port: the plugin checks RAX and stops
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crosvm.h"

#define MEM_SIZE 0x10000
#define CODE_ADDR 0x1000
#define MMIO_BASE 0x20000
#define KILL_PORT 0x3f9

static const uint8_t code[] = {
    0xba, 0xf8, 0x03, /* mov dx, 0x3f8 */
    0xef,             /* out dx, ax */
    0xa1, 0x00, 0x00, /* mov ax, [0] */
    0xa3, 0x02, 0x00, /* mov [2], ax */
    0xba, 0xf9, 0x03, /* mov dx, 0x3f9 */
    0xee,             /* out dx, al */
    0xf4,             /* hlt */
};

static int shutdown_fd;
static int failures;
static int steps;

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "smoke.c:%d: check failed: %s\n", __LINE__, #cond); \
            failures++;                                                      \
        }                                                                    \
    } while (0)

static void *vcpu_thread(void *arg) {
    struct crosvm_vcpu *vcpu = arg;
    struct crosvm_vcpu_event evt;
    for (;;) {
        int ret = crosvm_vcpu_wait(vcpu, &evt);
        if (ret) {
            fprintf(stderr, "crosvm_vcpu_wait: %d\n", ret);
            failures++;
            break;
        }
        if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
            struct kvm_sregs sregs;
            CHECK(crosvm_vcpu_get_sregs(vcpu, &sregs) == 0);
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            sregs.ds.base = MMIO_BASE;
            sregs.ds.selector = MMIO_BASE >> 4;
            CHECK(crosvm_vcpu_set_sregs(vcpu, &sregs) == 0);
            struct kvm_regs regs;
            CHECK(crosvm_vcpu_get_regs(vcpu, &regs) == 0);
            regs.rip = CODE_ADDR;
            regs.rflags = 2;
            regs.rax = 0x1234;
            CHECK(crosvm_vcpu_set_regs(vcpu, &regs) == 0);
            /* A get after a set sees the set value (flushed to the host). */
            struct kvm_regs check;
            CHECK(crosvm_vcpu_get_regs(vcpu, &check) == 0);
            CHECK(check.rax == 0x1234 && check.rip == CODE_ADDR);
            steps++;
        } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS) {
            if (evt.io_access.address_space == CROSVM_ADDRESS_SPACE_IOPORT &&
                evt.io_access.address == 0x3f8) {
                CHECK(evt.io_access.is_write && evt.io_access.length == 2);
                CHECK(evt.io_access.data[0] == 0x34 && evt.io_access.data[1] == 0x12);
                steps++;
            } else if (evt.io_access.address_space == CROSVM_ADDRESS_SPACE_MMIO &&
                       evt.io_access.address == MMIO_BASE) {
                CHECK(!evt.io_access.is_write && evt.io_access.length == 2);
                evt.io_access.data[0] = 0x78;
                evt.io_access.data[1] = 0x56;
                steps++;
            } else if (evt.io_access.address_space == CROSVM_ADDRESS_SPACE_MMIO &&
                       evt.io_access.address == MMIO_BASE + 2) {
                CHECK(evt.io_access.is_write && evt.io_access.length == 2);
                CHECK(evt.io_access.data[0] == 0x78 && evt.io_access.data[1] == 0x56);
                steps++;
            } else if (evt.io_access.address == KILL_PORT) {
                struct kvm_regs regs;
                CHECK(crosvm_vcpu_get_regs(vcpu, &regs) == 0);
                CHECK((regs.rax & 0xffff) == 0x5678);
                steps++;
                uint64_t one = 1;
                CHECK(write(shutdown_fd, &one, sizeof(one)) == sizeof(one));
                break;
            } else {
                fprintf(stderr, "unexpected io at %#llx\n",
                        (unsigned long long)evt.io_access.address);
                failures++;
            }
        }
        CHECK(crosvm_vcpu_resume(vcpu) == 0);
    }
    return NULL;
}

int main(void) {
    struct crosvm *crosvm;
    int ret = crosvm_connect(&crosvm);
    if (ret) {
        fprintf(stderr, "crosvm_connect: %d\n", ret);
        return 1;
    }
    shutdown_fd = crosvm_get_shutdown_eventfd(crosvm);
    if (shutdown_fd < 0) {
        fprintf(stderr, "crosvm_get_shutdown_eventfd: %d\n", shutdown_fd);
        return 1;
    }

    int mem_fd = memfd_create("guest_mem", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mem_fd < 0 || ftruncate(mem_fd, MEM_SIZE) ||
        fcntl(mem_fd, F_ADD_SEALS, F_SEAL_SHRINK)) {
        perror("memfd");
        return 1;
    }
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memcpy(mem + CODE_ADDR, code, sizeof(code));

    struct crosvm_memory *mem_obj;
    CHECK(crosvm_create_memory(crosvm, mem_fd, 0, MEM_SIZE, 0, false, false, &mem_obj) == 0);
    /* Unsealed memory is refused with EPERM. */
    int unsealed = memfd_create("unsealed", MFD_CLOEXEC);
    CHECK(unsealed >= 0 && ftruncate(unsealed, 0x1000) == 0);
    struct crosvm_memory *bad_obj;
    CHECK(crosvm_create_memory(crosvm, unsealed, 0, 0x1000, 0x40000, false, false, &bad_obj) == -EPERM);
    CHECK(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, 0x3f8, 2) == 0);
    CHECK(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, 0x3f9, 1) == -EPERM);
    CHECK(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_MMIO, MMIO_BASE, 0x10) == 0);

    struct crosvm_vcpu *vcpu;
    CHECK(crosvm_get_vcpu(crosvm, 0, &vcpu) == 0);
    struct crosvm_vcpu *none;
    CHECK(crosvm_get_vcpu(crosvm, 1, &none) == -ENOENT);

    pthread_t thread;
    if (pthread_create(&thread, NULL, vcpu_thread, vcpu)) {
        perror("pthread_create");
        return 1;
    }
    CHECK(crosvm_start(crosvm) == 0);
    CHECK(crosvm_start(crosvm) == -EINVAL);

    uint64_t value;
    if (read(shutdown_fd, &value, sizeof(value)) != sizeof(value)) {
        perror("read shutdown eventfd");
        return 1;
    }
    pthread_join(thread, NULL);
    CHECK(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_MMIO, MMIO_BASE, 0) == 0);
    CHECK(crosvm_destroy_memory(crosvm, &mem_obj) == 0 && mem_obj == NULL);
    CHECK(steps == 5);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("C smoke test passed\n");
    return 0;
}
