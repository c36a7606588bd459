"""The losses of the papers' training objectives, their smoothness constants ``L_ℓ`` and the alignment targets ``Y'``.

| kind | targets | ℓ(q, y) | L_ℓ | Y' |
|---|---|---|---|---|
| ce, 2 classes | y ∈ {0,1} | binary cross-entropy on one logit (m_y = 1) | 1/4 | 2y − 1 |
| ce, C > 2 | y ∈ {0..C−1} | softmax cross-entropy on C logits | 1/2 | 2·onehot(y) − 1 |
| mse | y ∈ R^{m_y} | ‖q − y‖² (sum over outputs) | 2 | Y |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserInputError

LOSS_NAMES = ("ce", "mse")


@dataclass(frozen=True)
class Loss:
    """A training loss ``L(θ) = (1/n) Σ_i ℓ(f(x_i, θ), y_i)`` with its constants."""

    kind: str
    output_dim: int
    num_classes: int | None = None

    @property
    def smoothness(self) -> float:
        """``L_ℓ``: Lipschitz constant of ∇_q ℓ(q, y) (docs/design.md)."""
        if self.kind == "mse":
            return 2.0
        return 0.25 if self.output_dim == 1 else 0.5

    def __call__(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch."""
        if self.kind == "mse":
            return self.per_sample(output, y).mean()
        if self.output_dim == 1:
            return F.binary_cross_entropy_with_logits(output[:, 0], y.to(output.dtype))
        return F.cross_entropy(output, y)

    def per_sample(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``ℓ(f(x_i), y_i)`` for each sample (used for exact sums over chunks)."""
        if self.kind == "mse":
            return (output - self._regression_targets(y, output.dtype)).pow(2).sum(dim=1)
        if self.output_dim == 1:
            return F.binary_cross_entropy_with_logits(output[:, 0], y.to(output.dtype), reduction="none")
        return F.cross_entropy(output, y, reduction="none")

    def _regression_targets(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``mse`` targets as (n, m_y): real targets as given, class labels one-hot."""
        if not y.is_floating_point() and self.output_dim > 1:
            return F.one_hot(y, self.output_dim).to(dtype)
        return y.reshape(y.shape[0], self.output_dim).to(dtype)

    def predictions(self, output: torch.Tensor) -> torch.Tensor:
        """Predicted class: sign of the one logit, or argmax."""
        if self.output_dim == 1:
            return (output[:, 0] > 0).long()
        return output.argmax(dim=1)

    def errors(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Number of misclassified samples, or None for ``mse`` (no classes)."""
        if self.kind == "mse":
            return None
        return (self.predictions(output) != y).sum()

    def alignment_targets(self, y: torch.Tensor) -> torch.Tensor:
        """``Y' ∈ R^{n × m_y}`` (docs/design.md); ``vec`` of it pairs with the rows of ``J``."""
        if self.kind == "mse":
            return self._regression_targets(y, torch.float64)
        if self.output_dim == 1:
            return (2.0 * y.double() - 1.0)[:, None]
        return 2.0 * F.one_hot(y, self.output_dim).double() - 1.0


def make_loss(kind: str, num_classes: int | None, target_dim: int | None = None) -> Loss:
    """The loss for ``--loss kind``: ``ce`` needs ``num_classes ≥ 2``; ``mse`` uses
    ``target_dim`` outputs (or ``num_classes`` one-hot outputs when the targets are labels)."""
    if kind == "ce":
        if num_classes is None or num_classes < 2:
            raise UserInputError(f"loss 'ce' needs integer class labels with at least 2 classes, "
                                 f"got num_classes={num_classes}")
        return Loss("ce", 1 if num_classes == 2 else num_classes, num_classes)
    if kind == "mse":
        dim = target_dim if target_dim is not None else num_classes
        if dim is None or dim < 1:
            raise UserInputError(f"loss 'mse' needs targets with at least one output, got {dim}")
        return Loss("mse", dim, num_classes)
    raise UserInputError(f"unknown loss '{kind}'; expected one of {', '.join(LOSS_NAMES)}")
