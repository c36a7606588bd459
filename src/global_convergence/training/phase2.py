"""The second phase of a run: its set-up at the switch, one step, and its evaluation.

After the switch only the head trains, on the frozen trunk ([KS21] §4, [K22] §3.2.1): without
augmentation on the trunk features cached at the switch (:mod:`.feature_cache`), otherwise
through the frozen trunk run forward-only. :func:`phase2_step` and :func:`phase2_evaluate` are
the one place the loop takes a phase-2 step and evaluates in phase 2: an engine that trains the
head another way (e.g. in kernel space on the cached features) is set up in :func:`enter_phase2`,
steps in :func:`phase2_step` (or, for a block of steps the loop needs nothing in between, in
:func:`phase2_block`), and writes its weights back into the model in :func:`sync_model`,
which runs before anything reads the model (evaluation and callbacks in :func:`phase2_evaluate`,
checkpoints in :func:`.state.write_checkpoint`).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .evaluation import evaluate
from .feature_cache import build_feature_cache
from .kernel_steps import kernel_steps_for
from .steps import attach_train_module, batch_indices, closure_step

if TYPE_CHECKING:
    from .build import Run


def enter_phase2(run: "Run") -> None:
    """Set up phase 2 (at the switch, or on resuming a phase-2 checkpoint): build the feature
    cache, attach the module the phase-2 step trains, and the exact coefficient-space SGD
    engine (:mod:`.kernel_steps`) where it applies."""
    started = time.perf_counter()
    run.cache = build_feature_cache(run)
    attach_train_module(run)
    run.kernel = kernel_steps_for(run)
    run.state.seconds["switch"] += time.perf_counter() - started


def phase2_step(run: "Run") -> float:
    """One step of the exploitation optimizer on the head; returns the global-batch mean loss
    (before the step). The kernel engine takes the same SGD step as the optimizer would, so the
    wrapper only counts it."""
    if run.kernel is None:
        return closure_step(run)
    loss = run.kernel.step(batch_indices(run, run.state.step).to(run.y.device))
    run.wrapper.step_count += 1
    return loss


def phase2_block(run: "Run", count: int) -> list[float]:
    """``count`` steps of the coefficient-space engine in one call (``run.kernel`` set), from
    ``run.step`` on: the batches of those steps, their losses (before each step) as numbers. The
    caller advances ``run.step``; the model is synced only by :func:`sync_model`."""
    start, s = run.state.step, run.schedule
    indices = None if s.batch >= s.n else \
        [batch_indices(run, step).to(run.y.device) for step in range(start, start + count)]
    losses = run.kernel.steps(count, indices)
    run.wrapper.step_count += count
    return losses.tolist()


def sync_model(run: "Run") -> None:
    """Bring the model's parameters (and optimizer state) up to date with what phase 2 trained,
    before they are read: the kernel engine writes its weights and momentum back; the closure
    step trains the model itself."""
    if run.kernel is not None:
        run.kernel.write_back()


def phase2_evaluate(run: "Run") -> dict[str, Any]:
    """``loss``, ``train_error`` and ``test_error`` in phase 2 (the head on cached features where
    there are some, see :func:`.evaluation.eval_source`); the model is synced first, so the
    callbacks and alignment checks that follow see it too."""
    sync_model(run)
    return evaluate(run)
