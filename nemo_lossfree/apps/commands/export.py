"""``nemo-lossfree export CHECKPOINT_DIR --hf-model ID_OR_DIR --hf-path DIR``: a Bridge checkpoint to Hugging Face.

The flags are those of Megatron-Bridge's own ``convert_checkpoints.py
export`` (``--hf-model``, ``--hf-path``; the checkpoint is the positional
argument). Bad input is one line naming the flag (exit 2), checked before
Megatron-Bridge is imported; without Megatron-Bridge, one line saying what to
install. The work is ``nemo_lossfree.integrations.export_checkpoint``'s.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from nemo_lossfree.apps.commands import check_output_dir
from nemo_lossfree.exit_codes import EXIT_USAGE

#: A Hugging Face Hub model id: ``name`` or ``org/name``.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text + ". Refuses targets that would route differently (docs/export.md); "
        "shifts each layer's bias so its smallest entry is 0 (routing-invariant). Runs on the CPU.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="a Megatron-Bridge checkpoint: the run's checkpoint.save folder (newest "
                             "iter_* is taken) or one iter_* folder")
    parser.add_argument("--hf-model", required=True, metavar="ID_OR_DIR",
                        help="the target family on the Hugging Face Hub (deepseek-ai/DeepSeek-V3) or a local "
                             "folder with its config.json; its config and tokenizer go with the export")
    parser.add_argument("--hf-path", "--out", dest="hf_path", required=True, metavar="DIR",
                        help="where to write the Hugging Face checkpoint")
    parser.add_argument("--layer-spec", metavar="MODULE:FUNCTION",
                        help="the run's model.transformer_layer_spec, when the checkpoint does not record it "
                             "or another is needed here (e.g. a local spec without Transformer Engine)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the --hf-model repository's own modeling code (as in transformers)")
    return parser


def check_hf_model(value: str) -> None:
    """``--hf-model`` is a local folder with a config.json, or has the shape of a Hub id."""
    path = Path(value).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"--hf-model: {value} has no config.json (a Hugging Face model folder has one)")
        return
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        raise ValueError(f"--hf-model: {value} is neither a local folder nor a Hub id such as org/name")


def run(args: argparse.Namespace) -> int:
    from nemo_lossfree.integrations.bridge.pretrain import bridge_missing
    from nemo_lossfree.integrations.export_checkpoint import check_layer_spec, iteration_dir

    prefix = "nemo-lossfree export: "
    try:
        source = iteration_dir(args.checkpoint)
        check_hf_model(args.hf_model)
        check_layer_spec(args.layer_spec)
        out = check_output_dir(args.hf_path, "--hf-path", create=False)
    except ValueError as exc:
        print(prefix + str(exc), file=sys.stderr)
        return EXIT_USAGE
    missing = bridge_missing()
    if missing:
        print(prefix + missing, file=sys.stderr)
        return EXIT_USAGE

    from nemo_lossfree.integrations.export import ExportRefused
    from nemo_lossfree.integrations.export_checkpoint import export_checkpoint_to_hf

    try:
        export_checkpoint_to_hf(source, args.hf_model, out, layer_spec=args.layer_spec,
                                trust_remote_code=args.trust_remote_code)
    except ExportRefused as exc:  # ours; anything else from Bridge or transformers keeps its traceback
        print(prefix + str(exc).removeprefix("export: "), file=sys.stderr)
        return EXIT_USAGE
    print(f"exported {source} to {out} (Hugging Face; biases shifted so each layer's smallest is 0)")
    return 0
