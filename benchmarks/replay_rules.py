"""Replay the demo's recorded router scores under other bias update rules.

One real training run of the demo's ``loss_free`` arm (two gloo ranks, the
demo's own worker) records, for every training step and MoE layer, each
rank's unbiased router scores ``[T, E]`` and the bias the router selected
with, and after training the final router's scores on the whole validation
split. Offline, any update rule then replays the bias over the same score
trajectory: top-K on ``scores + bias`` per step, counts and margin histograms
summed over the ranks as the balancer's one all-reduce sums them, the rule's
update, and at the end MaxVio of the validation split under the replayed
final bias (the run's MaxVio_global, per layer then averaged).

What it leaves out: the router does not learn from the replayed routing (its
trajectory is the recorded one). The rules differ in how they trade the
count noise of a 4096-token step against the router's drift, which the
recorded trajectory holds; the feedback of routing on the router is a second
order effect, and the grid (``default_grid.py``) measures the real thing.
Replaying the rule that ran reproduces the recorded biases: the script checks
it (``replay_check``) before it compares anything.

    python benchmarks/replay_rules.py --out runs/replay/e16k2                    # record + replay
    python benchmarks/replay_rules.py --out runs/replay/e64k6d --experts 64 --topk 6 --dense-layers 1
    python benchmarks/replay_rules.py --out runs/replay/e16k2 --replay-only       # replay again

Any demo flag after ``--out`` changes the recorded run. Recording costs one
demo arm (1.5-2.5 minutes on 2 cores) and ``steps x 4096 x E x layers``
float32 scores on disk (840 MB at 64 experts, 4 layers, 200 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SCORES_ENV = "NEMO_LOSSFREE_REPLAY_OUT"


# ---------------------------------------------------------------- worker side
def _worker_main(argv: list[str]) -> int:
    from nemo_lossfree.testing import cpu

    cpu.enable()
    import numpy as np
    import torch
    import torch.distributed as dist

    from nemo_lossfree.apps.demo import trainer as trainer_module
    from nemo_lossfree.apps.demo import worker
    from nemo_lossfree.router import LossFreeRouter

    from demo_recording import router_scores_over

    out = Path(os.environ[SCORES_ENV])
    original_init = trainer_module.ArmTrainer.__init__
    original_evaluate = trainer_module.ArmTrainer.evaluate
    recorded: dict[str, list] = {}

    def hook_for(index: int):
        def hook(router, args, output):
            # Only the trained forward (the demo has no recompute): eval and no_grad are skipped.
            if not (router.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                hidden = args[0].reshape(-1, args[0].shape[-1])
                scores = router._scores(router.gating(hidden).float().view(-1, router.config.num_moe_experts))
                recorded["train"][index].append(scores.numpy().astype(np.float32))
                recorded["bias"][index].append(router.expert_bias.float().numpy().copy())
        return hook

    def init_and_hook(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._replay_routers = [m for m in self.model.modules() if isinstance(m, LossFreeRouter)]
        recorded["train"] = [[] for _ in self._replay_routers]
        recorded["bias"] = [[] for _ in self._replay_routers]
        for i, router in enumerate(self._replay_routers):
            router.register_forward_hook(hook_for(i))

    def evaluate_and_record(self):
        result = original_evaluate(self)
        val = router_scores_over(self, self.val_batches, self.settings.val_micro_batch_size)
        rank = dist.get_rank()
        arrays = {}
        micro = self.settings.num_micro_batches  # the hooks saw one forward per micro-batch
        for i in range(len(self._replay_routers)):
            train = np.stack(recorded["train"][i])
            arrays[f"train_{i}"] = train.reshape(-1, micro, *train.shape[1:])  # [steps, micro-batches, T, E]
            arrays[f"bias_{i}"] = np.stack(recorded["bias"][i])[::micro]  # [steps, E]: the bias each step used
            arrays[f"val_{i}"] = val[i]
            arrays[f"final_bias_{i}"] = self._replay_routers[i].expert_bias.float().numpy()
        np.savez(out / f"scores_rank{rank}.npz", **arrays)
        return result

    # The demo's own worker with recording added (a benchmark may wrap; the package does not).
    trainer_module.ArmTrainer.__init__ = init_and_hook
    trainer_module.ArmTrainer.evaluate = evaluate_and_record
    return worker.main(argv)


def train_and_record(out: Path, world: int, port: int, demo_flags: list[str]) -> int:
    """The demo's worker on ``world`` local ranks, scores recorded into ``out``."""
    from demo_recording import run_recording_workers

    return run_recording_workers(__file__, SCORES_ENV, out, world, port, demo_flags)


