"""The README's SLURM block pastes into bash as written (the cluster part runs in the SLURM CI lane)."""

import importlib.util
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("readme_block", REPO / "examples" / "slurm" / "readme_block.py")
readme_block = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_block)

# The block as it was: a placeholder bash reads as a redirect, and no SLURM_CONF for the local cluster.
BROKEN = """## SLURM

```bash
nemo-lossfree slurm --config configs/deepseek-v3-1024gpu.yaml --nodes 128 \\
    --recipe <bridge recipe> --container-image 'nvcr.io#nvidia/nemo:TAG' --dry-run
bash examples/slurm/local_cluster.sh start
nemo-lossfree slurm --config configs/tiny-cpu.yaml --ntasks-per-node 2 --wait
```
"""


def test_the_readme_block_has_nothing_bash_would_misread():
    block = readme_block.slurm_block((REPO / "README.md").read_text())
    assert readme_block.problems(block) == []
    assert any("local_cluster.sh start" in c for c in readme_block.commands(block))


def test_the_check_names_a_redirect_placeholder_and_a_missing_slurm_conf():
    found = readme_block.problems(readme_block.slurm_block(BROKEN))
    assert len(found) == 2
    assert found[0].startswith("<bridge recipe>: bash reads it as a redirect")
    assert found[1].startswith("SLURM_CONF is not exported before: nemo-lossfree slurm --config configs/tiny-cpu.yaml")
    # the quoted '#' is part of the image name, not a comment
    assert "--dry-run" in readme_block.commands(readme_block.slurm_block(BROKEN))[0]


def test_the_dry_run_part_runs_as_pasted(tmp_path):
    block = readme_block.slurm_block((REPO / "README.md").read_text())
    before_cluster = block[:block.index("bash examples/slurm/local_cluster.sh start")]
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", before_cluster], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash")
    assert "#SBATCH --nodes=128" in result.stdout
    assert "deepseek_v3_pretrain_1024gpu_h100_bf16_config" in result.stdout
