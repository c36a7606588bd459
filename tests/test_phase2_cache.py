"""The cheap second phase: trunk features cached once at the switch give the losses of the path
that recomputes the (frozen) trunk in every step (``cache_features``; only the head trains in
phase 2, [KS21] §4, [K22] §3.2.1).

Both paths run the same frozen function — trunk in eval mode with the batch-norm statistics fixed
at the switch, under ``no_grad`` — so they may differ only by the rounding of a batch of 1024
(cache) against a training batch (uncached) through the trunk; we require 1e-5 on every logged
loss (measured: equal to the last bit here).
"""
from __future__ import annotations

import pytest
import torch

from global_convergence.training import TrainConfig, build_run, feature_cache, phase2, train

TOL = 1e-5
BUILD_FEATURE_CACHE = feature_cache.build_feature_cache
CASES = {
    "two-phase-mlp": dict(data="two-moons", model="mlp", method="two-phase", epochs=5, batch_size=20),
    "ee-mlp": dict(data="two-moons", model="mlp", method="ee", epochs=5, batch_size=20),
    # batch norm in the trunk (statistics fixed at the switch)
    "ee-resnet18": dict(data="random", n=24, model="resnet18", method="ee", epochs=3, batch_size=12,
                        lr=0.05),
    # a test set (digits): test errors from cached test features
    "two-phase-lenet": dict(data="digits", n=40, model="lenet", method="two-phase", epochs=4,
                            batch_size=20, lr=0.05),
}


pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def run(options: dict, cache: bool, monkeypatch) -> tuple[list[dict], list]:
    """Logged rows of a run logged every step, and what ``build_feature_cache`` returned."""
    built = []

    def spy(run):
        result = BUILD_FEATURE_CACHE(run)
        built.append(result)
        return result

    monkeypatch.setattr(phase2, "build_feature_cache", spy)
    rows = []

    def record(event):
        if event.phase == 2:     # nothing is computed or stored through the frozen trunk
            assert all(p.grad is None and not p.requires_grad for p in event.model.trunk.parameters())
        rows.append(dict(event.row))

    train(TrainConfig(**options, cache_features=cache, log_every=1), None, progress=False,
          callbacks=[record])
    return rows, built


@pytest.mark.parametrize("case", list(CASES))
def test_cached_and_uncached_second_phases_give_the_same_losses(case, monkeypatch):
    options = CASES[case]
    cached, built = run(options, True, monkeypatch)
    uncached, built_without = run(options, False, monkeypatch)
    assert len(built) == 1 and built[0] is not None and built_without == [None]
    assert [r["step"] for r in cached] == [r["step"] for r in uncached]
    assert sum(r["phase"] == 2 for r in cached) >= 2
    for a, b in zip(cached, uncached):
        assert a["phase"] == b["phase"]
        assert abs(a["loss"] - b["loss"]) <= TOL * max(1.0, abs(b["loss"])), (a, b)
        assert a["train_error"] == b["train_error"] and a["test_error"] == b["test_error"]


@pytest.mark.parametrize("case", ["ee-resnet18", "two-phase-lenet"])
def test_the_cache_holds_the_frozen_trunk_of_every_training_and_test_input(case, monkeypatch):
    """Cached features are the fixed function of each input (eval-mode trunk) on the whole split,
    whatever the chunking."""
    run_ = build_run(TrainConfig(**CASES[case]), eval_chunk=7)
    run_.model.freeze_trunk()
    cache = feature_cache.build_feature_cache(run_)
    assert cache.train.shape[0] == run_.dataset.n and not cache.train.requires_grad
    assert (cache.test is None) == (run_.x_test is None)
    with torch.no_grad():
        run_.model.eval()
        assert torch.allclose(cache.train, run_.model.trunk(run_.x), rtol=1e-5, atol=1e-6)
        if cache.test is not None:
            assert cache.test.shape[0] == len(run_.y_test)
            assert torch.allclose(cache.test, run_.model.trunk(run_.x_test), rtol=1e-5, atol=1e-6)


def test_augmented_runs_keep_the_trunk_forward_only(monkeypatch):
    """With augmentation every step sees new inputs, so nothing is cached."""
    run_ = build_run(TrainConfig(data="digits", n=20, model="lenet", method="ee", epochs=2,
                                      batch_size=10, augment=True))
    run_.model.freeze_trunk()
    assert feature_cache.build_feature_cache(run_) is None
