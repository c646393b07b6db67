"""What the demo's worker processes and whoever starts them agree on: progress lines (exit codes: ``exit_codes``).

Kept apart (no torch, no Megatron) so the launcher, the worker and the
results writer import it without importing each other.
"""

import json

#: Rank 0's per-step progress lines start with this (the launcher reads them).
PROGRESS_PREFIX = "@@lossfree-progress "


def progress_events(log_text: str) -> list[dict]:
    """The progress events in a job's log, in order.

    The marker may follow whatever a launcher puts before a rank's output
    (srun's ``--label``, NeMo-Run's prefixes), so it is searched on each line.
    """
    events = []
    for line in log_text.splitlines():
        _, marker, payload = line.partition(PROGRESS_PREFIX)
        if marker and payload.startswith("{"):
            events.append(json.loads(payload))
    return events
