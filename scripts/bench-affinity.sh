#!/usr/bin/env bash
# Prefix affinity (--group-by) on real engines: 2,000 chat lines, 50 distinct
# few-shot prefixes of ~1,000 tokens in shuffled order, a short distinct question
# each, through two engines, once ungrouped and once with
#   --group-by '.messages[0].content' --group-by-prefix 64
# (the first 64 bytes name the prefix), alternating, RUNS times each. Engines:
#   vllm   two `vllm serve` of the tiny model (scripts/setup-vllm.sh), automatic
#          prefix caching, a KV cache of 12 MiB (~17 prefixes);
#   llama  two `llama-server` of the tiny GGUF (scripts/setup-llama.sh), 4 slots
#          each (a slot keeps its last prompt), --cache-ram 0 (no host prompt cache).
# Figures: wall time (server start to exit), prompt tokens the engines computed
# against the prompt tokens asked for (vLLM: vllm:prefix_cache_hits/queries;
# llama.cpp: llamacpp:prompt_tokens_total against the responses' usage), and
# whether the outputs (temperature 0) equal the ungrouped run's. Then the worst
# case: the same lines with a distinct prefix each, grouped and not, on llama.cpp.
#
#   scripts/bench-affinity.sh [RUNS] [ENGINES]      # ENGINES: "vllm llama" (default), "" for none
#   SERVER_SECS=5 scripts/bench-affinity.sh 3 ""   # the server-only worst case
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1}
engines=${2-vllm llama}
work=${BENCH_DIR:-target/bench}/affinity
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli
bin=$(pwd)/target/release/dispatcher
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The same questions and prefix texts for both engines; the number of examples
# per prefix makes it ~1,000 tokens for each engine's tokenizer (the tiny vLLM
# model's 512-token vocabulary needs about twice as many tokens for a text).
python3 - "$work" <<'PY'
import json, random, sys
work = sys.argv[1]
for engine, shots in (("llama", 28), ("vllm", 13)):
    rng = random.Random(7)
    words = ("river mountain cloud stone forest engine letter garden window silver market "
             "harbor lantern meadow candle winter summer valley bridge castle ocean desert "
             "planet rocket signal number answer question pattern").split()
    def sentence(n):
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."
    prefixes = []
    for p in range(50):
        examples = [f"Example {k}: Q: {sentence(8)} A: {sentence(10)}" for k in range(shots)]
        prefixes.append(f"Few-shot set {p:02d}. Answer like the examples.\n" + "\n".join(examples) + "\n")
    lines = [(p, q) for p in range(50) for q in range(40)]
    rng.shuffle(lines)
    with open(f"{work}/shared-{engine}.jsonl", "w") as f, open(f"{work}/distinct-{engine}.jsonl", "w") as g:
        for i, (p, q) in enumerate(lines):
            question = f"Question {i}: what comes after {sentence(4)}"
            f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": prefixes[p] + question}]}) + "\n")
            # The worst case: every line a prefix of its own (same lengths).
            own = f"Few-shot set {i:04d}. " + " ".join(rng.sample(prefixes[p].split(), len(prefixes[p].split())))
            g.write(json.dumps({"id": i, "messages": [{"role": "user", "content": own + "\n" + question}]}) + "\n")
PY

metric() { # $1 url, $2 metric name: the sum of its samples
  curl -sf "$1/metrics" | awk -v m="$2" '$1 ~ "^"m"(\\{|$)" {s += $NF} END {printf "%.0f", s}'
}

start_engines() { # $1: vllm | llama
  pids=(); urls=()
  for k in 0 1; do
    local port; port=$(free_port)
    if [ "$1" = vllm ]; then
      HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_TARGET_DEVICE=cpu VLLM_ENABLE_V1_MULTIPROCESSING=0 \
        OMP_NUM_THREADS=1 "$VLLM_BIN" serve "$TINY_HF_MODEL" --host 127.0.0.1 --port "$port" \
        --max-model-len 2048 --kv-cache-memory-bytes 12M --enforce-eager --enable-prefix-caching \
        --served-model-name tiny >"$work/engine-$k.log" 2>&1 &
    else
      "$LLAMA_SERVER" -m "$TINY_MODEL" --host 127.0.0.1 --port "$port" -c 8192 --parallel 4 -t 1 \
        --cache-ram 0 --metrics --alias tiny >"$work/engine-$k.log" 2>&1 &
    fi
    pids+=($!); urls+=("http://127.0.0.1:$port")
  done
  for u in "${urls[@]}"; do
    for _ in $(seq 600); do curl -sf "$u/health" >/dev/null && break; sleep 0.5; done
    curl -sf "$u/health" >/dev/null || { tail -20 "$work"/engine-*.log; exit 1; }
  done
}
stop_engines() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap 'stop_engines' EXIT

