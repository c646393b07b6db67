"""Cost of the lossfree/ metrics: a logging and a non-logging balancer step, the writer, the router's part.

Balancer part: the DeepSeek-V3-like routers of ``balancer_cost.py`` (59
routers of 256 experts, all on one rank, EP 64 placement for the overload
metric) in a one-rank gloo group. Counts and the router-health sums are
refilled before every step (untimed); timed, interleaved:

- ``step_nolog``: ``LossFreeBalancer.step()`` on a step that does not log (the baseline);
- ``step_log``: the same on a logging step: the health sums ride in the one
  all-reduce, then ``metrics.step_metrics`` and ``bias_summary``;
- ``step_metrics``: ``metrics.step_metrics`` alone on the same counts;
- ``write_scalars``: ``MetricsWriter.write`` of one step's metrics to a ``SummaryWriter``;
- ``write_heatmap``: the same with the load matrix and heatmap image (every ``heatmap_every`` steps).

Router part: one ``LossFreeRouter`` (hidden 1024, 256 experts, top-8,
4096 tokens) forward+backward with nothing recorded, with the health sums
(``record_health``, logging steps only) and with a routing trace's scores
(``score_recording``, traced steps only).

    python benchmarks/metrics_cost.py --json benchmarks/results_metrics_cpu.json
    python benchmarks/metrics_cost.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from balancer_cost import DSV3, QUICK, build_router_stacks  # noqa: E402

import timing  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def _interleaved(runs: dict, prepare, repetitions: int, warmup: int) -> dict[str, list[float]]:
    names = list(runs)
    seconds = {n: [] for n in names}
    for rep in range(warmup + repetitions):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            prepare()
            begin = time.perf_counter()
            runs[name]()
            elapsed = time.perf_counter() - begin
            if rep >= warmup:
                seconds[name].append(elapsed)
    return seconds


def balancer_part(shape: dict, repetitions: int, warmup: int, tb_dir: str) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    from nemo_lossfree import LossFreeBalancer, LossFreeConfig
    from nemo_lossfree import metrics as lf_metrics
    from nemo_lossfree.integrations.logging import MetricsWriter

    routers, _, _ = build_router_stacks(shape, mixed=False)
    experts = shape["experts"]
    ep = max(1, experts // 4)  # DeepSeek-V3: EP 64 for 256 experts
    logging = LossFreeBalancer(routers, LossFreeConfig(log_every=1))
    quiet = LossFreeBalancer(routers, LossFreeConfig(log_every=10**9))  # its first step (warm-up) logs
    placement = lf_metrics.expert_ranks(experts, ep)
    logging.placements = [placement] * len(routers)
    generator = torch.Generator().manual_seed(0)
    tokens = shape["tokens_per_rank"] * shape["topk"]

    def fill() -> None:
        for router in routers:
            counts = torch.bincount(torch.randint(0, experts, (tokens,), generator=generator), minlength=experts)
            router.local_tokens_per_expert.copy_(counts.float())
            router.local_health.copy_(torch.rand(router.local_health.shape, generator=generator) * tokens)
            # Health is recorded only on steps the balancer logs: the logging balancer's steps read it.
            router.record_health = True

    fill()
    metrics = logging.step()
    layer_ids, counts = logging.last_loads
    health = [r.local_health.clone() for r in routers]
    writer = SummaryWriter(tb_dir)
    scalars_only, with_heatmap = MetricsWriter(heatmap_every=0), MetricsWriter(heatmap_every=1)
    step = [0]

    def write(metrics_writer):
        step[0] += 1
        metrics_writer.write(step[0], metrics, (layer_ids, counts), tensorboard=writer)

    runs = {
        "step_nolog": quiet.step,
        "step_log": logging.step,
        "step_metrics": lambda: lf_metrics.step_metrics(
            layer_ids, counts, placements=logging.placements, biases=[r.expert_bias for r in routers],
            health=health, topks=[r.topk for r in routers]),
        "write_scalars": lambda: write(scalars_only),
        "write_heatmap": lambda: write(with_heatmap),
    }
    seconds = _interleaved(runs, fill, repetitions, warmup)
    writer.close()
    return {
        "routers": len(routers), "experts": experts, "ep_for_overload": ep, "scalars_per_step": len(metrics),
        "repetitions": repetitions,
        "median_ms": {n: 1e3 * timing.median(s) for n, s in seconds.items()},
        "ratio_vs_step_nolog": {n: timing.paired_ratio(s, seconds["step_nolog"]) for n, s in seconds.items()},
    }


def router_part(tokens: int, hidden: int, experts: int, topk: int, repetitions: int, warmup: int) -> dict:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from nemo_lossfree import LossFreeRouter
    from nemo_lossfree.router import ScoreRecording
    from nemo_lossfree.testing.models import moe_transformer_config

    config = moe_transformer_config(num_layers=2, hidden_size=hidden, num_attention_heads=8, num_experts=experts,
                                    topk=topk)
    router = LossFreeRouter(config, pg_collection=ProcessGroupCollection.use_mpu_process_groups()).train()
    router.set_layer_number(1)
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(tokens, 1, hidden, generator=generator, requires_grad=True)
    with torch.no_grad():
        router.expert_bias.copy_(torch.randn(experts, generator=generator) * 1e-2)

    def prepare() -> None:
        router.forwards_since_update = 0
        router.local_tokens_per_expert.zero_()
        router.local_health.zero_()
        router.record_health = False
        router.score_recording = None

    def forward_backward() -> None:
        probs, _ = router(hidden_states)
        probs.sum().backward()

    def with_health() -> None:
        router.record_health = True
        forward_backward()

    def with_trace() -> None:
        router.score_recording = ScoreRecording(max_tokens=None)
        forward_backward()

    seconds = _interleaved({"plain": forward_backward, "record_health": with_health, "score_recording": with_trace},
                           prepare, repetitions, warmup)
    return {
        "tokens": tokens, "hidden": hidden, "experts": experts, "topk": topk, "repetitions": repetitions,
        "median_ms": {n: 1e3 * timing.median(s) for n, s in seconds.items()},
        "ratio_vs_plain": {n: timing.paired_ratio(s, seconds["plain"]) for n, s in seconds.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--repetitions", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from nemo_lossfree.testing import cpu
    from nemo_lossfree.testing.distributed import free_port

    cpu.enable()
    cpu.init_distributed(0, 1, init_method=f"tcp://127.0.0.1:{free_port()}")
    shape = dict(QUICK if args.quick else DSV3, tokens_per_rank=4096)
    repetitions = args.repetitions or (3 if args.quick else 30)
    with tempfile.TemporaryDirectory() as tb_dir:
        balancer = balancer_part(shape, repetitions, 2, tb_dir)
    router = router_part(512 if args.quick else 4096, 64 if args.quick else 1024, shape["experts"],
                         shape["topk"], repetitions, 2)
    result = {"machine": timing.machine_info(torch.device("cpu")), "balancer": balancer, "router": router}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    b, r = balancer, router
    print(f"balancer: {b['routers']} routers x {b['experts']} experts, one rank, {b['scalars_per_step']} scalars "
          f"per logging step, {b['repetitions']} interleaved repetitions")
    print("| variant | ms | vs step_nolog |\n|---|---|---|")
    for name, ms in b["median_ms"].items():
        print(f"| {name} | {ms:.2f} | {b['ratio_vs_step_nolog'][name]:.2f} |")
    print(f"\nrouter: {r['tokens']} tokens x hidden {r['hidden']} x {r['experts']} experts, top-{r['topk']}, "
          "forward+backward")
    print("| variant | ms | vs plain |\n|---|---|---|")
    for name, ms in r["median_ms"].items():
        print(f"| {name} | {ms:.2f} | {r['ratio_vs_plain'][name]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
