#!/usr/bin/env bash
# Builds everything and runs the whole test suite on real KVM.
# Extra arguments go to `cargo nextest run` (e.g. a test name filter).
# Tests that cannot run on this machine say so (e2e_tests::require): their
# reasons are collected in target/release/skipped-tests.txt and printed at
# the end. With VMM_CI=1 (set by .ci/run) a missing requirement that CI
# provides fails the test instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -c /dev/kvm ]; then
    echo "error: /dev/kvm is missing: the test suite runs real guests and needs KVM" >&2
    exit 1
fi
# The end-to-end tests run the built vmm, examples and libcrosvm_plugin.so.
cargo build --release --workspace --all-targets

# The shipped C library stays of a normal size (no debug info in release).
max_so=$((5 * 1024 * 1024))
so_size=$(stat -c %s target/release/libcrosvm_plugin.so)
if [ "$so_size" -ge "$max_so" ]; then
    echo "error: target/release/libcrosvm_plugin.so is $so_size bytes, over the 5 MiB bound" >&2
    exit 1
fi

skipped=target/release/skipped-tests.txt
rm -f "$skipped"
status=0
cargo nextest run --release --workspace --no-fail-fast "$@" || status=$?
cargo test --release --workspace --doc || status=$?
if [ -s "$skipped" ]; then
    echo
    echo "**********************************************************************"
    echo "* $(wc -l <"$skipped") test(s) did NOT run on this machine (counted as passed above):"
    sed 's/^/*   /' "$skipped"
    echo "**********************************************************************"
fi
exit "$status"
