/*
 * C API test plugin: the VM-level functions on a real VMM (one vcpu).
 *
 *   capi_vm [tap]   ("tap": the VMM was given --host-ip/--netmask/--mac)
 *
 * Covers: connections (connect, new/destroy connection, shutdown eventfd,
 * two connections used from two threads at once, object ids shared across
 * connections), capability and CPU queries checked against /dev/kvm,
 * crosvm_enable_capability, the net config, VM state round trips (PIC x2,
 * IOAPIC, PIT, clock), identity map address before/after start, irq routing
 * and set_irq, argument checks of reservations, hints, io events, memory and
 * irq events, get_vcpu, start. The guest then triple-faults, so the VMM
 * shuts the VM down and the shutdown eventfd fires.
 */
#include "capi_test.h"

#include <sys/ioctl.h>
#include <linux/if_tun.h>
#include <net/if.h>

#define CODE 0x1000
#define KILL_PORT 0x3f9

static struct crosvm *crosvm;
static int kvm_fd, vm_fd;

/* ------------------------------------------------------------------------ */

static void check_extension_semantics(void) {
  /* true only if KVM answers exactly 1 (IRQCHIP is 1; NR_MEMSLOTS and
   * ADJUST_CLOCK answer larger values; the bogus number answers 0). */
  const uint32_t caps[] = {KVM_CAP_IRQCHIP,      KVM_CAP_NR_MEMSLOTS, KVM_CAP_MAX_VCPUS,
                           KVM_CAP_ADJUST_CLOCK, KVM_CAP_HYPERV_SYNIC, 0x7fffffff};
  for (unsigned i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
    bool has = !(i & 1); /* garbage that must be overwritten */
    CHECK_EQ(crosvm_check_extension(crosvm, caps[i], &has), 0);
    int raw = ioctl(vm_fd, KVM_CHECK_EXTENSION, caps[i]);
    if (has != (raw == 1))
      fprintf(stderr, "capability %u: KVM says %d, check_extension says %d\n", caps[i], raw, has);
    CHECK(has == (raw == 1));
  }
  bool has = false;
  CHECK_EQ(crosvm_check_extension(crosvm, KVM_CAP_IRQCHIP, &has), 0);
  CHECK(has);
  CHECK(ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS) > 1);
  CHECK_EQ(crosvm_check_extension(crosvm, KVM_CAP_NR_MEMSLOTS, &has), 0);
  CHECK(!has);

  uint64_t args[4] = {0, 0, 0, 0};
  CHECK_EQ(crosvm_enable_capability(crosvm, KVM_CAP_IRQCHIP, 0, args), -EINVAL);
  CHECK_EQ(crosvm_enable_capability(crosvm, KVM_CAP_HYPERV_SYNIC, 0, args), -EINVAL);
}

struct cpuid_buf {
  struct kvm_cpuid2 head;
  struct kvm_cpuid_entry2 entries[256];
};

typedef int (*cpuid_query)(struct crosvm *, uint32_t, struct kvm_cpuid_entry2 *, uint32_t *);

static void check_cpuid_list(const char *what, cpuid_query query, unsigned long ioctl_nr) {
  static struct cpuid_buf kvm_list;
  kvm_list.head.nent = 256;
  REQUIRE(ioctl(kvm_fd, ioctl_nr, &kvm_list) == 0);
  uint32_t n = kvm_list.head.nent;
  REQUIRE(n > 1);

  static struct kvm_cpuid_entry2 got[256];
  uint32_t count = 12345;
  /* Too small: -E2BIG and the real count. */
  CHECK_EQ(query(crosvm, 1, got, &count), -E2BIG);
  CHECK_EQ(count, n);
  count = 0;
  CHECK_EQ(query(crosvm, n, got, &count), 0);
  CHECK_EQ(count, n);
  for (uint32_t i = 0; i < n && i < count; i++) {
    const struct kvm_cpuid_entry2 *k = &kvm_list.entries[i], *g = &got[i];
    if (g->function != k->function || g->index != k->index ||
        /* Fields that report the APIC id of the CPU that ran the ioctl differ
           between the host's query and ours. */
        (g->ebx ^ k->ebx) & (k->function == 1 ? 0x00ffffffu : 0xffffffffu) ||
        g->ecx != k->ecx ||
        ((k->function == 0xb || k->function == 0x1f) ? 0 : g->edx != k->edx) ||
        (k->function == 0x8000001e ? 0 : g->eax != k->eax) ||
        g->flags != (k->flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) || g->padding[0] ||
        g->padding[1] || g->padding[2]) {
      fprintf(stderr, "%s entry %u differs from KVM's (leaf %#x.%u)\n", what, i, k->function,
              k->index);
      test_fail(__FILE__, __LINE__, what);
    }
  }
}

