"""LossFreeBalancer on one rank: grouping, skipping, errors, Megatron's training schedule."""

import logging
import math

import pytest
import torch

from nemo_lossfree import LossFreeBalancer, LossFreeConfig
from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config
from nemo_lossfree.update import compute_bias_update

from _support.routers import quantile_batch, routers_with_expert_counts


def test_layers_with_different_expert_counts(pg_collection):
    model = routers_with_expert_counts(pg_collection, [8, 16, 8])
    balancer = LossFreeBalancer(model, LossFreeConfig(update_rule="sign", update_rate=0.1, center=False))
    counts = [torch.arange(8.0), torch.arange(16.0).flip(0), torch.full((8,), 3.0)]
    for router, c in zip(model, counts):
        router.local_tokens_per_expert.copy_(c)
    metrics = balancer.step()
    for router, c in zip(model, counts):
        expected = compute_bias_update(c, torch.zeros_like(c), rate=0.1)
        assert torch.equal(router.expert_bias, expected)
        assert router.local_tokens_per_expert.sum() == 0
    assert metrics["lossfree/maxvio_batch_layer_1"] == pytest.approx((7 - 3.5) / 3.5)
    assert metrics["lossfree/maxvio_batch_layer_3"] == 0.0
    assert balancer.steps_done == 1


def test_layer_without_tokens_keeps_its_bias(pg_collection):
    model = routers_with_expert_counts(pg_collection, [8, 8])
    balancer = LossFreeBalancer(model, LossFreeConfig(update_rule="sign", update_rate=0.1, center=True))
    model[0].expert_bias.copy_(torch.linspace(-1, 1, 8))
    model[1].local_tokens_per_expert.copy_(torch.arange(8.0))
    balancer.step()
    assert torch.equal(model[0].expert_bias, torch.linspace(-1, 1, 8))
    assert model[1].expert_bias.abs().sum() > 0


def test_non_finite_counts_never_touch_a_bias_and_raise_on_the_logging_step(pg_collection, caplog):
    # The check was an `if` on the device's answer: a host synchronisation every step.
    model = routers_with_expert_counts(pg_collection, [8, 8])
    # The quantile rule: histograms travel with the counts.
    balancer = LossFreeBalancer(model, LossFreeConfig(schedule="constant", update_rate=0.5))
    for seed, router in enumerate(model):
        quantile_batch(router, seed)
    model[1].local_tokens_per_expert[3] = float("nan")
    finite = model[0]
    expected = compute_bias_update(finite.local_tokens_per_expert.double(), finite.expert_bias.clone(), rate=0.5,
                                   rule="quantile", center=True, histogram=finite.local_margin_histogram.double())
    caplog.set_level(logging.WARNING, logger="nemo_lossfree.balancer")
    with pytest.raises(FloatingPointError, match=r"non-finite expert counts after the all-reduce in 1 step"):
        balancer.step()
    assert torch.equal(model[0].expert_bias, expected) and expected.abs().sum() > 0  # the finite layer moved
    assert model[1].expert_bias.abs().sum() == 0  # the other kept its bias
    for router in model:
        assert router.local_tokens_per_expert.abs().sum() == 0
        assert router.local_margin_histogram.abs().sum() == 0
    assert balancer.steps_done == 1  # a step of the schedule all the same
    assert math.isnan(balancer.last_metrics["lossfree/maxvio_batch_layer_2"])
    warnings_seen = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_seen) == 1 and "kept their bias" in warnings_seen[0].getMessage()

    for seed, router in enumerate(model):
        quantile_batch(router, seed + 10)
    expected = [
        compute_bias_update(r.local_tokens_per_expert.double(), r.expert_bias.clone(), rate=0.5, rule="quantile",
                            center=True, histogram=r.local_margin_histogram.double())
        for r in model
    ]
    metrics = balancer.step()
    assert balancer.steps_done == 2 and "lossfree/maxvio_batch" in metrics
    for router, bias in zip(model, expected):
        assert router.expert_bias.abs().sum() > 0
        assert torch.equal(router.expert_bias, bias)


def test_non_finite_counts_are_reported_on_the_next_logging_step(pg_collection):
    model = routers_with_expert_counts(pg_collection, [8])
    balancer = LossFreeBalancer(model, LossFreeConfig(update_rule="sign", update_rate=0.1, log_every=3))
    seen = []
    for step in range(5):
        model[0].local_tokens_per_expert.copy_(torch.arange(8.0))
        if step == 1:
            model[0].local_tokens_per_expert[0] = float("inf")
        before = model[0].expert_bias.clone()
        try:
            seen.append(sorted(balancer.step())[:1])
        except FloatingPointError as error:
            seen.append(str(error))
        assert torch.equal(model[0].expert_bias, before) == (step == 1)
    assert seen[:3] == [["lossfree/bias_max"], [], []]
    assert seen[3].startswith("LossFreeBalancer.step: non-finite expert counts after the all-reduce in 1 step(s)")
    assert seen[4] == []  # said once


