"""Real-analytic networks: the softplus activation, detection of non-analytic modules, conversion.

Every guarantee of [KS21] and [K22] needs a real-analytic hidden feature map. The library uses
softplus ``σ(z) = ln(1 + exp(ς z)) / ς`` with ``ς = 100`` (close to ReLU).

``nn.Softplus(beta=100)`` switches to the identity where ``β·z > 20`` (its ``threshold``). We keep
that: the difference to the exact softplus there is ``ln(1 + e^{-β z}) / β < e^{-20} / 100 ≈ 2e-11``,
below float32 resolution of the value it is added to, so the computed function is the analytic one
to working precision, and the threshold avoids ``exp`` overflow.

Only modules are inspected: an activation called functionally inside ``forward`` (``F.relu``) is
invisible to :func:`non_analytic_modules` and :func:`make_analytic`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

SOFTPLUS_BETA = 100.0
"""ς of the papers: softplus(ς z)/ς approximates ReLU (appendix C of [K22])."""

_RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Threshold)
_HARD_TO_SMOOTH = {nn.Hardswish: nn.SiLU, nn.Hardsigmoid: nn.Sigmoid, nn.Hardtanh: nn.Tanh}
_OTHER_NON_ANALYTIC = (nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.Softsign)
_MAX_POOLS = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}
_ADAPTIVE_MAX_POOLS = {nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d,
                       nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
                       nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d}
_NON_ANALYTIC = (_RELU_FAMILY + tuple(_HARD_TO_SMOOTH) + _OTHER_NON_ANALYTIC + tuple(_MAX_POOLS)
                 + tuple(_ADAPTIVE_MAX_POOLS))


def softplus(beta: float = SOFTPLUS_BETA) -> nn.Softplus:
    """The library's activation ``σ(z) = ln(1 + exp(β z)) / β``."""
    return nn.Softplus(beta=beta)


def is_non_analytic(module: nn.Module) -> bool:
    """Whether ``module`` itself (not its children) computes a non-analytic function."""
    return isinstance(module, _NON_ANALYTIC)


def non_analytic_modules(module: nn.Module) -> list[str]:
    """Qualified names of every non-analytic module inside ``module`` (``[]`` if analytic).

    Non-analytic: ReLU and its variants, hard clamps (Hardtanh, Hardswish, …), shrinkage
    functions and max pooling. A module reachable under several names is listed under each.
    """
    return [name or "<root>" for name, child in module.named_modules(remove_duplicate=False)
            if is_non_analytic(child)]


def _analytic_replacement(module: nn.Module, beta: float, avgpool: bool) -> nn.Module | None:
    """The analytic module that replaces ``module``, or None when it is kept."""
    if isinstance(module, _RELU_FAMILY):
        return softplus(beta)
    for hard, smooth in _HARD_TO_SMOOTH.items():
        if isinstance(module, hard):
            return smooth()
    if avgpool:
        for max_cls, avg_cls in _MAX_POOLS.items():
            if isinstance(module, max_cls):
                return _average_pool_like(module, avg_cls)
        for max_cls, avg_cls in _ADAPTIVE_MAX_POOLS.items():
            if isinstance(module, max_cls):
                return avg_cls(module.output_size)
    return None


def _average_pool_like(pool: nn.Module, avg_cls: type[nn.Module]) -> nn.Module:
    """Average pooling with the kernel, stride, padding and ceil mode of a max pool."""
    dilation = pool.dilation if isinstance(pool.dilation, int) else max(pool.dilation)
    if dilation != 1:
        raise ValueError(f"cannot replace {pool!r} by average pooling: dilation {pool.dilation} "
                         "has no average-pooling equivalent")
    return avg_cls(pool.kernel_size, stride=pool.stride, padding=pool.padding,
                   ceil_mode=pool.ceil_mode, count_include_pad=False)


def make_analytic(module: nn.Module, beta: float = SOFTPLUS_BETA, avgpool: bool = False) -> nn.Module:
    """Replace non-analytic modules in place and return ``module``.

    ReLU and its variants become softplus(β); Hardswish → SiLU, Hardsigmoid → Sigmoid,
    Hardtanh → Tanh; with ``avgpool=True`` max pooling becomes average pooling of the same
    geometry. A module used in several places (torchvision's ResNet reuses one ``relu``) is
    replaced everywhere by one shared replacement, so sharing is preserved. Raises ValueError if
    ``module`` itself is a non-analytic leaf (it cannot be replaced in place).
    """
    if is_non_analytic(module) and _analytic_replacement(module, beta, avgpool) is not None:
        raise ValueError(f"make_analytic changes modules in place; wrap the bare {type(module).__name__} "
                         "in a container (e.g. nn.Sequential) first")
    replacements: dict[int, nn.Module] = {}
    for parent in module.modules():
        for child_name, child in list(parent.named_children()):
            if id(child) not in replacements:
                new = _analytic_replacement(child, beta, avgpool)
                if new is None:
                    continue
                replacements[id(child)] = new
            setattr(parent, child_name, replacements[id(child)])
    return module


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Context manager: flush float32 subnormals to zero on the CPU inside the block.

    With softplus(100) many activations and gradients underflow into subnormals, which x86 CPUs
    process many times slower (docs/performance.md). The setting is
    per thread in PyTorch; it is restored on exit. Yields whether flushing is supported.
    """
    previous = _flush_denormal_state()
    supported = torch.set_flush_denormal(enabled)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(previous)


def _flush_denormal_state() -> bool:
    """Whether flush-to-zero is currently on (probed: torch offers no getter)."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)   # a subnormal
    return bool((tiny * 1.0).item() == 0.0)
