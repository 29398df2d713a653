#!/usr/bin/env bash
# A single-node Slurm cluster on this machine for the Slurm array test: installs slurm-wlm and
# munge from Debian if missing (needs root), writes a config under $TL_RUN_SLURM_DIR (default
# ~/.cache/tl-run/slurm), and (re)starts munged, slurmctld and slurmd on localhost.
# Prints the SLURM_CONF to export; `scripts/test.sh` sources it before the tests.
set -euo pipefail
dir="${TL_RUN_SLURM_DIR:-$HOME/.cache/tl-run/slurm}"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm.sh: installing slurm-wlm and munge" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
fi
mkdir -p "$dir"/{state,spool,log}
conf="$dir/slurm.conf"
mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
cpus=$(nproc)
cat > "$conf" <<CONF
ClusterName=tlrun
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=600
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$conf"
# Restart from a clean state: stale daemons of an earlier set-up would hold the ports.
pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
    if [ "$(id -u)" = 0 ]; then runuser -u munge -- munged 2>/dev/null || munged --force; else munged; fi
fi
sleep 0.5
slurmctld -c -f "$conf"
slurmd -N localhost -f "$conf"
for _ in $(seq 50); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "export SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.2
done
echo "slurm.sh: the node did not come up; see $dir/log" >&2
sinfo >&2 || true
exit 1
