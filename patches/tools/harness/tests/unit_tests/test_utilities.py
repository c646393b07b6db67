"""CPU stand-in for Megatron-LM's ``tests/unit_tests/test_utilities.py``.

The released megatron-core wheel ships no tests. The series' tests are written
against Megatron-LM's ``Utils`` (``initialize_model_parallel`` /
``destroy_model_parallel`` / ``rank`` / ``world_size``); check.sh copies this
file into the unpacked wheel tree so that the same tests run there, one
process, on gloo. In a Megatron-LM checkout the real file is used instead.
"""

import os

import megatron.core.parallel_state as ps
import torch


class Utils:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    @staticmethod
    def initialize_distributed():
        if not torch.distributed.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", os.environ.get("PATCH_CHECK_PORT", "29531"))
            torch.distributed.init_process_group(
                backend="gloo", world_size=Utils.world_size, rank=Utils.rank
            )

    @staticmethod
    def initialize_model_parallel(
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        **kwargs,
    ):
        ps.destroy_model_parallel()
        Utils.initialize_distributed()
        kwargs.setdefault("create_gloo_process_groups", False)
        ps.initialize_model_parallel(
            tensor_model_parallel_size,
            pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size,
            **kwargs,
        )

    @staticmethod
    def destroy_model_parallel():
        ps.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
