/* crosvm_ext.h: vmm's extensions to the crosvm plugin C API.
 *
 * crosvm.h stays source-compatible with crosvm's plugin API 0.22; what is
 * declared here exists only in vmm's libcrosvm_plugin. A plugin that uses
 * none of it never sees an extension event. See docs/protocol-extensions.md
 * §4 (coalesced write ranges), §5 (the control channel), §6 (snapshots),
 * §8 (live migration), §9 (hot restart) and docs/c-api.md.
 */
#ifndef CROSVM_EXT_H
#define CROSVM_EXT_H

#include <stddef.h>
#include <stdint.h>

#include "crosvm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Coalesced write ranges ----------------------------------------- */

/* A crosvm_vcpu_event.kind: a batch of guest writes to coalesced ranges.
 * Read it with crosvm_vcpu_event_coalesced_writes(); it needs no
 * crosvm_vcpu_resume (only crosvm_vcpu_wait may follow). */
#define CROSVM_VCPU_EVENT_KIND_COALESCED_WRITES 1000u

/* One guest write (24 bytes). */
struct crosvm_coalesced_write {
  uint64_t address;       /* port number or guest-physical address */
  uint32_t address_space; /* enum crosvm_address_space */
  uint32_t length;        /* 1 to 8: the first length bytes of data */
  uint8_t data[8];
};

/* The member of crosvm_vcpu_event.event for that kind. */
struct crosvm_coalesced_writes {
  /* count writes, oldest first, all made before the vcpu's next event;
   * valid until the next crosvm_vcpu_wait on this vcpu */
  const struct crosvm_coalesced_write *writes;
  uint32_t count;
  uint32_t _reserved;
};

/* Reserves [start, start + length) of address_space as a coalesced range:
 * the guest's writes to it are collected by KVM without stopping the vcpu
 * and delivered in batches. Reads are not reported (they read 0). Errors:
 * -EINVAL (bad space, length 0 is unreserve, longer than 4 GiB - 1, ports
 * beyond 0xffff), -EPERM (overlaps a reserved range or an ioeventfd),
 * -ENOSPC (too many coalesced ranges), or KVM's errno. Remove it with
 * crosvm_reserve_range(self, address_space, start, 0). */
int crosvm_reserve_coalesced_range(struct crosvm *self, uint32_t address_space,
                                   uint64_t start, uint64_t length);

/* The batch of a CROSVM_VCPU_EVENT_KIND_COALESCED_WRITES event. */
static inline const struct crosvm_coalesced_writes *
crosvm_vcpu_event_coalesced_writes(const struct crosvm_vcpu_event *event) {
  /* the anonymous union starts where each of its members does */
  return (const struct crosvm_coalesced_writes *)(const void *)&event->io_access;
}

/* ---- The control channel ------------------------------------------- */

/* Commands a management client sends to vmm's control socket (powerbtn,
 * sleepbtn, plugin NAME [JSON]) reach a plugin that opened its control
 * channel; a plugin that never does is not sent any (the client gets
 * not-supported). One thread may receive while others reply. */
struct crosvm_control;

/* crosvm_control_command.kind */
#define CROSVM_CONTROL_CUSTOM 0u          /* plugin NAME [JSON] */
#define CROSVM_CONTROL_POWER_BUTTON 1u    /* powerbtn */
#define CROSVM_CONTROL_SLEEP_BUTTON 2u    /* sleepbtn */
#define CROSVM_CONTROL_SAVE_STATE 3u      /* snapshot: reply_state (§6) */
#define CROSVM_CONTROL_RESUMED 4u         /* snapshot done: no reply (§6) */
#define CROSVM_CONTROL_DIRTY_PAGES 5u     /* migration: reply_dirty_pages (§8) */
#define CROSVM_CONTROL_UNKNOWN 0xffffffffu /* newer host: reply -ENOTSUP */

struct crosvm_control_command {
  uint64_t id;       /* pass it back to the reply */
  uint32_t kind;     /* CROSVM_CONTROL_* */
  uint32_t args_len; /* strlen(args) */
  /* Both NUL-terminated, valid until the next crosvm_control_recv or
   * crosvm_control_close on this handle. name is "" unless CUSTOM; args
   * is a JSON document ("null" when there are none). */
  const char *name;
  const char *args;
};

/* Opens the control channel (one per VM: -EEXIST while open; -ENOTTY from
 * a host without the extension). */
int crosvm_control_open(struct crosvm *self, struct crosvm_control **out);

/* The descriptor to poll (readable: a command or the host's hang-up).
 * Owned by the handle. */
int crosvm_control_fd(struct crosvm_control *self);

/* Waits for the next command. 0: *cmd is filled; -ESHUTDOWN: the host
 * closed the channel (vmm is exiting); other -errno on failure. */
