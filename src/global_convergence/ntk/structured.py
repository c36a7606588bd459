"""Structured empirical NTK: ``J Jᵀ`` as per-layer sums, without materialising ``J`` (SPEC §4).

The NTK is a sum over disjoint parameter groups, ``M = J Jᵀ = Σ_g J_g J_gᵀ``. For a layer that
is linear in its weight, ``y_{i,p} = W u_{i,p} + b`` at positions ``p = 1..P`` of sample ``i``
(``P = 1`` and ``u = a_l`` for ``nn.Linear`` on flat inputs; unfolded patches for ``nn.Conv2d``),
with output-gradients ``δ^j_{i,p} = ∂f(x_i)_j / ∂y_{i,p}``,

    ∂f(x_i)_j / ∂W = Σ_p δ^j_{i,p} u_{i,p}ᵀ,      ∂f(x_i)_j / ∂b = Σ_p δ^j_{i,p},

so the layer's block of the NTK is

    M_l[(j,i),(k,i')] = Σ_{p,q} (δ^j_{i,p}·δ^k_{i',q}) (u_{i,p}·u_{i',q} + 1),

which for ``P = 1`` is ``(Δ_l Δ_lᵀ) ⊙ (A_l A_lᵀ + 1)`` ([K22] notation: ``A_l`` the layer's
inputs, ``Δ_l`` its output-gradients stacked output-major). Each layer uses the cheaper of two
contractions (per pair of samples): **gram** — the position Grams above, ``P²(D_in + m²·C_out)``
operations — or **grad** — per-sample gradients ``Σ_p δ u_pᵀ`` formed explicitly and contracted,
``m²·C_out·D_in``. Linear layers always take *gram*; convolutions with many positions *grad*.
Eval-mode batch norm, ``y = γ ⊙ x̂ + β`` with fixed statistics, is the diagonal case
(``∂f_j/∂γ = Σ_p δ^j_p ⊙ x̂_p``), always *grad*.

The inputs ``u`` come from forward hooks; the ``δ^j`` from ``m_y`` backward passes over the chunk
(``grad_outputs`` = column ``j`` of ones), each giving all layers' output-gradients at once. That
is exact only when ``f(x_i)`` depends on ``x_i`` alone, so batch norm using batch statistics is
refused here (``empirical_ntk`` then takes the whole-batch Jacobian route).

Every other trainable parameter — of other module types (layer norm, a raw ``nn.Parameter`` used
via ``einsum``), of a module called more than once per forward (shared module), or one used
outside its own layer's forward (tied weights) — falls back to per-sample ``torch.func``
Jacobians ``J_p`` over just those parameters, contracted as ``J_p J_pᵀ``. Which parameters qualify
is decided by one probe forward pass that records every use of every parameter.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .common import (
    BATCHNORM,
    BLOCK_ELEMENTS,
    gram,
    output_matrix,
    pairwise_blocks,
    samples_per_chunk,
    trainable_parameters,
    zero_subnormals_,
)
from .jacobian import per_sample_jacobian

PROBE_SAMPLES: int = 2
"""Samples in the probe forward pass that decides which parameters are handled structurally."""

STRATEGY: str = "auto"
"""Contraction for layers with several positions: "auto" (cheaper by operation count), "gram"
or "grad". Layers with one position (flat ``nn.Linear``) always use "gram"."""


class StructureChanged(RuntimeError):
    """A layer ran a different number of times (or on a different batch axis) than in the probe."""


@dataclass
class LayerPlan:
    """How one ``nn.Linear`` / ``nn.Conv2d`` / eval-mode batch-norm layer contributes.

    ``kind``: see :func:`layer_kind`. ``weight`` / ``bias``: whether that parameter's block is
    computed from the captures (else it is not trainable, or falls back). ``positions`` P,
    ``fan_in`` D_in, ``fan_out`` C_out as above. ``strategy``: "gram" (position Grams, bias fused
    as ``+1``) or "grad" (per-sample gradients).
    """

    module: nn.Module
    kind: str
    weight: bool
    bias: bool
    positions: int
    fan_in: int
    fan_out: int
    strategy: str = "gram"


@dataclass
class StructuredPlan:
    """The layers computed from captures, the parameters that fall back, and ``m_y``."""

    layers: list[LayerPlan]
    fallback: list[str]
    outputs: int


@dataclass
class ChunkFeatures:
    """Per-chunk data: ``(U, D, bias)`` of the *gram* layers and the explicit gradient rows.

    ``U``: ``(c, P, D_in)`` inputs/patches; ``D``: ``(m, c, P, C_out)`` output-gradients;
    ``rows``: ``(m, c, k)`` per-sample gradients of the *grad* layers and fallback parameters.
    """

    grams: list[tuple[Tensor, Tensor, bool]] = field(default_factory=list)
    rows: Tensor | None = None

    def nbytes(self) -> int:
        """Memory held by this chunk's tensors."""
        size = sum(t.numel() * t.element_size() for u, d, _ in self.grams for t in (u, d))
        return size + (self.rows.numel() * self.rows.element_size() if self.rows is not None else 0)


