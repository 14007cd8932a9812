#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests and for trying the sbatch scripts:
# Debian's slurm-wlm and munge, one slurmctld and NODES slurmd daemons with distinct node
# names on loopback (Debian's build allows several slurmd per host).
#
#   scripts/slurm/local-cluster.sh install   # apt-get install slurm-wlm munge (root)
#   scripts/slurm/local-cluster.sh start     # prints the SLURM_CONF to export
#   scripts/slurm/local-cluster.sh stop
#
# Everything but munge's key lives in $STATE (default /tmp/ckmerge-slurm): slurm.conf,
# spool and state directories, logs. Clients find the cluster through SLURM_CONF:
#   export SLURM_CONF=/tmp/ckmerge-slurm/slurm.conf
# Needs root (slurmd runs jobs as their submitting user). Node names do not resolve as
# host names; every node's address is 127.0.0.1.
set -euo pipefail
STATE=${STATE:-/tmp/ckmerge-slurm}
NODES=${NODES:-3}
CPUS=${CPUS:-$(nproc)}
MEM_MB=${MEM_MB:-$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / NODES ))}
CONF=$STATE/slurm.conf

die() { echo "local-cluster: $*" >&2; exit 1; }

install() {
  [ "$(id -u)" = 0 ] || die "install needs root"
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  slurmctld -V
}

start() {
  [ "$(id -u)" = 0 ] || die "start needs root"
  command -v slurmctld >/dev/null || die "slurmctld not found: run '$0 install' first"
  stop >/dev/null 2>&1 || true
  mkdir -p "$STATE"/{ctld,log}
  for i in $(seq 1 "$NODES"); do mkdir -p "$STATE/slurmd/n$i"; done
  # munge: a key, and the daemon (Slurm authenticates every RPC with it).
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- munged
    else
      munged --force
    fi
  fi
  cat >"$CONF" <<EOF
# Written by scripts/slurm/local-cluster.sh: $NODES nodes on loopback.
ClusterName=ckmerge-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName=n[1-$NODES] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17001-$((17000 + NODES)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF"
  for i in $(seq 1 "$NODES"); do slurmd -f "$CONF" -N "n$i"; done
  for _ in $(seq 1 100); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qx idle && \
       [ "$(sinfo -h -N -o '%N %T' | grep -c ' idle')" -ge "$NODES" ]; then
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.2
  done
  sinfo -N || true
  tail -n 20 "$STATE"/log/*.log >&2 || true
  die "the nodes did not come up"
}

stop() {
  if [ -f "$CONF" ]; then
    SLURM_CONF=$CONF scancel --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  for f in "$STATE"/slurmd-*.pid "$STATE"/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.5
  pkill -f "slurmd -f $CONF" 2>/dev/null || true
  pkill -f "slurmctld -f $CONF" 2>/dev/null || true
  rm -rf "$STATE/ctld"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
