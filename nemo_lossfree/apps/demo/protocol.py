"""What the demo's worker processes and whoever starts them agree on: progress lines (exit codes: ``exit_codes``).

Kept apart (no torch, no Megatron) so the launcher, the worker and the
results writer import it without importing each other.
"""

import json
from typing import Optional

#: Rank 0's per-step progress lines start with this (the launcher reads them).
PROGRESS_PREFIX = "@@lossfree-progress "


def progress_event(line: str) -> Optional[dict]:
    """The event a progress line carries, or None for any other line.

    The marker may follow whatever a launcher puts before a rank's output
    (srun's ``--label``, NeMo-Run's prefixes), so it is searched in the line.
    """
    _, marker, payload = line.partition(PROGRESS_PREFIX)
    return json.loads(payload) if marker and payload.startswith("{") else None


def progress_events(log_text: str) -> list[dict]:
    """The progress events in a job's log, in order."""
    return [event for event in map(progress_event, log_text.splitlines()) if event is not None]
