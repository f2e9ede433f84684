/*
 * A crosvm-era plugin (only crosvm.h): MSR and CPUID queries, VM and vcpu
 * state round trips, a pause driven by eventfds, and (argument "tap") the
 * tap's network configuration.
 *
 * Guest (real mode at 0x1000): inc ax; jmp back. The main thread pauses the
 * spinning vcpu; the vcpu thread answers on an eventfd, shows that AX grew,
 * and stops the machine.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crosvm.h"

#define MEM_SIZE 0x10000
#define CODE 0x1000

static const uint8_t code[] = {0x40, 0xeb, 0xfd}; /* inc ax; jmp short -3 */

static struct crosvm *crosvm;
static int failures, paused_evt, resume_evt;
static int token;

#define CHECK(c)                                                             \
    do {                                                                     \
        if (!(c)) {                                                          \
            fprintf(stderr, "crosvm_state.c:%d: failed: %s\n", __LINE__, #c); \
            failures++;                                                      \
        }                                                                    \
    } while (0)

static void vcpu_state_round_trip(struct crosvm_vcpu *vcpu) {
    struct kvm_fpu fpu;
    CHECK(crosvm_vcpu_get_fpu(vcpu, &fpu) == 0);
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    CHECK(crosvm_vcpu_set_fpu(vcpu, &fpu) == 0);
    struct kvm_fpu back;
    CHECK(crosvm_vcpu_get_fpu(vcpu, &back) == 0);
    struct kvm_lapic_state lapic;
    CHECK(crosvm_vcpu_get_lapic_state(vcpu, &lapic) == 0);
    CHECK(crosvm_vcpu_set_lapic_state(vcpu, &lapic) == 0);
    struct kvm_mp_state mp;
    CHECK(crosvm_vcpu_get_mp_state(vcpu, &mp) == 0 && mp.mp_state == KVM_MP_STATE_RUNNABLE);
    struct kvm_msr_entry msr = {.index = 0x174 /* IA32_SYSENTER_CS */, .data = 0x10};
    CHECK(crosvm_vcpu_set_msrs(vcpu, 1, &msr) == 0);
    struct kvm_msr_entry got = {.index = 0x174};
    uint32_t count = 0;
    CHECK(crosvm_vcpu_get_msrs(vcpu, 1, &got, &count) == 0 && count == 1 && got.data == 0x10);
}

static void *vcpu_thread(void *arg) {
    struct crosvm_vcpu *vcpu = arg;
    struct crosvm_vcpu_event evt;
    for (;;) {
        if (crosvm_vcpu_wait(vcpu, &evt)) {
            failures++;
            break;
        }
        if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
            struct kvm_sregs sregs;
            CHECK(crosvm_vcpu_get_sregs(vcpu, &sregs) == 0);
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            CHECK(crosvm_vcpu_set_sregs(vcpu, &sregs) == 0);
            struct kvm_regs regs;
            CHECK(crosvm_vcpu_get_regs(vcpu, &regs) == 0);
            regs.rip = CODE;
            regs.rflags = 2;
            regs.rax = 0;
            CHECK(crosvm_vcpu_set_regs(vcpu, &regs) == 0);
            vcpu_state_round_trip(vcpu);
        } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_PAUSED) {
            CHECK(evt.user == &token);
            struct kvm_regs regs;
            CHECK(crosvm_vcpu_get_regs(vcpu, &regs) == 0);
            /* The guest ran: AX counted, RIP is inside the loop. */
            CHECK((regs.rax & 0xffff) > 0);
            CHECK(regs.rip >= CODE && regs.rip < CODE + sizeof code);
            uint64_t one = 1;
            CHECK(write(paused_evt, &one, sizeof one) == sizeof one);
            uint64_t v;
            CHECK(read(resume_evt, &v, sizeof v) == sizeof v);
            CHECK(write(crosvm_get_shutdown_eventfd(crosvm), &one, sizeof one) == sizeof one);
            break;
        }
        CHECK(crosvm_vcpu_resume(vcpu) == 0);
    }
    return NULL;
}

