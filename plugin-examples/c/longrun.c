/*
 * longrun_c: the longrun machine (src/bin/longrun.rs) written in C against
 * crosvm.h and the extensions of crosvm_ext.h: the same guest bytes (the
 * test longrun_c_guest_bytes_equal_the_assembler_output checks them
 * against the Rust assembler's), the same accumulator device, the same
 * output lines, and the same part in snapshots (docs/protocol-extensions.md
 * section 6): a control thread answers SAVE_STATE with the device state
 * (acc, fold, x; the same 19-byte layout as the Rust plugin's) and the
 * custom command `state` with it as JSON; under vmm --restore the device
 * state from the snapshot is loaded before crosvm_start.
 *
 * Hot restart (section 9), as longrun: the plugin declares it can be
 * replaced and commits its device state to a checkpoint at every exit,
 * tagged with the exit's serial, before resuming it. A plugin started to
 * replace it (vmm ctl S upgrade, or after a crash under --on-plugin-crash
 * restart) takes over guest memory, loads the device from the old
 * plugin's SAVE_STATE blob (upgrade) or the checkpoint (crash), and
 * answers an exit the checkpoint already covers without its effects (the
 * old plugin applied it and died before resuming it). It prints its build
 * mark on stderr (`longrun_c build ...`): tests patch it to tell binaries
 * apart. For tests, LONGRUN_C_DIE_AFTER_COMMIT=S makes it SIGKILL itself
 * right after committing exit S, before resuming it: the worst moment, the
 * one whose exit the replacing plugin must not apply twice.
 *
 * Live migration (section 8), as longrun: `longrun_c N load` adds a writing
 * load of the plugin's own. A writer thread writes its sequence number into
 * one of 64 pages of an extra region (at LOAD_GPA) every 200 us, through a
 * crosvm_write_tracker; the control thread answers DIRTY_PAGES from the
 * tracker. The load's lock covers each write and the load's state (its
 * sequence number and what it last wrote to each page): SAVE_STATE sets
 * `frozen` under it, so no write happens between the state handed over and
 * RESUMED. That state follows the device's in the device state (the same
 * layout as longrun's), so a migration's target or a restored snapshot
 * goes on where the source stopped. The writer starts at the vcpu's Init;
 * a restored load first checks every page holds what its state says the
 * load last wrote there, and every page is checked again at the end (exit
 * 1 naming the page otherwise). The result stays a function of N. Only
 * the plain machine (no `load`) declares itself restartable.
 *
 * longrun_c [N [load]]: N rounds of 4,096 steps (1..=100000, default 20).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crosvm.h"
#include "crosvm_ext.h"

#define ACC_PORT 0x620
#define PROGRESS_PORT 0x624
#define RESULT_PORT 0x628
#define SHUTDOWN_PORT 0x501
#define MEM_SIZE 0x10000
#define CODE 0x1000
#define HANDLER 0x1800
#define TICKS 0x3000
#define ROUNDS 0x3014
#define STACK 0xfff0
#define APIC_LVT0 0x350
#define LVT_EXTINT 0x700u
#define STATE_VERSION 1
#define STATE_LEN 19
#define LOAD_GPA ((uint64_t)0x100000)
#define LOAD_PAGES 64
#define PAGE_SIZE 4096
#define LOAD_PAUSE_US 200 /* about 5,000 writes a second */
#define LOAD_LEN (8 + 8 * LOAD_PAGES)

/* The guest's main program (real mode, at CODE): the output of
 * plugin_examples::longrun::guest_main(). */
