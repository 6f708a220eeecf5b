#!/usr/bin/env bash
# Run a Ray driver command (e.g. `python -m dasheng_pipeline.training.train ...`) on the right Ray cluster.
#
# Outside SLURM, or in a one-node allocation, the command runs as it is and starts its own
# local Ray instance. In a multi-node SLURM allocation this script starts a Ray head on the
# first node (the one running the batch script), starts a worker on each other node with srun,
# waits until all of them joined, runs the command with `--address <head>:<port>`, and tears
# the cluster down on exit, failure or signal.
#
# Every Ray node gets its node's address (`--node-ip-address`: what the host name resolves to, else
# SLURM's NodeAddr) and a temporary folder of its own (nodes may share /tmp). The log names each
# node and its address.
#
# Overrides (also used by the tests to run a head and a worker on 127.0.0.1):
#   RAY_NODES          space-separated node names (default: the SLURM job's, from squeue)
#   RAY_HEAD_IP        address the workers connect to (default: the first node's IP)
#   RAY_PORT           head port (default 6379 + SLURM_JOB_ID % 1000)
#   RAY_WORKER_LAUNCH  command that runs its arguments on node $NODE (default: srun on $NODE)
#   RAY_CPUS_PER_NODE, RAY_GPUS_PER_NODE   resources each node offers (default: SLURM's)
#   RAY_TMP            Ray's temp folder (default /tmp/ray-$USER-$SLURM_JOB_ID; a worker node's gets
#                      -<node> appended)
set -euo pipefail

nodes=${RAY_NODES:-}
if [[ -z "$nodes" && -n "${SLURM_JOB_ID:-}" ]]; then
  # The job's nodes, from slurmctld: inside the job step that Snakemake's jobstep plugin starts
  # (srun -n1), SLURM_JOB_NODELIST names the step's one node, not the allocation's.
  nodelist=$(squeue -h -j "$SLURM_JOB_ID" -o %N 2>/dev/null || true)
  nodelist=${nodelist:-${SLURM_JOB_NODELIST:-}}
  [[ -n $nodelist ]] && nodes=$(scontrol show hostnames "$nodelist" | tr '\n' ' ')
fi
read -r -a node_list <<< "$nodes"
if (( ${#node_list[@]} < 2 )); then
  exec "$@"    # one node: the driver starts a local Ray instance
fi

node_ip() {  # node_ip NODE: its address (resolved, else SLURM's NodeAddr), or nothing if unknown
  local ip
  ip=$(getent ahostsv4 "$1" 2>/dev/null | awk '{print $1; exit}')
  if [[ -z $ip ]] && command -v scontrol >/dev/null; then
    ip=$(scontrol show node "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    [[ $ip =~ ^[0-9.]+$ ]] || ip=$(getent ahostsv4 "$ip" 2>/dev/null | awk '{print $1; exit}')
  fi
  echo "$ip"
}

head=${node_list[0]}
head_ip=${RAY_HEAD_IP:-$(node_ip "$head")}
[[ -n $head_ip ]] || { echo "ray_slurm: cannot find the address of the head node $head" >&2; exit 1; }
port=${RAY_PORT:-$(( 6379 + ${SLURM_JOB_ID:-0} % 1000 ))}
cpus=${RAY_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}
gpus=${RAY_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
tmp=${RAY_TMP:-/tmp/ray-${USER:-user}-${SLURM_JOB_ID:-local}}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
pids=()

teardown() {
  local status=$?
  echo "ray_slurm: stopping the Ray cluster (exit status $status)" >&2
  # `ray start --block` stops its own node's processes on SIGTERM (srun forwards it to the
  # remote nodes); `ray stop` is not used: it would also stop other Ray instances of this user.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # (an srun whose node is lost may not return: 15 s, then SIGKILL)
  for _ in $(seq 1 150); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    (( left )) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  exit "$status"
}
trap teardown EXIT
trap 'exit 143' TERM INT
trap ':' USR1 USR2  # (until the driver runs; then forwarded to it, below)
driver=""
on_term() {  # SIGTERM (preemption, scancel): let the driver write its step checkpoint first
  if [[ -n $driver ]]; then
    echo "ray_slurm: SIGTERM: waiting for the driver to checkpoint and stop" >&2
    kill -TERM "$driver" 2>/dev/null || true
    wait "$driver"; exit $?
  fi
  exit 143
}

count_nodes() {
  python - "$head_ip:$port" <<'PY' 2>/dev/null || echo 0
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
}

wait_for_nodes() {  # wait_for_nodes N: up to 5 minutes
  local have=0
  for _ in $(seq 1 150); do
    for pid in "${pids[@]}"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "ray_slurm: a Ray node process (pid $pid) exited during start-up; see the messages above" >&2
        return 1
      fi
    done
    have=$(count_nodes)
    if (( have >= $1 )); then return 0; fi
    sleep 2
  done
  echo "ray_slurm: only $have of $1 nodes joined the Ray cluster" >&2
  return 1
}

echo "ray_slurm: head $head ($head_ip:$port), workers: ${node_list[*]:1}" >&2
ray start --head --block --node-ip-address="$head_ip" --port="$port" --num-cpus="$cpus" --num-gpus="$gpus" \
  --temp-dir="$tmp" --include-dashboard=false --disable-usage-stats >&2 &
pids+=($!)
wait_for_nodes 1

for node in "${node_list[@]:1}"; do
  ip=$(node_ip "$node")
  echo "ray_slurm: starting a Ray worker node on $node (${ip:-address unknown: Ray picks one})" >&2
  args=(ray start --address="$head_ip:$port" --num-cpus="$cpus" --num-gpus="$gpus" --block
        --temp-dir="$tmp-$node" --disable-usage-stats ${ip:+--node-ip-address="$ip"})
  if [[ -n "${RAY_WORKER_LAUNCH:-}" ]]; then
    NODE=$node bash -c "$RAY_WORKER_LAUNCH"' "$@"' _ "${args[@]}" >&2 &
  else
    srun --nodes=1 --ntasks=1 --overlap -w "$node" "${args[@]}" >&2 &
  fi
  pids+=($!)
done
wait_for_nodes "${#node_list[@]}"
echo "ray_slurm: ${#node_list[@]} nodes up" >&2
trap on_term TERM
# (SLURM's warning, SIGURG, is ignored by this shell and reaches the driver directly.) SIGUSR1 (stop)
# and SIGUSR2 (a step checkpoint) to this shell, e.g. `scancel --signal=USR2 <job>`, go to the driver
# too; they would end the shell otherwise.
"$@" --address "$head_ip:$port" &
driver=$!
trap 'kill -USR1 "$driver" 2>/dev/null || true' USR1
trap 'kill -USR2 "$driver" 2>/dev/null || true' USR2
while :; do
  status=0
  wait "$driver" || status=$?
  # (a trapped signal interrupts `wait` while the driver still runs: wait again)
  kill -0 "$driver" 2>/dev/null || break
done
exit "$status"
