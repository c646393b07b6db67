"""Functions run on every rank by the multi-process tests (spawned: importable)."""

from __future__ import annotations

from nemo_lossfree.testing import cpu

cpu.enable()  # before anything imports Megatron-Core's router (spawned ranks import this first)

# ruff: noqa: E402  (the imports below must follow cpu.enable())
import inspect
import os

import torch
import torch.distributed as dist

from nemo_lossfree import LossFreeBalancer, LossFreeConfig
from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config
from nemo_lossfree.update import compute_bias_update, compute_bias_update_with_integral, scheduled_rate

SEQ, BATCH, VOCAB = 32, 4, 128
LR = 0.05


class CollectiveCounter:
    """Counts torch.distributed collectives issued while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapped(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def gathered(routers, group, buffer: str = "local_tokens_per_expert") -> torch.Tensor:
    """Reference: every rank's local ``buffer`` gathered and summed, [layers, ...] float64."""
    local = torch.stack([getattr(r, buffer) for r in routers]).double()
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts).sum(dim=0)


def step_and_check(balancer, lf_config, step: int, reference_integral, tokens_routed: int):
    """One balancer step, checked against the counts gathered from every rank of its group.

    ``tokens_routed``: how many tokens the whole group routed since the last
    step (each counted once, by the rank that routed it). Returns the
    collectives the step issued and the reference drift integral.
    """
    routers = balancer.routers
    group = balancer.process_group
    reference_counts = gathered(routers, group)
    topk = routers[0].topk
    assert torch.equal(reference_counts.sum(-1), torch.full((len(routers),), float(tokens_routed * topk)))
    histogram = None
    if lf_config.update_rule == "quantile":
        histogram = gathered(routers, group, "local_margin_histogram")
        # The histogram's mass below 0 is the count, on every rank.
        below = histogram[..., 0, : histogram.shape[-1] // 2].sum(-1)
        assert torch.equal(below, reference_counts)
    bias_before = torch.stack([r.expert_bias.clone() for r in routers])
    with CollectiveCounter() as counter:
        balancer.step()
    if lf_config.integral_gain:
        expected, reference_integral = compute_bias_update_with_integral(
            reference_counts, bias_before, reference_integral,
            rate=scheduled_rate(lf_config, step), rule=lf_config.update_rule,
            center=lf_config.center, gain=lf_config.integral_gain, decay=lf_config.integral_decay,
            histogram=histogram,
        )
        assert torch.equal(torch.stack(balancer.integrals), reference_integral)
    else:
        expected = compute_bias_update(
            reference_counts, bias_before, rate=scheduled_rate(lf_config, step),
            rule=lf_config.update_rule, center=lf_config.center, histogram=histogram,
        )
    got = torch.stack([r.expert_bias for r in routers])
    assert torch.equal(got, expected), f"step {step}: bias differs from the gathered reference"
    assert all(r.local_tokens_per_expert.sum() == 0 for r in routers)
    assert all(r.local_margin_histogram.sum() == 0 for r in routers)
    return counter.calls, reference_integral


def train_and_check(rank: int, parallel: dict, lf: dict, steps: int, mtp: bool) -> dict:
    """Train a GPT-MoE with the balancer; check each update against the gathered reference.

    With tensor parallelism the model has sequence parallelism (Megatron-Core
    requires it for MoE) and ``SequenceParallelTorchNorm``: each tensor-parallel
    rank routes its part of the sequence. It is then trained through Megatron's
    DDP and ``finalize_model_grads``, which sum the tensor-parallel ranks'
    partial gradients of the replicated parameters (router, norms); after every
    step those replicas must be bit-identical across the tensor-parallel group.
    """
    from megatron.core import parallel_state

    config = moe_transformer_config(
        num_layers=2,
        num_experts=8,
        topk=2,
        mtp_num_layers=1 if mtp else None,
        **parallel,
    )
    model_kwargs = {}
    if mtp:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        from nemo_lossfree.testing.models import gpt_moe_layer_spec

        model_kwargs["mtp_block_spec"] = get_gpt_mtp_block_spec(
            config, gpt_moe_layer_spec(8), use_transformer_engine=False
        )
    model = gpt_moe_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, **model_kwargs)
    tensor_parallel = config.tensor_model_parallel_size > 1
    if tensor_parallel:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    lf_config = LossFreeConfig(**lf)
    balancer = LossFreeBalancer(model, lf_config)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tp_replicas_differ = []
    # Different data on every data-parallel rank (TP ranks of a group share it).
    dp_rank = parallel_state.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(100 + dp_rank)
    micro_batches = 2
    # Every data-parallel replica routes its micro-batches' tokens once (MTP
    # layers route them too, through their own routers).
    tokens_routed = parallel_state.get_data_parallel_world_size() * micro_batches * BATCH * SEQ
    collectives = []
    reference_integral = torch.zeros(len(balancer.routers), 8)
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
        for _ in range(micro_batches):
            loss = model(ids, pos, None, labels=ids).float().mean()
            loss.backward()
        if tensor_parallel:
            finalize_model_grads([model])  # Megatron's: before the balancer, as in its schedules
        calls, reference_integral = step_and_check(
            balancer, lf_config, step, reference_integral, tokens_routed
        )
        collectives.append(calls)
        if tensor_parallel:
            with torch.no_grad():  # SGD on DDP's gradient buffers
                for param in model.parameters():
                    param.add_(param.main_grad, alpha=-LR)
            model.zero_grad_buffer()
            tp_replicas_differ.append(replicas_that_differ(model, parallel_state.get_tensor_model_parallel_group()))
        else:
            opt.step()
            opt.zero_grad()
    biases = torch.stack([r.expert_bias for r in balancer.routers])
    return {
        "biases": biases,
        "collectives": collectives,
        "group_ranks": dist.get_process_group_ranks(balancer.process_group),
        "num_routers": len(balancer.routers),
        "metrics": balancer.last_metrics,
        "steps_done": balancer.steps_done,
        "tp_replicas_differ": tp_replicas_differ,
        # Where the experts went: expert tensor parallel size, EP group, experts per rank.
        "expert_layout": (
            parallel_state.get_expert_tensor_parallel_world_size(),
            dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()),
            {m.num_local_experts for m in model.modules() if hasattr(m, "num_local_experts")},
        ),
    }


