/*
 * counter_c: the counter machine written in C against crosvm.h and the
 * control-channel extension of crosvm_ext.h (docs/protocol-extensions.md
 * section 5).
 *
 * The guest (64-bit long mode; hand-encoded) adds 1 to a 32-bit counter
 * in guest memory in a tight loop and reads the status port 0x510 every
 * 2^24 TSC cycles; when bit 0 (the power button) is set it writes the
 * shutdown port 0x501 and halts. The plugin answers `powerbtn` (presses
 * the button), `plugin count` ({"count": N}, read from guest memory) and
 * refuses the rest; it prints `count N` every 500 ms.
 *
 * counter_c [POWERBTN_MS]: press the power button after POWERBTN_MS ms
 * (0, the default: never).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "crosvm.h"
#include "crosvm_ext.h"

#define STATUS_PORT 0x510
#define STATUS_POWER_BUTTON 1
#define SHUTDOWN_PORT 0x501
#define CODE_ADDR 0x1000
#define COUNTER_ADDR 0x3000
#define STACK_ADDR 0x7000
#define GDT_ADDR 0x8000
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xa000
#define PD_ADDR 0xb000
#define MEM_SIZE 0x10000

static const uint8_t guest_code[] = {
    0x31, 0xc0,                                     /* xor eax, eax */
    0x89, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00,       /* mov [0x3000], eax */
    0x0f, 0x31,                                     /* rdtsc */
    0x48, 0xc1, 0xe2, 0x20,                         /* shl rdx, 32 */
    0x48, 0x09, 0xd0,                               /* or rax, rdx */
    0x48, 0x89, 0xc7,                               /* mov rdi, rax (last poll) */
    /* outer: */
    0xb9, 0x00, 0x04, 0x00, 0x00,                   /* mov ecx, 1024 */
    /* inner: */
    0x83, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0x01, /* add dword [0x3000], 1 */
    0xff, 0xc9,                                     /* dec ecx */
    0x75, 0xf4,                                     /* jnz inner */
    0x0f, 0x31,                                     /* rdtsc */
    0x48, 0xc1, 0xe2, 0x20,                         /* shl rdx, 32 */
    0x48, 0x09, 0xd0,                               /* or rax, rdx */
    0x48, 0x89, 0xc3,                               /* mov rbx, rax */
    0x48, 0x29, 0xfb,                               /* sub rbx, rdi */
    0x48, 0x81, 0xfb, 0x00, 0x00, 0x00, 0x01,       /* cmp rbx, 1 << 24 */
    0x72, 0xd7,                                     /* jb outer */
    0x48, 0x89, 0xc7,                               /* mov rdi, rax */
    0x66, 0xba, 0x10, 0x05,                         /* mov dx, 0x510 */
    0xec,                                           /* in al, dx */
    0xa8, 0x01,                                     /* test al, 1 */
    0x74, 0xcb,                                     /* jz outer */
    /* off: */
    0x66, 0xba, 0x01, 0x05,                         /* mov dx, 0x501 */
    0xee,                                           /* out dx, al */
    0xf4,                                           /* hlt */
    0xeb, 0xf8,                                     /* jmp off */
};

static atomic_int power_pressed;
static volatile uint32_t *counter;
static unsigned long powerbtn_ms;

static uint32_t count(void) { return __atomic_load_n(counter, __ATOMIC_RELAXED); }

static int fail(const char *what, int ret) {
    fprintf(stderr, "counter_c: %s failed: %s\n", what, strerror(-ret));
    return 1;
}

static void sleep_ms(unsigned long ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) && errno == EINTR) {
    }
}

static void *reporter(void *arg) {
    (void)arg;
    for (;;) {
        sleep_ms(500);
        printf("count %u\n", count());
        fflush(stdout);
    }
    return NULL;
}

static void press_power_button(void) {
    printf("power button pressed\n");
    fflush(stdout);
    atomic_store(&power_pressed, 1);
}

static void *auto_power(void *arg) {
    (void)arg;
    sleep_ms(powerbtn_ms);
    press_power_button();
    return NULL;
}

