"""The sbatch script template (kept as Python text so it ships inside the wheel).

``{{name}}`` marks a value filled in by ``render.render_sbatch``; everything
else is plain bash that a cluster user should be able to read and edit.
"""

SBATCH_TEMPLATE = r"""#!/bin/bash
# {{title}}
# Rendered by `nemo-lossfree slurm`. {{submit_hint}}
# Layout: {{layout}}
{{sbatch_header}}

# No `set -e`: the training's exit code decides between finishing and
# requeueing, so it must be read, not abort the script.
set -uo pipefail

echo "job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST} (restart ${SLURM_RESTART_COUNT:-0}) at $(date -u +%FT%TZ)"

# ---- environment --------------------------------------------------------------
{{env_block}}

# ---- rendezvous: the first node of the allocation hosts it ----------------------
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT={{master_port}}
export MASTER_ADDR MASTER_PORT

# ---- preemption ---------------------------------------------------------------
# SLURM sends USR1 to this shell {{signal_seconds}} s before the time limit
# (--signal=B:USR1@...); an operator can do the same with
# `scancel --batch --signal=USR1 <job>`. Forward it to every training task:
# they finish the current step, save a checkpoint and exit, and this script
# requeues the job, which resumes from that checkpoint.
preempted=0
forward_stop_signal() {
  preempted=1
  echo "USR1 received: asking the training to checkpoint and stop"
  scancel --signal=USR1 "$SLURM_JOB_ID"
}
trap forward_stop_signal USR1

# ---- launch ---------------------------------------------------------------------
{{launch_block}}

# Run the step in the background: bash runs a trap only between commands, so
# a foreground srun would hold the signal until training ended.
srun "${srun_args[@]}" "${launch[@]}" &
step_pid=$!
# `wait` returns early when the trap fires; keep waiting for the step itself.
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done
wait "$step_pid"
rc=$?
echo "training step exited with $rc at $(date -u +%FT%TZ)"

# {{stopped_exit_code}}: the training saved a checkpoint and stopped early (asked to).
if [ "$rc" = {{stopped_exit_code}} ] || { [ "$preempted" = 1 ] && [ "$rc" != 0 ]; }; then
{{requeue_block}}
fi
exit "$rc"
"""
