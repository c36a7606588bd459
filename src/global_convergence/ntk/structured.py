"""Structured empirical NTK: ``J Jᵀ`` as per-layer sums, without materialising ``J``
(docs/performance.md, "Empirical NTK").

The NTK is a sum over disjoint parameter groups, ``M = J Jᵀ = Σ_g J_g J_gᵀ``. For a layer that
is linear in its weight, ``y_{i,p} = W u_{i,p} + b`` at positions ``p = 1..P`` of sample ``i``
(``P = 1`` and ``u = a_l`` for ``nn.Linear`` on flat inputs; unfolded patches for ``nn.Conv2d``),
with output-gradients ``δ^j_{i,p} = ∂f(x_i)_j / ∂y_{i,p}``,

    ∂f(x_i)_j / ∂W = Σ_p δ^j_{i,p} u_{i,p}ᵀ,      ∂f(x_i)_j / ∂b = Σ_p δ^j_{i,p},

so the layer's block of the NTK is

    M_l[(j,i),(k,i')] = Σ_{p,q} (δ^j_{i,p}·δ^k_{i',q}) (u_{i,p}·u_{i',q} + 1),

which for ``P = 1`` is ``(Δ_l Δ_lᵀ) ⊙ (A_l A_lᵀ + 1)`` ([K22] notation: ``A_l`` the layer's
inputs, ``Δ_l`` its output-gradients stacked output-major); the ``+1`` (bias) is a column of ones
appended to ``A_l``. Each layer takes the cheaper of two contractions (:mod:`.plan`): **gram** —
the two Grams above, multiplied and accumulated — or **grad** — per-sample gradient rows
``[Σ_p δ u_pᵀ, Σ_p δ]``, which all *grad* layers (and the fallback parameters) share: one
symmetric product of all rows. Eval-mode batch norm, ``y = γ ⊙ x̂ + β`` with fixed statistics, is
the diagonal case (``∂f_j/∂γ = Σ_p δ^j_p ⊙ x̂_p``), always *grad*.

The inputs ``u`` come from forward hooks; the ``δ^j`` from backward passes over the chunk
(``grad_outputs`` = column ``j`` of ones), each giving all layers' output-gradients at once. That
is exact only when ``f(x_i)`` depends on ``x_i`` alone, so batch norm using batch statistics is
refused here (``empirical_ntk`` then takes the whole-batch Jacobian route).

``compute_dtype`` contracts the captures of the model's own (e.g. float32) pass in a wider type:
:func:`structured_gram` uses it for the alignment test's Gram of the float32 ``J`` (the pass's
derivative rounded to float32) with a proven bound on its distance from the Gram's factor.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import common
from ..linalg.symmetric import gram, grams
from .common import (BLOCK_ELEMENTS, output_matrix, pairwise_blocks, samples_per_chunk,
                     zero_subnormals_)
from .jacobian import per_sample_jacobian
from .plan import LayerPlan, StructureChanged, StructuredPlan, cached_plan

__all__ = ["StructureChanged", "StructuredGram", "structured_gram", "structured_ntk"]


@dataclass
class ChunkFeatures:
    """Per-chunk data: ``(U, D)`` of the *gram* layers and the gradient rows of the others.

    ``U``: ``(c, P, D_in [+1])`` inputs/patches (a ones column for the bias); ``D``:
    ``(m, c, P, C_out)`` output-gradients; ``rows``: ``(m, c, k)`` per-sample gradients of the
    *grad* layers and fallback parameters. ``abs_sq``: ``Σ_l γ_l² ‖|J_l|‖_F²`` over the chunk
    (:func:`structured_gram`), else 0.
    """

    grams: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    rows: Tensor | None = None
    abs_sq: float = 0.0

    def nbytes(self) -> int:
        """Memory held by this chunk's tensors."""
        size = sum(t.numel() * t.element_size() for u, d in self.grams for t in (u, d))
        return size + (self.rows.numel() * self.rows.element_size() if self.rows is not None else 0)


