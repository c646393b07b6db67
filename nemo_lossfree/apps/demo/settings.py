"""Every setting of one demo run, and the command-line flags that set them.

The same flags are read by ``nemo-lossfree demo`` and by
``python -m nemo_lossfree.apps.demo.worker`` (torchrun, srun), and both refuse
the same bad flags (``DemoSettings`` and ``check_run``) before any rank joins
the process group. The demo hands its workers the settings as a run config
(``run_config.to_run_config``), not as flags again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from nemo_lossfree.config import LossFreeConfig
from nemo_lossfree.scores import SCORE_FUNCTIONS, check_score_function


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass
class DemoSettings:
    steps: int = 200
    seed: int = 1234
    experts: int = 16
    topk: int = 2
    num_layers: int = 4
    # Dense (non-MoE) layers before the MoE layers, as DeepSeekMoE/-V3 keep
    # their first layers dense (Megatron's moe_layer_freq [0]*n + [1]*layers).
    dense_layers: int = 0
    hidden_size: int = 64
    num_attention_heads: int = 4
    moe_ffn_hidden_size: int = 64
    score_function: str = "sigmoid"
    seq_length: int = 128
    # 4096 tokens per step as one micro-batch of 16 windows per rank: the same
    # training as 2 x 8 up to float order (equal micro-batches, per-token mean
    # loss, counts summed over the step), and a fifth less time per arm on the CPU.
    micro_batch_size: int = 16
    num_micro_batches: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_steps: int = 10
    # None: decay over `steps`. Set it explicitly to compare runs of different length.
    lr_decay_steps: Optional[int] = None
    # Many short windows: text is locally homogeneous, so MaxVio_global over few
    # windows is dominated by sampling noise (0.4 at 128 windows for a router
    # that balances its training batches; see docs/demo.md).
    val_windows: int = 2048
    # Validation is forward-only, so it takes bigger micro-batches than training:
    # at the training size (8) its Python round trips were 15% of an arm's time.
    # Routing is per token, so the result does not depend on it (up to float order).
    val_micro_batch_size: int = 64
    corpus: Optional[str] = None
    corpus_max_bytes: int = 24 * 1024 * 1024
    # "bytes" (256 ids) or "bpe" (byte-level BPE trained on the training split).
    tokenizer: str = "bytes"
    vocab_size: int = 256
    # LossFreeConfig fields of the loss_free arm that differ from the library's
    # defaults (none by default: the demo shows the default a user gets).
    lossfree: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = ("steps", "experts", "topk", "num_layers", "hidden_size", "num_attention_heads",
                    "moe_ffn_hidden_size", "seq_length", "micro_batch_size", "num_micro_batches",
                    "val_windows", "val_micro_batch_size", "corpus_max_bytes")
        minimums = {**{name: 1 for name in positive}, "dense_layers": 0, "lr_warmup_steps": 0}
        for name, minimum in minimums.items():
            _check_count(name, getattr(self, name), minimum)
        if self.topk > self.experts:
            raise ValueError(f"topk: must be <= experts ({self.experts}), got {self.topk}")
        if self.experts % 2:
            raise ValueError(f"experts: must be even (expert parallel 2), got {self.experts}")
        check_score_function(self.score_function, "score_function")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: must be a multiple of num_attention_heads ({self.num_attention_heads}), "
                f"got {self.hidden_size}"
            )
        # Megatron's OptimizerParamScheduler asserts most of this too, but inside both
        # workers: a bare AssertionError per rank, after the corpus and model are built.
        if not _finite_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr: must be a finite number > 0, got {self.lr!r}")
        if not _finite_number(self.min_lr) or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: must be a finite number in [0, lr ({self.lr})], got {self.min_lr!r}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps: must be >= 1 or unset, got {self.lr_decay_steps}")
        LossFreeConfig.from_dict(self.lossfree)  # validate early, with field names

    @property
    def lossfree_config(self) -> LossFreeConfig:
        return LossFreeConfig.from_dict(self.lossfree)

    @property
    def tokens_per_step(self) -> int:
        # Two data-parallel replicas (world 2, expert parallel 2, TP 1).
        return 2 * self.num_micro_batches * self.micro_batch_size * self.seq_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


SETTINGS_GROUP = "model and training"


def add_settings_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model, data and training flags (defaults from DemoSettings); returns their group."""
    d = DemoSettings()
    g = parser.add_argument_group(SETTINGS_GROUP)
    g.add_argument("--steps", type=int, default=d.steps, help="training steps per arm (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of weights and data order (default %(default)s)")
    g.add_argument("--experts", type=int, default=d.experts, help="experts per MoE layer (default %(default)s)")
    g.add_argument("--topk", type=int, default=d.topk, help="experts per token (default %(default)s)")
    g.add_argument("--layers", dest="num_layers", type=int, default=d.num_layers,
                   help="MoE transformer layers (default %(default)s)")
    g.add_argument("--dense-layers", type=int, default=d.dense_layers,
                   help="dense layers before the MoE layers, as DeepSeekMoE keeps its first "
                        "layer dense (default %(default)s)")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="(default %(default)s)")
    g.add_argument("--heads", dest="num_attention_heads", type=int, default=d.num_attention_heads,
                   help="attention heads (default %(default)s)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=d.moe_ffn_hidden_size,
                   help="hidden size of each expert (default %(default)s)")
    g.add_argument("--score-function", default=d.score_function, choices=SCORE_FUNCTIONS,
                   help="router score function (default %(default)s)")
    g.add_argument("--seq-length", type=int, default=d.seq_length, help="bytes per sequence (default %(default)s)")
    g.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help="sequences per micro-batch (default %(default)s)")
    g.add_argument("--num-micro-batches", type=int, default=d.num_micro_batches,
                   help="micro-batches per step and rank (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak Adam learning rate (default %(default)s)")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="final learning rate (default %(default)s)")
    g.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps, help="(default %(default)s)")
    g.add_argument("--lr-decay-steps", type=int, default=None,
                   help="cosine decay length (default: --steps)")
    g.add_argument("--val-windows", type=int, default=d.val_windows,
                   help="held-out validation sequences (default %(default)s)")
    g.add_argument("--val-micro-batch-size", type=int, default=d.val_micro_batch_size,
                   help="validation sequences per forward pass (default %(default)s)")
    g.add_argument("--corpus", default=None,
                   help="a text file or directory of text files (default: the Python standard library's sources)")
    g.add_argument("--corpus-max-bytes", type=int, default=d.corpus_max_bytes,
                   help="read at most this many corpus bytes (default %(default)s)")
    g.add_argument("--tokenizer", default=d.tokenizer, choices=("bytes", "bpe"),
                   help="bytes, or byte-level BPE trained on the training split (default %(default)s)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="BPE vocabulary size (default %(default)s; bytes: 256)")
    g.add_argument("--lossfree", dest="lossfree_overrides", action="append", default=[],
                   type=_key_value, metavar="KEY=VALUE",
                   help="LossFreeConfig field for the loss_free arm, repeatable (e.g. update_rate=0.25); "
                        "default: LossFreeConfig()'s own defaults")
    return g


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    from nemo_lossfree.runconfig.load import load_run_config

    # --lossfree KEY=VALUE is typed like a run config's lossfree.KEY=VALUE override (one reader).
    given = [f"lossfree.{key}={value}" for key, value in args.lossfree_overrides]
    lossfree = load_run_config(None, given).get("lossfree") or {}
    names = {f.name for f in dataclasses.fields(DemoSettings)} - {"lossfree"}
    return DemoSettings(lossfree=lossfree, **{n: getattr(args, n) for n in names})


_UNSET = object()


def _show(value: Any) -> str:
    return "unset" if value is _UNSET else repr(value)


def finished_arm(out: Union[str, Path], arm: str) -> Optional[dict]:
    """``<out>/<arm>.json`` when it records a finished run (``--load`` skips that arm), else None."""
    path = Path(out) / f"{arm}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("finished") else None


def _first_difference(recorded: Any, settings: DemoSettings) -> Optional[str]:
    """``"name: recorded A, got B"`` for the first setting that differs, in field order."""
    recorded = recorded if isinstance(recorded, dict) else {}
    new = json.loads(json.dumps(settings.to_dict()))  # as the arm's JSON holds it
    pairs = [(name, recorded.get(name, _UNSET), value) for name, value in new.items() if name != "lossfree"]
    old_lossfree = recorded.get("lossfree") if isinstance(recorded.get("lossfree"), dict) else {}
    keys = list(new["lossfree"]) + [k for k in old_lossfree if k not in new["lossfree"]]
    pairs += [(f"lossfree.{k}", old_lossfree.get(k, _UNSET), new["lossfree"].get(k, _UNSET)) for k in keys]
    for name, old, value in pairs:
        if old != value:
            return f"{name}: recorded {_show(old)}, got {_show(value)}"
    return None


def check_run(settings: DemoSettings, arms: Sequence[str], *, out: Union[str, Path],
              save: Optional[str] = None, save_interval: Optional[int] = None, load: Optional[str] = None,
              threads: Optional[int] = None) -> None:
    """Refuse the run flags that are only wrong together or on this file system.

    ``nemo-lossfree demo`` calls it for every seed before it starts any worker, and
    the worker calls it before it joins the process group: otherwise these fail
    seconds later with a traceback from every rank, or not at all (a mistyped
    ``--load`` trained from step 0; a finished arm of other settings was skipped
    and its old numbers reported under the new settings).
    """
    if threads is not None:  # nemo-lossfree demo's --threads (the workers read it from the environment)
        _check_count("threads", threads, 1)
    if save_interval is not None:
        _check_count("save_interval", save_interval, 1)
        if save is None:
            raise ValueError(f"save_interval: must come with --save (the checkpoint root), "
                             f"got --save-interval {save_interval} without --save")
    from nemo_lossfree.apps.demo.corpus import corpus_root

    corpus_root(settings.corpus)
    if load is None:
        return
    # --load DIR --save DIR with no DIR yet is a first run that resumes once it
    # has saved (how the SLURM jobs start: a requeued job finds its checkpoint).
    resumes_its_own_save = save is not None and Path(save).resolve() == Path(load).resolve()
    if not Path(load).is_dir() and not resumes_its_own_save:
        raise ValueError(f"load: must be an existing checkpoint directory (or the --save path), got {load!r}")
    for arm in arms:
        recorded = finished_arm(out, arm)
        difference = None if recorded is None else _first_difference(recorded.get("settings"), settings)
        if difference is not None:
            raise ValueError(
                f"load: {Path(out) / f'{arm}.json'} is a finished {arm} run with other settings ({difference}); "
                f"--load skips a finished arm only for the same settings: rerun with them, or use another --out"
            )
