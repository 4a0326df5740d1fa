#!/usr/bin/env bash
# How fast `dispatcher estimate` counts prompt tokens (release build): LINES
# chat lines of mixed lengths (a system message on a third, a second turn on a
# quarter) with the tiny vLLM model's tokenizer and chat template, REPEATS
# times; and, as the baseline in the same command, Python's transformers
# (the tokenizer vLLM itself uses: apply_chat_template, then encode) on the
# first BASELINE_LINES of them, in vLLM's venv, which must count the same
# tokens as dispatcher does on those lines. Both print lines per second.
#
#   scripts/bench-estimate.sh [REPEATS] [LINES] [BASELINE_LINES]
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
lines=${2:-1000000}
baseline_lines=${3:-50000}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
eval "$(scripts/setup-vllm.sh | grep -E '^(VLLM_BIN|TINY_HF_MODEL)=')"
python=$(dirname "$VLLM_BIN")/python
cargo build --release -q -p dispatcher-cli
input="$work/estimate-$lines.jsonl"
[ -s "$input" ] || python3 - "$lines" >"$input" <<'PY'
import json, sys
words = "the quick brown fox jumps over the lazy dog while a researcher counts tokens".split()
for i in range(int(sys.argv[1])):
    text = " ".join(words[(i + k) % len(words)] for k in range(5 + (i * 37) % 120))
    messages = []
    if i % 3 == 0:
        messages.append({"role": "system", "content": f"You are assistant {i % 17}."})
    messages.append({"role": "user", "content": f"Question {i}: {text}?"})
    if i % 4 == 0:
        messages += [{"role": "assistant", "content": "Let me think."}, {"role": "user", "content": "Go on."}]
    print(json.dumps({"id": i, "messages": messages}))
PY
# The same count both ways: dispatcher on the baseline's lines.
head -n "$baseline_lines" "$input" >"$work/estimate-head.jsonl"
target/release/dispatcher estimate --input "$work/estimate-head.jsonl" --tokenizer "$TINY_HF_MODEL" \
  --prompt-path .messages --json |
  python3 -c 'import json,sys; print("dispatcher on the baseline lines: prompt_tokens=%d" % json.load(sys.stdin)["prompt_tokens"])'
for r in $(seq "$repeats"); do
  start=$(date +%s.%N)
  target/release/dispatcher estimate --input "$input" --tokenizer "$TINY_HF_MODEL" \
    --prompt-path .messages --json >"$work/estimate.json"
  end=$(date +%s.%N)
  tokens=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["prompt_tokens"])' "$work/estimate.json")
  echo "dispatcher run=$r lines=$lines secs=$(echo "$end - $start" | bc) lines_per_sec=$(echo "$lines / ($end - $start)" | bc) prompt_tokens=$tokens"
  head -n "$baseline_lines" "$input" | HF_HUB_OFFLINE=1 "$python" -c '
import json, sys, time
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = [json.loads(l)["messages"] for l in sys.stdin]
start = time.time()
texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in rows]
n = sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
secs = time.time() - start
print(f"transformers run='"$r"' lines={len(rows)} secs={secs:.2f} lines_per_sec={len(rows) / secs:.0f} prompt_tokens={n}")
' "$TINY_HF_MODEL"
done
