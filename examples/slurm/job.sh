# The body of the dispatcher sbatch scripts (infer.sbatch, task.sbatch): sourced by
# them after their configuration block. Starts `dispatcher serve` on the batch node,
# waits until it listens, runs one worker per Slurm task with `srun`, each on its own
# GPU slice and engine port, then waits for the server to finish the job.
#
# Requeue-safe: the server resumes from its checkpoint, so a preempted or requeued
# job (or a resubmitted one) continues where it stopped.

set -uo pipefail
: "${INPUT:?set INPUT to the input JSONL}"
OUTPUT=${OUTPUT:-${INPUT%.jsonl}.out.jsonl}
DISPATCHER_BIN=${DISPATCHER_BIN:-dispatcher}
DISPATCHER_HOST=${DISPATCHER_HOST:-$(hostname)}
SERVER_DRAIN_WAIT=${SERVER_DRAIN_WAIT:-120}

log() { echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $*"; }

# 1. The server, on the batch node. --port 0 picks a free port; it prints it.
addr_file="$OUTPUT.addr"
rm -f "$addr_file.tmp"
"$DISPATCHER_BIN" serve --infile "$INPUT" --outfile "$OUTPUT" --host 0.0.0.0 --port "${DISPATCHER_PORT:-0}" \
  --work-timeout "${WORK_TIMEOUT:-1800}" --max-retries "${MAX_RETRIES:-3}" --exit-grace "${EXIT_GRACE:-30}" \
  ${SERVER_ARGS:-} >"$addr_file.tmp" &
server=$!
# On the job's own SIGTERM (cancel, requeue, time limit) stop the server cleanly: it
# writes its checkpoint, and the next run of the job resumes from it.
trap 'log "SIGTERM: stopping the server"; kill -TERM $server 2>/dev/null; wait $server; exit 143' TERM
for _ in $(seq 600); do
  grep -q '^listening on ' "$addr_file.tmp" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { log "the server exited at start (see above)"; wait $server; exit 1; }
  sleep 0.1
done
port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$addr_file.tmp")
echo "$DISPATCHER_HOST:$port" >"$addr_file"
log "dispatcher serving $INPUT -> $OUTPUT at $DISPATCHER_HOST:$port"

# 2. One worker per task. Each takes GPUS_PER_TASK devices by its local rank and its
#    own engine port, so several workers share a node without colliding.
export DISPATCHER_SERVER="$DISPATCHER_HOST:$port" GPUS_PER_TASK=${GPUS_PER_TASK:-1} ENGINE_BASE_PORT=${ENGINE_BASE_PORT:-8100}
srun --kill-on-bad-exit=0 bash -c '
  first=$(( SLURM_LOCALID * GPUS_PER_TASK ))
  gpus=$(seq -s, $first $(( first + GPUS_PER_TASK - 1 )))
  export CUDA_VISIBLE_DEVICES=$gpus HIP_VISIBLE_DEVICES=$gpus
  # ENGINE_BASE_PORT=0: each engine picks a free port.
  port=$(( ENGINE_BASE_PORT == 0 ? 0 : ENGINE_BASE_PORT + SLURM_LOCALID ))
  echo "worker $SLURM_PROCID on $(hostname): GPUs $gpus, engine port $port"
  # exec: the worker itself receives the SIGTERM of a preemption and releases its items.
  exec "$@" --dispatcher "$DISPATCHER_SERVER" --port "$port" --tensor-parallel "$GPUS_PER_TASK" \
    --engine-log "${ENGINE_LOG_DIR:-.}/engine-$SLURM_JOB_ID-$SLURM_PROCID.log"
' worker "${WORKER_CMD[@]}" &
workers=$!
wait $workers
log "workers finished (srun exit $?)"

# 3. The server exits by itself once every line is written. If workers stopped early
#    (preempted, engine failures), give a requeue the chance to happen, then stop it
#    cleanly: resubmitting the job resumes.
for _ in $(seq $(( SERVER_DRAIN_WAIT * 10 ))); do
  kill -0 $server 2>/dev/null || break
  sleep 0.1
done
if kill -0 $server 2>/dev/null; then
  log "work remains after the workers stopped; stopping the server (resubmit this job to resume)"
  kill -TERM $server; wait $server
  exit 1
fi
wait $server
status=$?
log "dispatcher finished with status $status: $OUTPUT"
exit $status
