/*
 * crosvm.h - C API for VMM plugins (plugin API 0.22.0).
 *
 * Source compatible with the crosvm plugin API 0.22: a plugin written
 * against crosvm's header compiles unchanged against this one and links
 * with -lcrosvm_plugin.
 *
 * Conventions: every function returns an int; 0 (or a descriptor) means
 * success, a negative errno value means failure. Out-parameters are written
 * only on success, except the out_count parameters of the list queries and
 * of crosvm_vcpu_get_msrs, which are always written. Handles are not
 * validated. One struct crosvm or struct crosvm_vcpu must not be used by
 * two threads at once; different ones may be used concurrently.
 */

#ifndef __CROSVM_H__
#define __CROSVM_H__

#include <assert.h>
#include <stdbool.h>
#include <stdint.h>

#include <linux/kvm.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the plugin API described by this header (not of the VMM). */
#define CROSVM_API_MAJOR 0
#define CROSVM_API_MINOR 22
#define CROSVM_API_PATCH 0

/* Largest hints_count accepted by crosvm_set_hypercall_hint. */
#define CROSVM_MAX_HINT_COUNT 1
/* Largest details_count of one struct crosvm_hint. */
#define CROSVM_MAX_HINT_DETAIL_COUNT 32
/* crosvm_hint.address_flags bit: the hint applies to writes / OUT. */
#define CROSVM_HINT_ON_WRITE 0x1

enum crosvm_address_space {
  /* x86 port I/O; addresses are port numbers. */
  CROSVM_ADDRESS_SPACE_IOPORT = 0,
  /* Guest-physical memory space. */
  CROSVM_ADDRESS_SPACE_MMIO = 1,
};

enum crosvm_irq_route_kind {
  /* The irqchip member of struct crosvm_irq_route is used. */
  CROSVM_IRQ_ROUTE_IRQCHIP = 0,
  /* The msi member of struct crosvm_irq_route is used. */
  CROSVM_IRQ_ROUTE_MSI = 1,
};

enum crosvm_vcpu_event_kind {
  /* First event of every vcpu after crosvm_start; no union member. */
  CROSVM_VCPU_EVENT_KIND_INIT = 0,
  /* Access to a reserved range; io_access is valid. */
  CROSVM_VCPU_EVENT_KIND_IO_ACCESS = 1,
  /* Result of crosvm_pause_vcpus; user is valid. */
  CROSVM_VCPU_EVENT_KIND_PAUSED = 2,
  /* Hyper-V hypercall; hyperv_call is valid. */
  CROSVM_VCPU_EVENT_KIND_HYPERV_HCALL = 3,
  /* Hyper-V SynIC MSR write; hyperv_synic is valid. */
  CROSVM_VCPU_EVENT_KIND_HYPERV_SYNIC = 4,
};

/* One main connection to the VMM. */
struct crosvm;
/* An ioeventfd object. */
struct crosvm_io;
/* A guest memory region object. */
struct crosvm_memory;
/* An irqfd object. */
struct crosvm_irq;
/* One vcpu channel (owned by the library, never freed by the plugin). */
struct crosvm_vcpu;

/* Configuration of the VMM's first tap device. */
struct crosvm_net_config {
  int tap_fd;                  /* tap descriptor, owned by the caller */
  uint32_t host_ip;            /* network byte order */
  uint32_t netmask;            /* network byte order */
  uint8_t host_mac_address[6];
  uint8_t _padding[2];
};

#ifdef static_assert
static_assert(sizeof(struct crosvm_net_config) == 20,
              "extra padding in struct crosvm_net_config");
#endif

/* One GSI route for crosvm_set_irq_routing. */
struct crosvm_irq_route {
  uint32_t irq_id; /* GSI */
  uint32_t kind;   /* enum crosvm_irq_route_kind */
  union {
    struct {
      uint32_t irqchip; /* KVM_IRQCHIP_PIC_MASTER/_SLAVE/_IOAPIC */
      uint32_t pin;
    } irqchip;
    struct {
      uint64_t address;
      uint32_t data;
      uint8_t _reserved[4];
    } msi;
    uint8_t _reserved[16];
  };
};

#ifdef static_assert
static_assert(sizeof(struct crosvm_irq_route) == 24,
              "extra padding in struct crosvm_irq_route");
#endif

