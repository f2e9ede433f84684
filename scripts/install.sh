#!/usr/bin/env bash
# Builds (release) and installs the C plugin library and vmm:
#   PREFIX/include/crosvm.h
#   PREFIX/lib/libcrosvm_plugin.so     (soname libcrosvm_plugin.so)
#   PREFIX/lib/libcrosvm_plugin.a
#   PREFIX/lib/pkgconfig/crosvm_plugin.pc
#   PREFIX/bin/vmm
# Usage: scripts/install.sh --prefix DIR [--no-build]
# Then: cc $(pkg-config --cflags --libs crosvm_plugin) my_plugin.c
#  or:  cc -static $(pkg-config --static --cflags --libs crosvm_plugin) my_plugin.c
# (with PKG_CONFIG_PATH=DIR/lib/pkgconfig unless DIR is a system prefix).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=""
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || { echo "install.sh: --prefix needs a directory" >&2; exit 2; }
                  prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (expected --prefix DIR [--no-build])" >&2; exit 2 ;;
    esac
done
if [ -z "$prefix" ]; then
    echo "install.sh: --prefix DIR is required" >&2
    exit 2
fi
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

target="${CARGO_TARGET_DIR:-target}/release"
if [ "$build" = 1 ]; then
    cargo build --release -p crosvm_plugin -p vmm
fi
for f in "$target/libcrosvm_plugin.so" "$target/libcrosvm_plugin.a" "$target/vmm"; do
    [ -f "$f" ] || { echo "install.sh: $f is missing (build first, or drop --no-build)" >&2; exit 1; }
done

version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -1)"
install -d "$prefix/include" "$prefix/lib/pkgconfig" "$prefix/bin"
install -m 0644 plugin-sdk/include/crosvm.h "$prefix/include/crosvm.h"
install -m 0755 "$target/libcrosvm_plugin.so" "$prefix/lib/libcrosvm_plugin.so"
install -m 0644 "$target/libcrosvm_plugin.a" "$prefix/lib/libcrosvm_plugin.a"
install -m 0755 "$target/vmm" "$prefix/bin/vmm"
cat > "$prefix/lib/pkgconfig/crosvm_plugin.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: crosvm_plugin
Description: crosvm-compatible plugin API (crosvm.h 0.22) for vmm plugins
Version: $version
Cflags: -I\${includedir} -pthread
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lcrosvm_plugin -pthread
Libs.private: -ldl -lm -lrt
PC
echo "installed into $prefix"
