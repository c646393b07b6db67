"""Pretrain a GPT-MoE with Megatron-LM's training loop and loss-free load balancing.

Needs only the megatron-core wheel (it ships ``megatron.training``) and this
package; no Megatron-LM checkout. Launch it like Megatron-LM's
``pretrain_gpt.py``, with the MoE flags and ``--moe-router-load-balancing-type none``
plus::

    --lossfree --lossfree-update-rate 1e-3 --lossfree-update-rule sign --lossfree-schedule constant

(``--moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4``
keeps a small sequence-level aux loss beside it, as DeepSeek-V3 did; every
``--lossfree-*`` flag is listed by ``--help``. Use ``--lossfree`` rather than
the ``loss_free`` balancing type here: ``pretrain()`` parses the command line
again with Megatron's parser alone, which rejects that value.) Without those flags the script
trains exactly what Megatron-LM would. A complete command for one GPU node is
in docs/megatron_lm.md; ``--mock-data`` trains on Megatron's mock GPT dataset,
``--data-path`` on your own.

Loss-free balancing is the two lines marked (1) and (2); the same two lines
turn Megatron-LM's own ``pretrain_gpt.py`` into a loss-free run. Everything
else (the balancer inside ``finalize_model_grads``, its ``lossfree/...``
metrics in TensorBoard / W&B, the expert biases and the balancer's step in
Megatron's checkpoints) follows from them; see
``nemo_lossfree.integrations.megatron_lm``. The rest is a minimal GPT
pretraining script on Megatron's public API: batches, loss, datasets.
"""

import os
from functools import partial

import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
from megatron.training import get_args, get_tokenizer, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args
from megatron.training.models.gpt import GPTModelBuilder
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

from nemo_lossfree.integrations import megatron_lm as lossfree

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """GPTModel from the command line, through Megatron's own GPT builder."""
    model_config = gpt_config_from_args(get_args())
    return GPTModelBuilder(model_config).build_model(pg_collection, pre_process, post_process, vp_stage)


def get_batch(data_iterator, vp_stage=None):
    """This rank's micro-batch: read on tensor-parallel rank 0, broadcast, split for context parallelism."""
    args = get_args()
    if not is_first_or_last_pipeline_stage(vp_stage):
        return (None,) * len(BATCH_KEYS)
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        batch = {k: v.cuda(non_blocking=True) for k, v in next(data_iterator).items() if k in BATCH_KEYS}
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=args.mtp_num_layers is not None,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())
    return tuple(batch.get(k) for k in BATCH_KEYS)


def loss_func(loss_mask, output_tensor):
    """Summed token loss and token count: Megatron averages over the global batch."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    vp_stage = getattr(model, "vp_stage", None)
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's GPT datasets; its mock dataset with --mock-data."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset

    def built_on_this_rank():
        return is_first_or_last_pipeline_stage(vp_stage) and mpu.get_tensor_model_parallel_rank() == 0

    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, built_on_this_rank, config
    ).build()


def use_shipped_dataset_helpers():
    """Skip ``make`` of Megatron's dataset helpers where the wheel ships them compiled.

    ``initialize_megatron`` runs ``make -C megatron/core/datasets``; the
    megatron-core wheel has the compiled ``helpers_cpp`` there but no Makefile,
    so the make fails and rank 0 exits. A Megatron-LM checkout has the Makefile
    and compiles as usual.
    """
    from megatron.core.datasets import utils

    if not os.path.exists(os.path.join(os.path.dirname(utils.__file__), "Makefile")):
        import megatron.core.datasets.helpers_cpp  # noqa: F401  (fails loudly if absent too)

        utils.compile_helpers = lambda: None


def main():
    use_shipped_dataset_helpers()
    train_valid_test_datasets_provider.is_distributed = True  # every rank calls it
    args = parse_and_validate_args(
        extra_args_provider=lossfree.add_lossfree_args,  # (1) --lossfree-* flags, loss_free type
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=lossfree.wrap_model_provider(model_provider),  # (2) LossFreeRouter + balancer
    )


if __name__ == "__main__":
    main()