computed() { # prompt tokens the engines computed so far
  local total=0 u
  for u in "${urls[@]}"; do
    if [ "$engine" = vllm ]; then
      total=$(( total + $(metric "$u" 'vllm:prefix_cache_queries_total') - $(metric "$u" 'vllm:prefix_cache_hits_total') ))
    else
      total=$(( total + $(metric "$u" 'llamacpp:prompt_tokens_total') ))
    fi
  done
  echo "$total"
}

run() { # $1 input, $2 label, $3.. serve flags
  local input=$1 label=$2; shift 2
  local out="$work/out-$engine-$label.jsonl"
  rm -f "$out"*
  local before; before=$(computed)
  local t0; t0=$(date +%s.%N)
  "$bin" serve --input "$work/$input" --output "$out" --host 127.0.0.1 --port 0 --exit-grace 0.5 "$@" \
    >"$work/serve.out" 2>"$work/serve.err" &
  local sp=$!
  for _ in $(seq 200); do grep -q '^listening on ' "$work/serve.out" && break; sleep 0.05; done
  local addr; addr=$(sed -n 's/^listening on //p' "$work/serve.out")
  local wp=() k=0
  for u in "${urls[@]}"; do
    "$bin" infer --dispatcher "$addr" --engine-url "$u" --served-model-name tiny \
      --temperature 0 --max-tokens 4 --include-usage --max-in-flight 4 --batch-size 4 -q \
      2>"$work/worker-$k.err" & wp+=($!); k=$((k + 1))
  done
  wait "$sp"; wait "${wp[@]}"
  local t1; t1=$(date +%s.%N)
  local after; after=$(computed)
  python3 - "$out" "$label" "$engine" "$t0" "$t1" "$((after - before))" "$work/out-$engine-plain.jsonl" <<'PY'
import json, sys
out, label, engine, t0, t1, computed, plain = sys.argv[1:8]
lines = [json.loads(l) for l in open(out)]
asked = sum(l["usage"]["prompt_tokens"] for l in lines if "usage" in l)
errors = sum(1 for l in lines if "__ERROR__" in l)
same = "-"
if label != "plain" and not label.startswith("distinct"):
    ref = [json.loads(l) for l in open(plain)]
    same = f"{sum(a.get('responses') == b.get('responses') for a, b in zip(lines, ref))}/{len(ref)}"
wall = float(t1) - float(t0)
hit = 1 - int(computed) / asked if asked else 0
print(f"{engine:<6} {label:<16} wall {wall:6.1f} s   prompt tokens asked {asked:8d}   computed {int(computed):8d}"
      f"   cache hit {100 * hit:5.1f}%   same output as ungrouped {same}   errors {errors}")
PY
}

group=(--group-by '.messages[0].content' --group-by-prefix 64)
for engine in $engines; do
  if [ "$engine" = vllm ]; then export $(scripts/setup-vllm.sh); else export $(scripts/setup-llama.sh); fi
  for r in $(seq "$runs"); do
    start_engines "$engine"; run "shared-$engine.jsonl" plain; stop_engines
    start_engines "$engine"; run "shared-$engine.jsonl" grouped "${group[@]}"; stop_engines
  done
  if [ "$engine" = llama ]; then
    for r in $(seq "$runs"); do
      start_engines llama; run distinct-llama.jsonl distinct-plain; stop_engines
      start_engines llama; run distinct-llama.jsonl distinct-grouped "${group[@]}"; stop_engines
    done
  fi
done

# The server alone (no engine: dispatcher-bench load answers at once), where the
# grouping's cost is most visible: every line a key of its own, 256 workers x 64,
# SECS seconds, grouped and not, alternating, RUNS times.
if [ -n "${SERVER_SECS:-}" ]; then
  cargo build --release -q -p dispatcher-bench
  bench=target/release/dispatcher-bench
  input="$work/in2m.jsonl"
  [ -s "$input" ] || $bench gen-input --lines 2000000 --out "$input"
  for r in $(seq "$runs"); do
    for label in plain grouped; do
      rm -f "$work"/srv-out.jsonl* "$work/srv.out"
      flags=(); [ "$label" = grouped ] && flags=(--group-by .prompt)
      "$bin" serve --infile "$input" --outfile "$work/srv-out.jsonl" --host 127.0.0.1 --port 0 \
        --work-timeout 3600 "${flags[@]}" >"$work/srv.out" 2>"$work/srv.err" & sp=$!
      for _ in $(seq 500); do grep -q '^listening on ' "$work/srv.out" && break; sleep 0.01; done
      $bench load --addr "$(sed -n 's/^listening on //p' "$work/srv.out")" --workers 256 --batch 64 \
        --secs "$SERVER_SECS" --label "server $label run=$r"
      kill "$sp"; wait "$sp" 2>/dev/null || true
    done
  done
fi
