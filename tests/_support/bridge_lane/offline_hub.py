"""An offline Hugging Face hub cache holding the config.json of the models the recipes name.

Megatron-Bridge 0.6.2's real recipes build their model provider from a hub
config: ``deepseek_v3_pretrain_config`` calls
``AutoBridge.from_hf_pretrained("deepseek-ai/DeepSeek-V3")``, the Qwen3 and
GPT-OSS recipes likewise. The lane has no network to huggingface.co, so
``hf_configs/<org>--<name>/config.json`` hold the architecture fields of
those published configs (their weight ``quantization_config`` left out: no
weights are loaded), and ``install()`` lays them out as a hub cache and turns
the hub offline, before anything imports ``huggingface_hub``. Only
``config.json`` exists there: a recipe that needs more (a tokenizer) fails
loudly, it is not faked.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

HF_CONFIGS = Path(__file__).resolve().parent / "hf_configs"
#: any 40-hex revision name; the cache maps refs/main to it.
REVISION = "0" * 40
#: revisions a recipe pins (qwen3_30b_a3b_pretrain_config asks for this one).
PINNED_REVISIONS = {"Qwen--Qwen3-30B-A3B": ("ad44e777bcd18fa416d9da3bd8f70d33ebb85d39",)}


def build_cache(root: Path) -> Path:
    """``root/hub`` in the hub's cache layout with every ``hf_configs`` entry."""
    hub = root / "hub"
    for source in sorted(HF_CONFIGS.glob("*/config.json")):
        repo_dir = hub / f"models--{source.parent.name}"
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / "main").write_text(REVISION)
        for revision in (REVISION, *PINNED_REVISIONS.get(source.parent.name, ())):
            snapshot = repo_dir / "snapshots" / revision
            snapshot.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, snapshot / "config.json")
    return hub


def install() -> None:
    """Point the hub at a fresh offline cache (call before importing huggingface_hub)."""
    if os.environ.get("BRIDGE_LANE_HF_CACHE"):
        return  # already set up by a parent process (torchrun workers inherit it)
    root = Path(tempfile.mkdtemp(prefix="bridge-lane-hf-"))
    hub = build_cache(root)
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.environ["BRIDGE_LANE_HF_CACHE"] = str(hub)
    os.environ["HF_HUB_CACHE"] = str(hub)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