def bytes_per_sample(plan: StructuredPlan, model: nn.Module, itemsize: int) -> float:
    """Estimated memory of one sample's :class:`ChunkFeatures` (and transient patches)."""
    m, total = plan.outputs, 0.0
    for lp in plan.layers:
        total += lp.positions * (lp.fan_in + 1 + 2 * m * lp.fan_out)
        if lp.strategy == "grad":
            total += m * lp.fan_out * (lp.fan_in * lp.weight + lp.bias)
    params = dict(model.named_parameters())
    total += m * sum(params[name].numel() for name in plan.fallback)
    return total * itemsize


def _normalized(bn: nn.Module, inp: Tensor) -> Tensor:
    """``x̂ = (x − μ) / sqrt(σ² + ε)`` of an eval-mode batch norm, channels on dim 1."""
    shape = (1, -1) + (1,) * (inp.dim() - 2)
    mean, var = bn.running_mean.to(inp.dtype), bn.running_var.to(inp.dtype)
    return (inp - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)


def _padded(conv: nn.Conv2d, inp: Tensor) -> Tensor:
    """The convolution's input with its padding applied (any ``padding_mode``)."""
    pad = conv._reversed_padding_repeated_twice
    if not any(pad):
        return inp
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(inp, pad, mode=mode)


def _patches(conv: nn.Conv2d, inp: Tensor) -> Tensor:
    """The convolution's input patches ``u_{i,p}`` as ``(c, C_in·kh·kw, P)``, a transposed view
    of ``(c, P, C_in·kh·kw)`` in memory: one strided copy of the padded input (``F.unfold``
    loops over the samples)."""
    xp = _padded(conv, inp).contiguous()
    c, cin, h, w = xp.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = xp.stride()
    windows = xp.as_strided((c, oh, ow, cin, kh, kw), (s0, s2 * sh, s3 * sw, s1, s2 * dh, s3 * dw))
    return windows.reshape(c, oh * ow, cin * kh * kw).transpose(1, 2)


def _hooked_forward(model: nn.Module, modules: list[nn.Module], x: Tensor,
                    clone: bool) -> tuple[Tensor, list[tuple[Tensor, Tensor]]] | None:
    """``f_X`` (c × m, with graph) and each planned layer's ``(input, output)`` on ``x``.

    Without ``clone`` the layer outputs are used as they are, and None is returned when a later
    in-place operation changed one of them (its gradient would be the wrong one); with ``clone``
    the model continues on a copy.
    """
    c = x.shape[0]
    records: dict[nn.Module, list[tuple[Tensor, Tensor, int]]] = defaultdict(list)

    def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        records[mod].append((inputs[0].detach(), output, output._version))
        return output.clone() if clone else None

    # first of the module's forward hooks: the layer's own output, before a user's hook changes it
    handles = [mod.register_forward_hook(hook, prepend=True) for mod in modules]
    try:
        with torch.enable_grad():
            out = output_matrix(model(x), c)
    finally:
        for h in handles:
            h.remove()
    for mod in modules:
        got = records[mod]
        if len(got) != 1 or got[0][0].shape[0] != c:
            raise StructureChanged(f"{mod} ran {len(got)} times on a chunk (once in the probe); "
                                   "the structured NTK needs a fixed graph")
        if got[0][1]._version != got[0][2]:
            return None
    return out, [records[mod][0][:2] for mod in modules]


def _output_gradients(out: Tensor, ys: list[Tensor]) -> list[Tensor]:
    """``δ^j = ∂f_j/∂y`` for every layer output ``y``, stacked as ``(m, *y.shape)``.

    Backward pass ``j`` has ``grad_outputs`` = 1 on output column j; with independent samples row
    i of its result is ``∂f(x_i)_j / ∂y_i``. Layers that do not reach the output get zeros.
    """
    m = out.shape[1]
    live = [k for k, y in enumerate(ys) if y.requires_grad]
    deltas = [y.new_zeros((m, *y.shape)) for y in ys] if m > 1 else [None] * len(ys)
    ones = torch.ones(out.shape[0], dtype=out.dtype, device=out.device)
    for j in range(m):
        found = torch.autograd.grad(out[:, j], [ys[k] for k in live], grad_outputs=ones,
                                    retain_graph=j < m - 1, allow_unused=True) \
            if live and out.requires_grad else [None] * len(live)
        for k, g in zip(live, found):
            if g is not None and m == 1:
                deltas[k] = g.unsqueeze(0)
            elif g is not None:
                deltas[k][j] = g
    return [d if d is not None else y.new_zeros((1, *y.shape)) for d, y in zip(deltas, ys)]


