"""What the demo's worker processes and whoever starts them agree on: progress lines (exit codes: ``exit_codes``).

Kept apart (no torch, no Megatron) so the launcher, the worker and the
results writer import it without importing each other.
"""

#: Rank 0's per-step progress lines start with this (the launcher reads them).
PROGRESS_PREFIX = "@@lossfree-progress "
