"""Scalar diagnostics of NTK matrices ([K22] Table 1 and the NTK's conditioning), in float64."""
from __future__ import annotations

import torch
from torch import Tensor


def _square(name: str, m: Tensor) -> None:
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(m.shape)}")


def representation_change(ntk_T: Tensor, ntk_0: Tensor) -> float:
    """``‖M(θ_T) − M(θ_0)‖_F²``, the squared Frobenius change of the NTK ([K22] Table 1).

    Both matrices must be in the same ``vec`` order (:mod:`.jacobian`); the difference is taken in float64.
    """
    _square("ntk_T", ntk_T)
    _square("ntk_0", ntk_0)
    if ntk_T.shape != ntk_0.shape:
        raise ValueError(f"NTK shapes differ: {tuple(ntk_T.shape)} vs {tuple(ntk_0.shape)}")
    diff = ntk_T.to(torch.float64) - ntk_0.to(device=ntk_T.device, dtype=torch.float64)
    return float(diff.square().sum())


def smallest_eigenvalue(ntk: Tensor) -> float:
    """``λ_min(M)`` of the symmetric part ``(M + Mᵀ)/2``, computed in float64.

    A float32 NTK carries rounding of about ``1e-7·‖M‖``, so eigenvalues below that are noise.
    """
    _square("ntk", ntk)
    if ntk.shape[0] == 0:
        raise ValueError("the NTK is empty")
    m = ntk.to(torch.float64)
    return float(torch.linalg.eigvalsh(0.5 * (m + m.T))[0])
