"""The Jacobian ``J(θ) = ∂ vec(f_X(θ)) / ∂θ ∈ R^{(n·m_y)×d}`` in ``vec`` row order (columns of ``f_X`` stacked: row ``j·n + i`` is sample i, output j).

Two engines, both returning blocks of rows as ``(m_y, c, d)`` tensors (outputs, then the ``c``
samples of a chunk):

* **per-sample** (samples independent): ``torch.func.vmap(jacrev(f(·, x_i)))`` over a chunk of
  samples — one reverse pass per sample and output, vectorised.
* **whole-batch** (batch norm with batch statistics couples the samples, so ``f(x_i)`` depends on
  every ``x_k``): one forward pass over all n samples, then batched backward passes with one-hot
  ``grad_outputs`` for the rows of a chunk. Exact for any coupling.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .common import (
    WHOLE_BATCH_ROWS,
    batch_statistics_modules,
    chunk_slices,
    numerics_guard,
    output_matrix,
    samples_per_chunk,
    trainable_parameters,
)


def flat_width(params: dict[str, Tensor]) -> int:
    """``d``: the number of scalar entries in ``params``."""
    return sum(p.numel() for p in params.values())


def _detached(model: nn.Module) -> dict[str, Tensor]:
    """All parameters of ``model``, detached (constants for ``torch.func``)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def per_sample_jacobian(model: nn.Module, x: Tensor, wrt: list[str],
                        out: Tensor | None = None) -> Tensor:
    """Rows of ``J`` for the samples ``x`` (a chunk) w.r.t. the parameters named ``wrt``.

    ``J[(j, i), :] = ∂ f(x_i)_j / ∂θ_wrt`` with the other parameters held fixed; requires that
    ``f(x_i)`` depend on ``x_i`` alone. Returns ``(m_y, c, d_wrt)``, parameters flattened in the
    order of ``wrt``, written into ``out`` when given (saves a copy of the block).
    """
    fixed = _detached(model)
    diff = {name: fixed.pop(name) for name in wrt}

    def f_single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f_single), in_dims=(None, 0))(diff, x)   # name → (c, m, *shape)
    c, m = jac[wrt[0]].shape[:2]
    if out is None:
        out = torch.empty(m, c, flat_width(diff), dtype=jac[wrt[0]].dtype, device=x.device)
    offset = 0
    for name in wrt:
        width = diff[name].numel()
        out[:, :, offset:offset + width] = jac[name].reshape(c, m, width).transpose(0, 1)
        offset += width
    return out


def unit_cotangents(n: int, m: int, rows: slice, like: Tensor) -> Tensor:
    """One-hot ``grad_outputs`` ``E`` of shape ``(m·c, n, m)`` selecting rows ``(j, i ∈ rows)``.

    ``E[j·c + t, rows.start + t, j] = 1``: contracting ``∂f_X/∂θ`` with ``E[r]`` gives row r of J.
    """
    c = rows.stop - rows.start
    e = torch.zeros(m, c, n, m, dtype=like.dtype, device=like.device)
    t = torch.arange(c, device=like.device)
    for j in range(m):
        e[j, t, rows.start + t, j] = 1.0
    return e.reshape(m * c, n, m)


