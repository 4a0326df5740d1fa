#!/usr/bin/env bash
# The tail of a launched job: GPU-seconds of workers idle while the last lines finish.
# Three worker jobs on Slurm (scripts/slurm/up.sh with SLURM_CI_CPUS=8); worker 0 is
# slow (SLOW_MS per request, 5 lines at a time), the others fast (100 ms, 8 at a time),
# so that at the tail one worker holds the last lines. Once with the drained hint
# (launch's default: idle workers exit), once with it turned off in the worker
# (DISPATCHER_EXIT_WHEN_DRAINED=0: they poll until the job is complete), RUNS times.
# Figures from launch's state file: the tail (last line handed out to the last
# worker's end) and the worker-seconds spent in it; idle = worker-seconds - tail
# (the one worker the tail needs).
#
#   scripts/bench-launch-tail.sh [RUNS] [SLOW_MS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
slow=${2:-20000}
work=${BENCH_DIR:-target/bench}/launch-tail
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli
bin=$(pwd)/target/release/dispatcher
sinfo -h >/dev/null || { echo "no Slurm here: scripts/slurm/up.sh starts one" >&2; exit 1; }
[ -s "$work/in.jsonl" ] || for i in $(seq 0 599); do
  echo "{\"id\": $i, \"messages\": [{\"role\": \"user\", \"content\": \"question $i\"}]}"
done > "$work/in.jsonl"

run() { # $1: label, $2: value of DISPATCHER_EXIT_WHEN_DRAINED for the workers
  rm -rf "$work/out.jsonl"*
  local worker="if [ \"\$DISPATCHER_LAUNCH_WORKER\" = 0 ]; then set -- $slow 5; else set -- 100 8; fi;
    DISPATCHER_EXIT_WHEN_DRAINED=$2 exec '$bin' infer --engine echo --echo-latency-ms \"\$1\" --max-in-flight \"\$2\" --batch-size \"\$2\" -q"
  (cd "$work" && "$bin" launch --input in.jsonl --output out.jsonl --max-workers 3 --poll 0.5 \
     --host 127.0.0.1 --advertise 127.0.0.1 --exit-grace 1 -- sh -c "$worker" >launch.out 2>launch.err)
  python3 - "$work/out.jsonl.launch/state.json" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
d = s["drained_at"]
ends = [j["ended"] for j in s["jobs"]]
tail = max(ends) - d
ws = sum(max(0.0, j["ended"] - max(d, j["started"] or j["submitted"])) for j in s["jobs"])
print(f"{sys.argv[2]:<10} tail {tail:5.1f} s   worker-seconds in it {ws:5.1f}   idle {ws - tail:5.1f} GPU-s   jobs {len(s['jobs'])}")
PY
}

for r in $(seq "$runs"); do
  run "hint" 1
  run "no hint" 0
done
