#!/usr/bin/env bash
# A real SLURM cluster on this machine (Debian/Ubuntu, as root, no systemd needed): for trying
# `snakemake --profile slurm` locally, and used by tests/test_slurm.py and tests/test_slurm_multinode.py.
# How to try the multi-node profile with it: docs/cluster.md, "Try it on one machine".
#
#   scripts/slurm_local.sh start [--nodes N]
#                                   install slurm-wlm + munge (+ iproute2) if missing, write
#                                   /etc/slurm/slurm.conf, start munged, slurmctld and slurmd(s),
#                                   wait until every node is idle. N = 1 (default for a new cluster;
#                                   without --nodes, `start` keeps the layout already configured):
#                                   this host is the node. N >= 2: N compute nodes dnode1..dnodeN
#                                   and the controller dctl, each in its own network namespace
#                                   (below); a node that is down or killed is brought back.
#   scripts/slurm_local.sh stop     cancel every job of this cluster, stop the daemons (and remove
#                                   the namespaces and the bridge of a multi-node cluster)
#   scripts/slurm_local.sh status   the daemons, sinfo and squeue (exit status 0 when all run)
#   scripts/slurm_local.sh purge    stop, then remove the config, state and logs that start wrote
#   scripts/slurm_local.sh kill-node NODE
#                                   (multi-node) a node failure: kill -9 every process in NODE's
#                                   namespace (its slurmd, job steps, Ray processes); SLURM marks
#                                   it DOWN after SlurmdTimeout; `start` brings it back
#   scripts/slurm_local.sh pids NODE  (multi-node) the processes in NODE's namespace, one pid a line
#   scripts/slurm_local.sh profile [DIR]
#                                   write DIR/config.yaml (default .snakemake/slurm-local): the
#                                   repository's slurm/config.yaml with this cluster's partition and
#                                   no account, for `snakemake --profile DIR all` (no root needed)
#
# Every command is idempotent (start twice: the second finds the cluster up and changes nothing)
# and prints what it does. One partition, `debug`, with every node, and NO accounting database:
# `sacct` does not work, so the Snakemake SLURM plugin must query job states with squeue
# (`slurm-status-command: squeue`, as in slurm/config.yaml). The daemons run as root and are
# started by hand (PID 1 need not be systemd); processes are tracked through /proc
# (proctrack/linuxproc, task/none): no cgroups needed.
#
# One node: this host (all its CPUs, its memory minus 1 GiB) at 127.0.0.1.
# N nodes: a bridge `dasheng-br` with $SUBNET.1 (this host, the "login node", where sbatch and
# squeue run), the controller in namespace `dasheng-ctl` ($SUBNET.2, host name dctl) and node i in
# namespace `dasheng-dnode<i>` ($SUBNET.(10+i), host name dnode<i>, set with `unshare --uts`), each
# joined to the bridge by a veth pair. `slurmd -N dnode<i>` runs in its node's namespaces, with
# `%n` in its spool, pid and log paths (/var/spool/slurmd/dnode<i>, /run/slurmd-dnode<i>.pid,
# /var/log/slurm/slurmd-dnode<i>.log). Every node offers all the host's CPUs (they share them) and
# an equal part of its memory minus 1 GiB. The filesystem is shared (the nodes see the same files,
# like a cluster's NFS); each namespace gets its own /etc/hosts naming the cluster's hosts
# (/etc/netns/<namespace>/hosts, bind-mounted there in a mount namespace of the node's own). The namespaces have no
# default route: traffic stays between them, on the bridge's addresses and the loopback.
#
# Environment:
#   SLURM_LOCAL_NODES       nodes of a new cluster when `start` gets no --nodes (default: 1)
#   SLURM_LOCAL_PARTITION   partition name (default: debug)
#   SLURM_LOCAL_MEM_MB      memory each node offers in MB (default: detected minus 1024, divided by N)
#   SLURM_LOCAL_SUBNET      the multi-node cluster's /24, as its first three numbers (default 10.211.0)
#   SLURM_LOCAL_SLURMD_TIMEOUT  seconds without an answer before slurmctld marks a node DOWN
#                           (SlurmdTimeout; default 30 for one node, 15 for several)
#   SLURM_LOCAL_NO_INSTALL  1: never run apt-get (fail if the packages are missing)
#   SLURM_LOCAL_TIMEOUT_S   seconds to wait for the nodes to become idle (default: 60)
#
# Exit status: 0 done, 1 error, 2 usage, 3 not possible on this machine (slurm-wlm/munge/iproute2
# missing and not installable: no apt-get, apt-get failing, SLURM_LOCAL_NO_INSTALL=1; network
# namespaces not permitted; the subnet already in use; or an /etc/slurm/slurm.conf that this script
# did not write, i.e. a real cluster's): tests skip on 3.
set -euo pipefail