/* Serves the control channel until the host closes it. */
static void *control_loop(void *arg) {
    struct crosvm_control *ctl = arg;
    for (;;) {
        struct crosvm_control_command cmd;
        int ret = crosvm_control_recv(ctl, &cmd);
        if (ret == -ESHUTDOWN)
            break;
        if (ret) {
            fail("crosvm_control_recv", ret);
            break;
        }
        if (cmd.kind == CROSVM_CONTROL_POWER_BUTTON) {
            press_power_button();
            ret = crosvm_control_reply(ctl, cmd.id, NULL);
        } else if (cmd.kind == CROSVM_CONTROL_CUSTOM && strcmp(cmd.name, "count") == 0) {
            char json[64];
            snprintf(json, sizeof(json), "{\"count\": %u}", count());
            ret = crosvm_control_reply(ctl, cmd.id, json);
        } else if (cmd.kind == CROSVM_CONTROL_CUSTOM) {
            char message[128];
            snprintf(message, sizeof(message),
                     "unknown command \"%.64s\"; this machine knows \"count\"", cmd.name);
            ret = crosvm_control_reply_error(ctl, cmd.id, EINVAL, message);
        } else {
            ret = crosvm_control_reply_error(ctl, cmd.id, ENOTSUP,
                                             "this machine has no sleep button");
        }
        if (ret) {
            fail("crosvm_control_reply", ret);
            break;
        }
    }
    crosvm_control_close(&ctl);
    return NULL;
}

static void set_segment(struct kvm_segment *s, uint16_t selector, int code) {
    memset(s, 0, sizeof(*s));
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = selector;
    s->type = code ? 0xb : 0x3;
    s->present = 1;
    s->s = 1;
    s->g = 1;
    s->l = code ? 1 : 0;
    s->db = code ? 0 : 1;
}

/* Long mode: a GDT (64-bit code at 0x8, data at 0x10) and page tables
 * identity-mapping the first 2 MiB. */
static int enter_long_mode(struct crosvm_vcpu *vcpu, uint8_t *mem) {
    uint64_t gdt[3] = {0, 0x00af9b000000ffffull, 0x00cf93000000ffffull};
    memcpy(mem + GDT_ADDR, gdt, sizeof(gdt));
    uint64_t pml4e = PDPT_ADDR | 3, pdpte = PD_ADDR | 3, pde = 0x83;
    memcpy(mem + PML4_ADDR, &pml4e, 8);
    memcpy(mem + PDPT_ADDR, &pdpte, 8);
    memcpy(mem + PD_ADDR, &pde, 8);

    struct kvm_sregs sregs;
    int ret = crosvm_vcpu_get_sregs(vcpu, &sregs);
    if (ret)
        return fail("crosvm_vcpu_get_sregs", ret);
    set_segment(&sregs.cs, 0x8, 1);
    set_segment(&sregs.ds, 0x10, 0);
    sregs.es = sregs.ds;
    sregs.ss = sregs.ds;
    sregs.fs = sregs.ds;
    sregs.gs = sregs.ds;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = sizeof(gdt) - 1;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= 0x20;                   /* PAE */
    sregs.cr0 = 0x80000011;              /* PG | ET | PE */
    sregs.efer |= 0x500;                 /* LME | LMA */
    ret = crosvm_vcpu_set_sregs(vcpu, &sregs);
    if (ret)
        return fail("crosvm_vcpu_set_sregs", ret);
    struct kvm_regs regs = {0};
    regs.rip = CODE_ADDR;
    regs.rsp = STACK_ADDR;
    regs.rflags = 2;
    ret = crosvm_vcpu_set_regs(vcpu, &regs);
    if (ret)
        return fail("crosvm_vcpu_set_regs", ret);
    return 0;
}

static int usage(const char *problem) {
    fprintf(stderr, "counter_c: %s\nusage: vmm --plugin counter_c [--plugin-args POWERBTN_MS]"
                    "   (press the power button after POWERBTN_MS ms; 0: never; one vcpu)\n",
            problem);
    return 2;
}