int crosvm_control_recv(struct crosvm_control *self,
                        struct crosvm_control_command *cmd);

/* Answers command id with success; json is a NUL-terminated JSON document
 * of at most 60 KiB (NULL: null). */
int crosvm_control_reply(struct crosvm_control *self, uint64_t id,
                         const char *json);

/* Refuses command id with a positive errno and a message for the client. */
int crosvm_control_reply_error(struct crosvm_control *self, uint64_t id,
                               int errno_value, const char *message);

/* ---- Snapshots (§6) ------------------------------------------------ */

/* Largest device state a snapshot takes. */
#define CROSVM_DEVICE_STATE_MAX (16u << 20)

/* Answers CROSVM_CONTROL_SAVE_STATE command id with the plugin's device
 * state: len bytes at state (NULL if len is 0), at most
 * CROSVM_DEVICE_STATE_MAX (-EINVAL) and at most what the channel's socket
 * buffer takes in one packet (-EMSGSIZE). The vcpus are paused; until
 * CROSVM_CONTROL_RESUMED the plugin must not write guest memory. */
int crosvm_control_reply_state(struct crosvm_control *self, uint64_t id,
                               const void *state, size_t len);

/* ---- Live migration (§8) ------------------------------------------- */

/* Answers CROSVM_CONTROL_DIRTY_PAGES command id with the count
 * guest-physical page addresses at pages (NULL if count is 0) the plugin
 * wrote into guest memory itself since the previous DIRTY_PAGES (KVM's
 * dirty log does not see them). A plugin that writes guest memory only
 * before crosvm_start answers with none. Between SAVE_STATE and RESUMED
 * the plugin must not write guest memory. */
int crosvm_control_reply_dirty_pages(struct crosvm_control *self, uint64_t id,
                                     const uint64_t *pages, size_t count);

/* A write tracker: the pages the plugin wrote into guest memory itself,
 * kept until a DIRTY_PAGES asks for them. Share one between the writers
 * and the control thread (it locks). Every function returns 0 or -errno
 * (-EINVAL for a NULL handle or buffer). A plugin that writes guest memory
 * after crosvm_start writes through crosvm_write_tracker_write (or marks
 * what it wrote otherwise) and answers DIRTY_PAGES with
 * crosvm_control_reply_tracked_pages. Between SAVE_STATE and RESUMED it
 * must not write at all: stop the writers before answering SAVE_STATE
 * (the plugin's own lock around its writes and its device state). */
struct crosvm_write_tracker;

int crosvm_write_tracker_new(struct crosvm_write_tracker **out);
/* Frees the tracker (its pages are forgotten); sets *self to NULL. */
int crosvm_write_tracker_destroy(struct crosvm_write_tracker **self);
/* Notes a write of len bytes at guest-physical gpa made some other way:
 * every page it touches (len 0: none). */
int crosvm_write_tracker_mark(const struct crosvm_write_tracker *self, uint64_t gpa,
                              size_t len);
/* Copies len bytes from bytes to dst, the plugin's mapping of
 * guest-physical gpa, with volatile stores (the guest may access the
 * memory meanwhile), and notes the pages. -EINVAL: gpa + len wraps. */
int crosvm_write_tracker_write(const struct crosvm_write_tracker *self, void *dst,
                               uint64_t gpa, const void *bytes, size_t len);
/* Answers CROSVM_CONTROL_DIRTY_PAGES command id with the tracker's pages
 * (each once, sorted) and forgets them. A failed reply keeps them in the
 * tracker: -EINVAL for more than 1,500,000 pages (the command is not
 * answered: refuse it with crosvm_control_reply_error), or the channel's
 * errno. */
int crosvm_control_reply_tracked_pages(struct crosvm_control *self, uint64_t id,
                                       const struct crosvm_write_tracker *tracker);

/* Is vmm restoring a snapshot (vmm --restore)? Ask before crosvm_start.
 * Returns 0 with *out_len = 0 on a fresh boot (also from a host without
 * the extension); 1 when restoring, with the device state saved in the
 * snapshot copied to buf and its size in *out_len (0: the snapshot has no
 * device state); -E2BIG if len is too small (*out_len is the size needed;
 * buf may be NULL with len 0 to ask the size); other -errno on failure. */
int crosvm_get_restore_state(struct crosvm *self, void *buf, size_t len,
                             size_t *out_len);

/* Fast reset (protocol extension 7), only while every vcpu is stopped in
 * the plugin's hands (waiting in an exit for its resume, or paused):
 * crosvm_snapshot_in_memory has the host capture VM and vcpu state and a
 * private copy of guest memory and turn dirty logging on (*out_bytes, if
 * not NULL: the bytes copied); crosvm_reset_to_snapshot puts the machine
 * back, rewriting the pages KVM logged dirty plus the `count` guest-physical
 * page addresses at `pages` the plugin wrote itself (at most 20,000;
 * *out_pages, if not NULL: the pages copied back). 0 or -errno: -EBUSY a
 * vcpu runs, -ENOENT no snapshot, -EINVAL an address in no region (nothing
 * changed), -ENOTSUP a host without the extension. */