static void check_queries(void) {
  check_extension_semantics();
  check_cpuid_list("supported cpuid", crosvm_get_supported_cpuid, KVM_GET_SUPPORTED_CPUID);
  check_cpuid_list("emulated cpuid", crosvm_get_emulated_cpuid, KVM_GET_EMULATED_CPUID);

  static struct {
    struct kvm_msr_list head;
    uint32_t indices[512];
  } kvm_msrs;
  kvm_msrs.head.nmsrs = 512;
  REQUIRE(ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, &kvm_msrs) == 0);
  uint32_t n = kvm_msrs.head.nmsrs;
  REQUIRE(n > 1);
  static uint32_t got[512];
  uint32_t count = 0;
  CHECK_EQ(crosvm_get_msr_index_list(crosvm, n - 1, got, &count), -E2BIG);
  CHECK_EQ(count, n);
  CHECK_EQ(crosvm_get_msr_index_list(crosvm, 512, got, &count), 0);
  CHECK_EQ(count, n);
  CHECK(memcmp(got, kvm_msrs.indices, n * sizeof(uint32_t)) == 0);
}

/* ------------------------------------------------------------------------ */

static void check_net(bool tap) {
  struct crosvm_net_config cfg;
  memset(&cfg, 0xee, sizeof(cfg));
  int ret = crosvm_net_get_config(crosvm, &cfg);
  if (!tap) {
    CHECK_EQ(ret, -ENODATA);
    return;
  }
  CHECK_EQ(ret, 0);
  if (ret) return;
  const uint8_t ip[4] = {100, 115, 92, 5}, mask[4] = {255, 255, 255, 252};
  const uint8_t mac[6] = {0xde, 0x21, 0xe8, 0x47, 0x6b, 0x6a};
  CHECK(memcmp(&cfg.host_ip, ip, 4) == 0);
  CHECK(memcmp(&cfg.netmask, mask, 4) == 0);
  CHECK(memcmp(cfg.host_mac_address, mac, 6) == 0);
  CHECK(cfg._padding[0] == 0 && cfg._padding[1] == 0);
  CHECK(cfg.tap_fd >= 0);
  struct ifreq ifr;
  memset(&ifr, 0, sizeof(ifr));
  CHECK(ioctl(cfg.tap_fd, TUNGETIFF, &ifr) == 0); /* really a tap device */
  CHECK((ifr.ifr_flags & IFF_TAP) != 0);
  close(cfg.tap_fd);
}

/* ------------------------------------------------------------------------ */

