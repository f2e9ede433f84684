/*
 * tutorial.c: the C version of "your first plugin" (docs/tutorial.md).
 *
 * A counter device: each guest read of port 0x100 returns the next number;
 * the guest echoes it to port 0x101, which the plugin prints, until 3; then
 * it writes to port 0x102 and the plugin stops the machine. One vcpu.
 *
 * Build (after scripts/install.sh --prefix DIR):
 *   export PKG_CONFIG_PATH=DIR/lib/pkgconfig
 *   cc -o tutorial tutorial.c $(pkg-config --cflags --libs crosvm_plugin)
 *   DIR/bin/vmm --plugin ./tutorial
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crosvm.h"

#define COUNTER_PORT 0x100 /* read: next number */
#define ECHO_PORT 0x101    /* write: the plugin prints it */
#define DONE_PORT 0x102    /* write: stop */
#define CODE_ADDR 0x1000
#define MEM_SIZE 0x10000

/* 16-bit real-mode guest code, loaded at 0x1000. */
static const uint8_t guest_code[] = {
    0xba, 0x00, 0x01, /* again: mov dx, 0x100 */
    0xec,             /*        in al, dx        ; ask the counter */
    0xba, 0x01, 0x01, /*        mov dx, 0x101 */
    0xee,             /*        out dx, al       ; echo it */
    0x3c, 0x03,       /*        cmp al, 3 */
    0x72, 0xf4,       /*        jb again */
    0xba, 0x02, 0x01, /*        mov dx, 0x102 */
    0xee,             /*        out dx, al       ; done */
    0xf4,             /*        hlt */
};

static int fail(const char *what, int ret) {
    fprintf(stderr, "tutorial_c: %s failed: %s\n", what, strerror(-ret));
    return 1;
}

int main(int argc, char **argv) {
    if (argc > 1) {
        fprintf(stderr, "usage: vmm --plugin %s   (the tutorial machine takes no arguments)\n",
                argv[0]);
        return 2;
    }
    struct crosvm *crosvm;
    int ret = crosvm_connect(&crosvm);
    if (ret)
        return fail("crosvm_connect", ret);

    /* Guest RAM: a memfd sealed against shrinking, mapped here too. */
    int mem_fd = memfd_create("guest_ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mem_fd < 0 || ftruncate(mem_fd, MEM_SIZE) ||
        fcntl(mem_fd, F_ADD_SEALS, F_SEAL_SHRINK)) {
        perror("tutorial_c: memfd");
        return 1;
    }
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (mem == MAP_FAILED) {
        perror("tutorial_c: mmap");
        return 1;
    }
    memcpy(mem + CODE_ADDR, guest_code, sizeof(guest_code));
    struct crosvm_memory *ram;
    ret = crosvm_create_memory(crosvm, mem_fd, 0, MEM_SIZE, 0, false, false, &ram);
    if (ret)
        return fail("crosvm_create_memory", ret);

    /* The three ports stop the vcpu and come to us as IO_ACCESS events. */
    ret = crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, COUNTER_PORT, 3);
    if (ret)
        return fail("crosvm_reserve_range", ret);

    struct crosvm_vcpu *vcpu;
    ret = crosvm_get_vcpu(crosvm, 0, &vcpu);
    if (ret)
        return fail("crosvm_get_vcpu", ret);
    if (crosvm_get_vcpu(crosvm, 1, &vcpu) == 0) {
        fprintf(stderr, "tutorial_c: this machine has one vcpu; run vmm without --cpus\n");
        return 2;
    }
    crosvm_get_vcpu(crosvm, 0, &vcpu);
    ret = crosvm_start(crosvm);
    if (ret)
        return fail("crosvm_start", ret);

    uint8_t counter = 0;
    for (;;) {
        struct crosvm_vcpu_event evt;
        ret = crosvm_vcpu_wait(vcpu, &evt);
        if (ret == -ESHUTDOWN) {
            fprintf(stderr, "tutorial_c: the VM was stopped before the guest finished\n");
            return 1;
        }
        if (ret)
            return fail("crosvm_vcpu_wait", ret);
        if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
            /* The vcpu starts in reset state (CS base 0xffff0000): point
             * every segment at 0 and start at 0:0x1000. */
            struct kvm_sregs sregs;
            ret = crosvm_vcpu_get_sregs(vcpu, &sregs);
            if (ret)
                return fail("crosvm_vcpu_get_sregs", ret);
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            crosvm_vcpu_set_sregs(vcpu, &sregs);
            struct kvm_regs regs = {0};
            regs.rip = CODE_ADDR;
            regs.rsp = 0x8000;
            regs.rflags = 2;
            crosvm_vcpu_set_regs(vcpu, &regs);
        } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS) {
            uint64_t port = evt.io_access.address;
            if (port == COUNTER_PORT && !evt.io_access.is_write) {
                evt.io_access.data[0] = ++counter;
            } else if (port == ECHO_PORT && evt.io_access.is_write) {
                printf("guest counted %u\n", evt.io_access.data[0]);
            } else if (port == DONE_PORT) {
                printf("guest is done\n");
                fflush(stdout);
                return 0; /* the VM stops when the plugin exits */
            }
        }
        ret = crosvm_vcpu_resume(vcpu);
        if (ret)
            return fail("crosvm_vcpu_resume", ret);
    }
}
