#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (Debian/Ubuntu, as root, no systemd needed):
# for trying `snakemake --profile slurm` locally, and used by tests/test_slurm.py in CI.
#
#   scripts/slurm_local.sh start    install slurm-wlm + munge if missing, write /etc/slurm/slurm.conf,
#                                   start munged, slurmctld and slurmd, wait until the node is idle
#   scripts/slurm_local.sh stop     cancel every job of this cluster, stop the three daemons
#   scripts/slurm_local.sh status   the daemons, sinfo and squeue (exit status 0 when all three run)
#   scripts/slurm_local.sh purge    stop, then remove the config, state and logs that start wrote
#   scripts/slurm_local.sh profile [DIR]
#                                   write DIR/config.yaml (default .snakemake/slurm-local): the
#                                   repository's slurm/config.yaml with this cluster's partition and
#                                   no account, for `snakemake --profile DIR all` (no root needed)
#
# Every command is idempotent (start twice: the second finds the cluster up and changes nothing)
# and prints what it does. The cluster has one node (this host, all its CPUs, its memory minus
# 1 GiB) in one partition, `debug`, and NO accounting database: `sacct` does not work, so the
# Snakemake SLURM plugin must query job states with squeue (`slurm-status-command: squeue`, as in
# slurm/config.yaml). The daemons run as root and are started by hand (PID 1 need not be systemd);
# processes are tracked through /proc (proctrack/linuxproc, task/none): no cgroups needed.
#
# Environment:
#   SLURM_LOCAL_PARTITION   partition name (default: debug)
#   SLURM_LOCAL_MEM_MB      memory the node offers in MB (default: detected minus 1024)
#   SLURM_LOCAL_NO_INSTALL  1: never run apt-get (fail if the packages are missing)
#   SLURM_LOCAL_TIMEOUT_S   seconds to wait for the node to become idle (default: 60)
#
# Exit status: 0 done, 1 error, 2 usage, 3 not possible on this machine (slurm-wlm/munge missing
# and not installable: no apt-get, apt-get failing, SLURM_LOCAL_NO_INSTALL=1; or an
# /etc/slurm/slurm.conf that this script did not write, i.e. a real cluster's): tests skip on 3.
set -euo pipefail

PARTITION=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT=${SLURM_LOCAL_TIMEOUT_S:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# Written by scripts/slurm_local.sh (dasheng): a single-node test cluster."
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGDIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
PACKAGES=(slurm-wlm munge)

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }
cannot_install() { echo "slurm_local: cannot install: $*" >&2; exit 3; }
not_here() { echo "slurm_local: not on this machine: $*" >&2; exit 3; }

need_root() {
  [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts system daemons)"
}

alive() {  # alive PIDFILE: the process named in PIDFILE runs (not a zombie, and it is the daemon)
  local pid state
  [[ -s $1 ]] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z && $state != X ]] || return 1
  case $(cat "/proc/$pid/comm" 2>/dev/null) in munged|slurmctld|slurmd) return 0 ;; *) return 1 ;; esac
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    say "packages present: $(slurmctld -V 2>/dev/null || echo slurm), munge $(munged -V 2>/dev/null | awk '{print $1}' || true)"
    return
  fi
  [[ ${SLURM_LOCAL_NO_INSTALL:-0} == 1 ]] && cannot_install "slurm-wlm/munge are not installed and SLURM_LOCAL_NO_INSTALL=1"
  command -v apt-get >/dev/null || cannot_install "slurm-wlm/munge are not installed and apt-get is not available"
  say "installing ${PACKAGES[*]} with apt-get (about 10-20 s)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "${PACKAGES[@]}" >/tmp/slurm_local-apt.log 2>&1; then
    say "apt-get install failed; running apt-get update and retrying"
    apt-get update -q >>/tmp/slurm_local-apt.log 2>&1 || true
    apt-get install -y -q "${PACKAGES[@]}" >>/tmp/slurm_local-apt.log 2>&1 \
      || { tail -20 /tmp/slurm_local-apt.log >&2; cannot_install "apt-get install ${PACKAGES[*]} failed (log: /tmp/slurm_local-apt.log)"; }
  fi
  say "installed: $(slurmctld -V)"
}

