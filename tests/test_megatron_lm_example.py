"""examples/pretrain_gpt_lossfree.py's command lines against Megatron-LM's own parser.

The end-to-end run (``megatron.training.pretrain`` on 2 CPU ranks, resumed
from its checkpoint) is the CI lane .ci/lanes/50-megatron-lm.sh; these checks
are quick: the GPU command in docs/megatron_lm.md parses to the run it claims,
and ``--lossfree`` survives the second parse that ``pretrain()`` does with
Megatron's parser alone.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from _support.megatron_lm_lane.lane_checks import EXAMPLE, LOSSFREE_FLAGS, MODEL_FLAGS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "megatron_lm.md"


def documented_command(section: str) -> list[str]:
    """The first ```bash block after the heading ``section``, as argv (continuations joined)."""
    text = DOCS.read_text()
    start = text.index(f"## {section}\n")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_gpu_command_in_the_docs_parses_to_a_loss_free_run(monkeypatch):
    from megatron.training import arguments

    from nemo_lossfree.integrations.megatron_lm import add_lossfree_args, lossfree_config_from_args

    command = documented_command("On a GPU node")
    assert command[:3] == ["torchrun", "--nproc-per-node", "8"]
    script = command[3]
    assert (DOCS.parents[1] / script).resolve() == EXAMPLE
    monkeypatch.setattr(sys, "argv", [script, *command[4:]])
    args = arguments.parse_args(extra_args_provider=add_lossfree_args)
    assert args.lossfree is True and lossfree_config_from_args(args).enabled
    assert (args.num_experts, args.expert_model_parallel_size, args.moe_router_topk) == (64, 8, 6)
    assert args.moe_router_load_balancing_type == ["none"] and not args.moe_router_enable_expert_bias
    assert args.mock_data and args.load == args.save


def test_cpu_command_in_the_docs_is_the_lane_run(monkeypatch):
    """The CPU command the docs show uses the lane's model and the CPU flags."""
    command = documented_command("On the CPU (CI, laptops)")
    assert command[command.index("-m") + 1] == "nemo_lossfree.testing.megatron_lm_cpu"
    for flag in ("--distributed-backend", "--transformer-impl", "--expert-model-parallel-size"):
        assert flag in command
    assert {"--lossfree", "--mock-data", "--use-cpu-initialization"} <= set(command)


def test_lossfree_flag_survives_megatrons_own_reparse(monkeypatch):
    """pretrain() parses sys.argv again with Megatron's parser alone (ft_integration.setup).

    Unknown flags are ignored there, so ``--lossfree`` and ``--lossfree-*``
    pass; a ``loss_free`` value of ``--moe-router-load-balancing-type`` is a
    known flag's invalid choice there and exits.
    """
    from megatron.training import arguments

    from nemo_lossfree.integrations.megatron_lm import add_lossfree_args

    argv = [str(EXAMPLE), *MODEL_FLAGS, *LOSSFREE_FLAGS]
    monkeypatch.setattr(sys, "argv", argv)
    assert arguments.parse_args(extra_args_provider=add_lossfree_args).lossfree is True
    assert arguments.parse_args(ignore_unknown_args=True).moe_router_load_balancing_type == ["none"]
