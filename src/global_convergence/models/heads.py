"""Model modifications that carry the guarantees: the EE gated head ([K22] §3.2) and the wide last
hidden layer of the two-phase method ([KS21] §3), both as a *split* network ``head(trunk(x))``.

The trunk is everything the second phase keeps fixed. Once :meth:`SplitNet.freeze_trunk` has run,
the trunk always evaluates in eval mode (batch-norm with its fixed running statistics, even when
the user's loop calls ``model.train()``) and under ``torch.no_grad()``: no gradient is computed or
stored through it (docs/design.md).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserInputError
from .analytic import SOFTPLUS_BETA, softplus
from .surgery import find_last_layers, replace_module

GATE_SHARPNESS = 1.0
"""ς' of the gates σ̃(q) = sigmoid(ς' q): 1, as in the ResNet runs of [K22] §3.4 (docs/design.md)."""
TWO_PHASE_WIDTH_FACTOR = 1.1
"""c of the wide layer ⌈c·n⌉ of the two-phase architecture ([KS21] §3.2)."""


class FlagModule(nn.Module):
    """A module with boolean flags kept twice: as buffers, which state dicts and checkpoints
    hold, and as Python bools, which ``forward`` reads — reading a CUDA buffer would wait for
    the GPU at every step and break a ``torch.compile`` graph. ``load_state_dict`` refreshes the
    bools from the loaded buffers."""

    def register_flag(self, name: str, value: bool) -> None:
        if not hasattr(self, "_flags"):
            self._flags: dict[str, bool] = {}
            self.register_load_state_dict_post_hook(_read_flags)
        self.register_buffer(name, torch.tensor(bool(value)))
        self._flags[name] = bool(value)

    def flag(self, name: str) -> bool:
        return self._flags[name]

    def set_flag(self, name: str, value: bool) -> None:
        getattr(self, name).fill_(bool(value))
        self._flags[name] = bool(value)


def _read_flags(module: nn.Module, incompatible_keys) -> None:
    if isinstance(module, FlagModule):
        module._flags = {name: bool(getattr(module, name)) for name in module._flags}


class SplitNet(FlagModule):
    """``head(trunk(x))`` with a trunk that can be frozen for the second phase."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.register_flag("trunk_frozen", False)
        self.register_load_state_dict_post_hook(_reapply_freeze)

    @property
    def is_trunk_frozen(self) -> bool:
        return self.flag("trunk_frozen")

    def freeze_trunk(self) -> None:
        """Fix the trunk: eval mode from now on, no gradients, no parameter updates."""
        self.set_flag("trunk_frozen", True)
        for p in self.trunk.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.trunk.eval()

    def unfreeze_trunk(self) -> None:
        """Let gradients reach the trunk again (its parameters' ``requires_grad`` is the
        caller's to set); it follows ``train``/``eval`` like any module."""
        self.set_flag("trunk_frozen", False)

    def train(self, mode: bool = True) -> "SplitNet":
        super().train(mode)
        if self.is_trunk_frozen:
            self.trunk.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output ``z̄(x)`` (the last hidden representation fed to the head)."""
        if self.is_trunk_frozen:
            with torch.no_grad():
                return self.trunk(x)
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _reapply_freeze(module: nn.Module, incompatible_keys) -> None:
    """After ``load_state_dict``, restore the frozen-trunk contract recorded in the buffer."""
    if isinstance(module, SplitNet) and module.is_trunk_frozen:
        module.freeze_trunk()


class GatedHead(FlagModule):
    """The EE head of [K22] §3.2: for every output ``j`` its own penultimate layer.

    With ``z = [z̄, 1] ∈ R^{m_{H−1}}`` (a constant neuron carries the bias) and no output bias,

        f(x)_j = Σ_k W(H)_{jk} · σ̃(r_{jk} · z) · (w_{jk} · z),     σ̃(q) = sigmoid(ς' q).

    ``weight[j, k]`` is ``w_{jk}`` (θ(H−1)), ``out_weight[j, k]`` is ``W(H)_{jk}``. While the gates
    are *tied*, ``r_{jk} = w_{jk}`` with the gradient through both factors (each unit is SiLU-like,
    ``σ(q) = σ̃(q) q``); :meth:`freeze_gates` copies ``w`` into the buffer ``gates`` and unties.
    """

    def __init__(self, in_features: int, width: int, outputs: int,
                 gate_sharpness: float = GATE_SHARPNESS) -> None:
        super().__init__()
        self.in_features, self.width, self.outputs = in_features, width, outputs
        self.gate_sharpness = gate_sharpness
        fan_in = in_features + 1
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(outputs, width, fan_in).uniform_(-bound, bound))
        out_bound = 1.0 / math.sqrt(width)
        self.out_weight = nn.Parameter(torch.empty(outputs, width).uniform_(-out_bound, out_bound))
        self.register_buffer("gates", torch.zeros(outputs, width, fan_in))
        self.register_flag("tied", True)

    @property
    def are_gates_tied(self) -> bool:
        return self.flag("tied")

    def freeze_gates(self) -> None:
        """``R(j) := W(H−1, j)`` now, as a non-trainable buffer; the gates stop following ``w``."""
        with torch.no_grad():
            self.gates.copy_(self.weight)
        self.set_tied(False)

    def set_tied(self, tied: bool) -> None:
        """Record whether the gates follow ``w`` (the buffer, saved in checkpoints, and its
        Python copy); :meth:`freeze_gates` is how a run unties them."""
        self.set_flag("tied", tied)

    def augmented_input(self, z_bar: torch.Tensor) -> torch.Tensor:
        """``z = [z̄, 1]``."""
        return torch.cat([z_bar, z_bar.new_ones(z_bar.shape[0], 1)], dim=1)

    def preactivations(self, z: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """``(z · m_{jk})`` for every output j and unit k: shape (batch, outputs, width)."""
        flat = matrix.reshape(self.outputs * self.width, -1)
        return F.linear(z, flat).view(z.shape[0], self.outputs, self.width)

    def forward(self, z_bar: torch.Tensor) -> torch.Tensor:
        z = self.augmented_input(z_bar.flatten(1))
        pre = self.preactivations(z, self.weight)
        gate_pre = pre if self.are_gates_tied else self.preactivations(z, self.gates)
        units = torch.sigmoid(self.gate_sharpness * gate_pre) * pre
        return (units * self.out_weight).sum(dim=2)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (+1 constant), width={self.width}, "
                f"outputs={self.outputs}, gate_sharpness={self.gate_sharpness}, "
                f"tied={self.are_gates_tied}")


class EEModel(SplitNet):
    """A base network modified by :func:`ee_model`: ``GatedHead(trunk(x))``."""

    head: GatedHead


class TwoPhaseModel(SplitNet):
    """A base network prepared by :func:`two_phase_model`: ``Linear(trunk(x))``, where the trunk
    ends in the last hidden layer ``h`` of [KS21]."""

    head: nn.Linear


def ee_head_width(n: int, in_features: int) -> int:
    """``m_H = ⌈2n / m_{H−1}⌉`` with ``m_{H−1} = in_features + 1`` ([K22] §3.4)."""
    return max(1, math.ceil(2 * n / (in_features + 1)))


def ee_model(base: nn.Module, n: int, head_width: int | None = None,
             gate_sharpness: float = GATE_SHARPNESS) -> EEModel:
    """Modify ``base`` for the EE wrapper ([K22] §3.2); ``base`` itself is left unchanged.

    If ``base`` ends in ``Linear → activation → Linear`` (the ``mlp``), those two layers become the
    gated head, its width defaults to the base's hidden width, and it starts from the base's
    weights (``w_{jk}`` = row k of the penultimate layer with its bias, ``W(H)_j`` = output row j).
    Otherwise (ResNet-18: pooling → ``fc``) the output layer alone is replaced and the head width
    defaults to ``⌈2n / m_{H−1}⌉`` with ``m_{H−1}`` = trunk features + 1. A model without an output
    ``nn.Linear`` is refused with a message naming what was found instead.
    """
    _check_positive_int(n, "n")
    if head_width is not None:      # checked before use: 0 must not fall back to the default
        _check_positive_int(head_width, "head_width")
    model = copy.deepcopy(base)
    layers = find_last_layers(model, "ee_model")
    out = model.get_submodule(layers.output)
    if layers.penultimate is not None:
        pen = model.get_submodule(layers.penultimate)
        in_features, width = pen.in_features, head_width or pen.out_features
        head = GatedHead(in_features, width, out.out_features, gate_sharpness)
        if width == pen.out_features:
            _copy_base_layers(head, pen, out)
        for name in (layers.penultimate, layers.activation, layers.output):
            replace_module(model, name, nn.Identity())
    else:
        in_features = out.in_features
        width = head_width or ee_head_width(n, in_features)
        head = GatedHead(in_features, width, out.out_features, gate_sharpness)
        replace_module(model, layers.output, nn.Identity())
    _check_positive_int(width, "head_width")
    return EEModel(model, head)


def _copy_base_layers(head: GatedHead, pen: nn.Linear, out: nn.Linear) -> None:
    with torch.no_grad():
        bias = pen.bias if pen.bias is not None else torch.zeros(pen.out_features)
        w = torch.cat([pen.weight, bias[:, None]], dim=1)
        head.weight.copy_(w.expand(head.outputs, -1, -1))
        head.out_weight.copy_(out.weight)


def two_phase_model(base: nn.Module, n: int, c: float = TWO_PHASE_WIDTH_FACTOR,
                    beta: float = SOFTPLUS_BETA) -> TwoPhaseModel:
    """Prepare ``base`` for the two-phase method ([KS21] §3); ``base`` itself is left unchanged.

    The expressivity condition needs a fully connected last hidden layer of at least ``n`` units.
    When the base's last hidden layer is not fully connected, or is narrower than ``n``, a
    softplus layer of ``⌈c·n⌉`` units is inserted before the output layer; otherwise the base is
    only split into trunk (up to the last hidden layer) and head (the output layer).
    """
    _check_positive_int(n, "n")
    if c <= 0:
        raise UserInputError(f"two_phase_model: width factor c must be > 0, got {c}")
    model = copy.deepcopy(base)
    layers = find_last_layers(model, "two_phase_model")
    out = model.get_submodule(layers.output)
    pen = model.get_submodule(layers.penultimate) if layers.penultimate else None
    if pen is not None and pen.out_features >= n:
        replace_module(model, layers.output, nn.Identity())
        return TwoPhaseModel(model, out)
    wide = math.ceil(round(c * n, 9))     # ⌈1.1·200⌉ = 220, not 221 from float rounding
    replace_module(model, layers.output, nn.Sequential(nn.Linear(out.in_features, wide), softplus(beta)))
    return TwoPhaseModel(model, nn.Linear(wide, out.out_features))


def _check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"{name} must be a positive integer, got {value!r}")
