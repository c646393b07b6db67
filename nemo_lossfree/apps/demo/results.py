"""What a demo run leaves behind: per-arm JSON, TensorBoard events, results.json.

Per arm (written by rank 0 of the worker): ``<out>/<arm>.json`` with the final
per-layer biases, the evaluation, and the per-step history, and TensorBoard
events in ``<out>/tensorboard/<arm>/`` (``loss``, ``lr`` and the
``lossfree/...`` metrics of docs/core.md, written by
``integrations/logging.py``: every step's scalars, the load matrix and heatmap
image every ``heatmap_every(steps)`` steps). ``nemo-lossfree demo`` then draws
``<out>/report_<arm>.png`` from those events (``nemo-lossfree report``'s figure).

``results.json`` gathers the arms:
``{"arms": {arm: {"val_loss", "val_ppl", "maxvio_global", "maxvio_batch_last",
"steps_to_maxvio_batch_below_0.2", "wall_s"}}, "config": {...}}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from nemo_lossfree.apps.demo.arms import ARMS
from nemo_lossfree.apps.demo.pareto import describe, matched_balance
from nemo_lossfree.apps.demo.protocol import PROGRESS_PREFIX
from nemo_lossfree.apps.demo.trainer import MAXVIO_TARGET, ArmTrainer, StepRecord, steps_to_below

RESULT_KEYS = (
    "val_loss",
    "val_ppl",
    "maxvio_global",
    "maxvio_batch_last",
    f"steps_to_maxvio_batch_below_{MAXVIO_TARGET}",
    "wall_s",
)


def write_json(path: Path, data: Any) -> None:
    """Write atomically: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    """State dicts as JSON: tensors (the balancer's integrals) become nested lists."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def heatmap_every(steps: int) -> int:
    """Steps between the demo's load-matrix writes: about 40 snapshots per arm."""
    return max(1, steps // 40)


class ArmReporter:
    """Progress lines, TensorBoard scalars and the arm's JSON (rank 0 only)."""

    def __init__(self, out: Path, trainer: ArmTrainer, *, write: bool, progress: bool) -> None:
        from nemo_lossfree.integrations.logging import MetricsWriter

        self.out = out
        self.trainer = trainer
        self.write = write
        self.progress = progress
        self.writer = None
        self.metrics_writer = MetricsWriter(heatmap_every(trainer.settings.steps))

    def _emit(self, event: str, **fields: Any) -> None:
        if self.progress:
            payload = {"event": event, "arm": self.trainer.arm.name, **fields}
            print(PROGRESS_PREFIX + json.dumps(payload), flush=True)

    def started(self, resumed_from: Optional[str]) -> None:
        if self.write:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past a resumed step (from a run that went further).
            self.writer = SummaryWriter(
                str(self.out / "tensorboard" / self.trainer.arm.name),
                purge_step=self.trainer.step + 1 if resumed_from else None,
            )
        self._emit("start", step=self.trainer.step, steps=self.trainer.settings.steps,
                   resumed_from=resumed_from)

    def step(self, record: StepRecord) -> None:
        if self.writer is not None:
            self.metrics_writer.write(record.step, record.metrics, self.trainer.last_loads, tensorboard=self.writer)
        self._emit("step", step=record.step, steps=self.trainer.settings.steps,
                   loss=record.loss, maxvio_batch=record.maxvio_batch)

    def _arm_json(self, finished: bool, evaluation: Optional[dict], wall_s: Optional[float]) -> dict:
        history = self.trainer.history
        data: dict[str, Any] = {
            "arm": self.trainer.arm.name,
            "description": self.trainer.arm.description,
            "finished": finished,
            "steps_done": self.trainer.step,
            "final_bias": self.trainer.final_biases(),
            "balancer_state": (
                _jsonable(self.trainer.balancer.state_dict()) if self.trainer.balancer is not None else None
            ),
            "history": {
                "loss": [r.loss for r in history],
                "maxvio_batch": [r.maxvio_batch for r in history],
            },
            "last_step_metrics": history[-1].metrics if history else {},
            "settings": self.trainer.settings.to_dict(),
        }
        if evaluation is not None:
            data.update(evaluation)
            data["maxvio_batch_last"] = history[-1].maxvio_batch if history else None
            data[f"steps_to_maxvio_batch_below_{MAXVIO_TARGET}"] = steps_to_below(history)
            data["wall_s"] = wall_s
        return data

    def stopped(self) -> None:
        if self.write:
            write_json(self.out / f"{self.trainer.arm.name}.json", self._arm_json(False, None, None))
            self.writer.close()
        self._emit("stopped", step=self.trainer.step)

    def finished(self, evaluation: dict, wall_s: float) -> None:
        if self.write:
            write_json(self.out / f"{self.trainer.arm.name}.json",
                       self._arm_json(True, evaluation, wall_s))
            self.writer.close()
        self._emit("finished", step=self.trainer.step, wall_s=wall_s,
                   **{k: evaluation[k] for k in ("val_loss", "maxvio_global")})


def collect(out: Path, arms: list[str], config: dict) -> dict:
    """Build results.json from the arms' JSON files (every arm must be finished)."""
    results: dict[str, Any] = {"arms": {}, "config": config}
    for arm in arms:
        data = json.loads((out / f"{arm}.json").read_text())
        if not data.get("finished"):
            raise RuntimeError(f"{arm}: not finished (stopped at step {data.get('steps_done')})")
        results["arms"][arm] = {key: data[key] for key in RESULT_KEYS}
        results["arms"][arm]["description"] = ARMS[arm].description
    results["pareto"] = matched_balance(results["arms"])
    return results


# Averaged over seeds; "steps to" is left per seed (it can be "never").
_MEAN_KEYS = ("val_loss", "val_ppl", "maxvio_global", "maxvio_batch_last", "wall_s")


def combine_seeds(per_seed: dict[int, dict]) -> dict:
    """Several seeds' results as one: means, population standard deviations, per-seed values.

    The Pareto comparison is made on the means, and per seed.
    """
    import statistics

    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    arms: dict[str, Any] = {}
    for arm in first["arms"]:
        runs = [per_seed[s]["arms"][arm] for s in seeds]
        row: dict[str, Any] = {k: statistics.fmean(r[k] for r in runs) for k in _MEAN_KEYS}
        row.update({f"{k}_std": statistics.pstdev(r[k] for r in runs) for k in ("val_loss", "maxvio_global")})
        below = f"steps_to_maxvio_batch_below_{MAXVIO_TARGET}"
        row[below] = [r[below] for r in runs]
        row["per_seed"] = {str(s): per_seed[s]["arms"][arm] for s in seeds}
        row["description"] = first["arms"][arm]["description"]
        arms[arm] = row
    config = dict(first["config"], seeds=seeds)
    config.pop("seed", None)
    pareto = matched_balance(arms)
    pareto["per_seed"] = {str(s): per_seed[s]["pareto"].get("loss_free") for s in seeds}
    return {"arms": arms, "config": config, "pareto": pareto}


def _steps_cell(value) -> str:
    values = value if isinstance(value, list) else [value]
    return "/".join("never" if v is None else str(v) for v in values)


def format_table(results: dict) -> str:
    """The arms as a fixed-width text table (the console and `nemo-lossfree report`)."""
    headers = ("arm", "val_loss", "val_ppl", "MaxVio_global", "MaxVio_batch(last)",
               f"steps to MaxVio_batch<{MAXVIO_TARGET}", "wall_s")
    rows = []
    for arm, r in results["arms"].items():
        below = r.get(f"steps_to_maxvio_batch_below_{MAXVIO_TARGET}")
        rows.append((
            arm, _with_std(r, "val_loss", 4), f"{r['val_ppl']:.3f}", _with_std(r, "maxvio_global", 3),
            f"{r['maxvio_batch_last']:.3f}", _steps_cell(below), f"{r['wall_s']:.0f}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def format_markdown(results: dict) -> str:
    """The same table in Markdown (docs)."""
    lines = ["| arm | val loss | val ppl | MaxVio_global | MaxVio_batch (last) | "
             f"steps to MaxVio_batch < {MAXVIO_TARGET} | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for arm, r in results["arms"].items():
        below = r.get(f"steps_to_maxvio_batch_below_{MAXVIO_TARGET}")
        lines.append(f"| {arm} | {_with_std(r, 'val_loss', 4)} | {r['val_ppl']:.3f} | "
                     f"{_with_std(r, 'maxvio_global', 3)} | {r['maxvio_batch_last']:.3f} | "
                     f"{_steps_cell(below)} | {r['wall_s']:.0f} |")
    if "pareto" in results:
        lines += ["", describe(results["pareto"])]
    return "\n".join(lines)


def _with_std(row: dict, key: str, digits: int) -> str:
    """``mean`` or ``mean +- std`` (several seeds)."""
    text = f"{row[key]:.{digits}f}"
    if f"{key}_std" in row:
        text += f" ± {row[key + '_std']:.{digits}f}"
    return text