def batch_jacobian_rows(out: Tensor, params: list[Tensor], rows: slice) -> Tensor:
    """Rows of ``J`` for the samples in ``rows`` from a whole-batch output ``out`` (n × m_y).

    ``out`` must carry an autograd graph to ``params``; it is kept (``retain_graph``). Uses one
    vmapped backward pass; where an operation has no batching rule, one backward per row.
    Returns ``(m_y, c, d)``.
    """
    n, m = out.shape
    cot = unit_cotangents(n, m, rows, out)
    try:
        grads = torch.autograd.grad(out, params, grad_outputs=cot, retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        flat = [g.reshape(cot.shape[0], -1) if g is not None
                else p.new_zeros(cot.shape[0], p.numel())
                for g, p in zip(grads, params)]
        block = torch.cat(flat, dim=1)
    except RuntimeError:
        block = torch.stack([_one_row(out, params, e) for e in cot])
    return block.view(m, rows.stop - rows.start, -1)


def _one_row(out: Tensor, params: list[Tensor], cot: Tensor) -> Tensor:
    """One row of ``J``: the flattened gradient of ``⟨out, cot⟩``."""
    grads = torch.autograd.grad(out, params, grad_outputs=cot, retain_graph=True,
                                allow_unused=True)
    return torch.cat([g.flatten() if g is not None else torch.zeros_like(p).flatten()
                      for g, p in zip(grads, params)])


def whole_batch_output(model: nn.Module, x: Tensor) -> Tensor:
    """``f_X`` (n × m_y) with an autograd graph, for the whole-batch engine."""
    with torch.enable_grad():
        return output_matrix(model(x), x.shape[0])


def output_width(model: nn.Module, x: Tensor) -> int:
    """``m_y`` from a forward pass on one sample (samples independent)."""
    with torch.no_grad():
        return output_matrix(model(x[:1]), 1).shape[1]


def parameter_dtype(params: dict[str, Tensor], x: Tensor) -> torch.dtype:
    """The dtype of the computation: the parameters' (or ``x``'s when there are none)."""
    first = next(iter(params.values()), None)
    return first.dtype if first is not None else x.dtype


RowSource = Callable[[slice, "Tensor | None"], Tensor]


def jacobian_rows(model: nn.Module, x: Tensor, wrt: list[str], chunk_size: int | None,
                  coupled: bool) -> tuple[int, int, RowSource]:
    """``(m_y, c, rows)``: ``rows(s, out)`` gives the rows of ``J`` w.r.t. ``wrt`` for the samples
    in ``s`` as ``(m_y, |s|, d_wrt)`` (into ``out`` if not None); ``c`` is the chunk size to use.

    ``coupled`` selects the whole-batch engine (exact when samples interact through batch
    statistics; runs the forward pass once, now); otherwise the per-sample engine.
    """
    params = dict(model.named_parameters())
    n, d = x.shape[0], sum(params[name].numel() for name in wrt)
    itemsize = torch.empty((), dtype=parameter_dtype(params, x)).element_size()
    if coupled:
        out = whole_batch_output(model, x)
        m = out.shape[1]
        c = samples_per_chunk(m * d * itemsize, n, m, chunk_size, max_rows=WHOLE_BATCH_ROWS)
        chosen = [params[name] for name in wrt]

        def batch_rows(s: slice, into: Tensor | None = None) -> Tensor:
            block = batch_jacobian_rows(out, chosen, s)
            return block if into is None else into.copy_(block)

        return m, c, batch_rows
    m = output_width(model, x)
    c = samples_per_chunk(m * d * itemsize, n, m, chunk_size)
    return m, c, lambda s, into=None: per_sample_jacobian(model, x[s], wrt, into)


def jacobian(model: nn.Module, x: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """``J = ∂ vec(f_X) / ∂θ`` of shape ``(n·m_y, d)``: row ``j·n + i`` is ``∂f(x_i)_j / ∂θ``.

    θ are the parameters with ``requires_grad``, flattened in ``model.named_parameters()`` order.
    When batch norm normalises with batch statistics (train mode) the whole-batch engine gives
    the exact derivative of the coupled outputs; otherwise per-sample ``vmap(jacrev)``.
    ``chunk_size`` samples are processed at a time (default: what fits ``CHUNK_BYTES``). The model
    (mode, parameters, buffers) is left unchanged.
    """
    params = trainable_parameters(model)
    n, d = x.shape[0], flat_width(params)
    coupled = bool(batch_statistics_modules(model))
    with numerics_guard(model):
        if d == 0:
            m = whole_batch_output(model, x).shape[1] if coupled else output_width(model, x)
            return torch.zeros(m * n, 0, dtype=parameter_dtype(params, x), device=x.device)
        m, c, rows = jacobian_rows(model, x, list(params), chunk_size, coupled)
        result = torch.empty(m, n, d, dtype=parameter_dtype(params, x), device=x.device)
        for s in chunk_slices(n, c):
            rows(s, result[:, s])
    return result.view(m * n, d)
