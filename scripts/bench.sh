#!/usr/bin/env bash
# Builds and runs the exit-path benchmark; prints Markdown tables (README.md,
# "Performance"). Run it on an otherwise idle machine. Arguments go to
# vmm-bench (e.g. --iterations 100000 --runs 5).
#
# Uses the `profiling` profile (release code plus line tables, see
# Cargo.toml) so that `perf` and friends can attribute the samples; it is
# built into target/profiling/, next to the release tree.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile profiling --workspace
exec target/profiling/vmm-bench "$@"
