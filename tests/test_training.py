"""The training loop behind ``gconv train``: checkpoints, resume, RNG state, non-finite losses.

Runs are tiny (sine wave, n = 20, the 300-wide ``mlp``, a few steps) and in-process; the
interruptions here are exceptions raised from a callback (the SIGKILL tests are in
``test_reliability.py``). The PNG plots are not the subject here and cost more than a tiny run
(matplotlib), so they are skipped; ``test_cli.py`` checks them.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from global_convergence.errors import NumericalError, UserInputError
from global_convergence.training import loop, switch
from global_convergence.training import (CHECKPOINT_NAME, TrainConfig, build_run, load_checkpoint,
                                         train)

FIGURES = ("train_loss", "train_error", "test_error", "q_t", "alignment_checks", "steps",
           "switch_step", "completed")


pytestmark = pytest.mark.usefixtures("quiet_one_thread")      # no plots, one thread (conftest.py)


def tiny(**overrides) -> TrainConfig:
    options = dict(data="sine", model="mlp", method="ee", n=20, steps=12, tau=6, batch_size=8,
                   eps=0.01, track_alignment_every=3)
    options.update(overrides)
    if options["method"] == "base":
        options["tau"] = None
    return TrainConfig(**options)


class Interrupted(Exception):
    """Stands for a crash: raised from a callback, it leaves the folder as a crash would."""


def interrupt_at(step: int):
    def callback(event):
        if event.step == step:
            raise Interrupted(step)
    return callback


def figures(summary: dict) -> dict:
    return {k: summary[k] for k in FIGURES}


def without_timings(value):
    """``value`` without its ``seconds`` entries (wall-clock times differ from run to run)."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def final_state(out: Path) -> dict:
    return load_checkpoint(out / CHECKPOINT_NAME)["model"]


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Same summary figures, same metrics.csv, bit-identical final parameters."""
    a = json.loads((reference / "summary.json").read_text())
    b = json.loads((resumed / "summary.json").read_text())
    assert figures(a) == figures(b)
    assert without_timings(a["certificate"]) == without_timings(b["certificate"])
    assert (reference / "metrics.csv").read_text() == (resumed / "metrics.csv").read_text()
    sa, sb = final_state(reference), final_state(resumed)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per configuration, shared by the tests below."""
    cache: dict[str, Path] = {}

    def get(name: str, config: TrainConfig) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"reference-{name}")
            train(config, out, progress=False)
            cache[name] = out
        return cache[name]
    return get


CONFIGS = {
    # EE with SGD + momentum + minibatches, G̃ = G: optimizer state, data order, gates, alignment
    "ee": tiny(),
    # EE with L-BFGS exploitation (its history in the checkpoint), Adam in exploration
    "ee-lbfgs": tiny(exploit_optimizer="lbfgs", optimizer="adam", lr=0.01, batch_size=0,
                     track_alignment_every=None),
    # two-phase on two moons with momentum and weight decay
    "two-phase": tiny(data="two-moons", method="two-phase", tau=None, tau0=0.5,
                      track_alignment_every=None),
    # full-batch GD exploiting with the certificate's step 1/L̂
    "ee-step": tiny(batch_size=0, momentum=0.0, weight_decay=0.0, lr=0.5, exploit_lr="auto",
                    track_alignment_every=None),
}


@pytest.mark.parametrize("name, stop", [("ee", 3), ("ee", 6), ("ee", 10), ("ee-lbfgs", 4),
                                        ("ee-lbfgs", 9), ("two-phase", 5), ("two-phase", 8),
                                        ("ee-step", 6), ("ee-step", 9)])
def test_resume_before_and_after_the_switch_gives_the_uninterrupted_result(reference, tmp_path,
                                                                           name, stop):
    """``stop_after`` ends the run as an interruption would: before τ = 6, at τ, after τ."""
    config = CONFIGS[name]
    partial = train(config, tmp_path, progress=False, stop_after=stop)
    assert partial["steps"] == stop and partial["completed"] is False
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == stop
    resumed = train(config, tmp_path, progress=False, resume=True)
    assert resumed["completed"] is True and resumed["steps"] == config.steps
    assert_same_run(reference(name, config), tmp_path)


@pytest.mark.parametrize("crash_at, checkpoint_every, expected_resume_step",
                         [(7, None, 6), (9, 4, 8), (5, 2, 4)])
