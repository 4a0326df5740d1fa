#!/usr/bin/env bash
# Engine saturation on real vLLM (CPU backend, tiny model; scripts/setup-vllm.sh):
# one `vllm serve`, driven over N prompts at concurrency C by `dispatcher infer
# --no-launch` (release build, local files) and by a minimal direct client
# (Python asyncio + aiohttp from vLLM's own venv) sending the same request
# bodies, alternating, REPEATS times each. Every response is exactly --max-tokens
# long (`ignore_eos`), so both do the same work. Reports each run's wall time,
# the share (direct wall / infer wall, per pair), vLLM's own
# `vllm:num_requests_running` sampled every 0.2 s, and the worker's CPU time per
# request.
#
#   scripts/bench-vllm.sh [REPEATS] [PROMPTS] [CONCURRENCY] [MAX_TOKENS]
#   BASELINE=path/to/older/dispatcher scripts/bench-vllm.sh ...   # also that build's infer, alternating
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
prompts=${2:-500}
concurrency=${3:-16}
max_tokens=${4:-32}
work=${BENCH_DIR:-target/bench}/vllm
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli
export $(scripts/setup-vllm.sh)
python=$(dirname "$VLLM_BIN")/python
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_TARGET_DEVICE=cpu \
  VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VLLM_BIN" serve "$TINY_HF_MODEL" --host 127.0.0.1 --port "$port" --max-model-len 512 \
  --kv-cache-memory-bytes 256M --enforce-eager >"$work/vllm.log" 2>&1 &
vllm_pid=$!
trap 'kill -TERM -- $vllm_pid 2>/dev/null; wait $vllm_pid 2>/dev/null' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { tail -20 "$work/vllm.log"; exit 1; }

python3 - "$work/prompts.jsonl" "$prompts" <<'EOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"Question {i}: say hello to the world."}]}) + "\n")
EOF

# The direct client: the body `dispatcher infer` sends, C requests at a time.
cat >"$work/direct.py" <<'EOF'
import asyncio, json, sys, aiohttp
url, prompts, concurrency, model, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
lines = [json.loads(l) for l in open(prompts)]
async def main():
    queue = asyncio.Queue()
    for line in lines:
        queue.put_nowait(line)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            while not queue.empty():
                line = queue.get_nowait()
                body = {"model": model, "messages": line["messages"], "temperature": 0.8, "top_p": 0.95,
                        "max_tokens": max_tokens, "min_p": 0.05, "ignore_eos": True}
                async with session.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    await r.json()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
asyncio.run(main())
EOF

sample() { # samples num_requests_running into $1 until the file $2 exists
  : >"$1"
  while [ ! -e "$2" ]; do
    curl -s "http://127.0.0.1:$port/metrics" | awk '/^vllm:num_requests_running/ {print $2}' >>"$1"
    sleep 0.2
  done
}

run() { # $1 = label; then the command
  local label=$1; shift
  rm -f "$work/done"
  sample "$work/running-$label.txt" "$work/done" &
  local sampler=$!
  local t0 t1
  t0=$(date +%s.%N)
  # CPU time of the command and its children, from getrusage.
  local cpu
  cpu=$(python3 -c 'import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
r = resource.getrusage(resource.RUSAGE_CHILDREN); print(r.ru_utime + r.ru_stime)' "$@")
  t1=$(date +%s.%N)
  touch "$work/done"; wait "$sampler"
  local wall; wall=$(echo "$t1 - $t0" | bc)
  # Mean running requests over the samples taken while requests were running.
  local running
  running=$(awk '$1 > 0 {n++; s += $1; if ($1 >= c) full++} END {printf "mean=%.1f at_concurrency=%.0f%%", s / n, 100 * full / n}' c="$concurrency" "$work/running-$label.txt")
  echo "$label wall_s=$wall cpu_ms_per_request=$(echo "1000 * $cpu / $prompts" | bc -l | cut -c1-6) requests_per_s=$(echo "$prompts / $wall" | bc -l | cut -c1-7) running_$running"
}

for r in $(seq "$repeats"); do
  run "direct run=$r" "$python" "$work/direct.py" "http://127.0.0.1:$port/v1/chat/completions" \
    "$work/prompts.jsonl" "$concurrency" "$TINY_HF_MODEL" "$max_tokens"
  rm -f "$work"/out.jsonl*
  run "infer  run=$r" target/release/dispatcher infer --input "$work/prompts.jsonl" --output "$work/out.jsonl" \
    --no-launch --port "$port" --model "$TINY_HF_MODEL" --workers "$concurrency" \
    --max-tokens "$max_tokens" --extra-body '{"ignore_eos": true}' -q
  [ "$(wc -l <"$work/out.jsonl")" -eq "$prompts" ] || { echo "infer wrote $(wc -l <"$work/out.jsonl") lines" >&2; exit 1; }
  if [ -n "${BASELINE:-}" ]; then
    rm -f "$work"/out.jsonl*
    run "base   run=$r" "$BASELINE" infer --input "$work/prompts.jsonl" --output "$work/out.jsonl" \
      --no-launch --port "$port" --model "$TINY_HF_MODEL" --workers "$concurrency" \
      --max-tokens "$max_tokens" --extra-body '{"ignore_eos": true}' -q
  fi
done
