#!/usr/bin/env bash
# Benchmarks of dataset inputs and outputs (#26), release build, one command:
#   1. time to serve (staging included) a ROWS-row Parquet input against the same
#      rows as plain JSONL, REPEATS times each, alternating;
#   2. server items/s at 256 workers x 64 items on each, REPEATS times alternating;
#   3. peak RSS of a server staging and serving a BIG-row Parquet input with 1,000
#      items in flight;
#   4. resume time after SIGKILL on BIG lines as .jsonl.zst against plain .jsonl;
#   5. `dispatcher export` of ROWS lines against pyarrow's read_json + write_table
#      on the same file: time and peak RSS.
#
#   scripts/bench-datasets.sh [REPEATS] [SECS]      (ROWS=3000000 BIG=10000000)
#   PARTS=5 scripts/bench-datasets.sh 3             # only the parts named (default 12345)
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
secs=${2:-5}
rows=${ROWS:-3000000}
big=${BIG:-10000000}
parts=${PARTS:-12345}
part() { [[ $parts == *$1* ]]; } # whether part $1 runs
work=${BENCH_DIR:-target/bench-datasets}
mkdir -p "$work"
python=$(scripts/setup-datasets.sh | sed -n 's/^DATASETS_PYTHON=//p')
cargo build --release -q -p dispatcher-cli -p dispatcher-bench
bench=target/release/dispatcher-bench
server=target/release/dispatcher

gen() { # $1 rows, $2 parquet path: chat rows in row groups of 100,000 (snappy)
  [ -s "$2" ] && return
  "$python" - "$1" "$2" <<'PY'
import sys
import pyarrow as pa, pyarrow.parquet as pq
n, path = int(sys.argv[1]), sys.argv[2]
writer = None
step = 1_000_000
for start in range(0, n, step):
    ids = list(range(start, min(n, start + step)))
    messages = [[{"role": "user", "content": f"Question {i}: what is {i} times {i % 97}? Answer briefly."}] for i in ids]
    table = pa.table({"id": pa.array(ids, pa.int64()), "messages": messages})
    writer = writer or pq.ParquetWriter(path, table.schema, compression="snappy")
    writer.write_table(table, row_group_size=100_000)
writer.close()
PY
}

addr_of() { # wait for "listening on ADDR" in file $1
  for _ in $(seq 60000); do
    a=$(sed -n 's/^listening on //p' "$1"); [ -n "$a" ] && { echo "$a"; return; }; sleep 0.01
  done; echo "no address in $1" >&2; exit 1
}

serve() { # $1 input, $2 output; extra flags after; pid in $sp; start time in $t0
  rm -f "$2" "$2".checkpoint "$2".manifest.json "$work/srv.out"
  t0=$(date +%s.%N)
  $server serve --infile "$1" --outfile "$2" --host 127.0.0.1 --port 0 --work-timeout 3600 \
    "${@:3}" >"$work/srv.out" 2>"$work/srv.err" & sp=$!
}

stop() { kill -"$1" "$sp"; while kill -0 "$sp" 2>/dev/null; do sleep 0.01; done; }

parquet="$work/rows$rows.parquet"
gen "$rows" "$parquet"
# The same rows as JSONL: the staged copy of the Parquet file, made once.
jsonl="$work/rows$rows.jsonl"
if [ ! -s "$jsonl" ]; then
  serve "$parquet" "$work/stage.out.jsonl"; addr_of "$work/srv.out" >/dev/null; stop TERM
  cp "$work/stage.out.jsonl.input.jsonl" "$jsonl"
fi
echo "# inputs: $rows rows; parquet $(du -h "$parquet" | cut -f1), jsonl $(du -h "$jsonl" | cut -f1)"

