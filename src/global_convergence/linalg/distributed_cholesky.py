"""Shifted blocked Cholesky of a Gram matrix split over ``torch.distributed`` ranks.

The certificate of :mod:`.cholesky` needs the lower triangle of ``Ĝ − μI`` (``n²/2`` numbers:
21.5 GB in float64 at n = 73,257, the SVHN training set of [K22] Table 2), more than one machine
may hold. Here its block columns ``L[k0:, k0:k0+b]`` are dealt out block-cyclically (block column
``k`` lives on rank ``k mod world``), each rank rebuilds only its own Gram blocks from the factor
(``ϕϕᵀ = (S Sᵀ) ⊙ (Z Zᵀ)`` for a :class:`~.factors.KhatriRaoFactor`), and the factorisation is
right-looking: at step ``k`` the owner factors the diagonal block, solves for the rows below it
and broadcasts the panel; every rank subtracts ``L[j0:, k] L[j0:j1, k]ᵀ`` from its own block
columns ``j > k`` (the owner of column ``k + 1`` first, so that it can factor and send the next
panel while the others update: a look-ahead of one panel). No rank ever holds more than its share
of the triangle and one received panel (:func:`distributed_bytes`).

Why ``broadcast`` is all it takes: each block column receives exactly the updates the one-process
left-looking factorisation (:func:`.cholesky.shifted_cholesky` with ``block``) subtracts, in the
same order and with the same shapes; a broadcast copies the panel bit for bit and no number is
summed across ranks. So the computed factor is that of one process (up to the summation order
inside a BLAS call), Rump's bound ``γ_{n+2} tr G`` and the Gram rounding ``γ_k tr G``
(:mod:`.tolerance`) hold unchanged, and success proves the same ``λ_min(G) > μ − δ_G − c_chol``.
The broadcast of a small status before each panel makes every rank stop at the same breakdown
row. The backends supporting ``broadcast`` on the tensors' device are gloo (CPU, CUDA) and NCCL
(CUDA).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .cholesky import INVERSE_ITERATIONS, TRSM_ROW_CHUNK, inverse_iteration
from .factors import GRAM_ROW_CHUNK, RowFactor
from .lapack import cholesky_lower


@dataclass(frozen=True)
class Ranks:
    """The process group a distributed factorisation runs on: this rank's index in it and its
    size. Without an initialised process group, one rank and no communication."""

    group: dist.ProcessGroup | None
    rank: int
    world: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None) -> "Ranks":
        if not (dist.is_available() and dist.is_initialized()):
            return cls(None, 0, 1)
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def owner(self, k: int) -> int:
        """The rank holding block column ``k`` (block-cyclic)."""
        return k % self.world

    def broadcast(self, tensor: Tensor, src: int, async_op: bool = False) -> dist.Work | None:
        """``tensor`` (contiguous, written in place) from group rank ``src`` to every rank; with
        ``async_op`` the pending work (wait on it before the tensor is freed)."""
        if self.world == 1:
            return None
        root = src if self.group is None else dist.get_global_rank(self.group, src)
        return dist.broadcast(tensor, src=root, group=self.group, async_op=async_op)

    def all_min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's ``value``."""
        if self.world == 1:
            return int(value)
        box = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MIN, group=self.group)
        return int(box)


def block_starts(n: int, block: int) -> list[int]:
    """First row of every block column."""
    return list(range(0, n, block))


def distributed_bytes(n: int, block: int, itemsize: int, world: int) -> list[int]:
    """Memory of each rank: its block columns of the lower triangle, plus the larger of the
    temporary of one Gram row chunk (while the columns are built) and one received panel (when
    ``world > 1``) with one triangular-solve chunk (during the factorisation)."""
    shares = [0] * world
    for k, k0 in enumerate(block_starts(n, block)):
        shares[k % world] += (n - k0) * min(block, n - k0)
    width = min(block, n)
    panel = n * width if world > 1 else 0
    extra = max(min(GRAM_ROW_CHUNK, n) * width, panel + min(TRSM_ROW_CHUNK, n) * width)
    return [(share + extra) * itemsize for share in shares]


