"""The README's SLURM commands, as a user pastes them.

    python examples/slurm/readme_block.py          # print the block (the SLURM CI lane runs it with bash)
    python examples/slurm/readme_block.py --check  # exit 1 naming each line bash would misread

The block is the first ```bash fence under the README's ``## SLURM`` heading.
``--check`` refuses what pasting would break on: a ``<placeholder>`` outside a
comment (bash reads ``<bridge recipe>`` as a redirect from a file) and a
SLURM client command (``nemo-lossfree slurm`` without ``--dry-run``) before
``SLURM_CONF`` is exported for the local cluster.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"^## SLURM\n.*?^```bash\n(.*?)^```", re.S | re.M)
_PLACEHOLDER = re.compile(r"<[^<>]*>")


def slurm_block(text: str) -> str:
    match = _FENCE.search(text)
    if match is None:
        raise ValueError("README.md: no ```bash block under '## SLURM'")
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    # shlex knows bash's quoting: the '#' of 'nvcr.io#nvidia/nemo:TAG' is not a comment.
    words = (shlex.split(line, comments=True) for line in joined.splitlines())
    return [" ".join(w) for w in words if w]


def problems(block: str) -> list[str]:
    found = []
    conf_exported = False
    for command in commands(block):
        for placeholder in _PLACEHOLDER.findall(command):
            found.append(f"{placeholder}: bash reads it as a redirect, in: {command}")
        if command.startswith("export SLURM_CONF=") or (
            command.startswith("eval") and "local_cluster.sh env" in command
        ):
            conf_exported = True
        if "nemo-lossfree slurm" in command and "--dry-run" not in command and not conf_exported:
            found.append(f"SLURM_CONF is not exported before: {command}")
    return found


def main(argv: list[str]) -> int:
    block = slurm_block(README.read_text())
    if argv[1:] == ["--check"]:
        found = problems(block)
        for line in found:
            print(f"README.md SLURM block: {line}", file=sys.stderr)
        return 1 if found else 0
    sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
