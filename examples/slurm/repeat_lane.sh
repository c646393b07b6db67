#!/usr/bin/env bash
# Runs the SLURM CI lane (.ci/lanes/40-slurm.sh) N times back to back, each
# time on a fresh cluster, and prints one line per run: run number, PASS or
# FAIL, wall seconds. For counting how reliable the (emulated) multi-node runs
# are; docs/slurm.md records what it gave.
#
#   examples/slurm/repeat_lane.sh 10              # two-node cluster (default)
#   NLF_SLURM_NODES=1 examples/slurm/repeat_lane.sh 5
#
# Each iteration runs test_real_slurm.py's two jobs: one through srun to the
# end, one through torchrun that is preempted (USR1), requeued and resumed to
# the same biases. A failed run's full lane output is kept in
# $NLF_REPEAT_LOGS (default: a new temporary directory) and the loop goes on,
# so one bad run does not hide the others. Exit code: 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")/../.."

runs=${1:?usage: repeat_lane.sh N}
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "repeat_lane.sh: N must be a positive integer, got '$runs'" >&2; exit 2; }
export NLF_SLURM_NODES=${NLF_SLURM_NODES:-2}
logs=${NLF_REPEAT_LOGS:-$(mktemp -d /tmp/nemo-lossfree-repeat.XXXXXX)}
mkdir -p "$logs"

failed=0
echo "# nodes=$NLF_SLURM_NODES runs=$runs logs=$logs"
printf '%s\t%s\t%s\n' run result wall_s
for ((i = 1; i <= runs; i++)); do
  start=$SECONDS
  if bash .ci/lanes/40-slurm.sh >"$logs/run-$i.log" 2>&1; then
    result=PASS
    rm -f "$logs/run-$i.log"
  else
    result=FAIL
    failed=$((failed + 1))
  fi
  printf '%s\t%s\t%s\n' "$i" "$result" "$((SECONDS - start))"
done
echo "# $((runs - failed))/$runs passed"
[ "$failed" = 0 ]
