#!/usr/bin/env bash
# Memory of the server's journal against the bytes it counts (#36): a job
# whose line 0 never finishes, so that no entry is dropped, takes journal
# entries for every other line: 200,000 small responses (a chat completion
# of ~300 bytes each), then, on a fresh server, 150 responses of 2 MB. For
# each, the server's VmRSS after the entries against `journal.bytes` of
# /status; for the 2 MB ones also the server's peak RSS (VmHWM) after one
# `GET /work?batch_size=151` hands those lines out with their journals, and
# how many lines and bytes that reply carried. With BASELINE=path/to/older/dispatcher the same for that binary,
# alternating, RUNS times (default 3).
#
#   scripts/bench-journal-memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=${BENCH_DIR:-target/bench}/journal-memory
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli
python3 -c '
import sys
with open(sys.argv[1], "w") as f:
    for i in range(200_000):
        f.write("{\"id\": %d, \"prompt\": \"q%d\"}\n" % (i, i))
' "$work/in.jsonl"

addr_of() {
  for _ in $(seq 3000); do
    a=$(sed -n 's/^listening on //p' "$1"); [ -n "$a" ] && { echo "$a"; return; }; sleep 0.01
  done; echo "no address in $1" >&2; exit 1
}

measure() { # binary label entries size_bytes
  local bin=$1 label=$2 entries=$3 size=$4
  rm -f "$work"/out.jsonl* "$work/srv.out"
  "$bin" serve --infile "$work/in.jsonl" --outfile "$work/out.jsonl" --host 127.0.0.1 --port 0 \
    --max-journal-mib 2048 --max-request-mib 64 >"$work/srv.out" 2>"$work/srv.err" &
  local sp=$!
  local a; a=$(addr_of "$work/srv.out")
  python3 - "$a" "$entries" "$size" <<'PY'
import json, sys, urllib.request
addr, entries, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def post(path, body):
    req = urllib.request.Request(f"http://{addr}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))
text = ("word " * (size // 5))[:size]
batch, recorded = [], 0
per_request = max(1, (8 << 20) // (size + 200))
for i in range(1, entries + 1):
    response = {"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1764979200,
                "model": "tiny", "choices": [{"index": 0, "message": {"role": "assistant",
                "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}}
    batch.append({"work_id": i, "seq": 0, "fingerprint": f"{i:016x}", "response": response})
    if len(batch) == per_request:
        recorded += post("/journal", {"worker": "w", "entries": batch})["recorded"]
        batch = []
if batch:
    recorded += post("/journal", {"worker": "w", "entries": batch})["recorded"]
assert recorded == entries, (recorded, entries)
PY
  local rss; rss=$(awk '/VmRSS/ {print $2}' /proc/$sp/status)
  local held; held=$(curl -s "http://$a/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["journal_bytes"])')
  local reply=""
  if [ "$entries" -le 1000 ]; then
    local got; got=$(curl -s "http://$a/work?batch_size=$((entries + 1))" | python3 -c 'import json,sys; b=sys.stdin.buffer.read(); print(len(json.loads(b)["items"]), len(b))')
    reply=" reply_lines=${got% *} reply_kb=$((${got#* } / 1024)) peak_rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$sp/status)"
  fi
  kill -TERM "$sp"; while kill -0 "$sp" 2>/dev/null; do sleep 0.01; done
  echo "$label rss_kb=$rss journal_kb=$((held / 1024)) rss_per_journal_byte=$(python3 -c "print(round($rss * 1024 / $held, 2))")$reply"
}

for run in $(seq "${RUNS:-3}"); do
  for bin in target/release/dispatcher ${BASELINE:-}; do
    measure "$bin" "run $run $bin 200000x300B" 200000 64
    measure "$bin" "run $run $bin 150x2MB" 150 $((2 << 20))
  done
done
