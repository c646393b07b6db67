"""Constants and helpers that are written once in the package and imported everywhere else.

Structural on purpose: two copies agree today and drift tomorrow (the SLURM
script's requeue code was its own 75 next to the worker's).
"""

from __future__ import annotations

import ast
from pathlib import Path

import nemo_lossfree
from nemo_lossfree import exit_codes

PACKAGE = Path(nemo_lossfree.__file__).parent


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text())


def test_exit_codes_are_numbers_only_in_exit_codes():
    """No module spells 75 itself, and no entry point (main/run) returns a bare 2 or 75."""
    copies = []
    for name, tree in _modules():
        if name == "nemo_lossfree/exit_codes.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and node.value.value == exit_codes.EXIT_STOPPED:
                copies.append((name, node.lineno))
            if isinstance(node, ast.FunctionDef) and node.name in ("main", "run"):
                copies += [(name, ret.lineno) for ret in ast.walk(node)
                           if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Constant)
                           and ret.value.value in (exit_codes.EXIT_USAGE, exit_codes.EXIT_STOPPED)]
    assert copies == [], copies


def test_each_helper_is_defined_once():
    names = ("free_port", "router_scores", "refuse_upstream_expert_bias", "refuse_unsupported_balancing",
             "aux_loss_warning", "apply_score_function")
    defined: dict[str, list[str]] = {}
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                defined.setdefault(node.name, []).append(module)
    assert {name: where for name, where in defined.items() if len(where) > 1} == {}
    assert defined["free_port"] == ["nemo_lossfree/integrations/launch.py"]
    assert "apply_score_function" not in defined


def test_the_sbatch_script_requeues_on_the_workers_stopped_code():
    from nemo_lossfree.apps.slurm.job import SlurmJob
    from nemo_lossfree.apps.slurm.render import render_sbatch

    text = render_sbatch(SlurmJob(command=["-m", "nemo_lossfree.apps.demo.worker"]))
    assert f'if [ "$rc" = {exit_codes.EXIT_STOPPED} ]' in text, text