static const uint8_t guest_main[] = {
  0xfa, 0xc7, 0x06, 0x20, 0x00, 0x00, 0x18, 0xc7, 0x06, 0x22, 0x00, 0x00,
  0x00, 0xb0, 0x11, 0xe6, 0x20, 0xb0, 0x08, 0xe6, 0x21, 0xb0, 0x04, 0xe6,
  0x21, 0xb0, 0x01, 0xe6, 0x21, 0xb0, 0xfe, 0xe6, 0x21, 0xb0, 0x11, 0xe6,
  0xa0, 0xb0, 0x70, 0xe6, 0xa1, 0xb0, 0x02, 0xe6, 0xa1, 0xb0, 0x01, 0xe6,
  0xa1, 0xb0, 0xff, 0xe6, 0xa1, 0xb0, 0x34, 0xe6, 0x43, 0xb0, 0xa9, 0xe6,
  0x40, 0xb0, 0x04, 0xe6, 0x40, 0xfb, 0x66, 0x31, 0xdb, 0x66, 0x69, 0xc3,
  0xb9, 0x79, 0x37, 0x9e, 0x66, 0x67, 0x89, 0x04, 0x9d, 0x00, 0x40, 0x00,
  0x00, 0x66, 0x43, 0x66, 0x81, 0xfb, 0x00, 0x10, 0x00, 0x00, 0x72, 0xe5,
  0x66, 0xbe, 0x78, 0x56, 0x34, 0x12, 0x66, 0x31, 0xff, 0x66, 0xc7, 0x06,
  0x10, 0x30, 0x00, 0x00, 0x00, 0x00, 0x66, 0xb9, 0x00, 0x10, 0x00, 0x00,
  0x66, 0x89, 0xf0, 0x66, 0xc1, 0xe0, 0x0d, 0x66, 0x31, 0xc6, 0x66, 0x89,
  0xf0, 0x66, 0xc1, 0xe8, 0x11, 0x66, 0x31, 0xc6, 0x66, 0x89, 0xf0, 0x66,
  0xc1, 0xe0, 0x05, 0x66, 0x31, 0xc6, 0x66, 0x89, 0xf3, 0x66, 0x81, 0xe3,
  0xff, 0x0f, 0x00, 0x00, 0x66, 0x89, 0xf0, 0x66, 0x01, 0xf8, 0x66, 0x67,
  0x31, 0x04, 0x9d, 0x00, 0x40, 0x00, 0x00, 0x66, 0x47, 0x66, 0xf7, 0xc7,
  0x3f, 0x00, 0x00, 0x00, 0x75, 0x1b, 0x66, 0x67, 0x8b, 0x04, 0x9d, 0x00,
  0x40, 0x00, 0x00, 0xba, 0x20, 0x06, 0x66, 0xef, 0x66, 0xed, 0x66, 0x31,
  0xc6, 0x75, 0x06, 0x66, 0xbe, 0x01, 0x00, 0x00, 0x00, 0x66, 0x49, 0x75,
  0x9f, 0x66, 0xa1, 0x10, 0x30, 0x66, 0x40, 0x66, 0xa3, 0x10, 0x30, 0xba,
  0x24, 0x06, 0x66, 0xef, 0x66, 0x3b, 0x06, 0x14, 0x30, 0x72, 0x83, 0x66,
  0x31, 0xc0, 0x66, 0x31, 0xdb, 0x66, 0xc1, 0xc0, 0x05, 0x66, 0x67, 0x03,
  0x04, 0x9d, 0x00, 0x40, 0x00, 0x00, 0x66, 0x43, 0x66, 0x81, 0xfb, 0x00,
  0x10, 0x00, 0x00, 0x72, 0xe8, 0xba, 0x28, 0x06, 0x66, 0xef, 0x66, 0x89,
  0xf0, 0xba, 0x2c, 0x06, 0x66, 0xef, 0xfa, 0xba, 0x01, 0x05, 0xee, 0xf4,
};

/* The IRQ0 handler (at HANDLER): plugin_examples::longrun::guest_handler(). */
static const uint8_t guest_handler[] = {
  0x50, 0x66, 0xff, 0x06, 0x00, 0x30, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf,
};

/* The accumulator device and the result pieces seen so far, shared by the
 * vcpu thread and the control thread. */
static struct {
  pthread_mutex_t lock;
  uint64_t acc;
  int has_fold, has_x;
  uint32_t fold, x;
} dev = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0};

/* The load (`load`): its region, its tracker and its state, shared by the
 * writer, the control thread and main. `lock` is held for every write and
 * the state update that goes with it; while `frozen` (SAVE_STATE to
 * RESUMED) the writer waits on `thawed`. */
static struct {
  pthread_mutex_t lock;
  pthread_cond_t thawed;
  int on, started, frozen, stop, error;
  pthread_t writer;
  uint8_t *mem; /* the plugin's mapping of the region */
  struct crosvm_write_tracker *tracker;
  uint64_t seq;
  uint64_t last[LOAD_PAGES];
} load = {.lock = PTHREAD_MUTEX_INITIALIZER, .thawed = PTHREAD_COND_INITIALIZER};

static int fail(const char *what, int ret) {
  fprintf(stderr, "longrun_c: %s failed: %s\n", what, strerror(-ret));
  return 1;
}

