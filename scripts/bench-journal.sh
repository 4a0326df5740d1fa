#!/usr/bin/env bash
# The journal under preemption. `examples/five_steps` (five requests a line, each
# on the last) on the echo engine with LATENCY ms a request; SIX workers, of which
# two are preempted (SIGTERM, as Slurm preempts) once a third of the lines are
# done, and replaced by two new ones (as a requeued job would be). With the
# journal (the default) and with --no-journal (server and workers), RUNS runs of
# each, alternating. Prints engine requests sent by all workers, requests
# answered from journals, and wall time (server start to exit).
#
#   RUNS=3 LINES=240 LATENCY=200 scripts/bench-journal.sh
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
lines=${LINES:-240}
latency=${LATENCY:-200}
cargo build --release -q -p dispatcher-cli --bin dispatcher
cargo build --release -q --example five_steps
server=target/release/dispatcher
task=target/release/examples/five_steps
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
echo "work dir: $work" >&2
python3 -c "
import json
for i in range($lines): print(json.dumps({'question': f'Question {i}: explain item {i}.'}))
" > "$work/in.jsonl"

run() { # $1: journal | no-journal
  local mode=$1 flags=()
  [ "$mode" = no-journal ] && flags=(--no-journal)
  rm -f "$work"/out.jsonl* "$work"/w*.log
  local start=$(date +%s.%N)
  $server serve --infile "$work/in.jsonl" --outfile "$work/out.jsonl" --host 127.0.0.1 --port 0 \
    --work-timeout 30 --exit-grace 0.5 "${flags[@]}" >"$work/serve.out" 2>"$work/serve.err" &
  local sp=$!
  for _ in $(seq 500); do grep -q '^listening on ' "$work/serve.out" && break; sleep 0.01; done
  local addr=$(sed -n 's/^listening on //p' "$work/serve.out")
  worker() { $task --dispatcher "$addr" --engine echo --echo-latency-ms "$latency" --workers 8 \
    --batch-size 4 --vanish-wait 1 "${flags[@]}" >/dev/null 2>"$work/w$1.log" & echo $!; }
  local pids=()
  for i in 1 2 3 4 5 6; do pids+=("$(worker "$i")"); done
  while kill -0 "$sp" 2>/dev/null; do
    # The job's lines_done comes first; each worker in "workers" has its own.
    done_=$(curl -sf "http://$addr/status" | grep -o '"lines_done":[0-9]*' | head -1 | cut -d: -f2) || done_=0
    [ "${done_:-0}" -ge $((lines / 3)) ] && break
    sleep 0.05
  done
  kill -TERM "${pids[0]}" "${pids[1]}"
  pids+=("$(worker 7)" "$(worker 8)")
  wait "$sp"
  local end=$(date +%s.%N)
  # The workers are not this shell's children: wait for their summary lines.
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  done
  local sent=0 replayed=0
  for log in "$work"/w*.log; do
    s=$(sed -n 's/.*engine_requests="default [0-9]*\/[0-9]* running \([0-9]*\) done".*/\1/p' "$log" | tail -1)
    r=$(sed -n 's/.* replayed=\([0-9]*\).*/\1/p' "$log" | tail -1)
    sent=$((sent + ${s:-0})); replayed=$((replayed + ${r:-0}))
  done
  [ "$(wc -l < "$work/out.jsonl")" -eq "$lines" ] || { echo "wrong output line count" >&2; exit 1; }
  printf '%-11s %4s %10s %10s %10.1f\n' "$mode" "$run_no" "$sent" "$replayed" "$(echo "$end - $start" | bc -l)"
}

printf '%-11s %4s %10s %10s %10s\n' mode run sent replayed wall_s
echo "(the lines need $((lines * 5)) engine requests; each worker sends at most 8 at a time)"
for run_no in $(seq "$runs"); do
  run journal
  run no-journal
done
