//! `crosvm.h` and `libcrosvm_plugin`: the header compiles as C11 and C++
//! with the exact layouts, a C program links against the shared library,
//! and the library exports exactly the 60 API functions.

#[path = "common/cc.rs"]
mod cc;

use std::path::PathBuf;
use std::process::Command;

use cc::{library_dir, out_dir, CBuild};

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn library() -> PathBuf {
    library_dir().join("libcrosvm_plugin.so")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn header_layouts_compile_as_c11() {
    CBuild::c()
        .flags(["-std=c11", "-Wextra", "-pedantic", "-c"])
        .source(&sdk_dir().join("tests/c/layout.c"))
        .output(&out_dir().join("layout_c.o"))
        .run();
}

#[test]
fn header_layouts_compile_as_cxx() {
    CBuild::cxx()
        .flags(["-std=c++11", "-x", "c++", "-c"])
        .source(&sdk_dir().join("tests/c/layout.c"))
        .output(&out_dir().join("layout_cxx.o"))
        .run();
}

#[test]
fn header_size_asserts_are_guarded() {
    // Sanity check of the guard: with static_assert available the header's
    // own size assertions are compiled (a C11 build defines it).
    let src = out_dir().join("guard.c");
    std::fs::write(
        &src,
        "#include \"crosvm.h\"\n#ifndef static_assert\n#error no static_assert\n#endif\n",
    )
    .unwrap();
    CBuild::c()
        .flags(["-std=c11", "-fsyntax-only"])
        .source(&src)
        .run();
    // Older standards skip the assertions but still accept the header
    // (anonymous unions are a GNU extension there).
    CBuild::c()
        .flags(["-std=gnu99", "-fsyntax-only"])
        .source(&sdk_dir().join("tests/c/layout.c"))
        .run();
}

#[test]
fn c_program_links_and_connect_fails_without_socket() {
    let exe = out_dir().join("connect");
    CBuild::c()
        .flags(["-std=c11"])
        .source(&sdk_dir().join("tests/c/connect.c"))
        .output(&exe)
        .link_sdk()
        .run();
    let stdout = run(Command::new(&exe).env_remove("CROSVM_SOCKET"));
    assert!(stdout.contains("ok"), "{stdout}");
}

const API: [&str; 60] = [
    "crosvm_connect",
    "crosvm_new_connection",
    "crosvm_destroy_connection",
    "crosvm_get_shutdown_eventfd",
    "crosvm_check_extension",
    "crosvm_enable_capability",
    "crosvm_get_supported_cpuid",
    "crosvm_get_emulated_cpuid",
    "crosvm_get_hyperv_cpuid",
    "crosvm_get_msr_index_list",
    "crosvm_net_get_config",
    "crosvm_reserve_range",
    "crosvm_reserve_async_write_range",
    "crosvm_set_hypercall_hint",
    "crosvm_set_irq",
    "crosvm_set_irq_routing",
    "crosvm_get_pic_state",
    "crosvm_set_pic_state",
    "crosvm_get_ioapic_state",
    "crosvm_set_ioapic_state",
    "crosvm_get_pit_state",
    "crosvm_set_pit_state",
    "crosvm_get_clock",
    "crosvm_set_clock",
    "crosvm_set_identity_map_addr",
    "crosvm_pause_vcpus",
    "crosvm_start",
    "crosvm_create_io_event",
    "crosvm_destroy_io_event",
    "crosvm_io_event_fd",
    "crosvm_create_memory",
    "crosvm_destroy_memory",
    "crosvm_memory_get_dirty_log",
    "crosvm_create_irq_event",
    "crosvm_destroy_irq_event",
    "crosvm_irq_event_get_fd",
    "crosvm_irq_event_get_resample_fd",
    "crosvm_get_vcpu",
    "crosvm_vcpu_wait",
    "crosvm_vcpu_resume",
    "crosvm_vcpu_get_regs",
    "crosvm_vcpu_set_regs",
    "crosvm_vcpu_get_sregs",
    "crosvm_vcpu_set_sregs",
    "crosvm_vcpu_get_fpu",
    "crosvm_vcpu_set_fpu",
    "crosvm_vcpu_get_debugregs",
    "crosvm_vcpu_set_debugregs",
    "crosvm_vcpu_get_xcrs",
    "crosvm_vcpu_set_xcrs",
    "crosvm_vcpu_get_msrs",
    "crosvm_vcpu_set_msrs",
    "crosvm_vcpu_set_cpuid",
    "crosvm_vcpu_enable_capability",
    "crosvm_vcpu_get_lapic_state",
    "crosvm_vcpu_set_lapic_state",
    "crosvm_vcpu_get_mp_state",
    "crosvm_vcpu_set_mp_state",
    "crosvm_vcpu_get_vcpu_events",
    "crosvm_vcpu_set_vcpu_events",
];

#[test]
fn library_exports_exactly_the_api() {
    let out = run(Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(library()));
    let mut exported: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (_addr, kind, name) = (parts.next()?, parts.next()?, parts.next()?);
            (kind == "T" && name.starts_with("crosvm_")).then_some(name)
        })
        .collect();
    exported.sort_unstable();
    let mut want = API.to_vec();
    want.extend_from_slice(&EXT_API);
    want.sort_unstable();
    assert_eq!(exported, want);
}

