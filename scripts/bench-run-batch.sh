#!/usr/bin/env bash
# dispatcher run-batch vs vLLM's own `vllm run-batch` on the same OpenAI batch
# file, on vLLM's CPU backend with the tiny test model: wall time and peak
# memory (the whole process tree: runner and engine) of each, at each file
# size, so that how memory grows with the file shows. Ours runs twice: with the
# default --max-in-flight (64) and sized to vLLM's batch (256).
#
#   RUNS=3 scripts/bench-run-batch.sh [LINES...]      # default: 2000 8000
#
# Needs a release binary (cargo build --release -p dispatcher-cli --bin dispatcher) and scripts/setup-vllm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export $(scripts/setup-vllm.sh | tail -3)
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_TARGET_DEVICE=cpu \
  VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1
DISPATCHER=${DISPATCHER:-target/release/dispatcher}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
engine=(--max-model-len 512 --enforce-eager --kv-cache-memory-bytes 64M)

# Runs a command, sampling the summed RSS of its process tree every 0.1 s;
# prints "wall_seconds peak_tree_rss_mib peak_rss_of_the_command_itself_mib".
measure() {
  python3 - "$@" <<'PY'
import os, subprocess, sys, time
def tree_rss(root):
    kids = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(p))
            except OSError:
                pass
    total, own, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        if pid == root:
                            own = int(line.split()[1])
        except OSError:
            pass
    return total, own
start = time.time()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
peak = own_peak = 0
while proc.poll() is None:
    total, own = tree_rss(proc.pid)
    peak, own_peak = max(peak, total), max(own_peak, own)
    time.sleep(0.1)
if proc.returncode != 0:
    sys.exit(f"{sys.argv[1:]} failed with {proc.returncode}")
print(f"{time.time() - start:.1f} {peak / 1024:.0f} {own_peak / 1024:.0f}")
PY
}

printf '%-7s %-4s %-16s %9s %10s %14s %10s\n' lines run runner wall_s tree_mib own_rss_mib lines/s
for n in "${@:-2000 8000}"; do
  for n in $n; do
    python3 - "$n" "$TINY_HF_MODEL" > "$work/in.jsonl" <<'PY'
import json, sys
n, model = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    print(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Write about item {i}."}],
                 "max_tokens": 16, "temperature": 0, "ignore_eos": True}}))
PY
    for run in $(seq "${RUNS:-3}"); do
      # Alternating, so that drift on the machine hits both alike.
      read -r t m o < <(measure "$VLLM_BIN" run-batch -i "$work/in.jsonl" -o "$work/theirs.jsonl" --model "$TINY_HF_MODEL" "${engine[@]}")
      printf '%-7s %-4s %-16s %9s %10s %14s %10.0f\n' "$n" "$run" "vllm run-batch" "$t" "$m" "$o" "$(echo "$n / $t" | bc -l)"
      rm -f "$work/ours.jsonl" "$work/ours.jsonl.checkpoint"
      read -r t m o < <(measure "$DISPATCHER" run-batch -q -i "$work/in.jsonl" -o "$work/ours.jsonl" --workers 64 \
        --engine vllm --engine-bin "$VLLM_BIN" --model "$TINY_HF_MODEL" --max-model-len 512 --enforce-eager \
        --vllm-extra-args "--kv-cache-memory-bytes 64M")
      printf '%-7s %-4s %-16s %9s %10s %14s %10.0f\n' "$n" "$run" "dispatcher" "$t" "$m" "$o" "$(echo "$n / $t" | bc -l)"
      [ "$(wc -l < "$work/ours.jsonl")" -eq "$n" ] || { echo "ours: wrong line count" >&2; exit 1; }
      # Sized to vLLM's batch (its --max-num-seqs, 256 by default), as the flag's help says.
      rm -f "$work/ours.jsonl" "$work/ours.jsonl.checkpoint"
      read -r t m o < <(measure "$DISPATCHER" run-batch -q -i "$work/in.jsonl" -o "$work/ours.jsonl" --max-in-flight 256 \
        --engine vllm --engine-bin "$VLLM_BIN" --model "$TINY_HF_MODEL" --max-model-len 512 --enforce-eager \
        --vllm-extra-args "--kv-cache-memory-bytes 64M")
      printf '%-7s %-4s %-16s %9s %10s %14s %10.0f\n' "$n" "$run" "dispatcher 256" "$t" "$m" "$o" "$(echo "$n / $t" | bc -l)"
      [ "$(wc -l < "$work/ours.jsonl")" -eq "$n" ] || { echo "ours: wrong line count" >&2; exit 1; }
    done
  done
done
