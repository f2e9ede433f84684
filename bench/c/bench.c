/*
 * The benchmark's C plugin, written against crosvm.h (API 0.22): runs the
 * benchmark guest (code loaded from a file) with synchronous port exits.
 * Usage: bench_c CODE_FILE ITERATIONS   (ITERATIONS is informational)
 *        bench_c trivial                (built-in guest: one port exit, then
 *                                        the done port; no file to read)
 * Prints: RESULT exits=N secs=S init_ns=T rss_anon_kb=0 rss_file_kb=0 rss_shmem_kb=0
 *         main_ns=T connected_ns=T exit_ns=T done_ns=T
 * (CLOCK_MONOTONIC: entering main, connected, vcpu 0's first IO exit, the
 * done exit.)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "crosvm.h"

#define RAM_SIZE 0x10000
#define CODE_ADDR 0x1000
#define LOOP_PORT 0x700
#define DONE_PORT 0x701

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what, int ret) {
    fprintf(stderr, "bench_c: %s failed: %d\n", what, ret);
    exit(1);
}

/* mov dx, 0x700; out dx, al; mov dx, 0x701; out dx, al; hlt */
static const uint8_t TRIVIAL[] = {0xba, 0x00, 0x07, 0xee, 0xba, 0x01, 0x07, 0xee, 0xf4};

int main(int argc, char **argv) {
    uint64_t main_ns = now_ns();
    if (argc < 2)
        die("usage", -1);
    struct crosvm *crosvm;
    int ret = crosvm_connect(&crosvm);
    if (ret)
        die("crosvm_connect", ret);
    uint64_t connected_ns = now_ns();
    int mem_fd = memfd_create("ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mem_fd < 0 || ftruncate(mem_fd, RAM_SIZE) || fcntl(mem_fd, F_ADD_SEALS, F_SEAL_SHRINK))
        die("memfd", -1);
    uint8_t *mem = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (mem == MAP_FAILED)
        die("mmap", -1);
    if (strcmp(argv[1], "trivial") == 0) {
        memcpy(mem + CODE_ADDR, TRIVIAL, sizeof(TRIVIAL));
    } else {
        FILE *f = fopen(argv[1], "rb");
        if (!f)
            die("open code file", -1);
        size_t n = fread(mem + CODE_ADDR, 1, RAM_SIZE - CODE_ADDR, f);
        fclose(f);
        if (n == 0)
            die("read code file", -1);
    }

    struct crosvm_memory *mem_obj;
    if ((ret = crosvm_create_memory(crosvm, mem_fd, 0, RAM_SIZE, 0, false, false, &mem_obj)))
        die("crosvm_create_memory", ret);
    if ((ret = crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, LOOP_PORT, 2)))
        die("crosvm_reserve_range", ret);
    struct crosvm_vcpu *vcpu;
    if ((ret = crosvm_get_vcpu(crosvm, 0, &vcpu)))
        die("crosvm_get_vcpu", ret);
    if ((ret = crosvm_start(crosvm)))
        die("crosvm_start", ret);

    uint64_t exits = 0, init_ns = 0, start = 0, end = 0, exit_ns = 0;
    for (;;) {
        struct crosvm_vcpu_event evt;
        if ((ret = crosvm_vcpu_wait(vcpu, &evt)))
            die("crosvm_vcpu_wait", ret);
        if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
            init_ns = now_ns();
            struct kvm_sregs sregs;
            if ((ret = crosvm_vcpu_get_sregs(vcpu, &sregs)))
                die("get_sregs", ret);
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            crosvm_vcpu_set_sregs(vcpu, &sregs);
            struct kvm_regs regs = {0};
            regs.rip = CODE_ADDR;
            regs.rflags = 2;
            regs.rsp = 0x8000;
            crosvm_vcpu_set_regs(vcpu, &regs);
            start = now_ns();
        } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS) {
            if (exit_ns == 0)
                exit_ns = now_ns();
            if (evt.io_access.address == DONE_PORT) {
                end = now_ns();
                break;
            }
            exits++;
        }
        if ((ret = crosvm_vcpu_resume(vcpu)))
            die("crosvm_vcpu_resume", ret);
    }
    printf("RESULT exits=%llu secs=%.6f init_ns=%llu rss_anon_kb=0 rss_file_kb=0 rss_shmem_kb=0 "
           "main_ns=%llu connected_ns=%llu exit_ns=%llu done_ns=%llu\n",
           (unsigned long long)exits, (double)(end - start) / 1e9, (unsigned long long)init_ns,
           (unsigned long long)main_ns, (unsigned long long)connected_ns,
           (unsigned long long)exit_ns, (unsigned long long)end);
    fflush(stdout);
    _exit(0);
}
