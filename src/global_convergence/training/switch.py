"""What happens at the switch and during tracking: the certificate and the alignment checks.

At the switch the run sets up phase 2 (:func:`.phase2.enter_phase2`), then certifies the state it
actually reached through the wrapper's own ``certify``: the condition of the guarantee checked on
the trained trunk, with the constants and the bound of [KS21] §5.3 (two-phase) or [K22] §3.3
(EE), on the cached float32 trunk features where there are some (``certificate_precision``);
with ``--exploit-lr auto`` that sets the second phase's step to ``1/L``. Alignment tracking
counts [K22]'s ``Q_T`` (§2.2): the checks at which data-architecture alignment (§2.1.2) fails.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NumericalError
from .distributed import on_rank_zero
from .feature_cache import cached_train_features
from .phase2 import enter_phase2
from .state import check_parameters, last_good

if TYPE_CHECKING:
    from .build import Run


def on_switch(run: "Run", out: Path | None) -> None:
    """Phase-2 set-up (feature cache), then the certificate on those features (which, with
    ``--exploit-lr auto``, also sets the second phase's step to its ``1/L``); the loop writes the
    switch's checkpoint after its log row."""
    check_parameters(run, 1, out)
    enter_phase2(run)
    started = time.perf_counter()
    if run.config.certificate != "off" and run.wrapper is not None:
        certificate, failure = on_rank_zero(run.ctx, lambda: make_certificate(run))
        if failure is not None:
            raise NumericalError(f"certificate at the switch, step {run.state.step} (phase 1): "
                                 f"{failure}; {last_good(run, out)}. Lower --lr or check the data.")
        if not run.ctx.is_main:           # rank 0's certificate, and its 1/L under auto
            run.wrapper.set_certificate(certificate)
        run.state.certificate = certificate
    run.state.seconds["switch"] += time.perf_counter() - started


def make_certificate(run: "Run") -> dict[str, Any]:
    """``wrapper.certify`` on the actual state at the switch: the condition with constants and
    bound (docs/verifiers.md), the optimizer facts read from the wrapper's own optimizer, on the
    phase-2 feature cache where there is one (``certificate_precision``), decided as far as
    ``certificate`` (``auto`` | ``full``) allows."""
    cached = cached_train_features(run)
    precision = run.config.certificate_precision if float32_attempt_pays(run, cached) else "float64"
    return run.wrapper.certify(run.x, run.loss, full_batch=run.schedule.batch >= run.schedule.n,
                               features=cached, precision=precision, mode=run.config.certificate)


def float32_attempt_pays(run: "Run", cached: torch.Tensor | None) -> bool:
    """Whether ``certificate_precision="auto"`` should first try the float32 features. Not
    without a cache (augmentation, ``--feature-cache off``): a float32 pass made only to try is
    wasted whenever float32 cannot decide (ResNet features). Not on CUDA: there the float64
    trunk pass is cheap and the attempt's own rank check is what costs (docs/performance.md)."""
    return cached is not None and run.ctx.device.type != "cuda"


def track_alignment(run: "Run", row: dict[str, Any]) -> None:
    """One check of data-architecture alignment ([K22] §2.1.2): ``Q_T`` counts the failed ones.
    The row also gets ``rank(J)``, ``rank([J, vec(Y')])`` and ``alignment_margin``, the relative
    distance ``|σ/tol − 1|`` of the singular value of ``J`` nearest the tolerance (how close the
    verdict was to flipping, docs/verifiers.md)."""
    from .. import conditions

    verdict = conditions.alignment(run.model, run.x, run.y, loss=run.loss)
    ok = verdict.verdict == "verified"
    run.state.alignment_checks += 1
    run.state.q_t += 0 if ok else 1
    row["alignment_ok"] = int(ok)
    row["alignment_rank"] = verdict.rank
    row["alignment_rank_augmented"] = verdict.details.get("rank_augmented")
    nearest = [abs(v / verdict.tolerance - 1.0) for v in (verdict.smallest_kept,
               verdict.largest_dropped) if v is not None and verdict.tolerance]
    row["alignment_margin"] = min(nearest) if nearest else None
