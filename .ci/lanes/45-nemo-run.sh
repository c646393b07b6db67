#!/usr/bin/env bash
# NeMo-Run lane: the lossfree entry points launched through NeMo-Run 0.11.1
# (nemo_lossfree.integrations.nemo_run), as NeMo-framework users launch Bridge
# recipes. Builds its own venv on top of the project's .venv (pinned in
# tests/_support/nemo_run_lane/requirements-nemo-run-lane.txt; nemo_run is not
# in make test's venv), then runs tests/_support/nemo_run_lane/lane_checks.py:
# the tasks and executors built from run configs (command lines, environment,
# sbatch scripts NeMo-Run renders, refusals before submission), and, on a
# one-node SLURM cluster (examples/slurm/local_cluster.sh, its own state
# directory and ports, stopped also on failure after printing the logs), a
# CPU job submitted by NeMo-Run's SlurmExecutor that runs to completion, and
# one that is sent USR1, checkpoints, is requeued by NeMo-Run's script and
# resumes to the same biases.
# NLF_NEMO_RUN_TIMEOUT: seconds for the checks (default 900).
set -euo pipefail
# As users run on shared machines (and the tests do): the cluster must still size
# its node from every CPU (local_cluster.sh once read nproc, which honours this,
# and every 2-task job stayed PENDING).
export OMP_NUM_THREADS=1
cd "$(dirname "$0")/../.."
start=$SECONDS
source .ci/lib/lane_venv.sh
source .ci/lib/cluster_ports.sh
LANE_VENV=${NEMO_RUN_LANE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nemo-lossfree/venv-nemo-run}
lane_venv "$LANE_VENV" tests/_support/nemo_run_lane/requirements-nemo-run-lane.txt
echo "nemo-run lane: venv ready (t=$((SECONDS - start))s)"

cluster=examples/slurm/local_cluster.sh
export NLF_SLURM_STATE
NLF_SLURM_STATE=$(mktemp -d /tmp/nemo-lossfree-nemo-run-ci.XXXXXX)
chmod 755 "$NLF_SLURM_STATE"
stop_cluster() {
  status=$?
  if [ "$status" != 0 ]; then
    echo "--- SLURM daemon logs (tail) ---"
    tail -n 30 "$NLF_SLURM_STATE"/log/*.log 2>/dev/null || true
    echo "--- job logs (tail) ---"
    find "$NLF_SLURM_STATE/pytest" \( -name 'log-*.out' -o -name 'sbatch_*.out' \) \
      -exec tail -n 40 {} + 2>/dev/null || true
  fi
  bash "$cluster" stop || true
  rm -rf "$NLF_SLURM_STATE"
  exit "$status"
}
trap stop_cluster EXIT
cluster_ports
bash "$cluster" start --nodes 1
eval "$(bash "$cluster" env)"
echo "nemo-run lane: cluster up (t=$((SECONDS - start))s)"
# NeMo-Run's own files (experiments, job metadata) stay in the lane's directory.
export NEMORUN_HOME=$NLF_SLURM_STATE/nemorun-home
timeout -k 30 "${NLF_NEMO_RUN_TIMEOUT:-900}" "$LANE_VENV/bin/python" -m pytest -q -p no:cacheprovider \
  -o addopts="" --basetemp="$NLF_SLURM_STATE/pytest" tests/_support/nemo_run_lane/lane_checks.py
echo "nemo-run lane: done in $((SECONDS - start))s"