def test_resumes_bit_exactly_from_the_models_own_state_dict(pg_collection):
    # The step counter, the drift integral and the adaptive gain are model
    # state: a fresh model and balancer loading model.state_dict() continue
    # exactly where an uninterrupted run goes.
    for config in (
        LossFreeConfig(update_rule="proportional", update_rate=0.1, schedule="inverse_time", decay_steps=2,
                       integral_gain=0.5, integral_decay=0.9),
        LossFreeConfig(schedule="adaptive", update_rate=0.9, min_update_rate=0.05),
    ):
        def run(model, balancer, steps, start):
            for step in range(start, start + steps):
                for index, router in enumerate(model):
                    quantile_batch(router, seed=100 * step + index)
                balancer.step()

        straight = routers_with_expert_counts(pg_collection, [8, 16])
        straight_balancer = LossFreeBalancer(straight, config)
        run(straight, straight_balancer, 6, 0)

        first = routers_with_expert_counts(pg_collection, [8, 16])
        run(first, LossFreeBalancer(first, config), 3, 0)
        saved = first.state_dict()
        resumed = routers_with_expert_counts(pg_collection, [8, 16])
        resumed_balancer = LossFreeBalancer(resumed, config)
        resumed.load_state_dict(saved)
        assert resumed_balancer.steps_done == 3
        run(resumed, resumed_balancer, 3, 3)
        for mine, want in zip(resumed, straight):
            assert torch.equal(mine.expert_bias, want.expert_bias)
            for key, value in want.get_extra_state().items():
                assert torch.equal(torch.as_tensor(mine.get_extra_state()[key]), torch.as_tensor(value)), key
        assert resumed_balancer.steps_done == straight_balancer.steps_done == 6
        moved = {k: v for k, v in straight[0].get_extra_state().items() if k in ("integral", "previous")}
        assert any(v.abs().sum() > 0 for v in moved.values())  # the state compared is not all zeros


def test_a_checkpoint_without_the_state_loads_and_says_what_restarts(pg_collection, caplog):
    # Megatron-Core's own expert-bias router saved it (no _extra_state), strict load.
    from megatron.core.transformer.moe.router import TopKRouter

    upstream = TopKRouter(moe_transformer_config(num_layers=1, num_experts=8, topk=2, expert_bias=True),
                          pg_collection=pg_collection)
    upstream.expert_bias.copy_(torch.linspace(-1, 1, 8))
    saved = upstream.state_dict()
    assert "_extra_state" not in saved
    model = routers_with_expert_counts(pg_collection, [8])
    cfg = LossFreeConfig(update_rule="sign", update_rate=0.1, integral_gain=0.5)
    balancer = LossFreeBalancer(model, cfg)
    model[0].load_state_dict(saved)  # strict: no error for the missing state
    assert torch.equal(model[0].expert_bias, torch.linspace(-1, 1, 8))
    assert model[0].balancer_state_loaded is False
    caplog.set_level(logging.WARNING, logger="nemo_lossfree.balancer")
    balancer.continue_from_iteration(7)  # Megatron-LM / Bridge resume at iteration 7
    assert balancer.steps_done == 7
    assert "continues from step 7 (the training iteration); the drift integral restarts from zero" in caplog.text
    model[0].local_tokens_per_expert.copy_(torch.arange(8.0))
    balancer.step()
    assert caplog.text.count("holds no balancer state") == 1  # said once
    # A checkpoint with the state: the iteration is not needed.
    saved = model.state_dict()
    fresh = routers_with_expert_counts(pg_collection, [8])
    fresh_balancer = LossFreeBalancer(fresh, cfg)
    fresh.load_state_dict(saved)
    fresh_balancer.continue_from_iteration(99)
    assert fresh_balancer.steps_done == 8
    assert torch.equal(fresh_balancer.integrals[0], balancer.integrals[0]) and balancer.integrals[0].abs().sum() > 0


def test_extra_state_of_another_expert_count_is_refused(pg_collection):
    saved = routers_with_expert_counts(pg_collection, [8]).state_dict()
    other = routers_with_expert_counts(pg_collection, [16])
    with pytest.raises(ValueError, match=r"_extra_state\['integral'\]: 8 values, this router holds 16"):
        other[0].set_extra_state(saved["0._extra_state"])
    with pytest.raises(ValueError, match=r"_extra_state: must be a balancer state of format 1, got 'dict'|got None"):
        other[0].set_extra_state({"steps": torch.zeros(1)})


