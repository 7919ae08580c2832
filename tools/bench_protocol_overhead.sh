#!/bin/sh
# The model protocol's overhead against the code before it, in one process: builds the standard
# library at BASELINE (default 0d9f286, the last commit before the protocol) in a worktree with
# its own target folder (cargo names path crates the same in both trees, so one folder would mix
# them), builds today's plugins and runs the `protocol` benchmark with both.
#
#     tools/bench_protocol_overhead.sh [BASELINE]
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
baseline=${1:-0d9f286}
work="$root/target/protocol-baseline"
cd "$root"
rm -rf "$work/src"
mkdir -p "$work"
git worktree add --force --detach "$work/src" "$baseline" >/dev/null
trap 'git worktree remove --force "$work/src"' EXIT
CARGO_TARGET_DIR="$work/target" cargo build --release -q -p ditflow-nodes --manifest-path "$work/src/Cargo.toml"
cp "$work/target/release/libditflow_nodes.so" "$work/libditflow_nodes_baseline.so"
cargo build --release -q && cargo build --release -q -p ditflow-testkit
cargo bench -q -p ditflow --bench protocol -- "$work/libditflow_nodes_baseline.so"
