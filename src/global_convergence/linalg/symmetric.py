"""Symmetric products ``a aᵀ`` of row matrices through a BLAS rank-k update.

``a @ a.T`` in NumPy calls BLAS ``syrk``, which computes one triangle: half the multiply-adds of a
general product. The NTK's per-layer Grams and the rank certificates' Gram matrices use it on the
CPU. NumPy's BLAS keeps its own thread pool, so every call here runs on PyTorch's thread count
(threadpoolctl, when installed).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def blas_controller() -> object | None:
    """threadpoolctl's controller of the BLAS libraries loaded (NumPy's, and SciPy's that
    :mod:`.lapack` calls), or None without it."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:             # threadpoolctl comes with scikit-learn; optional here
        return None
    importlib.import_module("scipy.linalg")   # loads SciPy's BLAS, so that the controller sees it
    return ThreadpoolController()


def blas_threads_like_torch() -> contextlib.AbstractContextManager:
    """NumPy's BLAS limited to ``torch.get_num_threads()`` threads inside the block.

    NumPy's BLAS keeps its own pool (one thread per core), blind to ``torch.set_num_threads``;
    on a busy machine its spinning threads cost more CPU time than the product saves
    (docs/performance.md, "Empirical NTK").
    """
    controller = blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=torch.get_num_threads(), user_api="blas")


def gram(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``a bᵀ`` for row matrices (``a aᵀ`` when ``b`` is None).

    On the CPU a symmetric product goes through NumPy, whose BLAS call for ``a @ a.T`` is a
    rank-k update computing one triangle (half the multiply-adds of ``torch.mm``); measured
    faster for the tall activation matrices of the ``mlp`` and for the wide gradient rows of
    LeNet's convolutions alike (docs/performance.md). It runs on as many threads as PyTorch's
    intra-op pool (:func:`blas_threads_like_torch`).
    """
    if (b is None and a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
            and not a.requires_grad and a.dim() == 2):
        with blas_threads_like_torch():
            return _numpy_symmetric(a)
    return a @ (a if b is None else b).T


def _numpy_symmetric(a: Tensor) -> Tensor:
    """``a aᵀ`` by NumPy's rank-k update (one triangle), on whatever BLAS threads are set."""
    an = a.contiguous().numpy()
    return torch.from_numpy(an @ an.T)


@functools.lru_cache(maxsize=4)
def _product_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """Python threads that run one symmetric product each (NumPy releases the GIL in BLAS)."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gconv-gram")


def grams(mats: Sequence[Tensor], outs: Sequence[Tensor] | None = None) -> list[Tensor]:
    """``[a aᵀ for a in mats]``, the products side by side on the CPU; written into ``outs``
    (as :func:`symmetric_into` does) when given.

    The per-layer products of a structured NTK are small (``1000 × 300`` for the ``mlp``): one
    BLAS call does not split well over cores, and NumPy's BLAS threads wait for cores that
    PyTorch's idle threads still spin on. With ``t = torch.get_num_threads() > 1`` the products run
    ``t`` at a time, each on one BLAS thread, largest first; a product costing more than all the
    others together runs alone on ``t`` threads first.
    """
    def one(i: int) -> Tensor:        # on the BLAS threads the caller set
        if outs is None:
            return _numpy_symmetric(mats[i])
        if _numpy_writes(mats[i], outs[i]):
            return _numpy_symmetric_into(mats[i], outs[i])
        return outs[i].copy_(mats[i] @ mats[i].T)

    threads = torch.get_num_threads()
    eligible = all(a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
                   and not a.requires_grad and a.dim() == 2 for a in mats)
    if threads <= 1 or len(mats) < 2 or not eligible or blas_controller() is None:
        return [gram(a) if outs is None else symmetric_into(a, o)
                for a, o in zip(mats, outs or mats)]
    cost = [a.shape[0] ** 2 * a.shape[1] for a in mats]
    order = sorted(range(len(mats)), key=cost.__getitem__, reverse=True)
    done: list[Tensor | None] = [None] * len(mats)
    if cost[order[0]] > sum(cost) - cost[order[0]]:
        with blas_threads_like_torch():
            done[order[0]] = one(order[0])
        order = order[1:]
    with blas_controller().limit(limits=1, user_api="blas"):
        for i, g in zip(order, _product_pool(threads).map(one, order)):
            done[i] = g
    return done  # type: ignore[return-value]


def symmetric_into(a: Tensor, out: Tensor) -> Tensor:
    """``out ← a aᵀ`` for a row matrix ``a`` (n, k) and an (n, n) ``out`` with unit column stride
    (a slice of a wider tensor). On the CPU this is NumPy's rank-k update, as in
    :func:`gram` (one triangle, half the multiply-adds of a general product), written straight
    into ``out``; elsewhere a torch product copied in."""
    if _numpy_writes(a, out):
        with blas_threads_like_torch():
            return _numpy_symmetric_into(a, out)
    return out.copy_(a @ a.T)


def _numpy_writes(a: Tensor, out: Tensor) -> bool:
    return (a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64)
            and out.dtype == a.dtype and out.device.type == "cpu" and out.stride(-1) == 1
            and a.dim() == 2)


def _numpy_symmetric_into(a: Tensor, out: Tensor) -> Tensor:
    """``out ← a aᵀ`` by NumPy, on whatever BLAS threads are set."""
    an = a.detach().contiguous().numpy()
    np.matmul(an, an.T, out=out.detach().numpy())
    return out