static uint32_t dword(const uint8_t *data, uint32_t len) {
  uint8_t b[4] = {0};
  memcpy(b, data, len < 4 ? len : 4);
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64(const volatile uint8_t *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v |= (uint64_t)p[i] << (8 * i);
  return v;
}

/* The blob: version, acc (LE), then fold and x as a presence byte and a
 * little-endian dword. Called with dev.lock held. */
static void save_state(uint8_t out[STATE_LEN]) {
  out[0] = STATE_VERSION;
  for (int i = 0; i < 8; i++)
    out[1 + i] = (uint8_t)(dev.acc >> (8 * i));
  out[9] = (uint8_t)dev.has_fold;
  put32(out + 10, dev.has_fold ? dev.fold : 0);
  out[14] = (uint8_t)dev.has_x;
  put32(out + 15, dev.has_x ? dev.x : 0);
}

/* Loads a blob save_state made; 0, or -1 naming the problem. */
static int restore_state(const uint8_t *blob, size_t len) {
  if (len != STATE_LEN) {
    fprintf(stderr, "longrun_c: the saved device state is %zu bytes, expected %d\n", len,
            STATE_LEN);
    return -1;
  }
  if (blob[0] != STATE_VERSION) {
    fprintf(stderr, "longrun_c: the saved device state has version %u, this plugin reads %d\n",
            blob[0], STATE_VERSION);
    return -1;
  }
  uint32_t fold = dword(blob + 10, 4), x = dword(blob + 15, 4);
  if (blob[9] > 1 || blob[14] > 1 || (!blob[9] && fold) || (!blob[14] && x)) {
    fprintf(stderr, "longrun_c: the saved device state has bad presence bytes\n");
    return -1;
  }
  uint64_t acc = 0;
  for (int i = 0; i < 8; i++)
    acc |= (uint64_t)blob[1 + i] << (8 * i);
  dev.acc = acc;
  dev.has_fold = blob[9];
  dev.fold = fold;
  dev.has_x = blob[14];
  dev.x = x;
  return 0;
}

/* The load's part of the device state: seq, then last[0..LOAD_PAGES], each
 * little-endian. Called with load.lock held. */
static void save_load(uint8_t out[LOAD_LEN]) {
  put64(out, load.seq);
  for (int p = 0; p < LOAD_PAGES; p++)
    put64(out + 8 + 8 * p, load.last[p]);
}

/* The whole device state: the device's, then the load's when there is one
 * (so a machine without a load saves what it always did); returns its
 * length. Freezes the load: nothing is written until RESUMED. */
static size_t save_machine(uint8_t out[STATE_LEN + LOAD_LEN]) {
  pthread_mutex_lock(&load.lock);
  load.frozen = 1;
  pthread_mutex_lock(&dev.lock);
  save_state(out);
  pthread_mutex_unlock(&dev.lock);
  if (load.on)
    save_load(out + STATE_LEN);
  pthread_mutex_unlock(&load.lock);
  return STATE_LEN + (load.on ? LOAD_LEN : 0);
}

/* Loads a blob save_machine made (before crosvm_start); 0, or -1 naming
 * the problem. */
static int restore_machine(const uint8_t *blob, size_t len) {
  size_t rest = len > STATE_LEN ? len - STATE_LEN : 0;
  if (restore_state(blob, len - rest))
    return -1;
  if (load.on && rest == LOAD_LEN) {
    load.seq = get64(blob + STATE_LEN);
    for (int p = 0; p < LOAD_PAGES; p++)
      load.last[p] = get64(blob + STATE_LEN + 8 + 8 * p);
    return 0;
  }
  if (!load.on && rest == 0)
    return 0;
  if (rest == 0)
    fprintf(stderr, "longrun_c: the saved machine had no load (run without `load`)\n");
  else if (!load.on && rest == LOAD_LEN)
    fprintf(stderr, "longrun_c: the saved machine had a load (run with `load`)\n");
  else
    fprintf(stderr, "longrun_c: %zu bytes of load state, expected %d (with `load`) or none\n",
            rest, LOAD_LEN);
  return -1;
}

/* The page write number seq goes to (a fixed scatter, longrun's). */
static unsigned load_page(uint64_t seq) {
  return (unsigned)((seq * 0x9e3779b97f4a7c15ull) >> 58) % LOAD_PAGES;
}

/* The load's writer: until load.stop, its next sequence number into its
 * next page, through the tracker; waits while frozen. */
static void *load_loop(void *arg) {
  (void)arg;
  pthread_mutex_lock(&load.lock);
  while (!load.stop) {
    if (load.frozen) {
      pthread_cond_wait(&load.thawed, &load.lock);
      continue;
    }
    uint64_t seq = ++load.seq;
    unsigned page = load_page(seq);
    uint64_t offset = (uint64_t)page * PAGE_SIZE;
    uint8_t b[8];
    put64(b, seq);
    int ret =
        crosvm_write_tracker_write(load.tracker, load.mem + offset, LOAD_GPA + offset, b, 8);
    if (ret) {
      fail("crosvm_write_tracker_write (the load)", ret);
      load.error = 1;
      break;
    }
    load.last[page] = seq;
    pthread_mutex_unlock(&load.lock);
    usleep(LOAD_PAUSE_US);
    pthread_mutex_lock(&load.lock);
  }
  pthread_mutex_unlock(&load.lock);
  return NULL;
}

/* The load's region (before the restore state is asked for: a migration's
 * memory arrives first), mapped at load.mem, and its tracker. */
static int set_up_load(struct crosvm *crosvm) {
  size_t size = LOAD_PAGES * PAGE_SIZE;
  int fd = memfd_create("load_mem", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0 || ftruncate(fd, (off_t)size) ||
      fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)) {
    perror("longrun_c: memfd of the load");
    return 1;
  }
  load.mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (load.mem == MAP_FAILED) {
    perror("longrun_c: mmap of the load");
    return 1;
  }
  struct crosvm_memory *obj;
  int ret = crosvm_create_memory(crosvm, fd, 0, size, LOAD_GPA, false, false, &obj);
  if (ret)
    return fail("crosvm_create_memory (the load)", ret);
  return 0;
}

