"""Cost of one balancer step: LossFreeBalancer.step() against Megatron-Core's update.

A DeepSeek-V3-like set of routers (61 layers of which the first 3 are dense,
so 58 MoE routers, plus one MTP layer: 59 routers of 256 experts) is built
directly as modules in an ``nn.ModuleList`` on every rank of a gloo group
(all layers on every rank: pipeline parallelism 1, the worst case for this
step). Each step the routers' ``local_tokens_per_expert`` are filled with the
same random counts (untimed), then one of these runs (timed, interleaved):

- ``lossfree``: ``LossFreeBalancer.step()`` with metrics (log_every=1);
- ``lossfree_nolog``: the same on a step that records no metrics;
- ``upstream``: ``megatron.core.distributed.finalize_model_grads._update_router_expert_bias``
  then ``reset_model_temporary_tensors`` (which zeroes the counts), as
  ``finalize_model_grads`` runs them, on ``TopKRouter(moe_router_enable_expert_bias=True)``
  modules of the same shape;
- ``overlapped``: a proposal (not in the package): the all-reduce is started
  with ``async_op=True`` right after the last backward and waited for after
  the optimizer step (simulated by ``--overlap-ms`` of busy work); the time on
  the critical path is start + finish, the overlapped work excluded.

Collectives per step are counted by wrapping ``torch.distributed.all_reduce``
(and the other collectives) for one step of each variant, host
synchronisations with ``nemo_lossfree.testing.host_syncs.HostSyncCounter`` on
the next step of each (``lossfree_nolog``'s records no metrics). With ``--mixed``
a few 64-expert routers join the 256-expert ones (models may mix expert
counts); Megatron-Core's update stacks all counts into one tensor and cannot
run on such a model, which the benchmark records instead of timing.

    python benchmarks/balancer_cost.py --world-sizes 2 4
    python benchmarks/balancer_cost.py --quick --json out.json     # CI smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nemo_lossfree.testing.distributed import free_port  # noqa: E402
from nemo_lossfree.testing.host_syncs import HostSyncCounter  # noqa: E402

import timing  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

# DeepSeek-V3: 61 layers, first_k_dense_replace=3, 256 routed experts, top-8, 1 MTP module.
DSV3 = dict(num_layers=61, dense_layers=3, experts=256, topk=8, mtp_layers=1)
QUICK = dict(num_layers=4, dense_layers=1, experts=16, topk=2, mtp_layers=1)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single")
# Step time assumed for the fraction column. DeepSeek-V3's report: 2.664M H800
# GPU-hours of pre-training for 14.8T tokens on 2048 GPUs, i.e. ~3.16M tokens/s,
# and a global batch of 15360 x 4096 tokens: ~20 s per step. 1 s is a small run.
ASSUMED_STEP_S = (20.0, 1.0)


class CollectiveCounter:
    """Counts calls to torch.distributed collectives, and the seconds spent in them, while active."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.seconds = 0.0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveCounter:
        import torch.distributed as dist

        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args, __name=name, __original=original, **kwargs):
                self.calls[__name] = self.calls.get(__name, 0) + 1
                begin = time.perf_counter()
                try:
                    return __original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - begin

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def build_router_stacks(shape: dict[str, int], mixed: bool):
    """(ours, upstream) ModuleLists of routers with the same layer numbers and sizes."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.router import TopKRouter

    from nemo_lossfree import LossFreeRouter
    from nemo_lossfree.testing.models import moe_transformer_config

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    # The balancer never touches the gate weights: a small hidden size keeps memory low.
    layout = [(layer, shape["experts"], False)
              for layer in range(shape["dense_layers"] + 1, shape["num_layers"] + 1)]
    layout += [(layer, shape["experts"], True) for layer in range(1, shape["mtp_layers"] + 1)]
    if mixed:
        # Every fourth MoE layer gets a quarter of the experts.
        layout = [(layer, experts // 4 if i % 4 == 3 else experts, mtp)
                  for i, (layer, experts, mtp) in enumerate(layout)]

    def config(experts: int, **kwargs):
        return moe_transformer_config(
            num_layers=shape["num_layers"], hidden_size=16, num_attention_heads=1,
            num_experts=experts, topk=min(shape["topk"], experts),
            mtp_num_layers=shape["mtp_layers"] or None, **kwargs,
        )

    ours, upstream = torch.nn.ModuleList(), torch.nn.ModuleList()
    configs = {}
    for layer, experts, mtp in layout:
        if experts not in configs:
            configs[experts] = (config(experts), config(experts, expert_bias=True))
        ours_cfg, up_cfg = configs[experts]
        for stack, router in ((ours, LossFreeRouter(ours_cfg, pg_collection=pgs, is_mtp_layer=mtp)),
                              (upstream, TopKRouter(up_cfg, pg_collection=pgs, is_mtp_layer=mtp))):
            router.set_layer_number(layer)
            stack.append(router)
    return ours.train(), upstream.train(), next(iter(configs.values()))[1]


class OverlappedLossFreeBalancer:
    """Proposal: start the counts' all-reduce early, apply the update later.

    ``start()`` right after the last micro-batch's backward (nothing else
    reads the counts), ``finish()`` before the next forward (for example after
    the optimizer step). Between the two, no router may count tokens.
    The update itself is LossFreeBalancer.step() unchanged: ``reduce_counts``
    returns the already reduced tensor.
    """

    def __init__(self, balancer) -> None:
        self.balancer = balancer
        self._pending = None
        original = balancer.reduce_counts

        def reduce_counts(plan, with_health=False):
            if self._pending is None:
                return original(plan, with_health)
            flat, work = self._pending
            self._pending = None
            if work is not None:
                work.wait()
            return flat

        balancer.reduce_counts = reduce_counts

    def start(self) -> None:
        import torch.distributed as dist

        balancer = self.balancer
        plan = balancer._plan()
        logs = balancer.steps_done % balancer.config.log_every == 0  # the health sums ride along then
        flat = torch.cat(plan.parts + plan.health if logs else plan.parts).double()
        work = None
        group = self.balancer.process_group
        if dist.is_initialized() and (group is None or dist.get_world_size(group) > 1):
            work = dist.all_reduce(flat, group=group, async_op=True)
        self._pending = (flat, work)

    def finish(self) -> dict[str, float]:
        return self.balancer.step()


def busy_ms(milliseconds: float) -> None:
    """Stand-in for the optimizer step: compute on this thread for about this long."""
    deadline = time.perf_counter() + milliseconds / 1e3
    a = torch.randn(64, 64)
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a)


def worker(rank: int, world_size: int, init_method: str, options: dict[str, Any], out_path: str) -> None:
    torch.set_num_threads(1)
    from nemo_lossfree.testing import cpu

    cpu.enable()
    cpu.init_distributed(rank, world_size, init_method=init_method)
    import torch.distributed as dist

    results = [measure(rank, world_size, dict(options, mixed=mixed)) for mixed in options["mixed_list"]]
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()


def measure(rank: int, world_size: int, options: dict[str, Any]) -> Optional[dict[str, Any]]:
    """One model layout (options["mixed"]): count collectives, time the variants."""
    import torch.distributed as dist
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    from nemo_lossfree import LossFreeBalancer, LossFreeConfig

    shape = options["shape"]
    ours, upstream, upstream_config = build_router_stacks(shape, options["mixed"])
    group = ours[0].tp_dp_cp_group
    logging_balancer = LossFreeBalancer(ours, LossFreeConfig(update_rule="sign", update_rate=1e-3, log_every=1))
    # log_every so large that only its first step records metrics; that one is warm-up.
    quiet_balancer = LossFreeBalancer(ours, LossFreeConfig(update_rule="sign", update_rate=1e-3, log_every=10**9))
    overlapped = OverlappedLossFreeBalancer(
        LossFreeBalancer(ours, LossFreeConfig(update_rule="sign", update_rate=1e-3, log_every=10**9))
    )
    generator = torch.Generator().manual_seed(1000 + rank)
    tokens_per_layer = shape["tokens_per_rank"] * shape["topk"]

    def fill_counts() -> None:
        for a, b in zip(ours, upstream):
            experts = a.local_tokens_per_expert.numel()
            counts = torch.bincount(
                torch.randint(0, experts, (tokens_per_layer,), generator=generator), minlength=experts
            ).float()
            a.local_tokens_per_expert.copy_(counts)
            b.local_tokens_per_expert.copy_(counts)

    mixed_sizes = len({r.local_tokens_per_expert.numel() for r in ours}) > 1
    runs = {
        "lossfree": logging_balancer.step,
        "lossfree_nolog": quiet_balancer.step,
    }
    upstream_error = None
    if mixed_sizes:
        try:
            fill_counts()
            _update_router_expert_bias(list(upstream), upstream_config, tp_dp_cp_group=group)
        except Exception as exc:  # noqa: BLE001 - recorded: upstream cannot mix expert counts
            upstream_error = f"{type(exc).__name__}: {exc}"
    if upstream_error is None:
        def upstream_step() -> None:
            # What finalize_model_grads does for the expert bias: the update,
            # then reset_model_temporary_tensors zeroes the counts.
            _update_router_expert_bias(list(upstream), upstream_config, tp_dp_cp_group=group)
            reset_model_temporary_tensors(upstream_config, list(upstream))

        runs["upstream"] = upstream_step

    # Collectives per step, counted on one step of each variant.
    collectives = {}
    for name, run in runs.items():
        fill_counts()
        with CollectiveCounter() as counter:
            run()
        collectives[name] = dict(counter.calls, total=counter.total)
    # Host synchronisations per step (what would make a GPU's host wait),
    # counted on a second step of each variant: lossfree_nolog records no metrics then.
    host_syncs = {}
    for name, run in runs.items():
        fill_counts()
        with HostSyncCounter() as counter:
            run()
        host_syncs[name] = counter.summary()
    fill_counts()
    with CollectiveCounter() as counter:
        overlapped.start()
        overlapped.finish()
    collectives["overlapped"] = dict(counter.calls, total=counter.total)

    # Interleaved timing; every rank runs the same order, a barrier aligns the starts.
    names = list(runs) + ["overlapped"]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    # This rank's time inside the step's collective (the transfer plus waiting
    # for the other ranks): what is left of a step is its computation.
    in_collective: dict[str, list[float]] = {n: [] for n in runs}
    overlap_ms = options["overlap_ms"]
    with CollectiveCounter() as collective_clock:
        for rep in range(options["warmup"] + options["repetitions"]):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                fill_counts()
                dist.barrier()
                if name == "overlapped":
                    begin = time.perf_counter()
                    overlapped.start()
                    critical = time.perf_counter() - begin
                    busy_ms(overlap_ms)  # the optimizer step the all-reduce hides behind
                    begin = time.perf_counter()
                    overlapped.finish()
                    elapsed = critical + time.perf_counter() - begin
                else:
                    before = collective_clock.seconds
                    begin = time.perf_counter()
                    runs[name]()
                    elapsed = time.perf_counter() - begin
                    if rep >= options["warmup"]:
                        in_collective[name].append(collective_clock.seconds - before)
                # A step is as slow as its slowest rank.
                slowest = torch.tensor([elapsed], dtype=torch.float64)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                if rep >= options["warmup"]:
                    seconds[name].append(slowest.item())

    # Same update on every rank (the reduction is global): check it.
    bias = torch.cat([r.expert_bias for r in ours]).double()
    gathered = [torch.zeros_like(bias) for _ in range(world_size)]
    dist.all_gather(gathered, bias)
    replicas_identical = all(torch.equal(gathered[0], g) for g in gathered[1:])
    if rank != 0:
        return None
    result = {
        "world_size": world_size,
        "mixed": options["mixed"],
        "routers": len(ours),
        "expert_counts": sorted({r.local_tokens_per_expert.numel() for r in ours}),
        "repetitions": options["repetitions"],
        "overlap_ms": overlap_ms,
        "median_ms": {n: 1e3 * timing.median(s) for n, s in seconds.items()},
        "min_ms": {n: 1e3 * min(s) for n, s in seconds.items()},
        # Rank 0's own step, split: time inside the collective, and the rest.
        "in_collective_ms": {n: 1e3 * timing.median(s) for n, s in in_collective.items()},
        "collectives_per_step": collectives,
        "host_syncs_per_step": host_syncs,
        "upstream_error": upstream_error,
        "replicas_identical": replicas_identical,
    }
    if "upstream" in seconds:
        result["ratio_lossfree_vs_upstream"] = timing.paired_ratio(seconds["lossfree"], seconds["upstream"])
        result["ratio_lossfree_nolog_vs_upstream"] = timing.paired_ratio(
            seconds["lossfree_nolog"], seconds["upstream"]
        )
    return result


def profile_steps(steps: int = 200, top: int = 18) -> str:
    """cProfile of each variant's step on one rank (no collective cost): where the time goes."""
    import cProfile
    import io
    import pstats

    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    from nemo_lossfree import LossFreeBalancer, LossFreeConfig
    from nemo_lossfree.testing import cpu

    torch.set_num_threads(1)
    cpu.enable()
    cpu.init_distributed(0, 1, init_method=f"tcp://127.0.0.1:{free_port()}")
    shape = dict(DSV3, tokens_per_rank=16384)
    ours, upstream, upstream_config = build_router_stacks(shape, mixed=False)
    group = ours[0].tp_dp_cp_group
    variants = {
        "lossfree": LossFreeBalancer(ours, LossFreeConfig(update_rule="sign", update_rate=1e-3, log_every=1)).step,
        "lossfree_nolog": LossFreeBalancer(
            ours, LossFreeConfig(update_rule="sign", update_rate=1e-3, log_every=10**9)
        ).step,
        "upstream": lambda: (
            _update_router_expert_bias(list(upstream), upstream_config, tp_dp_cp_group=group),
            reset_model_temporary_tensors(upstream_config, list(upstream)),
        ),
    }
    out = []
    for name, run in variants.items():
        for router in list(ours) + list(upstream):
            router.local_tokens_per_expert.fill_(1.0)
        run()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            run()
        profiler.disable()
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("tottime").print_stats(top)
        out.append(f"== {name}: {steps} steps, {stats.total_tt / steps * 1e3:.2f} ms/step under cProfile\n"
                   + stream.getvalue())
    out.append(per_router_costs(list(ours), variants))
    return "\n".join(out)