def test_crash_resumes_from_the_last_checkpoint_including_the_switch_one(
        reference, tmp_path, crash_at, checkpoint_every, expected_resume_step):
    """A crash one step after the switch resumes from the switch's checkpoint, which must hold
    the switch step's metrics row and alignment check (q_t)."""
    config = tiny(checkpoint_every=checkpoint_every)
    with pytest.raises(Interrupted):
        train(config, tmp_path, progress=False, callbacks=[interrupt_at(crash_at)])
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == expected_resume_step
    assert state["rows"][-1]["step"] == expected_resume_step
    assert not (tmp_path / "summary.json").exists()
    train(config, tmp_path, progress=False, resume=True)
    assert_same_run(reference("ee", CONFIGS["ee"]), tmp_path)


@pytest.mark.parametrize("method", ["ee", "two-phase"])
def test_exploit_lr_auto_takes_the_certificates_step_and_earns_the_bound(method):
    config = tiny(method=method, batch_size=0, momentum=0.0, weight_decay=0.0, lr=0.5,
                  exploit_lr="auto", track_alignment_every=None, data="two-moons")
    run = build_run(config)
    loop.attach_train_module(run)
    for _ in range(config.tau):
        loop.train_step(run)
        run.step += 1
    switch.on_switch(run, None)
    certificate = run.certificate
    assert certificate["step_used"] == certificate["step_max"] != config.lr
    assert [g["lr"] for g in run.wrapper.active_optimizer.param_groups] == \
        [certificate["step_max"]]
    assert "step_at_most_1_over_L" not in certificate["bound_withheld_because"]
    fixed = build_run(tiny(method=method, exploit_lr=0.125, data="two-moons", certificate="off"))
    loop.attach_train_module(fixed)
    for _ in range(config.tau):
        assert fixed.wrapper.active_optimizer.param_groups[0]["lr"] == fixed.config.lr
        loop.train_step(fixed)
        fixed.step += 1
    switch.on_switch(fixed, None)
    assert fixed.certificate is None and fixed.wrapper.certificate is None
    assert [g["lr"] for g in fixed.wrapper.active_optimizer.param_groups] == [0.125]


def test_the_certificate_tries_float32_only_on_cached_features():
    cached = train(tiny(method="two-phase", tau=None, tau0=0.5, track_alignment_every=None), None,
                   progress=False)["certificate"]["condition"]
    uncached = train(tiny(method="two-phase", tau=None, tau0=0.5, track_alignment_every=None,
                          cache_features=False), None, progress=False)["certificate"]["condition"]
    assert cached["feature_precision"] == "float32" or "float32_attempt" in cached
    assert uncached["feature_precision"] == "float64" and "float32_attempt" not in uncached


def test_auto_precision_tries_float32_on_the_cpu_only():
    """On CUDA the float32 attempt cost more than it saved (H200): ``auto`` goes to float64."""
    from types import SimpleNamespace

    from global_convergence.training.distributed import DistContext
    features = torch.zeros(3, 2)
    on = {kind: SimpleNamespace(ctx=DistContext(0, 1, torch.device(kind))) for kind in ("cpu", "cuda")}
    assert switch.float32_attempt_pays(on["cpu"], features)
    assert not switch.float32_attempt_pays(on["cpu"], None)
    assert not switch.float32_attempt_pays(on["cuda"], features)       # the device is not touched


@pytest.mark.parametrize("overrides, message", [
    (dict(exploit_lr=-1.0), "--exploit-lr must be a positive number or 'auto'"),
    (dict(exploit_lr="fast"), "--exploit-lr must be a positive number or 'auto'"),
    (dict(exploit_lr="auto", method="base"), "--method base has none"),
    (dict(exploit_lr=0.1, exploit_optimizer="lbfgs"), "line search sets the step"),
    (dict(certificate_precision="half"), "unknown --certificate-precision 'half'"),
])
def test_exploitation_options_are_checked(overrides, message):
    with pytest.raises(UserInputError, match=message):
        tiny(**overrides).validate()


def test_checkpoint_holds_every_part_of_the_state(tmp_path):
    train(tiny(), tmp_path, progress=False, stop_after=8)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["step"] == 8
    wrapper = state["wrapper"]
    assert wrapper["phase"] == 2 and wrapper["step_count"] == 8 and wrapper["gates_tied"] is False
    assert "exploit_optimizer" in wrapper and wrapper["optimizer"]["state"]    # momentum buffers
    assert torch.equal(wrapper["gates"], state["model"]["head.gates"])
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert [row["step"] for row in state["rows"]] == list(range(9))
    assert state["certificate"]["method"] == "ee" and state["q_t"] == sum(
        1 - r["alignment_ok"] for r in state["rows"] if r["alignment_ok"] is not None)


