"""One optimisation step of a run: its global batch, the closure, and what the closure calls.

Determinism: the data order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)`` and the augmentation of step ``t`` from one seeded with ``(seed, t)``, so a resumed
run replays exactly the batches an uninterrupted run sees, on any number of ranks. Under DDP every
rank takes every ``world``-th index of the same global batch (see :mod:`.distributed`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import augment_batch
from ..models import SplitNet
from .distributed import DistContext, all_reduce_sum, rank_share, synchronised_batchnorm
from .evaluation import autocast_forward
from .storage import gather_rows, to_device

if TYPE_CHECKING:
    from .build import Run


def batch_indices(run: "Run", step: int) -> torch.Tensor:
    """Global batch of ``step``: a slice of the seeded permutation of its epoch (drawn once per
    epoch: it depends on the seed and the epoch alone, so a resumed run draws the same)."""
    s = run.schedule
    epoch, position = divmod(step, s.steps_per_epoch)
    if s.batch >= s.n:
        return torch.arange(s.n)
    if run.epoch_order is None or run.epoch_order[0] != epoch:
        generator = torch.Generator().manual_seed(run.config.seed * 1_000_003 + epoch)
        run.epoch_order = (epoch, torch.randperm(s.n, generator=generator))
    return run.epoch_order[1][position * s.batch:(position + 1) * s.batch]


def batch_inputs(run: "Run", index: torch.Tensor, step: int) -> torch.Tensor:
    """Inputs of a batch on the device: cached features in a cached phase 2, else (augmented) raw
    inputs, gathered where they live."""
    if run.cache is not None:
        return gather_rows(run.cache.train, index, run.ctx.device)
    xb = run.x[index.to(run.x.device)]
    if run.config.augment:
        generator = torch.Generator().manual_seed(run.config.seed * 7_919 + step)
        xb = augment_batch(xb.cpu(), run.dataset.augment, generator)
    xb = to_device(xb, run.ctx.device)
    if run.config.channels_last and xb.dim() == 4:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb


def uses_lbfgs(run: "Run") -> bool:
    """Whether the active optimizer is L-BFGS (EE's ``--exploit-optimizer lbfgs`` in phase 2)."""
    return run.wrapper is not None and isinstance(run.wrapper.active_optimizer, torch.optim.LBFGS)


def make_closure(run: "Run", step: int) -> Callable[[], torch.Tensor]:
    """Closure of one step: zero grads, loss of this rank's share of the global batch, backward.

    Returns the global-batch mean loss (all ranks agree on it, which L-BFGS's line search needs).
    L-BFGS exploitation always uses the full batch.
    """
    global_index = torch.arange(run.schedule.n) if uses_lbfgs(run) else batch_indices(run, step)
    local = rank_share(global_index, run.ctx)
    inputs, targets = batch_inputs(run, local, step), run.y[local.to(run.y.device)]
    scale = run.ctx.world / len(global_index)

    def closure() -> torch.Tensor:
        zero_grad(run)
        with synchronised_batchnorm(run.ctx.distributed):
            out = autocast_forward(run, run.train_module, inputs)
        local_sum = run.loss.per_sample(out.float(), targets).sum()
        (local_sum * scale).backward()
        return all_reduce_sum(local_sum.detach(), run.ctx) / len(global_index)

    return closure


def zero_grad(run: "Run") -> None:
    (run.wrapper or run.optimizer).zero_grad(set_to_none=True)


def closure_step(run: "Run") -> float:
    """One optimizer step on the batch of ``run.step``; returns its global-batch mean loss."""
    closure = make_closure(run, run.state.step)
    stepper = run.wrapper or run.optimizer
    if not uses_lbfgs(run):
        loss = closure()
        stepper.step()
    else:
        loss = stepper.step(closure)
    return float(loss)


def attach_train_module(run: "Run") -> None:
    """The module the closure calls: the (DDP-wrapped) model in phase 1; in phase 2 the head on
    cached features, or the model with its frozen trunk. Under DDP phase 2 wraps only the head
    in a fresh DDP instance: the trunk's ``requires_grad`` changed at the switch."""
    if run.phase == 1:
        module = _ddp(run.model, run.ctx) if run.ctx.distributed else run.model
        run.train_module = torch.compile(module) if run.config.compile else module
        return
    head = run.split.head
    if run.ctx.distributed:
        head = _ddp(head, run.ctx)
    module = head if run.cache is not None else _FrozenTrunkThen(run.split, head)
    run.train_module = torch.compile(module) if run.config.compile else module


def _ddp(module: nn.Module, ctx: DistContext) -> DistributedDataParallel:
    """``module`` in DDP, on this rank's GPU where there is one."""
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


class _FrozenTrunkThen(nn.Module):
    """``head(trunk(x))`` with the frozen trunk of ``split`` and a possibly DDP-wrapped head."""

    def __init__(self, split: SplitNet, head: nn.Module) -> None:
        super().__init__()
        self.split, self.head = split, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.split.features(x))