# ---------------------------------------------------------------- replay
class Trajectory:
    """The recorded run: per layer, ``train[rank]`` ``[steps, micro-batches, T, E]``, ``val`` ``[N, E]``."""

    def __init__(self, out: Path, world: int) -> None:
        import numpy as np
        import torch

        ranks = [np.load(out / f"scores_rank{r}.npz") for r in range(world)]
        arm = json.loads((out / "loss_free.json").read_text())
        self.settings = arm["settings"]
        self.arm = arm
        self.topk = self.settings["topk"]
        self.layers = len([k for k in ranks[0].files if k.startswith("val_")])
        self.train = [[torch.from_numpy(r[f"train_{i}"]) for r in ranks] for i in range(self.layers)]
        self.bias = [torch.from_numpy(ranks[0][f"bias_{i}"]) for i in range(self.layers)]
        self.final_bias = [torch.from_numpy(ranks[0][f"final_bias_{i}"]) for i in range(self.layers)]
        self.val = [torch.cat([torch.from_numpy(r[f"val_{i}"]) for r in ranks]) for i in range(self.layers)]
        self.steps = self.train[0][0].shape[0]
        self.experts = self.val[0].shape[1]


def _step_inputs(scores_per_rank, bias, topk, margins: bool):
    """Counts ``[E]`` and (for the quantile rule) histogram ``[E, 2, B]`` of one global batch."""
    import torch

    from nemo_lossfree.update import margin_histogram, selection_margins

    counts = torch.zeros(bias.shape[0], dtype=torch.float64)
    hist = None
    for rank_scores in scores_per_rank:  # each rank's float32 sums, added in float64 (the all-reduce)
        if rank_scores.dim() == 2:  # recorded before micro-batches were kept apart: one per step
            rank_scores = rank_scores[None]
        rank_counts, rank_hist = 0, 0
        for scores in rank_scores:  # the rank's micro-batches, accumulated in float32 as the router does
            biased = scores + bias
            top = torch.topk(biased, topk, dim=1, sorted=True).indices
            selected = torch.zeros_like(biased, dtype=torch.bool).scatter_(1, top, True)
            rank_counts = rank_counts + selected.sum(0, dtype=torch.float32)
            if margins:
                rank_hist = rank_hist + margin_histogram(selection_margins(biased, selected, topk))
        counts += rank_counts.double()
        if margins:
            hist = rank_hist.double() if hist is None else hist + rank_hist.double()
    return counts, hist


