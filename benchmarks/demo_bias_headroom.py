"""How far is the demo's trained bias from the best any per-expert bias can do?

Trains the demo's ``loss_free`` arm (two gloo ranks, the demo's own worker),
then records every router's scores on the validation split and on 32 unseen
training batches, and asks of each layer, offline, with the router fixed:

- ``trained``: MaxVio of the validation counts with the trained bias (the
  demo's MaxVio_global for that layer);
- ``best_on_val``: the lowest MaxVio any per-expert bias reaches on the
  validation scores (a bias fitted to the validation set itself). Well above
  zero means tokens with (nearly) the same scores: a bias moves all of them or
  none, and no bias balances that layer (a floor of the method, not of the
  update rule);
- ``train_fit_on_val``: the bias fitted to the training sample, applied to the
  validation split: what a perfectly converged bias would show (the gap to
  ``best_on_val`` is the difference between the splits);
- ``batch_noise``: mean MaxVio of one training step's counts (4096 tokens)
  under that fitted bias: the per-step noise an update rule must not follow;
- ``hot_expert_space_share``: the share of space bytes among the tokens of
  the layer's most loaded expert (validation, trained bias);
- ``bias_error``: mean |trained - fitted| bias per expert (both centered);
  ``score_spread``: each expert's score standard deviation over the
  validation tokens, averaged; ``median_topk_gap``: the median gap between a
  token's K-th and (K+1)-th score. Small gaps make the load sensitive to
  small bias errors.

Layers after the first see hidden states shaped by the earlier layers'
routing, so their numbers hold the earlier layers' routing fixed.

    python benchmarks/demo_bias_headroom.py --out /tmp/headroom            # the demo's defaults
    python benchmarks/demo_bias_headroom.py --out /tmp/h32 --experts 32 --topk 4
    python benchmarks/demo_bias_headroom.py --out /tmp/h1 --lossfree integral_gain=0.1
    python benchmarks/demo_bias_headroom.py --out /tmp/headroom --analyse-only   # again, no training

Any demo flag (``nemo-lossfree demo --help``) after ``--out`` changes the
run. About 2 minutes of training plus 1 to 5 minutes of fitting on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SCORES_ENV = "NEMO_LOSSFREE_HEADROOM_OUT"
TRAIN_SAMPLE_STEPS = 32  # unseen training batches (steps far past the run)


# ---------------------------------------------------------------- worker side
def _worker_main(argv: list[str]) -> int:
    from nemo_lossfree.testing import cpu

    cpu.enable()
    import numpy as np
    import torch.distributed as dist

    from nemo_lossfree.apps.demo import trainer as trainer_module
    from nemo_lossfree.apps.demo import worker

    from demo_recording import router_scores_over

    evaluate = trainer_module.ArmTrainer.evaluate

    def evaluate_and_record(self):
        result = evaluate(self)
        val = router_scores_over(self, self.val_batches, self.settings.val_micro_batch_size)
        sample = [mb for k in range(TRAIN_SAMPLE_STEPS) for mb in self.train_data.step(10**6 + k)]
        train = router_scores_over(self, sample, self.settings.micro_batch_size)
        arrays = {f"val_{i}": a for i, a in enumerate(val)} | {f"train_{i}": a for i, a in enumerate(train)}
        arrays["bias"] = np.stack([r.expert_bias.float().numpy() for r in self.routers])
        out = Path(os.environ[SCORES_ENV])
        np.savez(out / f"scores_rank{dist.get_rank()}.npz", **arrays)
        return result

    # The demo's own worker, with the evaluation extended (a benchmark may wrap; the package does not).
    trainer_module.ArmTrainer.evaluate = evaluate_and_record
    return worker.main(argv)


# ---------------------------------------------------------------- analysis
def _maxvio(counts) -> float:
    from nemo_lossfree.metrics import max_violation  # the demo's own metric

    return float(max_violation(counts))


def _counts(scores, bias, topk):
    import torch

    chosen = torch.topk(scores + bias, topk, dim=1).indices
    return torch.bincount(chosen.flatten(), minlength=scores.shape[1]).double()


def fit_bias(scores, topk: int, candidates=(), iterations: int = 400):
    """The per-expert bias with the lowest MaxVio found on fixed scores.

    Proportional steps from a zero bias; ``candidates`` (the trained bias)
    are tried too, so the result is never worse than them.
    """
    import torch

    from nemo_lossfree.update import compute_bias_update

    best = (float("inf"), None)
    for candidate in candidates:
        vio = _maxvio(_counts(scores, candidate, topk))
        if vio < best[0]:
            best = (vio, candidate.clone())
    bias = torch.zeros(scores.shape[1])
    for t in range(iterations):
        counts = _counts(scores, bias, topk)
        vio = _maxvio(counts)
        if vio < best[0]:
            best = (vio, bias.clone())
        # The balancer's own proportional step (no centering: it changes no top-K).
        bias = compute_bias_update(counts, bias, rate=3e-2 / (1 + t / 50), rule="proportional")
    return best


def _val_token_ids(settings: dict, world: int):
    """The validation bytes in the order the routers saw them (rank, micro-batch, s-major)."""
    import numpy as np

    from nemo_lossfree.apps.demo.corpus import load_corpus, validation_batches

    corpus = load_corpus(settings["corpus"], max_bytes=settings["corpus_max_bytes"])
    ids = []
    for rank in range(world):
        batches = validation_batches(
            corpus.val_tokens, seq_length=settings["seq_length"],
            micro_batch_size=settings["micro_batch_size"], num_windows=settings["val_windows"],
            dp_rank=rank, dp_size=world,
        )
        ids += [mb.tokens.t().reshape(-1).numpy() for mb in batches]
    return np.concatenate(ids)


def analyse(out: Path, world: int) -> dict:
    import numpy as np
    import torch

    arm = json.loads((out / "loss_free.json").read_text())
    settings = arm["settings"]
    topk = settings["topk"]
    ranks = [np.load(out / f"scores_rank{r}.npz") for r in range(world)]
    tokens_per_rank_step = settings["num_micro_batches"] * settings["micro_batch_size"] * settings["seq_length"]
    ids = _val_token_ids(settings, world)
    layers = []
    for layer in range(len(arm["maxvio_global_per_layer"])):
        val = torch.from_numpy(np.concatenate([r[f"val_{layer}"] for r in ranks]))
        train_parts = [torch.from_numpy(r[f"train_{layer}"]) for r in ranks]
        train = torch.cat(train_parts)
        bias = torch.from_numpy(ranks[0]["bias"][layer])
        best_on_val, _ = fit_bias(val, topk, candidates=(bias,))
        _, fitted = fit_bias(train, topk, candidates=(bias,))
        noise = []
        for step in range(TRAIN_SAMPLE_STEPS):
            rows = slice(step * tokens_per_rank_step, (step + 1) * tokens_per_rank_step)
            noise.append(_maxvio(_counts(torch.cat([p[rows] for p in train_parts]), fitted, topk)))
        ranked = torch.sort(val, dim=1, descending=True).values
        chosen = torch.topk(val + bias, topk, dim=1).indices
        hot = int(torch.bincount(chosen.flatten(), minlength=val.shape[1]).argmax())
        hot_tokens = (chosen == hot).any(dim=1).numpy()
        layers.append({
            "layer": layer + 1,
            "trained": _maxvio(_counts(val, bias, topk)),
            "best_on_val": best_on_val,
            "train_fit_on_val": _maxvio(_counts(val, fitted, topk)),
            "batch_noise": float(np.mean(noise)),
            "hot_expert_space_share": float((ids[hot_tokens] == 32).mean()),
            # How finely the bias must be set: trained vs fitted bias (both centered),
            # each expert's score spread over tokens, a token's K-th to (K+1)-th score gap.
            "bias_error": float(((bias - bias.mean()) - (fitted - fitted.mean())).abs().mean()),
            "score_spread": float(val.std(dim=0).mean()),
            "median_topk_gap": float((ranked[:, topk - 1] - ranked[:, topk]).median()),
        })
    mean = {key: float(np.mean([layer[key] for layer in layers])) for key in layers[0] if key != "layer"}
    return {
        "settings": settings,
        "val_loss": arm["val_loss"],
        "maxvio_global": arm["maxvio_global"],
        "space_share_of_val_tokens": float((ids == 32).mean()),
        "layers": layers,
        "mean_over_layers": mean,
    }


def print_table(report: dict) -> None:
    keys = ("trained", "best_on_val", "train_fit_on_val", "batch_noise", "hot_expert_space_share",
            "bias_error", "score_spread", "median_topk_gap")
    print("| layer | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for row in report["layers"] + [dict(report["mean_over_layers"], layer="mean")]:
        print(f"| {row['layer']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    print(f"space bytes: {report['space_share_of_val_tokens']:.3f} of the validation tokens; "
          f"val loss {report['val_loss']:.4f}, MaxVio_global {report['maxvio_global']:.3f}")


def train_and_record(out: Path, world: int, port: int, demo_flags: list[str]) -> int:
    """The demo's worker on ``world`` local ranks, scores recorded into ``out``."""
    from demo_recording import run_recording_workers

    return run_recording_workers(__file__, SCORES_ENV, out, world, port, demo_flags)


def main() -> int:
    if os.environ.get(SCORES_ENV) and "RANK" in os.environ:
        return _worker_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--analyse-only", action="store_true",
                        help="skip training: analyse the scores already recorded in --out")
    args, demo_flags = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = 2  # the demo's expert parallelism
    if not args.analyse_only and train_and_record(out, world, args.port, demo_flags):
        return 1
    report = analyse(out, world)
    (out / "headroom.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
