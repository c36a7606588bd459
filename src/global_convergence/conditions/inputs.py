"""Conditions on the data and the widths: [KS21] Assumption 3 and Theorem 2.

* Input distinguishability (Assumption 3): ``‖x_i‖² − x_iᵀ x_j > 0`` for all ``i ≠ j``.
* Width condition of Theorem 2 (fully connected softplus nets with ``H ≥ 2`` hidden layers):
  ``min(m_1, …, m_{H−1}) ≥ min(m_x, n)`` and ``m_H ≥ n``. With Assumption 3 it implies the
  expressivity condition (Assumption 1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from ..linalg import INCONCLUSIVE, NOT_VERIFIED, VERIFIED, jsonable
from ..linalg.tolerance import gamma
from ..linalg.verdict import HasVerdict
from ..models import SplitNet

DISTINGUISH_CHUNK = 1024
"""Rows of the ``n × n`` margin matrix computed at once."""


@dataclass
class ConditionReport(HasVerdict):
    """A condition that is not a rank: its verdict and the figures behind it."""

    condition: str
    verdict: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """``{"condition", "verdict", …figures, "seconds"}`` with plain JSON values."""
        return jsonable({"condition": self.condition, "verdict": self.verdict, **self.figures,
                         "seconds": self.seconds})


def input_distinguishability(x: Tensor, *, chunk_size: int = DISTINGUISH_CHUNK) -> ConditionReport:
    """[KS21] Assumption 3 on the flattened inputs, in float64.

    Reports the minimum margin ``min_{i≠j} ‖x_i‖² − x_iᵀx_j`` and the pair attaining it. Each margin
    carries a rounding bound ``γ_{m_x+1}(‖x_i‖² + ‖x_i‖‖x_j‖)``: *verified* if every margin exceeds
    its bound, *not-verified* if some margin is below minus its bound or two inputs are equal
    (margin exactly 0), *inconclusive* otherwise.
    """
    start = time.perf_counter()
    flat = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    n, m = flat.shape
    duplicate = _duplicate_pair(flat)
    norms_sq = flat.pow(2).sum(dim=1)
    norms = norms_sq.sqrt()
    g = gamma(m + 1, torch.float64)
    worst = (float("inf"), None)            # smallest margin − bound, and its pair
    smallest = (float("inf"), None)         # smallest margin, and its pair
    violated = undecided = False
    for s in range(0, n, chunk_size):
        rows = slice(s, min(s + chunk_size, n))
        margin = norms_sq[rows, None] - flat[rows] @ flat.T
        bound = g * (norms_sq[rows, None] + norms[rows, None] * norms[None, :])
        idx = torch.arange(rows.start, rows.stop, device=flat.device)
        margin[idx - s, idx] = float("inf")
        violated |= bool((margin < -bound).any())
        undecided |= bool(((margin >= -bound) & (margin <= bound)).any())
        smallest = min(smallest, _argmin(margin, s), key=lambda t: t[0])
        worst = min(worst, _argmin(margin - bound, s), key=lambda t: t[0])
    if duplicate is not None or violated:
        verdict = NOT_VERIFIED
    elif undecided:
        verdict = INCONCLUSIVE
    else:
        verdict = VERIFIED
    figures = {"n": n, "min_margin": smallest[0] if n > 1 else None, "pair": smallest[1],
               "duplicate_pair": duplicate, "rounding_factor": g,
               "assumption": "[KS21] Assumption 3: ||x_i||^2 - x_i^T x_j > 0 for i != j"}
    return ConditionReport("input-distinguishability", verdict if n > 1 else VERIFIED, figures,
                           time.perf_counter() - start)


def _argmin(values: Tensor, row_offset: int) -> tuple[float, list[int] | None]:
    flat_index = int(torch.argmin(values))
    i, j = divmod(flat_index, values.shape[1])
    return float(values[i, j]), [row_offset + i, j]


def _duplicate_pair(flat: Tensor) -> list[int] | None:
    """The first pair ``[i, j]`` (i < j) of identical rows, or None."""
    _, inverse, counts = torch.unique(flat, dim=0, return_inverse=True, return_counts=True)
    repeated = torch.nonzero(counts[inverse] > 1).flatten()
    if repeated.numel() == 0:
        return None
    first = int(repeated[0])
    others = torch.nonzero(inverse == inverse[first]).flatten()
    return [first, int(others[1])]


def hidden_widths(model: nn.Module) -> list[int]:
    """``m_1, …, m_H``: output widths of the hidden fully connected layers, in order.

    For a :class:`~global_convergence.models.SplitNet` the trunk's linear layers (its last one is
    the last hidden layer); otherwise every linear layer but the last (the output layer).
    Convolutions are refused: Theorem 2 is about fully connected networks."""
    body = model.trunk if isinstance(model, SplitNet) else model
    convs = [name for name, m in body.named_modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if convs:
        raise UserInputError(f"width_condition is for fully connected networks; found the "
                             f"convolution '{convs[0]}'")
    linears = [m.out_features for m in body.modules() if isinstance(m, nn.Linear)]
    return linears if isinstance(model, SplitNet) else linears[:-1]


def width_condition(model: nn.Module, n: int, input_dim: int) -> ConditionReport:
    """[KS21] Theorem 2's widths: ``H ≥ 2``, ``min(m_1..m_{H−1}) ≥ min(m_x, n)``, ``m_H ≥ n``."""
    widths = hidden_widths(model)
    inner, last = widths[:-1], (widths[-1] if widths else 0)
    required_inner = min(int(input_dim), int(n))
    checks = {"at_least_two_hidden_layers": len(widths) >= 2,
              "inner_widths_ok": bool(inner) and min(inner) >= required_inner,
              "last_hidden_ok": last >= n}
    figures = {"widths": widths, "H": len(widths), "min_inner": min(inner) if inner else None,
               "required_inner": required_inner, "last_hidden": last, "required_last": int(n),
               "input_dim": int(input_dim), "checks": checks,
               "failing": [name for name, ok in checks.items() if not ok],
               "theorem": "[KS21] Theorem 2: min(m_1..m_{H-1}) >= min(m_x, n) and m_H >= n"}
    return ConditionReport("width", VERIFIED if all(checks.values()) else NOT_VERIFIED, figures)