static void check_vm_state(void) {
  /* PICs: get -> change -> set -> get gives exactly what was set. */
  for (int primary = 1; primary >= 0; primary--) {
    struct kvm_pic_state pic, back;
    CHECK_EQ(crosvm_get_pic_state(crosvm, primary, &pic), 0);
    pic.imr = primary ? 0xa5 : 0x3c;
    pic.irq_base = primary ? 0x20 : 0x70;
    pic.elcr = primary ? 0x28 : 0x04; /* within the chips' ELCR masks */
    pic.special_fully_nested_mode = 1;
    CHECK_EQ(crosvm_set_pic_state(crosvm, primary, &pic), 0);
    memset(&back, 0x77, sizeof(back));
    CHECK_EQ(crosvm_get_pic_state(crosvm, primary, &back), 0);
    CHECK(memcmp(&pic, &back, sizeof(pic)) == 0);
  }

  struct kvm_ioapic_state io, io_back;
  CHECK_EQ(crosvm_get_ioapic_state(crosvm, &io), 0);
  CHECK_EQ(io.base_address, 0xfec00000);
  io.id = 5;
  io.ioregsel = 0x10;
  io.redirtbl[7].fields.vector = 0x47;
  io.redirtbl[7].fields.trig_mode = 1;
  io.redirtbl[7].fields.mask = 1;
  io.redirtbl[20].fields.dest_id = 3;
  CHECK_EQ(crosvm_set_ioapic_state(crosvm, &io), 0);
  CHECK_EQ(crosvm_get_ioapic_state(crosvm, &io_back), 0);
  CHECK(memcmp(&io, &io_back, sizeof(io)) == 0);

  /* PIT: channels 1 and 2 (channel 0 would start the timer). KVM stamps a
   * new count_load_time when a count is loaded, so that field is not
   * compared. */
  struct kvm_pit_state2 pit, pit_back;
  CHECK_EQ(crosvm_get_pit_state(crosvm, &pit), 0);
  pit.channels[1].count = 0x100;
  pit.channels[2].count = 0x4321;
  pit.channels[2].mode = 3;
  pit.channels[2].rw_mode = 3;
  pit.channels[2].read_state = 3;
  pit.channels[2].write_state = 3;
  pit.channels[2].gate = 1;
  CHECK_EQ(crosvm_set_pit_state(crosvm, &pit), 0);
  CHECK_EQ(crosvm_get_pit_state(crosvm, &pit_back), 0);
  for (int i = 0; i < 3; i++) {
    pit_back.channels[i].count_load_time = pit.channels[i].count_load_time;
  }
  CHECK(memcmp(&pit, &pit_back, sizeof(pit)) == 0);
  CHECK_EQ(pit_back.channels[2].count, 0x4321);

  /* Clock: jump it ~11.6 days ahead; reading it back must show the jump. */
  struct kvm_clock_data clock, later;
  CHECK_EQ(crosvm_get_clock(crosvm, &clock), 0);
  uint64_t target = clock.clock + 1000000000000000ull;
  struct kvm_clock_data set = {.clock = target};
  CHECK_EQ(crosvm_set_clock(crosvm, &set), 0);
  CHECK_EQ(crosvm_get_clock(crosvm, &later), 0);
  CHECK(later.clock >= target);
  /* KVM refuses unknown flags; the error comes back unchanged. */
  set.flags = 0x80000000u;
  CHECK_EQ(crosvm_set_clock(crosvm, &set), -EINVAL);

  CHECK_EQ(crosvm_set_identity_map_addr(crosvm, 0xfffbc000), 0);
}

/* ------------------------------------------------------------------------ */

static void check_irqs(void) {
  struct crosvm_irq_route routes[33];
  unsigned n = 0;
  for (uint32_t irq = 0; irq < 16; irq++) {
    routes[n].irq_id = irq;
    routes[n].kind = CROSVM_IRQ_ROUTE_IRQCHIP;
    routes[n].irqchip.irqchip = irq < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE;
    routes[n].irqchip.pin = irq & 7;
    n++;
    routes[n].irq_id = irq;
    routes[n].kind = CROSVM_IRQ_ROUTE_IRQCHIP;
    routes[n].irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
    routes[n].irqchip.pin = irq == 0 ? 2 : irq;
    n++;
  }
  memset(&routes[n], 0, sizeof(routes[n]));
  routes[n].irq_id = 24;
  routes[n].kind = CROSVM_IRQ_ROUTE_MSI;
  routes[n].msi.address = 0xfee00000;
  routes[n].msi.data = 0x41;
  n++;
  CHECK_EQ(crosvm_set_irq_routing(crosvm, n, routes), 0);
  /* An unknown route kind is refused before anything is sent. */
  struct crosvm_irq_route bad = routes[0];
  bad.kind = 7;
  struct crosvm_irq_route two[2] = {routes[0], bad};
  CHECK_EQ(crosvm_set_irq_routing(crosvm, 2, two), -EINVAL);
  /* An empty table clears the routing; then restore it. */
  CHECK_EQ(crosvm_set_irq_routing(crosvm, 0, NULL), 0);
  CHECK_EQ(crosvm_set_irq_routing(crosvm, n, routes), 0);

  CHECK_EQ(crosvm_set_irq(crosvm, 3, true), 0);
  CHECK_EQ(crosvm_set_irq(crosvm, 3, false), 0);
  CHECK_EQ(crosvm_set_irq(crosvm, 24, true), 0);

  struct crosvm_irq *irq = NULL;
  CHECK_EQ(crosvm_create_irq_event(crosvm, 4, &irq), 0);
  if (irq) {
    int trigger = crosvm_irq_event_get_fd(irq), resample = crosvm_irq_event_get_resample_fd(irq);
    CHECK(trigger >= 0 && resample >= 0 && trigger != resample);
    CHECK(fcntl(trigger, F_GETFD) >= 0 && fcntl(resample, F_GETFD) >= 0);
    CHECK_EQ(crosvm_destroy_irq_event(crosvm, &irq), 0);
    CHECK(irq == NULL);
  }
}