def capture(model: nn.Module, plan: StructuredPlan, x: Tensor,
            zero: bool = True) -> list[tuple[Tensor, Tensor]]:
    """Inputs and output-gradients ``(a, δ)`` of the planned layers for the samples ``x``.

    ``a`` is the layer's input as captured, ``δ`` has shape ``(m, *output shape)``. With
    ``zero``, float32 entries below the subnormal cutoff are set to 0 (docs/performance.md,
    "Subnormals").
    """
    modules = [model.get_submodule(lp.path) for lp in plan.layers]
    got = _hooked_forward(model, modules, x, clone=False) or \
        _hooked_forward(model, modules, x, clone=True)
    out, records = got
    deltas = _output_gradients(out, [y for _, y in records])
    pairs = [(inp.contiguous(), delta) for (inp, _), delta in zip(records, deltas)]
    return [(zero_subnormals_(a), zero_subnormals_(d)) for a, d in pairs] if zero else pairs


def _positions_last(lp: LayerPlan, mod: nn.Module, inp: Tensor,
                    delta: Tensor) -> tuple[Tensor, Tensor]:
    """``u`` as ``(c, D_in, P)`` and ``δ`` as ``(m, c, C_out, P)``: each layer's natural layout."""
    m, c = delta.shape[:2]
    if lp.kind == "linear":
        u = inp.reshape(c, lp.positions, lp.fan_in).transpose(1, 2)
        return u, delta.reshape(m, c, lp.positions, lp.fan_out).transpose(2, 3)
    if lp.kind == "batchnorm":
        u = _normalized(mod, inp).reshape(c, lp.fan_out, lp.positions)
    else:
        u = _patches(mod, inp) if lp.weight else inp.new_empty(c, 0, lp.positions)
    return u, delta.reshape(m, c, lp.fan_out, lp.positions)


GROUPED_CONV_CHANNELS: int = 8
"""float32 convolutions with fewer input channels get their per-sample weight gradients from one
grouped convolution of the inputs with the output-gradients (:func:`_conv_weight_rows`) instead
of unfolded patches and a batched product (measured 1.6–1.9× faster with one input channel,
slower with 32; float64 grouped convolutions have no fast kernel; docs/performance.md)."""


def _conv_weight_rows(conv: nn.Conv2d, inp: Tensor, delta: Tensor) -> Tensor:
    """Per-sample ``∂f_j/∂W = Σ_p δ_p u_pᵀ`` of a convolution as ``(m, c, C_out·C_in·kh·kw)``.

    The correlation of sample i's padded input with its output-gradient: one convolution with
    the samples as groups (batch axis = input channels), the layer's stride as dilation and its
    dilation as stride.
    """
    m, c, cout = delta.shape[:3]
    inp = _padded(conv, inp)
    kernel = delta.transpose(0, 1).reshape(c * m * cout, 1, *delta.shape[3:])
    out = F.conv2d(inp.transpose(0, 1), kernel, stride=conv.dilation, dilation=conv.stride,
                   groups=c)
    kh, kw = conv.kernel_size
    out = out[..., :kh, :kw].reshape(conv.in_channels, c, m, cout, kh, kw)
    return out.permute(2, 1, 3, 0, 4, 5).reshape(m, c, -1)


def _gradient_rows(lp: LayerPlan, u: Tensor, d: Tensor) -> list[Tensor]:
    """Per-sample gradients of a layer as ``(m, c, ·)`` row blocks.

    Weight: ``Σ_p δ_p u_pᵀ`` (``Σ_p δ_p ⊙ x̂_p`` for batch norm); bias: ``Σ_p δ_p``.
    """
    m, c = d.shape[:2]
    rows = []
    if lp.weight and lp.kind == "batchnorm":
        rows.append(torch.einsum("mcop,cop->mco", d, u))
    elif lp.weight and lp.positions == 1:
        rows.append((d[..., 0, None] * u[None, :, None, :, 0]).reshape(m, c, -1))
    elif lp.weight:
        rows.append(torch.matmul(d, u.transpose(1, 2).unsqueeze(0)).reshape(m, c, -1))
    if lp.bias:
        rows.append(d.sum(3))
    return rows


