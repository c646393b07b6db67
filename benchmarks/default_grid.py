"""The grid that chooses (and checks) the default LossFreeConfig: demo settings x seeds x arms.

    python benchmarks/default_grid.py --out runs/grid                 # every job, in priority order
    python benchmarks/default_grid.py --out runs/grid --summary-only  # the table of what is done

Each job is one ``nemo-lossfree demo --arms ARM`` invocation (every arm of the
demo is deterministic and independent of the others, so one arm per
invocation gives the numbers a multi-arm run gives); the default's jobs run
through ``benchmarks/replay_rules.py``, the same demo run with its router
scores recorded, so every rule can be replayed on every grid trajectory
(``replay.json`` beside the arm's results). Jobs whose ``<arm>.json`` is
finished are skipped, so the script can be stopped and resumed; jobs run
one at a time (each is two processes on the two cores of the development
machine). The settings span 8 to 64 experts and top-1 to
top-8, with and without a dense first layer; none of them is the setting the
default is tuned on: the default is a fixed ``LossFreeConfig()``, the same for
all.

Priorities (the order jobs run in): the default at every seed on every
setting (the seed-to-seed spread is what a single comparison lacks); at the
first seed, the 1e-2 auxiliary loss and Megatron-Core's quantile balancing,
then the auxiliary-loss frontier (1e-3 and 1e-1) and Megatron-Core's expert
bias; then the aux loss and the built-ins at the other seeds, and other
candidate rules for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "e16k2": ["--experts", "16", "--topk", "2"],
    "e8k1": ["--experts", "8", "--topk", "1"],
    "e8k2d": ["--experts", "8", "--topk", "2", "--dense-layers", "1"],
    "e16k4d": ["--experts", "16", "--topk", "4", "--dense-layers", "1"],
    "e32k4": ["--experts", "32", "--topk", "4"],
    "e32k4d": ["--experts", "32", "--topk", "4", "--dense-layers", "1"],
    "e64k6d": ["--experts", "64", "--topk", "6", "--dense-layers", "1"],
    "e64k8": ["--experts", "64", "--topk", "8"],
}
SEEDS = (1234, 4321, 7)
# label -> (demo arm, --lossfree overrides). "default" is LossFreeConfig() as shipped.
CANDIDATES = {
    "default": ("loss_free", []),
    "aux_loss": ("aux_loss", []),
    "aux_loss_1e-3": ("aux_loss_1e-3", []),
    "aux_loss_1e-1": ("aux_loss_1e-1", []),
    "megatron_qb": ("megatron_qb", []),
    "megatron_bias": ("megatron_bias", []),
    "proportional": ("loss_free", ["update_rule=proportional", "update_rate=0.05", "schedule=inverse_time",
                                   "decay_steps=20", "min_update_rate=0.01"]),
    "quantile_1.0": ("loss_free", ["update_rule=quantile", "update_rate=1.0", "schedule=constant"]),
    "quantile_0.25": ("loss_free", ["update_rule=quantile", "update_rate=0.25", "schedule=constant"]),
}


def jobs() -> list[tuple[str, int, str]]:
    first, rest = SEEDS[0], SEEDS[1:]
    order = [(s, seed, "default") for seed in SEEDS for s in SETTINGS]
    order += [(s, first, c) for c in ("aux_loss", "megatron_qb") for s in SETTINGS]
    order += [(s, first, c) for c in ("aux_loss_1e-3", "aux_loss_1e-1", "megatron_bias") for s in SETTINGS]
    order += [(s, seed, c) for seed in rest for s in SETTINGS for c in ("aux_loss", "megatron_qb")]
    order += [(s, seed, "megatron_bias") for seed in rest for s in SETTINGS]
    order += [(s, first, c) for c in ("proportional", "quantile_1.0", "quantile_0.25") for s in SETTINGS]
    return order


def job_dir(out: Path, setting: str, seed: int, label: str) -> Path:
    return out / setting / f"seed_{seed}" / label


def run_job(out: Path, setting: str, seed: int, label: str, record: bool = True) -> None:
    arm, overrides = CANDIDATES[label]
    directory = job_dir(out, setting, seed, label)
    flags = ["--seed", str(seed), *SETTINGS[setting]]
    for item in overrides:
        flags += ["--lossfree", item]
    if label == "default" and record:  # recorded, so that other rules can be replayed on it
        command = [sys.executable, str(Path(__file__).with_name("replay_rules.py")), "--out", str(directory),
                   *flags]
    else:
        command = [sys.executable, "-m", "nemo_lossfree.apps.cli", "demo", "--quiet", "--arms", arm,
                   "--out", str(directory), *flags]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def load(out: Path, setting: str, seed: int, label: str):
    """The finished arm's results (``<arm>.json``), or None."""
    path = job_dir(out, setting, seed, label) / f"{CANDIDATES[label][0]}.json"
    try:
        arm = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return arm if arm.get("finished") else None


def summary(out: Path) -> dict:
    """Per setting and candidate: seeds done, mean val loss and MaxVio_global."""
    table: dict = {}
    for setting in SETTINGS:
        for label in CANDIDATES:
            runs = {seed: load(out, setting, seed, label) for seed in SEEDS}
            runs = {seed: r for seed, r in runs.items() if r is not None}
            if runs:
                table.setdefault(setting, {})[label] = {
                    "seeds": sorted(runs),
                    "val_loss": statistics.fmean(r["val_loss"] for r in runs.values()),
                    "maxvio_global": statistics.fmean(r["maxvio_global"] for r in runs.values()),
                    "per_seed": {str(s): [r["val_loss"], r["maxvio_global"]] for s, r in runs.items()},
                }
    return table


AUX_LABELS = ("aux_loss_1e-3", "aux_loss", "aux_loss_1e-1")


