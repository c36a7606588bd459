"""torch.distributed helpers for ``gconv train`` under ``torchrun``.

``--batch-size`` is the global batch: every rank draws the same global batch indices (the data
order is seeded, not sampled per rank) and takes every ``world``-th of them, so one process and N
processes see the same global batches. Each rank's loss is its per-sample sum divided by the
global batch size and multiplied by ``world``; DDP's gradient averaging then yields exactly the
gradient of the global-batch mean.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device_kind: str) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, torch.device("cuda" if device_kind == "cuda" else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def rank_share(indices: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's part of a global batch: every ``world``-th index, starting at ``rank``."""
    return indices[ctx.rank::ctx.world] if ctx.distributed else indices


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
