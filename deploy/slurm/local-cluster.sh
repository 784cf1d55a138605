#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests and trying things: munge + slurmctld + slurmd, no systemd.
#
#   deploy/slurm/local-cluster.sh up      # install (Debian's slurm-wlm and munge, as root) and start
#   deploy/slurm/local-cluster.sh status  # sinfo
#   deploy/slurm/local-cluster.sh down    # cancel every job and stop the daemons
#
# State, logs and the generated slurm.conf live in $DASKMV_SLURM_DIR (default /tmp/daskmv-slurm).
# Exit code 3 means "cannot run here" (not root, or no apt-get to install with): callers skip then.
set -euo pipefail

DIR=${DASKMV_SLURM_DIR:-/tmp/daskmv-slurm}
CONF=/etc/slurm/slurm.conf

need_root() {
  if [ "$(id -u)" != 0 ]; then echo "local-cluster.sh: needs root (to install and run slurmctld/slurmd)" >&2; exit 3; fi
}

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || { echo "local-cluster.sh: no apt-get to install slurm-wlm and munge" >&2; exit 3; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
}

write_conf() {
  local node cpus mem
  node=$(hostname -s)
  cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
  cat > "$CONF" <<CONF
# Written by daskmv deploy/slurm/local-cluster.sh: one node, for tests.
ClusterName=daskmv
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$(( mem / cpus / 2 ))
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
KillWait=5
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

up() {
  need_root
  install
  start_munge
  write_conf
  pgrep -x slurmctld >/dev/null || slurmctld -c   # -c: forget jobs of a crashed earlier run
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 1 60); do
    state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
    case "$state" in idle*|mix*|alloc*) echo "slurm up: $(sinfo -h -o '%P %D %T %c CPUs')"; return 0 ;; esac
    sleep 0.5
  done
  echo "local-cluster.sh: slurm did not come up; see $DIR/log" >&2
  exit 1
}

down() {
  command -v scancel >/dev/null && scancel --user="$(id -un)" 2>/dev/null || true
  for daemon in slurmd slurmctld; do
    pkill -x "$daemon" 2>/dev/null || true
  done
  echo "slurm down"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) sinfo ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