int crosvm_snapshot_in_memory(struct crosvm *self, uint64_t *out_bytes);
int crosvm_reset_to_snapshot(struct crosvm *self, const uint64_t *pages,
                             size_t count, uint64_t *out_pages);

/* Closes the channel (the host answers what is still waiting as failed)
 * and frees the handle; sets *self to NULL. */
int crosvm_control_close(struct crosvm_control **self);

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(struct crosvm_control_command) == 32,
               "struct crosvm_control_command is 32 bytes");
_Static_assert(sizeof(struct crosvm_coalesced_write) == 24,
               "struct crosvm_coalesced_write is 24 bytes");
_Static_assert(sizeof(struct crosvm_coalesced_writes) <= 64,
               "fits the event union");
#endif

/* ---- Hot restart (§9) ---------------------------------------------- */

#define CROSVM_RESTART_FRESH 0
#define CROSVM_RESTART_UPGRADE 1
#define CROSVM_RESTART_CRASH 2

/* Every function of this section returns 0 (or the count or kind it
 * says) or -errno; a NULL handle or out-pointer is -EINVAL. */
struct crosvm_attached;
struct crosvm_checkpoint;

/* Attach: is this plugin replacing another (vmm ctl S upgrade, or after a
 * crash under --on-plugin-crash restart)? Call it before creating
 * anything. *out gets the answer (CROSVM_RESTART_FRESH on a fresh boot or
 * from an old host); free it with crosvm_attached_destroy. */
int crosvm_attach(struct crosvm *self, struct crosvm_attached **out);
/* CROSVM_RESTART_*. */
int crosvm_attached_kind(const struct crosvm_attached *self);
/* UPGRADE: the old plugin's device state, valid until the destroy. */
int crosvm_attached_state(const struct crosvm_attached *self,
                          const uint8_t **state, size_t *len);
/* Takes the kept memory object id: a handle and its memfd (the caller's;
 * map it to reach guest memory). -EINVAL: no memory object id. */
int crosvm_attached_take_memory(struct crosvm_attached *self, uint32_t id,
                                struct crosvm_memory **out, int *out_fd);
/* Takes the kept checkpoint: 1 with *out, 0 (and *out NULL) without one,
 * -EBADMSG when its header is corrupted. */
int crosvm_attached_take_checkpoint(struct crosvm_attached *self,
                                    struct crosvm_checkpoint **out);
/* Takes the kept io event id: a handle as from crosvm_create_io_event
 * (crosvm_io_event_fd: the eventfd KVM signals, which the host kept;
 * destroy it with crosvm_destroy_io_event). -EINVAL: a NULL argument, or
 * no io event with that id (the object stays kept). */
int crosvm_attached_take_io_event(struct crosvm_attached *self, uint32_t id,
                                  struct crosvm_io **out);
/* Takes the kept irq event id: a handle as from crosvm_create_irq_event.
 * The host keeps only the trigger eventfd: the handle's resample eventfd
 * is a new one that is never signalled. -EINVAL as for io events. */
int crosvm_attached_take_irq_event(struct crosvm_attached *self, uint32_t id,
                                   struct crosvm_irq **out);
int crosvm_attached_destroy(struct crosvm_attached **self);

/* The crash-consistent checkpoint (double buffer, sequence, CRC-32). */
int crosvm_checkpoint_new(size_t capacity, struct crosvm_checkpoint **out);
/* Commit the state covering exits up to serial, before resuming the exit. */
int crosvm_checkpoint_commit(struct crosvm_checkpoint *self, uint64_t serial,
                             const void *blob, size_t len);
/* 1 with *serial, the blob in buf and its size in *out_len; 0 when nothing
 * was committed; -E2BIG (len too small, *out_len the size); -EBADMSG. */
int crosvm_checkpoint_load(const struct crosvm_checkpoint *self,
                           uint64_t *serial, void *buf, size_t len,
                           size_t *out_len);
int crosvm_checkpoint_destroy(struct crosvm_checkpoint **self);

/* This plugin can be replaced; the host keeps checkpoint's memfd (NULL:
 * none) for the next plugin. -ENOTTY from an old host. */
int crosvm_declare_restartable(struct crosvm *self,
                               const struct crosvm_checkpoint *checkpoint);
/* The serial of the vcpu's last exit that needed a resume. */
int crosvm_vcpu_serial(struct crosvm_vcpu *self, uint64_t *out);

#ifdef __cplusplus
}
#endif

#endif /* CROSVM_EXT_H */