/* Register-match entry of a struct crosvm_hint. */
struct crosvm_hint_detail {
  bool match_rax;
  bool match_rbx;
  bool match_rcx;
  bool match_rdx;
  uint8_t _reserved[4];
  uint64_t rax;
  uint64_t rbx;
  uint64_t rcx;
  uint64_t rdx;
  bool send_sregs;
  bool send_debugregs;
  uint8_t _reserved2[6];
};

#ifdef static_assert
static_assert(sizeof(struct crosvm_hint_detail) == 48,
              "extra padding in struct crosvm_hint_detail");
#endif

/* Hypercall hint for crosvm_set_hypercall_hint. */
struct crosvm_hint {
  uint32_t hint_version;  /* must be 0 */
  uint32_t _reserved;     /* must be 0 */
  uint32_t address_space; /* enum crosvm_address_space */
  uint16_t address_flags; /* 0 or CROSVM_HINT_ON_WRITE */
  uint16_t details_count; /* at most CROSVM_MAX_HINT_DETAIL_COUNT */
  uint64_t address;       /* must be non-zero */
  union {
    struct crosvm_hint_detail *details;
    uint64_t _reserved2;
  };
};

#ifdef static_assert
static_assert(sizeof(struct crosvm_hint) == 32,
              "extra padding in struct crosvm_hint");
#endif

/* An event reported by crosvm_vcpu_wait. */
struct crosvm_vcpu_event {
  uint32_t kind; /* enum crosvm_vcpu_event_kind */
  uint8_t _padding[4];
  union {
    /* CROSVM_VCPU_EVENT_KIND_IO_ACCESS */
    struct {
      uint32_t address_space; /* enum crosvm_address_space */
      uint8_t _padding[4];
      uint64_t address;
      /* length bytes: the written data, or the buffer to fill for a read;
       * valid until crosvm_vcpu_resume */
      uint8_t *data;
      uint32_t length;
      uint8_t is_write;
      /* the guest already continued: only crosvm_vcpu_wait may follow */
      uint8_t no_resume;
      uint8_t _reserved[2];
    } io_access;

    /* CROSVM_VCPU_EVENT_KIND_PAUSED: the pointer given to
     * crosvm_pause_vcpus */
    void *user;

    /* CROSVM_VCPU_EVENT_KIND_HYPERV_HCALL */
    struct {
      uint64_t input;
      /* library-owned, initially 0: store the result before resuming */
      uint64_t *result;
      uint64_t params[2];
    } hyperv_call;

    /* CROSVM_VCPU_EVENT_KIND_HYPERV_SYNIC */
    struct {
      uint32_t msr;
      uint32_t _reserved;
      uint64_t control;
      uint64_t evt_page;
      uint64_t msg_page;
    } hyperv_synic;

    uint8_t _reserved[64];
  };
};

#ifdef static_assert
static_assert(sizeof(struct crosvm_vcpu_event) == 72,
              "extra padding in struct crosvm_vcpu_event");
#endif

/* ---- Connections ---------------------------------------------------- */

/* Adopts the socket named by CROSVM_SOCKET (missing: -ENOTCONN, invalid:
 * -EINVAL) and fetches the vcpu channels. Call once, first. */
int crosvm_connect(struct crosvm **);

/* Opens another main connection sharing vcpus and object ids. */
int crosvm_new_connection(struct crosvm *, struct crosvm **);

/* Closes the connection; always returns 0 and sets *self to NULL. */
int crosvm_destroy_connection(struct crosvm **);

/* Returns a new descriptor (caller-owned) for the VM's shutdown eventfd.
 * Write 1 to it to stop the VM; poll rather than read it to watch for the
 * end (crosvm_vcpu_wait already returns -ESHUTDOWN then). */
int crosvm_get_shutdown_eventfd(struct crosvm *);

/* ---- Capability and CPU queries -------------------------------------- */

int crosvm_check_extension(struct crosvm *, uint32_t __extension,
                           bool *has_extension);

/* VM-level capabilities are not supported: always -EINVAL. */
int crosvm_enable_capability(struct crosvm *, uint32_t __capability,
                             uint32_t __flags, uint64_t __args[4]);

/* List queries: *out_count is always written; more entries than
 * entry_count gives -E2BIG. */
int crosvm_get_supported_cpuid(struct crosvm *, uint32_t __entry_count,
                               struct kvm_cpuid_entry2 *__cpuid_entries,
                               uint32_t *__out_count);
int crosvm_get_emulated_cpuid(struct crosvm *, uint32_t __entry_count,
                              struct kvm_cpuid_entry2 *__cpuid_entries,
                              uint32_t *__out_count);