PARTITION=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT=${SLURM_LOCAL_TIMEOUT_S:-60}
SUBNET=${SLURM_LOCAL_SUBNET:-10.211.0}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK_PREFIX="# Written by scripts/slurm_local.sh (dasheng)"
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGDIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
PACKAGES=(slurm-wlm munge)
BRIDGE=dasheng-br
NS_PREFIX=dasheng-
CTL_NS=dasheng-ctl
CTL_HOST=dctl
NODE_PREFIX=dnode

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

# --------------------------------------------------------------------------- the layout

ours() { [[ -e $CONF ]] && grep -q "^$MARK_PREFIX" "$CONF"; }

configured_nodes() {  # the node count of the cluster in $CONF (0: none of ours)
  ours || { echo 0; return; }
  local n
  n=$(grep -c "^NodeName=$NODE_PREFIX[0-9]" "$CONF" || true)
  echo $(( n > 0 ? n : 1 ))
}

node_names() {  # the compute nodes of a multi-node layout of N nodes
  local i
  for i in $(seq 1 "$1"); do echo "$NODE_PREFIX$i"; done
}

node_ns() { echo "$NS_PREFIX$1"; }
node_addr() { echo "$SUBNET.$(( 10 + ${1#"$NODE_PREFIX"} ))"; }
node_pidfile() { echo "/run/slurmd-$1.pid"; }
node_veth() { echo "dasheng-v${1#"$NODE_PREFIX"}"; }

install_packages() {  # install_packages MULTI(0|1)
  local need=("${PACKAGES[@]}") have=1
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null || have=0
  if [[ $1 == 1 ]]; then
    need+=(iproute2)
    command -v ip >/dev/null && command -v unshare >/dev/null || have=0
  fi
  if [[ $have == 1 ]]; then
    say "packages present: $(slurmctld -V 2>/dev/null || echo slurm), munge $(munged -V 2>/dev/null | awk '{print $1}' || true)"
    return
  fi
  [[ ${SLURM_LOCAL_NO_INSTALL:-0} == 1 ]] && cannot_install "${need[*]} are not all installed and SLURM_LOCAL_NO_INSTALL=1"
  command -v apt-get >/dev/null || cannot_install "${need[*]} are not all installed and apt-get is not available"
  say "installing ${need[*]} with apt-get (about 10-20 s)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q "${need[@]}" >/tmp/slurm_local-apt.log 2>&1; then
    say "apt-get install failed; running apt-get update and retrying"
    apt-get update -q >>/tmp/slurm_local-apt.log 2>&1 || true
    apt-get install -y -q "${need[@]}" >>/tmp/slurm_local-apt.log 2>&1 \
      || { tail -20 /tmp/slurm_local-apt.log >&2; cannot_install "apt-get install ${need[*]} failed (log: /tmp/slurm_local-apt.log)"; }
  fi
  command -v unshare >/dev/null || cannot_install "unshare (util-linux) is missing"
  say "installed: $(slurmctld -V)"
}

