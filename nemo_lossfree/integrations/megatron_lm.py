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
(d) the expert biases and the balancer's state (step counter, drift
    integral, adaptive gain: each router's ``_extra_state``) are model state,
    so Megatron's checkpoints carry them and a resume continues bit for bit;
    a checkpoint without that state (Megatron-Core's own expert bias, older
    versions) continues the rate schedule from ``args.iteration``, with a
    warning.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

from nemo_lossfree import compat
from nemo_lossfree.config import LossFreeConfig

LOSS_FREE = "loss_free"
BALANCING_TYPE_DEST = "moe_router_load_balancing_type"
# LossFreeConfig fields that are not flags (``enabled`` is --lossfree / loss_free).
_NOT_FLAGS = ("enabled",)
PREFIX = "lossfree_"


def _flag(name: str) -> str:
    return "--" + (PREFIX + name).replace("_", "-")


def lossfree_argument_factory():
    """Megatron's ``ArgumentGroupFactory`` over ``LossFreeConfig``, named ``--lossfree-<field>``.

    The flags, their types (from the annotations), defaults, choices
    (``argparse_meta``) and help (the field docstrings) come from the
    dataclass, as Megatron-LM's own config dataclasses become its flags. Ours
    carry a prefix, in the flag and in ``args`` (``args.lossfree_update_rate``),
    so no field can collide with one of Megatron-LM's. A bool field that
    defaults to true gets Megatron's ``--no-*`` / ``--disable-*`` form.
    """
    try:
        from megatron.training.argument_utils import ArgumentGroupFactory
    except ImportError as exc:  # megatron.training is Megatron-LM's (the megatron-core wheel has it from 0.17)
        raise ImportError(
            "nemo_lossfree.integrations.megatron_lm: needs megatron.training.argument_utils "
            f"(Megatron-LM, or the megatron-core wheel >= 0.17): {exc}"
        ) from None

    class LossFreeArgumentGroupFactory(ArgumentGroupFactory):
        def _format_arg_name(self, config_attr_name: str, prefix: Optional[str] = None) -> str:
            return super()._format_arg_name(PREFIX + config_attr_name, prefix)

        def _build_argparse_kwargs_from_field(self, attribute):
            kwargs = super()._build_argparse_kwargs_from_field(attribute)
            kwargs["dest"] = PREFIX + attribute.name
            return kwargs

        def build_group(self, parser, title=None):
            group = super().build_group(parser, title=title)
            # The documented ``--[no-]lossfree-center``: Megatron's form has only
            # the negative flags for a bool that defaults to true; the positive
            # one states the default explicitly (no default of its own).
            for f in dataclasses.fields(LossFreeConfig):
                if f.name not in _NOT_FLAGS and f.type is bool and f.default is True:
                    group.add_argument(_flag(f.name), dest=PREFIX + f.name, action="store_true",
                                       default=argparse.SUPPRESS, help=f"Keep {_flag(f.name)} on (the default).")
            return group

    return LossFreeArgumentGroupFactory(LossFreeConfig, exclude=list(_NOT_FLAGS))


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
        compat.refuse_upstream_expert_bias(args, "--lossfree (loss_free balancing)", compat.flag)
        compat.refuse_unsupported_balancing(args, compat.flag)
        lossfree_config_from_args(args)  # validate the --lossfree-* values now
    return args


def add_lossfree_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the --lossfree flags, and loss_free as a balancing type.

    The returned parser normalises its result right after parsing (see
    ``normalize_args``), before Megatron's ``validate_args`` sees it.
    """
    group = lossfree_argument_factory().build_group(parser, title="loss-free load balancing (nemo_lossfree)")
    group.add_argument("--lossfree", action="store_true",
                       help="Enable auxiliary-loss-free load balancing (LossFreeRouter + "
                            "LossFreeBalancer); same as --moe-router-load-balancing-type loss_free.")
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
        if hasattr(args, PREFIX + f.name):
            values[f.name] = getattr(args, PREFIX + f.name)
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
        from nemo_lossfree.integrations.logging import MetricsWriter

        self.writer = MetricsWriter()

    # (b) ---------------------------------------------------------------
    def add_chunk(self, model_chunk) -> None:
        """Rebuild the balancer over all chunks so far and attach it (its step is the routers')."""
        from nemo_lossfree.balancer import LossFreeBalancer

        self.chunks.append(model_chunk)
        if self.transformer_config is None:
            self.transformer_config = model_chunk.config
        self.balancer = LossFreeBalancer(self.chunks, self.config)
        # (d) Megatron-LM loads its checkpoint after the model is built: the
        # iteration is read only if that checkpoint lacked the balancer state.
        self.balancer.attach(self.transformer_config, on_metrics=self._log,
                             resume_iteration=lambda: getattr(_megatron_args(), "iteration", 0))

    def state_dict(self) -> dict:
        return self.balancer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.balancer.load_state_dict(state)

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
    if _STATE is not None and _STATE.transformer_config is not None:
        from nemo_lossfree.balancer import detach

        detach(_STATE.transformer_config)
    _STATE = None