def replay(traj: Trajectory, rule, *, check_bias: bool = False) -> dict:
    """Run ``rule(layer, step, counts_E, hist_E2B, bias_E) -> new bias`` over the trajectory."""
    import torch

    from nemo_lossfree.metrics import max_violation

    per_layer_global, per_layer_batch, worst_diff = [], [], 0.0
    gains = [[] for _ in range(traj.layers)]  # the adaptive schedule's gain after each step
    for layer in range(traj.layers):
        bias = torch.zeros(traj.experts, dtype=torch.float32)
        state: dict = {}
        batch_vio = []
        for step in range(traj.steps):
            if check_bias:
                worst_diff = max(worst_diff, float((bias - traj.bias[layer][step]).abs().max()))
            scores = [r[step] for r in traj.train[layer]]
            counts, hist = _step_inputs(scores, bias, traj.topk, margins=True)
            batch_vio.append(float(max_violation(counts)))
            bias = rule(state, step, counts, hist, bias)
            if "gain" in state.get("update", {}):
                gains[layer].append(float(state["update"]["gain"].mean()))
        if check_bias:
            worst_diff = max(worst_diff, float((bias - traj.final_bias[layer]).abs().max()))
        val = traj.val[layer]
        chosen = torch.topk(val + bias, traj.topk, dim=1).indices
        val_counts = torch.bincount(chosen.flatten(), minlength=traj.experts).double()
        per_layer_global.append(float(max_violation(val_counts)))
        per_layer_batch.append(sum(batch_vio) / len(batch_vio))
    result = {
        "maxvio_global": sum(per_layer_global) / traj.layers,
        "maxvio_global_per_layer": per_layer_global,
        "maxvio_batch_mean": sum(per_layer_batch) / traj.layers,
    }
    if gains[0]:
        # Mean over layers at a few steps: where the gain settles.
        marks = sorted({min(traj.steps, m) for m in (1, traj.steps // 4, traj.steps // 2, traj.steps)})
        result["gain_at_step"] = {m: sum(g[m - 1] for g in gains) / traj.layers for m in marks}
    if check_bias:
        result["max_abs_bias_diff"] = worst_diff
    return result


def library_rule(**fields):
    """A ``LossFreeConfig`` as the balancer runs it (``update.apply_update``), one layer at a time."""
    from nemo_lossfree.config import LossFreeConfig
    from nemo_lossfree.update import apply_update, update_state

    config = LossFreeConfig.from_dict(fields)

    def rule(state, step, counts, hist, bias):
        if "update" not in state:
            state["update"] = update_state(config, 1, bias.numel())
        new, state["update"], _ = apply_update(config, step, counts[None], bias[None], state["update"],
                                               None if hist is None else hist[None])
        return new[0]

    rule.__name__ = ",".join(f"{k}={v}" for k, v in fields.items()) or "default"
    return rule


def hindsight_bias(traj: Trajectory, last_steps: int) -> dict:
    """MaxVio_global of the bias that balances the last ``last_steps`` training batches together.

    A bound of what any rule could reach from training data (no drift lag, the
    noise of ``last_steps`` batches): the quantile rule at rate 1 iterated on
    the pooled batches from the trained bias until it settles.
    """
    import torch

    from nemo_lossfree.metrics import max_violation
    from nemo_lossfree.update import compute_bias_update

    per_layer = []
    for layer in range(traj.layers):
        bias = traj.final_bias[layer].clone()
        pooled = [torch.cat([r[step].reshape(-1, traj.experts) for step in range(traj.steps - last_steps, traj.steps)])
                  for r in traj.train[layer]]
        for _ in range(30):
            counts, hist = _step_inputs(pooled, bias, traj.topk, margins=True)
            bias = compute_bias_update(counts, bias, rate=0.7, rule="quantile", center=True, histogram=hist)
        chosen = torch.topk(traj.val[layer] + bias, traj.topk, dim=1).indices
        per_layer.append(float(max_violation(torch.bincount(chosen.flatten(), minlength=traj.experts).double())))
    return {"maxvio_global": sum(per_layer) / traj.layers, "maxvio_global_per_layer": per_layer}


CANDIDATES = {
    "quantile u=1.0": dict(update_rule="quantile", update_rate=1.0, schedule="constant"),
    "quantile u=0.7": dict(update_rule="quantile", update_rate=0.7, schedule="constant"),
    "quantile u=0.5": dict(update_rule="quantile", update_rate=0.5, schedule="constant"),
    "quantile u=0.25": dict(update_rule="quantile", update_rate=0.25, schedule="constant"),
    "quantile u=0.15": dict(update_rule="quantile", update_rate=0.15, schedule="constant"),
    "quantile adaptive [0.02, 1]": dict(update_rule="quantile", update_rate=1.0, schedule="adaptive",
                                        min_update_rate=0.02),
    "quantile adaptive [0.02, 0.5]": dict(update_rule="quantile", update_rate=0.5, schedule="adaptive",
                                          min_update_rate=0.02),
    "quantile adaptive [0, 0.5]": dict(update_rule="quantile", update_rate=0.5, schedule="adaptive"),
    "quantile adaptive [0, 1]": dict(update_rule="quantile", update_rate=1.0, schedule="adaptive"),
    "quantile adaptive [0.5, 1]": dict(update_rule="quantile", update_rate=1.0, schedule="adaptive",
                                       min_update_rate=0.5),
    "proportional 1e-2": dict(update_rule="proportional", update_rate=1e-2),
    "sign 1e-3 (paper)": dict(update_rule="sign", update_rate=1e-3),
}


def main() -> int:
    if os.environ.get(SCORES_ENV) and "RANK" in os.environ:
        return _worker_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=29527)
    parser.add_argument("--replay-only", action="store_true", help="use the scores already recorded in --out")
    parser.add_argument("--candidates", nargs="*", default=None, help="names of CANDIDATES (default all)")
    parser.add_argument("--no-hindsight", action="store_true", help="skip the hindsight bounds (the slow part)")
    args, demo_flags = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = 2
    if not args.replay_only and train_and_record(out, world, args.port, demo_flags):
        return 1
    traj = Trajectory(out, world)
    report = {"settings": traj.settings, "recorded": {
        "maxvio_global": traj.arm["maxvio_global"], "val_loss": traj.arm["val_loss"]}}
    # The config the run resolved (its defaults may since have changed), else its overrides.
    recorded_config = traj.arm.get("balancer_state", {}).get("config") or traj.settings.get("lossfree", {})
    check = replay(traj, library_rule(**recorded_config), check_bias=True)
    report["replay_check"] = check
    print(f"replay of the recorded rule: MaxVio_global {check['maxvio_global']:.4f} "
          f"(run: {traj.arm['maxvio_global']:.4f}), max |bias - recorded| {check['max_abs_bias_diff']:.2e}")
    rows = {}
    for name, fields in CANDIDATES.items():
        if args.candidates and name not in args.candidates:
            continue
        rows[name] = replay(traj, library_rule(**fields))
        gain = rows[name].get("gain_at_step")
        print(f"{name:32s} MaxVio_global {rows[name]['maxvio_global']:.4f}  "
              f"mean MaxVio_batch {rows[name]['maxvio_batch_mean']:.4f}"
              + ("  gain at step " + ", ".join(f"{m}: {g:.2f}" for m, g in gain.items()) if gain else ""),
              flush=True)
    for last in () if args.no_hindsight else (1, 10):
        name = f"hindsight: last {last} batches"
        rows[name] = hindsight_bias(traj, last)
        print(f"{name:32s} MaxVio_global {rows[name]['maxvio_global']:.4f}")
    report["rules"] = rows
    (out / "replay.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
