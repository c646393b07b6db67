"""Megatron-LM's ``pretrain_gpt.py`` with auxiliary-loss-free load balancing.

Put this file next to ``pretrain_gpt.py`` in a Megatron-LM checkout (it imports
that script's providers) and launch it exactly as you launch
``pretrain_gpt.py``, with the MoE flags plus::

    --moe-router-load-balancing-type loss_free \
    --lossfree-update-rate 1e-3 --lossfree-update-rule sign --lossfree-schedule constant

(``--moe-router-load-balancing-type loss_free seq_aux_loss --moe-aux-loss-coeff 1e-4``
keeps a small sequence-level aux loss beside it, as DeepSeek-V3 did; every
``--lossfree-*`` flag is listed by ``--help``.) Without those flags the script
trains exactly what ``pretrain_gpt.py`` trains.

The only differences from ``pretrain_gpt.py``'s ``__main__`` block are the two
marked lines: the ``extra_args_provider`` and the wrapped model provider.
Everything else (the balancer inside ``finalize_model_grads``, its
``lossfree/...`` metrics in TensorBoard / W&B, the expert biases in Megatron's
checkpoints, the balancer's step on resume) follows from them; see
``nemo_lossfree.integrations.megatron_lm``.
"""

from functools import partial

import pretrain_gpt  # Megatron-LM's script, imported as a module (its main is guarded)
from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args

from nemo_lossfree.integrations import megatron_lm as lossfree

if __name__ == "__main__":
    args = parse_and_validate_args(
        extra_args_provider=lossfree.add_lossfree_args,  # (1) --lossfree-* flags, loss_free type
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
    )
    # pretrain_gpt.py passes its model provider bound to its GPT builder.
    model_provider = partial(pretrain_gpt.model_provider, pretrain_gpt.gpt_builder)
    pretrain(
        pretrain_cfg_container_from_args(args),
        pretrain_gpt.train_valid_test_datasets_provider,
        lossfree.wrap_model_provider(model_provider),  # (2) LossFreeRouter + balancer
        ModelType.encoder_or_decoder,
        pretrain_gpt.forward_step,
    )
