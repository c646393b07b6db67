"""The balancer across real gloo ranks: one all-reduce, identical biases everywhere."""

import torch

from nemo_lossfree.testing.distributed import run_on_ranks

from _support import dist_workers

STEPS = 4


def check_replicas_agree(results, num_routers):
    first = results[0]["biases"]
    assert first.shape[0] == num_routers
    assert first.abs().sum() > 0  # the bias did move
    for result in results[1:]:
        assert torch.equal(result["biases"], first)
    for result in results:
        assert result["steps_done"] == STEPS
        # Exactly one collective per step, an all-reduce, for all layers together.
        assert result["collectives"] == [["all_reduce"]] * STEPS


def test_expert_parallel_2_with_mtp():
    lf = dict(update_rate=1e-2, update_rule="sign", center=True)
    parallel = dict(expert_model_parallel_size=2)
    results = run_on_ranks(
        dist_workers.train_and_check, 2, parallel, lf, STEPS, True, expert_model_parallel_size=2
    )
    check_replicas_agree(results, num_routers=3)  # 2 decoder layers + 1 MTP layer
    assert results[0]["group_ranks"] == [0, 1]
    assert set(results[0]["metrics"]) >= {
        "lossfree/maxvio_batch", "lossfree/maxvio_batch_layer_1", "lossfree/maxvio_batch_layer_3",
        "lossfree/bias_std", "lossfree/update_rate",
        # EP 2: Megatron's placement of 8 experts; router health in the same single all-reduce.
        "lossfree/ep_overload_layer_1", "lossfree/ep_overload_layer_3", "lossfree/topk_overlap_layer_3",
        "lossfree/topk_margin", "lossfree/maxvio_seq", "lossfree/maxvio_unbiased", "lossfree/load_p95",
    }
    assert results[1]["metrics"] == results[0]["metrics"]  # from the reduced counts: the same everywhere


def test_expert_parallel_2_inside_data_parallel_4():
    # 4 ranks, EP=2: expert groups {0,1} and {2,3}. Every rank holds a replica
    # of each router, so the reduction must span all four, not the EP group.
    # With the drift integral: it is replicated state too, and must agree everywhere.
    lf = dict(update_rate=1e-2, update_rule="proportional", center=False, schedule="inverse_time",
              decay_steps=2, integral_gain=0.5, integral_decay=0.9)
    parallel = dict(expert_model_parallel_size=2)
    results = run_on_ranks(
        dist_workers.train_and_check, 4, parallel, lf, STEPS, False, expert_model_parallel_size=2
    )
    check_replicas_agree(results, num_routers=2)
    assert results[0]["group_ranks"] == [0, 1, 2, 3]


def test_tensor_parallel_2_with_sequence_parallelism():
    # Megatron-Core requires sequence parallelism for MoE with TP > 1: each TP
    # rank routes its half of the sequence, so the TP ranks' counts differ and
    # the reduction must sum them (testing.models' SequenceParallelTorchNorm
    # stands in for Transformer Engine's norms, which torch's refuse to).
    lf = dict(update_rate=1e-2, update_rule="sign", center=True)
    parallel = dict(tensor_model_parallel_size=2)
    results = run_on_ranks(
        dist_workers.train_and_check, 2, parallel, lf, STEPS, False, tensor_model_parallel_size=2
    )
    check_replicas_agree(results, num_routers=2)
    assert results[0]["group_ranks"] == [0, 1]
    # Router and norm weights: the same on both TP ranks after every step.
    assert all(r["tp_replicas_differ"] == [[]] * STEPS for r in results)


def test_tensor_parallel_2_by_expert_parallel_2_with_sequence_parallelism():
    # 4 ranks: TP groups {0,1} {2,3}, each TP rank routing its half of the
    # sequences (SP), two data-parallel replicas, and the 8 experts split over
    # EP=2 with Megatron-Core's default expert tensor parallelism (ETP = TP = 2,
    # each expert's weights sharded over the TP ranks). The routers are on all
    # four ranks, so the reduction spans all four; the allgather dispatcher
    # works under gloo (alltoall needs list split sizes).
    lf = dict(update_rate=1e-2, update_rule="sign", center=True)
    parallel = dict(tensor_model_parallel_size=2, expert_model_parallel_size=2)
    results = run_on_ranks(dist_workers.train_and_check, 4, parallel, lf, STEPS, False, **parallel)
    check_replicas_agree(results, num_routers=2)
    assert results[0]["group_ranks"] == [0, 1, 2, 3]
    # Expert TP 2 (not given: Megatron-Core's default), EP pairs across the TP groups, 4 experts a rank.
    assert [r["expert_layout"] for r in results] == [
        (2, [0, 2], {4}), (2, [1, 3], {4}), (2, [0, 2], {4}), (2, [1, 3], {4})
    ]
    assert all(r["tp_replicas_differ"] == [[]] * STEPS for r in results)


def test_context_parallel_2_routes_each_ranks_part_of_the_sequences():
    lf = dict(update_rate=1e-2, update_rule="sign", center=True)
    results = run_on_ranks(
        dist_workers.route_context_parallel_parts, 2, lf, STEPS, context_parallel_size=2
    )
    check_replicas_agree(results, num_routers=2)
    assert results[0]["group_ranks"] == [0, 1]
    assert all(r["parts_match_whole"] == [True] * STEPS for r in results)


def test_quantile_rule_uses_the_global_batch_histogram():
    # EP=2 inside DP=4, two micro-batches per rank: the quantile is of all
    # eight micro-batches' tokens (the worker checks every update against the
    # histograms gathered from all ranks), in the same single all-reduce.
    lf = dict(update_rate=0.5, update_rule="quantile", center=True)
    parallel = dict(expert_model_parallel_size=2)
    results = run_on_ranks(
        dist_workers.train_and_check, 4, parallel, lf, STEPS, False, expert_model_parallel_size=2
    )
    check_replicas_agree(results, num_routers=2)


def test_no_reduction_across_pipeline_stages():
    results = run_on_ranks(dist_workers.pipeline_groups, 2, pipeline_model_parallel_size=2)
    assert [r["group_ranks"] for r in results] == [[0], [1]]
    assert [r["layers"] for r in results] == [[1], [2]]
