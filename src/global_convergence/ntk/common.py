"""Helpers shared by the Jacobian / NTK code: parameters, row layout, memory knobs, numerics.

Row layout (:mod:`global_convergence.ntk`). ``f_X ∈ R^{n×m_y}``; ``vec`` stacks its *columns*, so row ``j·n + i``
(0-based) of ``J`` and of the NTK belongs to sample ``i``, output ``j``. Internally blocks are
handled as ``(m_y, c, …)`` tensors (output-major, then the ``c`` samples of a chunk), and the NTK
as its 4-D view ``K4[j, i, k, i'] = K[j·n + i, k·n + i']``.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor, nn

from ..models.analytic import flush_denormals

SUBNORMAL_CUTOFF: float = math.sqrt(torch.finfo(torch.float32).tiny)
"""float32 entries with ``|v| <`` this (≈1.08e-19) are set to 0 before large products (docs/performance.md, "Subnormals").

Any product of two such entries is itself subnormal or zero, and their contribution to an NTK
entry is below ``1e-19 ·`` the other factor — far below float32 rounding of entries of order
``1e-12`` or larger."""

CHUNK_BYTES: int = 2**27
"""Target size (128 MiB) of one chunk's per-sample data (captured activations and output
gradients, or a block of Jacobian rows); sets the number of samples per chunk."""

CACHE_BYTES: int = 2**30
"""When all chunks' per-sample data together take at most this (1 GiB), they are computed once and
kept for the pairwise Gram loop; otherwise the second chunk of each pair is recomputed."""

BLOCK_ELEMENTS: int = 2**24
"""Largest intermediate tensor (in elements, 64 MiB of float32) of one block contraction, such as
the ``(m·s·P)²`` position-by-position Gram of a convolution's output-gradients."""

WHOLE_BATCH_ROWS: int = 32
"""Rows of ``J`` (or columns ``J Jᵀ e_r`` of the NTK) per vmapped pass over the whole batch; each
costs about one batch's activations of memory. Used where samples are coupled, and by "ntvp"."""

BATCHNORM = nn.modules.batchnorm._BatchNorm
"""Base class of BatchNorm1d/2d/3d (and SyncBatchNorm)."""

F = TypeVar("F")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters θ that ``J`` differentiates: ``requires_grad`` ones, named_parameters order.

    ``named_parameters`` lists a parameter shared by several modules once, so ``d`` counts it once.
    """
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def output_matrix(out: Tensor, n: int) -> Tensor:
    """The model output as ``f_X ∈ R^{n×m_y}``; a 1-D output ``(n,)`` is ``m_y = 1``.

    Outputs with more trailing dimensions are flattened row-major into ``m_y`` columns.
    """
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"model output of shape {tuple(out.shape)} does not start with the "
                         f"batch dimension n={n}")
    return out.reshape(n, -1)


def chunk_slices(n: int, chunk: int) -> list[slice]:
    """Consecutive sample ranges ``[0, c), [c, 2c), …`` covering ``0..n−1``."""
    chunk = max(1, int(chunk))
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def samples_per_chunk(bytes_per_sample: float, n: int, m: int, chunk_size: int | None,
                      max_rows: int | None = None) -> int:
    """Samples per chunk: the caller's ``chunk_size`` or what fits :data:`CHUNK_BYTES`.

    Also keeps an ``(m·c)×(m·c)`` float block within :data:`CHUNK_BYTES` and, when given, the
    number of rows ``m·c`` at most ``max_rows``.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of samples, got {chunk_size}")
        return min(int(chunk_size), max(n, 1))
    by_data = CHUNK_BYTES / max(bytes_per_sample, 1.0)
    by_block = math.sqrt(CHUNK_BYTES / 8) / max(m, 1)
    by_rows = max_rows / max(m, 1) if max_rows is not None else float(n)
    return int(max(1, min(n, by_data, by_block, by_rows)))


def zero_subnormals_(t: Tensor) -> Tensor:
    """Set float32 entries of magnitude at most :data:`SUBNORMAL_CUTOFF` to 0, in place (one
    ``hardshrink`` pass; NaN and ±inf are kept).

    Other dtypes are returned unchanged (float64 subnormals start at 1e-308).
    """
    if t.dtype != torch.float32:
        return t
    if not t.is_contiguous():
        return t.copy_(torch.nn.functional.hardshrink(t, SUBNORMAL_CUTOFF))
    return torch.ops.aten.hardshrink.out(t, SUBNORMAL_CUTOFF, out=t)


