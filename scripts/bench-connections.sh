#!/usr/bin/env bash
# `dispatcher serve` (release build) with 10,000 keep-alive connections of which
# 1,000 are active workers, against the same 1,000 workers alone, alternating,
# REPEATS times. Reports items/s, p99 of GET /work and the server's peak RSS per
# run, and checks after each run that the output written so far is exactly the
# input's first lines (the load generator answers each line with itself).
#
#   scripts/bench-connections.sh [REPEATS] [SECS] [IDLE]
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
secs=${2:-10}
idle=${3:-9000}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli -p dispatcher-bench
bench=target/release/dispatcher-bench
server=${SERVER:-target/release/dispatcher}
input="$work/in2m.jsonl"
[ -s "$input" ] || $bench gen-input --lines 2000000 --out "$input"
ulimit -n "$(ulimit -H -n)"

addr_of() { # wait for "listening on ADDR" in file $1
  for _ in $(seq 1000); do
    a=$(sed -n 's/^listening on //p' "$1"); [ -n "$a" ] && { echo "$a"; return; }; sleep 0.01
  done; echo "no address in $1" >&2; exit 1
}

run() { # $1 = label, $2 = idle connections
  rm -f "$work"/conn-out.jsonl* "$work/conn-srv.out"
  $server serve --infile "$input" --outfile "$work/conn-out.jsonl" --host 127.0.0.1 --port 0 \
    --work-timeout 3600 >"$work/conn-srv.out" 2>"$work/conn-srv.err" &
  sp=$!
  line=$($bench load --addr "$(addr_of "$work/conn-srv.out")" --workers 1000 --batch 1 \
    --secs "$secs" --idle "$2" --label "$1")
  rss=$(awk '/VmHWM/ {print $2}' /proc/$sp/status)
  kill -TERM "$sp"; while kill -0 "$sp" 2>/dev/null; do sleep 0.01; done
  n=$(wc -l <"$work/conn-out.jsonl")
  # Exact: the load generator answers each line with itself, so the output
  # must be the input's first lines, byte for byte.
  head -n "$n" "$input" | cmp -s - "$work/conn-out.jsonl" ||
    { echo "$1: the output is not the input's lines in order" >&2; exit 1; }
  echo "$line peak_rss_kb=$rss lines_written=$n exact=yes"
}

for r in $(seq "$repeats"); do
  run "alone run=$r" 0
  run "crowd run=$r" "$idle"
done
