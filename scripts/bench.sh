#!/usr/bin/env bash
# Builds and runs the exit-path benchmark; prints Markdown tables (README.md,
# "Performance"). Run it on an otherwise idle machine. Arguments go to
# vmm-bench (e.g. --iterations 100000 --runs 5).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
exec target/release/vmm-bench "$@"
