"""Trunk features for a certificate and the verdict on them, cheapest route first ([K22] §3.4
checks the rank of the features; docs/verifiers.md "Cost").

A certificate must not cost more than the training it certifies. So :func:`certified_features`

1. tries the float32 features (the run's cache, or one float32 pass) with their measured error
   counted as a noise floor, by the cheap routes only (the Gram certificate): only *verified* is
   accepted from them, so no expensive fallback is spent on an attempt whose other answers are
   discarded, and an EE attempt stops at the first output it cannot verify;
2. decides on float64 features, cheap routes first; the expensive factor route (SVD and pivoted
   QR of the features) runs within ``budget_flops`` in ``mode="auto"``, whatever it costs in
   ``mode="full"``. An ``"auto"`` verdict left open by the budget is *inconclusive* and names
   where the full decision is made: ``gconv verify <condition> --checkpoint DIR/checkpoint.pt``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import NumericalError, UserInputError
from ..linalg import Verdict
from .features import (FEATURE_CHUNK, relative_row_error, sample_index,
                       trunk_features)

CERTIFICATE_PRECISIONS = ("auto", "float64")
CERTIFICATE_MODES = ("auto", "full")
AUTO_BUDGET_FLOPS = 1e12
"""Default cap (flops) on the expensive fallback of ``mode="auto"``: about 10–20 s on two CPU
cores, the order of a small run's whole training (docs/verifiers.md "Cost")."""
RECOMPUTE_GROUP = 8
"""Chunks of rows recomputed per float64 copy of the trunk in the float64 pass."""

Screen = Callable[[Tensor, float, int], "tuple[bool, dict[str, float]]"]
"""``screen(sample, feature_error, n)``: whether float32 features with relative row error
``feature_error`` could verify the condition on ``n`` rows, judged from the float64 features of
the sampled rows: by row-deletion interlacing ``σ_n(A) ≤ σ_k(A_sample)`` (k sampled rows), so
when ``σ_k`` of the sample is below ``band ×`` the noise floor (estimated from the sample scaled
to n rows), the attempt cannot give *verified*. Returns the answer and its figures."""
Check = Callable[[Tensor, "float | None", "float | None"], Verdict]
"""``check(features, feature_error, fallback_flops)``: the condition's verdict on ``features``
with a relative row error ``feature_error`` (None: exact) and the factor route capped at
``fallback_flops`` (None: no cap, 0: never)."""


def require_mode(mode: str, precision: str) -> None:
    """Refuse an unknown certificate ``mode`` or ``precision`` with the allowed values."""
    if mode not in CERTIFICATE_MODES:
        raise UserInputError(f"certificate mode must be one of {', '.join(CERTIFICATE_MODES)}, "
                             f"got {mode!r}")
    if precision not in CERTIFICATE_PRECISIONS:
        raise UserInputError(f"certificate precision must be one of "
                             f"{', '.join(CERTIFICATE_PRECISIONS)}, got {precision!r}")


def certified_features(model: nn.Module, x: Tensor, check: Check, features: Tensor | None,
                       precision: str, chunk_size: int = FEATURE_CHUNK, *, mode: str = "auto",
                       budget_flops: float = AUTO_BUDGET_FLOPS,
                       condition: str = "the condition",
                       check_flops: Callable[[int, int], float] | None = None,
                       screen: Screen | None = None) -> tuple[Tensor, Verdict]:
    """Trunk features of ``x`` (float64) and the verdict ``check`` gives on them.

    ``precision="float64"``: float64 features only. ``"auto"``: first the float32 features —
    ``features`` if given (the run's cache), else one float32 pass — with their error measured
    against float64 on a sample (:func:`~.features.relative_row_error`) counted as a noise floor;
    only a *verified* verdict is accepted from them, and they get no factor route. Anything else
    is decided again on float64 features, so ``"auto"`` can save the float64 pass but never turns
    a verdict into *verified* that float64 would not give. The float32 attempt is skipped when
    it cannot pay: ``check_flops(n, m)`` (the flops of one check on ``n × m`` features) above the
    float64 pass's flops (counted on the sample, scaled to ``n``), or when ``screen(sample, error, n)`` shows that float32 cannot verify (see
    :data:`Screen`); ``details["float32_attempt"]`` says so. ``mode`` and ``budget_flops`` as in the
    module docstring. The constants (``L_H``, ``L̂``) are then computed on the features the
    verdict used.
    """
    require_mode(mode, precision)
    fallback = None if mode == "full" else float(budget_flops)
    if precision == "float64":
        exact, seconds = trunk_features(model, x, torch.float64, chunk_size)
        _require_finite_features(exact)
        verdict = _checked(check, exact, None, fallback, seconds, "float64")
        return exact, _name_offline_route(verdict, mode, condition)
    start = time.perf_counter()
    index = sample_index(x.shape[0])
    with FlopCounterMode(display=False) as counter:
        sample, _ = trunk_features(model, x[index.to(x.device)], torch.float64, chunk_size)
    pass_flops = counter.get_total_flops() * x.shape[0] / max(sample.shape[0], 1)
    worth, estimate = _float32_pays(x.shape[0], sample, pass_flops, check_flops, features)
    if worth and screen is not None:
        rows32 = (features[index.to(features.device)] if features is not None else
                  trunk_features(model, x[index.to(x.device)], torch.float32, chunk_size)[0])
        bound = relative_row_error(rows32, sample).bound
        if math.isfinite(bound):          # inf/NaN: the overflow path below says so
            worth, figures = screen(sample, bound, x.shape[0])
            estimate.update(figures)
    if not worth:
        exact = torch.empty(x.shape[0], sample.shape[1], dtype=torch.float64,
                            device=sample.device)
        exact = _overwrite_in_float64(model, x, exact, index, sample, chunk_size)
        _require_finite_features(exact)
        verdict = _checked(check, exact, None, fallback, time.perf_counter() - start, "float64")
        verdict.details["float32_attempt"] = {"verdict": None, "skipped": estimate}
        verdict.details.setdefault("notes", []).append(
            "float32 attempt skipped: it cannot pay (one check costs more than the float64 "
            "feature pass) or cannot verify (its noise floor is above σ_n's upper bound)")
        return exact, _name_offline_route(verdict, mode, condition)
    if features is None:
        features, _ = trunk_features(model, x, torch.float32, chunk_size)
    error = relative_row_error(features[index.to(features.device)], sample)
    cast = features.flatten(1).to(sample.device, torch.float64, copy=True)
    if bool(torch.isfinite(cast).all()) and math.isfinite(error.bound):
        verdict = _checked(check, cast, error.bound, 0.0, time.perf_counter() - start,
                           "float32")
        verdict.details["feature_error"] = error.to_dict()
        if verdict.verified:
            return cast, verdict
        attempt = {"verdict": verdict.verdict, "smallest_kept": verdict.smallest_kept,
                   "tolerance": verdict.tolerance, "feature_error": error.to_dict(),
                   "seconds": dict(verdict.seconds),
                   "outputs_checked": verdict.details.get("outputs_checked")}
        note = (f"float32 features gave '{attempt['verdict']}' with their noise floor counted "
                "(cheap routes only); decided again on float64 features")
    else:
        attempt = {"verdict": None, "feature_error": error.to_dict()}
        note = "float32 features overflowed (inf/NaN); decided on float64 features"
    start = time.perf_counter()
    exact = _overwrite_in_float64(model, x, cast, index, sample, chunk_size)
    _require_finite_features(exact)
    verdict = _checked(check, exact, None, fallback, time.perf_counter() - start, "float64")
    verdict.details["float32_attempt"] = attempt
    verdict.details.setdefault("notes", []).append(note)
    return exact, _name_offline_route(verdict, mode, condition)