def _entry_rounding(lp: LayerPlan, unit: float, own_unit: float) -> float:
    """``γ`` of one entry of this layer's ``J`` block evaluated from the captures: a sum of ``P``
    products in ``unit``; batch norm adds 5 roundings in the model's ``own_unit`` for ``x̂``
    (subtraction, ``+ε``, square root, reciprocal, product), which the model computed itself."""
    k = lp.positions * unit + (5 * own_unit if lp.kind == "batchnorm" else 0.0)
    return k / (1 - k)


def _abs_frobenius_sq(lp: LayerPlan, u: Tensor, d: Tensor) -> float:
    """``‖|J_l|‖_F²`` over the chunk, ``|J_l|`` with entries ``Σ_p |δ_p||u_p|`` (and ``Σ_p |δ_p|``
    for the bias), from ``u`` ``(c, D_in, P)`` and ``δ`` ``(m, c, C_out, P)``."""
    ones = 1.0 if lp.bias else 0.0
    if lp.positions == 1 and lp.kind == "linear":      # ‖δ‖² (‖u‖² + 1) per sample and output
        return float((d.square().sum(2)[..., 0] * (u.square().sum(1)[:, 0] + ones)).sum())
    if lp.kind != "batchnorm" and lp.positions * (lp.fan_in + lp.fan_out) < lp.fan_in * lp.fan_out:
        du = torch.einsum("mcop,mcoq->mcpq", d.abs(), d.abs())      # Σ_{p,q} |δ_p|·|δ_q| ...
        uu = torch.einsum("cip,ciq->cpq", u.abs(), u.abs()) + ones  # ... (|u_p|·|u_q| + 1)
        return float((du * uu).sum())
    return float(sum(r.square().sum() for r in _gradient_rows(lp, u.abs(), d.abs())))


def chunk_features(model: nn.Module, plan: StructuredPlan, x: Tensor,
                   compute_dtype: torch.dtype | None = None,
                   entry_unit: float | None = None) -> ChunkFeatures:
    """:class:`ChunkFeatures` of the samples ``x``: captures plus gradient rows, in
    ``compute_dtype`` (default: the model's). With ``entry_unit`` (``compute_dtype``'s unit
    roundoff), also ``abs_sq = Σ_l γ_l² ‖|J_l|‖_F²`` (:func:`_entry_rounding`).
    """
    feats, rows = ChunkFeatures(), []
    captured = capture(model, plan, x, zero=compute_dtype is None) if plan.layers else []
    for lp, (inp, delta) in zip(plan.layers, captured):
        own_unit = torch.finfo(inp.dtype).eps / 2 if inp.is_floating_point() else 0.0
        if compute_dtype is not None:
            inp, delta = inp.to(compute_dtype), delta.to(compute_dtype)
        mod = model.get_submodule(lp.path)
        if (lp.kind == "conv2d" and lp.strategy == "grad" and lp.weight
                and mod.in_channels < GROUPED_CONV_CHANNELS and inp.dtype == torch.float32):
            rows.append(_conv_weight_rows(mod, inp, delta))
            if lp.bias:
                rows.append(delta.flatten(3).sum(3))
            if entry_unit is not None:        # |J_l| from |u|, |δ| by the same convolution
                k = _entry_rounding(lp, entry_unit, own_unit)
                absolute = _conv_weight_rows(mod, inp.abs(), delta.abs())
                bias = delta.abs().flatten(3).sum(3).square().sum() if lp.bias else 0.0
                feats.abs_sq += k**2 * float(absolute.square().sum() + bias)
            continue
        u, d = _positions_last(lp, mod, inp, delta)
        if entry_unit is not None:
            feats.abs_sq += _entry_rounding(lp, entry_unit, own_unit) ** 2 * \
                _abs_frobenius_sq(lp, u, d)
        if lp.strategy == "gram":     # (c, P, D_in [+1]) and (m, c, P, C_out) for the Grams
            ut = u.transpose(1, 2)
            if lp.bias:
                ut = torch.cat([ut, ut.new_ones(ut.shape[:2] + (1,))], dim=2)
            feats.grams.append((ut.contiguous(), d.transpose(2, 3).contiguous()))
        else:
            rows.extend(_gradient_rows(lp, u, d))
    if plan.fallback:
        jac = per_sample_jacobian(model, x, plan.fallback)
        rows.append(jac if compute_dtype is None else jac.to(compute_dtype))
    if rows:
        feats.rows = zero_subnormals_(rows[0] if len(rows) == 1 else torch.cat(rows, dim=2))
    return feats