node_line() {  # this host as slurmd detects it (CPUs, sockets, cores, threads, memory)
  local detected mem
  detected=$(slurmd -C | head -1)
  [[ $detected == NodeName=* ]] || die "slurmd -C failed: $detected"
  mem=${detected##*RealMemory=}
  mem=${SLURM_LOCAL_MEM_MB:-$(( mem > 2048 ? mem - 1024 : mem ))}
  echo "${detected% RealMemory=*} RealMemory=$mem NodeAddr=127.0.0.1 State=UNKNOWN"
}

write_conf() {  # sets CONF_CHANGED=1 when the file was (re)written
  local host text
  host=$(hostname -s)
  if [[ -e $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
    not_here "$CONF exists and was not written by this script (a real cluster's?); not touching it"
  fi
  text="$MARK
# Remove with: scripts/slurm_local.sh purge
ClusterName=dasheng-local
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
# No cgroups (containers without systemd or a writable cgroup tree): track processes by /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No accounting database: sacct fails; clients must use squeue for job states.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue for 300 s (the Snakemake plugin's squeue status check
# needs at least 3x its polling interval).
MinJobAge=300
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A job without --mem gets 1 GB per CPU (not the whole node, which would serialise jobs).
DefMemPerCPU=1024
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
$(node_line)
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  mkdir -p "$CONF_DIR"
  if [[ -e $CONF ]] && [[ $(cat "$CONF") == "$text" ]]; then
    say "$CONF is up to date"
    return
  fi
  printf '%s\n' "$text" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  say "wrote $CONF (node $host: $(node_line | grep -o 'CPUs=[0-9]*') $(node_line | grep -o 'RealMemory=[0-9]*'), partition $PARTITION)"
  CONF_CHANGED=1
}

start_munge() {
  if alive "$MUNGE_PID"; then
    say "munged is running (pid $(cat "$MUNGE_PID"))"
    return
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating the munge key"
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  say "starting munged (as user munge)"
  runuser -u munge -- munged --pid-file="$MUNGE_PID"
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

start_daemon() {  # start_daemon NAME PIDFILE
  local name=$1 pidfile=$2
  if alive "$pidfile"; then
    say "$name is running (pid $(cat "$pidfile"))"
    return
  fi
  say "starting $name"
  "$name" || die "$name failed to start (see $LOGDIR/$name.log)"
  for _ in $(seq 1 50); do alive "$pidfile" && return; sleep 0.1; done
  tail -20 "$LOGDIR/$name.log" >&2 || true
  die "$name did not stay up (see $LOGDIR/$name.log)"
}

stop_daemon() {  # stop_daemon NAME PIDFILE: SIGTERM, then SIGKILL after 10 s
  local name=$1 pidfile=$2 pid
  if ! alive "$pidfile"; then
    say "$name is not running"
    rm -f "$pidfile"
    return
  fi
  pid=$(cat "$pidfile")
  say "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do alive "$pidfile" || { rm -f "$pidfile"; return; }; sleep 0.1; done
  say "$name did not stop in 10 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

node_state() { sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -1; }

wait_idle() {
  local state="" i resumed=0
  for i in $(seq 1 $(( TIMEOUT * 2 ))); do
    state=$(node_state)
    case $state in
      idle|mixed|allocated|completing) say "node $(hostname -s) is $state: the cluster is up"; return ;;
      down*|drain*|drained*|fail*)
        # left down/drained by an earlier crash (e.g. slurmd killed with jobs running)
        if (( resumed == 0 && i > 4 )); then
          say "node $(hostname -s) is $state: scontrol update State=RESUME"
          scontrol update NodeName="$(hostname -s)" State=RESUME || true
          resumed=1
        fi ;;
    esac
    sleep 0.5
  done
  sinfo -N -l >&2 || true
  tail -20 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
  die "node $(hostname -s) not idle after ${TIMEOUT} s (state: '${state:-unknown}')"
}

cmd_start() {
  need_root
  install_packages
  mkdir -p "$STATE" "$SPOOL" "$LOGDIR"
  CONF_CHANGED=0
  write_conf
  start_munge
  if [[ $CONF_CHANGED == 1 ]] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
    say "configuration changed: restarting slurmctld and slurmd"
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
  fi
  start_daemon slurmctld "$CTLD_PID"
  start_daemon slurmd "$SLURMD_PID"
  wait_idle
  sinfo
}

cancel_jobs() {
  alive "$CTLD_PID" || return 0
  local jobs
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [[ -z ${jobs// /} ]]; then return; fi
  say "cancelling jobs: $jobs"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  for _ in $(seq 1 40); do
    [[ -z $(squeue -h -t PD,R,CG,S -o %i 2>/dev/null) ]] && return
    sleep 0.5
  done
  say "some jobs are still listed after 20 s: $(squeue -h -o '%i %T' | tr '\n' ' ')"
}

cmd_stop() {
  need_root
  cancel_jobs
  stop_daemon slurmd "$SLURMD_PID"
  stop_daemon slurmctld "$CTLD_PID"
  stop_daemon munged "$MUNGE_PID"
  say "stopped"
}

cmd_status() {
  local up=0
  for d in "munged $MUNGE_PID" "slurmctld $CTLD_PID" "slurmd $SLURMD_PID"; do
    set -- $d
    if alive "$2"; then say "$1: running (pid $(cat "$2"))"; else say "$1: stopped"; up=1; fi
  done
  if alive "$CTLD_PID"; then sinfo; squeue; fi
  return $up
}

cmd_purge() {
  cmd_stop
  if [[ -e $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
    die "$CONF was not written by this script; not removing it"
  fi
  say "removing $CONF, $STATE, $SPOOL, $LOGDIR/slurmctld.log, $LOGDIR/slurmd.log"
  rm -rf "$CONF" "$STATE" "$SPOOL" "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log"
  say "packages stay installed (apt-get remove slurm-wlm munge to remove them)"
}

cmd_profile() {  # cmd_profile [DIR]
  local repo dest src partition
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  src=$repo/slurm/config.yaml
  dest=${1:-$repo/.snakemake/slurm-local}
  [[ -s $src ]] || die "$src not found"
  partition=$PARTITION
  if command -v sinfo >/dev/null && sinfo -h -o %P >/dev/null 2>&1; then
    partition=$(sinfo -h -o %P | grep -m1 '\*$' | tr -d '*' || true)
    partition=${partition:-$PARTITION}
  fi
  mkdir -p "$dest"
  {
    echo "# Derived from $src by scripts/slurm_local.sh profile:"
    echo "# partitions -> $partition, no account (the local cluster has no accounting)."
    sed -E -e "s/^([[:space:]]*slurm_partition:[[:space:]]*)\"[^\"]*\"/\1\"$partition\"/" \
        -e '/^[[:space:]]*slurm_account:/d' \
        -e 's/^# (slurm-no-account: true)/\1/' "$src"
  } > "$dest/config.yaml.tmp"
  grep -q '^slurm-no-account: true' "$dest/config.yaml.tmp" || die "could not derive the profile (no slurm-no-account line in $src)"
  mv "$dest/config.yaml.tmp" "$dest/config.yaml"
  say "wrote $dest/config.yaml (partition $partition, no account): snakemake --profile $dest all"
}

case ${1:-} in
  profile) shift; cmd_profile "$@" ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  purge) cmd_purge ;;
  *) echo "usage: $0 start|stop|status|purge|profile [DIR]" >&2; exit 2 ;;
esac
