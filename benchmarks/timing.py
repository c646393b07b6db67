"""Timing helpers shared by the benchmark scripts.

The machines these run on are shared and noisy, so every comparison is made
inside one run: the variants are timed in interleaved repetitions (A B C, B C
A, C A B, ...), each repetition gives one paired ratio, and the report uses
medians (of times and of the paired ratios), which one slow repetition does
not move.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    runs: Mapping[str, Callable[[], None]],
    *,
    repetitions: int,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in rotating order.

    Each repetition times every variant once; the starting variant rotates so
    that none always runs first (cold caches) or last (after the others have
    heated the machine).
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repetitions):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repetitions of numerator[i] / denominator[i] (same repetition)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0],
    }
    try:
        from importlib.metadata import version

        info["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001 - informational only
        info["megatron_core"] = "unknown"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(argv: Sequence[str] | None) -> str:
    """The command that produced a result, as it was typed (for the JSON record)."""
    import sys

    return " ".join([os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:]))


def publish(benchmark: str, argv: Sequence[str] | None, *, started: float, machine: Mapping[str, object],
            rows: list, table: str, json_path: str | None, **fields: object) -> None:
    """Print the markdown table and, if asked, write the whole result as JSON.

    Every result file has the same frame: the benchmark's name, the command
    that reproduces it, the machine, the wall time since ``started``
    (``time.time()``) and the rows; ``fields`` are the benchmark's own
    settings (shape, device, ...), recorded between the command and the machine.
    """
    import json

    result = {"benchmark": benchmark, "command": command_line(argv), **fields, "machine": dict(machine),
              "wall_s": time.time() - started, "rows": rows}
    print()
    print(table)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)
