"""Loss-free balancing in Megatron-LM's ``pretrain_gpt.py``-style scripts.

Three lines in a training script (see ``examples/pretrain_gpt_lossfree.py``)::

    from nemo_lossfree.integrations import megatron_lm as lossfree

    args = parse_and_validate_args(extra_args_provider=lossfree.add_lossfree_args)
    ...
    pretrain(..., lossfree.wrap_model_provider(model_provider), ...)

Then on the command line either ``--moe-router-load-balancing-type loss_free``
(also combinable: ``loss_free seq_aux_loss`` keeps a sequence aux loss, as
DeepSeek-V3 did) or ``--lossfree``, plus any ``--lossfree-*`` flag mirroring
``LossFreeConfig`` (``--lossfree-update-rate 1e-3 --lossfree-update-rule sign
--lossfree-schedule constant --no-lossfree-center ...``).

What the hooks do:
(a) ``wrap_model_provider`` builds the model with ``LossFreeRouter`` in every
    MoE layer: while the provider runs, the ``transformer_layer_spec`` /
    ``mtp_block_spec`` handed to ``GPTModel`` go through
    ``nemo_lossfree.spec.use_loss_free_router`` (specs built inside the
    provider, as pretrain_gpt.py does, are covered too);
(b) after each model chunk is built it (re)creates the ``LossFreeBalancer``
    over all chunks and attaches it to the first chunk's ``TransformerConfig``
    (Megatron-LM's ``train()`` keeps a ``finalize_model_grads_func`` that is
    already set, so the update runs inside ``finalize_model_grads``);
(c) every ``--tensorboard-log-interval`` iterations the balancer's
    ``lossfree/...`` metrics go to Megatron's TensorBoard and W&B writers
    (``integrations/logging.py``; the load heatmap every 100 iterations);
(d) the expert biases are persistent buffers, so Megatron's checkpoints carry
    them; the balancer's step (which drives the rate schedule) is taken from
    ``args.iteration`` on the first step after a resume, unless a saved
    ``state_dict()`` was restored with ``load_state_dict()``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

from nemo_lossfree.config import DEFAULT_RATES, SCHEDULES, UPDATE_RULES, LossFreeConfig

LOSS_FREE = "loss_free"
BALANCING_TYPE_DEST = "moe_router_load_balancing_type"
# LossFreeConfig fields that are not flags (``enabled`` is --lossfree / loss_free).
_NOT_FLAGS = ("enabled",)
_CHOICES = {"update_rule": UPDATE_RULES, "schedule": SCHEDULES}


def _flag(name: str) -> str:
    return "--lossfree-" + name.replace("_", "-")


def _optional_int(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "null") else int(text)


def _allow_loss_free_balancing_type(parser: argparse.ArgumentParser) -> None:
    """Add ``loss_free`` to the choices of --moe-router-load-balancing-type (Megatron validates them)."""
    for action in parser._actions:  # argparse has no public lookup by dest
        if action.dest == BALANCING_TYPE_DEST and action.choices is not None:
            if LOSS_FREE not in action.choices:
                action.choices = list(action.choices) + [LOSS_FREE]


def normalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Turn ``--moe-router-load-balancing-type loss_free [...]`` into ``args.lossfree = True``.

    ``loss_free`` is removed from the balancing types (the rest stay; none left
    means "none"), so Megatron's TransformerConfig sees only values it knows.
    Idempotent. Raises ValueError for combinations that cannot work.
    """
    types = getattr(args, BALANCING_TYPE_DEST, None)
    listed = types if isinstance(types, list) else ([types] if types is not None else [])
    if LOSS_FREE in listed:
        args.lossfree = True
        rest = [t for t in listed if t != LOSS_FREE]
        if not rest:
            rest = ["none"]
        setattr(args, BALANCING_TYPE_DEST, rest if isinstance(types, list) else rest[0])
    if getattr(args, "lossfree", False):
        if getattr(args, "moe_router_enable_expert_bias", False):
            raise ValueError(
                "--moe-router-enable-expert-bias: must be off with loss-free balancing "
                "(the balancer owns the expert-bias update); use --lossfree-update-rate instead"
            )
        remaining = getattr(args, BALANCING_TYPE_DEST, None)
        remaining = remaining if isinstance(remaining, list) else [remaining]
        for bad in ("sinkhorn", "quantile_balancing"):
            if bad in remaining:
                raise ValueError(
                    f"--moe-router-load-balancing-type: {bad} cannot be combined with loss_free; "
                    "use none, aux_loss, seq_aux_loss or global_aux_loss"
                )
        lossfree_config_from_args(args)  # validate the --lossfree-* values now
    return args