/* ------------------------------------------------------------------------ */

static void check_reservations_and_hints(void) {
  const uint32_t IO = CROSVM_ADDRESS_SPACE_IOPORT, MMIO = CROSVM_ADDRESS_SPACE_MMIO;
  CHECK_EQ(crosvm_reserve_range(crosvm, 2, 0x100, 1), -EINVAL);
  CHECK_EQ(crosvm_reserve_async_write_range(crosvm, 2, 0x100, 1), -EINVAL);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, 0x100, 0x10), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, 0x108, 1), -EPERM);
  CHECK_EQ(crosvm_reserve_async_write_range(crosvm, IO, 0xf8, 0x10), -EPERM);
  CHECK_EQ(crosvm_reserve_async_write_range(crosvm, IO, 0x110, 4), 0); /* adjacent: fine */
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, 0x300, 0), -ENOENT);      /* nothing there */
  /* Length 0 removes a range of either kind, whichever function is used. */
  CHECK_EQ(crosvm_reserve_async_write_range(crosvm, IO, 0x100, 0), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, 0x110, 0), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, 0x100, 0), -ENOENT);
  /* The two spaces are independent. */
  CHECK_EQ(crosvm_reserve_range(crosvm, MMIO, 0x100, 0x10), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, 0x100, 0x10), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, MMIO, 0x100, 0), 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, IO, 0x100, 0), 0);

  struct crosvm_hint_detail details[33];
  memset(details, 0, sizeof(details));
  details[0].match_rax = true;
  details[0].rax = 7;
  details[0].send_sregs = true;
  struct crosvm_hint good = {
      .address_space = IO, .address_flags = CROSVM_HINT_ON_WRITE, .details_count = 1,
      .address = 0x500, .details = details};
  struct crosvm_hint h;
  h = good, h.hint_version = 1;
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &h), -EINVAL);
  h = good, h._reserved = 1;
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &h), -EINVAL);
  h = good, h.address = 0;
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &h), -EINVAL);
  h = good, h.address_flags = 2;
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &h), -EINVAL);
  h = good, h.details_count = CROSVM_MAX_HINT_DETAIL_COUNT + 1;
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &h), -EINVAL);
  h = good, h.address_space = 2;
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &h), -EINVAL);
  struct crosvm_hint pair[2] = {good, good};
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 2, pair), -EINVAL);
  h = good, h.details_count = CROSVM_MAX_HINT_DETAIL_COUNT;
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &h), 0);
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 1, &good), 0);
  CHECK_EQ(crosvm_set_hypercall_hint(crosvm, 0, NULL), 0); /* clears */
}

/* ------------------------------------------------------------------------ */

