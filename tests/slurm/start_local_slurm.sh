#!/usr/bin/env bash
# A one-node Slurm on this machine, for trying and testing `dapt launch slurm`:
# munged, slurmctld and slurmd, started directly (no systemd), all state in one folder.
#
#   bash tests/slurm/start_local_slurm.sh [STATE_DIR]      (default: /tmp/dapt-slurm)
#   export SLURM_CONF=STATE_DIR/slurm.conf                 then sbatch, squeue, scontrol work
#   bash tests/slurm/start_local_slurm.sh [STATE_DIR] stop
#   bash tests/slurm/start_local_slurm.sh STATE_DIR lose-node JOB_ID    the node dies under its job
#   bash tests/slurm/start_local_slurm.sh STATE_DIR node-back            and boots again
#
# Needs root or sudo (slurmd runs jobs as their users) and Debian's `slurm-wlm` and `munge`
# (Slurm 22.05 on Debian 12). Prints the reason and exits 1 where it cannot start.
# Idempotent: a cluster already answering in STATE_DIR is reused.
set -uo pipefail

state=${1:-/tmp/dapt-slurm}
action=${2:-start}
node=$(hostname -s)  # slurmd finds its own node entry by this name
conf=$state/slurm.conf
export SLURM_CONF=$conf

fail() { echo "cannot start a local Slurm: $*" >&2; exit 1; }

stop() {
  for pidfile in "$state"/slurmd.pid "$state"/slurmctld.pid "$state"/munge/munged.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
  done
  return 0
}

if [ "$action" = stop ]; then stop; exit 0; fi
case "$action" in start|lose-node|node-back) ;; *) fail "unknown action '$action' (start, stop, lose-node or node-back)" ;; esac

for program in munged mungekey slurmctld slurmd scontrol sinfo sbatch; do
  command -v "$program" >/dev/null || fail "'$program' is not installed (apt-get install slurm-wlm munge)"
done
if [ "$(id -u)" != 0 ]; then  # the daemons need root; client commands then work for this user too
  sudo -n true 2>/dev/null || fail "slurmd must run as root to start jobs (running as $(id -un), without sudo)"
  exec sudo -n bash "$0" "$state" "$action" "${@:3}"
fi

# A machine that dies takes slurmd and every process of its jobs with it at once: all are frozen
# first, so that none reports the others' end, then killed. Slurm learns of it as of a node that
# stopped answering (the caller sets it DOWN: the timeout that would otherwise tell is minutes).
if [ "$action" = lose-node ]; then
  job=${3:?lose-node needs the job id}
  victims=$(cat "$state/slurmd.pid")
  for proc in /proc/[0-9]*; do
    if tr '\0' '\n' < "$proc/cmdline" 2>/dev/null | grep -q "^slurmstepd: \[$job\." ||
       tr '\0' '\n' < "$proc/environ" 2>/dev/null | grep -qx "SLURM_JOB_ID=$job"; then
      victims="$victims ${proc#/proc/}"
    fi
  done
  kill -STOP $victims 2>/dev/null
  kill -KILL $victims 2>/dev/null
  exit 0
fi
if [ "$action" = node-back ]; then
  slurmd -f "$conf" || fail "slurmd did not start again (see $state/slurmd.log)"
  exit 0
fi

if [ -f "$conf" ] && scontrol ping >/dev/null 2>&1 && sinfo -h -n "$node" -o %T 2>/dev/null | grep -qx idle; then
  echo "local Slurm already running: SLURM_CONF=$conf"
  exit 0
fi
stop

# munged refuses a key readable by others and a socket folder others could write to;
# clients need to reach the socket, so its folder is world-executable.
mkdir -p "$state/munge" "$state/ctld" "$state/d"
chmod 0711 "$state" "$state/munge"
[ -f "$state/munge/munge.key" ] || mungekey --create --keyfile="$state/munge/munge.key" >/dev/null \
  || fail "mungekey could not create a key"
chmod 0400 "$state/munge/munge.key"
munged --force --socket="$state/munge/munge.socket.2" --key-file="$state/munge/munge.key" \
  --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
  --seed-file="$state/munge/munged.seed" || fail "munged did not start (see $state/munge/munged.log)"

# linuxproc and task/none track job processes without cgroups, which containers rarely allow.
# cred_expire is also how long a requeued job waits before it may start again (default 120 s),
# and sched_interval how often waiting jobs are looked at again (default 60 s).
cat > "$conf" <<EOF
ClusterName=dapt-local
SlurmctldHost=$node
AuthType=auth/munge
AuthInfo=socket=$state/munge/munge.socket.2,cred_expire=5
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${DAPT_SLURMCTLD_PORT:-6817}
SlurmdPort=${DAPT_SLURMD_PORT:-6818}
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$node CPUs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) RealMemory=$(free -m | awk '/^Mem:/ {print $2}') State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -f "$conf" || fail "slurmctld did not start (see $state/slurmctld.log)"
slurmd -f "$conf" || fail "slurmd did not start (see $state/slurmd.log)"
for _ in $(seq 60); do
  if sinfo -h -n "$node" -o %T 2>/dev/null | grep -qx idle; then
    echo "local Slurm running: node $node idle, SLURM_CONF=$conf"
    exit 0
  fi
  sleep 0.5
done
fail "node $node did not become idle in 30 s (see $state/slurmctld.log and $state/slurmd.log)"
