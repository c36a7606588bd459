"""The result of a rank decision: :class:`Verdict` and its JSON form (docs/verifiers.md).

A verdict is one of three words:

* ``"verified"`` — the condition holds at the stated tolerance, with a margin;
* ``"not-verified"`` — it fails at that tolerance, with a margin;
* ``"inconclusive"`` — the question ``rank = n`` is open: the deciding value lies within the
  tolerance band, the methods disagree about whether the rank reaches n, or no method that could
  decide fitted in memory (or in the budget). Never reported as verified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

VERIFIED = "verified"
NOT_VERIFIED = "not-verified"
INCONCLUSIVE = "inconclusive"
VERDICTS = (VERIFIED, NOT_VERIFIED, INCONCLUSIVE)

BASE_KEYS = ("condition", "n", "rank", "verdict", "tolerance", "precision", "smallest_kept",
             "largest_dropped", "methods", "agree", "shape", "seconds")
"""The keys of ``gconv verify --json`` (docs/verifiers.md), in that order."""


class HasVerdict:
    """A ``verdict`` field that must be one of :data:`VERDICTS`, checked when the dataclass that
    inherits this is built, and ``verified``."""

    verdict: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @property
    def verified(self) -> bool:
        """Whether the condition was verified (inconclusive counts as not verified)."""
        return self.verdict == VERIFIED


@dataclass
class Verdict(HasVerdict):
    """A rank condition decided numerically.

    ``rank`` is the numerical rank at ``tolerance`` of the matrix of ``shape`` (the first method's
    rank, SVD where it ran); ``n`` the target; ``smallest_kept`` / ``largest_dropped`` the singular
    values on either side of the cut (``None`` where there is none); ``methods`` the rank each
    method found and ``agree`` whether they coincide; ``seconds`` the time for the features and for
    the rank decision. ``details`` holds condition-specific figures (``rank_augmented``,
    ``relative_residual``, per-output results, the route taken, notes); :meth:`to_dict` flattens
    them into the JSON object.
    """

    condition: str
    verdict: str
    rank: int
    n: int
    tolerance: float
    precision: str
    smallest_kept: float | None
    largest_dropped: float | None
    methods: dict[str, int]
    agree: bool
    shape: list[int]
    seconds: dict[str, float] = field(default_factory=lambda: {"features": 0.0, "rank": 0.0})
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``gconv verify --json``: the base keys, then ``details`` flattened (a detail never
        overrides a base key). Every value is a plain Python number, string, list, dict or None."""
        base = {key: getattr(self, key) for key in BASE_KEYS}
        extra = {key: value for key, value in self.details.items() if key not in base}
        return jsonable({**base, **extra})


def jsonable(value: Any) -> Any:
    """``value`` with numpy/torch scalars and arrays turned into Python numbers and lists, tuples
    into lists, verdicts into dicts, and non-finite floats into ``None`` (JSON has no NaN)."""
    if isinstance(value, Verdict):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value
