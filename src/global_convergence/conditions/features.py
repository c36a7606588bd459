"""Feature maps the conditions are evaluated on, computed on a high-precision copy (docs/verifiers.md).

Features are computed with a deep copy of the caller's trunk converted to ``dtype`` (float64 by
default) in eval mode — batch norm with its running statistics, i.e. the fixed function of each
input that the second phase uses ([K22] §3.2; docs/design.md "batch norm in phase 2") — without gradients and in chunks of samples. The
caller's model is never modified (no mode switch, no dtype change, no statistics update).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from ..models import EEModel, SplitNet
from ..models.heads import GatedHead

FEATURE_CHUNK = 512
"""Samples per forward pass of the feature copy."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for an empty module."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def require_split(model: nn.Module, what: str) -> SplitNet:
    """``model`` as a :class:`SplitNet` (trunk + head), or a clear error."""
    if not isinstance(model, SplitNet):
        raise UserInputError(f"{what} needs a model split into trunk and head (from "
                             f"two_phase_model or ee_model), got {type(model).__name__}")
    return model


def require_ee(model: nn.Module, what: str) -> EEModel:
    """``model`` as an :class:`EEModel` with a :class:`GatedHead`, or a clear error."""
    if not isinstance(model, SplitNet) or not isinstance(model.head, GatedHead):
        raise UserInputError(f"{what} needs a model from ee_model (a gated head), got "
                             f"{type(model).__name__}")
    return model  # type: ignore[return-value]


def precise_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy of ``module`` in ``dtype``, eval mode, without gradients; float64
    convolutions with small outputs run as one GEMM (:class:`GemmConv2d`)."""
    clone = copy.deepcopy(module).to(dtype=dtype).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    if dtype == torch.float64:
        for conv in clone.modules():
            if type(conv) is nn.Conv2d and GemmConv2d.supports(conv):
                conv.__class__ = GemmConv2d
    return clone


class GemmConv2d(nn.Conv2d):
    """A convolution computed as one matrix product ``unfold(x)ᵀ W`` when the output has at
    most :attr:`MAX_POSITIONS` positions (float64 on the CPU), else as ``nn.Conv2d``.

    Float64 has no oneDNN convolution on the CPU; PyTorch's fallback does one small product per
    sample, which is 5× slower than a single product over all ``batch × positions`` rows when the
    spatial output is small (measured: ResNet-18's last two stages on 16×16 inputs, 1.65× faster
    for the whole trunk; docs/performance.md). Same result up to summation order."""

    MAX_POSITIONS = 16

    @staticmethod
    def supports(conv: nn.Conv2d) -> bool:
        return conv.groups == 1 and conv.padding_mode == "zeros" and \
            not isinstance(conv.padding, str)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[0] == 0:
            return super().forward(x)
        n, _, height, width = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        rows = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        cols = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if x.dtype != torch.float64 or x.device.type != "cpu" or rows * cols > self.MAX_POSITIONS:
            return super().forward(x)
        patches = nn.functional.unfold(x, self.kernel_size, self.dilation, self.padding,
                                       self.stride)                       # n × (c·kh·kw) × L
        flat = patches.transpose(1, 2).reshape(n * rows * cols, -1)
        out = flat @ self.weight.reshape(self.out_channels, -1).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(n, rows * cols, -1).transpose(1, 2).reshape(n, -1, rows, cols)


def trunk_features(model: SplitNet, x: Tensor, dtype: torch.dtype = torch.float64,
                   chunk_size: int = FEATURE_CHUNK) -> tuple[Tensor, float]:
    """``(z̄(x_i))_i`` flattened to (n × m) in ``dtype`` on the model's device, and the seconds
    it took. For a two-phase model this is ``h_X`` (the last hidden layer); for an EE model the
    input ``z̄`` of the gated head."""
    if chunk_size < 1:
        raise UserInputError(f"chunk_size must be a positive number of samples, got {chunk_size}")
    start = time.perf_counter()
    device = model_device(model)
    trunk = precise_copy(model.trunk, dtype)
    parts = []
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk_size):
            xb = x[s:s + chunk_size].to(device=device, dtype=dtype)
            parts.append(trunk(xb).flatten(1))
    features = torch.cat(parts) if parts else torch.empty(0, 0, dtype=dtype, device=device)
    return features, time.perf_counter() - start


def with_constant(features: Tensor) -> Tensor:
    """``[features, 1_n]``: the constant neuron (bias) appended as the last column."""
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


FEATURE_ERROR_SAMPLES = 64
"""Samples recomputed in float64 to measure the error of float32 features."""
FEATURE_ERROR_SAFETY = 10.0
"""Factor on the largest measured relative error: the bound must also cover the samples that
were not recomputed."""


@dataclass(frozen=True)
class FeatureError:
    """The relative row error of low-precision features, measured against float64 on a sample.

    ``bound = safety · max(measured, ε_float32)`` is used as ``‖z̃_i − z_i‖ ≤ bound · ‖z_i‖`` for
    every row: an estimate from ``samples`` recomputed rows, not a proof — which is why the
    certificate only accepts a *verified* verdict from such features and otherwise recomputes
    them in float64.
    """

    measured: float
    samples: int
    safety: float = FEATURE_ERROR_SAFETY

    @property
    def bound(self) -> float:
        return self.safety * max(self.measured, float(torch.finfo(torch.float32).eps))

    def to_dict(self) -> dict[str, float | int]:
        return {"measured_relative_error": self.measured, "samples": self.samples,
                "safety": self.safety, "relative_error_bound": self.bound}


def sample_index(n: int, samples: int = FEATURE_ERROR_SAMPLES) -> Tensor:
    """``min(n, samples)`` evenly spaced row indices of ``0..n−1``."""
    k = min(n, samples)
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    return (torch.arange(k) * (n - 1) // max(k - 1, 1)).unique()


def relative_row_error(approx: Tensor, exact: Tensor) -> FeatureError:
    """``max_i ‖z̃_i − z_i‖ / ‖z_i‖`` of low-precision rows ``approx`` against float64 ``exact``."""
    approx = approx.flatten(1).to(exact.device, torch.float64)
    if approx.shape != exact.shape:
        raise UserInputError(f"features of shape {tuple(approx.shape)} do not match the trunk "
                             f"output {tuple(exact.shape)}")
    if exact.shape[0] == 0:
        return FeatureError(0.0, 0)
    tiny = torch.finfo(torch.float64).tiny
    relative = (approx - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(tiny)
    return FeatureError(float(relative.max()), exact.shape[0])
