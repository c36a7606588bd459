"""The linear second phase of the coefficient-space engine (:mod:`.kernel_steps`): its features Φ
in factored form, and its losses on the outputs ``f = Φ w`` in closed form.

- EE exploitation ([K22] §3.2, eq. 3.4 after line 10 of Algorithm 1): per output ``j``,
  ``Φ_j(x_i) = A_j[i] ⊗ z_i`` with ``A_j[i, k] = W(H)_{jk} σ̃(ς' R_{jk}·z_i)``, so that
  ``K_j = Φ_j Φ_jᵀ = (A_j A_jᵀ) ⊙ (Z Zᵀ)``;
- the two-phase method's phase 2 ([KS21] Algorithm 1): ``Φ(x_i) = [h(x_i), 1]``, ``K = h hᵀ + 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import Loss
from ..models import GatedHead
from ..linalg.symmetric import gram, grams, symmetric_into

DTYPE = torch.float64
"""Precision of the engine's kernel, factors and coefficients."""


# -- the linear second phase: Φ in factored form --------------------------------------------------
@dataclass
class FeatureMap:
    """``f = Φ w`` for the trained parameters ``params`` of a linear head, Φ kept in factors.

    ``left`` (q, n, a) and ``right`` (n, b): ``Φ_j(x_i) = left[j, i] ⊗ right[i]`` for EE
    (q = m_y outputs, a = m_H, b = m_{H−1}); for a linear head ``left`` is None and
    ``Φ(x_i) = right[i] = [h(x_i), 1]`` for every output.
    """

    params: list[nn.Parameter]
    left: torch.Tensor | None
    right: torch.Tensor

    @property
    def n(self) -> int:
        return self.right.shape[0]

    def kernel(self, extra: int = 0) -> torch.Tensor:
        """``K_j = Φ_j Φ_jᵀ`` in the leading n columns of a (q, n, n + extra) tensor; the last
        ``extra`` columns are left unset for the caller (the engine's widened kernel is allocated
        once at its final size). ``K = R Rᵀ`` for a linear head; ``K_j = (A_j A_jᵀ) ⊙ (Z Zᵀ)`` for
        EE ([K22] §3.2), the ``A_j A_jᵀ`` written side by side into their slices
        (:func:`~global_convergence.linalg.symmetric.grams`) and scaled there in place."""
        q = 1 if self.left is None else len(self.left)
        out = self.right.new_empty(q, self.n, self.n + extra)
        if self.left is None:
            symmetric_into(self.right, out[0, :, :self.n])
            return out
        z_gram = gram(self.right)
        for k_j in grams(list(self.left), [out[j, :, :self.n] for j in range(q)]):
            k_j.mul_(z_gram)
        return out

    def outputs(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``Φ w`` (n, m_y) for parameter-shaped ``tensors`` (the weights, or a momentum buffer)."""
        tensors = [t.to(self.right.dtype) for t in tensors]
        if self.left is None:
            weight = _linear_matrix(tensors, self.right.shape[1])
            return self.right @ weight.T
        pre = torch.einsum("il,jkl->jik", self.right, tensors[0])
        return pre.mul_(self.left).sum(dim=2).T

    def transpose(self, c: torch.Tensor) -> list[torch.Tensor]:
        """``Φᵀ c`` as parameter-shaped tensors, for coefficients ``c`` of shape (n, m_y)."""
        if self.left is None:
            weight = c.T @ self.right                      # (m_y, m_H [+ 1])
            return _split_linear(weight, self.params)
        scaled = self.left * c.T[:, :, None]               # (m_y, n, m_H)
        return [torch.bmm(scaled.transpose(1, 2), self.right.expand(len(scaled), -1, -1))]


def _linear_matrix(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """``[W, b]`` of a linear layer (``W`` alone when it has no bias)."""
    weight = tensors[0]
    return torch.cat([weight, tensors[1][:, None]], dim=1) if width > weight.shape[1] else weight


def _split_linear(matrix: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    inputs = params[0].shape[1]
    parts = [matrix[:, :inputs]]
    if len(params) > 1:
        parts.append(matrix[:, inputs])
    return [p.contiguous() for p in parts]


def ee_feature_map(head: GatedHead, features: torch.Tensor, dtype: torch.dtype = DTYPE) -> FeatureMap:
    """Φ of the EE head after the switch: gates ``R(j)`` and ``W(H)`` fixed, ``w_{jk}`` trained.
    The gates are evaluated as the head's forward pass does (its dtype), then widened."""
    with torch.no_grad():
        z = head.augmented_input(features.flatten(1).to(head.weight.dtype))
        gates = torch.sigmoid(head.gate_sharpness * head.preactivations(z, head.gates))
        left = (gates * head.out_weight).permute(1, 0, 2)                  # (m_y, n, m_H)
    return FeatureMap([head.weight], left.to(dtype).contiguous(), z.to(dtype))


def linear_feature_map(head: nn.Linear, features: torch.Tensor, dtype: torch.dtype = DTYPE) -> FeatureMap:
    """Φ of the two-phase output layer: ``[h, 1]`` (``h`` alone without a bias)."""
    h = features.flatten(1).to(dtype)
    if head.bias is not None:
        h = torch.cat([h, h.new_ones(len(h), 1)], dim=1)
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    return FeatureMap(params, None, h)


# -- the loss on the outputs ----------------------------------------------------------------------
def loss_and_gradient(loss: Loss, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-mean loss and its gradient ``∂L/∂f`` (batch, m_y) in closed form (the losses of
    docs/design.md: binary cross-entropy on one logit, softmax cross-entropy, squared error)."""
    return _loss_and_gradient(loss, out, prepare_targets(loss, y, out.dtype))


def prepare_targets(loss: Loss, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Targets in the form the closed-form loss reads: ``y`` and the sign ``2y − 1`` as two
    columns (binary), regression targets (squared error), or the class labels."""
    if loss.kind == "mse":
        return loss._regression_targets(y, dtype)
    if loss.output_dim == 1:
        y = y.to(dtype).reshape(-1, 1)
        return torch.cat([y, 2 * y - 1], dim=1)
    return y


def _loss_and_gradient(loss: Loss, out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = len(out)
    if loss.kind == "mse":
        residual = out - t
        return residual.pow(2).sum() / b, residual.mul_(2.0 / b)
    if loss.output_dim == 1:         # ℓ = −log σ(s f), s = 2y − 1;  ∂ℓ/∂f = σ(f) − y
        value = F.logsigmoid(out * t[:, 1:]).mean().neg()
        return value, torch.sigmoid(out).sub_(t[:, :1]).div_(b)
    value = F.cross_entropy(out, t)
    grad = torch.softmax(out, dim=1)
    grad[torch.arange(b), t] -= 1.0
    return value, grad / b


def block_losses(loss: Loss, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Batch-mean losses (k,) of ``k`` steps' outputs ``out`` (k, b, m_y) on targets ``t``
    (k, b, …) in the form of :func:`prepare_targets`: the values :func:`loss_and_gradient` gives."""
    b = out.shape[1]
    if loss.kind == "mse":
        return (out - t).pow_(2).sum(dim=(1, 2)).div_(b)
    if loss.output_dim == 1:
        return F.logsigmoid(out[..., 0] * t[..., 1]).mean(dim=1).neg_()
    return F.cross_entropy(out.transpose(1, 2), t, reduction="none").mean(dim=1)


def residual_targets(loss: Loss, t: torch.Tensor, outputs: int) -> torch.Tensor:
    """``T`` (n, m_y) with ``∂L/∂f = s (h(f) − T)``, for targets ``t`` in the form of
    :func:`prepare_targets`: ``y`` (binary), ``onehot(y)`` (softmax), the regression targets."""
    if loss.kind == "mse":
        return t
    if loss.output_dim == 1:
        return t[:, :1].contiguous()
    return F.one_hot(t, outputs).to(DTYPE)


def gradient_scale(loss: Loss, batch: int) -> float:
    """``s`` of :func:`residual_targets`: ``2 / b`` for squared error, else ``1 / b``."""
    return (2.0 if loss.kind == "mse" else 1.0) / batch


def activate(loss: Loss, out: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """``h(f)`` of :func:`residual_targets` (σ, softmax or the identity), into ``into`` if given."""
    if loss.kind == "mse":
        return out.clone() if into is None else into.copy_(out)
    if loss.output_dim == 1:
        return torch.sigmoid(out, out=into)
    value = torch.softmax(out, dim=1)
    return value if into is None else into.copy_(value)
