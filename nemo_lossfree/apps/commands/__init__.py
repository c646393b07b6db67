"""Subcommands of the nemo-lossfree CLI, one module each."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Union


def check_output_dir(path: Union[str, Path], flag: str, *, create: bool) -> Path:
    """``path`` resolved, once a file could be written there; else ``ValueError`` naming ``flag``.

    Checked before any work, so a typo costs a second, not a finished
    computation (``simulate``) or a job whose log SLURM cannot open
    (``slurm``). A probe file is the only reliable test: permission bits do
    not bind root, and ``/proc`` refuses new entries to everybody.
    ``create=False`` (``--dry-run``: write nothing) probes the nearest
    existing parent with an unnamed temporary file, which leaves no trace.
    """
    path = Path(path).resolve()
    target = path
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        else:
            while not target.exists():
                target = target.parent
        if not target.is_dir():
            raise NotADirectoryError(f"{target} is not a directory")
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (NotADirectoryError, FileExistsError)):
            reason = "a file is in the way, not a directory"
        raise ValueError(f"{flag}: cannot create or write {path}: {reason}") from None
    return path
