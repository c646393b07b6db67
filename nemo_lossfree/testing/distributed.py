"""Run a function on several CPU processes with gloo and Megatron's parallel groups.

Tests, benchmarks and examples use this to exercise the real distributed
behaviour (the balancer's all-reduce, expert parallelism) on one machine.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable

from nemo_lossfree.integrations.launch import free_port

# free_port is re-exported: its home is integrations.launch (the demo launcher uses it too).
__all__ = ["free_port", "run_on_ranks"]


def _child(rank, world_size, port, parallel, fn, args, queue) -> None:
    try:
        from nemo_lossfree.integrations import cpu

        cpu.enable()
        cpu.init_distributed(rank, world_size, init_method=f"tcp://127.0.0.1:{port}", **parallel)
        result = fn(rank, *args)
        queue.put((rank, True, result))
    except BaseException:  # report everything, including SystemExit, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    **parallel: Any,
) -> list[Any]:
    """Call ``fn(rank, *args)`` on ``world_size`` spawned processes; return results by rank.

    ``parallel`` goes to ``nemo_lossfree.testing.cpu.init_distributed``
    (``tensor_model_parallel_size``, ``expert_model_parallel_size``, ...).
    ``fn`` must be importable (a module-level function) and its result
    picklable. Raises ``RuntimeError`` with the failing ranks' tracebacks.
    """
    import torch.multiprocessing as mp  # here: importing free_port must not import torch

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    # One thread per process: the ranks share the machine's cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, parallel, fn, args, queue))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout_s)
            if ok:
                results[rank] = payload
            else:
                failures.append(f"rank {rank}:\n{payload}")
                break  # the other ranks are likely blocked in a collective
    except Exception as exc:  # queue.Empty on timeout
        failures.append(f"timed out after {timeout_s}s waiting for ranks: {exc!r}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if failures else 30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        raise RuntimeError("distributed run failed:\n" + "\n".join(failures))
    return [results[rank] for rank in range(world_size)]
