"""What the quantile rule costs over the sign rule: router forward+backward, balancer step, bytes.

    python benchmarks/quantile_cost.py                # 16384 tokens x hidden 1024 x 256 experts, top-8
    python benchmarks/quantile_cost.py --tokens 4096 --experts 64 --topk 6

One LossFreeRouter on the CPU (one thread), timed interleaved with the
margin histogram off (sign, proportional) and on (quantile); then one
balancer step over a DeepSeek-V3-like stack (59 routers of 256 experts, one
rank, so the all-reduce itself is not timed: its size is printed instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from nemo_lossfree.testing import cpu

    cpu.enable()
    torch.set_num_threads(1)
    from nemo_lossfree.testing.distributed import free_port

    cpu.init_distributed(0, 1, init_method=f"tcp://127.0.0.1:{free_port()}")
    from megatron.core.process_groups_config import ProcessGroupCollection

    from nemo_lossfree import LossFreeBalancer, LossFreeConfig
    from nemo_lossfree.router import LossFreeRouter
    from nemo_lossfree.testing.models import moe_transformer_config

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    config = moe_transformer_config(num_layers=1, hidden_size=args.hidden, num_attention_heads=8,
                                    num_experts=args.experts, topk=args.topk)
    router = LossFreeRouter(config, pg_collection=pgs)
    x = torch.randn(args.tokens, 1, args.hidden)

    def forward_backward(record: bool):
        router.record_margins = record
        probs, _ = router(x)
        probs.sum().backward()

    plain = median_ms(lambda: forward_backward(False), args.repeats)
    quantile = median_ms(lambda: forward_backward(True), args.repeats)
    print(f"router forward+backward, {args.tokens} tokens x {args.hidden} x {args.experts} experts, "
          f"top-{args.topk}: counts only {plain:.1f} ms, with the margin histogram {quantile:.1f} ms "
          f"(x{quantile / plain:.2f})")

    routers = torch.nn.ModuleList()
    for number in range(1, 60):
        r = LossFreeRouter(moe_transformer_config(num_layers=61, num_experts=256, topk=8), pg_collection=pgs)
        r.set_layer_number(number)
        routers.append(r)
    for rule in ("sign", "quantile"):
        balancer = LossFreeBalancer(routers, LossFreeConfig(update_rule=rule, log_every=10**9))

        def step():
            for r in routers:
                r.local_tokens_per_expert.fill_(64.0)
                r.local_margin_histogram[:, 0, 20] = 64.0
            balancer.step()  # noqa: B023 (called within this iteration)

        elements = sum(r.local_tokens_per_expert.numel() for r in routers)
        if rule == "quantile":
            elements += sum(r.local_margin_histogram.numel() for r in routers)
        print(f"balancer step, 59 routers x 256 experts, rule {rule}: {median_ms(step, args.repeats):.2f} ms "
              f"(incl. refilling the buffers); all-reduce {elements} float64 = {elements * 8 / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
