/*
 * adder_c: the adder machine written in C against crosvm.h (API 0.22).
 *
 * The guest reads two 32-bit numbers from ports 0x600 and 0x601, adds them
 * and writes the sum to port 0x602, then writes to the shutdown port 0x501.
 * The plugin serves the numbers (from argv, default 40 and 2), checks the
 * sum and exits 0 only if it is right.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crosvm.h"

#define PORT_A 0x600
#define PORT_SUM 0x602
#define SHUTDOWN_PORT 0x501
#define CODE_ADDR 0x1000
#define MEM_SIZE 0x10000

static const uint8_t guest_code[] = {
    0xba, 0x00, 0x06,       /* mov dx, 0x600 */
    0x66, 0xed,             /* in eax, dx */
    0x66, 0x89, 0xc3,       /* mov ebx, eax */
    0x42,                   /* inc dx (0x601) */
    0x66, 0xed,             /* in eax, dx */
    0x66, 0x01, 0xd8,       /* add eax, ebx */
    0x42,                   /* inc dx (0x602) */
    0x66, 0xef,             /* out dx, eax */
    0xba, 0x01, 0x05,       /* mov dx, 0x501 */
    0xee,                   /* out dx, al */
    0xf4,                   /* hlt */
};

static int fail(const char *what, int ret) {
    fprintf(stderr, "adder_c: %s failed: %s\n", what, strerror(-ret));
    return 1;
}

static int usage(const char *problem) {
    fprintf(stderr, "adder_c: %s\nusage: vmm --plugin adder_c [--plugin-args A B]"
                    "   (two u32 numbers; default 40 2; one vcpu)\n", problem);
    return 2;
}

/* A whole decimal (or 0x hex) number that fits in 32 bits. */
static int parse_u32(const char *text, uint32_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 0);
    if (errno || end == text || *end || text[0] == '-' || v > UINT32_MAX)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

int main(int argc, char **argv) {
    uint32_t a = 40, b = 2;
    if (argc != 1 && argc != 3)
        return usage("expected no arguments or two");
    if (argc == 3 && (parse_u32(argv[1], &a) || parse_u32(argv[2], &b)))
        return usage("the arguments must be two u32 numbers");
    struct crosvm *crosvm;
    int ret = crosvm_connect(&crosvm);
    if (ret)
        return fail("crosvm_connect", ret);
    struct crosvm_vcpu *extra;
    if (crosvm_get_vcpu(crosvm, 1, &extra) == 0) {
        fprintf(stderr, "adder_c: this machine drives 1 vcpu; run vmm without --cpus\n");
        return 2;
    }

    int mem_fd = memfd_create("guest_mem", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mem_fd < 0 || ftruncate(mem_fd, MEM_SIZE) ||
        fcntl(mem_fd, F_ADD_SEALS, F_SEAL_SHRINK)) {
        perror("adder_c: memfd");
        return 1;
    }
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (mem == MAP_FAILED) {
        perror("adder_c: mmap");
        return 1;
    }
    memcpy(mem + CODE_ADDR, guest_code, sizeof(guest_code));

    struct crosvm_memory *mem_obj;
    ret = crosvm_create_memory(crosvm, mem_fd, 0, MEM_SIZE, 0, false, false, &mem_obj);
    if (ret)
        return fail("crosvm_create_memory", ret);
    ret = crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, PORT_A, 3);
    if (ret)
        return fail("crosvm_reserve_range", ret);
    ret = crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, SHUTDOWN_PORT, 1);
    if (ret)
        return fail("crosvm_reserve_range", ret);

    struct crosvm_vcpu *vcpu;
    ret = crosvm_get_vcpu(crosvm, 0, &vcpu);
    if (ret)
        return fail("crosvm_get_vcpu", ret);
    ret = crosvm_start(crosvm);
    if (ret)
        return fail("crosvm_start", ret);

    uint32_t sum = 0;
    int got_sum = 0;
    for (;;) {
        struct crosvm_vcpu_event evt;
        ret = crosvm_vcpu_wait(vcpu, &evt);
        if (ret)
            return fail("crosvm_vcpu_wait", ret);
        if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
            struct kvm_sregs sregs;
            ret = crosvm_vcpu_get_sregs(vcpu, &sregs);
            if (ret)
                return fail("crosvm_vcpu_get_sregs", ret);
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            crosvm_vcpu_set_sregs(vcpu, &sregs);
            struct kvm_regs regs = {0};
            regs.rip = CODE_ADDR;
            regs.rflags = 2;
            crosvm_vcpu_set_regs(vcpu, &regs);
        } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS) {
            uint64_t port = evt.io_access.address;
            if (port == SHUTDOWN_PORT)
                break;
            if (!evt.io_access.is_write && evt.io_access.length == 4) {
                uint32_t v = port == PORT_A ? a : b;
                memcpy(evt.io_access.data, &v, 4);
            } else if (port == PORT_SUM && evt.io_access.is_write) {
                memcpy(&sum, evt.io_access.data, 4);
                got_sum = 1;
            }
        }
        ret = crosvm_vcpu_resume(vcpu);
        if (ret)
            return fail("crosvm_vcpu_resume", ret);
    }

    if (!got_sum || sum != a + b) {
        fprintf(stderr, "adder_c: guest computed %u, expected %u\n", sum, a + b);
        return 1;
    }
    printf("%u + %u = %u (computed by the guest)\n", a, b, sum);
    fflush(stdout);
    return 0;
}