int crosvm_get_hyperv_cpuid(struct crosvm_vcpu *, uint32_t __entry_count,
                            struct kvm_cpuid_entry2 *__cpuid_entries,
                            uint32_t *__out_count);
int crosvm_get_msr_index_list(struct crosvm *, uint32_t __entry_count,
                              uint32_t *__msr_indices, uint32_t *__out_count);

/* ---- Network --------------------------------------------------------- */

int crosvm_net_get_config(struct crosvm *, struct crosvm_net_config *);

/* ---- Reservations and hints ------------------------------------------ */

/* length 0 removes the reservation starting at __start. */
int crosvm_reserve_range(struct crosvm *, uint32_t __space, uint64_t __start,
                         uint64_t __length);
int crosvm_reserve_async_write_range(struct crosvm *, uint32_t __space,
                                     uint64_t __start, uint64_t __length);

/* hints_count 0 clears the hint. */
int crosvm_set_hypercall_hint(struct crosvm *, uint32_t __hints_count,
                              const struct crosvm_hint *__hints);

/* ---- Interrupts ------------------------------------------------------ */

int crosvm_set_irq(struct crosvm *, uint32_t __irq_id, bool __active);
int crosvm_set_irq_routing(struct crosvm *, uint32_t __route_count,
                           const struct crosvm_irq_route *__routes);

/* ---- VM-wide state --------------------------------------------------- */

int crosvm_get_pic_state(struct crosvm *, bool __primary,
                         struct kvm_pic_state *__pic_state);
int crosvm_set_pic_state(struct crosvm *, bool __primary,
                         const struct kvm_pic_state *__pic_state);
int crosvm_get_ioapic_state(struct crosvm *,
                            struct kvm_ioapic_state *__ioapic_state);
int crosvm_set_ioapic_state(struct crosvm *,
                            const struct kvm_ioapic_state *__ioapic_state);
int crosvm_get_pit_state(struct crosvm *, struct kvm_pit_state2 *__pit_state);
int crosvm_set_pit_state(struct crosvm *,
                         const struct kvm_pit_state2 *__pit_state);
int crosvm_get_clock(struct crosvm *, struct kvm_clock_data *__clock_data);
int crosvm_set_clock(struct crosvm *, const struct kvm_clock_data *__clock_data);
int crosvm_set_identity_map_addr(struct crosvm *, uint32_t __addr);

/* ---- Run control ----------------------------------------------------- */

int crosvm_pause_vcpus(struct crosvm *, uint64_t __cpu_mask, void *__user);
int crosvm_start(struct crosvm *);

/* ---- Objects --------------------------------------------------------- */

/* __length is 0 (any write) or 1, 2, 4, 8 (writes of that width whose value
 * equals the __length bytes at __datamatch; NULL __datamatch: any value). */
int crosvm_create_io_event(struct crosvm *, uint32_t __space, uint64_t __addr,
                           uint32_t __length, const uint8_t *__datamatch,
                           struct crosvm_io **);
int crosvm_destroy_io_event(struct crosvm *, struct crosvm_io **);
int crosvm_io_event_fd(struct crosvm_io *);

/* __offset and __length must be multiples of 4096; the memfd needs the
 * F_SEAL_SHRINK seal. The caller keeps __fd. */
int crosvm_create_memory(struct crosvm *, int __fd, uint64_t __offset,
                         uint64_t __length, uint64_t __start, bool __read_only,
                         bool __dirty_log, struct crosvm_memory **);
int crosvm_destroy_memory(struct crosvm *, struct crosvm_memory **);
/* __log needs room for ceil(ceil(length / 4096) / 8) bytes. */
int crosvm_memory_get_dirty_log(struct crosvm *, struct crosvm_memory *,
                                uint8_t *__log);

int crosvm_create_irq_event(struct crosvm *, uint32_t __irq_id,
                            struct crosvm_irq **);
int crosvm_destroy_irq_event(struct crosvm *, struct crosvm_irq **);
int crosvm_irq_event_get_fd(const struct crosvm_irq *);
int crosvm_irq_event_get_resample_fd(const struct crosvm_irq *);

/* ---- Vcpus ----------------------------------------------------------- */

/* Library-owned handle for vcpu __cpu_id (-ENOENT past the last vcpu). */
int crosvm_get_vcpu(struct crosvm *, uint32_t __cpu_id, struct crosvm_vcpu **);