def test_frozen_and_eval_routers_are_left_alone(pg_collection):
    model = routers_with_expert_counts(pg_collection, [8, 8])
    balancer = LossFreeBalancer(model, LossFreeConfig(update_rule="sign", update_rate=0.1))
    for router in model:
        router.local_tokens_per_expert.copy_(torch.arange(8.0))
    model[0].frozen_expert_bias = True  # Megatron-LM's --freeze-all-layers sets this
    balancer.step()
    assert model[0].expert_bias.abs().sum() == 0 and model[1].expert_bias.abs().sum() > 0
    model.eval()
    assert balancer.step() == {}


def test_schedule_and_log_every(pg_collection):
    model = routers_with_expert_counts(pg_collection, [8])
    cfg = LossFreeConfig(update_rule="sign", update_rate=0.1, schedule="inverse_time", decay_steps=1, log_every=2,
                         center=False)
    balancer = LossFreeBalancer(model, cfg)
    seen = []
    for _ in range(4):
        model[0].local_tokens_per_expert.copy_(torch.arange(8.0))
        seen.append(balancer.step().get("lossfree/update_rate"))
    assert seen == [pytest.approx(0.1), None, pytest.approx(0.1 / 3), None]


def test_frozen_bias_stays_bit_exact_even_with_centering(pg_collection):
    model = routers_with_expert_counts(pg_collection, [8])
    balancer = LossFreeBalancer(
        model, LossFreeConfig(update_rule="sign", update_rate=0.1, center=True, freeze_after_steps=2)
    )
    # Values whose mean is not exact in float32: re-centering them moves bits.
    model[0].expert_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(0)) / 3)
    for _ in range(2):
        model[0].local_tokens_per_expert.copy_(torch.tensor([1.0, 2, 3, 5, 7, 11, 13, 17]))
        balancer.step()
    frozen = model[0].expert_bias.clone()
    assert frozen.abs().sum() > 0
    for _ in range(3):
        model[0].local_tokens_per_expert.copy_(torch.tensor([1.0, 2, 3, 5, 7, 11, 13, 17]))
        metrics = balancer.step()
        assert torch.equal(model[0].expert_bias, frozen)
        assert metrics["lossfree/update_rate"] == 0.0
        assert model[0].local_tokens_per_expert.sum() == 0