def per_router_costs(routers, variants, repetitions: int = 300) -> str:
    """CPU time of the per-router Python in a step, next to cheaper equivalents (us per step)."""
    def cpu_us(fn) -> float:
        fn()
        begin = time.process_time()
        for _ in range(repetitions):
            fn()
        return (time.process_time() - begin) / repetitions * 1e6

    def set_module_attr():
        for r in routers:
            r.forwards_since_update = 0

    def set_plain_attr():
        for r in routers:
            object.__setattr__(r, "forwards_since_update", 0)

    def zero_loop():
        for r in routers:
            r.local_tokens_per_expert.zero_()

    def zero_foreach():
        torch._foreach_zero_([r._buffers["local_tokens_per_expert"] for r in routers])

    def cat_reshaped():
        torch.cat([r.local_tokens_per_expert.reshape(-1) for r in routers]).double()

    def cat_buffers():
        torch.cat([r._buffers["local_tokens_per_expert"] for r in routers]).double()

    updated = torch.zeros(len(routers), routers[0].expert_bias.numel())

    def copy_loop():
        for r, row in zip(routers, updated):
            r.expert_bias.copy_(row)

    def copy_foreach():
        torch._foreach_copy_([r._buffers["expert_bias"] for r in routers], list(updated.unbind(0)))

    rows = [
        ("LossFreeBalancer.step, log_every=1", cpu_us(variants["lossfree"]), None, None),
        ("LossFreeBalancer.step, no metrics", cpu_us(variants["lossfree_nolog"]), None, None),
        ("upstream update + reset (1-rank gloo)", cpu_us(variants["upstream"]), None, None),
        ("router.forwards_since_update = 0", cpu_us(set_module_attr), "object.__setattr__", cpu_us(set_plain_attr)),
        ("local_tokens_per_expert.zero_() loop", cpu_us(zero_loop), "torch._foreach_zero_", cpu_us(zero_foreach)),
        ("cat of .reshape(-1) buffers", cpu_us(cat_reshaped), "cat of _buffers[...]", cpu_us(cat_buffers)),
        ("expert_bias.copy_ loop", cpu_us(copy_loop), "torch._foreach_copy_", cpu_us(copy_foreach)),
    ]
    lines = [f"== per-router costs, {len(routers)} routers, CPU us per step ({repetitions} repetitions)"]
    for what, us, alternative, alt_us in rows:
        lines.append(f"{what:<40} {us:9.1f}" + (f"   {alternative:<24} {alt_us:9.1f}" if alternative else ""))
    return "\n".join(lines)


