#!/usr/bin/env bash
# Memory of `dispatcher serve` behind a stuck line: a worker takes line 0 and never
# answers, while W x B workers complete the following lines for SECS seconds.
# Once with --max-pending-mib 16 (results beyond it spill to disk), once with the
# cap out of reach (everything stays in memory), for comparison.
#
#   scripts/bench-stuck.sh [SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli -p dispatcher-bench
bench=target/release/dispatcher-bench
input="$work/in10m.jsonl"
[ -s "$input" ] || $bench gen-input --lines 10000000 --out "$input"

for cap in 16 100000; do
  rm -f "$work"/stuck.jsonl*
  target/release/dispatcher serve --infile "$input" --outfile "$work/stuck.jsonl" --host 127.0.0.1 --port 0 \
    --work-timeout 3600 --max-pending-mib "$cap" >"$work/stuck.out" 2>"$work/stuck.err" &
  sp=$!
  for _ in $(seq 200); do grep -q '^listening on ' "$work/stuck.out" && break; sleep 0.05; done
  addr=$(sed -n 's/^listening on //p' "$work/stuck.out")
  curl -sf "http://$addr/work?batch_size=1" >/dev/null   # line 0, never answered
  $bench load --addr "$addr" --workers 64 --batch 64 --secs "$secs" --label "stuck cap=${cap}MiB"
  status=$(curl -sf "http://$addr/status")
  echo "stuck cap=${cap}MiB peak_rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$sp/status)" \
    "waiting=$(echo "$status" | sed 's/.*"reorder_buffer":\([0-9]*\).*/\1/')" \
    "in_memory_bytes=$(echo "$status" | sed 's/.*"reorder_buffer_bytes":\([0-9]*\).*/\1/')" \
    "spilled=$(echo "$status" | sed 's/.*"reorder_buffer_spilled":\([0-9]*\).*/\1/')" \
    "pending_file_bytes=$(stat -c %s "$work/stuck.jsonl.pending" 2>/dev/null || echo 0)"
  kill "$sp"
  while kill -0 "$sp" 2>/dev/null; do sleep 0.05; done
done
