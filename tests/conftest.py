"""Test set-up: CPU mode for Megatron-Core before anything imports it."""

import pytest

from nemo_lossfree.testing import cpu

cpu.enable()


@pytest.fixture(scope="session")
def single_rank():
    """A one-process gloo world with Megatron's parallel groups (TP=PP=EP=1)."""
    from megatron.core import parallel_state

    from nemo_lossfree.testing.distributed import free_port

    if not parallel_state.model_parallel_is_initialized():
        cpu.init_distributed(0, 1, init_method=f"tcp://127.0.0.1:{free_port()}")
    yield


@pytest.fixture
def pg_collection(single_rank):
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()