def replicas_that_differ(model, group) -> list[str]:
    """Names of the parameters replicated over ``group`` (not sharded) that are not bit-identical across it."""
    differ = []
    for name, param in model.named_parameters():
        if getattr(param, "tensor_model_parallel", False):
            continue
        parts = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, param.detach().contiguous(), group=group)
        if not all(torch.equal(parts[0], part) for part in parts[1:]):
            differ.append(name)
    return differ


def route_context_parallel_parts(rank: int, lf: dict, steps: int) -> dict:
    """Context parallelism: MoE layers fed this rank's part of every sequence.

    Megatron-Core's local attention refuses context parallelism on the CPU,
    so the layers here are the MoE layers alone (LossFreeRouter, experts),
    fed hidden states split the way Megatron-LM splits a batch
    (``get_batch_on_this_cp_rank``: zigzag chunks). Besides the balancer
    checks, the counts summed over the context-parallel ranks must equal
    those of the whole sequences routed on one rank.
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from nemo_lossfree.testing.models import gpt_moe_layer_spec

    # megatron-core 0.19 added is_hybrid_cp (required) and cp_group; older minors
    # take the batch alone and use parallel_state's context-parallel group.
    accepted = inspect.signature(get_batch_on_this_cp_rank).parameters

    config = moe_transformer_config(num_layers=2, num_experts=8, topk=2, context_parallel_size=2)
    build_moe_layer = gpt_moe_layer_spec(8).submodules.mlp  # partial(MoELayer, ...)
    layers = torch.nn.ModuleList()
    for i in range(config.num_layers):
        layers.append(build_moe_layer(config=config))
        layers[-1].set_layer_number(i + 1)  # as TransformerLayer does
    for param in layers.parameters():  # one replica: the same weights on every rank
        dist.broadcast(param.data, src=0)
    lf_config = LossFreeConfig(**lf)
    balancer = LossFreeBalancer(layers, lf_config)
    cp_group = parallel_state.get_context_parallel_group()
    cp_kwargs = {k: v for k, v in {"is_hybrid_cp": False, "cp_group": cp_group}.items() if k in accepted}
    gen = torch.Generator().manual_seed(100 + parallel_state.get_data_parallel_rank())
    micro_batches = 2
    tokens_routed = parallel_state.get_data_parallel_world_size() * micro_batches * BATCH * SEQ
    collectives, parts_match_whole = [], []
    for step in range(steps):
        whole_counts = torch.zeros(config.num_layers, 8, dtype=torch.float64)
        for _ in range(micro_batches):
            whole_BSH = torch.randn(BATCH, SEQ, config.hidden_size, generator=gen)
            part_BSH = get_batch_on_this_cp_rank({"hidden_states": whole_BSH}, **cp_kwargs)["hidden_states"]
            assert part_BSH.shape[1] == SEQ // 2
            hidden_SBH = part_BSH.transpose(0, 1).contiguous()
            whole_SBH = whole_BSH.transpose(0, 1).contiguous()
            loss = 0.0
            for j, layer in enumerate(layers):
                with torch.no_grad():  # no_grad routing counts nothing: the reference
                    _, routing_map = layer.router(whole_SBH)
                whole_counts[j] += routing_map.sum(0)
                output, _ = layer(hidden_SBH)
                loss = loss + output.float().square().mean()
            loss.backward()
        parts_match_whole.append(torch.equal(gathered(balancer.routers, cp_group), whole_counts))
        calls, _ = step_and_check(balancer, lf_config, step, None, tokens_routed)
        collectives.append(calls)
    return {
        "biases": torch.stack([r.expert_bias for r in balancer.routers]),
        "collectives": collectives,
        "group_ranks": dist.get_process_group_ranks(balancer.process_group),
        "parts_match_whole": parts_match_whole,
        "steps_done": balancer.steps_done,
    }


def pipeline_groups(rank: int) -> dict:
    """With PP=2 every stage owns its layers: the replica group excludes the other stage."""
    config = moe_transformer_config(
        num_layers=2, num_experts=8, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32
    )
    from megatron.core import parallel_state

    model = gpt_moe_model(
        config,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    balancer = LossFreeBalancer(model)
    return {
        "group_ranks": dist.get_process_group_ranks(balancer.process_group),
        "layers": [r.layer_number for r in balancer.routers],
    }


def save_then_load(rank: int, ckpt_dir: str, upstream_first: bool) -> dict:
    """Train, save with dist_checkpointing, load into a fresh model and balancer.

    With ``upstream_first`` the saved model uses Megatron-Core's own
    expert-bias router; it must load into ours under the same key.
    """
    from megatron.core import dist_checkpointing

    config = moe_transformer_config(num_layers=2, num_experts=8, expert_model_parallel_size=2)
    if upstream_first:
        saved_config = moe_transformer_config(
            num_layers=2, num_experts=8, expert_model_parallel_size=2, expert_bias=True
        )
        source = gpt_moe_model(saved_config, vocab_size=VOCAB, max_sequence_length=SEQ, loss_free=False)
    else:
        source = gpt_moe_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    balancer = (
        None if upstream_first else LossFreeBalancer(source, LossFreeConfig(update_rule="sign", update_rate=1e-2))
    )
    gen = torch.Generator().manual_seed(rank)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
        source(ids, pos, None, labels=ids).float().mean().backward()
        if balancer is not None:
            balancer.step()
        else:  # Megatron-Core's own update path
            from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

            _update_router_expert_bias([source], saved_config)
    saved_biases = {
        k: v.clone() for k, v in source.state_dict().items() if k.endswith("router.expert_bias")
    }
    state = {"model": source.sharded_state_dict()}
    if balancer is not None:
        state["lossfree"] = balancer.state_dict()
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, ckpt_dir)

    target = gpt_moe_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    restored_balancer = LossFreeBalancer(target, LossFreeConfig(update_rule="sign", update_rate=1e-2))
    template = {"model": target.sharded_state_dict()}
    if balancer is not None:
        template["lossfree"] = restored_balancer.state_dict()
    # A checkpoint of Megatron-Core's own router has no balancer state (the
    # router's _extra_state): load it non-strictly, as Megatron-LM's
    # --dist-ckpt-strictness log_unexpected does; the router then restarts it.
    strict = "log_unexpected" if upstream_first else "assume_ok_unexpected"
    loaded = dist_checkpointing.load(template, ckpt_dir, strict=strict)
    target.load_state_dict(loaded["model"])
    if "lossfree" in loaded:
        restored_balancer.load_state_dict(loaded["lossfree"])
    restored = {k: v for k, v in target.state_dict().items() if k.endswith("router.expert_bias")}
    return {
        "saved": saved_biases,
        "restored": restored,
        "steps_done": restored_balancer.steps_done,
        "dtypes": sorted({str(v.dtype) for v in restored.values()}),
    }


def resume_mid_schedule(rank: int, ckpt_dir: str, lf: dict) -> dict:
    """Train 3 steps, save only the model through dist_checkpointing, resume in a fresh model.

    The uninterrupted run is the saved model carrying on for 3 more steps; the
    resumed one loads the checkpoint (no balancer side file) into a fresh model
    and balancer and trains the same 3 batches. Returns both runs' biases and
    routers' ``_extra_state`` (step counter, drift integral, adaptive gain).
    """
    from megatron.core import dist_checkpointing

    config = moe_transformer_config(num_layers=2, num_experts=8, expert_model_parallel_size=2)
    settings = LossFreeConfig(**lf)

    def train(model, balancer, steps):
        for step in steps:
            gen = torch.Generator().manual_seed(100 * step + rank)
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
            pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
            model(ids, pos, None, labels=ids).float().mean().backward()
            balancer.step()

    def routers_state(model):
        routers = [m for m in model.modules() if type(m).__name__ == "LossFreeRouter"]
        return [{"bias": r.expert_bias.clone(), **{k: v for k, v in r.get_extra_state().items() if k != "format"}}
                for r in routers]

    source = gpt_moe_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    source_balancer = LossFreeBalancer(source, settings)
    train(source, source_balancer, range(3))
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": source.sharded_state_dict()}, ckpt_dir)
    at_save = routers_state(source)
    train(source, source_balancer, range(3, 6))

    target = gpt_moe_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    target_balancer = LossFreeBalancer(target, settings)
    loaded = dist_checkpointing.load({"model": target.sharded_state_dict()}, ckpt_dir)
    target.load_state_dict(loaded["model"])
    steps_at_load = target_balancer.steps_done
    train(target, target_balancer, range(3, 6))
    return {
        "at_save": at_save,
        "straight": routers_state(source),
        "resumed": routers_state(target),
        "steps_at_load": steps_at_load,
        "steps": (source_balancer.steps_done, target_balancer.steps_done),
    }