static void queries_and_vm_state(void) {
    uint32_t n = 0;
    uint32_t msrs[1024];
    CHECK(crosvm_get_msr_index_list(crosvm, 1024, msrs, &n) == 0 && n > 0);
    int has_tsc = 0;
    for (uint32_t i = 0; i < n; i++)
        has_tsc |= msrs[i] == 0x10; /* IA32_TSC */
    CHECK(has_tsc);
    static struct kvm_cpuid_entry2 cpuid[256];
    CHECK(crosvm_get_supported_cpuid(crosvm, 256, cpuid, &n) == 0 && n > 0);
    int vendor = 0;
    for (uint32_t i = 0; i < n; i++)
        vendor |= cpuid[i].function == 0 && cpuid[i].eax > 0;
    CHECK(vendor);
    /* Too small a buffer: E2BIG. */
    CHECK(crosvm_get_supported_cpuid(crosvm, 1, cpuid, &n) == -E2BIG);

    struct kvm_pit_state2 pit;
    CHECK(crosvm_get_pit_state(crosvm, &pit) == 0);
    pit.channels[0].count = 0x1234;
    pit.channels[0].mode = 2;
    CHECK(crosvm_set_pit_state(crosvm, &pit) == 0);
    struct kvm_pit_state2 pit2;
    CHECK(crosvm_get_pit_state(crosvm, &pit2) == 0 && pit2.channels[0].count == 0x1234);
    struct kvm_pic_state pic;
    CHECK(crosvm_get_pic_state(crosvm, false, &pic) == 0);
    pic.imr = 0xa5;
    CHECK(crosvm_set_pic_state(crosvm, false, &pic) == 0);
    struct kvm_pic_state pic2;
    CHECK(crosvm_get_pic_state(crosvm, false, &pic2) == 0 && pic2.imr == 0xa5);
    struct kvm_ioapic_state ioapic;
    CHECK(crosvm_get_ioapic_state(crosvm, &ioapic) == 0);
    CHECK(crosvm_set_ioapic_state(crosvm, &ioapic) == 0);
    struct kvm_clock_data clock = {0};
    CHECK(crosvm_get_clock(crosvm, &clock) == 0 && clock.clock > 0);
}

static void net_config(void) {
    struct crosvm_net_config net;
    CHECK(crosvm_net_get_config(crosvm, &net) == 0);
    CHECK(net.host_ip == __builtin_bswap32(0x64735c05)); /* 100.115.92.5 */
    CHECK(net.netmask == __builtin_bswap32(0xfffffffc));
    CHECK(net.host_mac_address[0] == 0xde && net.host_mac_address[5] == 0x6a);
    unsigned int features = 0;
    CHECK(ioctl(net.tap_fd, TUNGETFEATURES, &features) == 0 && (features & IFF_TAP));
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    CHECK(ioctl(net.tap_fd, TUNGETIFF, &ifr) == 0 && (ifr.ifr_flags & IFF_TAP));
    CHECK(strncmp(ifr.ifr_name, "vmtap", 5) == 0);
    close(net.tap_fd);
}

int main(int argc, char **argv) {
    if (crosvm_connect(&crosvm)) {
        fprintf(stderr, "crosvm_connect failed\n");
        return 1;
    }
    int shutdown_fd = crosvm_get_shutdown_eventfd(crosvm);
    paused_evt = eventfd(0, 0);
    resume_evt = eventfd(0, 0);
    int mem_fd = memfd_create("guest_mem", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (shutdown_fd < 0 || paused_evt < 0 || resume_evt < 0 || mem_fd < 0 ||
        ftruncate(mem_fd, MEM_SIZE) || fcntl(mem_fd, F_ADD_SEALS, F_SEAL_SHRINK)) {
        perror("setup");
        return 1;
    }
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memcpy(mem + CODE, code, sizeof code);
    struct crosvm_memory *mem_obj;
    CHECK(crosvm_create_memory(crosvm, mem_fd, 0, MEM_SIZE, 0, false, false, &mem_obj) == 0);
    queries_and_vm_state();
    if (argc > 1 && strcmp(argv[1], "tap") == 0)
        net_config();
    struct crosvm_vcpu *vcpu;
    CHECK(crosvm_get_vcpu(crosvm, 0, &vcpu) == 0);
    pthread_t t;
    if (pthread_create(&t, NULL, vcpu_thread, vcpu)) {
        perror("pthread_create");
        return 1;
    }
    CHECK(crosvm_start(crosvm) == 0);
    /* Let the guest spin, then pause it; the vcpu thread answers on the
     * eventfd once it has seen the pause. */
    CHECK(poll(NULL, 0, 50) == 0);
    CHECK(crosvm_pause_vcpus(crosvm, 1, &token) == 0);
    uint64_t v;
    CHECK(read(paused_evt, &v, sizeof v) == sizeof v && v == 1);
    uint64_t one = 1;
    CHECK(write(resume_evt, &one, sizeof one) == sizeof one);
    if (read(shutdown_fd, &v, sizeof v) != sizeof v) {
        perror("read shutdown");
        return 1;
    }
    pthread_join(t, NULL);
    if (failures) {
        fprintf(stderr, "crosvm_state: %d check(s) failed\n", failures);
        return 1;
    }
    printf("crosvm_state: all checks passed\n");
    return 0;
}
