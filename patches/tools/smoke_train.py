"""Loss-free MoE training on the patched Megatron-Core, upstream flags only.

    PYTHONPATH=<patched tree> python smoke_train.py

Two data-parallel ranks (gloo, CPU) train a small GPT-MoE through Megatron-Core's
own training path: ``DistributedDataParallel``, the no-pipelining schedule and
``finalize_model_grads`` (which runs the expert bias update). Only
TransformerConfig flags switch the features on: softmax routing with an expert
bias, proportional rule, re-centering, an inverse-time schedule. The plugin
(nemo_lossfree's router and balancer) is never imported; its CPU shim is.

Checks that training balances the load (MaxVio of the last steps below the
first step's), that the bias stays centered, that the replicas agree, and
that the MoE metrics tracker reports the new per-layer metrics.
"""

from __future__ import annotations

import socket
import sys

STEPS = 20
MICRO_BATCHES = 2
WORLD_SIZE = 2
VOCAB, SEQ, BATCH = 128, 32, 4
UPDATE_RATE = 5e-3
LATE = 8  # steps at the end over which MaxVio is averaged
METRICS = ["max_violation", "expert_bias_mean", "expert_bias_std", "expert_bias_abs_max"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Writer:
    """Collects what MoEMetricsTracker.report() would send to TensorBoard."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, name, value, iteration) -> None:
        self.scalars[name] = float(value)


def _worker(rank: int, port: int) -> None:
    from nemo_lossfree.testing import cpu

    cpu.enable()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    cpu.init_distributed(rank, WORLD_SIZE, init_method=f"tcp://127.0.0.1:{port}")

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config

    def train(update_rate):
        """MaxVio per step, the routers and the last metrics written, for one bias update rate."""
        torch.manual_seed(1234)
        model_parallel_cuda_manual_seed(1234)
        config = moe_transformer_config(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_experts=8,
            topk=2,
            score_function="softmax",
            expert_bias=True,
            bias_update_rate=update_rate,
            moe_router_bias_update_rule="proportional",
            moe_router_bias_center=True,
            moe_router_bias_update_schedule="inverse_time",
            moe_router_bias_update_decay_steps=16,
        )
        model = gpt_moe_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, loss_free=False)
        model = DistributedDataParallel(
            config, DistributedDataParallelConfig(overlap_grad_reduce=False), model
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
        routers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]
        assert len(routers) == 2

        generator = torch.Generator().manual_seed(100 + rank)
        weights = torch.arange(1, VOCAB + 1, dtype=torch.float64) ** -1.2  # skewed tokens
        position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)

        def batches():
            while True:
                tokens = torch.multinomial(weights, BATCH * (SEQ + 1), True, generator=generator)
                yield tokens.view(BATCH, SEQ + 1)

        def forward_step(data_iterator, model):
            tokens = next(data_iterator)
            output = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])
            return output, lambda out: (out.mean(), {"lm loss": out.mean().detach()})

        forward_backward = get_forward_backward_func()
        data = batches()
        tracker = get_moe_metrics_tracker()
        maxvio = []
        for step in range(STEPS):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            forward_backward(
                forward_step_func=forward_step,
                data_iterator=data,
                model=[model],
                num_microbatches=MICRO_BATCHES,
                seq_length=SEQ,
                micro_batch_size=BATCH,
            )
            for param in model.parameters():
                param.grad = param.main_grad
            optimizer.step()
            writer = _Writer()
            tracker.report(
                loss_scale=1 / MICRO_BATCHES,
                iteration=step,
                writer=writer,
                per_layer_logging=True,
                track_names=METRICS,
                num_layers=config.num_layers,
            )
            maxvio.append(writer.scalars["max_violation"])
        return maxvio, routers, writer

    baseline, _, _ = train(0.0)  # expert bias enabled, rate 0: Megatron without balancing
    maxvio, routers, writer = train(UPDATE_RATE)
    biases = torch.stack([r.expert_bias for r in routers])
    gathered = [torch.zeros_like(biases) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, biases)
    errors = []
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        errors.append("the data-parallel replicas ended with different expert biases")
    if biases.abs().max().item() == 0:
        errors.append("the expert bias never moved")
    if biases.mean(dim=-1).abs().max().item() > 1e-6:
        errors.append(f"the bias is not centered: layer means {biases.mean(dim=-1).tolist()}")
    steps_done = [int(r.expert_bias_update_steps.item()) for r in routers]
    if steps_done != [STEPS] * len(routers):
        errors.append(f"expert_bias_update_steps {steps_done}, expected {STEPS}")
    for name in METRICS:
        for layer in range(len(routers)):
            if f"moe/{name}_layer_{layer}" not in writer.scalars:
                errors.append(f"no per-layer metric moe/{name}_layer_{layer}")
    late, late_baseline = sum(maxvio[-LATE:]) / LATE, sum(baseline[-LATE:]) / LATE
    if not late < late_baseline:
        errors.append(
            f"no balancing: mean MaxVio of the last {LATE} steps {late:.3f}, "
            f"without bias updates {late_baseline:.3f}"
        )
    leaked = [m for m in ("nemo_lossfree.router", "nemo_lossfree.balancer") if m in sys.modules]
    if leaked:
        errors.append(f"the plugin was imported: {leaked}")
    if rank == 0:
        import megatron.core

        print(f"megatron.core from {megatron.core.__file__}")
        print("MaxVio per step, rate 0:           " + " ".join(f"{v:.2f}" for v in baseline))
        print(f"MaxVio per step, rate {UPDATE_RATE:g}: " + " ".join(f"{v:.2f}" for v in maxvio))
        print(f"final bias: layer means {biases.mean(dim=-1).tolist()}, max |b| {biases.abs().max().item():.4f}")
        for message in errors:
            print(f"FAIL {message}")
        print(f"smoke: {'1 passed, 0 failed' if not errors else '0 passed, 1 failed'}")
    if errors:
        raise SystemExit(1)


def main() -> int:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD_SIZE, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