def layer_kind(module: nn.Module) -> str | None:
    """"linear" / "conv2d" / "batchnorm" for the layers the structured method understands.

    Batch norm counts only in eval mode with running statistics (a per-sample affine map
    ``y = γ ⊙ x̂ + β``, ``x̂ = (x − μ)/sqrt(σ² + ε)`` with fixed μ, σ²). Subclasses that override
    ``forward`` (or the convolution itself) and grouped convolutions are not understood: None.
    """
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward and module.groups == 1):
        return "conv2d"
    if (isinstance(module, BATCHNORM) and type(module).forward is BATCHNORM.forward
            and not module.training and module.running_mean is not None and module.affine):
        return "batchnorm"
    return None


class _ParameterUseRecorder(TorchFunctionMode):
    """Records, for every use of a trainable parameter in a torch function, the layer running.

    ``current`` is the supported layer whose forward is executing (set by its hooks), or None.
    """

    def __init__(self, names_by_id: dict[int, str]) -> None:
        super().__init__()
        self.names_by_id = names_by_id
        self.current: nn.Module | None = None
        self.uses: dict[str, list[nn.Module | None]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in pytree.tree_leaves((args, kwargs)):
            name = self.names_by_id.get(id(leaf)) if isinstance(leaf, Tensor) else None
            if name is not None:
                self.uses[name].append(self.current)
        return func(*args, **kwargs)


def plan_structured(model: nn.Module, x: Tensor) -> StructuredPlan:
    """Decide, from one probe pass on the first samples of ``x``, how each parameter is handled.

    A parameter is structured when it is the ``weight`` or ``bias`` of a supported layer, that
    layer runs exactly once, and the parameter is used exactly once — inside that layer.
    """
    params = trainable_parameters(model)
    recorder = _ParameterUseRecorder({id(p): name for name, p in params.items()})
    calls: dict[nn.Module, list[tuple[torch.Size, torch.Size]]] = defaultdict(list)
    candidates = [mod for mod in model.modules() if layer_kind(mod) is not None
                  and any(p.requires_grad for p in mod.parameters(recurse=False))]

    def enter(mod: nn.Module, inputs: tuple) -> None:
        recorder.current = mod

    def leave(mod: nn.Module, inputs: tuple, output: Tensor) -> None:
        recorder.current = None
        calls[mod].append((inputs[0].shape, output.shape))

    handles = [h for mod in candidates for h in (mod.register_forward_pre_hook(enter),
                                                  mod.register_forward_hook(leave))]
    probe = x[:PROBE_SAMPLES]
    try:
        with torch.no_grad(), recorder:
            m = output_matrix(model(probe), probe.shape[0]).shape[1]
    finally:
        for h in handles:
            h.remove()
    names = {id(p): name for name, p in params.items()}
    layers, structured = [], set()
    for mod in candidates:
        in_shape, out_shape = calls[mod][0] if len(calls[mod]) == 1 else ((), ())
        if not in_shape or in_shape[0] != len(probe) or out_shape[0] != len(probe):
            continue                          # not run once on the batch axis: all fall back
        own = {role: names.get(id(mod._parameters.get(role))) for role in ("weight", "bias")}
        ok = {role: name is not None and recorder.uses[name] == [mod] for role, name in own.items()}
        if ok["weight"] or ok["bias"]:
            layers.append(_layer_plan(mod, ok["weight"], ok["bias"], out_shape, m, len(x)))
            structured |= {own[role] for role in ok if ok[role]}
    return StructuredPlan(layers, [name for name in params if name not in structured], m)


def _layer_plan(mod: nn.Module, weight: bool, bias: bool, out_shape: torch.Size, m: int,
                n: int) -> LayerPlan:
    """Geometry (P, D_in, C_out) and the cheaper contraction for one layer."""
    kind = layer_kind(mod)
    if kind == "linear":
        positions, fan_in, fan_out = math.prod(out_shape[1:-1]), mod.in_features, mod.out_features
    elif kind == "batchnorm":                 # γ ⊙ x̂: a per-channel (diagonal) weight
        return LayerPlan(mod, kind, weight, bias, math.prod(out_shape[2:]), 1, mod.num_features,
                         "grad")
    else:
        positions = math.prod(out_shape[2:])
        fan_in = mod.in_channels * math.prod(mod.kernel_size)
        fan_out = mod.out_channels
    gram_cost = positions**2 * (fan_in + m * m * fan_out)
    grad_cost = m * m * fan_out * fan_in + 2 * m * positions * fan_out * fan_in / max(n, 1)
    prefer_gram = {"auto": gram_cost <= grad_cost, "gram": True, "grad": False}[STRATEGY]
    strategy = "gram" if weight and (positions == 1 or prefer_gram) else "grad"
    return LayerPlan(mod, kind, weight, bias, positions, fan_in, fan_out, strategy)


def bytes_per_sample(plan: StructuredPlan, model: nn.Module, itemsize: int) -> float:
    """Estimated memory of one sample's :class:`ChunkFeatures` (and transient patches)."""
    m, total = plan.outputs, 0.0
    for lp in plan.layers:
        total += lp.positions * (lp.fan_in + 2 * m * lp.fan_out)
        if lp.strategy == "grad":
            total += m * (lp.fan_out * lp.fan_in * lp.weight + lp.fan_out * lp.bias)
    params = dict(model.named_parameters())
    total += m * sum(params[name].numel() for name in plan.fallback)
    return total * itemsize


def _normalized(bn: nn.Module, inp: Tensor) -> Tensor:
    """``x̂ = (x − μ) / sqrt(σ² + ε)`` of an eval-mode batch norm, channels on dim 1."""
    shape = (1, -1) + (1,) * (inp.dim() - 2)
    return (inp - bn.running_mean.view(shape)) * torch.rsqrt(bn.running_var.view(shape) + bn.eps)


def _patches(conv: nn.Conv2d, inp: Tensor) -> Tensor:
    """The convolution's input patches ``u_{i,p}`` as ``(c, C_in·kh·kw, P)``."""
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        inp = F.pad(inp, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    return F.unfold(inp, conv.kernel_size, dilation=conv.dilation, padding=padding,
                    stride=conv.stride)


def _hooked_forward(model: nn.Module, plan: StructuredPlan,
                    x: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """``f_X`` (c × m, with graph) and each planned layer's ``(input, output)`` on ``x``.

    The hook hands on a copy of the layer's output, so that later in-place operations cannot
    alter the tensor whose gradient is taken.
    """
    c = x.shape[0]
    records: dict[nn.Module, list[tuple[Tensor, Tensor]]] = defaultdict(list)

    def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        records[mod].append((inputs[0].detach(), output))
        return output.clone()

    handles = [lp.module.register_forward_hook(hook) for lp in plan.layers]
    try:
        with torch.enable_grad():
            out = output_matrix(model(x), c)
    finally:
        for h in handles:
            h.remove()
    for lp in plan.layers:
        got = records[lp.module]
        if len(got) != 1 or got[0][0].shape[0] != c:
            raise StructureChanged(f"{lp.module} ran {len(got)} times on a chunk (once in the "
                                   "probe); the structured NTK needs a fixed graph")
    return out, [records[lp.module][0] for lp in plan.layers]


def _output_gradients(out: Tensor, ys: list[Tensor]) -> list[Tensor]:
    """``δ^j = ∂f_j/∂y`` for every layer output ``y``, stacked as ``(m, *y.shape)``.

    Backward pass ``j`` has ``grad_outputs`` = 1 on output column j; with independent samples row
    i of its result is ``∂f(x_i)_j / ∂y_i``. Layers that do not reach the output get zeros.
    """
    m = out.shape[1]
    live = [k for k, y in enumerate(ys) if y.requires_grad]
    deltas: list[list[Tensor]] = [[] for _ in ys]
    ones = torch.ones(out.shape[0], dtype=out.dtype, device=out.device)
    for j in range(m):
        grads: list[Tensor | None] = [None] * len(ys)
        if live and out.requires_grad:
            found = torch.autograd.grad(out[:, j], [ys[k] for k in live], grad_outputs=ones,
                                        retain_graph=j < m - 1, allow_unused=True)
            for k, g in zip(live, found):
                grads[k] = g
        for acc, g, y in zip(deltas, grads, ys):
            acc.append(g if g is not None else torch.zeros_like(y))
    return [torch.stack(acc) for acc in deltas]


def capture(model: nn.Module, plan: StructuredPlan, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Inputs and output-gradients ``(a, δ)`` of the planned layers for the samples ``x``.

    ``a`` is the layer's input as captured, ``δ`` has shape ``(m, *output shape)``. float32
    entries below the subnormal cutoff are zeroed (patches and products made from them inherit
    the zeros).
    """
    out, records = _hooked_forward(model, plan, x)
    deltas = _output_gradients(out, [y for _, y in records])
    return [(zero_subnormals_(inp.contiguous()), zero_subnormals_(delta))
            for (inp, _), delta in zip(records, deltas)]


def _positions_last(lp: LayerPlan, inp: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """``u`` as ``(c, D_in, P)`` and ``δ`` as ``(m, c, C_out, P)``: each layer's natural layout.

    Linear layers get their positions moved last; convolutions their input patches; batch norm
    its normalised input ``x̂`` (``D_in = C_out`` channels: a diagonal weight).
    """
    m, c = delta.shape[:2]
    if lp.kind == "linear":
        u = inp.reshape(c, lp.positions, lp.fan_in).transpose(1, 2)
        return u, delta.reshape(m, c, lp.positions, lp.fan_out).transpose(2, 3)
    if lp.kind == "batchnorm":
        u = _normalized(lp.module, inp).reshape(c, lp.fan_out, lp.positions)
    else:
        u = _patches(lp.module, inp) if lp.weight else inp.new_empty(c, 0, lp.positions)
    return u, delta.reshape(m, c, lp.fan_out, lp.positions)


def _gradient_rows(lp: LayerPlan, u: Tensor, d: Tensor) -> list[Tensor]:
    """Per-sample gradients of a *grad*-strategy layer as ``(m, c, ·)`` row blocks.

    Weight: ``Σ_p δ_p u_pᵀ`` (``Σ_p δ_p ⊙ x̂_p`` for batch norm); bias: ``Σ_p δ_p``.
    """
    m, c = d.shape[:2]
    rows = []
    if lp.weight and lp.kind == "batchnorm":
        rows.append(torch.einsum("mcop,cop->mco", d, u))
    elif lp.weight:
        rows.append(torch.einsum("mcop,cip->mcoi", d, u).reshape(m, c, -1))
    if lp.bias:
        rows.append(d.sum(3))
    return rows


def chunk_features(model: nn.Module, plan: StructuredPlan, x: Tensor) -> ChunkFeatures:
    """:class:`ChunkFeatures` of the samples ``x``: captures plus explicit gradient rows."""
    feats, rows = ChunkFeatures(), []
    if plan.layers:
        for lp, (inp, delta) in zip(plan.layers, capture(model, plan, x)):
            u, d = _positions_last(lp, inp, delta)
            if lp.strategy == "gram":     # (c, P, D_in) and (m, c, P, C_out) for the Grams
                feats.grams.append((u.transpose(1, 2).contiguous(),
                                    d.transpose(2, 3).contiguous(), lp.bias))
            else:
                rows.extend(_gradient_rows(lp, u, d))
    if plan.fallback:
        rows.append(per_sample_jacobian(model, x, plan.fallback))
    if rows:
        feats.rows = zero_subnormals_(torch.cat(rows, dim=2))
    return feats


def _gram_layer_into(block: Tensor | None, ua: Tensor, da: Tensor, ub: Tensor, db: Tensor,
                     bias: bool, same: bool) -> Tensor:
    """Add ``Σ_{p,q} (δ^j_{i,p}·δ^k_{i',q}) (u_{i,p}·u_{i',q} + [bias])`` to ``block``.

    ``block`` is ``(m, c_a, m, c_b)`` or None (then a new one is returned). For ``P = 1`` this is
    ``(D_a D_bᵀ) ⊙ (U_a U_bᵀ + 1)``, accumulated with one fused multiply-add.
    """
    m, ca, positions, fan_out = da.shape
    cb = db.shape[1]
    if positions == 1:
        gu = gram(ua[:, 0]) if same else ua[:, 0] @ ub[:, 0].T
        if bias:
            gu += 1.0
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
            if bias:
                gu += 1.0
            gd = da[:, i0:i1].reshape(-1, fan_out) @ db[:, k0:k1].reshape(-1, fan_out).T
            gd = gd.view(m, i1 - i0, positions, m, k1 - k0, positions)
            gu = gu.view(1, i1 - i0, positions, 1, k1 - k0, positions)
            block[:, i0:i1, :, k0:k1] += (gd * gu).sum((2, 5))
    return block


def contract(fa: ChunkFeatures, fb: ChunkFeatures) -> Tensor:
    """The NTK block between two chunks, ``(m, c_a, m, c_b)``: sum of all layers' blocks."""
    same = fa is fb
    block: Tensor | None = None
    if fa.rows is not None:
        m, ca, k = fa.rows.shape
        cb = fb.rows.shape[1]
        ra = fa.rows.reshape(m * ca, k)
        block = (gram(ra) if same else ra @ fb.rows.reshape(m * cb, k).T).view(m, ca, m, cb)
    for (ua, da, bias), (ub, db, _) in zip(fa.grams, fb.grams):
        block = _gram_layer_into(block, ua, da, ub, db, bias, same)
    return block


def structured_ntk(model: nn.Module, x: Tensor, chunk_size: int | None = None) -> Tensor:
    """``J Jᵀ`` (``n·m_y`` square, SPEC §1 order) by per-layer sums; samples must be independent.

    Call through :func:`global_convergence.ntk.empirical_ntk`, which sets the numerics guard and
    refuses coupled (batch-statistics) models for this method.
    """
    n = x.shape[0]
    plan = plan_structured(model, x)
    dtype = next((p.dtype for p in model.parameters()), x.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    m = plan.outputs
    if not plan.layers and not plan.fallback:
        return torch.zeros(m * n, m * n, dtype=dtype, device=x.device)
    out = torch.empty(m * n, m * n, dtype=dtype, device=x.device)   # every block is written
    chunk = samples_per_chunk(bytes_per_sample(plan, model, itemsize), n, m, chunk_size)
    return pairwise_blocks(n, m, chunk, lambda s: chunk_features(model, plan, x[s]), contract,
                           ChunkFeatures.nbytes, out)