Products = tuple[Tensor, Tensor]
"""``(U_a U_bᵀ, D_a D_bᵀ)`` of a one-position layer."""


def _gram_layer_into(block: Tensor | None, ua: Tensor, da: Tensor, ub: Tensor, db: Tensor,
                     same: bool, products: Products | None = None) -> Tensor:
    """Add ``Σ_{p,q} (δ^j_{i,p}·δ^k_{i',q}) (u_{i,p}·u_{i',q})`` to ``block`` (the ``u`` carry
    the bias's ones). ``block`` is ``(m, c_a, m, c_b)`` or None (then a new one is returned).
    For ``P = 1`` this is ``(D_a D_bᵀ) ⊙ (U_a U_bᵀ)``, one fused multiply-add; ``products`` are
    ``(U_a U_bᵀ, D_a D_bᵀ)`` when already formed."""
    m, ca, positions, fan_out = da.shape
    cb = db.shape[1]
    if positions == 1:
        if products is not None:
            gu, gd = products
        else:
            gu = gram(ua[:, 0]) if same else ua[:, 0] @ ub[:, 0].T
            dflat_a = da.reshape(m * ca, fan_out)
            gd = gram(dflat_a) if same else dflat_a @ db.reshape(m * cb, fan_out).T
        gd, gu = gd.view(m, ca, m, cb), gu.view(1, ca, 1, cb)
        return gd.mul_(gu) if block is None else block.addcmul_(gd, gu)
    if block is None:
        block = da.new_zeros(m, ca, m, cb)
    step = max(1, int(math.sqrt(BLOCK_ELEMENTS) / (m * positions)))
    for i0 in range(0, ca, step):
        i1 = min(i0 + step, ca)
        for k0 in range(0, cb, step):
            k1 = min(k0 + step, cb)
            gu = ua[i0:i1].flatten(0, 1) @ ub[k0:k1].flatten(0, 1).T
            gd = da[:, i0:i1].reshape(-1, fan_out) @ db[:, k0:k1].reshape(-1, fan_out).T
            gd = gd.view(m, i1 - i0, positions, m, k1 - k0, positions)
            gu = gu.view(1, i1 - i0, positions, 1, k1 - k0, positions)
            block[:, i0:i1, :, k0:k1] += (gd * gu).sum((2, 5))
    return block


def _symmetric_products(f: ChunkFeatures) -> tuple[Tensor | None, list[Products | None]]:
    """The chunk's own ``R Rᵀ`` (gradient rows) and ``(U Uᵀ, D Dᵀ)`` of its one-position layers,
    formed side by side (:func:`global_convergence.linalg.symmetric.grams`)."""
    mats = [] if f.rows is None else [f.rows.reshape(-1, f.rows.shape[2])]
    for u, d in f.grams:
        if d.shape[2] == 1:
            mats += [u[:, 0], d.reshape(-1, d.shape[3])]
    done = iter(grams(mats))
    rows = None if f.rows is None else next(done)
    pairs = [(next(done), next(done)) if d.shape[2] == 1 else None for _, d in f.grams]
    return rows, pairs


def contract(fa: ChunkFeatures, fb: ChunkFeatures) -> Tensor:
    """The NTK block between two chunks, ``(m, c_a, m, c_b)``: sum of all layers' blocks."""
    same = fa is fb
    block: Tensor | None = None
    if same:
        rows_gram, pairs = _symmetric_products(fa)
    else:
        rows_gram, pairs = None, [None] * len(fa.grams)
    if fa.rows is not None:
        m, ca, k = fa.rows.shape
        cb = fb.rows.shape[1]
        ra = fa.rows.reshape(m * ca, k)
        block = (rows_gram if same else ra @ fb.rows.reshape(m * cb, k).T).view(m, ca, m, cb)
    for (ua, da), (ub, db), products in zip(fa.grams, fb.grams, pairs):
        block = _gram_layer_into(block, ua, da, ub, db, same, products)
    return block


