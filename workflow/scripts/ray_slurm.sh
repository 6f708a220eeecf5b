#!/usr/bin/env bash
# Run a Ray driver command (e.g. `python -m model.train ...`) on the right Ray cluster.
#
# Outside SLURM, or in a one-node allocation, the command runs as it is and starts its own
# local Ray instance. In a multi-node SLURM allocation this script starts a Ray head on the
# first node (the one running the batch script), starts a worker on each other node with srun,
# waits until all of them joined, runs the command with `--address <head>:<port>`, and tears
# the cluster down on exit, failure or signal.
#
# Overrides (also used by the tests to run a head and a worker on 127.0.0.1):
#   RAY_NODES          space-separated node names (default: the SLURM allocation's)
#   RAY_HEAD_IP        address the workers connect to (default: the first node's IP)
#   RAY_PORT           head port (default 6379 + SLURM_JOB_ID % 1000)
#   RAY_WORKER_LAUNCH  command that runs its arguments on node $NODE (default: srun on $NODE)
#   RAY_CPUS_PER_NODE, RAY_GPUS_PER_NODE   resources each node offers (default: SLURM's)
#   RAY_TMP            Ray's temp folder (default /tmp/ray-$USER-$SLURM_JOB_ID)
set -euo pipefail

nodes=${RAY_NODES:-}
if [[ -z "$nodes" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')
fi
read -r -a node_list <<< "$nodes"
if (( ${#node_list[@]} < 2 )); then
  exec "$@"    # one node: the driver starts a local Ray instance
fi

head=${node_list[0]}
head_ip=${RAY_HEAD_IP:-$(getent hosts "$head" | awk '{print $1; exit}')}
port=${RAY_PORT:-$(( 6379 + ${SLURM_JOB_ID:-0} % 1000 ))}
cpus=${RAY_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}
gpus=${RAY_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
tmp=${RAY_TMP:-/tmp/ray-${USER:-user}-${SLURM_JOB_ID:-local}}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
worker_pids=()

teardown() {
  local status=$?
  echo "ray_slurm: stopping the Ray cluster (exit status $status)" >&2
  for pid in "${worker_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  ray stop --force >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  exit "$status"
}
trap teardown EXIT
trap 'exit 143' TERM INT

echo "ray_slurm: head $head ($head_ip:$port), workers: ${node_list[*]:1}" >&2
ray start --head --node-ip-address="$head_ip" --port="$port" --num-cpus="$cpus" --num-gpus="$gpus" \
  --temp-dir="$tmp" --include-dashboard=false --disable-usage-stats >&2

for node in "${node_list[@]:1}"; do
  if [[ -n "${RAY_WORKER_LAUNCH:-}" ]]; then
    NODE=$node bash -c "$RAY_WORKER_LAUNCH"' "$@"' _ \
      ray start --address="$head_ip:$port" --num-cpus="$cpus" --num-gpus="$gpus" --block \
      --disable-usage-stats >&2 &
  else
    srun --nodes=1 --ntasks=1 --overlap -w "$node" \
      ray start --address="$head_ip:$port" --num-cpus="$cpus" --num-gpus="$gpus" --block \
      --disable-usage-stats >&2 &
  fi
  worker_pids+=($!)
done

# Wait (up to 5 minutes) until every node has joined.
want=${#node_list[@]}
for _ in $(seq 1 300); do
  have=$(python - "$head_ip:$port" <<'PY'
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
) || have=0
  if (( have >= want )); then break; fi
  sleep 1
done
if (( have < want )); then
  echo "ray_slurm: only $have of $want nodes joined the Ray cluster" >&2
  exit 1
fi
echo "ray_slurm: $have nodes up" >&2
"$@" --address "$head_ip:$port"