/* Blocks until the next event of the vcpu.
 *
 * The first event of every vcpu is INIT, once all vcpus exist (after
 * crosvm_start). No vcpu runs guest code until every vcpu has been resumed
 * from its INIT (the start barrier): a plugin must wait on, and resume,
 * every vcpu of the VM. At INIT the vcpu is in x86 reset state (real mode,
 * CS base 0xffff0000, RIP 0xfff0; vcpus other than 0 are waiting for a
 * startup IPI): set the segments as well as RIP.
 *
 * Extensions of this library (vmm), source-compatible with crosvm 0.22:
 *  -ESHUTDOWN  the host is stopping the VM (its shutdown eventfd was
 *              signalled) and this vcpu has nothing more to report; *event
 *              is not written; the vcpu needs no resume, later waits (and
 *              resumes) return -ESHUTDOWN again. The plugin should clean up
 *              and exit: no watcher thread on the shutdown eventfd is
 *              needed (and reading that eventfd resets it for everyone).
 *  -EBUSY      the previous event still needs crosvm_vcpu_resume; nothing
 *              was read (the old library blocked forever here).
 * With CROSVM_PLUGIN_LOG=debug in the plugin's environment
 * (vmm --plugin-env CROSVM_PLUGIN_LOG=debug), every failing call prints
 * its cause to stderr, e.g. "reserve_range(IoPort, 0x3f8, 8): EPERM: ...". */
int crosvm_vcpu_wait(struct crosvm_vcpu *, struct crosvm_vcpu_event *);

/* Lets the vcpu continue (not after a no_resume event; -ESHUTDOWN once
 * crosvm_vcpu_wait has reported the shutdown). */
int crosvm_vcpu_resume(struct crosvm_vcpu *);

/* The state calls below are valid only while the vcpu is stopped in an
 * event. Register sets are deferred until the next resume. */
int crosvm_vcpu_get_regs(struct crosvm_vcpu *, struct kvm_regs *);
int crosvm_vcpu_set_regs(struct crosvm_vcpu *, const struct kvm_regs *);
int crosvm_vcpu_get_sregs(struct crosvm_vcpu *, struct kvm_sregs *);
int crosvm_vcpu_set_sregs(struct crosvm_vcpu *, const struct kvm_sregs *);
int crosvm_vcpu_get_fpu(struct crosvm_vcpu *, struct kvm_fpu *);
int crosvm_vcpu_set_fpu(struct crosvm_vcpu *, const struct kvm_fpu *);
int crosvm_vcpu_get_debugregs(struct crosvm_vcpu *, struct kvm_debugregs *);
int crosvm_vcpu_set_debugregs(struct crosvm_vcpu *,
                              const struct kvm_debugregs *);
int crosvm_vcpu_get_xcrs(struct crosvm_vcpu *, struct kvm_xcrs *);
int crosvm_vcpu_set_xcrs(struct crosvm_vcpu *, const struct kvm_xcrs *);

/* *__out_count is always written; more values than __msr_count gives
 * -E2BIG. Only the data members of __msr_entries are written. */
int crosvm_vcpu_get_msrs(struct crosvm_vcpu *, uint32_t __msr_count,
                         struct kvm_msr_entry *__msr_entries,
                         uint32_t *__out_count);
int crosvm_vcpu_set_msrs(struct crosvm_vcpu *, uint32_t __msr_count,
                         const struct kvm_msr_entry *__msr_entries);
int crosvm_vcpu_set_cpuid(struct crosvm_vcpu *, uint32_t __cpuid_count,
                          const struct kvm_cpuid_entry2 *__cpuid_entries);

/* __flags and all four __args must be 0. */
int crosvm_vcpu_enable_capability(struct crosvm_vcpu *, uint32_t __capability,
                                  uint32_t __flags, uint64_t __args[4]);

int crosvm_vcpu_get_lapic_state(struct crosvm_vcpu *,
                                struct kvm_lapic_state *);
int crosvm_vcpu_set_lapic_state(struct crosvm_vcpu *,
                                const struct kvm_lapic_state *);
int crosvm_vcpu_get_mp_state(struct crosvm_vcpu *, struct kvm_mp_state *);
int crosvm_vcpu_set_mp_state(struct crosvm_vcpu *, const struct kvm_mp_state *);
int crosvm_vcpu_get_vcpu_events(struct crosvm_vcpu *,
                                struct kvm_vcpu_events *);
int crosvm_vcpu_set_vcpu_events(struct crosvm_vcpu *,
                                const struct kvm_vcpu_events *);

#ifdef __cplusplus
}
#endif

#endif /* __CROSVM_H__ */
