"""Same data, same settings: do the plugin and the patched Megatron-Core end with the same biases?

Run once per side, each in its own process, then compare::

    # the plugin (LossFreeRouter + LossFreeBalancer) on the pristine megatron-core
    python lossfree_equivalence.py run --side plugin --out plugin.pt
    # upstream flags only, on the patched tree (PYTHONPATH=<patched tree>)
    python lossfree_equivalence.py run --side patched --out patched.pt
    python lossfree_equivalence.py compare plugin.pt patched.pt

``--series`` picks the variants a series can express: ``megatron-core`` (the
0.19.2 series, the default) or ``megatron-lm-main``, which adds the quantile
rule (also with group-limited routing), counting before capacity dropping and
counting on the backward (a probe forward that is never backpropagated;
Megatron's activation recomputation). For the main series the plugin side runs
on the pristine Megatron-LM tree (PYTHONPATH) instead of the venv's wheel.

Each variant trains a small GPT-MoE for a few global batches on both ranks
of a 2-process gloo world (data parallel: different tokens per rank, so the
bias update needs the all-reduce), with SGD and averaged gradients. The bias
update of the patched side is the one Megatron-Core's finalize_model_grads
runs (``_update_router_expert_bias`` then ``reset_model_temporary_tensors``);
the plugin's is ``LossFreeBalancer.step()``. The biases must be bit-identical
after every step: the routing of step t depends on the biases of step t-1,
so any difference in the selection, the counts, the rule, the centering or
the schedule shows up.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

# Settings of each variant: (name, score function, pre-softmax, update settings).
# The update settings use the plugin's LossFreeConfig field names; PATCHED_FLAGS
# maps them to Megatron-Core's TransformerConfig fields.
CORE_VARIANTS = [
    ("sigmoid_sign", "sigmoid", False, dict(update_rule="sign", center=False)),
    ("sigmoid_sign_center", "sigmoid", False, dict(update_rule="sign", center=True)),
    (
        "sigmoid_proportional_inverse_time",
        "sigmoid",
        False,
        dict(update_rule="proportional", center=True, schedule="inverse_time", decay_steps=2),
    ),
    (
        "softmax_sign_cosine_warmup",
        "softmax",
        False,
        dict(
            update_rule="sign", center=True, schedule="cosine", decay_steps=4,
            min_update_rate=1e-3, warmup_steps=2,
        ),
    ),
    (
        "softmax_pre_proportional_freeze",
        "softmax",
        True,
        dict(
            # center=True: a frozen bias must stay bit-exact, not be re-centered.
            update_rule="proportional", center=True, schedule="linear_warmup",
            warmup_steps=2, freeze_after_steps=4,
        ),
    ),
]
# Variants only the Megatron-LM main series can express. A fifth element holds
# what is not an update setting: "model" (TransformerConfig fields of both
# sides), "patched" (fields of the patched side only) and "probe" (a training-mode
# forward with gradients after each step's micro-batches that is never
# backpropagated: it trains nothing, so the plugin does not count it).
MAIN_VARIANTS = [
    ("sigmoid_quantile_center", "sigmoid", False, dict(update_rule="quantile", update_rate=0.5, center=True), {}),
    (
        "softmax_quantile_group_limited",
        "softmax",
        False,
        dict(update_rule="quantile", update_rate=0.7, center=True),
        dict(model=dict(moe_router_num_groups=4, moe_router_group_topk=2)),
    ),
    (
        "sigmoid_sign_capacity",
        "sigmoid",
        False,
        dict(update_rule="sign", center=True),
        dict(model=dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs")),
    ),
    (
        "sigmoid_proportional_probe",
        "sigmoid",
        False,
        dict(update_rule="proportional", center=True),
        dict(patched=dict(moe_router_bias_count_on_backward=True), probe=True),
    ),
    (
        # Megatron's (reentrant) recomputation: the counts arrive in the recomputed backward.
        "softmax_quantile_recompute",
        "softmax",
        True,
        dict(update_rule="quantile", update_rate=0.5, center=True),
        dict(
            model=dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
            patched=dict(moe_router_bias_count_on_backward=True),
        ),
    ),
]
SERIES_VARIANTS = {
    "megatron-core": CORE_VARIANTS,
    "megatron-lm-main": CORE_VARIANTS + MAIN_VARIANTS,
}
PATCHED_FLAGS = {
    "update_rate": "moe_router_bias_update_rate",
    "update_rule": "moe_router_bias_update_rule",
    "center": "moe_router_bias_center",
    "schedule": "moe_router_bias_update_schedule",
    "warmup_steps": "moe_router_bias_update_warmup_steps",
    "decay_steps": "moe_router_bias_update_decay_steps",
    "min_update_rate": "moe_router_bias_update_min_rate",
    "freeze_after_steps": "moe_router_bias_freeze_after_steps",
}
UPDATE_RATE = 1e-2  # large enough that a few steps change the routing
STEPS = 6
MICRO_BATCHES = 2
WORLD_SIZE = 2
VOCAB, SEQ, BATCH = 128, 16, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokens(variant: int, step: int, micro: int, rank: int):
    import torch

    generator = torch.Generator().manual_seed(((variant * 100 + step) * 10 + micro) * 10 + rank)
    # A skewed token distribution makes the routing unbalanced from the start.
    weights = torch.arange(1, VOCAB + 1, dtype=torch.float64) ** -1.0
    return torch.multinomial(weights, BATCH * (SEQ + 1), replacement=True, generator=generator).view(
        BATCH, SEQ + 1
    )


def _train_variant(side: str, variants: list, index: int, rank: int) -> list:
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config

    name, score_function, pre_softmax, settings, *rest = variants[index]
    extra = rest[0] if rest else {}
    settings = dict(dict(update_rate=UPDATE_RATE), **settings)
    common = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
        score_function=score_function, moe_router_pre_softmax=pre_softmax,
        **extra.get("model", {}),
    )
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    if side == "plugin":
        from nemo_lossfree import LossFreeBalancer, LossFreeConfig

        config = moe_transformer_config(expert_bias=False, **common)
        model = gpt_moe_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, loss_free=True)
        balancer = LossFreeBalancer(model, LossFreeConfig(**settings))
        update = balancer.step
    else:
        from megatron.core.distributed.finalize_model_grads import (
            _update_router_expert_bias,
            reset_model_temporary_tensors,
        )

        overrides = {PATCHED_FLAGS[key]: value for key, value in settings.items()}
        overrides.update(extra.get("patched", {}))
        config = moe_transformer_config(expert_bias=True, **common, **overrides)
        model = gpt_moe_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, loss_free=False)

        def update():
            # What finalize_model_grads does for the expert bias.
            _update_router_expert_bias([model], config)
            reset_model_temporary_tensors(config, [model])

    routers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]
    assert len(routers) == 2, f"{side}: expected 2 routers with an expert bias, got {len(routers)}"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    history = []
    model.train()
    for step in range(STEPS):
        optimizer.zero_grad()
        for micro in range(MICRO_BATCHES):
            tokens = _tokens(index, step, micro, rank)
            loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
            (loss / MICRO_BATCHES).backward()
        if extra.get("probe"):
            # Gradients on, training mode, never backpropagated: trains nothing.
            tokens = _tokens(index, step, MICRO_BATCHES, rank)
            model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= WORLD_SIZE
        update()
        optimizer.step()
        history.append(torch.stack([r.expert_bias.detach().clone() for r in routers]))
    return history


def _worker(rank: int, side: str, series: str, port: int, out: str) -> None:
    from nemo_lossfree.testing import cpu

    cpu.enable()  # before Megatron-Core's transformer modules are imported
    import torch

    # Tiny matmuls: one thread per rank is fastest, and the ranks share the cores.
    torch.set_num_threads(1)

    import megatron.core

    cpu.init_distributed(rank, WORLD_SIZE, init_method=f"tcp://127.0.0.1:{port}")
    variants = SERIES_VARIANTS[series]
    results = {
        name: torch.stack(_train_variant(side, variants, i, rank))
        for i, (name, *_) in enumerate(variants)
    }
    if side == "patched":
        # Upstream flags only: the plugin's router and balancer were never imported.
        leaked = [m for m in ("nemo_lossfree.router", "nemo_lossfree.balancer") if m in sys.modules]
        assert not leaked, f"patched side imported the plugin: {leaked}"
    if rank == 0:
        results["_megatron"] = os.path.dirname(megatron.core.__file__)
        results["_series"] = series
        torch.save(results, out)


def run(side: str, series: str, out: str) -> int:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(side, series, _free_port(), out), nprocs=WORLD_SIZE, join=True)
    return 0


def compare(plugin_path: str, patched_path: str) -> int:
    import torch

    plugin, patched = torch.load(plugin_path), torch.load(patched_path)
    print(f"plugin side:  megatron.core from {plugin.pop('_megatron')}")
    print(f"patched side: megatron.core from {patched.pop('_megatron')}")
    series = plugin.pop("_series", "megatron-core")
    if patched.pop("_series", "megatron-core") != series:
        print("FAIL the two sides ran the variants of different series")
        return 1
    variants = SERIES_VARIANTS[series]
    failed = 0
    finals = []
    for name, *_ in variants:
        a, b = plugin[name], patched[name]  # [steps, layers, experts]
        same = torch.equal(a, b)
        moved = a[-1].abs().max().item()
        print(
            f"{'OK  ' if same else 'FAIL'} {name}: {a.shape[0]} steps x {a.shape[1]} layers x "
            f"{a.shape[2]} experts, max |plugin - patched| = {(a - b).abs().max().item():.3g}, "
            f"max |bias| = {moved:.4g}"
        )
        if not same or moved == 0.0:
            failed += 1
        finals.append(a[-1])
    # The variants must differ from each other, else the comparison proves little.
    for i in range(len(finals)):
        for j in range(i + 1, len(finals)):
            if torch.equal(finals[i], finals[j]):
                print(f"FAIL variants {variants[i][0]} and {variants[j][0]} ended with equal biases")
                failed += 1
    print(f"{len(variants) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--side", choices=["plugin", "patched"], required=True)
    run_parser.add_argument("--out", required=True)
    run_parser.add_argument("--series", choices=sorted(SERIES_VARIANTS), default="megatron-core")
    compare_parser = sub.add_parser("compare")
    compare_parser.add_argument("plugin")
    compare_parser.add_argument("patched")
    args = parser.parse_args()
    if args.command == "run":
        return run(args.side, args.series, args.out)
    return compare(args.plugin, args.patched)


if __name__ == "__main__":
    sys.exit(main())