detected() {  # this host as slurmd detects it, without RealMemory; and the memory to offer per node
  local line mem
  line=$(slurmd -C | head -1)
  [[ $line == NodeName=* ]] || die "slurmd -C failed: $line"
  mem=${line##*RealMemory=}
  mem=$(( mem > 2048 ? mem - 1024 : mem ))
  HW=${line% RealMemory=*}
  HW=${HW#NodeName=* }
  MEM=${SLURM_LOCAL_MEM_MB:-$(( mem / $1 ))}
}

conf_text() {  # conf_text N: the slurm.conf of an N-node cluster (after `detected N`)
  local n=$1 host node
  host=$(hostname -s)
  echo "$MARK_PREFIX: a local test cluster of $n node(s)."
  echo "# Remove with: scripts/slurm_local.sh purge"
  echo "ClusterName=dasheng-local"
  if (( n == 1 )); then
    echo "SlurmctldHost=$host(127.0.0.1)"
  else
    echo "SlurmctldHost=$CTL_HOST($SUBNET.2)"
  fi
  cat <<CONF
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
CONF
  if (( n == 1 )); then
    echo "SlurmdSpoolDir=$SPOOL"
    echo "SlurmdPidFile=$SLURMD_PID"
    echo "SlurmdLogFile=$LOGDIR/slurmd.log"
  else
    echo "# one slurmd per node, each in its own namespaces: %n is the node's name"
    echo "SlurmdSpoolDir=$SPOOL/%n"
    echo "SlurmdPidFile=/run/slurmd-%n.pid"
    echo "SlurmdLogFile=$LOGDIR/slurmd-%n.log"
  fi
  cat <<CONF
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
CONF
  if (( n == 1 )); then
    echo "SlurmdTimeout=${SLURM_LOCAL_SLURMD_TIMEOUT:-30}"
    echo "NodeName=$host $HW RealMemory=$MEM NodeAddr=127.0.0.1 State=UNKNOWN"
  else
    echo "# A node that does not answer for SlurmdTimeout s is DOWN and its jobs end (NODE_FAIL); a"
    echo "# failed job is not requeued by SLURM (Snakemake resubmits it)."
    echo "SlurmdTimeout=${SLURM_LOCAL_SLURMD_TIMEOUT:-15}"
    echo "JobRequeue=0"
    for node in $(node_names "$n"); do
      echo "NodeName=$node NodeHostname=$node NodeAddr=$(node_addr "$node") $HW RealMemory=$MEM State=UNKNOWN"
    done
  fi
  if (( n == 1 )); then
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  else
    echo "# LLN: each job goes to the least loaded node (the jobs of a DAG spread over the nodes)"
    echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP LLN=YES"
  fi
}

write_conf() {  # write_conf N: (re)write $CONF when it differs; sets CONF_CHANGED=1 then. The
  # daemons of the old configuration are stopped first, while their clients can still reach them.
  local text
  if [[ -e $CONF ]] && ! ours; then
    not_here "$CONF exists and was not written by this script (a real cluster's?); not touching it"
  fi
  detected "$1"
  text=$(conf_text "$1")
  mkdir -p "$CONF_DIR"
  if [[ -e $CONF ]] && [[ $(cat "$CONF") == "$text" ]]; then
    say "$CONF is up to date"
    return
  fi
  if alive "$CTLD_PID" || alive "$SLURMD_PID" || compgen -G "/run/slurmd-$NODE_PREFIX*.pid" >/dev/null; then
    say "configuration changes: stopping the jobs, slurmctld and slurmd"
    cancel_jobs
    stop_all_daemons
  fi
  printf '%s\n' "$text" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  say "wrote $CONF ($1 node(s): $(grep -o 'CPUs=[0-9]*' <<< "$HW") and RealMemory=$MEM each, partition $PARTITION)"
  CONF_CHANGED=1
}

# --------------------------------------------------------------------------- the network

check_subnet() {  # the subnet must be free (or ours already)
  local used
  used=$(ip -o -4 addr show 2>/dev/null | awk -v b="$BRIDGE" '$2 != b {print $2, $4}' \
    | grep -F " $SUBNET." || true)
  [[ -z $used ]] || not_here "the subnet $SUBNET.0/24 is in use here ($used); set SLURM_LOCAL_SUBNET"
}

net_up() {  # net_up N: the bridge, the controller's and the nodes' namespaces (idempotent)
  local node
  check_subnet
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    say "creating the bridge $BRIDGE ($SUBNET.1/24)"
    ip link add "$BRIDGE" type bridge 2>/dev/null \
      || not_here "cannot create a bridge (ip link add type bridge): no CAP_NET_ADMIN in this container?"
  fi
  # (grep -q on a here-string, not a pipe: with pipefail, a writer cut off by grep -q fails the test)
  grep -qF "inet $SUBNET.1/" <<< "$(ip -4 addr show dev "$BRIDGE")" || ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  ns_up "$CTL_NS" dasheng-v0 "$SUBNET.2"
  hosts_file "$CTL_NS" "$CTL_HOST" "$1"
  for node in $(node_names "$1"); do
    ns_up "$(node_ns "$node")" "$(node_veth "$node")" "$(node_addr "$node")"
    hosts_file "$(node_ns "$node")" "$node" "$1"
  done
}

ns_up() {  # ns_up NAMESPACE VETH ADDRESS: a namespace joined to the bridge, with ADDRESS on eth0
  local ns=$1 veth=$2 addr=$3
  if ! grep -qw "^$ns" <<< "$(ip netns list)"; then
    say "creating network namespace $ns ($addr)"
    ip netns add "$ns" 2>/dev/null || not_here "cannot create network namespaces (ip netns add): not permitted here"
  fi
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip link add "$veth" type veth peer name eth0 netns "$ns"
  fi
  ip link set "$veth" master "$BRIDGE"
  ip link set "$veth" up
  ip -n "$ns" link set lo up
  grep -qF "inet $addr/" <<< "$(ip -n "$ns" -4 addr show dev eth0)" || ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
}

hosts_file() {  # hosts_file NAMESPACE HOSTNAME N: the /etc/hosts of the processes in NAMESPACE
  local node dir=/etc/netns/$1
  mkdir -p "$dir"
  {
    echo "# Written by scripts/slurm_local.sh: /etc/hosts of the processes in namespace $1"
    echo "127.0.0.1 localhost"
    echo "$SUBNET.1 $(hostname -s)"
    echo "$SUBNET.2 $CTL_HOST"
    for node in $(node_names "$3"); do echo "$(node_addr "$node") $node"; done
  } > "$dir/hosts"
}

ns_pids() {  # the processes in a namespace
  ip netns pids "$1" 2>/dev/null || true
}

ns_kill() {  # ns_kill NAMESPACE: kill -9 every process in it until none is left (10 s at most)
  local pids
  for _ in $(seq 1 100); do
    pids=$(ns_pids "$1" | tr '\n' ' ')
    [[ -z ${pids// /} ]] && return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  say "processes left in $1 after 10 s: $(ns_pids "$1" | tr '\n' ' ')"
}

net_down() {  # every namespace, veth and the bridge of this script
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
    ns_kill "$ns"
    say "removing network namespace $ns"
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    say "removing the bridge $BRIDGE"
    ip link del "$BRIDGE" 2>/dev/null || true
  fi
}

# --------------------------------------------------------------------------- the daemons

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

start_daemon() {  # start_daemon LABEL PIDFILE LOG COMMAND...: run COMMAND (it daemonises), wait for PIDFILE
  local label=$1 pidfile=$2 log=$3
  shift 3
  if alive "$pidfile"; then
    say "$label is running (pid $(cat "$pidfile"))"
    return
  fi
  say "starting $label"
  "$@" || die "$label failed to start (see $log)"
  for _ in $(seq 1 50); do alive "$pidfile" && return; sleep 0.1; done
  tail -20 "$log" >&2 || true
  die "$label did not stay up (see $log)"
}

in_ns() {  # in_ns NAMESPACE HOSTNAME COMMAND...: run COMMAND in the network namespace, with its own
  # host name (UTS namespace) and its own /etc/hosts (bind-mounted in a mount namespace that still
  # receives the host's mounts). (Not `ip netns exec`: it remounts /sys without the cgroup tree,
  # which slurmd needs.)
  local ns=$1 name=$2
  shift 2
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation slave \
    sh -c 'hostname "$0" && mount --bind "/etc/netns/$1/hosts" /etc/hosts && shift && exec "$@"' \
    "$name" "$ns" "$@"
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

nodes_of_conf() {  # the node names slurmctld knows from $CONF
  local n
  n=$(configured_nodes)
  if (( n <= 1 )); then hostname -s; else node_names "$n"; fi
}

wait_idle() {
  local states="" i resumed=0 node state pending
  for i in $(seq 1 $(( TIMEOUT * 2 ))); do
    pending=""
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
    for node in $(nodes_of_conf); do
      state=$(awk -v n="$node" '$1 == n {print $2; exit}' <<< "$states")
      case $state in
        idle|mixed|allocated|completing) ;;
        down*|drain*|drained*|fail*)
          # left down/drained by an earlier crash (e.g. slurmd killed with jobs running)
          pending+=" $node"
          if (( resumed == 0 && i > 4 )); then
            say "node $node is $state: scontrol update State=RESUME"
            scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
          fi ;;
        *) pending+=" $node" ;;
      esac
    done
    (( i > 4 )) && resumed=1
    if [[ -z $pending ]]; then
      say "every node is up ($(tr '\n' ' ' <<< "$states")): the cluster is up"
      return
    fi
    sleep 0.5
  done
  sinfo -N -l >&2 || true
  tail -20 "$LOGDIR/slurmctld.log" >&2 || true
  die "nodes not idle after ${TIMEOUT} s:$pending (states: ${states//$'\n'/, })"
}

stop_all_daemons() {  # every slurmd (either layout) and slurmctld; munged stays
  local f node
  stop_daemon slurmd "$SLURMD_PID"
  for f in /run/slurmd-"$NODE_PREFIX"*.pid; do
    [[ -e $f ]] || continue
    node=${f#/run/slurmd-}
    node=${node%.pid}
    stop_daemon "slurmd $node" "$f"
  done
  stop_daemon slurmctld "$CTLD_PID"
}

other_layout_runs() {  # other_layout_runs N: a slurmd of the other layout (one node / N nodes) runs
  local f
  if (( $1 > 1 )); then alive "$SLURMD_PID"; return; fi
  for f in /run/slurmd-"$NODE_PREFIX"*.pid; do alive "$f" && return 0; done
  return 1
}

cmd_start() {  # cmd_start [N]
  local n=${1:-} node have
  need_root
  have=$(configured_nodes)
  if [[ -z $n ]]; then
    n=$(( have > 0 ? have : ${SLURM_LOCAL_NODES:-1} ))
  fi
  [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 9 )) || die "--nodes must be 1 to 9, not '$n'"
  install_packages $(( n > 1 ))
  mkdir -p "$STATE" "$SPOOL" "$LOGDIR"
  CONF_CHANGED=0
  write_conf "$n"
  start_munge
  if [[ $CONF_CHANGED == 0 ]] && other_layout_runs "$n"; then  # (left by an interrupted start)
    say "daemons of another layout are running: stopping them"
    stop_all_daemons
    CONF_CHANGED=1 have=0
  fi
  if [[ $CONF_CHANGED == 1 ]]; then
    if (( have != n )); then
      # another layout: its nodes' states are of no use (and its namespaces go)
      net_down
      rm -rf "${STATE:?}"/* "$SPOOL"/"$NODE_PREFIX"*
    fi
  fi
  if (( n == 1 )); then
    start_daemon slurmctld "$CTLD_PID" "$LOGDIR/slurmctld.log" slurmctld
    start_daemon slurmd "$SLURMD_PID" "$LOGDIR/slurmd.log" slurmd
  else
    net_up "$n"
    start_daemon "slurmctld (namespace $CTL_NS, $SUBNET.2)" "$CTLD_PID" "$LOGDIR/slurmctld.log" \
      in_ns "$CTL_NS" "$CTL_HOST" slurmctld
    for node in $(node_names "$n"); do
      mkdir -p "$SPOOL/$node"
      start_daemon "slurmd $node (namespace $(node_ns "$node"), $(node_addr "$node"))" \
        "$(node_pidfile "$node")" "$LOGDIR/slurmd-$node.log" \
        in_ns "$(node_ns "$node")" "$node" slurmd -N "$node"
    done
  fi
  wait_idle
  sinfo -N
}

cancel_jobs() {
  alive "$CTLD_PID" || return 0
  local jobs
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
  if [[ -z ${jobs// /} ]]; then return; fi
  say "cancelling jobs: $jobs"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  for _ in $(seq 1 40); do
    [[ -z $(squeue -h -t PD,R,CG,S -o %i 2>/dev/null) ]] && return
    sleep 0.5
  done
  say "some jobs are still listed after 20 s: $(squeue -h -o '%i %T' | tr '\n' ' ' || true)"
}

cmd_stop() {
  need_root
  cancel_jobs
  stop_all_daemons
  stop_daemon munged "$MUNGE_PID"
  net_down
  say "stopped"
}

cmd_status() {
  local up=0 n node
  n=$(configured_nodes)
  for d in "munged $MUNGE_PID" "slurmctld $CTLD_PID"; do
    set -- $d
    if alive "$2"; then say "$1: running (pid $(cat "$2"))"; else say "$1: stopped"; up=1; fi
  done
  if (( n <= 1 )); then
    if alive "$SLURMD_PID"; then say "slurmd: running (pid $(cat "$SLURMD_PID"))"; else say "slurmd: stopped"; up=1; fi
  else
    for node in $(node_names "$n"); do
      if alive "$(node_pidfile "$node")"; then
        say "slurmd $node ($(node_addr "$node")): running (pid $(cat "$(node_pidfile "$node")"))"
      else
        say "slurmd $node ($(node_addr "$node")): stopped"; up=1
      fi
    done
  fi
  if alive "$CTLD_PID"; then sinfo -N; squeue; fi
  return $up
}

cmd_purge() {
  cmd_stop
  if [[ -e $CONF ]] && ! ours; then
    die "$CONF was not written by this script; not removing it"
  fi
  say "removing $CONF, $STATE, $SPOOL, $LOGDIR/slurmctld.log, $LOGDIR/slurmd*.log"
  rm -rf "$CONF" "$STATE" "$SPOOL" "$LOGDIR/slurmctld.log" "$LOGDIR"/slurmd*.log
  say "packages stay installed (apt-get remove slurm-wlm munge to remove them)"
}

check_node() {  # check_node NODE: a node of the running multi-node layout
  local n
  n=$(configured_nodes)
  (( n > 1 )) || die "no multi-node cluster is configured (scripts/slurm_local.sh start --nodes N)"
  grep -qx "$1" <<< "$(node_names "$n")" || die "no node '$1' (nodes: $(node_names "$n" | tr '\n' ' '))"
}

cmd_kill_node() {
  need_root
  check_node "$1"
  local ns pids
  ns=$(node_ns "$1")
  pids=$(ns_pids "$ns" | tr '\n' ' ')
  say "node $1 fails: kill -9 every process in namespace $ns: ${pids:-none}"
  ns_kill "$ns"
  rm -f "$(node_pidfile "$1")"
}

cmd_pids() {
  check_node "$1"
  ns_pids "$(node_ns "$1")"
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

usage() {
  echo "usage: $0 start [--nodes N]|stop|status|purge|kill-node NODE|pids NODE|profile [DIR]" >&2
  exit 2
}

case ${1:-} in
  profile) shift; cmd_profile "$@" ;;
  start)
    shift
    case ${1:-} in
      "") cmd_start ;;
      --nodes) [[ $# == 2 ]] || usage; cmd_start "$2" ;;
      --nodes=*) [[ $# == 1 ]] || usage; cmd_start "${1#--nodes=}" ;;
      *) usage ;;
    esac ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  purge) cmd_purge ;;
  kill-node) [[ $# == 2 ]] || usage; cmd_kill_node "$2" ;;
  pids) [[ $# == 2 ]] || usage; cmd_pids "$2" ;;
  *) usage ;;
esac
