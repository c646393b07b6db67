"""Router forward+backward: LossFreeRouter against Megatron-Core's TopKRouter.

Three routers with the same gate weights see the same inputs:

- ``lossfree``: ``nemo_lossfree.LossFreeRouter`` (sigmoid scores, expert bias);
- ``upstream_bias``: ``TopKRouter`` with ``moe_router_enable_expert_bias=True``
  (the same bias values, so both select the same experts; checked below);
- ``upstream_aux``: ``TopKRouter`` with ``moe_router_load_balancing_type=aux_loss``.

Two scopes are timed for each shape (tokens, hidden, experts, top-k):

- ``router``: ``forward(hidden_states)`` then backward (gating GEMM included,
  which dominates at large hidden sizes);
- ``routing``: ``routing(logits)`` then backward, i.e. everything the router
  does after the GEMM, where the three differ.

Each repetition times the three in rotating order; the table gives median
times and the median of the paired ratios ours/upstream.

    python benchmarks/router_overhead.py                  # CPU, fp32, full table
    python benchmarks/router_overhead.py --device cuda --dtype bf16
    python benchmarks/router_overhead.py --quick --json out.json   # CI smoke run
    python benchmarks/router_overhead.py --profile 4096x1024x256x8 # op-level profile
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nemo_lossfree.testing.distributed import free_port  # noqa: E402

import timing  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

FULL_SHAPES = ((8192, 1024, 64, 6), (4096, 1024, 256, 8), (16384, 4096, 256, 8))
QUICK_SHAPES = ((256, 64, 16, 4),)
VARIANTS = ("lossfree", "upstream_bias", "upstream_aux")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"shape: expected TOKENSxHIDDENxEXPERTSxTOPK with positive integers, got {text!r}"
        )
    tokens, hidden, experts, topk = (int(p) for p in parts)
    if topk > experts:
        raise argparse.ArgumentTypeError(f"shape {text!r}: top-k {topk} exceeds experts {experts}")
    return tokens, hidden, experts, topk


def setup(device: torch.device) -> None:
    """Megatron's parallel state on one rank; the CPU shim when there is no GPU."""
    from nemo_lossfree.testing import cpu

    if device.type == "cpu":
        cpu.enable()
    cpu.init_distributed(0, 1, init_method=f"tcp://127.0.0.1:{free_port()}")


def build_routers(hidden: int, experts: int, topk: int, dtype: torch.dtype,
                  device: torch.device, seed: int = 0) -> dict[str, torch.nn.Module]:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    from nemo_lossfree import LossFreeRouter
    from nemo_lossfree.testing.models import moe_transformer_config

    def config(**kwargs):
        return moe_transformer_config(
            hidden_size=hidden, num_attention_heads=1, num_experts=experts, topk=topk,
            score_function="sigmoid", params_dtype=dtype, bf16=dtype == torch.bfloat16,
            **kwargs,
        )

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    routers = {
        "lossfree": LossFreeRouter(config(), pg_collection=pgs),
        "upstream_bias": TopKRouter(config(expert_bias=True), pg_collection=pgs),
        "upstream_aux": TopKRouter(
            config(load_balancing_type="aux_loss", aux_loss_coeff=1e-3), pg_collection=pgs
        ),
    }
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(experts, hidden, generator=generator) * hidden ** -0.5
    # A non-trivial bias (as after some training) so the biased selection is exercised.
    bias = torch.randn(experts, generator=generator) * 0.05
    for router in routers.values():
        router.set_layer_number(1)  # the aux-loss logger wants one
        router.to(device)
        with torch.no_grad():
            router.weight.copy_(weight.to(router.weight.dtype))
            if getattr(router, "expert_bias", None) is not None:
                router.expert_bias.copy_(bias)
        router.train()
    return routers


def check_same_selection(routers: dict[str, torch.nn.Module], hidden_TBH: torch.Tensor) -> None:
    """Ours and upstream's expert-bias router must route identically (same bias)."""
    with torch.no_grad():
        probs_a, map_a = routers["lossfree"](hidden_TBH)
        probs_b, map_b = routers["upstream_bias"](hidden_TBH)
    if not torch.equal(map_a, map_b):
        raise AssertionError("lossfree and upstream_bias chose different experts")
    torch.testing.assert_close(probs_a, probs_b)


def make_runs(routers, scope: str, hidden_TBH: torch.Tensor, logits_TBE: torch.Tensor):
    """One closure per router: forward + backward with a fixed upstream gradient."""
    generator = torch.Generator().manual_seed(1)
    tokens, experts = logits_TBE.shape[0] * logits_TBE.shape[1], logits_TBE.shape[-1]
    grad_TE = torch.randn(tokens, experts, generator=generator).to(
        device=logits_TBE.device, dtype=logits_TBE.dtype
    )

    def run_for(router):
        def run() -> None:
            router.weight.grad = None
            if scope == "router":
                inputs = hidden_TBH.detach().requires_grad_(True)
                probs, _ = router(inputs)
            else:
                inputs = logits_TBE.detach().requires_grad_(True)
                probs, _ = router.routing(inputs)
            torch.autograd.backward(probs, grad_TE.to(probs.dtype))
            if hasattr(router, "local_tokens_per_expert") and router.local_tokens_per_expert is not None:
                router.local_tokens_per_expert.zero_()  # as the balancer would, keeps values small
        return run

    return {name: run_for(router) for name, router in routers.items()}