def add_lossfree_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the --lossfree flags, and loss_free as a balancing type.

    The returned parser normalises its result right after parsing (see
    ``normalize_args``), before Megatron's ``validate_args`` sees it.
    """
    group = parser.add_argument_group(title="loss-free load balancing (nemo_lossfree)")
    group.add_argument("--lossfree", action="store_true",
                       help="Enable auxiliary-loss-free load balancing (LossFreeRouter + "
                            "LossFreeBalancer); same as --moe-router-load-balancing-type loss_free.")
    for f in dataclasses.fields(LossFreeConfig):
        if f.name in _NOT_FLAGS:
            continue
        # The declared default (update_rate's None means "the rule's own").
        default = f.default
        help_text = f"LossFreeConfig.{f.name} (default: {default})."
        if f.name == "update_rate":
            help_text = ("LossFreeConfig.update_rate (default: the rule's: "
                         + ", ".join(f"{rule} {rate:g}" for rule, rate in DEFAULT_RATES.items()) + ").")
        if f.type == "bool":
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        elif f.name in _CHOICES:
            group.add_argument(_flag(f.name), choices=_CHOICES[f.name], default=default, help=help_text)
        elif f.type in ("float", "Optional[float]"):
            group.add_argument(_flag(f.name), type=float, default=default, help=help_text)
        elif f.type == "int":
            group.add_argument(_flag(f.name), type=int, default=default, help=help_text)
        elif f.type == "Optional[int]":
            group.add_argument(_flag(f.name), type=_optional_int, default=default, help=help_text)
        else:  # a new field must get a flag deliberately
            raise TypeError(f"LossFreeConfig.{f.name}: no flag mapping for type {f.type!r}")
    _allow_loss_free_balancing_type(parser)

    parse_known_args = parser.parse_known_args

    @functools.wraps(parse_known_args)
    def parse_known_args_then_normalize(*args, **kwargs):
        namespace, extras = parse_known_args(*args, **kwargs)
        try:
            normalize_args(namespace)
        except ValueError as exc:
            parser.error(str(exc))
        return namespace, extras

    parser.parse_known_args = parse_known_args_then_normalize  # type: ignore[method-assign]
    return parser


def lossfree_config_from_args(args: argparse.Namespace) -> LossFreeConfig:
    """LossFreeConfig from the parsed --lossfree-* flags (errors name the flag)."""
    values = {}
    for f in dataclasses.fields(LossFreeConfig):
        if f.name in _NOT_FLAGS:
            continue
        if hasattr(args, "lossfree_" + f.name):
            values[f.name] = getattr(args, "lossfree_" + f.name)
    try:
        return LossFreeConfig(enabled=bool(getattr(args, "lossfree", False)), **values)
    except ValueError as exc:
        field_name = str(exc).split(":", 1)[0].removeprefix("lossfree.")
        raise ValueError(f"{_flag(field_name)}: {str(exc).split(':', 1)[1].strip()}") from exc


def is_enabled(args: argparse.Namespace) -> bool:
    normalize_args(args)
    return bool(getattr(args, "lossfree", False))


# ---------------------------------------------------------------- model hooks
@contextlib.contextmanager
def loss_free_router_specs():
    """While active, every GPTModel built gets LossFreeRouter in its MoE layers."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    from nemo_lossfree.spec import use_loss_free_router

    original_init = GPTModel.__init__

    @functools.wraps(original_init)
    def init_with_loss_free_router(self, *args, **kwargs):
        if "transformer_layer_spec" in kwargs:
            kwargs["transformer_layer_spec"] = use_loss_free_router(kwargs["transformer_layer_spec"])
        elif len(args) > 1:  # (config, transformer_layer_spec, ...)
            args = (args[0], use_loss_free_router(args[1]), *args[2:])
        if kwargs.get("mtp_block_spec") is not None:
            kwargs["mtp_block_spec"] = use_loss_free_router(kwargs["mtp_block_spec"], require_moe=False)
        original_init(self, *args, **kwargs)

    GPTModel.__init__ = init_with_loss_free_router
    try:
        yield
    finally:
        GPTModel.__init__ = original_init


