"""The safe-exploration condition of [K22], Assumption 10 (§3.3.1), and He initialisation.

For ``q ∈ R^{m_H × m_{H−1}}`` (rows ``q_k``; the paper's ``q_{*k}``) and the trunk parameters
``θ(1:H−2)``, row ``i`` of ``ϕ(q, θ(1:H−2)) ∈ R^{n × m_H m_{H−1}}`` is

    ϕ_i = [σ̃(z_i · q_1) z_i, …, σ̃(z_i · q_{m_H}) z_i] = s_i ⊗ z_i,    s_ik = σ̃(z_i · q_k),

with ``z_i = [z̄(x_i), 1]`` and ``σ̃(t) = sigmoid(ς' t)``; the condition asks ``rank ϕ = n``.
With ``S = σ̃(Z qᵀ)`` (n × m_H), ``ϕϕᵀ = (S Sᵀ) ⊙ (Z Zᵀ)``: the rank is decided from the
``n × n`` Gram matrix with a Cholesky certificate, and ``ϕ`` itself (built in chunks, SVD and
pivoted QR through TSQR) only where that certificate fails or a cross-check is asked for, within a
memory budget (:func:`~global_convergence.linalg.factor_rank_verdict`).

After the switch, the wrapper's gates are ``R(j) = W(H−1, j)_τ`` for each output ``j``; the
condition behind Theorem 5 is ``rank ϕ(R(j), θ(1:H−2)_τ) = n`` for every ``j``.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import UserInputError
from ..linalg import (FACTOR_MEMORY_BUDGET, INCONCLUSIVE, NOT_VERIFIED, RANK_BAND, VERIFIED,
                      KhatriRaoFactor, Verdict, factor_rank_verdict)
from ..linalg.distributed_rank import distributed_factor_rank_verdict
from ..models.heads import GatedHead
from .batchnorm import with_recomputed_batchnorm
from .certified import certified_features
from .features import FEATURE_CHUNK, require_ee, trunk_features

SHARED = "shared"
"""Label of the single check made when one ``q`` serves every output."""


def he_initialise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every convolution and linear weight He-normal (``N(0, 2/fan_in)``, He et al. 2015)
    and zero their biases, from a generator seeded with ``seed``; in place, returns ``module``.
    [K22] §3.4 verified Assumption 10 with such a trunk. Other modules (batch norm, the gated
    head) are left as they are."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                w = torch.empty(m.weight.shape, dtype=torch.float64)
                nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu", generator=generator)
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
    return module


def gate_matrices(head: GatedHead, q: Tensor | str | None, seed: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[list[tuple[Any, Tensor]], str]:
    """The ``q`` matrices (m_H × m_{H−1}) to check, labelled by output, and where they came from.

    ``None``: the model's state — the frozen gates ``R(j)`` once untied, else the current weights
    ``W(H−1, j)`` (tied gates), one per output. ``"random"``: one ``q ~ N(0, 1)`` drawn with
    ``seed``, shared by all outputs ([K22] §3.4). A tensor: (m_H, m_{H−1}) shared, or
    (m_y, m_H, m_{H−1}) per output.
    """
    shape = (head.width, head.in_features + 1)
    if q is None:
        source = head.weight if head.are_gates_tied else head.gates
        label = "weights W(H-1, j) (gates tied)" if head.are_gates_tied else "gates R(j) (frozen)"
        return [(j, source[j].detach().to(device, dtype)) for j in range(head.outputs)], label
    if isinstance(q, str):
        if q != "random":
            raise UserInputError(f"q must be None, 'random' or a tensor, got {q!r}")
        g = torch.Generator().manual_seed(seed)
        draw = torch.randn(shape, generator=g, dtype=torch.float64)
        return [(SHARED, draw.to(device, dtype))], f"random N(0, 1), seed {seed}"
    q = q.detach().to(device, dtype)
    if tuple(q.shape) == shape:
        return [(SHARED, q)], "given"
    if tuple(q.shape) == (head.outputs, *shape):
        return [(j, q[j]) for j in range(head.outputs)], "given (per output)"
    raise UserInputError(f"q must have shape {shape} or {(head.outputs, *shape)}, got "
                         f"{tuple(q.shape)}")


def gate_values(z: Tensor, q: Tensor, sharpness: float) -> Tensor:
    """``S = σ̃(Z qᵀ)`` with ``σ̃(t) = sigmoid(ς' t)`` (n × m_H)."""
    return torch.sigmoid(sharpness * (z @ q.T))


def gated_inputs(model: nn.Module, x: Tensor, dtype: torch.dtype = torch.float64,
                 chunk_size: int = FEATURE_CHUNK) -> tuple[Tensor, float]:
    """``Z`` with rows ``z_i = [z̄(x_i), 1]`` (n × m_{H−1}) from a ``dtype`` copy of the trunk,
    and the seconds it took."""
    model = require_ee(model, "safe_exploration")
    z_bar, seconds = trunk_features(model, x, dtype, chunk_size)
    return model.head.augmented_input(z_bar), seconds


def safe_exploration(model: nn.Module, x: Tensor, *, q: Tensor | str | None = None,
                     seed: int = 0, dtype: torch.dtype | None = None, precision: str = "auto",
                     recompute_batchnorm: bool = True,
                     chunk_size: int = FEATURE_CHUNK, tol: float | None = None,
                     band: float = RANK_BAND, cross_check: bool = False,
                     factor_memory_budget: int = FACTOR_MEMORY_BUDGET,
                     gram_memory_budget: int | None = None, distributed: bool = False,
                     group: "dist.ProcessGroup | None" = None) -> Verdict:
    """[K22] Assumption 10: ``rank ϕ(q_j, θ(1:H−2)) = n`` for every output ``j``.

    ``model`` comes from :func:`~global_convergence.ee_model`; ``q`` as in :func:`gate_matrices`
    (default: the model's state, per output). ``recompute_batchnorm=True`` (a check at
    initialisation) first recomputes the trunk's batch-norm statistics over ``x`` on a copy
    (:func:`~.batchnorm.with_recomputed_batchnorm`); ``False`` keeps the model's;
    ``details["batchnorm"]`` says which. ``precision="auto"``: float32 features with their
    measured noise floor, accepted only when every output verifies, else float64
    (:func:`~.certified.certified_features`); ``"float64"``; ``dtype`` (old keyword) forces
    that dtype. Ranks decided by the Gram certificate, falling back to SVD and pivoted QR of
    ``ϕ`` (``cross_check=True`` runs them always, the paper's two methods, on float64
    features) within ``factor_memory_budget`` bytes. *verified* only if every output is;
    ``details["per_output"]`` has each output's figures. Shape ``[n, m_H·m_{H−1}]``.
    ``distributed=True``: every rank of ``group`` (default: the world) calls this with the same
    model and inputs, and each output's Gram certificate is factorised over the ranks
    (:func:`~global_convergence.linalg.distributed_rank.distributed_factor_rank_verdict`,
    ``gram_memory_budget`` per rank) on float64 features; every rank returns the same verdict.
    """
    model = require_ee(model, "safe_exploration")
    model, statistics = with_recomputed_batchnorm(model, x, recompute=recompute_batchnorm,
                                                  batch_size=chunk_size)
    head = model.head

    def check(z_bar: Tensor, error: float | None, fallback: float | None) -> Verdict:
        return safe_exploration_of_inputs(
            head, head.augmented_input(z_bar), q=q, seed=seed, tol=tol, band=band,
            cross_check=cross_check, factor_memory_budget=factor_memory_budget,
            gram_memory_budget=gram_memory_budget, feature_error=error,
            fallback_flops=fallback, stop_unless_verified=error is not None,
            distributed=distributed, group=group)

    if dtype is not None:
        z_bar, seconds = trunk_features(model, x, dtype, chunk_size)
        verdict = check(z_bar, None, None)
        verdict.seconds["features"] = seconds
    else:
        exact = cross_check or distributed      # ranks must agree on one route: no timed attempt
        _, verdict = certified_features(model, x, check, None,
                                        "float64" if exact else precision, chunk_size,
                                        mode="full", condition="safe-exploration",
                                        check_flops=lambda n, m: check_flops(n, head.width, m + 1),
                                        screen=float32_screen(head, q, seed, band))
    verdict.details["batchnorm"] = statistics
    return verdict


def safe_exploration_of_inputs(head: GatedHead, z: Tensor, *, q: Tensor | str | None = None,
                               seed: int = 0, tol: float | None = None, band: float = RANK_BAND,
                               cross_check: bool = False,
                               factor_memory_budget: int = FACTOR_MEMORY_BUDGET,
                               gram_memory_budget: int | None = None,
                               feature_error: float | None = None,
                               fallback_flops: float | None = None,
                               stop_unless_verified: bool = False, distributed: bool = False,
                               group: "dist.ProcessGroup | None" = None) -> Verdict:
    """Assumption 10 for given head inputs ``Z = [z̄, 1]`` (n × m_{H−1}); ``feature_error`` as
    in :func:`noise_floor` raises each output's tolerance to that floor; ``fallback_flops`` caps
    the expensive routes of all outputs together (each output gets an equal share; the sketch
    and the factor route of :func:`~global_convergence.linalg.factor_rank_verdict`).
    ``stop_unless_verified=True`` stops at the first output that is not *verified* (an attempt
    whose only useful answer is *verified* for all outputs); ``details["outputs_checked"]``
    counts the outputs decided. ``distributed``, ``group`` as in :func:`safe_exploration` (the
    distributed route has no flop cap: its factor route runs on rank 0 within
    ``factor_memory_budget``)."""
    start = time.perf_counter()
    gates, source = gate_matrices(head, q, seed, z.dtype, z.device)
    zz = shared_inner_products(z, len(gates))
    z_cache: dict = {}
    share = None if fallback_flops is None else fallback_flops / len(gates)
    results = []
    for label, qj in gates:
        s = gate_values(z, qj, head.gate_sharpness)
        floor = 0.0 if feature_error is None else noise_floor(z, s, qj, head.gate_sharpness,
                                                              feature_error)
        factor = KhatriRaoFactor(s, z, zz, z_cache)
        if distributed:
            verdict = distributed_factor_rank_verdict(
                factor, condition="safe-exploration", group=group, tol=tol, band=band,
                cross_check=cross_check, factor_memory_budget=factor_memory_budget,
                memory_budget_per_rank=gram_memory_budget, seed=seed, noise_floor=floor)
        else:
            verdict = factor_rank_verdict(factor, condition="safe-exploration", tol=tol,
                                          band=band, cross_check=cross_check,
                                          factor_memory_budget=factor_memory_budget,
                                          gram_memory_budget=gram_memory_budget, seed=seed,
                                          noise_floor=floor, fallback_flops=share)
        results.append((label, verdict))
        if stop_unless_verified and not verdict.verified:
            break
    combined = combine_outputs(results)
    combined.details["outputs_checked"] = f"{len(results)} of {len(gates)}"
    combined.details["q"] = source
    combined.details["assumption"] = "[K22] Assumption 10: rank ϕ(q, θ(1:H-2)) = n"
    combined.seconds["rank"] = time.perf_counter() - start
    return combined


def check_flops(rows: int, gates: int, inputs: int) -> float:
    """About the flops of one output's check: forming ``(S Sᵀ) ⊙ (Z Zᵀ)`` (``2n²(m_H +
    m_{H−1})``) and its Cholesky (``n³/3``)."""
    return 2.0 * rows * rows * (gates + inputs) + rows ** 3 / 3.0


SHARED_GRAM_BYTES = 2**30
"""``Z Zᵀ`` is formed once for all outputs when it takes at most this much memory (n ≤ 11,585 in
float64); beyond it each output's Gram blocks recompute their part."""


def shared_inner_products(z: Tensor, outputs: int,
                          max_bytes: int = SHARED_GRAM_BYTES) -> Tensor | None:
    """``Z Zᵀ``, shared by the Gram matrices ``(S_j S_jᵀ) ⊙ (Z Zᵀ)`` of every output ``j``
    ([K22] §3.3.1), when there are several outputs and it fits ``max_bytes``; else None."""
    n = z.shape[0]
    if outputs < 2 or n * n * z.element_size() > max_bytes:
        return None
    return z @ z.T


def float32_screen(head: GatedHead, q: Tensor | str | None, seed: int, band: float = RANK_BAND):
    """:data:`~.certified.Screen` for ``ϕ`` of every output: ``σ_n(ϕ) ≤ σ_k(ϕ_sample)`` (the k
    sampled rows; from their ``k × k`` Gram, an estimate good far above its rounding) against
    ``band`` times the noise floor of :func:`noise_floor` scaled from the sample to n rows."""
    def screen(sample: Tensor, feature_error: float, n: int) -> tuple[bool, dict[str, float]]:
        if sample.shape[0] == 0:
            return True, {}
        z = head.augmented_input(sample)
        gates, _ = gate_matrices(head, q, seed, z.dtype, z.device)
        worst = (float("inf"), 0.0)
        for _, qj in gates:
            s = gate_values(z, qj, head.gate_sharpness)
            gram = KhatriRaoFactor(s, z).gram()
            upper = math.sqrt(max(float(torch.linalg.eigvalsh(gram)[0]), 0.0))
            floor = noise_floor(z, s, qj, head.gate_sharpness, feature_error) \
                * math.sqrt(n / sample.shape[0])
            worst = min(worst, (upper / max(floor, 1e-300), floor))
            if worst[0] <= band:
                break
        return worst[0] > band, {"sigma_n_upper_bound_over_noise_floor": worst[0],
                                 "noise_floor_estimate": worst[1]}
    return screen


def noise_floor(z: Tensor, s: Tensor, q: Tensor, sharpness: float, feature_error: float) -> float:
    """A bound on ``‖ϕ̃ − ϕ‖₂`` when every ``z̄_i`` carries a relative error ``e`` (the constant 1
    is exact): with ``‖δz_i‖ ≤ e‖z̄_i‖``, ``‖δs_i‖ ≤ (ς'/4)‖q‖₂‖δz_i‖`` (σ̃' ≤ ς'/4) and
    ``ϕ_i = s_i ⊗ z_i``, to first order ``‖δϕ_i‖ ≤ e‖z̄_i‖ ((ς'/4)‖q‖₂‖z_i‖ + ‖s_i‖)``, and
    ``‖δϕ‖₂ ≤ ‖δϕ‖_F``."""
    z_bar_norm = z[:, :-1].norm(dim=1)
    q_norm = float(torch.linalg.matrix_norm(q, ord=2))
    rows = feature_error * z_bar_norm * (abs(sharpness) / 4 * q_norm * z.norm(dim=1)
                                         + s.norm(dim=1))
    return float(rows.norm())


def combine_outputs(results: list[tuple[Any, Verdict]]) -> Verdict:
    """One verdict for all outputs: *not-verified* if any output is, else *inconclusive* if any
    is, else *verified*. The top-level figures are those of the deciding output (the first that
    fails, else the first inconclusive one, else the one with the smallest margin)."""
    order = {NOT_VERIFIED: 0, INCONCLUSIVE: 1, VERIFIED: 2}
    label, deciding = min(results, key=lambda lv: (order[lv[1].verdict],
                                                   lv[1].details.get("margin") or 0.0))
    per_output = [_summary(lab, v) for lab, v in results]
    details = {**deciding.details, "deciding_output": label, "per_output": per_output}
    return Verdict(condition=deciding.condition, verdict=deciding.verdict, rank=deciding.rank,
                   n=deciding.n, tolerance=deciding.tolerance, precision=deciding.precision,
                   smallest_kept=deciding.smallest_kept, largest_dropped=deciding.largest_dropped,
                   methods=dict(deciding.methods), agree=all(v.agree for _, v in results),
                   shape=list(deciding.shape), details=details)


def _summary(label: Any, verdict: Verdict) -> dict[str, Any]:
    """The per-output figures kept in ``details["per_output"]``."""
    return {"output": label, "verdict": verdict.verdict, "rank": verdict.rank,
            "tolerance": verdict.tolerance, "smallest_kept": verdict.smallest_kept,
            "largest_dropped": verdict.largest_dropped, "methods": verdict.methods,
            "agree": verdict.agree, "margin": verdict.details.get("margin"),
            "route": verdict.details.get("route"), "seconds": verdict.seconds["rank"]}
