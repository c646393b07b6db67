"""What the recording benchmarks share: their workers on local ranks, and the routers' scores.

``replay_rules.py`` and ``demo_bias_headroom.py`` both wrap the demo worker to
record router scores; each starts itself once per rank with the scores'
output directory in an environment variable the worker side reads, and
records every router's scores over a forward-only pass of the demo model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_recording_workers(script: str, out_env: str, out: Path, world: int, port: int,
                          demo_flags: list[str]) -> int:
    """``script`` as the ``loss_free`` demo worker on ``world`` local ranks; 0, or 1 after a failed rank."""
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **{out_env: str(out)})
        with open(out / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, script, "--arm", "loss_free", "--out", str(out), *demo_flags],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            ))
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"worker exit codes {codes}; see {out}/rank*.log", file=sys.stderr)
        return 1
    return 0


def router_scores_over(trainer, batches, micro_batch_size: int) -> list:
    """Every router's unbiased scores ``[N, E]`` (numpy) over one forward-only pass of ``batches``.

    ``trainer`` is the demo's ``ArmTrainer``. Megatron's hidden states are
    ``[s, b, h]``: the rows come out s-major per micro-batch.
    """
    import numpy as np

    from nemo_lossfree.scores import router_scores

    store: list[list] = [[] for _ in trainer.routers]

    def hook_for(index: int):
        def hook(router, args, output):
            hidden = args[0].reshape(-1, args[0].shape[-1])
            store[index].append(router_scores(router.gating(hidden).float(), router.score_function).numpy())
        return hook

    handles = [router.register_forward_hook(hook_for(i)) for i, router in enumerate(trainer.routers)]
    try:
        trainer.forward_only(batches, micro_batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return [np.concatenate(parts) for parts in store]
