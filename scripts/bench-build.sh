#!/usr/bin/env bash
# What a build costs, from clean: a one-task crate's debug build (the crate of
# the book's "Your own task crate", depending on the checkout by path), and the
# `dispatcher` binary's release build and size. Each checkout given is measured
# in fresh target folders, one after the other; with none, this one. Compare a
# change with `git worktree add /tmp/old COMMIT` and both paths in one command.
#
#   scripts/bench-build.sh [CHECKOUT ...]
#
# Prints per checkout: crates compiled and seconds for the task crate, seconds
# for the release binary and its size in bytes. A figure that grows is a new
# dependency or feature every user pays for: say so in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
checkouts=("$@")
[ ${#checkouts[@]} -gt 0 ] || checkouts=("$here")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The task crate, from the book as it stands here.
crate="$work/task"
mkdir -p "$crate/src"
python3 - "$here/docs/src/tasks.md" "$crate" <<'PY'
import re, sys
chapter = open(sys.argv[1]).read()
section = chapter.split("## Your own task crate", 1)[1].split("\n## ", 1)[0]
toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
main = re.search(r"```rust[^\n]*\n(.*?)```", section, re.S).group(1)
open(f"{sys.argv[2]}/Cargo.toml", "w").write(toml + "\n[workspace]\n")
open(f"{sys.argv[2]}/src/main.rs", "w").write(main)
PY

for checkout in "${checkouts[@]}"; do
  checkout=$(cd "$checkout" && pwd)
  commit=$(git -C "$checkout" rev-parse --short HEAD)
  sed -i "s|^dispatcher = .*|dispatcher = { path = \"$checkout\" }|" "$crate/Cargo.toml"
  cp "$checkout/Cargo.lock" "$crate/Cargo.lock"
  rm -rf "$work/task-target" "$work/release-target"
  start=$(date +%s.%N)
  units=$(cd "$crate" && CARGO_TARGET_DIR="$work/task-target" cargo build --offline 2>&1 | grep -c '^ *Compiling ')
  task_secs=$(echo "$(date +%s.%N) - $start" | bc)
  start=$(date +%s.%N)
  (cd "$checkout" && CARGO_TARGET_DIR="$work/release-target" cargo build --release --locked -q -p dispatcher-cli --bin dispatcher)
  release_secs=$(echo "$(date +%s.%N) - $start" | bc)
  bytes=$(stat -c %s "$work/release-target/release/dispatcher")
  printf 'build checkout=%s commit=%s task_crate_units=%d task_crate_debug_secs=%.0f release_secs=%.0f binary_bytes=%d\n' \
    "$checkout" "$commit" "$units" "$task_secs" "$release_secs" "$bytes"
done
