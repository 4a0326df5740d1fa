#!/usr/bin/env bash
# scripts/slurm/up.sh — start a real one-node Slurm cluster (munge + slurmctld + slurmd) for the tests.
# Debian 12 (bookworm), run as root, works without systemd (containers, microVMs).
# Idempotent: re-running it leaves a healthy cluster alone, restarts daemons whose config changed.
# Env knobs: SLURM_CI_CPUS (default nproc), SLURM_CI_MEM_MB (default 85% of MemTotal),
#            SLURM_CI_FAKE_GPUS (default 0; N>0 adds a fake gres gpu:N backed by /dev/tty0..N-1),
#            SLURM_CI_KILLWAIT (default 10 s between SIGTERM and SIGKILL on cancel/timeout).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
NODE=$(hostname -s)
CPUS=${SLURM_CI_CPUS:-$(nproc)}
MEM_MB=${SLURM_CI_MEM_MB:-$(awk '/MemTotal/{print int($2/1024*0.85)}' /proc/meminfo)}
FAKE_GPUS=${SLURM_CI_FAKE_GPUS:-0}
KILLWAIT=${SLURM_CI_KILLWAIT:-10}

# true if pidfile $1 names a live (non-zombie) process whose comm is $2
pid_ok() { local p; p=$(cat "$1" 2>/dev/null) || return 1; [ -n "$p" ] && [ -r "/proc/$p/stat" ] || return 1
           [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ] && [ "$(awk '{print $3}' /proc/$p/stat)" != Z ]; }

# 1. packages (8 .debs, ~15 s). policy-rc.d / no systemd => postinst does not start anything.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# 2. munge: key + runtime dir (systemd would create /run/munge; we must), run as user munge
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none   # or: mungekey -c
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! pid_ok /run/munge/munged.pid munged; then
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged
fi
for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null   # fail loudly if munge is broken

# 3. slurm.conf. NodeAddr/SlurmctldHost pinned to 127.0.0.1 => works even if `hostname`
#    does not resolve. No cgroups, no accounting, daemons run as root.
install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
GRES_LINE=""; GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu"; GRES_LINE="Gres=gpu:$FAKE_GPUS"
  echo "NodeName=$NODE Name=gpu File=/dev/tty[0-$((FAKE_GPUS-1))]" > /etc/slurm/gres.conf.new
else
  : > /etc/slurm/gres.conf.new
fi
cat > /etc/slurm/slurm.conf.new <<EOF
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Lets SLURM_CI_CPUS declare more CPUs than the machine has (several small jobs at once).
SlurmdParameters=config_overrides
KillWait=$KILLWAIT
MinJobAge=300
InactiveLimit=0
Waittime=0
$GRES_TYPES
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB $GRES_LINE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
CHANGED=0
for f in slurm.conf gres.conf; do
  if ! cmp -s /etc/slurm/$f.new /etc/slurm/$f; then mv /etc/slurm/$f.new /etc/slurm/$f; CHANGED=1
  else rm -f /etc/slurm/$f.new; fi
done

# 4. daemons (they daemonize themselves; no systemd needed)
stop() { local p; p=$(cat "$1" 2>/dev/null) || return 0; pid_ok "$1" "$2" || return 0; kill "$p"
         for i in $(seq 100); do pid_ok "$1" "$2" || return 0; sleep 0.1; done; kill -9 "$p"; }
if [ "$CHANGED" = 1 ]; then stop /run/slurmd.pid slurmd; stop /run/slurmctld.pid slurmctld; fi
pid_ok /run/slurmctld.pid slurmctld || slurmctld
for i in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
pid_ok /run/slurmd.pid slurmd || slurmd -N "$NODE"

# 5. wait until the node is usable; un-drain it if an earlier run left it down/drained
for i in $(seq 300); do
  st=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
  case "$st" in idle|mix|alloc|comp) break;;
    down*|drain*|drng*|fail*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true;; esac
  sleep 0.2
done
sinfo -h -n "$NODE" -o %t | grep -Eq '^(idle|mix|alloc|comp)' || { echo "slurm node not ready: $(sinfo)"; tail -20 /var/log/slurm/slurmd.log; exit 1; }
echo "slurm up: $(sinfo -h -o '%P %a %D %t %N %G')"