def _float32_pays(n: int, sample: Tensor, pass_flops: float,
                  check_flops: Callable[[int, int], float] | None,
                  features: Tensor | None) -> tuple[bool, dict[str, float]]:
    """Whether the float32 attempt can save more than it risks: the float64 trunk pass over the
    ``n`` inputs it would save (``pass_flops``: the sample's pass counted by
    ``torch.utils.flop_counter``, scaled to ``n``) against one check's flops. Counted, not timed,
    so that the same run always takes the same route (a resumed run's certificate is the
    uninterrupted run's)."""
    if check_flops is None or sample.shape[0] == 0:
        return True, {}
    check = check_flops(n, sample.shape[1])
    estimate = {"float64_pass_flops": pass_flops, "check_flops": check,
                "features_given": features is not None}
    return pass_flops > check, estimate


def _name_offline_route(verdict: Verdict, mode: str, condition: str) -> Verdict:
    """Record the mode; where the budget left the verdict open, say where it is decided."""
    verdict.details["mode"] = mode
    skipped = [d for d in [verdict.details] + verdict.details.get("per_output", [])
               if d.get("factor_route_skipped") or d.get("sketch_skipped")
               or "over the budget" in str(d.get("notes", ""))]
    if verdict.verdict == "inconclusive" and skipped:
        where = f"gconv verify {condition} --checkpoint DIR/checkpoint.pt"
        verdict.details["decide_offline"] = where
        verdict.details.setdefault("notes", []).append(
            f"mode='auto' left this open: the deciding route is over its budget; `{where}` "
            "(or mode='full') decides it whatever it costs")
    return verdict


def _require_finite_features(features: Tensor) -> None:
    """The certificate's conditions are ranks of these features: refuse inf/NaN, which a finite
    but huge network (a diverged run) produces, with the count of rows hit."""
    finite = torch.isfinite(features).flatten(1).all(dim=1)
    if not bool(finite.all()):
        raise NumericalError(f"the trunk features are not finite in float64 for "
                             f"{int((~finite).sum())} of {features.shape[0]} inputs: the "
                             "parameters are finite but the forward pass overflows, so no "
                             "condition can be checked")


def _overwrite_in_float64(model: nn.Module, x: Tensor, features: Tensor, index: Tensor,
                          sample: Tensor, chunk_size: int) -> Tensor:
    """``features`` (float64, cast from float32) overwritten in place with float64 features:
    the already recomputed rows ``index`` from ``sample``, the others in groups of
    ``RECOMPUTE_GROUP`` chunks (one float64 copy of the trunk per group, no second n × m array)."""
    features[index.to(features.device)] = sample
    rest = torch.ones(x.shape[0], dtype=torch.bool)
    rest[index] = False
    others = rest.nonzero().squeeze(1)
    for group in torch.split(others, RECOMPUTE_GROUP * chunk_size) if len(others) else ():
        features[group.to(features.device)], _ = trunk_features(
            model, x[group.to(x.device)], torch.float64, chunk_size)
    return features


def _checked(check: Check, features: Tensor, error: float | None, fallback: float | None,
             seconds: float, precision: str) -> Verdict:
    verdict = check(features, error, fallback)
    verdict.seconds["features"] = seconds
    verdict.details["feature_precision"] = precision
    return verdict