/* Checks every page holds what the load last wrote there (the writer not
 * running); 0, or 1 naming the page. */
static int check_load(const char *when) {
  for (int p = 0; p < LOAD_PAGES; p++) {
    uint64_t got = get64(load.mem + (size_t)p * PAGE_SIZE);
    if (got != load.last[p]) {
      fprintf(stderr,
              "longrun_c: %s, load page %d (guest 0x%" PRIx64 ") holds 0x%" PRIx64
              ", the load last wrote 0x%" PRIx64 " there\n",
              when, p, LOAD_GPA + (uint64_t)p * PAGE_SIZE, got, load.last[p]);
      return 1;
    }
  }
  fprintf(stderr, "longrun_c: %s, load: %" PRIu64 " writes, every page holds its last\n", when,
          load.seq);
  return 0;
}

/* Starts the writer, at the vcpu's Init: memory is back by then (a
 * migration's before the restore state was answered, a snapshot's after
 * crosvm_start, before the vcpu exists). A restored load first checks its
 * pages: every write its state accounts for is in them, before the writer
 * overwrites any page again. */
static int start_load(int restored) {
  if (load.started)
    return 0;
  if (restored && check_load("restored"))
    return 1;
  if (pthread_create(&load.writer, NULL, load_loop, NULL)) {
    fprintf(stderr, "longrun_c: cannot start the load's writer\n");
    return 1;
  }
  load.started = 1;
  return 0;
}

/* Stops the writer and checks the pages. */
static int finish_load(void) {
  if (!load.started)
    return 0;
  pthread_mutex_lock(&load.lock);
  load.stop = 1;
  pthread_cond_broadcast(&load.thawed);
  pthread_mutex_unlock(&load.lock);
  pthread_join(load.writer, NULL);
  return load.error || check_load("at the end");
}

/* The `state` command's answer. Called with dev.lock held. */
static void state_json(char *out, size_t len) {
  char fold[16] = "null", x[16] = "null";
  if (dev.has_fold)
    snprintf(fold, sizeof(fold), "%" PRIu32, dev.fold);
  if (dev.has_x)
    snprintf(x, sizeof(x), "%" PRIu32, dev.x);
  snprintf(out, len, "{\"acc\": \"0x%016" PRIx64 "\", \"fold\": %s, \"x\": %s}", dev.acc, fold,
           x);
}

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
    if (cmd.kind == CROSVM_CONTROL_SAVE_STATE) {
      uint8_t blob[STATE_LEN + LOAD_LEN];
      ret = crosvm_control_reply_state(ctl, cmd.id, blob, save_machine(blob));
    } else if (cmd.kind == CROSVM_CONTROL_DIRTY_PAGES) {
      /* What the load wrote since the last one (without it: none; only
       * the guest writes guest memory once the VM started). */
      ret = crosvm_control_reply_tracked_pages(ctl, cmd.id, load.tracker);
    } else if (cmd.kind == CROSVM_CONTROL_RESUMED) {
      pthread_mutex_lock(&load.lock);
      load.frozen = 0;
      pthread_cond_broadcast(&load.thawed);
      pthread_mutex_unlock(&load.lock);
      continue; /* no reply expected */
    } else if (cmd.kind == CROSVM_CONTROL_CUSTOM && strcmp(cmd.name, "state") == 0) {
      char json[128];
      pthread_mutex_lock(&dev.lock);
      state_json(json, sizeof(json));
      pthread_mutex_unlock(&dev.lock);
      ret = crosvm_control_reply(ctl, cmd.id, json);
    } else {
      ret = crosvm_control_reply_error(ctl, cmd.id, ENOTSUP,
                                       "longrun knows only the command `state`");
    }
    if (ret) {
      fail("crosvm_control_reply", ret);
      break;
    }
  }
  crosvm_control_close(&ctl);
  return NULL;
}