@dataclass
class DistributedCholeskyFactor:
    """``L`` with ``L Lᵀ = Ĝ − shift·I``; this rank holds the block columns ``panels[k] =
    L[k0:, k0:k0+b]`` it owns (``k0 = k·block``)."""

    panels: dict[int, Tensor]
    n: int
    shift: float
    block: int
    ranks: Ranks
    dtype: torch.dtype
    device: torch.device

    def local_numel(self) -> int:
        """Numbers of ``L`` held on this rank."""
        return sum(p.numel() for p in self.panels.values())

    def solve(self, v: Tensor) -> Tensor:
        """``(Ĝ − shift·I)⁻¹ v`` (``v`` of shape (n, k), the same on every rank), by forward and
        backward substitution: the owner of block ``k`` solves its part and broadcasts it, so
        every rank ends with the whole solution. The arithmetic is
        :meth:`.cholesky.CholeskyFactor.solve`'s."""
        y = v.clone()
        starts = block_starts(self.n, self.block)
        for k, k0 in enumerate(starts):
            b = min(self.block, self.n - k0)
            if self.ranks.owner(k) == self.ranks.rank:
                p = self.panels[k]
                yk = torch.linalg.solve_triangular(p[:b], y[k0:k0 + b], upper=False)
                y[k0:k0 + b] = yk
                if p.shape[0] > b:
                    y[k0 + b:] -= p[b:] @ yk
            self.ranks.broadcast(y[k0:], self.ranks.owner(k))
        for k in reversed(range(len(starts))):
            k0 = starts[k]
            b = min(self.block, self.n - k0)
            if self.ranks.owner(k) == self.ranks.rank:
                p = self.panels[k]
                rhs = y[k0:k0 + b]
                if p.shape[0] > b:
                    rhs = rhs - p[b:].T @ y[k0 + b:]
                y[k0:k0 + b] = torch.linalg.solve_triangular(p[:b].T, rhs, upper=True)
            self.ranks.broadcast(y[k0:k0 + b], self.ranks.owner(k))
        return y

    def smallest_eigenvalue_estimate(self, iterations: int = INVERSE_ITERATIONS,
                                     seed: int = 0) -> float:
        """``λ_min(Ĝ)`` by inverse iteration, ``shift + 1/‖(Ĝ − shift·I)⁻¹ x‖`` for a unit ``x``
        (an upper bound at every step), with the start vector and steps of
        :meth:`.cholesky.CholeskyFactor.smallest_eigenvalue_estimate`; the same on every rank."""
        return inverse_iteration(self.solve, self.n, self.shift, self.dtype, self.device,
                                 iterations, seed)


@dataclass
class DistributedCholeskyOutcome:
    """The distributed factor, or the 0-based row where the factorisation broke down (the same
    on every rank; the leading ``failed_at × failed_at`` block was positive definite)."""

    factor: DistributedCholeskyFactor | None
    failed_at: int | None
    wait_seconds: float = 0.0

    @property
    def success(self) -> bool:
        return self.factor is not None


