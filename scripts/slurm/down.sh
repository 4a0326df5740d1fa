#!/usr/bin/env bash
# scripts/slurm/down.sh — stop the one-node cluster started by scripts/slurm/up.sh, by PID.
# SLURM_CI_WIPE=1 also deletes controller state (job ids restart at 1 next time) and logs.
set -uo pipefail
pid_ok() { local p; p=$(cat "$1" 2>/dev/null) || return 1; [ -n "$p" ] && [ -r "/proc/$p/stat" ] || return 1
           [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ] && [ "$(awk '{print $3}' /proc/$p/stat)" != Z ]; }
stop() { local p; p=$(cat "$1" 2>/dev/null) || return 0; pid_ok "$1" "$2" || return 0; kill "$p"
         for i in $(seq 100); do pid_ok "$1" "$2" || return 0; sleep 0.1; done; kill -9 "$p"; }

# Jobs (slurmstepd processes) survive a killed slurmd, so cancel them first and wait.
if pid_ok /run/slurmctld.pid slurmctld; then
  scancel --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
  for i in $(seq 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop /run/slurmd.pid slurmd          # slurmd/slurmctld remove their pidfiles on clean exit
stop /run/slurmctld.pid slurmctld    # (its child slurmscriptd exits with it)
stop /run/munge/munged.pid munged
if [ "${SLURM_CI_WIPE:-0}" = 1 ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*
fi
echo "slurm down"