def run_world(world_size: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        mp.spawn(worker, args=(world_size, init_method, options, out_path), nprocs=world_size, join=True)
        with open(out_path) as handle:
            return json.load(handle)


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["ranks", "routers (experts)", "variant", "ms / step", "of which in the collective (rank 0)",
              "collectives / step", "host syncs / step",
              f"of a {ASSUMED_STEP_S[0]:.0f} s step", f"of a {ASSUMED_STEP_S[1]:.0f} s step",
              "ratio vs upstream"]
    body = []
    for row in rows:
        routers = f"{row['routers']} ({'/'.join(str(e) for e in row['expert_counts'])})"
        for name, ms in row["median_ms"].items():
            ratio = {"lossfree": row.get("ratio_lossfree_vs_upstream"),
                     "lossfree_nolog": row.get("ratio_lossfree_nolog_vs_upstream")}.get(name)
            label = name + (f" ({row['overlap_ms']:.0f} ms overlapped)" if name == "overlapped" else "")
            in_collective = row.get("in_collective_ms", {}).get(name)
            body.append([row["world_size"], routers, label, ms, "-" if in_collective is None else in_collective,
                         row["collectives_per_step"][name]["total"],
                         sum(row["host_syncs_per_step"].get(name, {}).values()) if name in row["host_syncs_per_step"]
                         else "-",
                         f"{ms / 1e3 / ASSUMED_STEP_S[0]:.1e}", f"{ms / 1e3 / ASSUMED_STEP_S[1]:.1e}",
                         "-" if ratio is None else f"{ratio:.2f}"])
        if row["upstream_error"]:
            body.append([row["world_size"], routers, "upstream", "fails", "-", "-", "-", "-", "-",
                         row["upstream_error"][:60]])
    return timing.markdown_table(header, body)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens-per-rank", type=int, default=16384,
                        help="tokens each rank routes per step (sets the count values only)")
    parser.add_argument("--overlap-ms", type=float, default=20.0,
                        help="work the overlapped variant hides its all-reduce behind")
    parser.add_argument("--mixed", action="store_true",
                        help="also run a model that mixes 256- and 64-expert routers")
    parser.add_argument("--quick", action="store_true", help="5 tiny routers, 3 repetitions (CI)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of each variant on one rank instead of timing")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile_steps())
        return 0
    for name in ("repetitions", "tokens_per_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if any(w < 1 for w in args.world_sizes):
        parser.error(f"--world-sizes: every size must be >= 1, got {args.world_sizes}")

    shape = dict(QUICK if args.quick else DSV3, tokens_per_rank=64 if args.quick else args.tokens_per_rank)
    options = dict(shape=shape, repetitions=3 if args.quick else args.repetitions,
                   warmup=1 if args.quick else args.warmup,
                   overlap_ms=1.0 if args.quick else args.overlap_ms,
                   mixed_list=[False, True] if args.mixed or args.quick else [False])
    started = time.time()
    rows = []
    for world_size in args.world_sizes:
        for row in run_world(world_size, options):
            rows.append(row)
            print(json.dumps(row), flush=True)
    timing.publish("balancer_cost", argv, started=started,
                   machine=dict(timing.machine_info(torch.device("cpu")), worker_torch_threads=1),
                   rows=rows, table=markdown(rows), json_path=args.json, shape=shape, assumed_step_s=ASSUMED_STEP_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
