#!/usr/bin/env bash
# Builds everything and runs the whole test suite on real KVM.
# Extra arguments go to `cargo nextest run` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -c /dev/kvm ]; then
    echo "error: /dev/kvm is missing: the test suite runs real guests and needs KVM" >&2
    exit 1
fi
# The end-to-end tests run the built vmm, examples and libcrosvm_plugin.so.
cargo build --release --workspace --all-targets
cargo nextest run --release --workspace --no-fail-fast "$@"
cargo test --release --workspace --doc
