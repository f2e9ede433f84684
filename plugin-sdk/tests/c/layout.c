/* Compile-time checks of the crosvm.h layouts (docs/c-api.md §6).
 * Compiled (-c) as C11 and as C++ by tests/c_header.rs. */
#include <stddef.h>

#include "crosvm.h"

#ifdef __cplusplus
#define CHECK(expr) static_assert(expr, #expr)
#else
#define CHECK(expr) _Static_assert(expr, #expr)
#endif

#define OFF(type, member, off) CHECK(offsetof(struct type, member) == (off))
#define SIZE(type, size) CHECK(sizeof(struct type) == (size))
#define ALIGN(type, align) CHECK(_Alignof(struct type) == (align))

#ifdef __cplusplus
#undef ALIGN
#define ALIGN(type, align) CHECK(alignof(struct type) == (align))
#endif

CHECK(CROSVM_API_MAJOR == 0);
CHECK(CROSVM_API_MINOR == 22);
CHECK(CROSVM_API_PATCH == 0);
CHECK(CROSVM_MAX_HINT_COUNT == 1);
CHECK(CROSVM_MAX_HINT_DETAIL_COUNT == 32);
CHECK(CROSVM_HINT_ON_WRITE == 0x1);
CHECK(CROSVM_ADDRESS_SPACE_IOPORT == 0 && CROSVM_ADDRESS_SPACE_MMIO == 1);
CHECK(CROSVM_IRQ_ROUTE_IRQCHIP == 0 && CROSVM_IRQ_ROUTE_MSI == 1);
CHECK(CROSVM_VCPU_EVENT_KIND_INIT == 0);
CHECK(CROSVM_VCPU_EVENT_KIND_IO_ACCESS == 1);
CHECK(CROSVM_VCPU_EVENT_KIND_PAUSED == 2);
CHECK(CROSVM_VCPU_EVENT_KIND_HYPERV_HCALL == 3);
CHECK(CROSVM_VCPU_EVENT_KIND_HYPERV_SYNIC == 4);

SIZE(crosvm_net_config, 20);
ALIGN(crosvm_net_config, 4);
OFF(crosvm_net_config, tap_fd, 0);
OFF(crosvm_net_config, host_ip, 4);
OFF(crosvm_net_config, netmask, 8);
OFF(crosvm_net_config, host_mac_address, 12);
OFF(crosvm_net_config, _padding, 18);

SIZE(crosvm_irq_route, 24);
ALIGN(crosvm_irq_route, 8);
OFF(crosvm_irq_route, irq_id, 0);
OFF(crosvm_irq_route, kind, 4);
OFF(crosvm_irq_route, irqchip, 8);
OFF(crosvm_irq_route, irqchip.irqchip, 8);
OFF(crosvm_irq_route, irqchip.pin, 12);
OFF(crosvm_irq_route, msi, 8);
OFF(crosvm_irq_route, msi.address, 8);
OFF(crosvm_irq_route, msi.data, 16);
OFF(crosvm_irq_route, msi._reserved, 20);
OFF(crosvm_irq_route, _reserved, 8);

SIZE(crosvm_hint_detail, 48);
ALIGN(crosvm_hint_detail, 8);
OFF(crosvm_hint_detail, match_rax, 0);
OFF(crosvm_hint_detail, match_rbx, 1);
OFF(crosvm_hint_detail, match_rcx, 2);
OFF(crosvm_hint_detail, match_rdx, 3);
OFF(crosvm_hint_detail, _reserved, 4);
OFF(crosvm_hint_detail, rax, 8);
OFF(crosvm_hint_detail, rbx, 16);
OFF(crosvm_hint_detail, rcx, 24);
OFF(crosvm_hint_detail, rdx, 32);
OFF(crosvm_hint_detail, send_sregs, 40);
OFF(crosvm_hint_detail, send_debugregs, 41);
OFF(crosvm_hint_detail, _reserved2, 42);

SIZE(crosvm_hint, 32);
ALIGN(crosvm_hint, 8);
OFF(crosvm_hint, hint_version, 0);
OFF(crosvm_hint, _reserved, 4);
OFF(crosvm_hint, address_space, 8);
OFF(crosvm_hint, address_flags, 12);
OFF(crosvm_hint, details_count, 14);
OFF(crosvm_hint, address, 16);
OFF(crosvm_hint, details, 24);
OFF(crosvm_hint, _reserved2, 24);