flush_denormal = flush_denormals
"""Flush-to-zero inside the block, the caller's setting restored (acts on the calling thread only,
docs/performance.md, "Subnormals": the code also zeroes subnormals before large products, :func:`zero_subnormals_`, so
results never depend on it)."""


def batch_statistics_modules(model: nn.Module) -> list[str]:
    """Names of batch-norm modules that normalise with the statistics of the current batch.

    That is train mode, or eval mode without running statistics. Such modules make ``f(x_i)``
    depend on the other samples of the batch, so per-sample Jacobians are wrong for them.
    """
    return [name for name, mod in model.named_modules()
            if isinstance(mod, BATCHNORM) and (mod.training or mod.running_mean is None)]


@contextlib.contextmanager
def running_stats_untouched(model: nn.Module) -> Iterator[None]:
    """Stop train-mode batch norm from updating its running statistics inside the block.

    A train-mode batch norm normalises with batch statistics whether or not it tracks running
    ones, so detaching ``running_mean``, ``running_var`` and ``num_batches_tracked`` leaves the
    output unchanged; it keeps the model's buffers as the caller left them and lets ``vmap`` run
    over the forward pass. The same buffer tensors are put back on exit.
    """
    saved: list[tuple[nn.Module, dict[str, Tensor | None]]] = []
    names = ("running_mean", "running_var", "num_batches_tracked")
    for mod in model.modules():
        if isinstance(mod, BATCHNORM) and mod.training and mod.running_mean is not None:
            saved.append((mod, {k: mod._buffers.get(k) for k in names}))
            for k in names:
                mod._buffers[k] = None
    try:
        yield
    finally:
        for mod, bufs in saved:
            for k, v in bufs.items():
                mod._buffers[k] = v


@contextlib.contextmanager
def numerics_guard(model: nn.Module) -> Iterator[None]:
    """Flush-denormal on and batch-norm running statistics frozen, both restored on exit."""
    with flush_denormal(), running_stats_untouched(model):
        yield


def with_dtype(model: nn.Module, x: Tensor, dtype: torch.dtype | None) -> tuple[nn.Module, Tensor]:
    """``(model, x)`` evaluated in ``dtype``: a converted deep copy when it differs.

    ``None`` keeps the model's own parameter dtype. The caller's model is never modified; a copy
    keeps train/eval modes and ``requires_grad`` flags.
    """
    current = next((p.dtype for p in model.parameters()), None)
    if dtype is not None and current is not None and dtype != current:
        model = copy.deepcopy(model).to(dtype)
    target = dtype or current
    if target is not None and x.is_floating_point() and x.dtype != target:
        x = x.to(target)
    return model, x


def pairwise_blocks(n: int, m: int, chunk: int, features: Callable[[slice], F],
                    contract: Callable[[F, F], Tensor], nbytes: Callable[[F], int],
                    out: Tensor) -> Tensor:
    """Fill the symmetric NTK ``out`` (``n·m × n·m``) block by block over sample chunks.

    For chunks ``a ≤ b``, ``K4[:, a, :, b] = contract(features(a), features(b))`` (a tensor of
    shape ``(m, |a|, m, |b|)``) and the mirrored block is its transpose. Per-chunk data are kept
    when all of them fit :data:`CACHE_BYTES`, else recomputed for each pair.
    """
    k4 = out.view(m, n, m, n)
    slices = chunk_slices(n, chunk)
    cache: dict[int, F] = {}
    keep: bool | None = None

    def get(k: int) -> F:
        nonlocal keep
        if k in cache:
            return cache[k]
        feats = features(slices[k])
        if keep is None:
            keep = nbytes(feats) * len(slices) <= CACHE_BYTES
        if keep:
            cache[k] = feats
        return feats

    for a, sa in enumerate(slices):
        fa = get(a)
        for b in range(a, len(slices)):
            sb = slices[b]
            block = contract(fa, fa if b == a else get(b))
            k4[:, sa, :, sb] = block
            if b != a:
                k4[:, sb, :, sa] = block.permute(2, 3, 0, 1)
        if not keep:
            cache.pop(a, None)
    return out
