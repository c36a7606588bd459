"""Evaluation of a run on whole splits: the training loss and error, and the test error.

The training error is the fraction of misclassified training points and the loss the mean
per-sample loss over the whole training set, the figures both papers plot. In phase 2 a split with
cached trunk features is evaluated by the head on those features (the same float32 numbers the
trunk would give).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .distributed import all_reduce_sum, owns_chunk
from .storage import Features, chunk_count, read_rows

if TYPE_CHECKING:
    from .build import Run

EVAL_CHUNK = 1024
"""Default samples per forward pass when evaluating or caching features (``Run.eval_chunk``)."""


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients; its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def predict(run: "Run", split: str = "train") -> torch.Tensor:
    """Model outputs on a whole split, in chunks (cached features in phase 2)."""
    source, fn = eval_source(run, split)
    device, chunk = run.ctx.device, run.eval_chunk
    with evaluation_mode(run.model):
        return torch.cat([autocast_forward(run, fn, read_rows(source, k * chunk, (k + 1) * chunk,
                                                              device))
                          for k in range(chunk_count(source, chunk))])


def eval_source(run: "Run", split: str) -> tuple[Features, nn.Module]:
    """What evaluates a split: its cached features and the head, or its inputs and the model."""
    cached = None
    if run.cache is not None:
        cached = run.cache.train if split == "train" else run.cache.test
    if cached is not None:
        return cached, run.split.head
    return (run.x if split == "train" else run.x_test), run.model


def evaluate(run: "Run") -> dict[str, Any]:
    """Training loss and error on the whole training set; test error where there is a test set.

    Under DDP every rank must call it: chunk ``k`` is evaluated on rank ``k mod world`` and the
    per-chunk sums are reduced across ranks and added in chunk order (in float64), so the figures
    do not depend on the number of ranks.
    """
    loss_sum, errors = split_sums(run, "train")
    row: dict[str, Any] = {"loss": loss_sum / run.dataset.n}
    row["train_error"] = None if errors is None else errors / run.dataset.n
    row["test_error"] = None
    if run.x_test is not None:
        _, test_errors = split_sums(run, "test")
        row["test_error"] = None if test_errors is None else test_errors / len(run.y_test)
    return row


def split_sums(run: "Run", split: str) -> tuple[float, float | None]:
    """Summed per-sample loss and number of errors over a split (None: no classes)."""
    source, fn = eval_source(run, split)
    targets = run.y if split == "train" else run.y_test
    chunk = run.eval_chunk
    count = chunk_count(source, chunk)
    sums = torch.zeros(count, 2, dtype=torch.float64, device=run.ctx.device)
    with evaluation_mode(run.model):
        for k in range(count):
            if owns_chunk(k, run.ctx):
                rows = read_rows(source, k * chunk, (k + 1) * chunk, run.ctx.device)
                out = autocast_forward(run, fn, rows).float()
                y = targets[k * chunk:(k + 1) * chunk]
                sums[k, 0] = run.loss.per_sample(out, y).double().sum()
                errors = run.loss.errors(out, y)
                sums[k, 1] = math.nan if errors is None else errors
    sums = all_reduce_sum(sums, run.ctx).sum(dim=0).tolist()
    return sums[0], None if math.isnan(sums[1]) else sums[1]


def autocast_forward(run: "Run", fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``, under bf16 autocast on CUDA with ``--amp``."""
    if run.config.amp and run.ctx.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(x).float()
    return fn(x)
