#!/usr/bin/env bash
# Where `dispatcher serve` spends its CPU under load (#42): the release server on
# the benchmark's 10M-line input, `dispatcher-bench load` at WORKERS x BATCH for
# SECS, sampled by `perf record` (Debian's linux-perf) at 999 Hz with call
# graphs; prints the top ENTRIES symbols by self time, and where they are called
# from is in $BENCH_DIR/profile-WxB.data for `perf report`.
#
#   scripts/profile-server.sh [WORKERS] [BATCH] [SECS] [ENTRIES]
#   SERVE_FLAGS="--group-by .g" LOAD_FLAGS="--named" ...   # flags of serve, of load
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-256}
batch=${2:-64}
secs=${3:-10}
entries=${4:-25}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
command -v perf >/dev/null || { echo "perf is not installed (apt install linux-perf)" >&2; exit 1; }
cargo build --release -q -p dispatcher-cli -p dispatcher-bench
bench=target/release/dispatcher-bench
input="$work/in10m.jsonl"
[ -s "$input" ] || $bench gen-input --lines 10000000 --out "$input"
rm -f "$work"/prof-out.jsonl*
target/release/dispatcher serve --infile "$input" --outfile "$work/prof-out.jsonl" --host 127.0.0.1 \
  --port 0 --work-timeout 3600 ${SERVE_FLAGS:-} >"$work/prof-srv.out" 2>"$work/prof-srv.err" &
sp=$!
trap 'kill -TERM $sp 2>/dev/null; wait $sp 2>/dev/null' EXIT
for _ in $(seq 3000); do
  addr=$(sed -n 's/^listening on //p' "$work/prof-srv.out"); [ -n "$addr" ] && break; sleep 0.01
done
data="$work/profile-${workers}x${batch}.data"
perf record -F 999 -g -a -o "$data" -- sleep "$((secs + 1))" 2>"$work/perf-record.err" &
pp=$!
$bench load --addr "$addr" --workers "$workers" --batch "$batch" --secs "$secs" ${LOAD_FLAGS:-} --label "profiled"
wait "$pp" || echo "perf record ended with status $? (see $work/perf-record.err)" >&2
echo "# top $entries symbols by self time, serve at ${workers}x${batch}${SERVE_FLAGS:+ ($SERVE_FLAGS)}"
perf report -i "$data" --pid "$sp" --no-children --sort symbol --stdio 2>/dev/null \
  | grep -E '^ +[0-9.]+%' | sed -E 's/ +- +- *$//; s/ +$//' | head -n "$entries"
