"""Which parameters the structured NTK computes from captures, decided once per model structure.

A probe forward pass on the first samples records every use of every trainable parameter (a
``TorchFunctionMode``) and which supported layer was running. A parameter is *structured* when it
is the ``weight`` or ``bias`` of a supported layer (:func:`layer_kind`), that layer runs exactly
once, and the parameter is used exactly once — inside that layer. Everything else (other module
types, shared modules, tied weights) falls back to per-sample ``torch.func`` Jacobians.

The plan is cached per model object (alignment tracking and NTK callbacks call the NTK every K
steps on the same architecture). The cache key is the model's structure: every module's name,
identity, type, train/eval mode, plain attributes (numbers, strings, flags: e.g. a switch that
changes the forward pass) and instance-level ``forward`` overrides, every parameter's name,
identity, shape, dtype and ``requires_grad``, whether global forward hooks exist
(``register_module_forward_hook``: they run before a layer's own hooks and may change its output,
so every parameter falls back while one is registered), and the input's per-sample shape, dtype
and device. Any change gives a new plan; a forward pass that runs a planned layer a different
number of times is caught at every call (``StructureChanged``). :func:`forget_plans` empties the
cache.
"""
from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .common import BATCHNORM, output_matrix, trainable_parameters

PROBE_SAMPLES: int = 2
"""Samples in the probe forward pass that decides which parameters are handled structurally."""

STRATEGY: str = "auto"
"""Contraction for layers the cost model may send either way: "auto" (cheaper by the operation
count of :func:`_choose`), "gram" or "grad" (tests force one)."""

PASS_COST: float = 48.0
"""Cost, in multiply-adds per pair of samples, of the elementwise passes a *gram* layer adds over
the ``n × n`` NTK (its two Grams are written, multiplied and accumulated); a *grad* layer's rows
join the single product of all gradient rows instead."""


INSTANCE_OVERRIDES = ("forward", "_conv_forward")
"""Methods a module instance may replace (``module.forward = ...``): the layer is then not the map
its class computes."""


def global_forward_hooks() -> bool:
    """Whether a global forward hook is registered (it sees a layer's output before the capture)."""
    return bool(getattr(nn.modules.module, "_global_forward_hooks", None))


@dataclass
class LayerPlan:
    """How one ``nn.Linear`` / ``nn.Conv2d`` / eval-mode batch-norm layer contributes.

    ``path``: the module's name in the model. ``weight`` / ``bias``: whether that parameter's
    block is computed from the captures. ``positions`` P, ``fan_in`` D_in, ``fan_out`` C_out.
    ``strategy``: "gram" (position Grams, bias fused as ``+1``) or "grad" (per-sample gradients).
    """

    path: str
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


class StructureChanged(RuntimeError):
    """A layer ran a different number of times (or on a different batch axis) than in the probe."""


def layer_kind(module: nn.Module) -> str | None:
    """"linear" / "conv2d" / "batchnorm" for the layers the structured method understands.

    Batch norm counts only in eval mode with running statistics (a per-sample affine map
    ``y = γ ⊙ x̂ + β``, ``x̂ = (x − μ)/sqrt(σ² + ε)`` with fixed μ, σ²). Subclasses or instances
    that override ``forward`` (or the convolution itself) and grouped convolutions are not
    understood: None.
    """
    if any(name in vars(module) for name in INSTANCE_OVERRIDES) or global_forward_hooks():
        return None
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
    """Records, for every use of a trainable parameter in a torch function, the layer running."""

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
    """Decide, from one probe pass on the first samples of ``x``, how each parameter is handled
    (always a fresh probe; :func:`cached_plan` reuses one)."""
    params = trainable_parameters(model)
    recorder = _ParameterUseRecorder({id(p): name for name, p in params.items()})
    calls: dict[nn.Module, list[tuple[torch.Size, torch.Size]]] = defaultdict(list)
    paths = {mod: path for path, mod in model.named_modules()}
    candidates = [mod for mod in paths if layer_kind(mod) is not None
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
            layers.append(_layer_plan(paths[mod], mod, ok["weight"], ok["bias"], out_shape, m))
            structured |= {own[role] for role in ok if ok[role]}
    return StructuredPlan(layers, [name for name in params if name not in structured], m)


def _layer_plan(path: str, mod: nn.Module, weight: bool, bias: bool, out_shape: torch.Size,
                m: int) -> LayerPlan:
    """Geometry (P, D_in, C_out) and the cheaper contraction for one layer."""
    kind = layer_kind(mod)
    if kind == "batchnorm":                 # γ ⊙ x̂: a per-channel (diagonal) weight
        return LayerPlan(path, kind, weight, bias, math.prod(out_shape[2:]), 1,
                         mod.num_features, "grad")
    if kind == "linear":
        positions, fan_in, fan_out = math.prod(out_shape[1:-1]), mod.in_features, mod.out_features
    else:
        positions = math.prod(out_shape[2:])
        fan_in, fan_out = mod.in_channels * math.prod(mod.kernel_size), mod.out_channels
    strategy = _choose(positions, fan_in if weight else 0, fan_out, m) if weight else "grad"
    return LayerPlan(path, kind, weight, bias, positions, fan_in, fan_out, strategy)


def _choose(positions: int, fan_in: int, fan_out: int, m: int) -> str:
    """*gram* or *grad* by multiply-adds per pair of samples.

    gram: ``P² (D_in + 1 + m² C_out)`` plus :data:`PASS_COST`; grad: ``m² C_out (D_in + 1)``
    (a row of that width per sample and output, in the one product of all rows).
    """
    gram_cost = positions**2 * (fan_in + 1 + m * m * fan_out) + PASS_COST
    grad_cost = m * m * fan_out * (fan_in + 1)
    return {"auto": "gram" if gram_cost <= grad_cost else "grad", "gram": "gram",
            "grad": "grad"}[STRATEGY]


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, StructuredPlan]]" = \
    weakref.WeakKeyDictionary()
_PLAIN = (bool, int, float, str, type(None))


def _plain_attributes(mod: nn.Module) -> tuple:
    """A module's attributes that are numbers, strings, flags or tuples of them."""
    return tuple((k, v) for k, v in vars(mod).items() if type(v) in _PLAIN
                 or (type(v) is tuple and all(type(e) in _PLAIN for e in v)))


def structure_key(model: nn.Module, x: Tensor) -> tuple:
    """What a plan depends on (module docstring); equal keys give equal plans."""
    modules = tuple((path, id(mod), type(mod), _plain_attributes(mod),
                     tuple(name for name in INSTANCE_OVERRIDES if name in vars(mod)))
                    for path, mod in model.named_modules())
    params = tuple((name, id(p), tuple(p.shape), p.dtype, p.requires_grad)
                   for name, p in model.named_parameters())
    return modules, params, global_forward_hooks(), tuple(x.shape[1:]), x.dtype, x.device, STRATEGY


def cached_plan(model: nn.Module, x: Tensor) -> StructuredPlan:
    """:func:`plan_structured`, reused while :func:`structure_key` is unchanged."""
    key = structure_key(model, x)
    hit = _PLANS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    plan = plan_structured(model, x)
    _PLANS[model] = (key, plan)
    return plan


def forget_plans() -> None:
    """Empty the plan cache (the next call of each model probes again)."""
    _PLANS.clear()