class MegatronLMLossFree:
    """Owns the balancer of a Megatron-LM run (one per process)."""

    def __init__(self, config: LossFreeConfig) -> None:
        self.config = config
        self.chunks: list[Any] = []
        self.balancer = None
        self.transformer_config = None
        self._synced_with_iteration = False
        self._restored = False
        from nemo_lossfree.integrations.logging import MetricsWriter

        self.writer = MetricsWriter()

    # (b) ---------------------------------------------------------------
    def add_chunk(self, model_chunk) -> None:
        """Rebuild the balancer over all chunks so far and attach it (keeps its step)."""
        from nemo_lossfree.balancer import LossFreeBalancer

        self.chunks.append(model_chunk)
        steps_done = self.balancer.steps_done if self.balancer is not None else 0
        if self.transformer_config is None:
            self.transformer_config = model_chunk.config
        self._detach()
        self.balancer = LossFreeBalancer(self.chunks, self.config)
        self.balancer.steps_done = steps_done
        self.balancer.attach(self.transformer_config)
        attached = self.transformer_config.finalize_model_grads_func

        @functools.wraps(attached)
        def finalize_model_grads_and_log(*args, **kwargs):
            self._sync_step_with_iteration()
            out = attached(*args, **kwargs)
            self._log(self.balancer.last_metrics)
            return out

        finalize_model_grads_and_log._lossfree_owner = self  # type: ignore[attr-defined]
        self.transformer_config.finalize_model_grads_func = finalize_model_grads_and_log

    def _detach(self) -> None:
        """Undo our wrappers (and the balancer's) on the config, back to the original function."""
        cfg = self.transformer_config
        func = getattr(cfg, "finalize_model_grads_func", None)
        while func is not None and (getattr(func, "_lossfree_owner", None) is self
                                    or getattr(func, "_lossfree_balancer", None) is not None):
            func = func.__wrapped__
        if cfg is not None:
            cfg.finalize_model_grads_func = func

    # (d) ---------------------------------------------------------------
    def _sync_step_with_iteration(self) -> None:
        if self._synced_with_iteration:
            return
        self._synced_with_iteration = True
        if self._restored:
            return
        iteration = getattr(_megatron_args(), "iteration", 0) or 0
        if self.balancer.steps_done == 0 and iteration > 0:
            # Resumed from a Megatron-LM checkpoint: one balancer step per iteration.
            self.balancer.steps_done = int(iteration)
            from nemo_lossfree.balancer import warn_integral_restarts

            warn_integral_restarts(self.balancer)

    def state_dict(self) -> dict:
        return self.balancer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.balancer.load_state_dict(state)
        self._restored = True

    # (c) ---------------------------------------------------------------
    def _log(self, metrics: dict) -> None:
        args = _megatron_args()
        if not metrics or args is None:
            return
        iteration = getattr(args, "curr_iteration", None)
        iteration = self.balancer.steps_done if iteration is None else iteration + 1
        interval = getattr(args, "tensorboard_log_interval", 1) or 1
        if iteration % interval:
            return
        log_metrics(metrics, iteration, self.balancer.last_loads, writer=self.writer)


def _megatron_args():
    try:
        from megatron.training.global_vars import get_args

        return get_args()
    except (ImportError, AssertionError):
        return None


def log_metrics(metrics: dict, iteration: int, loads=None, writer=None) -> None:
    """Write ``lossfree/...`` metrics to Megatron-LM's TensorBoard and W&B writers (if any)."""
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    from nemo_lossfree.integrations.logging import MetricsWriter

    writer = writer if writer is not None else MetricsWriter()
    writer.write(iteration, metrics, loads, tensorboard=get_tensorboard_writer(), wandb=get_wandb_writer())


_STATE: Optional[MegatronLMLossFree] = None


def current() -> Optional[MegatronLMLossFree]:
    """The process's MegatronLMLossFree once a model was built with it (None before)."""
    return _STATE


def wrap_model_provider(model_provider: Callable, args: Optional[argparse.Namespace] = None) -> Callable:
    """(a)+(b): a model_provider that builds with LossFreeRouter and attaches the balancer.

    A no-op wrapper when loss-free balancing is not enabled in ``args``
    (Megatron's global args by default), so one script serves both.
    """

    @functools.wraps(model_provider)
    def lossfree_model_provider(*p_args, **p_kwargs):
        global _STATE
        run_args = args if args is not None else _megatron_args()
        if run_args is None or not is_enabled(run_args):
            return model_provider(*p_args, **p_kwargs)
        with loss_free_router_specs():
            model = model_provider(*p_args, **p_kwargs)
        if _STATE is None:
            _STATE = MegatronLMLossFree(lossfree_config_from_args(run_args))
        _STATE.add_chunk(model)
        return model

    return lossfree_model_provider


def reset() -> None:
    """Forget the process's balancer (tests; a second model in one process)."""
    global _STATE
    if _STATE is not None:
        _STATE._detach()
    _STATE = None
