"""The demo's SDPA core attention computes what Megatron-Core's DotProductAttention computes."""

import pytest
import torch

from nemo_lossfree.testing.models import gpt_moe_layer_spec, moe_transformer_config


def _pair(pg_collection, **overrides):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_lossfree.apps.demo.attention import SdpaDotProductAttention

    config = moe_transformer_config(num_layers=1, hidden_size=32, num_attention_heads=4,
                                    num_experts=4, topk=2, **overrides)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                  attention_type="self", pg_collection=pg_collection)
    return DotProductAttention(**kwargs), SdpaDotProductAttention(**kwargs), config


def _qkv(config, seq=24, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, dim = config.num_attention_heads, config.kv_channels
    return [torch.randn(seq, batch, heads, dim, generator=g, requires_grad=True) for _ in range(3)]


def _run(module, qkv, mask=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in qkv]
    out = module(*leaves, mask)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def test_same_output_and_gradients_as_upstream(pg_collection):
    upstream, sdpa, config = _pair(pg_collection)
    qkv = _qkv(config)
    (out_u, grads_u), (out_s, grads_s) = _run(upstream, qkv), _run(sdpa, qkv)
    assert out_s.shape == out_u.shape == (24, 3, config.hidden_size)
    torch.testing.assert_close(out_s, out_u, rtol=1e-5, atol=1e-6)
    for g_s, g_u in zip(grads_s, grads_u):
        torch.testing.assert_close(g_s, g_u, rtol=1e-5, atol=1e-6)


def test_causal_future_tokens_do_not_change_the_past(pg_collection):
    _, sdpa, config = _pair(pg_collection)
    q, k, v = _qkv(config)
    out = sdpa(q, k, v, None)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[12:] += 5.0
    v2[12:] -= 3.0
    later = sdpa(q, k2, v2, None)
    torch.testing.assert_close(later[:12], out[:12])
    assert not torch.allclose(later[12:], out[12:])


def test_an_explicit_mask_runs_upstreams_forward(pg_collection, monkeypatch):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    upstream, sdpa, config = _pair(pg_collection)
    calls = []
    original = DotProductAttention.forward
    monkeypatch.setattr(DotProductAttention, "forward",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    q, k, v = _qkv(config)
    mask = torch.zeros(1, 1, 24, 24, dtype=torch.bool)
    mask[..., 5:] = True  # a padding-style mask, not the causal one
    out = sdpa(q, k, v, mask)
    assert calls == [1]
    torch.testing.assert_close(out, original(upstream, q, k, v, mask))


@pytest.mark.parametrize("dense_layers", [0, 1])
def test_demo_model_uses_it_in_every_layer(single_rank, dense_layers):
    from nemo_lossfree.apps.demo.attention import SdpaDotProductAttention
    from nemo_lossfree.apps.demo.corpus import load_corpus
    from nemo_lossfree.apps.demo.settings import DemoSettings
    from nemo_lossfree.apps.demo.trainer import ArmTrainer

    settings = DemoSettings(dense_layers=dense_layers, num_layers=2, val_windows=2, experts=4,
                            corpus_max_bytes=1 << 18)
    trainer = ArmTrainer("loss_free", settings, load_corpus(None, max_bytes=settings.corpus_max_bytes))
    kinds = [type(m.core_attention) for m in trainer.model.modules() if hasattr(m, "core_attention")]
    assert kinds == [SdpaDotProductAttention] * (dense_layers + 2)


def test_spec_rewrite_leaves_the_input_alone():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemo_lossfree.apps.demo.attention import SdpaDotProductAttention, with_sdpa_attention

    spec = gpt_moe_layer_spec(4)
    rewritten = with_sdpa_attention(spec)
    assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention
    assert rewritten.submodules.self_attention.submodules.core_attention is SdpaDotProductAttention
    with pytest.raises(TypeError, match="spec: expected"):
        with_sdpa_attention(object())
