#!/usr/bin/env bash
# What `--group-by` costs the server (#42): this build's `serve` plain and with
# each grouping below, side by side in one run (scripts/bench-binaries.sh, so the
# same alternation, configurations and medians), each grouped figure as a share
# of plain `serve`:
#   .g                     no line has the field: every line keyless
#   .prompt                every line a key of its own (the worst case)
#   .prompt, prefix 31     keys of 10 to 100 lines ("Summarize document number 12345")
#
#   scripts/bench-grouping.sh [DISPATCHER]     (default target/release/dispatcher)
#   LOAD_FLAGS=--named REPEATS=3 SECS=5 CONFIGS="64 1|64 16|256 64" ...
#
# Workers are anonymous unless LOAD_FLAGS=--named (dispatcher's own workers name
# themselves; grouping can only hand a key to a worker that does).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/dispatcher}")
[ "$bin" != "$(realpath target/release/dispatcher)" ] || cargo build --release -q -p dispatcher-cli
work=${BENCH_DIR:-target/bench}
mkdir -p "$work/grouping"
# One wrapper per grouping: bench-binaries.sh runs `BUILD serve ...`.
wrapper() { # $1 name, rest: the grouping flags
  local path="$work/grouping/$1" flags=""
  [ $# -gt 1 ] && flags=$(printf ' %q' "${@:2}")
  printf '#!/bin/sh\nexec %q "$@"%s\n' "$bin" "$flags" >"$path"
  chmod +x "$path"
  echo "$path"
}
plain=$(wrapper plain)
keyless=$(wrapper keyless --group-by .g)
distinct=$(wrapper distinct --group-by .prompt)
shared=$(wrapper shared --group-by .prompt --group-by-prefix 31)
echo "# builds: 0 plain serve, 1 --group-by .g, 2 --group-by .prompt, 3 --group-by .prompt --group-by-prefix 31"
ESTIMATE_LINES=0 scripts/bench-binaries.sh "$plain" "$keyless" "$distinct" "$shared"
