#!/usr/bin/env bash
# CI lane: `nemo-lossfree slurm` against a real SLURM on this machine.
# For each cluster size in NLF_SLURM_NODES (default "1 2"), brings up
# examples/slurm/local_cluster.sh (installs slurm-wlm and munge when missing;
# needs root), runs examples/slurm/test_real_slurm.py (a job that completes, a
# job that is preempted, requeued and resumed) under a hard timeout, and stops
# the cluster afterwards, also when something failed (printing the daemons'
# logs and the jobs' logs first). Before the one-node cluster it runs the
# README's SLURM block as written (examples/slurm/readme_block.py).
#
# 1: one slurmd on localhost, jobs with --ntasks-per-node 2.
# 2: two nodes emulated with network namespaces, one rank each, so the ranks
#    rendezvous (srun and torchrun) and checkpoint across "nodes"
#    (docs/slurm.md).
# NLF_SLURM_PART_TIMEOUT: seconds for one cluster's tests (default 1200).
set -euo pipefail
# As users run on shared machines (and the tests do): the cluster must still size
# its node from every CPU (local_cluster.sh once read nproc, which honours this,
# and every 2-task job stayed PENDING).
export OMP_NUM_THREADS=1
cd "$(dirname "$0")/../.."
source .ci/lib/cluster_ports.sh

sizes=${NLF_SLURM_NODES:-1 2}
part_timeout=${NLF_SLURM_PART_TIMEOUT:-1200}
cluster=examples/slurm/local_cluster.sh

# Each cluster of its own: its own state directory and free ports, so a
# developer's cluster on the same machine (or another CI run) is neither
# reused nor stopped by this lane.
base=$(mktemp -d /tmp/nemo-lossfree-slurm-ci.XXXXXX)
chmod 755 "$base"
new_cluster() {
  export NLF_SLURM_STATE=$base/$1
  mkdir -p "$NLF_SLURM_STATE"
  chmod 755 "$NLF_SLURM_STATE"
  cluster_ports
}
stop_cluster() {
  status=$?
  if [ "$status" != 0 ] && [ -n "${NLF_SLURM_STATE:-}" ]; then
    echo "--- SLURM daemon logs (tail) ---"
    tail -n 30 "$NLF_SLURM_STATE"/log/*.log || true
    echo "--- job logs (tail) ---"
    find "$NLF_SLURM_STATE/pytest" -path '*/logs/*.out' -exec tail -n 40 {} + 2>/dev/null || true
  fi
  [ -z "${NLF_SLURM_STATE:-}" ] || bash "$cluster" stop || true
  rm -rf "$base"
  exit "$status"
}
trap stop_cluster EXIT

start=$SECONDS
for nodes in $sizes; do
  [[ $nodes =~ ^[1-9][0-9]*$ ]] || { echo "NLF_SLURM_NODES: expected cluster sizes like '1 2', got '$sizes'" >&2; exit 2; }
  export NLF_SLURM_NODES=$nodes NLF_SLURM_TASKS=$((2 / nodes > 0 ? 2 / nodes : 1))
  part=$SECONDS
  if [ "$nodes" = 1 ]; then
    # The README's SLURM block, pasted as a user would (it starts and stops the
    # cluster itself, on this lane's state directory and ports).
    new_cluster readme
    .venv/bin/python examples/slurm/readme_block.py --check
    bash -euo pipefail -c "$(.venv/bin/python examples/slurm/readme_block.py)"
    echo "README SLURM block done in $((SECONDS - part))s"
  fi
  new_cluster "nodes$nodes"
  bash "$cluster" start --nodes "$nodes"
  echo "$nodes-node cluster up in $((SECONDS - part))s"
  eval "$(bash "$cluster" env)"
  timeout -k 30 "$part_timeout" .venv/bin/python -m pytest -q -p no:cacheprovider \
    --basetemp="$NLF_SLURM_STATE/pytest" examples/slurm/test_real_slurm.py
  bash "$cluster" stop
  unset NLF_SLURM_STATE
  echo "$nodes-node SLURM tests done in $((SECONDS - part))s"
done
echo "slurm lane done in $((SECONDS - start))s"