/* Real mode at 0:CODE with the stack at 0:STACK, runnable, and LINT0 in
 * ExtINT mode so the PIC's interrupts reach the vcpu. */
static int init_vcpu(struct crosvm_vcpu *vcpu) {
  struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
  int ret = crosvm_vcpu_set_mp_state(vcpu, &mp);
  if (ret)
    return fail("crosvm_vcpu_set_mp_state", ret);
  struct kvm_sregs sregs;
  ret = crosvm_vcpu_get_sregs(vcpu, &sregs);
  if (ret)
    return fail("crosvm_vcpu_get_sregs", ret);
  struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.ss, &sregs.fs, &sregs.gs};
  for (size_t i = 0; i < sizeof(segs) / sizeof(segs[0]); i++) {
    segs[i]->base = 0;
    segs[i]->selector = 0;
  }
  ret = crosvm_vcpu_set_sregs(vcpu, &sregs);
  if (ret)
    return fail("crosvm_vcpu_set_sregs", ret);
  struct kvm_regs regs;
  ret = crosvm_vcpu_get_regs(vcpu, &regs);
  if (ret)
    return fail("crosvm_vcpu_get_regs", ret);
  regs.rip = CODE;
  regs.rsp = STACK;
  regs.rflags = 2;
  ret = crosvm_vcpu_set_regs(vcpu, &regs);
  if (ret)
    return fail("crosvm_vcpu_set_regs", ret);
  struct kvm_lapic_state lapic;
  ret = crosvm_vcpu_get_lapic_state(vcpu, &lapic);
  if (ret)
    return fail("crosvm_vcpu_get_lapic_state", ret);
  for (int i = 0; i < 4; i++)
    lapic.regs[APIC_LVT0 + i] = (char)(uint8_t)(LVT_EXTINT >> (8 * i));
  ret = crosvm_vcpu_set_lapic_state(vcpu, &lapic);
  if (ret)
    return fail("crosvm_vcpu_set_lapic_state", ret);
  return 0;
}

static int usage(const char *problem) {
  fprintf(stderr,
          "longrun_c: %s\nusage: vmm --plugin longrun_c [--plugin-args N [load]]"
          "   (rounds of 4,096 steps, 1..=100000; default 20; load: a writing load of the"
          " plugin's own)\n",
          problem);
  return 2;
}

/* This build's mark, printed at start (tests patch the digits in a copy of
 * the binary to get "a changed version"). */
static const char build_mark[] = "longrun_c-build-00000001";

/* A fresh boot: guest memory with the program in it (its memfd in
 * *mem_fd, mapped at *mem), the device's ports and the PC's interrupt
 * routes. */