def measure_shape(shape, *, scopes, repetitions, dtype, device) -> list[dict[str, Any]]:
    tokens, hidden, experts, topk = shape
    routers = build_routers(hidden, experts, topk, dtype, device)
    generator = torch.Generator().manual_seed(2)
    # [seq, batch, hidden] as the MoE layer passes it; batch 1.
    hidden_TBH = torch.randn(tokens, 1, hidden, generator=generator).to(device=device, dtype=dtype)
    check_same_selection(routers, hidden_TBH)
    with torch.no_grad():
        logits_TBE = routers["lossfree"].gating(hidden_TBH)
    rows = []
    for scope in scopes:
        runs = make_runs(routers, scope, hidden_TBH, logits_TBE)
        seconds = timing.interleaved(runs, repetitions=repetitions, device=device)
        rows.append({
            "tokens": tokens, "hidden": hidden, "experts": experts, "topk": topk,
            "scope": scope,
            "repetitions": repetitions,
            "median_ms": {n: 1e3 * timing.median(s) for n, s in seconds.items()},
            "min_ms": {n: 1e3 * min(s) for n, s in seconds.items()},
            "ratio_vs_upstream_bias": timing.paired_ratio(seconds["lossfree"], seconds["upstream_bias"]),
            "ratio_vs_upstream_aux": timing.paired_ratio(seconds["lossfree"], seconds["upstream_aux"]),
            "same_selection_as_upstream_bias": True,
        })
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict[str, Any]) -> str:
    ms = row["median_ms"]
    return (
        f"{row['tokens']}x{row['hidden']}x{row['experts']}x{row['topk']} {row['scope']:>7}: "
        + "  ".join(f"{n} {ms[n]:.2f} ms" for n in VARIANTS)
        + f"  | ours/bias {row['ratio_vs_upstream_bias']:.3f}  ours/aux {row['ratio_vs_upstream_aux']:.3f}"
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["T x H x E x K", "scope", "lossfree ms", "upstream bias ms", "upstream aux ms",
              "ours / bias", "ours / aux"]
    body = [
        [f"{r['tokens']}x{r['hidden']}x{r['experts']}x{r['topk']}", r["scope"],
         r["median_ms"]["lossfree"], r["median_ms"]["upstream_bias"], r["median_ms"]["upstream_aux"],
         r["ratio_vs_upstream_bias"], r["ratio_vs_upstream_aux"]]
        for r in rows
    ]
    return timing.markdown_table(header, body)


def profile(shape, *, scope: str, dtype, device, row_limit: int = 15) -> str:
    """torch.profiler op tables of the lossfree and upstream_bias runs, for finding extra work."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tokens, hidden, experts, topk = shape
    routers = build_routers(hidden, experts, topk, dtype, device)
    hidden_TBH = torch.randn(tokens, 1, hidden).to(device=device, dtype=dtype)
    with torch.no_grad():
        logits_TBE = routers["lossfree"].gating(hidden_TBH)
    runs = make_runs(routers, scope, hidden_TBH, logits_TBE)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for name in ("lossfree", "upstream_bias"):
        runs[name]()
        with torch_profile(activities=activities, profile_memory=True) as prof:
            for _ in range(5):
                runs[name]()
            timing.synchronize(device)
        out.append(f"== {name} ({scope}, 5 calls)\n"
                   + prof.key_averages().table(sort_by=sort_by, row_limit=row_limit))
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                        help="TOKENSxHIDDENxEXPERTSxTOPK ... (default: the three of the issue)")
    parser.add_argument("--scopes", nargs="+", choices=("router", "routing"), default=["router", "routing"])
    parser.add_argument("--repetitions", type=int, default=15)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default fp32 on the CPU, bf16 on a GPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default 1 on the CPU: on a shared, "
                             "oversubscribed machine OpenMP barriers make even a tiny GEMM take "
                             "tens of ms with 2 threads)")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 3 repetitions (CI)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--profile", type=parse_shape, default=None, metavar="SHAPE",
                        help="print torch.profiler tables for this shape instead of timing")
    args = parser.parse_args(argv)
    if args.repetitions < 1:
        parser.error(f"--repetitions: must be >= 1, got {args.repetitions}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    setup(device)

    if args.profile:
        for scope in args.scopes:
            print(profile(args.profile, scope=scope, dtype=dtype, device=device))
        return 0

    shapes = QUICK_SHAPES if args.quick else (args.shapes or FULL_SHAPES)
    repetitions = 3 if args.quick else args.repetitions
    started = time.time()
    rows = []
    for shape in shapes:
        rows += measure_shape(shape, scopes=args.scopes, repetitions=repetitions, dtype=dtype, device=device)
    timing.publish("router_overhead", argv, started=started, machine=timing.machine_info(device),
                   rows=rows, table=markdown(rows), json_path=args.json,
                   device=args.device, dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