def _rng_draws(event):
    """A callback that consumes every global generator: resume must restore all of them."""
    event.row["rng_torch"] = float(torch.rand(()))
    event.row["rng_numpy"] = float(np.random.rand())
    event.row["rng_python"] = random.random()


def test_resume_restores_torch_numpy_and_python_random_states(tmp_path):
    config = tiny(method="base", steps=8, track_alignment_every=None, checkpoint_every=5)
    train(config, tmp_path / "a", progress=False, callbacks=[_rng_draws])
    with pytest.raises(Interrupted):
        train(config, tmp_path / "b", progress=False, callbacks=[_rng_draws, interrupt_at(6)])
    random.seed(12345), np.random.seed(12345), torch.manual_seed(12345)    # as in a new process
    train(config, tmp_path / "b", progress=False, callbacks=[_rng_draws], resume=True)
    rows_a = list(csv.DictReader((tmp_path / "a" / "metrics.csv").open()))
    rows_b = list(csv.DictReader((tmp_path / "b" / "metrics.csv").open()))
    assert len(rows_a) == 9 and rows_a == rows_b


def test_resume_refuses_a_checkpoint_of_other_options(tmp_path):
    train(tiny(method="base", steps=4), tmp_path, progress=False)
    with pytest.raises(UserInputError) as err:
        train(tiny(method="base", steps=4, lr=0.05), tmp_path, progress=False, resume=True)
    assert str(err.value) == "--resume with options that differ from the checkpoint's (lr: 0.1 -> 0.05)"
    # options that cannot change the numbers may differ
    summary = train(tiny(method="base", steps=4, checkpoint_every=2, log_every=2), tmp_path,
                    progress=False, resume=True)
    assert summary["steps"] == 4


def test_a_fresh_run_replaces_the_outputs_of_an_earlier_one(tmp_path):
    train(tiny(method="base", steps=4), tmp_path, progress=False)
    (tmp_path / "q_t.png").write_bytes(b"old")
    with pytest.raises(Interrupted):
        train(tiny(method="base", steps=6, checkpoint_every=2), tmp_path, progress=False,
              callbacks=[interrupt_at(3)])
    # no summary of the old run beside the new run's checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 2


# -- non-finite losses and parameters -------------------------------------------------------------
def test_nan_loss_in_phase_2_stops_with_step_and_phase_and_keeps_the_last_good_checkpoint(tmp_path):
    """GD on the squared loss far above the stable step diverges in exploitation."""
    config = tiny(method="ee", tau=2, steps=12, lr=1.0, momentum=0.0, weight_decay=0.0,
                  batch_size=0, checkpoint_every=1, track_alignment_every=None, loss="mse")
    with pytest.raises(NumericalError) as err:
        train(config, tmp_path, progress=False)
    message = str(err.value)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    step = state["step"] + 1
    assert message in (
        f"training loss became inf at step {step} (phase 2); the last good checkpoint (step "
        f"{step - 1}) is kept in {tmp_path / CHECKPOINT_NAME}. Lower --lr or check the data.",
        f"training loss became nan at step {step} (phase 2); the last good checkpoint (step "
        f"{step - 1}) is kept in {tmp_path / CHECKPOINT_NAME}. Lower --lr or check the data.",
        f"parameters became non-finite at step {step} (phase 2): head.weight; the last good "
        f"checkpoint (step {step - 1}) is kept in {tmp_path / CHECKPOINT_NAME}. Lower --lr or "
        "check the data.")
    assert state["wrapper"]["phase"] == 2 and state["step"] > 2
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_non_finite_parameters_after_a_finite_loss_are_never_checkpointed(tmp_path):
    """The loss of step t is computed before its update: an update to inf must be caught."""
    run_dir = tmp_path / "run"
    config = tiny(method="base", steps=6, checkpoint_every=1, track_alignment_every=None)

    def poison(event):
        if event.step == 3:
            with torch.no_grad():
                next(event.model.parameters())[0, 0] = float("inf")
    with pytest.raises(NumericalError) as err:
        train(config, run_dir, progress=False, callbacks=[poison])
    assert str(err.value) == (
        f"parameters became non-finite at step 3 (phase 1): 1.weight; the last good checkpoint "
        f"(step 2) is kept in {run_dir / CHECKPOINT_NAME}. Lower --lr or check the data.")
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 2