def test_requires_a_loss_free_router(pg_collection):
    with pytest.raises(ValueError, match="no LossFreeRouter found"):
        LossFreeBalancer(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config: must be a LossFreeConfig"):
        LossFreeBalancer(routers_with_expert_counts(pg_collection, [8]), {"update_rate": 1e-3})


def test_state_dict_round_trip(pg_collection, caplog):
    model = routers_with_expert_counts(pg_collection, [8])
    balancer = LossFreeBalancer(model, LossFreeConfig(update_rule="sign", update_rate=0.1))
    for _ in range(3):
        balancer.step()
    state = balancer.state_dict()
    assert state["steps_done"] == 3
    resumed = LossFreeBalancer(model, LossFreeConfig(update_rule="sign", update_rate=0.1))
    resumed.load_state_dict(state)
    assert resumed.steps_done == 3
    changed = LossFreeBalancer(model, LossFreeConfig(update_rule="sign", update_rate=0.2))
    changed.load_state_dict(state)
    assert "differs from the checkpoint" in caplog.text


def test_load_state_dict_names_a_missing_key(pg_collection):
    balancer = LossFreeBalancer(routers_with_expert_counts(pg_collection, [8]))
    with pytest.raises(ValueError, match=r"^state\['steps_done'\]: missing; "):
        balancer.load_state_dict({})
    assert balancer.steps_done == 0


@pytest.mark.parametrize("value", [True, 1, "true", "false", "0", ""])
def test_refuses_megatron_expert_bias_flag_unless_plainly_off(pg_collection, value):
    # Megatron-Core's finalize_model_grads updates every router's expert_bias when the
    # flag is truthy ("false" is); only False, None and 0 are plainly off.
    model = routers_with_expert_counts(pg_collection, [8, 8])
    model[1].config.moe_router_enable_expert_bias = value
    with pytest.raises(ValueError, match=r"^moe_router_enable_expert_bias: must be false"):
        LossFreeBalancer(model)
    for off in (False, None, 0):
        model[1].config.moe_router_enable_expert_bias = off
        LossFreeBalancer(model)


def test_runs_inside_megatron_schedule_through_finalize_model_grads(single_rank):
    """attach() puts the update in Megatron's own training step (DDP + schedule)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = moe_transformer_config(num_layers=2, num_experts=8, topk=2)
    model = gpt_moe_model(config, vocab_size=64, max_sequence_length=16)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    balancer = LossFreeBalancer(ddp, LossFreeConfig(update_rule="sign", update_rate=1e-2)).attach(config)
    assert balancer.attach(config) is balancer  # attaching twice wraps once
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield torch.randint(0, 64, (2, 16), generator=gen)

    def forward_step(data_iterator, module):
        ids = next(data_iterator)
        pos = torch.arange(16).unsqueeze(0).expand(2, 16)
        output = module(ids, pos, None, labels=ids)
        return output, lambda out: (out.float().mean(), {})

    seen_counts = []
    original_step = balancer.step

    def spy():
        seen_counts.append(sum(r.local_tokens_per_expert.sum().item() for r in balancer.routers))
        return original_step()

    balancer.step = spy
    forward_backward = get_forward_backward_func()
    for _ in range(2):
        forward_backward(
            forward_step_func=forward_step, data_iterator=batches(), model=[ddp],
            num_microbatches=3, seq_length=16, micro_batch_size=2, forward_only=False,
        )
    # One update per global batch; 3 micro-batches x 32 tokens x top-2 x 2 layers counted.
    assert balancer.steps_done == 2
    assert seen_counts == [3 * 32 * 2 * 2] * 2
    assert any(r.expert_bias.abs().sum() > 0 for r in balancer.routers)
    # forward_only (evaluation) neither counts nor updates.
    forward_backward(
        forward_step_func=forward_step, data_iterator=batches(), model=[ddp],
        num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=True,
    )
    assert balancer.steps_done == 2
    assert all(r.local_tokens_per_expert.sum() == 0 for r in balancer.routers)


def test_integral_term_is_state_that_round_trips(pg_collection):
    counts = torch.tensor([1.0, 2, 3, 5, 7, 11, 13, 17])
    cfg = LossFreeConfig(update_rate=0.1, update_rule="proportional", integral_gain=0.5, integral_decay=0.9)

    def run(balancer, model, steps):
        for _ in range(steps):
            model[0].local_tokens_per_expert.copy_(counts)
            balancer.step()

    straight_model = routers_with_expert_counts(pg_collection, [8])
    straight = LossFreeBalancer(straight_model, cfg)
    run(straight, straight_model, 5)

    model = routers_with_expert_counts(pg_collection, [8])
    first = LossFreeBalancer(model, cfg)
    run(first, model, 2)
    state = first.state_dict()
    assert state["integrals"][0].abs().sum() > 0
    resumed = LossFreeBalancer(model, cfg)
    resumed.load_state_dict(state)
    run(resumed, model, 3)
    assert torch.equal(model[0].expert_bias, straight_model[0].expert_bias)
    assert torch.equal(resumed.integrals[0], straight.integrals[0])

    # Same counts every step: the steps keep their sign, so the integral moves
    # the bias further than the plain rule does.
    plain_model = routers_with_expert_counts(pg_collection, [8])
    plain = LossFreeBalancer(plain_model, LossFreeConfig(update_rate=0.1, update_rule="proportional"))
    run(plain, plain_model, 5)
    assert "integrals" not in plain.state_dict()
    assert (straight_model[0].expert_bias.abs() > plain_model[0].expert_bias.abs()).all()

    wrong = LossFreeBalancer(routers_with_expert_counts(pg_collection, [16]), cfg)
    with pytest.raises(ValueError, match=r"state\['integrals'\]: shapes \[\(8,\)\] do not match"):
        wrong.load_state_dict(state)


def test_frozen_bias_keeps_its_integral(pg_collection):
    model = routers_with_expert_counts(pg_collection, [8])
    cfg = LossFreeConfig(update_rule="sign", update_rate=0.1, integral_gain=0.5, freeze_after_steps=2)
    balancer = LossFreeBalancer(model, cfg)
    for _ in range(4):
        model[0].local_tokens_per_expert.copy_(torch.tensor([1.0, 2, 3, 5, 7, 11, 13, 17]))
        balancer.step()
        if balancer.steps_done == 2:
            bias, integral = model[0].expert_bias.clone(), balancer.integrals[0].clone()
    # A decaying integral would still move a frozen bias: nothing moves.
    assert torch.equal(model[0].expert_bias, bias)
    assert torch.equal(balancer.integrals[0], integral)
