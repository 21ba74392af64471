#!/bin/bash
# A real one-node SLURM cluster on this machine for the tests (Debian's slurmctld/slurmd/munge).
#   local_cluster.sh start DIR   -> config, state and logs under DIR; prints SLURM_CONF=DIR/slurm.conf
#   local_cluster.sh stop DIR    -> stops the daemons it started (pid files), leaves munged to the system
# The node advertises 8 GPUs as GRES backed by plain files, so scripts asking for --gpus-per-node run;
# the harness then runs on the CPU.
set -euo pipefail
cmd=${1:?start|stop}; DIR=$(realpath -m "${2:?DIR}")
host=$(hostname -s)

if [ "$cmd" = stop ]; then
    for d in slurmd slurmctld; do
        [ -f "$DIR/$d.pid" ] && kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true
    done
    exit 0
fi

command -v slurmctld >/dev/null || { echo "slurmctld not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 3; }
rm -rf "$DIR/state"; mkdir -p "$DIR"/{state,spool,log,gres}
touch "$DIR"/gres/nvidia{0..7}
[ -f /etc/munge/munge.key ] || mungekey -c
if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
fi
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS, which a test may have set
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
port=$(( 30000 + RANDOM % 20000 ))
cat > "$DIR/slurm.conf" <<CONF
ClusterName=benchtest
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MpiDefault=none
SlurmctldPort=$port
SlurmdPort=$((port + 1))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=10
NodeName=$host CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
cat > "$DIR/gres.conf" <<CONF
AutoDetect=off
NodeName=$host Name=gpu File=$DIR/gres/nvidia[0-7]
CONF
export SLURM_CONF=$DIR/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then echo "SLURM_CONF=$SLURM_CONF"; exit 0; fi
    sleep 1
done
echo "the node did not become idle; see $DIR/log" >&2
sinfo >&2 || true
exit 4
