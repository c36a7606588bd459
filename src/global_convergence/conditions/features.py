"""Feature maps the conditions are evaluated on, computed on a high-precision copy (SPEC §4).

Features are computed with a deep copy of the caller's trunk converted to ``dtype`` (float64 by
default) in eval mode — batch norm with its running statistics, i.e. the fixed function of each
input that the second phase uses (SPEC §3.3) — without gradients and in chunks of samples. The
caller's model is never modified (no mode switch, no dtype change, no statistics update).
"""
from __future__ import annotations

import copy
import time

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
    """A deep copy of ``module`` in ``dtype``, eval mode, without gradients."""
    clone = copy.deepcopy(module).to(dtype=dtype).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


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
