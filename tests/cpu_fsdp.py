"""FSDP on CPU processes (gloo), for tests: Lightning offers FSDP only on GPUs, and torch's FSDP needs the CPU
named as its device. Everything else is Lightning's own FSDP strategy (wrapping, precision, checkpoints)."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from unittest import mock

import lightning.fabric.strategies.fsdp as fabric_fsdp
import lightning.pytorch.strategies.fsdp as trainer_fsdp
import torch
from lightning.fabric.strategies import FSDPStrategy as FabricFSDP
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.strategies import FSDPStrategy as TrainerFSDP
from torch.distributed.fsdp import FullyShardedDataParallel


class CPUFabricFSDP(FabricFSDP):
    def save_checkpoint(self, *args, **kwargs):
        with mock.patch.object(fabric_fsdp, "_get_full_state_dict_context", _full_state_dict_without_offload):
            return super().save_checkpoint(*args, **kwargs)

    def load_checkpoint(self, *args, **kwargs):
        with mock.patch.object(fabric_fsdp, "_get_full_state_dict_context", _full_state_dict_without_offload):
            return super().load_checkpoint(*args, **kwargs)

    def setup_module(self, module):
        module = FullyShardedDataParallel(module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                                          sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                          **self._fsdp_kwargs)
        _setup_activation_checkpointing(module, self._activation_checkpointing_kwargs)
        return module


class CPUTrainerFSDP(TrainerFSDP):
    def lightning_module_state_dict(self):
        with mock.patch.object(trainer_fsdp, "_get_full_state_dict_context", _full_state_dict_without_offload):
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer):
        with mock.patch.object(trainer_fsdp, "_get_full_state_dict_context", _full_state_dict_without_offload):
            return super().optimizer_state(optimizer)

    def _setup_model(self, model):
        model = FullyShardedDataParallel(model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group_member(rank: int, world: int, port: int):
    """A spawned test worker as a member of a process group (:func:`torchrun_env`), which it leaves on exit: the
    group is destroyed so that gloo's threads are joined before the interpreter exits (left to the exit, they
    abort a finished worker now and then: "terminate called without an active exception", SIGABRT)."""
    torchrun_env(rank, world, port)
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun sets, so that Lightning sees an already-launched process group member."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _full_state_dict_without_offload(module, world_size, rank0_only=True):
    # Lightning gathers full state dicts with offload_to_cpu=True; for parameters already on the CPU, torch's FSDP
    # frees the "offloaded" tensor it then clones (a segfault). Accelerator devices are not affected.
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FullyShardedDataParallel.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )
