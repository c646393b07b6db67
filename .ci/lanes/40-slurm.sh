#!/usr/bin/env bash
# CI lane: `nemo-lossfree slurm` against a real SLURM on this machine.
# Brings up examples/slurm/local_cluster.sh (installs slurm-wlm and munge when
# missing; needs root), runs examples/slurm/test_real_slurm.py (a job that
# completes, a job that is preempted, requeued and resumed), and stops the
# cluster afterwards, also when something failed.
#
# Default: one slurmd on localhost, jobs with --ntasks-per-node 2.
# NLF_SLURM_NODES=2 emulates two nodes with network namespaces, so the two
# ranks rendezvous across "nodes" (see docs/slurm.md for what it achieved).
set -euo pipefail
cd "$(dirname "$0")/../.."

nodes=${NLF_SLURM_NODES:-1}
tasks=${NLF_SLURM_TASKS:-$((2 / nodes > 0 ? 2 / nodes : 1))}
export NLF_SLURM_NODES=$nodes NLF_SLURM_TASKS=$tasks

cluster=examples/slurm/local_cluster.sh
stop_cluster() {
  status=$?
  if [ "$status" != 0 ]; then
    echo "--- SLURM daemon logs (tail) ---"
    tail -n 30 "${NLF_SLURM_STATE:-/tmp/nemo-lossfree-slurm}"/log/*.log || true
  fi
  bash "$cluster" stop || true
  exit "$status"
}
trap stop_cluster EXIT

start=$SECONDS
bash "$cluster" start --nodes "$nodes"
echo "cluster up in $((SECONDS - start))s"
eval "$(bash "$cluster" env)"

.venv/bin/python -m pytest -q -p no:cacheprovider examples/slurm/test_real_slurm.py
echo "slurm lane done in $((SECONDS - start))s"