if part 1; then
echo "# 1. seconds from start to listening (staging included), fresh job each run"
for r in $(seq "$repeats"); do
  for kind in jsonl parquet; do
    input=$jsonl; [ "$kind" = parquet ] && input=$parquet
    rm -f "$work/ready.out.jsonl.input.json" "$work/ready.out.jsonl.input.jsonl"
    serve "$input" "$work/ready.out.jsonl"; addr_of "$work/srv.out" >/dev/null
    t1=$(date +%s.%N); stop TERM
    echo "ready $kind run=$r $(echo "$t1 - $t0" | bc) s"
  done
done

fi
if part 2; then
echo "# 2. items/s at 256x64 for ${secs}s (input already staged)"
for r in $(seq "$repeats"); do
  for kind in jsonl parquet; do
    input=$jsonl; [ "$kind" = parquet ] && input=$parquet
    serve "$input" "$work/tp.out.jsonl"
    $bench load --addr "$(addr_of "$work/srv.out")" --workers 256 --batch 64 --secs "$secs" --label "$kind run=$r"
    stop TERM
  done
done

fi
bigparquet="$work/rows$big.parquet"
if part 3 || part 4; then gen "$big" "$bigparquet"; fi
if part 3; then
echo "# 3. peak RSS staging and serving $big Parquet rows, 1,000 in flight"
rm -f "$work/rss.out.jsonl.input.json" "$work/rss.out.jsonl.input.jsonl"
rm -f "$work/rss.out.jsonl" "$work/rss.out.jsonl.checkpoint" "$work/srv.out"
/usr/bin/time -f "peak_rss_kb %M" -o "$work/rss.time" $server serve --infile "$bigparquet" \
  --outfile "$work/rss.out.jsonl" --host 127.0.0.1 --port 0 --work-timeout 3600 \
  >"$work/srv.out" 2>"$work/srv.err" & tp=$!
t0=$(date +%s.%N)
addr=$(addr_of "$work/srv.out")
echo "staged $big rows in $(echo "$(date +%s.%N) - $t0" | bc) s"
$bench load --addr "$addr" --workers 1000 --batch 1 --secs "$secs" --label "parquet $big 1000x1"
sp=$(pgrep -P "$tp" dispatcher || echo "$tp"); stop TERM; wait "$tp" || true
cat "$work/rss.time"

fi
if part 4; then
echo "# 4. resume after SIGKILL: $big lines as .jsonl.zst (staged) and as .jsonl"
bigjsonl="$work/rss.out.jsonl.input.jsonl"
[ -s "$work/big.jsonl.zst" ] || zstd -q -T2 -c "$bigjsonl" >"$work/big.jsonl.zst"
for kind in jsonl zst; do
  input=$bigjsonl; [ "$kind" = zst ] && input=$work/big.jsonl.zst
  rm -f "$work/res.out.jsonl.input.json" "$work/res.out.jsonl.input.jsonl"
  serve "$input" "$work/res.out.jsonl"
  $bench load --addr "$(addr_of "$work/srv.out")" --workers 64 --batch 16 --secs 2 --label "$kind before kill" >/dev/null
  stop KILL
  t0=$(date +%s.%N); rm -f "$work/srv.out"
  $server serve --infile "$input" --outfile "$work/res.out.jsonl" --host 127.0.0.1 --port 0 \
    --work-timeout 3600 >"$work/srv.out" 2>"$work/srv.err" & sp=$!
  addr_of "$work/srv.out" >/dev/null
  echo "resume $kind $(echo "$(date +%s.%N) - $t0" | bc) s"
  stop TERM
done

fi
if part 5; then
echo "# 5. export of $rows lines: dispatcher export against pyarrow read_json + write_table"
for r in $(seq "$repeats"); do
  /usr/bin/time -f "dispatcher run=$r %e s %M KB" $server -q export "$jsonl" --parquet "$work/export.parquet" 2>&1 | tail -1
  /usr/bin/time -f "pyarrow run=$r %e s %M KB" "$python" -c '
import sys, pyarrow.json as pj, pyarrow.parquet as pq
pq.write_table(pj.read_json(sys.argv[1]), sys.argv[2], compression="snappy")
' "$jsonl" "$work/pyarrow.parquet" 2>&1 | tail -1
done
fi