static void check_object_arguments(const struct guest_ram *ram) {
  const uint32_t IO = CROSVM_ADDRESS_SPACE_IOPORT, MMIO = CROSVM_ADDRESS_SPACE_MMIO;
  struct crosvm_io *io = NULL, *io2 = NULL;
  uint8_t match[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  CHECK_EQ(crosvm_create_io_event(crosvm, IO, 0x600, 3, match, &io), -EINVAL);
  CHECK_EQ(crosvm_create_io_event(crosvm, 2, 0x600, 1, match, &io), -EINVAL);
  CHECK(io == NULL);
  /* NULL datamatch with a length means "any value". */
  CHECK_EQ(crosvm_create_io_event(crosvm, MMIO, 0xd0000000, 4, NULL, &io), 0);
  CHECK(io && crosvm_io_event_fd(io) >= 0);
  CHECK_EQ(crosvm_create_io_event(crosvm, IO, 0x600, 0, NULL, &io2), 0);
  /* The identical registration again: KVM says EEXIST. */
  struct crosvm_io *dup = NULL;
  CHECK_EQ(crosvm_create_io_event(crosvm, IO, 0x600, 0, NULL, &dup), -EEXIST);
  CHECK(dup == NULL);
  if (io) CHECK_EQ(crosvm_destroy_io_event(crosvm, &io), 0);
  if (io2) CHECK_EQ(crosvm_destroy_io_event(crosvm, &io2), 0);
  CHECK(io == NULL && io2 == NULL);

  struct crosvm_memory *mem = NULL;
  CHECK_EQ(crosvm_create_memory(crosvm, ram->fd, 0x800, 0x1000, 0x100000, false, false, &mem),
           -EINVAL);
  CHECK_EQ(crosvm_create_memory(crosvm, ram->fd, 0, 0x1800, 0x100000, false, false, &mem),
           -EINVAL);
  /* Beyond the end of the memfd. */
  CHECK_EQ(crosvm_create_memory(crosvm, ram->fd, ram->size, 0x1000, 0x100000, false, false, &mem),
           -EINVAL);
  /* Overlapping the RAM slot at 0: KVM says EEXIST. */
  CHECK_EQ(crosvm_create_memory(crosvm, ram->fd, 0, 0x1000, 0x2000, false, false, &mem), -EEXIST);
  CHECK(mem == NULL);
  int unsealed = memfd_create("unsealed", MFD_CLOEXEC);
  CHECK(unsealed >= 0 && ftruncate(unsealed, 0x1000) == 0);
  CHECK_EQ(crosvm_create_memory(crosvm, unsealed, 0, 0x1000, 0x100000, false, false, &mem), -EPERM);
  close(unsealed);
  /* Dirty log of a region without dirty logging: KVM says ENOENT. */
  CHECK_EQ(crosvm_create_memory(crosvm, ram->fd, 0, 0x2000, 0x100000, false, false, &mem), 0);
  if (mem) {
    uint8_t log[1] = {0xff};
    CHECK_EQ(crosvm_memory_get_dirty_log(crosvm, mem, log), -ENOENT);
    CHECK_EQ(crosvm_destroy_memory(crosvm, &mem), 0);
    CHECK(mem == NULL);
  }
}

/* ------------------------------------------------------------------------ */
/* Two connections used at the same time from two threads: each creates and
 * destroys objects (ids come from one shared allocator, so none collides),
 * reserves ranges and queries state. */

#define ROUNDS 100
/* Object creation is slow in KVM (each registration waits for an SRCU grace
 * period): only every 10th round creates one. */
#define CREATE_EVERY 10

struct worker {
  struct crosvm *conn;
  uint16_t port_base;
  int errors;
};

static void *worker_main(void *arg) {
  struct worker *w = arg;
  for (int i = 0; i < ROUNDS; i++) {
    struct crosvm_io *io = NULL;
    uint8_t one = 1;
    if (i % CREATE_EVERY == 0 &&
        crosvm_create_io_event(w->conn, CROSVM_ADDRESS_SPACE_IOPORT, w->port_base + i, 1, &one,
                               &io))
      w->errors++;
    if (crosvm_reserve_range(w->conn, CROSVM_ADDRESS_SPACE_IOPORT, 0x10000 + w->port_base + i,
                             1))
      w->errors++;
    struct kvm_clock_data clock;
    struct kvm_pic_state pic;
    bool has;
    if (crosvm_get_clock(w->conn, &clock) || crosvm_get_pic_state(w->conn, true, &pic) ||
        crosvm_check_extension(w->conn, KVM_CAP_IRQCHIP, &has) || !has)
      w->errors++;
    if (io && crosvm_destroy_io_event(w->conn, &io)) w->errors++;
    if (crosvm_reserve_range(w->conn, CROSVM_ADDRESS_SPACE_IOPORT, 0x10000 + w->port_base + i,
                             0))
      w->errors++;
  }
  return NULL;
}

static void check_connections(const struct guest_ram *ram) {
  struct crosvm *b = NULL, *c = NULL;
  CHECK_EQ(crosvm_new_connection(crosvm, &b), 0);
  REQUIRE(b != NULL);
  CHECK_EQ(crosvm_new_connection(b, &c), 0); /* derived from a derived one */
  REQUIRE(c != NULL);

  /* The vcpu table is shared: the same handle through every connection. */
  struct crosvm_vcpu *va = NULL, *vb = NULL, *vc = NULL;
  CHECK_EQ(crosvm_get_vcpu(crosvm, 0, &va), 0);
  CHECK_EQ(crosvm_get_vcpu(b, 0, &vb), 0);
  CHECK_EQ(crosvm_get_vcpu(c, 0, &vc), 0);
  CHECK(va != NULL && va == vb && vb == vc);

  /* Shutdown eventfds: distinct descriptors, one shared counter. */
  int s1 = crosvm_get_shutdown_eventfd(crosvm), s2 = crosvm_get_shutdown_eventfd(b);
  CHECK(s1 >= 0 && s2 >= 0 && s1 != s2);
  uint64_t five = 5, got = 0;
  CHECK(write(s1, &five, sizeof(five)) == sizeof(five));
  CHECK(read(s2, &got, sizeof(got)) == sizeof(got));
  CHECK_EQ(got, 5);
  CHECK_EQ(eventfd_take(s1), 0); /* consumed for both */
  close(s1);
  close(s2);

  struct worker wa = {.conn = crosvm, .port_base = 0x7000};
  struct worker wb = {.conn = b, .port_base = 0x7400};
  pthread_t t;
  REQUIRE(pthread_create(&t, NULL, worker_main, &wb) == 0);
  worker_main(&wa);
  pthread_join(t, NULL);
  CHECK_EQ(wa.errors, 0);
  CHECK_EQ(wb.errors, 0);

  /* Objects are not tied to their connection: created on one, destroyed on
   * another, also after the creating connection is gone. */
  struct crosvm_io *io = NULL;
  struct crosvm_memory *mem = NULL;
  struct crosvm_irq *irq = NULL;
  CHECK_EQ(crosvm_create_io_event(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, 0x6f0, 0, NULL, &io), 0);
  CHECK_EQ(crosvm_create_memory(c, ram->fd, 0, 0x1000, 0x300000, true, false, &mem), 0);
  CHECK_EQ(crosvm_create_irq_event(b, 9, &irq), 0);
  CHECK_EQ(crosvm_destroy_connection(&c), 0);
  CHECK(c == NULL);
  if (io) CHECK_EQ(crosvm_destroy_io_event(b, &io), 0);
  if (mem) CHECK_EQ(crosvm_destroy_memory(b, &mem), 0);
  if (irq) CHECK_EQ(crosvm_destroy_irq_event(crosvm, &irq), 0);
  /* Destroying again through a stale id would fail; the handles are gone. */
  CHECK(io == NULL && mem == NULL && irq == NULL);
  CHECK_EQ(crosvm_destroy_connection(&b), 0);
  CHECK(b == NULL);
  bool has = false;
  CHECK_EQ(crosvm_check_extension(crosvm, KVM_CAP_IRQCHIP, &has), 0); /* still usable */
}

/* ------------------------------------------------------------------------ */

static void *vcpu_thread(void *arg) {
  struct crosvm_vcpu *vcpu = arg;
  struct crosvm_vcpu_event evt;
  wait_event(vcpu, &evt);
  CHECK_EQ(evt.kind, CROSVM_VCPU_EVENT_KIND_INIT);
  enter_real_mode(vcpu, CODE, 0x8000, 0, 0, 0);
  /* 16-bit protected mode with an empty interrupt table: the ud2 after the
   * kill port cannot be delivered (#UD -> #GP -> #DF) and the guest
   * triple-faults. (Real mode would not do: KVM may emulate real-mode
   * interrupt delivery without checking the table limit.) */
  struct kvm_sregs sregs;
  REQUIRE(crosvm_vcpu_get_sregs(vcpu, &sregs) == 0);
  sregs.cr0 |= 1; /* PE */
  struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
  for (unsigned i = 0; i < sizeof(segs) / sizeof(segs[0]); i++) {
    segs[i]->base = 0;
    segs[i]->limit = 0xffff;
    segs[i]->selector = 0;
    segs[i]->type = segs[i] == &sregs.cs ? 0xb : 0x3; /* code r/x, data r/w; accessed */
    segs[i]->present = 1;
    segs[i]->dpl = 0;
    segs[i]->db = 0;
    segs[i]->s = 1;
    segs[i]->l = 0;
    segs[i]->g = 0;
    segs[i]->unusable = 0;
  }
  sregs.idt.limit = 0;
  crosvm_vcpu_set_sregs(vcpu, &sregs);
  struct kvm_regs regs;
  REQUIRE(crosvm_vcpu_get_regs(vcpu, &regs) == 0);
  regs.rdx = KILL_PORT;
  crosvm_vcpu_set_regs(vcpu, &regs);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  expect_io(vcpu, &evt, CROSVM_ADDRESS_SPACE_IOPORT, KILL_PORT, 1);
  CHECK_EQ(crosvm_vcpu_resume(vcpu), 0);
  /* The VMM now shuts the VM down; nothing more will come. */
  return NULL;
}

int main(int argc, char **argv) {
  bool tap = argc > 1 && strcmp(argv[1], "tap") == 0;
  kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  REQUIRE(kvm_fd >= 0);
  vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
  REQUIRE(vm_fd >= 0);

  REQUIRE(crosvm_connect(&crosvm) == 0);
  int shutdown_fd = crosvm_get_shutdown_eventfd(crosvm);
  REQUIRE(shutdown_fd >= 0);

  struct guest_ram ram = guest_ram_new(0x10000);
  struct asm16 a = {.buf = ram.mem, .pc = CODE};
  out_dx_al(&a); /* dx = KILL_PORT, set by the plugin */
  ud2(&a);
  struct crosvm_memory *ram_obj = NULL;
  REQUIRE(crosvm_create_memory(crosvm, ram.fd, 0, ram.size, 0, false, false, &ram_obj) == 0);
  CHECK_EQ(crosvm_reserve_range(crosvm, CROSVM_ADDRESS_SPACE_IOPORT, KILL_PORT, 1), 0);

  check_queries();
  check_net(tap);
  check_vm_state();
  check_irqs();
  check_reservations_and_hints();
  check_object_arguments(&ram);
  check_connections(&ram);

  struct crosvm_vcpu *vcpu = NULL, *none = NULL;
  CHECK_EQ(crosvm_get_vcpu(crosvm, 0, &vcpu), 0);
  CHECK_EQ(crosvm_get_vcpu(crosvm, 1, &none), -ENOENT);
  CHECK(none == NULL);
  REQUIRE(vcpu != NULL);
  pthread_t t;
  REQUIRE(pthread_create(&t, NULL, vcpu_thread, vcpu) == 0);

  CHECK_EQ(crosvm_start(crosvm), 0);
  CHECK_EQ(crosvm_start(crosvm), -EINVAL);
  /* The vcpus exist now: too late for the identity map. */
  CHECK(crosvm_set_identity_map_addr(crosvm, 0xfffbc000) < 0);

  /* The guest triple-faults after the kill port; the VMM signals this. */
  uint64_t v = 0;
  CHECK(read(shutdown_fd, &v, sizeof(v)) == sizeof(v));
  CHECK(v >= 1);
  pthread_join(t, NULL);
  return test_finish("capi_vm");
}