/// The extension functions, declared in `crosvm_ext.h` only.
const EXT_API: [&str; 31] = [
    "crosvm_reserve_coalesced_range",
    "crosvm_control_open",
    "crosvm_control_fd",
    "crosvm_control_recv",
    "crosvm_control_reply",
    "crosvm_control_reply_error",
    "crosvm_control_close",
    "crosvm_control_reply_state",
    "crosvm_get_restore_state",
    "crosvm_snapshot_in_memory",
    "crosvm_reset_to_snapshot",
    "crosvm_control_reply_dirty_pages",
    "crosvm_attach",
    "crosvm_attached_kind",
    "crosvm_attached_state",
    "crosvm_attached_take_memory",
    "crosvm_attached_take_checkpoint",
    "crosvm_attached_destroy",
    "crosvm_checkpoint_new",
    "crosvm_checkpoint_commit",
    "crosvm_checkpoint_load",
    "crosvm_checkpoint_destroy",
    "crosvm_declare_restartable",
    "crosvm_vcpu_serial",
    "crosvm_attached_take_io_event",
    "crosvm_attached_take_irq_event",
    "crosvm_write_tracker_new",
    "crosvm_write_tracker_destroy",
    "crosvm_write_tracker_mark",
    "crosvm_write_tracker_write",
    "crosvm_control_reply_tracked_pages",
];

#[test]
fn extension_header_compiles_and_declares_the_extensions() {
    let header = std::fs::read_to_string(sdk_dir().join("include/crosvm_ext.h")).unwrap();
    for name in EXT_API {
        assert!(header.contains(&format!("int {name}(")), "{name} missing");
    }
    let dir = std::env::temp_dir().join(format!("crosvm_ext_h_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("ext.c");
    std::fs::write(
        &src,
        "#include \"crosvm_ext.h\"\n#include <stddef.h>\n\
         _Static_assert(offsetof(struct crosvm_coalesced_write, data) == 16, \"layout\");\n\
         int f(const struct crosvm_vcpu_event *e) {\n\
           return e->kind == CROSVM_VCPU_EVENT_KIND_COALESCED_WRITES ? \
                  (int)crosvm_vcpu_event_coalesced_writes(e)->count : 0;\n}\n\
         _Static_assert(offsetof(struct crosvm_control_command, name) == 16, \"layout\");\n\
         int g(struct crosvm_control *c) {\n\
           struct crosvm_control_command cmd;\n\
           if (crosvm_control_recv(c, &cmd)) return -1;\n\
           return cmd.kind == CROSVM_CONTROL_POWER_BUTTON ? crosvm_control_reply(c, cmd.id, NULL) : \
                  crosvm_control_reply_error(c, cmd.id, 95, cmd.name);\n}\n\
         int h(struct crosvm *vm, struct crosvm_control *c, uint64_t id) {\n\
           unsigned char blob[64]; size_t n = 0;\n\
           int r = crosvm_get_restore_state(vm, blob, sizeof blob, &n);\n\
           if (r < 0) return r;\n\
           _Static_assert(CROSVM_CONTROL_SAVE_STATE == 3u && CROSVM_CONTROL_RESUMED == 4u, \"kinds\");\n\
           return crosvm_control_reply_state(c, id, blob, n);\n}\n\
         int k(struct crosvm *vm) {\n\
           uint64_t bytes = 0, copied = 0, pages[1] = {0x1000};\n\
           int r = crosvm_snapshot_in_memory(vm, &bytes);\n\
           return r ? r : crosvm_reset_to_snapshot(vm, pages, 1, &copied);\n}\n\
         int m(struct crosvm_control *c, uint64_t id) {\n\
           uint64_t pages[2] = {0x1000, 0x2000};\n\
           _Static_assert(CROSVM_CONTROL_DIRTY_PAGES == 5u, \"kind\");\n\
           return crosvm_control_reply_dirty_pages(c, id, pages, 2);\n}\n\
         int t(struct crosvm_control *c, uint64_t id, void *ram) {\n\
           struct crosvm_write_tracker *w; uint32_t v = 1;\n\
           if (crosvm_write_tracker_new(&w)) return -1;\n\
           int r = crosvm_write_tracker_write(w, ram, 0x1000, &v, sizeof v);\n\
           r = r ? r : crosvm_write_tracker_mark(w, 0x2000, 8);\n\
           r = r ? r : crosvm_control_reply_tracked_pages(c, id, w);\n\
           crosvm_write_tracker_destroy(&w);\n\
           return r;\n}\n\
         int u(struct crosvm_attached *a) {\n\
           struct crosvm_io *io; struct crosvm_irq *irq;\n\
           int r = crosvm_attached_take_io_event(a, 1, &io);\n\
           return r ? r : crosvm_attached_take_irq_event(a, 2, &irq);\n}\n",
    )
    .unwrap();
    run(Command::new("gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-c", "-o"])
        .arg(dir.join("ext.o"))
        .arg("-I")
        .arg(sdk_dir().join("include"))
        .arg(&src));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn header_declares_every_api_function() {
    let header = std::fs::read_to_string(sdk_dir().join("include/crosvm.h")).unwrap();
    for name in API {
        assert!(
            header.contains(&format!("int {name}(")),
            "{name} missing from crosvm.h"
        );
    }
    let declared = header.matches("\nint crosvm_").count();
    assert_eq!(declared, 60);
}

/// The shipped library is of a normal size: the release profile carries no
/// debug info (Cargo.toml). Other profiles (debug, `profiling`) keep it.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "the size bound applies to the release profile"
)]
fn release_library_is_under_5_mib() {
    let profile = cc::profile_dir();
    if profile.file_name().is_some_and(|n| n != "release") {
        eprintln!(
            "not the release profile ({}): no size bound",
            profile.display()
        );
        return;
    }
    let size = std::fs::metadata(library())
        .expect("stat libcrosvm_plugin.so")
        .len();
    assert!(
        size < 5 << 20,
        "libcrosvm_plugin.so is {size} bytes, over 5 MiB"
    );
}