def distributed_shifted_cholesky(factor: RowFactor, shift: float, block: int,
                                 group: dist.ProcessGroup | None = None
                                 ) -> DistributedCholeskyOutcome:
    """Right-looking blocked Cholesky of ``Ĝ − shift·I``, ``Ĝ = A Aᵀ`` from ``factor``, with
    block columns of ``block`` columns spread block-cyclically over the ranks of ``group``
    (default: the whole world; without a process group, one rank). Every rank of the group
    calls it with the same factor, shift and block.

    Look-ahead by one panel: the owner of block column ``k + 1`` applies panel ``k`` to it first,
    factors it and starts its broadcast before updating its other columns, so the next panel is
    on its way while every rank is still busy with the current one. Each column still receives
    panels ``0, 1, …`` in order. ``outcome.wait_seconds`` is the time this rank waited for panels.
    """
    ranks = Ranks.of(group)
    n, starts = factor.rows, block_starts(factor.rows, block)
    local = _own_gram_columns(factor, shift, block, ranks)
    buffer = (torch.empty(n * min(block, n), dtype=factor.dtype, device=factor.device)
              if ranks.world > 1 else None)
    sent: dict[int, tuple[int, list]] = {}      # block column -> (LAPACK info, its broadcasts)
    waited = 0.0
    try:
        for k, k0 in enumerate(starts):
            b, src = min(block, n - k0), ranks.owner(k)
            if src == ranks.rank:
                if k not in sent:
                    sent[k] = _factor_and_send(local[k], b, k, ranks)
                info, panel = sent[k][0], local[k]
            else:
                start = time.perf_counter()
                status = torch.zeros(1, dtype=torch.int64, device=factor.device)
                ranks.broadcast(status, src)
                info = int(status)
                panel = buffer[:(n - k0) * b].view(n - k0, b)
                if info == 0:
                    ranks.broadcast(panel, src)
                waited += time.perf_counter() - start
            if info != 0:
                return DistributedCholeskyOutcome(None, k0 + info - 1, waited)
            ahead = k + 1 if k + 1 in local and k + 1 not in sent else None
            if ahead is not None:
                _update(local[ahead], panel, starts[ahead] - k0)
                sent[ahead] = _factor_and_send(local[ahead], local[ahead].shape[1], ahead, ranks)
            for j in (j for j in local if j > k and j != ahead):
                _update(local[j], panel, starts[j] - k0)
    finally:
        for _, works in sent.values():
            for work in works:
                work.wait()
    return DistributedCholeskyOutcome(
        DistributedCholeskyFactor(local, n, shift, block, ranks, factor.dtype, factor.device),
        None, waited)


def _update(column: Tensor, panel: Tensor, offset: int) -> None:
    """``column −= L[j0:, k] L[j0:j1, k]ᵀ`` with ``panel = L[k0:, k]`` and ``offset = j0 − k0``."""
    rows = panel[offset:]
    column.addmm_(rows, rows[:column.shape[1]].T, alpha=-1.0)


def _factor_and_send(column: Tensor, b: int, k: int, ranks: Ranks) -> tuple[int, list]:
    """Factor this rank's block column ``k`` in place and start broadcasting its status and, on
    success, the panel; ``(info, pending broadcasts)``."""
    info = _factor_panel(column, b)
    status = torch.full((1,), info, dtype=torch.int64, device=column.device)
    works = [ranks.broadcast(status, ranks.rank, async_op=True)]
    if info == 0:
        works.append(ranks.broadcast(column, ranks.rank, async_op=True))
    return info, [w for w in works if w is not None]


def _own_gram_columns(factor: RowFactor, shift: float, block: int, ranks: Ranks
                      ) -> dict[int, Tensor]:
    """This rank's block columns ``G[k0:, k0:k1] − shift·I`` rebuilt from the factor."""
    n, local = factor.rows, {}
    for k, k0 in enumerate(block_starts(n, block)):
        if ranks.owner(k) == ranks.rank:
            k1 = min(k0 + block, n)
            a = factor.gram_block(slice(k0, n), slice(k0, k1))
            a[:k1 - k0].diagonal().sub_(shift)
            local[k] = a
    return local


def _factor_panel(a: Tensor, b: int) -> int:
    """Factor the updated block column ``a`` in place (Cholesky of its ``b × b`` top, triangular
    solve of the rows below in chunks); LAPACK's ``info`` (0 on success)."""
    lower, info = cholesky_lower(a[:b], overwrite=True)
    if info != 0:
        return info
    a[:b] = lower
    for s in range(b, a.shape[0], TRSM_ROW_CHUNK):
        e = min(s + TRSM_ROW_CHUNK, a.shape[0])
        a[s:e] = torch.linalg.solve_triangular(lower.T, a[s:e], upper=True, left=False)
    return 0
