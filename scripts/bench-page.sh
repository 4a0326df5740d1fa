#!/usr/bin/env bash
# What open job pages cost the work protocol: `dispatcher serve` (release
# build) under named workers that report tokens (one row each in /status),
# alone and with PAGES pages polling /status as the page does, alternating,
# REPEATS times, at 256 workers x batch 64 and at 1,000 workers x batch 1.
# Reports items/s of the work protocol and the pages' /status latency.
#
#   scripts/bench-page.sh [REPEATS] [SECS] [PAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
secs=${2:-10}
pages=${3:-10}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli -p dispatcher-bench
bench=target/release/dispatcher-bench
server=target/release/dispatcher
input="$work/in10m.jsonl"
[ -s "$input" ] || $bench gen-input --lines 10000000 --out "$input"
ulimit -n "$(ulimit -H -n)"

addr_of() { # wait for "listening on ADDR" in file $1
  for _ in $(seq 1000); do
    a=$(sed -n 's/^listening on //p' "$1"); [ -n "$a" ] && { echo "$a"; return; }; sleep 0.01
  done; echo "no address in $1" >&2; exit 1
}

run() { # $1 = label, $2 = workers, $3 = batch, $4 = pages
  rm -f "$work"/page-out.jsonl* "$work/page-srv.out"
  $server serve --infile "$input" --outfile "$work/page-out.jsonl" --host 127.0.0.1 --port 0 \
    --work-timeout 3600 >"$work/page-srv.out" 2>"$work/page-srv.err" &
  sp=$!
  $bench load --addr "$(addr_of "$work/page-srv.out")" --workers "$2" --batch "$3" \
    --secs "$secs" --named --pages "$4" --label "$1"
  kill -TERM "$sp"; while kill -0 "$sp" 2>/dev/null; do sleep 0.01; done
}

for cfg in "256 64" "1000 1"; do
  # shellcheck disable=SC2086
  set -- $cfg
  for r in $(seq "$repeats"); do
    run "no-pages run=$r" "$1" "$2" 0
    run "pages run=$r" "$1" "$2" "$pages"
  done
done