def frontier_table(table: dict) -> list[str]:
    """The default against the auxiliary-loss frontier at the first seed (pareto.matched_balance)."""
    from nemo_lossfree.apps.demo.pareto import describe, matched_balance

    seed = str(SEEDS[0])
    lines = ["", f"| setting (seed {seed}) | aux 1e-3 | aux 1e-2 | aux 1e-1 | default | at matched balance |",
             "|---|---:|---:|---:|---:|---|"]
    for setting, row in table.items():
        points = {CANDIDATES[label][0]: row[label]["per_seed"].get(seed) for label in AUX_LABELS + ("default",)
                  if label in row}
        arms = {arm: {"val_loss": p[0], "maxvio_global": p[1]} for arm, p in points.items() if p is not None}
        if "loss_free" not in arms or len(arms) < 3:  # the default and two aux-loss points at least
            continue

        cells = [arms.get(CANDIDATES[label][0]) for label in AUX_LABELS + ("default",)]
        verdict = describe(matched_balance(arms)).removeprefix("loss at matched balance: ")
        lines.append(f"| {setting} | " + " | ".join(
            "" if p is None else f"{p['val_loss']:.4f} / {p['maxvio_global']:.3f}" for p in cells)
            + f" | {verdict} |")
    return lines


def markdown(table: dict) -> str:
    """Per setting: the default against the 1e-2 aux loss and Megatron-Core's built-ins, targets.

    Cells: means over the seeds done (the count in brackets). The ratio, the
    loss difference and the targets compare the default with each other arm on
    the seeds both have, so a seed that only one of them ran does not tilt it.
    Targets (issue of this
    grid): MaxVio_global <= 0.15, <= 1/3 of the aux loss's, validation loss no
    higher than the aux loss's; and better MaxVio_global than both built-ins
    at no more than +0.5% validation loss.
    """
    head = ("| setting | default: val loss / MaxVio_global | aux 1e-2: val loss / MaxVio_global | "
            "MaxVio ratio | loss vs aux | megatron_qb | megatron_bias | targets missed |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|"]

    def cell(r):
        return "" if r is None else f"{r['val_loss']:.4f} / {r['maxvio_global']:.3f} ({len(r['seeds'])})"

    def paired(a, b):
        """(a's mean val loss, MaxVio), (b's ...) over the seeds both ran."""
        common = sorted(set(a["per_seed"]) & set(b["per_seed"]))
        if not common:
            return None
        return tuple({"val_loss": statistics.fmean(r["per_seed"][s][0] for s in common),
                      "maxvio_global": statistics.fmean(r["per_seed"][s][1] for s in common)} for r in (a, b))

    for setting, row in table.items():
        ours, aux = row.get("default"), row.get("aux_loss")
        qb, bias = row.get("megatron_qb"), row.get("megatron_bias")
        ratio = loss_pct = ""
        missed = []
        if ours is not None:
            if ours["maxvio_global"] > 0.15:
                missed.append("<= 0.15")
        if ours is not None and aux is not None and (pair := paired(ours, aux)):
            mine, theirs = pair
            r = mine["maxvio_global"] / theirs["maxvio_global"]
            d = 100 * (mine["val_loss"] / theirs["val_loss"] - 1)
            ratio, loss_pct = f"{r:.2f}", f"{d:+.1f}%"
            if r > 1 / 3:
                missed.append("<= 1/3 of aux")
            if d > 0:
                missed.append("loss <= aux")
        for name, other in (("megatron_qb", qb), ("megatron_bias", bias)):
            if ours is not None and other is not None and (pair := paired(ours, other)):
                mine, theirs = pair
                worse_loss = 100 * (mine["val_loss"] / theirs["val_loss"] - 1) > 0.5
                if mine["maxvio_global"] >= theirs["maxvio_global"] or worse_loss:
                    missed.append(f"beats {name}")
        lines.append(f"| {setting} | {cell(ours)} | {cell(aux)} | {ratio} | {loss_pct} | {cell(qb)} | "
                     f"{cell(bias)} | {', '.join(missed) or 'none'} |")
    seeded = {setting: row["default"] for setting, row in table.items()
              if "default" in row and len(row["default"]["seeds"]) > 1}
    if seeded:
        lines += ["", "| setting | " + " | ".join(f"default, seed {s}" for s in SEEDS)
                  + " | MaxVio_global range |", "|---|" + "---:|" * (len(SEEDS) + 1)]
        for setting, r in seeded.items():
            runs = r["per_seed"]
            cells = [f"{runs[str(s)][0]:.4f} / {runs[str(s)][1]:.3f}" if str(s) in runs else "" for s in SEEDS]
            vios = [v for _, v in runs.values()]
            lines.append(f"| {setting} | " + " | ".join(cells) + f" | {min(vios):.3f}-{max(vios):.3f} |")
    lines += frontier_table(table)
    others = [c for c in CANDIDATES if c not in ("default", "megatron_qb", "megatron_bias") + AUX_LABELS
              and any(c in row for row in table.values())]
    if others:
        lines += ["", "| setting | " + " | ".join(f"{c}: val loss / MaxVio_global" for c in others) + " |",
                  "|---|" + "---:|" * len(others)]
        for setting, row in table.items():
            lines.append(f"| {setting} | " + " | ".join(cell(row.get(c)) for c in others) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/grid")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated candidate labels to run")
    parser.add_argument("--no-record", action="store_true",
                        help="run the default as a plain demo arm (no recorded scores, no replays)")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.summary_only:
        wanted = set(args.only.split(",")) if args.only else set(CANDIDATES)
        for setting, seed, label in jobs():
            if label in wanted and load(out, setting, seed, label) is None:
                run_job(out, setting, seed, label, record=not args.no_record)
    table = summary(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