SIZE(crosvm_vcpu_event, 72);
ALIGN(crosvm_vcpu_event, 8);
OFF(crosvm_vcpu_event, kind, 0);
OFF(crosvm_vcpu_event, _padding, 4);
OFF(crosvm_vcpu_event, io_access, 8);
OFF(crosvm_vcpu_event, io_access.address_space, 8);
OFF(crosvm_vcpu_event, io_access._padding, 12);
OFF(crosvm_vcpu_event, io_access.address, 16);
OFF(crosvm_vcpu_event, io_access.data, 24);
OFF(crosvm_vcpu_event, io_access.length, 32);
OFF(crosvm_vcpu_event, io_access.is_write, 36);
OFF(crosvm_vcpu_event, io_access.no_resume, 37);
OFF(crosvm_vcpu_event, io_access._reserved, 38);
OFF(crosvm_vcpu_event, user, 8);
OFF(crosvm_vcpu_event, hyperv_call, 8);
OFF(crosvm_vcpu_event, hyperv_call.input, 8);
OFF(crosvm_vcpu_event, hyperv_call.result, 16);
OFF(crosvm_vcpu_event, hyperv_call.params, 24);
OFF(crosvm_vcpu_event, hyperv_synic, 8);
OFF(crosvm_vcpu_event, hyperv_synic.msr, 8);
OFF(crosvm_vcpu_event, hyperv_synic._reserved, 12);
OFF(crosvm_vcpu_event, hyperv_synic.control, 16);
OFF(crosvm_vcpu_event, hyperv_synic.evt_page, 24);
OFF(crosvm_vcpu_event, hyperv_synic.msg_page, 32);
OFF(crosvm_vcpu_event, _reserved, 8);

/* The kernel structs whose raw bytes cross the wire (docs/c-api.md §10). */
CHECK(sizeof(struct kvm_cpuid_entry2) == 40);
CHECK(sizeof(struct kvm_msr_entry) == 16);
CHECK(sizeof(struct kvm_pic_state) == 16);
CHECK(sizeof(struct kvm_ioapic_state) == 216);
CHECK(sizeof(struct kvm_pit_state2) == 112);
CHECK(sizeof(struct kvm_clock_data) == 48);
CHECK(sizeof(struct kvm_regs) == 144);
CHECK(sizeof(struct kvm_sregs) == 312);
CHECK(sizeof(struct kvm_fpu) == 416);
CHECK(sizeof(struct kvm_debugregs) == 128);
CHECK(sizeof(struct kvm_xcrs) == 392);
CHECK(sizeof(struct kvm_lapic_state) == 1024);
CHECK(sizeof(struct kvm_mp_state) == 4);
CHECK(sizeof(struct kvm_vcpu_events) == 64);

/* Every prototype, taken by address with its exact type. */
static void check_prototypes(void) {
  int (*p1)(struct crosvm **) = crosvm_connect;
  int (*p2)(struct crosvm *, struct crosvm **) = crosvm_new_connection;
  int (*p3)(struct crosvm *, uint32_t, const struct crosvm_hint *) =
      crosvm_set_hypercall_hint;
  int (*p4)(struct crosvm *, uint32_t, uint64_t, uint32_t, const uint8_t *,
            struct crosvm_io **) = crosvm_create_io_event;
  int (*p5)(struct crosvm *, int, uint64_t, uint64_t, uint64_t, bool, bool,
            struct crosvm_memory **) = crosvm_create_memory;
  int (*p6)(struct crosvm_vcpu *, struct crosvm_vcpu_event *) =
      crosvm_vcpu_wait;
  int (*p7)(struct crosvm_vcpu *, uint32_t, uint32_t, uint64_t *) =
      crosvm_vcpu_enable_capability;
  int (*p8)(const struct crosvm_irq *) = crosvm_irq_event_get_resample_fd;
  (void)p1; (void)p2; (void)p3; (void)p4; (void)p5; (void)p6; (void)p7;
  (void)p8;
}

/* Anonymous union members are usable by name. */
int crosvm_layout_use(struct crosvm_vcpu_event *event,
                      struct crosvm_irq_route *route,
                      struct crosvm_hint *hint) {
  check_prototypes();
  event->kind = CROSVM_VCPU_EVENT_KIND_IO_ACCESS;
  event->io_access.length = 4;
  route->msi.data = 1;
  hint->details = NULL;
  return (int)(event->io_access.length + route->msi.data) +
         (hint->_reserved2 != 0);
}