def test_nan_before_any_checkpoint_leaves_no_folder(tmp_path):
    x = np.full((8, 2), 1e30, dtype=np.float32)     # finite data whose loss overflows
    x[::2] *= -1
    y = np.arange(8, dtype=np.float32)[:, None] * 1e30
    np.savez(tmp_path / "huge.npz", x=x, y=y)
    out = tmp_path / "out"
    with pytest.raises(NumericalError) as err:
        train(TrainConfig(data=str(tmp_path / "huge.npz"), loss="mse", model="mlp", steps=3,
                          batch_size=0), out, progress=False)
    assert str(err.value).startswith("training loss became ")
    assert str(err.value).endswith(" at step 1 (phase 1); no checkpoint was written. Lower --lr "
                                   "or check the data.")
    assert not out.exists()


def test_build_run_validates_before_anything_is_written(tmp_path):
    with pytest.raises(UserInputError, match=r"--tau 12 is outside the run"):
        train(tiny(tau=12), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    run = build_run(tiny())
    assert run.schedule.tau == 6 and run.phase == 1


def test_compile_trains_both_phases_compiled_with_the_eager_losses():
    """``compile=True`` compiles the model in phase 1 and the head on cached features in phase 2
    (inductor, on the CPU here): the same losses as the eager run, to float32 rounding."""
    options = dict(method="two-phase", steps=8, tau=4, track_alignment_every=None)
    eager = train(tiny(**options), None, progress=False)
    run = build_run(tiny(**options, compile=True))
    loop.attach_train_module(run)
    assert run.train_module._orig_mod is run.model             # an OptimizedModule in phase 1
    for _ in range(4):
        loop.train_step(run)
        run.step += 1
    switch.on_switch(run, None)
    assert run.phase == 2 and run.train_module._orig_mod is run.model.head   # and in phase 2
    compiled = train(tiny(**options, compile=True), None, progress=False)
    assert compiled["switch_step"] == eager["switch_step"] == 4
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-6)
    assert compiled["train_error"] == eager["train_error"]


def test_numpy_values_a_callback_logs_are_checkpointed_as_plain_numbers(tmp_path):
    """Checkpoints load with ``weights_only=True``; a callback's numpy or tensor scalars in the
    row are stored as Python numbers, so the run still resumes."""
    def add_columns(event):
        event.row["numpy_value"] = np.float64(event.step) / 2
        event.row["tensor_value"] = torch.tensor(event.step)
    config = tiny(method="base", steps=6, checkpoint_every=2, track_alignment_every=None)
    train(config, tmp_path, progress=False, callbacks=[add_columns], stop_after=4)
    rows = load_checkpoint(tmp_path / CHECKPOINT_NAME)["rows"]
    assert [type(r["numpy_value"]) for r in rows] == [float] * len(rows)
    assert [r["tensor_value"] for r in rows] == [r["step"] for r in rows]
    assert train(config, tmp_path, progress=False, resume=True,
                 callbacks=[add_columns])["completed"] is True


def test_certificate_off_skips_it_and_a_resumed_run_may_not_change_it(tmp_path):
    """``certificate="off"``: no certificate at the switch (``null`` in summary.json), the same
    training otherwise; the mode is part of the run's configuration."""
    options = dict(method="two-phase", data="two-moons", track_alignment_every=None)
    made = train(tiny(**options), None, progress=False)
    off = train(tiny(**options, certificate="off"), tmp_path, progress=False, stop_after=8)
    assert made["config"]["certificate"] == "auto" and made["certificate"]["condition"]["verdict"]
    assert off["config"]["certificate"] == "off" and off["certificate"] is None
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["certificate"] is None and state["wrapper"]["certificate"] is None
    with pytest.raises(UserInputError, match=r"differ from the checkpoint's \(certificate: 'off' -> 'auto'\)"):
        train(tiny(**options), tmp_path, progress=False, resume=True)
    resumed = train(tiny(**options, certificate="off"), tmp_path, progress=False, resume=True)
    assert resumed["certificate"] is None and resumed["train_loss"] == made["train_loss"]
    with pytest.raises(UserInputError, match="--certificate off makes none"):
        tiny(**options, certificate="off", exploit_lr="auto").validate()
    with pytest.raises(UserInputError, match="unknown --certificate 'some'"):
        tiny(certificate="some").validate()