static int set_up(struct crosvm *crosvm, unsigned long rounds, int *mem_fd, uint8_t **mem) {
  *mem_fd = memfd_create("guest_mem", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (*mem_fd < 0 || ftruncate(*mem_fd, MEM_SIZE) ||
      fcntl(*mem_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)) {
    perror("longrun_c: memfd");
    return 1;
  }
  *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, *mem_fd, 0);
  if (*mem == MAP_FAILED) {
    perror("longrun_c: mmap");
    return 1;
  }
  memcpy(*mem + CODE, guest_main, sizeof(guest_main));
  memcpy(*mem + HANDLER, guest_handler, sizeof(guest_handler));
  put32(*mem + ROUNDS, (uint32_t)rounds);

  /* The first object this plugin creates: id 0 (take_over relies on it). */
  struct crosvm_memory *mem_obj;
  int ret = crosvm_create_memory(crosvm, *mem_fd, 0, MEM_SIZE, 0, false, false, &mem_obj);
  if (ret)
    return fail("crosvm_create_memory", ret);
  static const struct {
    uint64_t start, length;
  } ranges[] = {{ACC_PORT, 4}, {PROGRESS_PORT, 4}, {RESULT_PORT, 8}, {SHUTDOWN_PORT, 1}};
  for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
    ret = crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, ranges[i].start,
                               ranges[i].length);
    if (ret)
      return fail("crosvm_reserve_range", ret);
  }
  /* The PC's wiring: ISA IRQs on the PICs and the IOAPIC, IRQ 0 on pin 2. */
  struct crosvm_irq_route routes[32];
  memset(routes, 0, sizeof(routes));
  for (uint32_t irq = 0; irq < 16; irq++) {
    routes[2 * irq].irq_id = irq;
    routes[2 * irq].kind = CROSVM_IRQ_ROUTE_IRQCHIP;
    routes[2 * irq].irqchip.irqchip = irq < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE;
    routes[2 * irq].irqchip.pin = irq & 7;
    routes[2 * irq + 1].irq_id = irq;
    routes[2 * irq + 1].kind = CROSVM_IRQ_ROUTE_IRQCHIP;
    routes[2 * irq + 1].irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
    routes[2 * irq + 1].irqchip.pin = irq == 0 ? 2 : irq;
  }
  ret = crosvm_set_irq_routing(crosvm, 32, routes);
  if (ret)
    return fail("crosvm_set_irq_routing", ret);
  return 0;
}

/* A replacing plugin: guest memory from the host (object 0, the memory
 * set_up created: object ids count from 0 in creation order, docs/c-api.md
 * section 9.2), mapped at *mem; the device from the old plugin's blob
 * (upgrade) or the checkpoint (crash). *covered: the exit serial the
 * device state covers; seen: the exits the guest saw answered. */
static int take_over(struct crosvm_attached *attached, const struct crosvm_checkpoint *ckpt,
                     uint64_t seen, uint8_t **mem, uint64_t *covered) {
  struct crosvm_memory *mem_obj;
  int mem_fd;
  int ret = crosvm_attached_take_memory(attached, 0, &mem_obj, &mem_fd);
  if (ret)
    return fail("crosvm_attached_take_memory (the guest memory)", ret);
  *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
  if (*mem == MAP_FAILED) {
    perror("longrun_c: mmap of the guest memory taken over");
    return 1;
  }
  *covered = 0;
  if (crosvm_attached_kind(attached) == CROSVM_RESTART_UPGRADE) {
    const uint8_t *state;
    size_t len;
    ret = crosvm_attached_state(attached, &state, &len);
    if (ret)
      return fail("crosvm_attached_state", ret);
    if (restore_state(state, len))
      return 1;
    *covered = seen;
  } else {
    uint8_t blob[64];
    size_t len;
    ret = crosvm_checkpoint_load(ckpt, covered, blob, sizeof(blob), &len);
    if (ret < 0)
      return fail("crosvm_checkpoint_load", ret);
    if (ret == 1 && restore_state(blob, len))
      return 1;
  }
  /* The checkpoint is written before every resume: it covers every exit
   * the guest saw answered, and at most the one re-delivered. */
  if (*covered < seen || *covered > seen + 1) {
    fprintf(stderr,
            "longrun_c: the device state covers exit %" PRIu64 ", but the guest saw %" PRIu64
            " exits answered: it does not match the guest\n",
            *covered, seen);
    return 1;
  }
  return 0;
}

/* LONGRUN_C_DIE_AFTER_COMMIT (0: never). */
static uint64_t die_after_commit;

/* Commits the device state as of the vcpu's current exit, before it is
 * resumed. */
static int commit(struct crosvm_checkpoint *ckpt, struct crosvm_vcpu *vcpu) {
  uint64_t serial;
  int ret = crosvm_vcpu_serial(vcpu, &serial);
  if (ret)
    return fail("crosvm_vcpu_serial", ret);
  uint8_t blob[STATE_LEN];
  pthread_mutex_lock(&dev.lock);
  save_state(blob);
  pthread_mutex_unlock(&dev.lock);
  ret = crosvm_checkpoint_commit(ckpt, serial, blob, sizeof(blob));
  if (ret)
    return fail("crosvm_checkpoint_commit", ret);
  if (serial == die_after_commit) {
    fprintf(stderr, "longrun_c: dying after the commit of exit %" PRIu64 "\n", serial);
    raise(SIGKILL);
  }
  return 0;
}

