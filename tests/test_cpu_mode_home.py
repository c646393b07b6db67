"""The CPU mode lives in ``integrations/``; ``testing/`` is test support the package never needs.

What users run (the demo, the Bridge entry point) imports the integration;
``nemo_lossfree.testing.cpu`` and ``testing.distributed.free_port`` stay valid
public names by re-exporting the very same objects.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import nemo_lossfree

PACKAGE = Path(nemo_lossfree.__file__).parent


def _imports_of_testing(tree: ast.AST) -> list[int]:
    """Lines of every import (function-level ones too) that names nemo_lossfree.testing or a module in it."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(name == "nemo_lossfree.testing" or name.startswith("nemo_lossfree.testing.") for name in names):
            lines.append(node.lineno)
    return lines


def test_apps_and_integrations_never_import_testing():
    found = []
    for folder in ("apps", "integrations"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            found += [f"{path.relative_to(PACKAGE.parent).as_posix()}:{line}"
                      for line in _imports_of_testing(ast.parse(path.read_text()))]
    assert found == []


def test_the_demo_and_the_bridge_entry_point_load_no_testing_module(tmp_path):
    # A fresh interpreter (the test session itself imported testing.cpu in
    # conftest): import what users run, and run the demo worker's main past
    # the CPU mode (it turns it on before checking flags) to a bad flag's refusal.
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        import nemo_lossfree.apps.demo as demo
        for module in pkgutil.iter_modules(demo.__path__, "nemo_lossfree.apps.demo."):
            importlib.import_module(module.name)
        import nemo_lossfree.apps.cli
        import nemo_lossfree.integrations.bridge.pretrain
        from nemo_lossfree.apps.demo import worker
        code = worker.main(["--arm", "loss_free", "--out", {str(tmp_path / "out")!r},
                            "--corpus", "/nonexistent"])
        assert code == 2, code
        print(sorted(name for name in sys.modules if name.startswith("nemo_lossfree.testing")))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "corpus: must be a text file or a directory of text files" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_testing_re_exports_the_same_objects():
    from nemo_lossfree.integrations import cpu, launch
    from nemo_lossfree.testing import cpu as testing_cpu
    from nemo_lossfree.testing import distributed as testing_distributed

    public = sorted(name for name, value in vars(cpu).items()
                    if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
                    and value.__module__ == cpu.__name__)
    assert sorted(testing_cpu.__all__) == public
    for name in public:
        assert getattr(testing_cpu, name) is getattr(cpu, name), name
    assert testing_distributed.free_port is launch.free_port
