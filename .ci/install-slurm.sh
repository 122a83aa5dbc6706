#!/usr/bin/env bash
# A single-node Slurm cluster on this machine for tests/test_launcher_slurm.py: Debian's slurm-wlm
# (slurmctld + slurmd) and munge on 127.0.0.1, with this host's real CPU count and memory.
# Idempotent (installs only what is missing, starts only daemons that are not running; a slurm.conf
# it did not write is left alone). Every wait is bounded. Never fails the CI: without a working
# cluster the Slurm test is skipped, with the reason.
set -u
MARK="# written by lori-harness .ci/install-slurm.sh"
CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm
say() { echo "install-slurm: $*"; }

wait_for() {  # wait_for SECONDS COMMAND...: true once COMMAND succeeds, false after SECONDS
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.5
  done
}

if [ "$(id -u)" != "0" ]; then
  say "not root: cannot install or start slurmctld/slurmd/munged (the Slurm test will be skipped)"
  exit 0
fi
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here; install slurm-wlm and munge yourself (the Slurm test will be skipped)"
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! { timeout 600 apt-get update -qq && timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }; then
    say "apt-get could not install slurm-wlm munge (offline or no package); the Slurm test will be skipped"
    exit 0
  fi
  say "installed $(slurmctld -V 2>/dev/null)"
else
  say "present ($(slurmctld -V 2>/dev/null))"
fi

# --- munge: the key the package made, its runtime folder, the daemon ---------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  timeout 60 mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
fi
if ! wait_for 1 sh -c 'munge -n | unmunge'; then
  runuser -u munge -- /usr/sbin/munged || say "munged did not start"
  wait_for 15 sh -c 'munge -n | unmunge' || { say "munge does not answer within 15 s (the Slurm test will be skipped)"; exit 0; }
fi
say "munge OK"

# --- slurm.conf for this host -------------------------------------------------------------------------
NODE_LINE="$(slurmd -C 2>/dev/null | head -n1)"   # NodeName=<host> CPUs=N ... RealMemory=M (what slurmd will see)
NODE="$(hostname -s)"
if [ -z "$NODE_LINE" ]; then
  NODE_LINE="NodeName=$NODE CPUs=$(nproc) RealMemory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))"
fi
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  say "$CONF exists and was not written here: using it as it is"
else
  mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOG"
  cat > "$CONF.tmp" <<EOF
$MARK
ClusterName=harness-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=5
MinJobAge=600
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
fi

# --- daemons ------------------------------------------------------------------------------------------
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if ! running /run/slurmctld.pid; then
  /usr/sbin/slurmctld || say "slurmctld did not start (see $LOG/slurmctld.log)"
fi
wait_for 30 scontrol ping || { say "slurmctld does not answer within 30 s (see $LOG/slurmctld.log); the Slurm test will be skipped"; exit 0; }
if ! running /run/slurmd.pid; then
  /usr/sbin/slurmd || say "slurmd did not start (see $LOG/slurmd.log)"
fi
node_ready() { sinfo -h -N -o '%T' | grep -Eq '^(idle|mixed|allocated)'; }
if ! wait_for 30 node_ready; then
  scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1
  wait_for 15 node_ready || { say "node $NODE is not idle within 45 s ($(sinfo -h -N -o '%T %E' 2>&1)); the Slurm test will be skipped"; exit 0; }
fi
say "cluster up: $(sinfo -h -N -o '%N %T %c CPUs %m MB' 2>&1)"
exit 0
