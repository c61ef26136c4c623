"""Start ``torch.distributed`` from the environment ``torchrun`` sets (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "shutdown"]


def init_from_env(device: str = "auto") -> tuple[int, int]:
    """Initialise the default process group when ``WORLD_SIZE > 1``; returns (rank, world).

    device: ``auto`` / ``cuda`` use NCCL when CUDA is available (one GPU per local rank),
    otherwise gloo. A no-op returning (0, 1) outside ``torchrun``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Destroy the default process group if one was started."""
    if dist.is_initialized():
        dist.destroy_process_group()
