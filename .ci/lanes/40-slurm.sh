#!/usr/bin/env bash
# CI lane: `nemo-lossfree slurm` against a real SLURM on this machine.
# Brings up examples/slurm/local_cluster.sh (installs slurm-wlm and munge when
# missing; needs root), runs examples/slurm/test_real_slurm.py (a job that
# completes, a job that is preempted, requeued and resumed), and stops the
# cluster afterwards, also when something failed. On one node it first runs
# the README's SLURM block as written (examples/slurm/readme_block.py).
#
# Default: one slurmd on localhost, jobs with --ntasks-per-node 2.
# NLF_SLURM_NODES=2 emulates two nodes with network namespaces, so the two
# ranks rendezvous across "nodes" (see docs/slurm.md for what it achieved).
set -euo pipefail
cd "$(dirname "$0")/../.."

nodes=${NLF_SLURM_NODES:-1}
tasks=${NLF_SLURM_TASKS:-$((2 / nodes > 0 ? 2 / nodes : 1))}
export NLF_SLURM_NODES=$nodes NLF_SLURM_TASKS=$tasks

# A cluster of its own: its own state directory and free ports, so a
# developer's cluster on the same machine (or another CI run) is neither
# reused nor stopped by this lane.
export NLF_SLURM_STATE=${NLF_SLURM_STATE:-$(mktemp -d /tmp/nemo-lossfree-slurm-ci.XXXXXX)}
chmod 755 "$NLF_SLURM_STATE"
read -r NLF_SLURMCTLD_PORT NLF_SLURMD_PORT < <(.venv/bin/python - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
export NLF_SLURMCTLD_PORT NLF_SLURMD_PORT
cluster=examples/slurm/local_cluster.sh
stop_cluster() {
  status=$?
  if [ "$status" != 0 ]; then
    echo "--- SLURM daemon logs (tail) ---"
    tail -n 30 "${NLF_SLURM_STATE:-/tmp/nemo-lossfree-slurm}"/log/*.log || true
  fi
  bash "$cluster" stop || true
  rm -rf "$NLF_SLURM_STATE"
  exit "$status"
}
trap stop_cluster EXIT

start=$SECONDS
if [ "$nodes" = 1 ]; then
  # The README's SLURM block, pasted as a user would (it starts and stops the
  # cluster itself, on this lane's state directory and ports).
  .venv/bin/python examples/slurm/readme_block.py --check
  bash -euo pipefail -c "$(.venv/bin/python examples/slurm/readme_block.py)"
  echo "README SLURM block done in $((SECONDS - start))s"
fi
bash "$cluster" start --nodes "$nodes"
echo "cluster up in $((SECONDS - start))s"
eval "$(bash "$cluster" env)"

.venv/bin/python -m pytest -q -p no:cacheprovider examples/slurm/test_real_slurm.py
echo "slurm lane done in $((SECONDS - start))s"
