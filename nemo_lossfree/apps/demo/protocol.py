"""What the demo's worker processes and whoever starts them agree on: exit codes, progress lines.

Kept apart (no torch, no Megatron) so the launcher, the worker and the
results writer import it without importing each other.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: Stopped early on request (SIGUSR1/SIGTERM, --exit-after-steps) after saving:
#: a SLURM job script requeues itself on it.
EXIT_STOPPED = 75
#: Rank 0's per-step progress lines start with this (the launcher reads them).
PROGRESS_PREFIX = "@@lossfree-progress "
