import functools

import pytest
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.moe import router as upstream_router
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_lossfree.megatron_compat import missing_upstream_feature
from nemo_lossfree.router import LossFreeRouter
from nemo_lossfree.spec import use_loss_free_router
from nemo_lossfree.testing.models import moe_transformer_config


def routers_in(spec):
    found = []

    def walk(node):
        if isinstance(node, MoESubmodules):
            found.append(node.router)
        elif isinstance(node, functools.partial):
            list(map(walk, node.args))
            list(map(walk, node.keywords.values()))
        elif isinstance(node, ModuleSpec):
            walk(node.submodules)
        elif isinstance(node, (list, tuple)):
            list(map(walk, node))
        elif hasattr(node, "__dataclass_fields__") and not isinstance(node, type):
            for name in node.__dataclass_fields__:
                walk(getattr(node, name))

    walk(spec)
    return found


def moe_layer_spec(shape):
    """Upstream's local MoE layer spec with its MLP as ``shape`` ("partial" or "module_spec").

    megatron-core 0.18 and later build a ``functools.partial(MoELayer, ...)``,
    0.16 and 0.17 a ``ModuleSpec``; both reach users through older specs.
    """
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    mlp = spec.submodules.mlp
    submodules = mlp.keywords["submodules"] if isinstance(mlp, functools.partial) else mlp.submodules
    if shape == "partial":
        spec.submodules.mlp = functools.partial(MoELayer, submodules=submodules)
    else:
        spec.submodules.mlp = ModuleSpec(module=MoELayer, submodules=submodules)
    return spec


def test_upstream_layer_spec_as_built():
    spec = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    assert isinstance(spec.submodules.mlp, (functools.partial, ModuleSpec))
    new = use_loss_free_router(spec)
    assert routers_in(new) == [LossFreeRouter]
    assert routers_in(spec) == [TopKRouter]  # the input is not modified


def test_layer_spec_with_partial_mlp():
    spec = moe_layer_spec("partial")
    new = use_loss_free_router(spec)
    assert isinstance(new.submodules.mlp, functools.partial)
    assert routers_in(new) == [LossFreeRouter]
    assert routers_in(spec) == [TopKRouter]  # the input is not modified


def test_layer_spec_with_module_spec_mlp():
    spec = moe_layer_spec("module_spec")
    new = use_loss_free_router(spec)
    assert isinstance(new.submodules.mlp, ModuleSpec)
    assert new.submodules.mlp.submodules.router is LossFreeRouter
    assert routers_in(spec) == [TopKRouter]


def test_decoder_block_spec_with_dense_and_moe_layers(single_rank):
    config = moe_transformer_config(num_layers=4, num_experts=8, moe_layer_freq=[0, 1, 1, 0])
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    new = use_loss_free_router(block)
    assert routers_in(new) == [LossFreeRouter, LossFreeRouter]


def test_mtp_block_spec(single_rank):
    config = moe_transformer_config(num_layers=2, num_experts=8, mtp_num_layers=1)
    layer = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    mtp = get_gpt_mtp_block_spec(config, layer, use_transformer_engine=False)
    new = use_loss_free_router(mtp)
    assert routers_in(new) == [LossFreeRouter]


def test_dense_spec_is_refused():
    with pytest.raises(ValueError, match="no MoE layer"):
        use_loss_free_router(get_gpt_layer_local_spec())


class SinkhornRouter(TopKRouter):
    """A special router of a user's own spec (not the default TopKRouter)."""


@pytest.mark.parametrize("special", ["InferenceTopKRouter", "SinkhornRouter"])
def test_special_routers_are_not_replaced(special):
    if special == "InferenceTopKRouter" and (why := missing_upstream_feature(special)):
        pytest.skip(why)
    router = SinkhornRouter if special == "SinkhornRouter" else upstream_router.InferenceTopKRouter
    spec = moe_layer_spec("partial")
    subs = spec.submodules.mlp.keywords["submodules"]
    spec.submodules.mlp = functools.partial(
        MoELayer, submodules=MoESubmodules(experts=subs.experts, router=router)
    )
    with pytest.raises(ValueError, match=f"{special} cannot be replaced"):
        use_loss_free_router(spec)


def test_built_model_uses_the_router(single_rank):
    from nemo_lossfree.testing.models import gpt_moe_model

    config = moe_transformer_config(num_layers=2, num_experts=8)
    model = gpt_moe_model(config)
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 2 and all(isinstance(r, LossFreeRouter) for r in routers)
    assert [r.layer_number for r in routers] == [1, 2]
    keys = [k for k in model.state_dict() if k.endswith("router.expert_bias")]
    assert keys == ["decoder.layers.0.mlp.router.expert_bias", "decoder.layers.1.mlp.router.expert_bias"]


def test_an_upstream_model_is_built_without_importing_the_plugin():
    # The patches' equivalence check builds upstream-only models with testing.models
    # and asserts the plugin stays unimported; the shared GPTModel builder once lived
    # in spec.py, whose import pulls in LossFreeRouter.
    import subprocess
    import sys

    script = """
import sys
from nemo_lossfree.testing import cpu
cpu.enable()
from nemo_lossfree.testing.distributed import free_port
cpu.init_distributed(0, 1, init_method=f"tcp://127.0.0.1:{free_port()}")
from nemo_lossfree.testing.models import gpt_moe_model, moe_transformer_config
config = moe_transformer_config(expert_bias=True, num_layers=1, hidden_size=32, num_attention_heads=4,
                                num_experts=4, topk=2)
gpt_moe_model(config, vocab_size=64, max_sequence_length=16, loss_free=False)
print(sorted(m for m in ("nemo_lossfree.router", "nemo_lossfree.balancer") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
