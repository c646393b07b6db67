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
  batch after the last backward), resumes its step counter from the
  iteration, and writes its ``lossfree/...`` metrics (and every 100 steps
  the load heatmap) to Bridge's TensorBoard and W&B writers
  (``integrations/logging.py``);
- refuses ``model.moe_router_enable_expert_bias`` (one bias, ours) and warns
  when an auxiliary load-balancing loss is left on.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Mapping, Optional, Union

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
        return use_loss_free_router(spec)

    def __repr__(self) -> str:
        return f"LossFreeLayerSpec({self.inner!r})"


def _is_module_spec(value: Any) -> bool:
    from megatron.core.transformer.spec_utils import ModuleSpec

    return isinstance(value, ModuleSpec)


def check_model_settings(model: Any) -> None:
    """Refuse settings that contradict loss-free balancing; warn about auxiliary losses."""
    if not getattr(model, "num_moe_experts", None):
        raise ValueError(
            "model.num_moe_experts: lossfree.enabled needs an MoE model; set num_moe_experts"
        )
    if getattr(model, "moe_router_enable_expert_bias", False):
        raise ValueError(
            "model.moe_router_enable_expert_bias: must be false when lossfree.enabled is true; "
            "LossFreeRouter keeps its own bias and refuses Megatron's (turn one of them off)"
        )
    coeff = getattr(model, "moe_aux_loss_coeff", 0.0)
    kind = getattr(model, "moe_router_load_balancing_type", "aux_loss")
    coeffs = coeff if isinstance(coeff, (list, tuple)) else [coeff]
    if kind != "none" and any(c for c in coeffs):
        warnings.warn(
            f"model.moe_aux_loss_coeff: is {coeff} with lossfree.enabled (load balancing type "
            f"{kind!r}); the auxiliary loss fights the bias; set 0 for the paper's method",
            UserWarning,
            stacklevel=3,
        )


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
    if not isinstance(model.transformer_layer_spec, LossFreeLayerSpec):
        model.transformer_layer_spec = LossFreeLayerSpec(model.transformer_layer_spec)
    return make_callback(settings)


def make_callback(settings: LossFreeConfig):
    """The Bridge ``Callback`` that attaches the balancer and logs its metrics."""
    from megatron.bridge.training.callbacks import Callback

    class LossFreeCallback(Callback):
        """Creates the balancer on the built model; logs ``lossfree/...`` each step."""

        def __init__(self) -> None:
            from nemo_lossfree.integrations.logging import MetricsWriter

            self.settings = settings
            self.balancer = None
            self._logged_step = -1
            self.writer = MetricsWriter()

        def on_train_start(self, context) -> None:
            from megatron.core.utils import get_model_config

            from nemo_lossfree.balancer import LossFreeBalancer, warn_integral_restarts

            self.balancer = LossFreeBalancer(context.model, self.settings)
            # One balancer step per iteration: a resumed run continues its schedule.
            self.balancer.steps_done = int(context.state.train_state.step)
            warn_integral_restarts(self.balancer)
            self.balancer.attach(get_model_config(context.model[0]))
            context.user_state["lossfree_balancer"] = self.balancer
            logger.info(
                "lossfree: LossFreeBalancer attached to %d router(s), starting at step %d",
                len(self.balancer.routers), self.balancer.steps_done,
            )

        def on_train_step_end(self, context) -> None:
            balancer = self.balancer
            if balancer is None or balancer.steps_done == self._logged_step:
                return
            self._logged_step = balancer.steps_done
            # last_metrics is refreshed only on every log_every-th balancer step.
            if (balancer.steps_done - 1) % self.settings.log_every:
                return
            metrics = balancer.last_metrics
            if not metrics:
                return
            # Bridge fires on_train_step_end before it counts the iteration;
            # +1 puts our scalars at the step of Bridge's own "lm loss".
            step = int(context.state.train_state.step) + 1
            self.writer.write(step, metrics, balancer.last_loads, tensorboard=context.state.tensorboard_logger,
                              wandb=context.state.wandb_logger)

    return LossFreeCallback()