/* The accumulator's answer to a read, into the event's data. */
static void answer_read(struct crosvm_vcpu_event *evt) {
  uint8_t b[4];
  pthread_mutex_lock(&dev.lock);
  put32(b, (uint32_t)(dev.acc >> 16));
  pthread_mutex_unlock(&dev.lock);
  memcpy(evt->io_access.data, b, evt->io_access.length < 4 ? evt->io_access.length : 4);
}

int main(int argc, char **argv) {
  unsigned long rounds = 20;
  if (argc > 3)
    return usage("expected at most two arguments");
  if (argc == 3 && strcmp(argv[2], "load"))
    return usage("the second argument can only be `load`");
  load.on = argc == 3;
  if (argc >= 2) {
    char *end;
    errno = 0;
    rounds = strtoul(argv[1], &end, 10);
    if (errno || end == argv[1] || *end || argv[1][0] == '-' || rounds < 1 || rounds > 100000)
      return usage("N must be 1..=100000");
  }
  const char *die = getenv("LONGRUN_C_DIE_AFTER_COMMIT");
  if (die)
    die_after_commit = strtoull(die, NULL, 10);
  struct crosvm *crosvm;
  int ret = crosvm_connect(&crosvm);
  if (ret)
    return fail("crosvm_connect", ret);
  struct crosvm_vcpu *extra;
  if (crosvm_get_vcpu(crosvm, 1, &extra) == 0) {
    fprintf(stderr, "longrun_c: this machine drives 1 vcpu; run vmm without --cpus\n");
    return 2;
  }
  /* Is this plugin replacing another? Asked before anything is created. */
  struct crosvm_attached *attached;
  ret = crosvm_attach(crosvm, &attached);
  if (ret)
    return fail("crosvm_attach", ret);
  int kind = crosvm_attached_kind(attached);
  fprintf(stderr, "longrun_c build %s, %s\n", build_mark,
          kind == CROSVM_RESTART_UPGRADE ? "upgrade"
          : kind == CROSVM_RESTART_CRASH ? "crash"
                                         : "fresh");
  /* Only the plain machine takes part in hot restart: a replacing plugin
   * takes over one memory region and the accumulator's state. */
  if (kind != CROSVM_RESTART_FRESH && load.on) {
    fprintf(stderr, "longrun_c: a `load` machine cannot be restarted\n");
    return 1;
  }
  struct crosvm_checkpoint *ckpt;
  ret = crosvm_attached_take_checkpoint(attached, &ckpt);
  if (ret < 0)
    return fail("crosvm_attached_take_checkpoint", ret);
  if (ret == 0 && (ret = crosvm_checkpoint_new(64, &ckpt)))
    return fail("crosvm_checkpoint_new", ret);
  struct crosvm_vcpu *vcpu;
  ret = crosvm_get_vcpu(crosvm, 0, &vcpu);
  if (ret)
    return fail("crosvm_get_vcpu", ret);

  uint8_t *mem;
  /* Exits up to this serial are in the device state already. */
  uint64_t covered = 0;
  if (kind != CROSVM_RESTART_FRESH) {
    uint64_t seen;
    ret = crosvm_vcpu_serial(vcpu, &seen);
    if (ret)
      return fail("crosvm_vcpu_serial", ret);
    if (take_over(attached, ckpt, seen, &mem, &covered))
      return 1;
    char json[128];
    state_json(json, sizeof(json));
    fprintf(stderr,
            "longrun_c: took over the running VM (%s), device state %s, exits %" PRIu64
            " answered, %" PRIu64 " in the state\n",
            kind == CROSVM_RESTART_UPGRADE ? "Upgrade" : "Crash", json, seen, covered);
  } else {
    int mem_fd;
    if (set_up(crosvm, rounds, &mem_fd, &mem))
      return 1;
  }
  crosvm_attached_destroy(&attached);
  int restartable = 0;
  if (!load.on) {
    ret = crosvm_declare_restartable(crosvm, ckpt);
    restartable = ret == 0;
    if (ret)
      fprintf(stderr, "longrun_c: no hot restart (%s)\n", strerror(-ret));
  }
  ret = crosvm_write_tracker_new(&load.tracker);
  if (ret)
    return fail("crosvm_write_tracker_new", ret);
  if (load.on && set_up_load(crosvm))
    return 1;

  /* Restoring a snapshot or migrated? Then the device (and the load)
   * continues from its state. */
  uint8_t blob[STATE_LEN + LOAD_LEN];
  size_t blob_len = 0;
  ret = crosvm_get_restore_state(crosvm, blob, sizeof(blob), &blob_len);
  /* The load's state came with it: its pages are checked against it. */
  int state_restored = ret == 1 && blob_len > 0;
  if (ret == -E2BIG) {
    fprintf(stderr,
            "longrun_c: the saved device state is %zu bytes, more than this machine's %zu\n",
            blob_len, sizeof(blob));
    return 1;
  }
  if (ret < 0)
    return fail("crosvm_get_restore_state", ret);
  if (ret == 1 && blob_len == 0) {
    /* A snapshot taken without device state: the device starts afresh. */
    fprintf(stderr, "longrun_c: restoring a snapshot without device state\n");
  } else if (ret == 1) {
    if (restore_machine(blob, blob_len))
      return 1;
    char json[128];
    state_json(json, sizeof(json));
    fprintf(stderr, "longrun_c: restoring a snapshot, device state %s\n", json);
  }

  struct crosvm_control *ctl;
  pthread_t thread;
  ret = crosvm_control_open(crosvm, &ctl);
  if (ret) {
    fprintf(stderr, "longrun_c: no control channel (%s): snapshots are not possible\n",
            strerror(-ret));
  } else if (pthread_create(&thread, NULL, control_loop, ctl)) {
    fprintf(stderr, "longrun_c: cannot start the control thread\n");
    return 1;
  }

  ret = crosvm_start(crosvm);
  if (ret)
    return fail("crosvm_start", ret);

  for (;;) {
    uint64_t before;
    ret = crosvm_vcpu_serial(vcpu, &before);
    if (ret)
      return fail("crosvm_vcpu_serial", ret);
    struct crosvm_vcpu_event evt;
    ret = crosvm_vcpu_wait(vcpu, &evt);
    if (ret == -ESHUTDOWN) {
      fprintf(stderr, "longrun_c: the host stopped the VM before the guest finished\n");
      exit(1);
    }
    if (ret)
      return fail("crosvm_vcpu_wait", ret);
    int io = evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS &&
             evt.io_access.address_space == CROSVM_ADDRESS_SPACE_IOPORT;
    uint64_t port = io ? evt.io_access.address : 0;
    /* An exit the device state already has (the old plugin applied it and
     * died before resuming it): answer it without its effects. (An exit
     * that needs a resume has the serial after `before`.) */
    int needs_resume = evt.kind != CROSVM_VCPU_EVENT_KIND_COALESCED_WRITES &&
                       !(evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS && evt.io_access.no_resume);
    if (needs_resume && before < covered) {
      if (io && port == SHUTDOWN_PORT)
        break;
      if (io && port == ACC_PORT && !evt.io_access.is_write)
        answer_read(&evt);
    } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
      if (init_vcpu(vcpu) || (load.on && start_load(state_restored)))
        return 1;
    } else if (io) {
      uint32_t value = dword(evt.io_access.data, evt.io_access.length);
      if (port == SHUTDOWN_PORT)
        break;
      if (port == ACC_PORT && !evt.io_access.is_write) {
        answer_read(&evt);
      } else {
        pthread_mutex_lock(&dev.lock);
        if (port == ACC_PORT) {
          dev.acc = ((dev.acc << 7 | dev.acc >> 57) ^ value) * 0x00000100000001b3ull;
        } else if (port == PROGRESS_PORT) {
          printf("progress %" PRIu32 "\n", value);
          fflush(stdout);
        } else if (port == RESULT_PORT) {
          dev.has_fold = 1;
          dev.fold = value;
        } else if (port == RESULT_PORT + 4) {
          dev.has_x = 1;
          dev.x = value;
        }
        pthread_mutex_unlock(&dev.lock);
      }
      if (restartable && commit(ckpt, vcpu))
        return 1;
    }
    ret = crosvm_vcpu_resume(vcpu);
    if (ret)
      return fail("crosvm_vcpu_resume", ret);
  }
  if (load.on && finish_load())
    exit(1);
  uint32_t ticks = dword(mem + TICKS, 4);
  fprintf(stderr, "longrun_c: %" PRIu32 " timer interrupts arrived during the run\n", ticks);
  pthread_mutex_lock(&dev.lock);
  if (!dev.has_fold || !dev.has_x) {
    fprintf(stderr, "longrun_c: the guest stopped without reporting its result\n");
    exit(1);
  }
  uint64_t result = dev.acc ^ ((uint64_t)dev.fold << 32 | dev.x);
  pthread_mutex_unlock(&dev.lock);
  printf("result=0x%016" PRIx64 "\n", result);
  fflush(stdout);
  /* exit, not return: the control thread keeps running. */
  exit(0);
}
