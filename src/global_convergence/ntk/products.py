"""Matrix-free NTK-vector products ``M v = J (Jᵀ v)`` with ``torch.func`` vjp and jvp.

``Jᵀ v`` is one reverse-mode pass of the whole batch with cotangent ``V`` (``V[i, j] = v[j·n + i]``,
the ``vec`` order of :mod:`.jacobian`), and ``J u`` one forward-mode pass with parameter tangent ``u``. Both
differentiate the whole-batch function ``θ ↦ f_X(θ)``, so the products are exact also when batch
norm couples the samples. Several vectors are handled at once with ``vmap``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from .common import (
    WHOLE_BATCH_ROWS,
    chunk_slices,
    numerics_guard,
    output_matrix,
    samples_per_chunk,
    trainable_parameters,
)
from .jacobian import unit_cotangents

Operator = Callable[[Tensor], Tensor]


def ntk_operator(model: nn.Module, x: Tensor) -> tuple[int, Operator]:
    """``(m_y, apply)`` where ``apply(C)`` maps cotangents ``C`` (k, n, m_y) to ``M C`` (k, n, m_y).

    ``M C[t] = J Jᵀ C[t]`` in matrix form: ``u_t = Jᵀ vec(C[t])`` (vjp), then ``J u_t`` (jvp). The
    caller must hold :func:`numerics_guard` (running statistics detached for ``vmap``).
    """
    n = x.shape[0]
    everything = {name: p.detach() for name, p in model.named_parameters()}
    diff = {name: everything.pop(name) for name in trainable_parameters(model)}

    def f(p: dict[str, Tensor]) -> Tensor:
        return output_matrix(functional_call(model, {**everything, **p}, (x,)), n)

    if not diff:                                   # d = 0: M = 0
        with torch.no_grad():
            return f({}).shape[1], torch.zeros_like
    out, vjp_fn = vjp(f, diff)

    def tangent(u: dict[str, Tensor]) -> Tensor:
        return jvp(f, (diff,), (u,))[1]

    def apply(cot: Tensor) -> Tensor:
        (u,) = vmap(vjp_fn)(cot)
        return vmap(tangent)(u)

    return out.shape[1], apply


def _to_cotangents(v: Tensor, n: int, m: int) -> Tensor:
    """Columns of ``v`` (n·m, k) in ``vec`` order → cotangents (k, n, m)."""
    return v.T.reshape(v.shape[1], m, n).transpose(1, 2)


def _from_cotangents(c: Tensor) -> Tensor:
    """Cotangents (k, n, m) → columns (n·m, k) in ``vec`` order."""
    k, n, m = c.shape
    return c.transpose(1, 2).reshape(k, m * n).T


def ntk_vector_product(model: nn.Module, x: Tensor, v: Tensor) -> Tensor:
    """``J Jᵀ v`` without forming ``J`` or the NTK; ``v`` of shape ``(n·m_y,)`` or ``(n·m_y, k)``.

    Rows of ``v`` follow the ``vec`` order (row ``j·n + i``: sample i, output j). Exact for coupled samples
    (train-mode batch norm): the products differentiate the whole-batch function. Running
    statistics are not updated; the model is left unchanged.
    """
    n = x.shape[0]
    with numerics_guard(model):
        m, apply = ntk_operator(model, x)
        if v.shape[0] != n * m or v.dim() not in (1, 2):
            raise ValueError(f"v must have shape ({n * m},) or ({n * m}, k), got {tuple(v.shape)}")
        cols = v.reshape(n * m, -1).to(next((p.dtype for p in model.parameters()), v.dtype))
        parts = [_from_cotangents(apply(_to_cotangents(cols[:, s], n, m)))
                 for s in chunk_slices(cols.shape[1], WHOLE_BATCH_ROWS)]
        result = torch.cat(parts, dim=1) if parts else cols.clone()
    return result.reshape(v.shape)


def ntvp_ntk(model: nn.Module, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """The NTK column block by column block, ``M[:, (·, b)] = J Jᵀ E_b`` (unit vectors ``E_b``).

    Costs one vjp and one jvp of the whole batch per column (about four times the Gram of an
    explicit ``J``) but needs only ``k × d`` memory for ``k`` columns at a time. The result is
    symmetrised, ``(M + Mᵀ)/2``. The caller holds :func:`numerics_guard`.
    """
    n = x.shape[0]
    m, apply = ntk_operator(model, x)
    dtype = next((p.dtype for p in model.parameters()), x.dtype)
    out = torch.empty(m * n, m * n, dtype=dtype, device=x.device)
    k4 = out.view(m, n, m, n)
    like = torch.empty((), dtype=dtype, device=x.device)
    c = samples_per_chunk(0.0, n, m, chunk_size, max_rows=WHOLE_BATCH_ROWS)
    for s in chunk_slices(n, c):
        cols = apply(unit_cotangents(n, m, s, like))            # (m·c, n, m)
        k4[:, :, :, s] = cols.view(m, s.stop - s.start, n, m).permute(3, 2, 0, 1)
    return out.add_(out.T.clone()).mul_(0.5)
