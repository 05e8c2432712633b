#!/usr/bin/env bash
# A one-node SLURM on this machine (Debian's packages), for trying `sipat grid` and for its tests.
#   tools/slurm_local.sh          start munge, slurmctld and slurmd if they are not running (idempotent)
#   tools/slurm_local.sh install  also install the packages first (apt-get)
#   tools/slurm_local.sh stop     cancel every job, then stop slurmd and slurmctld (munged keeps running)
# Needs root (the daemons run as root: SlurmUser=root). Exits non-zero with one line saying why SLURM cannot
# run here; the cluster tests then skip with that line.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
MARK="# written by sipat tools/slurm_local.sh"

die() { echo "slurm_local: $*" >&2; exit 1; }

if [ "${1:-}" = "install" ]; then
  command -v apt-get >/dev/null || die "apt-get not found: install slurmctld slurmd slurm-client munge by hand"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

if [ "${1:-}" = "stop" ]; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for d in slurmd slurmctld; do
    if pid=$(pgrep -x "$d"); then kill $pid; fi
  done
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (one-node SLURM with SlurmUser=root)"
for cmd in slurmctld slurmd sbatch munged; do
  command -v "$cmd" >/dev/null || die "$cmd not found (apt-get install slurmctld slurmd slurm-client munge)"
done

# munge: a 1 KiB random key readable by the munge user only, the daemon running as that user.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- munged || die "munged does not start (see /var/log/munge/munged.log)"
fi

HOST=$(hostname -s)
NCPU=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script: not replacing it"
fi
NEW=$(mktemp)
cat > "$NEW" <<CONF
$MARK
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ReturnToService=2
JobRequeue=1
MinJobAge=3600
# no slurmdbd here: no accounting storage (sacct is unavailable; sipat grid status falls back to squeue)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=$HOST CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$NEW" "$CONF" 2>/dev/null; then
  mv "$NEW" "$CONF"; chmod 644 "$CONF"
  # a changed configuration needs fresh daemons
  for d in slurmd slurmctld; do if pid=$(pgrep -x "$d"); then kill $pid; fi; done
  sleep 1
else
  rm -f "$NEW"
fi

pgrep -x slurmctld >/dev/null || slurmctld || die "slurmctld does not start (see $LOGS/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || die "slurmd does not start (see $LOGS/slurmd.log)"

for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
  case "$state" in
    idle*|mixed*|allocated*) echo "slurm_local: node $HOST $state ($NCPU CPUs)"; exit 0 ;;
    down*|drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 1
done
die "node $HOST is not up after 60 s (state: ${state:-none}; see $LOGS/slurmd.log)"
