"""Read a run's ``lossfree/...`` metrics back from its TensorBoard event files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nemo_lossfree import metrics as lf_metrics

EVENTS_GLOB = "events.out.tfevents.*"


@dataclass
class RunLog:
    """One event directory: scalars by tag, and the load matrices by step."""

    name: str
    directory: Path
    #: tag -> (steps, values), steps increasing.
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    #: (step, ``metrics.load_matrix`` array ``[L, 1 + E]``), steps increasing.
    loads: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def series(self, key: str, layer=None) -> tuple[list[int], list[float]]:
        return self.scalars.get(lf_metrics.tag(key, layer), ([], []))

    def layers(self, key: str) -> list[int]:
        """The layer numbers that have a per-layer series of ``key``, sorted."""
        found = []
        for name in self.scalars:
            parsed = lf_metrics.parse_tag(name)
            if parsed is not None and parsed[0] == key and parsed[1] is not None:
                found.append(parsed[1])
        return sorted(found)


def find_runs(root: Path) -> list[Path]:
    """Every directory at or under ``root`` that holds TensorBoard event files, sorted."""
    root = Path(root)
    return sorted({p.parent for p in root.rglob(EVENTS_GLOB)})


def run_names(root: Path, directories: list[Path]) -> list[str]:
    """Short names: each directory's own name, or its path under ``root`` where names repeat."""
    names = [d.name if d != root else root.resolve().name for d in directories]
    if len(set(names)) == len(names):
        return names
    return ["_".join(d.relative_to(root).parts) or root.resolve().name for d in directories]


def read_run(directory: Path, name: str) -> RunLog:
    """All ``lossfree/`` scalars and every load matrix of the event files in ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    # 0: keep every event (the defaults sample scalars and keep 10 tensors).
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0, "images": 1})
    events.Reload()
    run = RunLog(name=name, directory=Path(directory))
    tags = events.Tags()
    for tag in tags.get("scalars", []):
        if lf_metrics.parse_tag(tag) is None:
            continue
        points = sorted((e.step, e.value) for e in events.Scalars(tag))
        run.scalars[tag] = ([s for s, _ in points], [v for _, v in points])
    loads_tag = lf_metrics.tag("loads")
    if loads_tag in tags.get("tensors", []):
        run.loads = sorted(((e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(loads_tag)),
                           key=lambda item: item[0])
    return run
