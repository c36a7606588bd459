"""What happens at the switch and during tracking: the certificate and the alignment checks.

At the switch the run sets up phase 2 (:func:`.phase2.enter_phase2`), then certifies the state it
actually reached: the condition of the guarantee checked on the trained trunk, with the
constants and the bound of [KS21] §5.3 (two-phase) or [K22] §3.3 (EE), on the cached
float32 trunk features where there are some (``certificate_precision``). ``--exploit-lr`` then
sets the step of the second phase. Alignment tracking counts [K22]'s ``Q_T``: the checks at
which data-architecture alignment (§2.1.2) fails.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import NumericalError
from ..models import TwoPhaseModel, non_analytic_modules
from ..wrappers.ee import LBFGS_OPTIONS
from .config import TrainConfig
from .distributed import on_rank_zero
from .feature_cache import cached_train_features
from .phase2 import enter_phase2
from .state import check_parameters, last_good

if TYPE_CHECKING:
    from .build import Run


def on_switch(run: "Run", out: Path | None) -> None:
    """Phase-2 set-up (feature cache), then the certificate on those features and the
    exploitation step; the loop writes the switch's checkpoint after its log row."""
    check_parameters(run, 1, out)
    enter_phase2(run)
    started = time.perf_counter()
    if run.config.certificate != "off":
        certificate, failure = on_rank_zero(run.ctx, lambda: make_certificate(run))
        if failure is not None:
            raise NumericalError(f"certificate at the switch, step {run.state.step} (phase 1): "
                                 f"{failure}; {last_good(run, out)}. Lower --lr or check the data.")
        run.state.certificate = certificate
    set_exploit_step(run)
    run.state.seconds["switch"] += time.perf_counter() - started


def make_certificate(run: "Run") -> dict[str, Any]:
    """The condition checked on the actual state at the switch, with constants and bound, from
    the phase-2 feature cache where there is one (``certificate_precision``); see
    docs/verifiers.md."""
    from .. import conditions

    c = run.config
    cached = cached_train_features(run)
    precision = c.certificate_precision if float32_attempt_pays(run, cached) else "float64"
    facts = dict(full_batch=run.schedule.batch >= run.schedule.n,
                 momentum=c.momentum if c.optimizer == "sgd" else 0.0,
                 weight_decay=c.weight_decay,
                 optimizer_name=c.optimizer if c.method != "ee" or c.exploit_optimizer == "same"
                 else c.exploit_optimizer,
                 lr_used=exploit_step(c),
                 analytic=not non_analytic_modules(run.model),
                 features=cached, precision=precision)
    if isinstance(run.model, TwoPhaseModel):
        return conditions.two_phase_certificate(run.model, run.x, run.loss, **facts)
    return conditions.ee_certificate(run.model, run.x, run.loss, **facts)


def float32_attempt_pays(run: "Run", cached: torch.Tensor | None) -> bool:
    """Whether ``certificate_precision="auto"`` should first try the float32 features. Not
    without a cache (augmentation, ``--feature-cache off``): a float32 pass made only to try is
    wasted whenever float32 cannot decide (ResNet features). Not on CUDA: there the float64
    trunk pass is cheap and the attempt's own rank check is what costs (docs/performance.md)."""
    return cached is not None and run.ctx.device.type != "cuda"


def exploit_step(config: TrainConfig) -> float | None:
    """The step of the second phase as the certificate states it: None for ``1/L`` itself,
    L-BFGS's initial step (its line search scales it), or the learning rate used."""
    if config.exploit_lr == "auto":
        return None
    if config.method == "ee" and config.exploit_optimizer == "lbfgs":
        return LBFGS_OPTIONS["lr"]
    return config.exploit_lr or config.lr


def set_exploit_step(run: "Run") -> None:
    """``exploit_lr``: the step of the second phase's optimizer — the certificate's ``step_used``
    (``1/L`` for ``auto``) or the number given."""
    if run.config.exploit_lr is None or run.wrapper is None:
        return
    certificate = run.state.certificate
    step = float(certificate["step_used"]) if certificate else float(run.config.exploit_lr)
    if not math.isfinite(step):
        raise NumericalError("--exploit-lr auto: the certificate's smoothness constant is 0 (the "
                             "output weights are all zero), so 1/L is infinite; give a number")
    for group in run.wrapper.active_optimizer.param_groups:
        group["lr"] = step


def track_alignment(run: "Run", row: dict[str, Any]) -> None:
    """One check of data-architecture alignment ([K22] §2.1.2): ``Q_T`` counts the failed ones."""
    from .. import conditions

    verdict = conditions.alignment(run.model, run.x, run.y, loss=run.loss)
    ok = verdict.verdict == "verified"
    run.state.alignment_checks += 1
    run.state.q_t += 0 if ok else 1
    row["alignment_ok"] = int(ok)