int main(int argc, char **argv) {
    if (argc > 2)
        return usage("expected at most one argument");
    if (argc == 2) {
        char *end;
        errno = 0;
        powerbtn_ms = strtoul(argv[1], &end, 10);
        if (errno || end == argv[1] || *end || argv[1][0] == '-')
            return usage("POWERBTN_MS must be a number of milliseconds");
    }
    struct crosvm *crosvm;
    int ret = crosvm_connect(&crosvm);
    if (ret)
        return fail("crosvm_connect", ret);
    struct crosvm_vcpu *extra;
    if (crosvm_get_vcpu(crosvm, 1, &extra) == 0) {
        fprintf(stderr, "counter_c: this machine drives 1 vcpu; run vmm without --cpus\n");
        return 2;
    }

    int mem_fd = memfd_create("guest_mem", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mem_fd < 0 || ftruncate(mem_fd, MEM_SIZE) ||
        fcntl(mem_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)) {
        perror("counter_c: memfd");
        return 1;
    }
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
    if (mem == MAP_FAILED) {
        perror("counter_c: mmap");
        return 1;
    }
    memcpy(mem + CODE_ADDR, guest_code, sizeof(guest_code));
    counter = (volatile uint32_t *)(void *)(mem + COUNTER_ADDR);

    struct crosvm_memory *mem_obj;
    ret = crosvm_create_memory(crosvm, mem_fd, 0, MEM_SIZE, 0, false, false, &mem_obj);
    if (ret)
        return fail("crosvm_create_memory", ret);
    ret = crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, STATUS_PORT, 1);
    if (ret)
        return fail("crosvm_reserve_range", ret);
    ret = crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, SHUTDOWN_PORT, 1);
    if (ret)
        return fail("crosvm_reserve_range", ret);

    pthread_t thread;
    struct crosvm_control *ctl;
    ret = crosvm_control_open(crosvm, &ctl);
    if (ret) {
        /* An older host: the machine runs without management. */
        fprintf(stderr, "counter_c: no control channel (%s); running without one\n",
                strerror(-ret));
    } else if (pthread_create(&thread, NULL, control_loop, ctl)) {
        fprintf(stderr, "counter_c: cannot start the control thread\n");
        return 1;
    }
    if (pthread_create(&thread, NULL, reporter, NULL) ||
        (powerbtn_ms && pthread_create(&thread, NULL, auto_power, NULL))) {
        fprintf(stderr, "counter_c: cannot start a thread\n");
        return 1;
    }

    struct crosvm_vcpu *vcpu;
    ret = crosvm_get_vcpu(crosvm, 0, &vcpu);
    if (ret)
        return fail("crosvm_get_vcpu", ret);
    ret = crosvm_start(crosvm);
    if (ret)
        return fail("crosvm_start", ret);

    for (;;) {
        struct crosvm_vcpu_event evt;
        ret = crosvm_vcpu_wait(vcpu, &evt);
        if (ret == -ESHUTDOWN) {
            /* The host stopped the VM (vmm stop, SIGTERM): an orderly end. */
            printf("the host stopped the VM at count %u\n", count());
            fflush(stdout);
            exit(0);
        }
        if (ret)
            return fail("crosvm_vcpu_wait", ret);
        if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
            if (enter_long_mode(vcpu, mem))
                return 1;
        } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS) {
            uint64_t port = evt.io_access.address;
            if (port == SHUTDOWN_PORT) {
                printf("guest shut down cleanly at count %u\n", count());
                fflush(stdout);
                /* exit, not return: the other threads keep running. */
                exit(0);
            }
            if (port == STATUS_PORT && !evt.io_access.is_write)
                evt.io_access.data[0] =
                    atomic_load(&power_pressed) ? STATUS_POWER_BUTTON : 0;
        }
        ret = crosvm_vcpu_resume(vcpu);
        if (ret)
            return fail("crosvm_vcpu_resume", ret);
    }
}
