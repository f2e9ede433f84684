/*
 * Helpers shared by the C API test plugins (tests/c/capi_*.c): checks that
 * report and count failures, guest RAM from a sealed memfd, a tiny emitter
 * of 16-bit x86 code, real-mode vcpu setup, and a per-thread count of write
 * system calls (to tell a request sent to the VMM from an answer given by
 * the library's register cache).
 *
 * Everything is `static inline` so each plugin uses only what it needs.
 */
#ifndef CAPI_TEST_H
#define CAPI_TEST_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crosvm.h"

/* ------------------------------------------------------------------------ */
/* Checks. */

static int test_failures;
static pthread_mutex_t test_lock = PTHREAD_MUTEX_INITIALIZER;

static inline void test_fail(const char *file, int line, const char *what) {
  pthread_mutex_lock(&test_lock);
  test_failures++;
  fprintf(stderr, "%s:%d: check failed: %s\n", file, line, what);
  pthread_mutex_unlock(&test_lock);
}

#define CHECK(cond)                                 \
  do {                                              \
    if (!(cond)) test_fail(__FILE__, __LINE__, #cond); \
  } while (0)

/* Equality of two integers, printing both values on failure. */
#define CHECK_EQ(a, b)                                                      \
  do {                                                                      \
    unsigned long long check_a_ = (unsigned long long)(a);                  \
    unsigned long long check_b_ = (unsigned long long)(b);                  \
    if (check_a_ != check_b_) {                                             \
      char check_msg_[256];                                                 \
      snprintf(check_msg_, sizeof(check_msg_), "%s == %s (%#llx != %#llx)", \
               #a, #b, check_a_, check_b_);                                 \
      test_fail(__FILE__, __LINE__, check_msg_);                            \
    }                                                                       \
  } while (0)

/* A failure after which the plugin cannot go on. */
#define REQUIRE(cond)                                                \
  do {                                                               \
    if (!(cond)) {                                                   \
      test_fail(__FILE__, __LINE__, #cond);                          \
      fprintf(stderr, "%s: giving up after a required check\n", __FILE__); \
      exit(1);                                                       \
    }                                                                \
  } while (0)

/* Ends the plugin: status 0 only if no check failed. */
static inline int test_finish(const char *name) {
  pthread_mutex_lock(&test_lock);
  int failures = test_failures;
  pthread_mutex_unlock(&test_lock);
  if (failures) {
    fprintf(stderr, "%s: %d check(s) failed\n", name, failures);
    return 1;
  }
  printf("%s: all checks passed\n", name);
  fflush(stdout);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Guest RAM: a memfd sealed against shrinking (the VMM requires it), mapped
 * into the plugin so it can place code and inspect what the guest wrote. */

struct guest_ram {
  int fd;
  uint8_t *mem;
  size_t size;
};

static inline struct guest_ram guest_ram_new(size_t size) {
  struct guest_ram r = {.size = size};
  r.fd = memfd_create("guest_ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  REQUIRE(r.fd >= 0);
  REQUIRE(ftruncate(r.fd, (off_t)size) == 0);
  REQUIRE(fcntl(r.fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0);
  r.mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, r.fd, 0);
  REQUIRE(r.mem != MAP_FAILED);
  return r;
}

/* Real-mode interrupt vector `vector` -> 0000:handler. */
static inline void set_ivt(uint8_t *ram, unsigned vector, uint16_t handler) {
  ram[vector * 4 + 0] = handler & 0xff;
  ram[vector * 4 + 1] = handler >> 8;
  ram[vector * 4 + 2] = 0;
  ram[vector * 4 + 3] = 0;
}

/* Reads a guest byte the guest may be changing concurrently. */
static inline uint8_t guest_byte(const struct guest_ram *r, size_t addr) {
  return __atomic_load_n(&r->mem[addr], __ATOMIC_SEQ_CST);
}

/* Waits (polling, 1 ms steps) until guest byte `addr` equals `value`. Gives
 * up after 10 s: this only bounds a hang, it measures nothing. */
static inline int wait_guest_byte(const struct guest_ram *r, size_t addr, uint8_t value) {
  for (int i = 0; i < 10000; i++) {
    if (guest_byte(r, addr) == value) return 1;
    usleep(1000);
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* A minimal emitter of 16-bit (real mode) x86 code, written straight into
 * guest RAM. Encodings are given next to each function. */

struct asm16 {
  uint8_t *buf; /* guest RAM */
  uint16_t pc;  /* current guest address (segment 0) */
};

static inline void a_b(struct asm16 *a, uint8_t b) { a->buf[a->pc++] = b; }
static inline void a_w(struct asm16 *a, uint16_t w) {
  a_b(a, w & 0xff);
  a_b(a, w >> 8);
}
static inline void a_d(struct asm16 *a, uint32_t d) {
  a_w(a, d & 0xffff);
  a_w(a, d >> 16);
}

enum seg { SEG_NONE = 0, SEG_ES = 0x26, SEG_FS = 0x64, SEG_GS = 0x65 };
static inline void a_seg(struct asm16 *a, enum seg s) {
  if (s != SEG_NONE) a_b(a, s);
}

static inline void mov_dx(struct asm16 *a, uint16_t v) { a_b(a, 0xba); a_w(a, v); }          /* mov dx, imm16 */
static inline void mov_al(struct asm16 *a, uint8_t v) { a_b(a, 0xb0); a_b(a, v); }           /* mov al, imm8 */
static inline void mov_eax(struct asm16 *a, uint32_t v) { a_b(a, 0x66); a_b(a, 0xb8); a_d(a, v); } /* mov eax, imm32 */
static inline void mov_ebx(struct asm16 *a, uint32_t v) { a_b(a, 0x66); a_b(a, 0xbb); a_d(a, v); } /* mov ebx, imm32 */
static inline void mov_ecx(struct asm16 *a, uint32_t v) { a_b(a, 0x66); a_b(a, 0xb9); a_d(a, v); } /* mov ecx, imm32 */
static inline void mov_eax_esi(struct asm16 *a) { a_b(a, 0x66); a_b(a, 0x89); a_b(a, 0xf0); } /* mov eax, esi */
static inline void mov_eax_ecx(struct asm16 *a) { a_b(a, 0x66); a_b(a, 0x89); a_b(a, 0xc8); } /* mov eax, ecx */
static inline void mov_eax_dr0(struct asm16 *a) { a_b(a, 0x0f); a_b(a, 0x21); a_b(a, 0xc0); } /* mov eax, dr0 */
/* fnstcw [disp16] (store the x87 control word) */
static inline void fnstcw(struct asm16 *a, uint16_t disp) { a_b(a, 0xd9); a_b(a, 0x3e); a_w(a, disp); }
static inline void out_dx_al(struct asm16 *a) { a_b(a, 0xee); }                 /* out dx, al */
static inline void out_dx_ax(struct asm16 *a) { a_b(a, 0xef); }                 /* out dx, ax */
static inline void out_dx_eax(struct asm16 *a) { a_b(a, 0x66); a_b(a, 0xef); }  /* out dx, eax */
static inline void in_al_dx(struct asm16 *a) { a_b(a, 0xec); }                  /* in al, dx */
static inline void out_imm_al(struct asm16 *a, uint8_t port) { a_b(a, 0xe6); a_b(a, port); } /* out imm8, al */
static inline void rdtscp(struct asm16 *a) { a_b(a, 0x0f); a_b(a, 0x01); a_b(a, 0xf9); }
static inline void rdmsr(struct asm16 *a) { a_b(a, 0x0f); a_b(a, 0x32); }
static inline void cpuid(struct asm16 *a) { a_b(a, 0x0f); a_b(a, 0xa2); }
static inline void ud2(struct asm16 *a) { a_b(a, 0x0f); a_b(a, 0x0b); }
static inline void hlt(struct asm16 *a) { a_b(a, 0xf4); }
static inline void cli(struct asm16 *a) { a_b(a, 0xfa); }
static inline void sti(struct asm16 *a) { a_b(a, 0xfb); }
static inline void iret(struct asm16 *a) { a_b(a, 0xcf); }
static inline void push_ax(struct asm16 *a) { a_b(a, 0x50); }
static inline void push_dx(struct asm16 *a) { a_b(a, 0x52); }
static inline void pop_ax(struct asm16 *a) { a_b(a, 0x58); }
static inline void pop_dx(struct asm16 *a) { a_b(a, 0x5a); }
/* mov eax, seg:[disp16] */
static inline void load_eax(struct asm16 *a, enum seg s, uint16_t disp) {
  a_seg(a, s); a_b(a, 0x66); a_b(a, 0xa1); a_w(a, disp);
}
/* mov ax, seg:[disp16] */
static inline void load_ax(struct asm16 *a, enum seg s, uint16_t disp) {
  a_seg(a, s); a_b(a, 0xa1); a_w(a, disp);
}
/* mov al, seg:[disp16] */
static inline void load_al(struct asm16 *a, enum seg s, uint16_t disp) {
  a_seg(a, s); a_b(a, 0xa0); a_w(a, disp);
}
/* mov seg:[disp16], al */
static inline void store_al(struct asm16 *a, enum seg s, uint16_t disp) {
  a_seg(a, s); a_b(a, 0xa2); a_w(a, disp);
}
/* mov byte seg:[disp16], imm8 */
static inline void store8(struct asm16 *a, enum seg s, uint16_t disp, uint8_t v) {
  a_seg(a, s); a_b(a, 0xc6); a_b(a, 0x06); a_w(a, disp); a_b(a, v);
}
/* mov word seg:[disp16], imm16 */
static inline void store16(struct asm16 *a, enum seg s, uint16_t disp, uint16_t v) {
  a_seg(a, s); a_b(a, 0xc7); a_b(a, 0x06); a_w(a, disp); a_w(a, v);
}
/* mov dword seg:[disp16], imm32 */
static inline void store32(struct asm16 *a, enum seg s, uint16_t disp, uint32_t v) {
  a_seg(a, s); a_b(a, 0x66); a_b(a, 0xc7); a_b(a, 0x06); a_w(a, disp); a_d(a, v);
}
/* inc byte [disp16] */
static inline void inc8(struct asm16 *a, uint16_t disp) { a_b(a, 0xfe); a_b(a, 0x06); a_w(a, disp); }
/* cmp byte [disp16], imm8 */
static inline void cmp8(struct asm16 *a, uint16_t disp, uint8_t v) {
  a_b(a, 0x80); a_b(a, 0x3e); a_w(a, disp); a_b(a, v);
}
/* Short jumps to an address already emitted (backward). */
enum cond { JB = 0x72, JAE = 0x73, JE = 0x74, JNE = 0x75, JMP = 0xeb };
static inline void jump_back(struct asm16 *a, enum cond c, uint16_t target) {
  int disp = (int)target - (int)(a->pc + 2);
  REQUIRE(disp >= -128 && disp < 0);
  a_b(a, c);
  a_b(a, (uint8_t)(int8_t)disp);
}
/* A forward short jump; returns the position to patch with `land`. */
static inline uint16_t jump_fwd(struct asm16 *a, enum cond c) {
  a_b(a, c);
  a_b(a, 0);
  return a->pc;
}
static inline void land(struct asm16 *a, uint16_t after_jump) {
  int disp = (int)a->pc - (int)after_jump;
  REQUIRE(disp >= 0 && disp < 128);
  a->buf[after_jump - 1] = (uint8_t)disp;
}

/* Writes `value` to port `port` with an 8-bit access. */
static inline void out8(struct asm16 *a, uint16_t port, uint8_t value) {
  mov_dx(a, port);
  mov_al(a, value);
  out_dx_al(a);
}

/* Sleeps with interrupts enabled until byte [flag] >= value. The
 * cli/check/sti;hlt pattern cannot miss an interrupt (sti delays interrupts
 * by one instruction, so none can slip in between the check and hlt). */
static inline void wait_flag_irq(struct asm16 *a, uint16_t flag, uint8_t value) {
  uint16_t top = a->pc;
  cli(a);
  cmp8(a, flag, value);
  uint16_t done = jump_fwd(a, JAE);
  sti(a);
  hlt(a);
  jump_back(a, JMP, top);
  land(a, done);
  sti(a);
}

/* ------------------------------------------------------------------------ */
/* Vcpu setup. */

/* At Init: 16-bit real mode at 0000:ip with the stack at 0000:sp, runnable
 * (application processors start waiting for a SIPI). Extra segment bases
 * (0 = none) are for reaching addresses above 1 MiB. */
static inline void enter_real_mode(struct crosvm_vcpu *vcpu, uint16_t ip, uint16_t sp,
                                   uint64_t es_base, uint64_t fs_base, uint64_t gs_base) {
  struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
  CHECK_EQ(crosvm_vcpu_set_mp_state(vcpu, &mp), 0);
  struct kvm_sregs sregs;
  REQUIRE(crosvm_vcpu_get_sregs(vcpu, &sregs) == 0);
  struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
  for (unsigned i = 0; i < sizeof(segs) / sizeof(segs[0]); i++) {
    segs[i]->base = 0;
    segs[i]->selector = 0;
  }
  sregs.es.base = es_base;
  sregs.fs.base = fs_base;
  sregs.gs.base = gs_base;
  CHECK_EQ(crosvm_vcpu_set_sregs(vcpu, &sregs), 0);
  struct kvm_regs regs;
  REQUIRE(crosvm_vcpu_get_regs(vcpu, &regs) == 0);
  regs.rip = ip;
  regs.rsp = sp;
  regs.rflags = 2;
  CHECK_EQ(crosvm_vcpu_set_regs(vcpu, &regs), 0);
}

/* Waits for the next vcpu event; any error ends the plugin. */
static inline void wait_event(struct crosvm_vcpu *vcpu, struct crosvm_vcpu_event *evt) {
  int ret = crosvm_vcpu_wait(vcpu, evt);
  if (ret) {
    fprintf(stderr, "crosvm_vcpu_wait: %d\n", ret);
    exit(1);
  }
}

/* Waits for an IO event at `addr` of `space`; anything else ends the plugin
 * (every event of these guests is predictable). */
static inline void expect_io(struct crosvm_vcpu *vcpu, struct crosvm_vcpu_event *evt,
                             uint32_t space, uint64_t addr, int is_write) {
  wait_event(vcpu, evt);
  if (evt->kind != CROSVM_VCPU_EVENT_KIND_IO_ACCESS || evt->io_access.address_space != space ||
      evt->io_access.address != addr || evt->io_access.is_write != is_write) {
    fprintf(stderr,
            "expected io %s at %u:%#" PRIx64 ", got kind %u (space %u, address %#" PRIx64
            ", write %u)\n",
            is_write ? "write" : "read", space, addr, evt->kind,
            evt->kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS ? evt->io_access.address_space : 0,
            evt->kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS ? evt->io_access.address : 0,
            evt->kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS ? evt->io_access.is_write : 0);
    exit(1);
  }
}

/* Little-endian value of an io event's data. */
static inline uint64_t io_value(const struct crosvm_vcpu_event *evt) {
  uint64_t v = 0;
  for (uint32_t i = 0; i < evt->io_access.length && i < 8; i++)
    v |= (uint64_t)evt->io_access.data[i] << (8 * i);
  return v;
}

/* ------------------------------------------------------------------------ */
/* Per-thread write system calls so far (from /proc/thread-self/io). Every
 * request the library sends to the VMM is one write; an answer from the
 * register cache is none. */
static inline long thread_syscw(void) {
  FILE *f = fopen("/proc/thread-self/io", "re");
  REQUIRE(f != NULL);
  char line[128];
  long value = -1;
  while (fgets(line, sizeof(line), f)) {
    if (sscanf(line, "syscw: %ld", &value) == 1) break;
  }
  fclose(f);
  REQUIRE(value >= 0);
  return value;
}

/* Exits with status 1 if the VMM shuts the VM down (e.g. a vcpu died), so a
 * broken guest fails the test with a message instead of a timeout. */
static inline void *shutdown_watcher(void *arg) {
  int fd = *(int *)arg;
  uint64_t v;
  if (read(fd, &v, sizeof(v)) == sizeof(v)) {
    fprintf(stderr, "the VMM shut the VM down unexpectedly\n");
    _exit(1);
  }
  return NULL;
}

static inline void watch_shutdown(struct crosvm *crosvm) {
  static int fd;
  fd = crosvm_get_shutdown_eventfd(crosvm);
  REQUIRE(fd >= 0);
  pthread_t t;
  REQUIRE(pthread_create(&t, NULL, shutdown_watcher, &fd) == 0);
  pthread_detach(t);
}

/* Non-blocking read of an eventfd counter (0 when not signalled). */
static inline uint64_t eventfd_take(int fd) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  if (poll(&p, 1, 0) != 1) return 0;
  uint64_t v = 0;
  REQUIRE(read(fd, &v, sizeof(v)) == sizeof(v));
  return v;
}

#endif /* CAPI_TEST_H */
