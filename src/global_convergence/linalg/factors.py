"""Matrices known through their rows, with the Gram products the rank decisions need.

A :class:`RowFactor` ``A`` (``rows × cols``) gives blocks of ``G = A Aᵀ``, products ``G v``, its
squared row norms (``diag G``) and column chunks of ``A`` — never more of ``A`` than asked for.

* :class:`DenseFactor`: ``A`` held in memory (``[h_X, 1]``, a Jacobian).
* :class:`KhatriRaoFactor`: the row-wise Kronecker product of [K22] §3.3.1,
  ``ϕ_i = [s_{i1} z_i, …, s_{i m_H} z_i] = s_i ⊗ z_i``; only ``S`` (n × m_H) and ``Z``
  (n × m_{H−1}) are stored, and ``ϕϕᵀ = (S Sᵀ) ⊙ (Z Zᵀ)`` since
  ``ϕ_i · ϕ_l = (s_i · s_l)(z_i · z_l)``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor

from .symmetric import gram as symmetric_gram

GRAM_ROW_CHUNK = 4096
"""Rows of a Gram block computed at once (bounds the temporaries to ``GRAM_ROW_CHUNK × cols``)."""


class RowFactor(ABC):
    """A ``rows × cols`` matrix ``A`` with ``G = A Aᵀ`` available block by block."""

    rows: int
    cols: int

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def inner(self) -> int:
        """Length of the inner products forming one Gram entry (enters the rounding bound)."""

    @abstractmethod
    def row_norms_sq(self) -> Tensor:
        """``diag G = (‖a_i‖²)_i``."""

    @abstractmethod
    def _gram_rows(self, r: slice, c: slice, out: Tensor) -> None:
        """Write ``G[r, c]`` into ``out``."""

    @abstractmethod
    def gram_matvec(self, v: Tensor) -> Tensor:
        """``G v = A (Aᵀ v)`` for ``v`` of shape (rows,) or (rows, k)."""

    @abstractmethod
    def column_chunks(self, width: int) -> Iterator[Tensor]:
        """``A[:, c]`` for consecutive column ranges of about ``width`` columns."""

    @property
    def shape(self) -> list[int]:
        return [self.rows, self.cols]

    def trace(self) -> float:
        """``tr G = Σ_i ‖a_i‖²``."""
        return float(self.row_norms_sq().sum())

    def gram_block(self, r: slice, c: slice) -> Tensor:
        """``G[r, c]`` as a new contiguous tensor, built in row chunks of :data:`GRAM_ROW_CHUNK`."""
        r0, r1 = _bounds(r, self.rows)
        c0, c1 = _bounds(c, self.rows)
        out = torch.empty(r1 - r0, c1 - c0, dtype=self.dtype, device=self.device)
        for s in range(r0, r1, GRAM_ROW_CHUNK):
            e = min(s + GRAM_ROW_CHUNK, r1)
            self._gram_rows(slice(s, e), slice(c0, c1), out[s - r0:e - r0])
        return out

    def gram(self) -> Tensor:
        """The full ``G = A Aᵀ`` (rows × rows)."""
        return self.gram_block(slice(0, self.rows), slice(0, self.rows))


def _bounds(s: slice, size: int) -> tuple[int, int]:
    start, stop, step = s.indices(size)
    if step != 1:
        raise ValueError("Gram blocks take contiguous slices")
    return start, stop


class DenseFactor(RowFactor):
    """``A`` held as one tensor."""

    def __init__(self, a: Tensor) -> None:
        if a.dim() != 2:
            raise ValueError(f"a factor must be a matrix, got shape {tuple(a.shape)}")
        self.a = a
        self.rows, self.cols = a.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def inner(self) -> int:
        return self.cols

    def row_norms_sq(self) -> Tensor:
        return self.a.pow(2).sum(dim=1)

    def _gram_rows(self, r: slice, c: slice, out: Tensor) -> None:
        torch.matmul(self.a[r], self.a[c].T, out=out)

    def gram(self) -> Tensor:
        """``A Aᵀ`` in one rank-k update (one triangle, :mod:`.symmetric`) up to
        :data:`GRAM_ROW_CHUNK` rows; in row blocks beyond."""
        return symmetric_gram(self.a) if self.rows <= GRAM_ROW_CHUNK else super().gram()

    def gram_matvec(self, v: Tensor) -> Tensor:
        return self.a @ (self.a.T @ v)

    def column_chunks(self, width: int) -> Iterator[Tensor]:
        for c in range(0, self.cols, max(1, width)):
            yield self.a[:, c:c + width]


class KhatriRaoFactor(RowFactor):
    """``ϕ`` with rows ``ϕ_i = s_i ⊗ z_i`` (column ``k·m_z + l`` is ``s_ik z_il``), from
    ``s`` (n × m_s) and ``z`` (n × m_z) — [K22]'s ``ϕ(q, θ(1:H−2))`` with ``s = σ̃(Z q)``."""

    def __init__(self, s: Tensor, z: Tensor, zz: Tensor | None = None,
                 z_cache: dict | None = None) -> None:
        """``zz``: ``Z Zᵀ`` already formed (shared by the factors of several outputs with the same
        ``Z``, [K22] §3.3.1), used for the Gram blocks instead of recomputing it. ``z_cache``: a
        dict shared by those factors, where products of ``Z`` alone computed for one output
        (the preconditioned ``Z`` of :mod:`.preconditioning`) are kept for the others."""
        if zz is not None and tuple(zz.shape) != (z.shape[0], z.shape[0]):
            raise ValueError(f"zz must be Z Zᵀ of shape {(z.shape[0], z.shape[0])}, got "
                             f"{tuple(zz.shape)}")
        self.zz = zz
        self.z_cache = {} if z_cache is None else z_cache
        if s.dim() != 2 or z.dim() != 2 or s.shape[0] != z.shape[0]:
            raise ValueError(f"s and z must be matrices with the same number of rows, got "
                             f"{tuple(s.shape)} and {tuple(z.shape)}")
        if s.dtype != z.dtype or s.device != z.device:
            raise ValueError("s and z must share dtype and device")
        self.s, self.z = s, z
        self.rows = s.shape[0]
        self.cols = s.shape[1] * z.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.z.dtype

    @property
    def device(self) -> torch.device:
        return self.z.device

    @property
    def inner(self) -> int:
        # fl(fl(s_i·s_l) · fl(z_i·z_l)): errors γ_{m_s} + γ_{m_z} + u ≤ γ_{m_s + m_z + 1}
        return self.s.shape[1] + self.z.shape[1] + 1

    def row_norms_sq(self) -> Tensor:
        return self.s.pow(2).sum(dim=1) * self.z.pow(2).sum(dim=1)

    def _gram_rows(self, r: slice, c: slice, out: Tensor) -> None:
        if self.zz is not None:
            out.copy_(self.zz[r, c])
        else:
            torch.matmul(self.z[r], self.z[c].T, out=out)
        out.mul_(self.s[r] @ self.s[c].T)

    def gram(self) -> Tensor:
        """``(S Sᵀ) ⊙ (Z Zᵀ)`` from two rank-k updates (the shared ``Z Zᵀ`` when given) up to
        :data:`GRAM_ROW_CHUNK` rows; in row blocks beyond."""
        if self.rows > GRAM_ROW_CHUNK:
            return super().gram()
        return symmetric_gram(self.s).mul_(self.zz if self.zz is not None
                                           else symmetric_gram(self.z))

    def gram_matvec(self, v: Tensor) -> Tensor:
        vec = v.dim() == 1
        v = v[:, None] if vec else v
        out = torch.empty_like(v)
        for k in range(v.shape[1]):
            w = self.s.T @ (v[:, k, None] * self.z)           # ϕᵀv reshaped (m_s × m_z)
            out[:, k] = ((self.z @ w.T) * self.s).sum(dim=1)  # ϕ w
        return out[:, 0] if vec else out

    def column_chunks(self, width: int) -> Iterator[Tensor]:
        units = max(1, width // self.z.shape[1])
        for k in range(0, self.s.shape[1], units):
            s = self.s[:, k:k + units]
            yield (s[:, :, None] * self.z[:, None, :]).reshape(self.rows, -1)

    def dense(self) -> Tensor:
        """The full ``ϕ`` (n × m_s·m_z): only for small problems and tests."""
        return torch.cat(list(self.column_chunks(self.cols)), dim=1)