@dataclass
class StructuredGram:
    """``gram``: ``J̃ J̃ᵀ`` formed in ``compute_dtype`` from the model's own captures, ``J̃`` the
    exact derivative of the model's pass (products and sums of its captured activations and
    output-gradients; the fallback parameters' rows as computed). ``entry_error``: a bound on
    ``‖J − J̃‖_F`` for ``J`` = ``J̃`` with every entry rounded to the model's dtype
    (``|J − J̃| ≤ u|J̃|`` entrywise, so ``‖J − J̃‖_F ≤ u‖J̃‖_F = u √tr(J̃J̃ᵀ)``), plus
    ``compute_dtype``'s own rounding of the gradient rows (``γ_P Σ_p |δ_p||u_p|`` per entry).
    ``inner``: the most roundings of one Gram entry in ``compute_dtype`` (for
    :func:`global_convergence.linalg.tolerance.gram_rounding_bound`)."""

    gram: Tensor
    entry_error: float
    inner: int


def structured_gram(model: nn.Module, x: Tensor, compute_dtype: torch.dtype = torch.float64,
                    chunk_size: int | None = None) -> StructuredGram:
    """:class:`StructuredGram` of ``model`` (its own dtype, e.g. float32) on ``x``; samples must
    be independent. Call inside :func:`.common.numerics_guard`."""
    plan = cached_plan(model, x)
    own = next((p.dtype for p in model.parameters()), x.dtype)
    gram_, abs_sq = _ntk(model, x, plan, chunk_size, compute_dtype,
                         torch.finfo(compute_dtype).eps / 2)
    widths = [lp.positions**2 * (lp.fan_in + 1 + lp.fan_out) if lp.strategy == "gram"
              else lp.fan_out * (lp.fan_in + 1) + lp.positions for lp in plan.layers]
    params = dict(model.named_parameters())
    inner = sum(widths) + sum(params[n].numel() for n in plan.fallback) + len(widths) + 2
    # ‖J̃‖_F ≤ √(tr G (1 + γ)) + (the rows' own rounding); rounding J̃ to ``own`` moves it u‖J̃‖_F
    norm = math.sqrt(max(float(gram_.trace()), 0.0) * (1 + inner * torch.finfo(compute_dtype).eps))
    rounding = torch.finfo(own).eps / 2 * (norm + math.sqrt(abs_sq)) if own != compute_dtype \
        else 0.0
    return StructuredGram(gram_, rounding + math.sqrt(abs_sq), inner)


def _ntk(model: nn.Module, x: Tensor, plan: StructuredPlan, chunk_size: int | None,
         compute_dtype: torch.dtype | None, unit: float | None) -> tuple[Tensor, float]:
    """The NTK (``n·m`` square) and the chunks' summed ``abs_sq``."""
    n, m = x.shape[0], plan.outputs
    dtype = compute_dtype or next((p.dtype for p in model.parameters()), x.dtype)
    if not plan.layers and not plan.fallback:
        return torch.zeros(m * n, m * n, dtype=dtype, device=x.device), 0.0
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = bytes_per_sample(plan, model, itemsize)
    chunk = n if chunk_size is None and per_sample * n <= common.CACHE_BYTES else \
        samples_per_chunk(per_sample, n, m, chunk_size)
    abs_sq, seen = [0.0], set()

    def features(s: slice) -> ChunkFeatures:     # abs_sq counted once per chunk
        first = s.start not in seen
        seen.add(s.start)
        feats = chunk_features(model, plan, x[s], compute_dtype, unit if first else None)
        abs_sq[0] += feats.abs_sq
        return feats

    if chunk >= n:                         # one chunk: its block is the NTK
        feats = features(slice(0, n))
        return contract(feats, feats).reshape(m * n, m * n), abs_sq[0]
    out = torch.empty(m * n, m * n, dtype=dtype, device=x.device)   # every block is written
    pairwise_blocks(n, m, chunk, features, contract, ChunkFeatures.nbytes, out)
    return out, abs_sq[0]


def structured_ntk(model: nn.Module, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """``J Jᵀ`` (``n·m_y`` square, row ``j·n + i``) by per-layer sums; samples must be
    independent. Call through :func:`global_convergence.ntk.empirical_ntk`, which sets the
    numerics guard and refuses coupled (batch-statistics) models for this method."""
    return _ntk(model, x, cached_plan(model, x), chunk_size, None, None)[0]
