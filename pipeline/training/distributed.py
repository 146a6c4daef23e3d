"""Distributed set-up: one process, or torchrun with DDP (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when started by torchrun (WORLD_SIZE > 1); pick the device ("auto": the
    process's GPU when CUDA is present, else the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but PyTorch sees no CUDA GPU here: use device auto or cpu")
    if device != "cpu" and torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"process with LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s): start at most "
                "one process per GPU (torchrun --nproc_per_node), or set device: cpu to train on the CPU with gloo"
            )
        torch.cuda.set_device(local)
        chosen = torch.device("cuda", local)
    else:
        chosen = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, chosen)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.distributed:
        dist.barrier()


def broadcast_object(value: object, info: DistInfo) -> object:
    """Rank 0's value on every rank."""
    if not info.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (batch-norm running statistics) over ranks, so that every rank
    holds the same complete model; gradients keep the parameters identical already."""
    if not info.distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer /= info.world_size


def teardown(info: DistInfo) -> None:
    """Destroy the process group if this module created one."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
