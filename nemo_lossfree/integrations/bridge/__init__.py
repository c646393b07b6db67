"""Megatron-Bridge (NeMo framework) integration: the ``lossfree`` config flag.

For users who build their ``ConfigContainer`` in Python::

    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain
    from nemo_lossfree.integrations.bridge import enable_lossfree

    cfg = my_recipe()                       # any Bridge recipe / ConfigContainer
    # ... apply YAML / CLI overrides first (process_config_with_overrides) ...
    callback = enable_lossfree(cfg, {"enabled": True, "update_rate": 1e-3})
    pretrain(cfg, forward_step, callbacks=[callback] if callback else None)

``enable_lossfree`` must run *after* Bridge's override processing: Bridge
takes callable fields (such as ``model.transformer_layer_spec``) out before
merging YAML and restores the recipe's callables afterwards, so a spec set
earlier would be silently replaced.

What it does when ``enabled``:
- wraps ``cfg.model.transformer_layer_spec`` (a ``ModuleSpec`` or a callable
  ``(provider[, vp_stage]) -> spec``) so every MoE layer, MTP layers included,
  is built with ``LossFreeRouter``;
- returns a Bridge ``Callback`` that, when training starts, creates a
  ``LossFreeBalancer`` over the model chunks and attaches it to
  ``finalize_model_grads_func`` (set by Bridge's setup; called once per global
  batch after the last backward) with a writer of its ``lossfree/...``
  metrics (and every 100 steps the load heatmap) to Bridge's TensorBoard
  and W&B loggers (``integrations/logging.py``); the balancer's state
  (step counter, drift integral, adaptive gain) resumes with the model from
  Bridge's checkpoint, and a checkpoint without it continues the rate
  schedule from the iteration;
- takes over ``model.moe_router_enable_expert_bias`` when the recipe set it
  (DeepSeek-V3, GLM, Kimi, ...: Megatron's update off, the bias buffer and its
  checkpoint key kept, one log line; see ``compat.take_over_upstream_expert_bias``)
  and warns when an auxiliary load-balancing loss is left on.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Mapping, Optional, Union

from nemo_lossfree import compat
from nemo_lossfree.config import LossFreeConfig

logger = logging.getLogger(__name__)


def lossfree_config(section: Union[LossFreeConfig, Mapping[str, Any], None]) -> LossFreeConfig:
    """A validated ``LossFreeConfig`` from a YAML ``lossfree:`` section (or one as is)."""
    if isinstance(section, LossFreeConfig):
        return section
    return LossFreeConfig.from_dict(section or {"enabled": False})


class LossFreeLayerSpec:
    """Callable layer spec: the wrapped spec with ``LossFreeRouter`` in every MoE layer.

    Bridge's ``GPTModelProvider.provide`` calls ``transformer_layer_spec(provider)``
    (with ``vp_stage=`` when the callable accepts it); so does its MTP block spec.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, config: Any, vp_stage: Optional[int] = None) -> Any:
        from nemo_lossfree.spec import use_loss_free_router

        spec = self.inner
        if callable(spec) and not _is_module_spec(spec):
            if "vp_stage" in inspect.signature(spec).parameters:
                spec = spec(config, vp_stage=vp_stage)
            else:
                spec = spec(config)
        # A pipeline stage may hold only dense layers (DeepSeek-V3's first
        # stage: num_layers_in_first_pipeline_stage = first_k_dense_replace = 3);
        # that the model has MoE layers at all is checked once, by
        # check_model_settings (num_moe_experts).
        return use_loss_free_router(spec, require_moe=False)

    def __repr__(self) -> str:
        return f"LossFreeLayerSpec({self.inner!r})"

    def to_cfg_dict(self) -> dict:
        """How Bridge's ``run_config.yaml`` records it: with the spec it wraps, so the
        checkpoint rebuilds this model (``nemo-lossfree export``; see export_checkpoint.py)."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", "inner": self.inner}


def _is_module_spec(value: Any) -> bool:
    from megatron.core.transformer.spec_utils import ModuleSpec

    return isinstance(value, ModuleSpec)


def check_model_settings(model: Any) -> None:
    """Refuse settings that contradict loss-free balancing; warn about auxiliary losses.

    Megatron's own expert bias is taken over after this runs
    (``compat.take_over_upstream_expert_bias``), not refused.
    """
    compat.require_moe(model, compat.yaml_key)
    compat.refuse_unsupported_balancing(model, compat.yaml_key)
    warning = compat.aux_loss_warning(model, compat.yaml_key)
    if warning is not None:
        warnings.warn(warning, UserWarning, stacklevel=3)


def enable_lossfree(config: Any, section: Union[LossFreeConfig, Mapping[str, Any], None]):
    """Apply the ``lossfree`` flag to a Bridge ``ConfigContainer``; return the callback.

    Returns None (and changes nothing) when the section is absent or
    ``enabled`` is false. Raises ``ValueError`` naming the key for bad values.
    """
    settings = lossfree_config(section)
    if not settings.enabled:
        return None
    model = config.model
    check_model_settings(model)
    compat.take_over_upstream_expert_bias(model, settings.update_rate, compat.yaml_key)
    if not isinstance(model.transformer_layer_spec, LossFreeLayerSpec):
        model.transformer_layer_spec = LossFreeLayerSpec(model.transformer_layer_spec)
    return make_callback(settings)


def register_router_for_conversion() -> None:
    """Tell Bridge's weight conversion that ``LossFreeRouter`` is replicated, as ``TopKRouter`` is.

    Bridge's ``AutoMapping`` (Hugging Face <-> Megatron weights, e.g.
    ``mlp.router.expert_bias`` <-> ``mlp.gate.e_score_correction_bias``) picks
    how to gather or scatter a weight by its module's class name and knows
    ``TopKRouter`` only: without this, exporting or loading a LossFreeRouter
    model fails with "Cannot determine parallelism type for module
    'LossFreeRouter'". Idempotent.
    """
    from megatron.bridge.models.conversion.param_mapping import AutoMapping

    from nemo_lossfree.router import LossFreeRouter

    AutoMapping.register_module_type(LossFreeRouter.__name__, "replicated")


def make_callback(settings: LossFreeConfig):
    """The Bridge ``Callback`` that attaches the balancer and logs its metrics."""
    from megatron.bridge.training.callbacks import Callback

    register_router_for_conversion()  # Bridge may load or save HF weights of this model

    class LossFreeCallback(Callback):
        """Creates the balancer on the built model; logs ``lossfree/...`` on its logging steps."""

        def __init__(self) -> None:
            from nemo_lossfree.integrations.logging import MetricsWriter

            self.settings = settings
            self.balancer = None
            self.writer = MetricsWriter()

        def on_train_start(self, context) -> None:
            from megatron.core.utils import get_model_config

            from nemo_lossfree.balancer import LossFreeBalancer

            self.balancer = LossFreeBalancer(context.model, self.settings)
            # Bridge loaded its checkpoint already: the routers' _extra_state
            # resumed the balancer; one without it continues from the iteration.
            self.balancer.continue_from_iteration(int(context.state.train_state.step))
            state = context.state
            self.balancer.attach(get_model_config(context.model[0]),
                                 on_metrics=lambda metrics: self._write(state, metrics))
            context.user_state["lossfree_balancer"] = self.balancer
            logger.info(
                "lossfree: LossFreeBalancer attached to %d router(s), starting at step %d",
                len(self.balancer.routers), self.balancer.steps_done,
            )

        def _write(self, state, metrics: dict) -> None:
            # finalize_model_grads runs before Bridge counts the iteration; +1
            # puts our scalars at the step of Bridge's own "lm loss".
            step = int(state.train_state.step) + 1
            self.writer.write(step, metrics, self.balancer.last_loads, tensorboard=state.tensorboard_logger,
                              wandb=state.wandb_logger)

    return LossFreeCallback()
