#!/usr/bin/env bash
# Two or more builds of `dispatcher` side by side in one run: each one's `serve`
# under `dispatcher-bench load` at each configuration, and each one's
# `dispatcher estimate` over the same chat lines, REPEATS times, alternating
# (A B A B ...) so that the machine's drift falls on every build alike. Prints
# the runs, then per build the medians and its share of the first build's
# figure (the median of the per-round ratios).
#
#   scripts/bench-binaries.sh BIN_A BIN_B [BIN_C ...]
#   REPEATS=3 SECS=5 CONFIGS="64 1|64 16|256 64" ESTIMATE_LINES=300000 ...
#   SERVE_FLAGS="--group-by .g" ...       # flags of every build's `serve`
#   LOAD_FLAGS="--named" ...              # flags of `dispatcher-bench load`
#
# Used for the static binary against the glibc one (scripts/release.sh's
# output) and, through scripts/ab.sh, for this build against an older commit.
# CONFIGS="" or ESTIMATE_LINES=0 skip a part.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
bins=("$@")
repeats=${REPEATS:-3}
secs=${SECS:-5}
estimate_lines=${ESTIMATE_LINES:-300000}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
cargo build --release -q -p dispatcher-bench
bench=target/release/dispatcher-bench
input="$work/in10m.jsonl"
[ -s "$input" ] || $bench gen-input --lines 10000000 --out "$input"

addr_of() { # wait for "listening on ADDR" in file $1
  for _ in $(seq 500); do
    a=$(sed -n 's/^listening on //p' "$1"); [ -n "$a" ] && { echo "$a"; return; }; sleep 0.01
  done; echo "no address in $1" >&2; exit 1
}

runs="$work/binaries.txt"
: >"$runs"
echo "# serve under load (items/s, latencies in ms); build i is argument i"
IFS='|' read -r -a configs <<<"${CONFIGS-64 1|64 16|256 64}"
for cfg in "${configs[@]}"; do
  # shellcheck disable=SC2086
  set -- $cfg
  for r in $(seq "$repeats"); do
    for i in "${!bins[@]}"; do
      rm -f "$work"/ab-out.jsonl* "$work/ab-srv.out"
      # shellcheck disable=SC2086
      "${bins[$i]}" serve --infile "$input" --outfile "$work/ab-out.jsonl" --host 127.0.0.1 --port 0 \
        --work-timeout 3600 ${SERVE_FLAGS:-} >"$work/ab-srv.out" 2>"$work/ab-srv.err" &
      sp=$!
      $bench load --addr "$(addr_of "$work/ab-srv.out")" --workers "$1" --batch "$2" --secs "$secs" \
        ${LOAD_FLAGS:-} --label "serve build=$i run=$r" | tee -a "$runs"
      kill -TERM "$sp"; wait "$sp" || true
    done
  done
done

if [ "$estimate_lines" -gt 0 ]; then
  eval "$(scripts/setup-vllm.sh | grep -E '^TINY_HF_MODEL=')"
  chat="$work/estimate-$estimate_lines.jsonl"
  [ -s "$chat" ] || python3 - "$estimate_lines" >"$chat" <<'PY'
import json, sys
words = "the quick brown fox jumps over the lazy dog while a researcher counts tokens".split()
for i in range(int(sys.argv[1])):
    text = " ".join(words[(i + k) % len(words)] for k in range(5 + (i * 37) % 120))
    messages = [{"role": "system", "content": f"You are assistant {i % 17}."}] if i % 3 == 0 else []
    messages.append({"role": "user", "content": f"Question {i}: {text}?"})
    if i % 4 == 0:
        messages += [{"role": "assistant", "content": "Let me think."}, {"role": "user", "content": "Go on."}]
    print(json.dumps({"id": i, "messages": messages}))
PY
  echo "# estimate over $estimate_lines chat lines (lines per minute)"
  for r in $(seq "$repeats"); do
    for i in "${!bins[@]}"; do
      start=$(date +%s.%N)
      "${bins[$i]}" estimate --input "$chat" --tokenizer "$TINY_HF_MODEL" --prompt-path .messages \
        --json >"$work/ab-estimate.json"
      end=$(date +%s.%N)
      echo "estimate build=$i run=$r workers=estimate batch=- items_per_sec=$(echo "$estimate_lines * 60 / ($end - $start)" | bc) get_p99_ms=0" |
        tee -a "$runs"
    done
  done
fi

# Per configuration and build: the median figure, and the median over rounds of
# its ratio to build 0's figure in the same round.
awk -v builds="${#bins[@]}" '
  function median(list,   n, a, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    delete f
    for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    k = $1 " " f["workers"] "x" f["batch"]
    if (!(k in seen)) { seen[k] = 1; order[++n] = k }
    b = f["build"]; rk = k SUBSEP f["run"]
    v[k, b] = v[k, b] " " f["items_per_sec"]; p[k, b] = p[k, b] " " f["get_p99_ms"]
    if (b == 0) base[rk] = f["items_per_sec"]
    else if (base[rk] > 0) share[k, b] = share[k, b] " " f["items_per_sec"] / base[rk]
  }
  END {
    print "# summary: median per build; share = median of the per-round ratios to build 0"
    for (i = 1; i <= n; i++) {
      k = order[i]; line = "summary " k
      for (b = 0; b < builds; b++) {
        line = line sprintf(" build%d=%d", b, median(v[k, b]))
        if (b > 0) line = line sprintf(" share%d=%.0f%%", b, 100 * median(share[k, b]))
        if (k !~ /^estimate/) line = line sprintf(" p99_get_ms%d=%.2f", b, median(p[k, b]))
      }
      print line
    }
  }' "$runs"
