#!/usr/bin/env bash
# Benchmark of `dispatcher serve` (release build) against a stateless stand-in that
# speaks the same protocol, at each configuration, REPEATS times each, alternating.
# Then peak RSS with a 10-million-line input and 1,000 items in flight, and the
# time to resume that input after SIGTERM and after SIGKILL.
#
#   scripts/bench-server.sh [REPEATS] [SECS]
#   BASELINE=path/to/older/dispatcher scripts/bench-server.sh [REPEATS] [SECS]
#   SERVE_FLAGS="--group-by .prompt" ...   # flags of both servers' `serve`
#
# With BASELINE, the runs that alternate with the server's are that binary's
# `serve` on the same input instead of the stand-in, so each summary's share is
# this build's throughput as a share of the older build's.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
secs=${2:-5}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
cargo build --release -q -p dispatcher-cli -p dispatcher-bench
bench=target/release/dispatcher-bench
server=target/release/dispatcher
input="$work/in10m.jsonl"
[ -s "$input" ] || $bench gen-input --lines 10000000 --out "$input"

addr_of() { # wait for "listening on ADDR" in file $1
  for _ in $(seq 500); do
    a=$(sed -n 's/^listening on //p' "$1"); [ -n "$a" ] && { echo "$a"; return; }; sleep 0.01
  done; echo "no address in $1" >&2; exit 1
}

start_server() { # fresh output; prints pid; address in $work/srv.out
  rm -f "$work"/out.jsonl* "$work/srv.out" # no stale address for addr_of
  $server serve --infile "$input" --outfile "$work/out.jsonl" --host 127.0.0.1 --port 0 \
    --work-timeout 3600 ${SERVE_FLAGS:-} "$@" >"$work/srv.out" 2>"$work/srv.err" &
  echo $!
}

stop() { # $1 = signal; waits until the process is gone (it is not our child)
  kill -"$1" "$sp"
  while kill -0 "$sp" 2>/dev/null; do sleep 0.01; done
}

runs="$work/runs.txt"
: >"$runs"
echo "# configuration runs (items/s and latencies in ms)"
# CONFIGS="" skips to the memory and resume runs.
IFS='|' read -r -a configs <<<"${CONFIGS-1 1|64 1|256 1|64 16|256 64}"
for cfg in "${configs[@]}"; do
  # shellcheck disable=SC2086
  set -- $cfg
  for r in $(seq "$repeats"); do
    rm -f "$work/standin.out"
    if [ -n "${BASELINE:-}" ]; then
      rm -f "$work"/out.jsonl*
      "$BASELINE" serve --infile "$input" --outfile "$work/out.jsonl" --host 127.0.0.1 --port 0 \
        --work-timeout 3600 ${SERVE_FLAGS:-} >"$work/standin.out" 2>"$work/standin.err" & sp=$!
    else
      $bench standin >"$work/standin.out" & sp=$!
    fi
    $bench load --addr "$(addr_of "$work/standin.out")" --workers "$1" --batch "$2" --secs "$secs" --label "standin run=$r" | tee -a "$runs"
    stop TERM
    sp=$(start_server)
    $bench load --addr "$(addr_of "$work/srv.out")" --workers "$1" --batch "$2" --secs "$secs" --label "server  run=$r" | tee -a "$runs"
    echo "server  run=$r workers=$1 batch=$2 peak_rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$sp/status)"
    stop TERM
  done
done

# Per configuration: medians of the runs, and the median of each run pair's
# share (server / the stand-in run just before it), which cancels most of the
# machine's drift between runs.
summary() {
  awk '
    function median(list,   n, a, i, j, t) {
      n = split(list, a, " ")
      for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
      for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
      k = f["workers"] "x" f["batch"]
      if (!(k in seen)) { seen[k] = 1; order[++n] = k }
      if ($1 == "standin") { last[k] = f["items_per_sec"]; s[k] = s[k] " " f["items_per_sec"]; sg[k] = sg[k] " " f["get_p99_ms"]; sp[k] = sp[k] " " f["post_p99_ms"] }
      else { r[k] = r[k] " " f["items_per_sec"]; share[k] = share[k] " " f["items_per_sec"] / last[k]; rg[k] = rg[k] " " f["get_p99_ms"]; rp[k] = rp[k] " " f["post_p99_ms"] }
    }
    END {
      print "# summary: medians; share = median of the per-pair server/stand-in ratios"
      for (i = 1; i <= n; i++) {
        k = order[i]
        printf "summary %s standin=%d server=%d share=%.0f%% p99_get_ms=%.2f/%.2f p99_post_ms=%.2f/%.2f\n", k, median(s[k]), median(r[k]), 100 * median(share[k]), median(sg[k]), median(rg[k]), median(sp[k]), median(rp[k])
      }
    }' "$runs"
}
[ -s "$runs" ] && summary

echo "# 10M-line input, 1,000 items in flight (125 workers x batch 8), 15 s (about a third of the input)"
sp=$(start_server)
$bench load --addr "$(addr_of "$work/srv.out")" --workers 125 --batch 8 --secs 15 --label "rss"
echo "rss peak_rss_kb=$(awk '/VmHWM/ {print $2}' /proc/$sp/status) lines_done=$(wc -l <"$work/out.jsonl")"

resume() { # $1 = signal; time from start to the first /status answer
  stop "$1"
  rm -f "$work/srv.out" # no stale address for addr_of
  t0=$(date +%s.%N)
  $server serve --infile "$input" --outfile "$work/out.jsonl" --host 127.0.0.1 --port 0 >"$work/srv.out" 2>"$work/srv.err" &
  sp=$!
  a=$(addr_of "$work/srv.out")
  ta=$(date +%s.%N)
  for _ in $(seq 2000); do
    curl -sf "http://$a/status" >/dev/null && break
    kill -0 "$sp" 2>/dev/null || { echo "the server exited: $(tail -3 "$work/srv.err")" >&2; exit 1; }
    sleep 0.005
  done
  t1=$(date +%s.%N)
  lines=$(curl -s "http://$a/status" | sed 's/.*"lines_done":\([0-9]*\).*/\1/')
  opened=$(sed -n 's/.*job files opened took_ms=\([0-9]*\).*/\1/p' "$work/srv.err")
  echo "resume after SIG$1: $(echo "$t1 - $t0" | bc) s from start to the first /status answer ($(echo "$ta - $t0" | bc) s to 'listening on'; opening the job's files: $opened ms), lines_done=$lines"
}
resume TERM
# 10 s more, so the output runs ahead of the last checkpoint (every 30 s) before SIGKILL.
$bench load --addr "$(addr_of "$work/srv.out")" --workers 125 --batch 8 --secs 10 --label "after-resume" >/dev/null
resume KILL
stop TERM
