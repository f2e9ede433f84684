/*
 * A crosvm-era plugin (only crosvm.h): async writes, an ioeventfd, an
 * irqfd and the dirty log, each checked by what the guest did.
 *
 * Guest (real mode at 0x1000, 64 KiB of dirty-logged memory at 0):
 *   out 0x500, al (0xab)     ; async write range: no resume by the plugin
 *   out 0x600, al            ; ioeventfd: never reaches the plugin
 *   mov byte [0x8000], 0x5a  ; dirties page 8
 *   out 0x3f9, al            ; done: the plugin checks everything
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crosvm.h"

#define MEM_SIZE 0x10000
#define CODE 0x1000

static const uint8_t code[] = {
    0xb0, 0xab,                   /* mov al, 0xab */
    0xba, 0x00, 0x05,             /* mov dx, 0x500 */
    0xee,                         /* out dx, al */
    0xba, 0x00, 0x06,             /* mov dx, 0x600 */
    0xee,                         /* out dx, al */
    0xc6, 0x06, 0x00, 0x80, 0x5a, /* mov byte [0x8000], 0x5a */
    0xba, 0xf9, 0x03,             /* mov dx, 0x3f9 */
    0xee,                         /* out dx, al */
    0xf4,                         /* hlt */
};

static struct crosvm *crosvm;
static struct crosvm_memory *mem_obj;
static struct crosvm_io *io_event;
static struct crosvm_irq *irq_event;
static uint8_t *mem;
static int failures, async_seen, done;

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c)) {                                                            \
            fprintf(stderr, "crosvm_devices.c:%d: failed: %s\n", __LINE__, #c); \
            failures++;                                                        \
        }                                                                      \
    } while (0)

static void check_results(void) {
    /* The ioeventfd counted the guest's write. */
    struct pollfd p = {.fd = crosvm_io_event_fd(io_event), .events = POLLIN};
    CHECK(poll(&p, 1, 5000) == 1);
    uint64_t n = 0;
    CHECK(read(p.fd, &n, sizeof n) == sizeof n && n == 1);
    /* The guest's store is in memory and its page in the dirty log. */
    CHECK(mem[0x8000] == 0x5a);
    uint8_t log[MEM_SIZE / 4096 / 8] = {0};
    CHECK(crosvm_memory_get_dirty_log(crosvm, mem_obj, log) == 0);
    CHECK(log[1] & 1);
    memset(log, 0, sizeof log);
    CHECK(crosvm_memory_get_dirty_log(crosvm, mem_obj, log) == 0);
    CHECK(!(log[1] & 1)); /* reading the log clears it */
    /* The irqfd raises IRQ 5 on the primary PIC. */
    uint64_t one = 1;
    CHECK(write(crosvm_irq_event_get_fd(irq_event), &one, sizeof one) == sizeof one);
    struct kvm_pic_state pic;
    int tries = 0;
    do {
        CHECK(crosvm_get_pic_state(crosvm, true, &pic) == 0);
    } while (!(pic.irr & (1 << 5)) && ++tries < 1000 && poll(NULL, 0, 1) == 0);
    CHECK(pic.irr & (1 << 5));
}

static void *vcpu_thread(void *arg) {
    struct crosvm_vcpu *vcpu = arg;
    struct crosvm_vcpu_event evt;
    while (!done) {
        if (crosvm_vcpu_wait(vcpu, &evt)) {
            failures++;
            break;
        }
        if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
            struct kvm_sregs sregs;
            CHECK(crosvm_vcpu_get_sregs(vcpu, &sregs) == 0);
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            sregs.ds.base = 0;
            sregs.ds.selector = 0;
            CHECK(crosvm_vcpu_set_sregs(vcpu, &sregs) == 0);
            struct kvm_regs regs;
            CHECK(crosvm_vcpu_get_regs(vcpu, &regs) == 0);
            regs.rip = CODE;
            regs.rflags = 2;
            CHECK(crosvm_vcpu_set_regs(vcpu, &regs) == 0);
        } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS) {
            if (evt.io_access.address == 0x500) {
                CHECK(evt.io_access.is_write && evt.io_access.no_resume);
                CHECK(evt.io_access.length == 1 && evt.io_access.data[0] == 0xab);
                async_seen++;
                continue; /* an async write is not resumed */
            } else if (evt.io_access.address == 0x3f9) {
                CHECK(async_seen == 1);
                check_results();
                done = 1;
                uint64_t one = 1;
                CHECK(write(crosvm_get_shutdown_eventfd(crosvm), &one, sizeof one) == sizeof one);
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
    if (crosvm_connect(&crosvm)) {
        fprintf(stderr, "crosvm_connect failed\n");
        return 1;
    }
    int shutdown_fd = crosvm_get_shutdown_eventfd(crosvm);
    int mem_fd = memfd_create("guest_mem", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (shutdown_fd < 0 || mem_fd < 0 || ftruncate(mem_fd, MEM_SIZE) ||
        fcntl(mem_fd, F_ADD_SEALS, F_SEAL_SHRINK)) {
        perror("setup");
        return 1;
    }
    mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memcpy(mem + CODE, code, sizeof code);
    CHECK(crosvm_create_memory(crosvm, mem_fd, 0, MEM_SIZE, 0, false, true, &mem_obj) == 0);
    CHECK(crosvm_reserve_async_write_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, 0x500, 1) == 0);
    CHECK(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, 0x3f9, 1) == 0);
    CHECK(crosvm_create_io_event(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, 0x600, 0, NULL, &io_event) == 0);
    CHECK(crosvm_create_irq_event(crosvm, 5, &irq_event) == 0);
    struct crosvm_vcpu *vcpu;
    CHECK(crosvm_get_vcpu(crosvm, 0, &vcpu) == 0);
    pthread_t t;
    if (pthread_create(&t, NULL, vcpu_thread, vcpu)) {
        perror("pthread_create");
        return 1;
    }
    CHECK(crosvm_start(crosvm) == 0);
    uint64_t v;
    if (read(shutdown_fd, &v, sizeof v) != sizeof v) {
        perror("read shutdown");
        return 1;
    }
    pthread_join(t, NULL);
    CHECK(crosvm_destroy_io_event(crosvm, &io_event) == 0);
    CHECK(crosvm_destroy_irq_event(crosvm, &irq_event) == 0);
    CHECK(crosvm_destroy_memory(crosvm, &mem_obj) == 0);
    if (failures) {
        fprintf(stderr, "crosvm_devices: %d check(s) failed\n", failures);
        return 1;
    }
    printf("crosvm_devices: all checks passed\n");
    return 0;
}
