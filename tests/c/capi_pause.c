/*
 * C API test plugin: run control with three vcpus (vmm --cpus 3).
 *
 * Before crosvm_start the plugin pauses vcpu 1 (mask 0b010): the VMM keeps
 * the request and vcpu 1 reports PAUSED with that user pointer before
 * running any guest code. Once every vcpu spins in the guest, the plugin
 * pauses vcpus 0 and 2 (mask 0b101): exactly those report PAUSED with the
 * new pointer, stopped inside the spin loop. Then the plugin releases the
 * guests through guest memory and each reports "done".
 *
 * Also: the application processors start in KVM_MP_STATE_UNINITIALIZED
 * and run only once made RUNNABLE; crosvm_get_vcpu hands out 0..2, then
 * -ENOENT.
 */
#include "capi_test.h"

#define NCPUS 3
#define CODE 0x1000
#define GO_FLAG 0x3000
#define READY_PORT 0x680
#define DONE_PORT 0x681

enum what { W_INIT, W_READY, W_PAUSED, W_DONE, W_OTHER };

struct record {
  enum what what;
  void *user;
  uint64_t rip;
};

static struct crosvm *crosvm;
static struct guest_ram ram;
static uint16_t spin_start, spin_end;
static int user_before, user_running; /* their addresses are the user values */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static struct record log_[NCPUS][8];
static int log_len[NCPUS];

static void note(int id, struct record r) {
  pthread_mutex_lock(&lock);
  if (log_len[id] < 8) log_[id][log_len[id]++] = r;
  pthread_cond_broadcast(&cond);
  pthread_mutex_unlock(&lock);
}

static int count(enum what w, void *user) {
  int n = 0;
  for (int id = 0; id < NCPUS; id++)
    for (int i = 0; i < log_len[id]; i++)
      if (log_[id][i].what == w && (w != W_PAUSED || log_[id][i].user == user)) n++;
  return n;
}

/* Blocks until `n` records of kind `w` (with `user` for pauses) exist. */
static void await(enum what w, void *user, int n) {
  pthread_mutex_lock(&lock);
  while (count(w, user) < n) pthread_cond_wait(&cond, &lock);
  pthread_mutex_unlock(&lock);
}

static struct crosvm_vcpu *vcpus[NCPUS];

static void *vcpu_thread(void *arg) {
  int id = (int)(intptr_t)arg;
  struct crosvm_vcpu *vcpu = vcpus[id];
  for (;;) {
    struct crosvm_vcpu_event evt;
    wait_event(vcpu, &evt);
    struct record r = {.what = W_OTHER};
    if (evt.kind == CROSVM_VCPU_EVENT_KIND_INIT) {
      r.what = W_INIT;
      struct kvm_mp_state mp;
      CHECK_EQ(crosvm_vcpu_get_mp_state(vcpu, &mp), 0);
      CHECK_EQ(mp.mp_state, id == 0 ? KVM_MP_STATE_RUNNABLE : KVM_MP_STATE_UNINITIALIZED);
      enter_real_mode(vcpu, CODE, 0x8000 - 0x100 * id, 0, 0, 0);
      CHECK_EQ(crosvm_vcpu_get_mp_state(vcpu, &mp), 0);
      CHECK_EQ(mp.mp_state, KVM_MP_STATE_RUNNABLE);
    } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_PAUSED) {
      r.what = W_PAUSED;
      r.user = evt.user;
      struct kvm_regs regs;
      CHECK_EQ(crosvm_vcpu_get_regs(vcpu, &regs), 0);
      r.rip = regs.rip;
    } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS &&
               evt.io_access.address == READY_PORT) {
      r.what = W_READY;
    } else if (evt.kind == CROSVM_VCPU_EVENT_KIND_IO_ACCESS &&
               evt.io_access.address == DONE_PORT) {
      note(id, (struct record){.what = W_DONE});
      return NULL; /* parked in this event while the plugin exits */
    }
    note(id, r);
    CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  }
}

int main(void) {
  REQUIRE(crosvm_connect(&crosvm) == 0);
  watch_shutdown(crosvm);
  ram = guest_ram_new(0x10000);
  struct asm16 a = {.buf = ram.mem, .pc = CODE};
  mov_dx(&a, READY_PORT);
  out_dx_al(&a);
  spin_start = a.pc;
  cmp8(&a, GO_FLAG, 0);
  jump_back(&a, JE, spin_start);
  spin_end = a.pc;
  mov_dx(&a, DONE_PORT);
  out_dx_al(&a);
  hlt(&a);
  struct crosvm_memory *mem = NULL;
  REQUIRE(crosvm_create_memory(crosvm, ram.fd, 0, ram.size, 0, false, false, &mem) == 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, READY_PORT, 2), 0);

  /* The usual discovery loop: ids 0, 1, ... until -ENOENT. */
  struct crosvm_vcpu *v;
  int n = 0;
  while (crosvm_get_vcpu(crosvm, n, &v) == 0) {
    REQUIRE(n < NCPUS);
    vcpus[n++] = v;
  }
  REQUIRE(n == NCPUS);
  CHECK_EQ(crosvm_get_vcpu(crosvm, n, &v), -ENOENT);

  /* Before start: kept for vcpu 1 (bits of absent vcpus are ignored). */
  CHECK_EQ(crosvm_pause_vcpus(crosvm, (1ull << 1) | (1ull << 40), &user_before), 0);

  pthread_t threads[NCPUS];
  for (int id = 0; id < NCPUS; id++)
    REQUIRE(pthread_create(&threads[id], NULL, vcpu_thread, (void *)(intptr_t)id) == 0);
  CHECK_EQ(crosvm_start(crosvm), 0);

  await(W_READY, NULL, NCPUS);
  CHECK_EQ(crosvm_pause_vcpus(crosvm, 0x5, &user_running), 0);
  await(W_PAUSED, &user_running, 2);
  __atomic_store_n(&ram.mem[GO_FLAG], 1, __ATOMIC_SEQ_CST);
  for (int id = 0; id < NCPUS; id++) pthread_join(threads[id], NULL);

  /* Exactly the expected sequence on every vcpu. */
  for (int id = 0; id < NCPUS; id++) {
    enum what want[4];
    void *want_user;
    if (id == 1) {
      enum what w[4] = {W_INIT, W_PAUSED, W_READY, W_DONE};
      memcpy(want, w, sizeof(w));
      want_user = &user_before;
    } else {
      enum what w[4] = {W_INIT, W_READY, W_PAUSED, W_DONE};
      memcpy(want, w, sizeof(w));
      want_user = &user_running;
    }
    CHECK_EQ(log_len[id], 4);
    for (int i = 0; i < 4 && i < log_len[id]; i++) {
      if (log_[id][i].what != want[i]) {
        fprintf(stderr, "vcpu %d event %d: got %d, expected %d\n", id, i, log_[id][i].what,
                want[i]);
        test_fail(__FILE__, __LINE__, "event sequence");
      }
      if (log_[id][i].what == W_PAUSED) {
        CHECK(log_[id][i].user == want_user);
        if (id == 1) {
          CHECK_EQ(log_[id][i].rip, CODE); /* before any guest instruction */
        } else {
          CHECK(log_[id][i].rip >= spin_start && log_[id][i].rip < spin_end);
        }
      }
    }
  }
  return test_finish("capi_pause");
}
