#!/usr/bin/env bash
# The guard: this checkout's release build against COMMIT's, side by side in one
# run (scripts/bench-binaries.sh: serve at 64x1, 64x16 and 256x64, then
# estimate), printing each figure's share of COMMIT's. COMMIT is built once in a
# worktree under ~/.cache/dispatcher/ab/ and kept for the next comparison.
#
#   scripts/ab.sh COMMIT                     # e.g. scripts/ab.sh origin/main~3
#   REPEATS=5 SERVE_FLAGS="--group-by .g" scripts/ab.sh COMMIT
#
# A share under 100% means this build is slower than COMMIT's on that figure;
# within a few percent of 100% is the machine's noise (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
commit=$(git rev-parse --verify "$1^{commit}")
cache=${DISPATCHER_CACHE:-$HOME/.cache/dispatcher}/ab
tree="$cache/$commit"
if [ ! -x "$tree/target/release/dispatcher" ]; then
  mkdir -p "$cache"
  [ -d "$tree" ] || git worktree add --detach "$tree" "$commit" >&2
  (cd "$tree" && cargo build --release -q -p dispatcher-cli --bin dispatcher)
fi
cargo build --release -q -p dispatcher-cli --bin dispatcher
echo "# build 0: $commit ($tree); build 1: this checkout ($(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ', with changes'))"
exec scripts/bench-binaries.sh "$tree/target/release/dispatcher" target/release/dispatcher
