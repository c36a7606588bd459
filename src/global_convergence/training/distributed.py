"""torch.distributed helpers for ``gconv train`` under ``torchrun``.

``--batch-size`` is the global batch: every rank draws the same global batch indices (the data
order is seeded, not sampled per rank) and takes every ``world``-th of them, so one process and N
processes see the same global batches. Each rank's loss is its per-sample sum divided by the
global batch size and multiplied by ``world``; DDP's gradient averaging then yields exactly the
gradient of the global-batch mean.

Batch normalisation is a function of the batch, so a rank that normalised its share with its own
statistics would train a different function from one process. Under DDP the loop replaces the
model's batch-norm layers by :class:`GlobalBatchNorm`, which normalises each training step's
share with the statistics of the whole global batch (on the CPU with gloo as well, where
``torch.nn.SyncBatchNorm`` is not available). It synchronises only inside
:func:`synchronised_batchnorm`, i.e. in the training step every rank takes together; evaluation,
the batch-norm refresh at the switch and rank-0-only diagnostics stay local.

Evaluation and the feature cache are sharded by chunk (chunk ``k`` on rank ``k mod world``) and
assembled in chunk order, so their results do not depend on the number of ranks.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import NumericalError


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
        atexit.register(_leave_process_group)
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def _leave_process_group() -> None:
    """Destroy the process group this module joined when the interpreter exits: left alive,
    its communication threads can meet the exit's destructors and abort the process
    ("terminate called without an active exception"). Commands run one after another in one
    process (a driver under ``torchrun``) share the group until then."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def on_rank_zero(ctx: DistContext, work: Callable[[], Any]) -> tuple[Any, str | None]:
    """``work()`` on rank 0 alone, its result on every rank. A :class:`NumericalError` comes
    back as its message (the caller adds where it happened); any other failure is raised on
    every rank — rank 0 re-raises it, the others raise a ``RuntimeError`` naming it — so no rank
    waits for a broadcast that never comes."""
    result, numerical, error = None, None, None
    if ctx.is_main:
        try:
            result = work()
        except NumericalError as exc:
            numerical = str(exc)
        except Exception as exc:
            error = exc
    if ctx.distributed:
        described = None if error is None else f"{type(error).__name__}: {error}"
        result, numerical, described = broadcast_object((result, numerical, described), ctx)
        if described is not None and error is None:
            raise RuntimeError(f"rank 0 failed: {described}")
    if error is not None:
        raise error
    return result, numerical


def owns_chunk(index: int, ctx: DistContext) -> bool:
    """Whether this rank computes chunk ``index`` of a sharded pass (round robin over ranks)."""
    return index % ctx.world == ctx.rank


def assemble_chunks(parts: dict[int, torch.Tensor], sizes: list[int], ctx: DistContext) -> torch.Tensor:
    """The concatenation of all chunks on every rank, from the chunks each rank computed.

    ``parts`` maps chunk index to this rank's result for the chunks it owns (:func:`owns_chunk`);
    ``sizes`` are the lengths of all chunks. Rank 0 always owns chunk 0, which fixes the shape and
    dtype of the rest. Each chunk is broadcast from its owner into its slice of the result.
    """
    if not ctx.distributed:
        return torch.cat([parts[k] for k in range(len(sizes))])
    shape, dtype = broadcast_object((tuple(parts[0].shape[1:]), parts[0].dtype) if ctx.is_main
                                    else None, ctx)
    out = torch.empty((sum(sizes), *shape), dtype=dtype, device=ctx.device)
    start = 0
    for k, size in enumerate(sizes):
        piece = out[start:start + size]
        if owns_chunk(k, ctx):
            piece.copy_(parts[k])
        dist.broadcast(piece, src=k % ctx.world)
        start += size
    return out


def stream_chunks(compute: Callable[[int], torch.Tensor], sizes: list[int],
                  ctx: DistContext) -> Iterator[torch.Tensor]:
    """All chunks of a sharded pass on every rank, in order, one at a time: chunk ``k`` is
    ``compute(k)`` on its owner (:func:`owns_chunk`), broadcast from there. Rank 0 owns chunk 0,
    which fixes the shape and dtype of the rest."""
    meta = None
    for k, size in enumerate(sizes):
        part = compute(k) if owns_chunk(k, ctx) else None
        if ctx.distributed:
            if meta is None:
                meta = broadcast_object((tuple(part.shape[1:]), part.dtype) if ctx.is_main else None,
                                        ctx)
            part = (part.contiguous() if part is not None
                    else torch.empty((size, *meta[0]), dtype=meta[1], device=ctx.device))
            dist.broadcast(part, src=k % ctx.world)
        yield part


# -- batch norm over the global batch ----------------------------------------------------------
_SYNC_BATCHNORM = False


@contextlib.contextmanager
def synchronised_batchnorm(enabled: bool = True) -> Iterator[None]:
    """Inside this block, :class:`GlobalBatchNorm` layers in training mode with gradients enabled
    normalise with the statistics of the global batch. Every rank must enter it together."""
    global _SYNC_BATCHNORM
    previous, _SYNC_BATCHNORM = _SYNC_BATCHNORM, enabled
    try:
        yield
    finally:
        _SYNC_BATCHNORM = previous


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training-step statistics are those of the global batch across ranks.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm{1,2,3}d``, so checkpoints load
    into plain batch norm on any number of ranks. Where it synchronises (see
    :func:`synchronised_batchnorm`) it computes the mean, then the centred second moment, each
    summed over ranks with a differentiable all-reduce (two-pass, as local batch norm is), and
    updates the running statistics with the global batch's mean and unbiased variance, so every
    rank keeps the same buffers. Elsewhere it is ``F.batch_norm``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (_SYNC_BATCHNORM and self.training and torch.is_grad_enabled()
                and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local_count = x.numel() // max(1, x.shape[1])
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_full((1,), local_count)]))
        count = total[-1].detach()
        if local_count <= 1 and count <= 1:      # reads the device only for a tiny local share
            raise ValueError("batch norm needs more than 1 value per channel in training, got "
                             f"{int(count)} in the global batch")
        mean = total[:-1] / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                          else self.momentum)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return out.to(input.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks (the gradient of a
    sum of every rank's loss with respect to each rank's contribution)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def globalise_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every batch-norm layer inside ``module`` by :class:`GlobalBatchNorm`, in place,
    sharing the same parameter and buffer tensors (an optimizer built before stays valid)."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
                setattr(parent, name, _global_copy(child))
    return module


def _global_copy(bn: nn.modules.batchnorm._BatchNorm) -> GlobalBatchNorm:
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                          device="meta")
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(bn, name))
    new.train(bn.training)
    return new
