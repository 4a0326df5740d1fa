#!/usr/bin/env bash
# Peak memory (VmHWM) of `dispatcher serve` (release build) for three hostile
# requests: a 59 MB POST /heartbeat that repeats one work id, GET /work of a
# 381 MB input line, and a 1 GiB POST without the access token to a server with
# --token and --log-invalid-http. With BASELINE=path/to/older/dispatcher, the same for
# that binary, in the same run.
#
#   scripts/bench-memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=${BENCH_DIR:-target/bench}/memory
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli
python3 - "$work" <<'EOF'
import sys
work = sys.argv[1]
with open(f"{work}/small.jsonl", "w") as f:
    f.write('{"n": 1}\n{"n": 2}\n')
with open(f"{work}/heartbeat.json", "w") as f:
    f.write('{"work_ids": [' + ",".join(["1"] * 29_500_000) + "]}")
with open(f"{work}/long.jsonl", "w") as f:
    f.write('{"prompt": "' + "x" * 381_000_000 + '"}\n')
EOF
[ -s "$work/big.bin" ] || head -c 1G /dev/zero >"$work/big.bin"

addr_of() {
  for _ in $(seq 3000); do
    a=$(sed -n 's/^listening on //p' "$1"); [ -n "$a" ] && { echo "$a"; return; }; sleep 0.01
  done; echo "no address in $1" >&2; exit 1
}

measure() { # binary input label path [body file: POST it] [more serve flags]
  local bin=$1 input=$2 label=$3 path=$4 body=${5:-}
  shift 5 || shift $#
  rm -f "$work"/out.jsonl* "$work/srv.out"
  "$bin" serve --infile "$input" --outfile "$work/out.jsonl" --host 127.0.0.1 --port 0 \
    --max-request-mib 64 "$@" >"$work/srv.out" 2>"$work/srv.err" &
  local sp=$!
  local a; a=$(addr_of "$work/srv.out")
  local code
  code=$(curl -s -o /dev/null -w "%{http_code}" ${body:+-X POST -H "content-type: application/json" -T "$body"} "http://$a$path" || true)
  local peak; peak=$(awk '/VmHWM/ {print $2}' /proc/$sp/status)
  kill -TERM "$sp"; while kill -0 "$sp" 2>/dev/null; do sleep 0.01; done
  echo "$label peak_rss_kb=$peak http=$code"
}

for bin in target/release/dispatcher ${BASELINE:-}; do
  measure "$bin" "$work/small.jsonl" "$bin heartbeat_59mb" /heartbeat "$work/heartbeat.json"
  measure "$bin" "$work/long.jsonl" "$bin work_381mb_line" "/work?batch_size=1"
  measure "$bin" "$work/small.jsonl" "$bin unauthenticated_1gib_post" /results "$work/big.bin" \
    --token secret --log-invalid-http
done
