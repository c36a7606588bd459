"""Faults: ``gconv train`` killed with SIGKILL at random points and resumed; a crash in the middle
of a checkpoint write; bad input to the public Python functions; ill-conditioned rank checks."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from global_convergence import (EEWrapper, TwoPhase, UserInputError, ee_model, two_phase_model)
from global_convergence.conditions import expressivity
from global_convergence.data.validation import validate_arrays
from global_convergence.models import MLP
from global_convergence.training import (CHECKPOINT_NAME, TrainConfig, load_checkpoint,
                                         save_checkpoint, train)
from global_convergence.training import loop
from global_convergence.training.checkpoint import atomic_write, restore_rng

FIGURES = ("train_loss", "train_error", "test_error", "q_t", "alignment_checks", "steps",
           "switch_step", "completed")
"""The summary.json figures a resumed run must reproduce exactly."""


def child_env() -> dict[str, str]:
    """One thread in every ``gconv`` child: the killed, resumed and reference runs then do the
    same floating-point operations in the same order on any machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture()
def no_plots(monkeypatch):
    """Skip the PNGs of in-process runs (matplotlib costs more than these tiny runs); the
    ``gconv`` children still write theirs."""
    monkeypatch.setattr(loop, "plot_run", lambda *args, **kwargs: [])


def figures(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {k: summary[k] for k in FIGURES}


def checkpoint_step(out: Path) -> int | None:
    """Step of ``out/checkpoint.pt`` now (it is replaced atomically, so always whole)."""
    try:
        return torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=False)["step"]
    except FileNotFoundError:
        return None


# -- SIGKILL at random points ---------------------------------------------------------------------
STEPS, TAU = 24, 12
KILL_RUN = ["train", "--data", "sine", "--n", "20", "--model", "mlp", "--method", "ee",
            "--steps", str(STEPS), "--tau", str(TAU), "--eps", "0.01", "--batch-size", "8",
            "--momentum", "0.9", "--checkpoint-every", "1", "--track-alignment-every", "4",
            "--quiet"]
"""EE with minibatches (data order), momentum (optimizer state), the switch's perturbation and
gates, alignment checks (q_t): everything a resume must restore. A checkpoint every step makes
the run slow enough to be killed anywhere."""
KILL_CONFIG = TrainConfig(data="sine", n=20, model="mlp", method="ee", steps=STEPS, tau=TAU,
                          eps=0.01, batch_size=8, momentum=0.9, checkpoint_every=1,
                          track_alignment_every=4)
"""The same run through the Python API: the uninterrupted reference, run in this process with one
thread as the children are (a process start costs more than this whole run)."""


def gconv_process(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "global_convergence", *KILL_RUN, "--out",
                             str(out), *extra], env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, out: Path, target: int, delay: float) -> int | None:
    """SIGKILL ``process`` ``delay`` seconds after its checkpoint reached step ``target`` (so the
    kill lands anywhere in a step: computing, evaluating, or writing the next checkpoint).
    Returns the step of the checkpoint it leaves, or None if the run finished first."""
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        step = checkpoint_step(out)
        if step is not None and step >= target:
            time.sleep(delay)
            break
        time.sleep(0.01)
    if process.poll() is not None:          # finished (or failed) before the kill
        assert process.returncode == 0, process.stderr.read()
        return None
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return checkpoint_step(out)


def kill_and_resume(tmp_path: Path, targets: list[int], seed: int) -> list[int]:
    """Kill a run at each target step (resuming after every kill), finish it, and compare its
    summary with an uninterrupted run's. Returns the steps resumed from."""
    rng = random.Random(seed)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(KILL_CONFIG, reference_dir, progress=False)
    finally:
        torch.set_num_threads(previous)
    resumed_from = []
    for i, target in enumerate(targets):
        process = gconv_process(killed_dir, *(["--resume"] if i else []))
        step = kill_when(process, killed_dir, target, delay=rng.uniform(0.0, 0.05))
        if step is None:
            break
        resumed_from.append(step)
        assert not (killed_dir / "summary.json").exists()
    final = gconv_process(killed_dir, "--resume")
    assert final.wait(timeout=600) == 0, final.stderr.read()
    assert figures(killed_dir) == figures(reference_dir)
    assert (killed_dir / "metrics.csv").read_text() == (reference_dir / "metrics.csv").read_text()
    a = load_checkpoint(killed_dir / CHECKPOINT_NAME)["model"]
    b = load_checkpoint(reference_dir / CHECKPOINT_NAME)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(killed_dir.glob(".*.tmp"))
    return resumed_from


def test_sigkill_at_a_random_point_then_resume_gives_the_uninterrupted_summary(tmp_path, no_plots):
    """One kill after the switch (the richer state to restore); real SIGKILLs before the switch
    are in the mid-write test below, and the slow test kills six times on both sides."""
    target = random.Random(20240611).randrange(TAU + 1, STEPS - 3)
    resumed_from = kill_and_resume(tmp_path, [target], seed=1)
    assert len(resumed_from) == 1 and TAU <= resumed_from[0] < STEPS, resumed_from


@pytest.mark.slow
def test_sigkill_at_six_random_points_then_resume_gives_the_uninterrupted_summary(tmp_path,
                                                                                 no_plots):
    rng = random.Random(7)
    targets = sorted(rng.sample(range(1, TAU - 1), 3)) + sorted(rng.sample(range(TAU, STEPS - 3), 3))
    resumed_from = kill_and_resume(tmp_path, targets, seed=2)
    assert len(resumed_from) >= 5, resumed_from
    assert sum(s < TAU for s in resumed_from) >= 2 and sum(s >= TAU for s in resumed_from) >= 2


# -- a crash in the middle of a checkpoint write ----------------------------------------------------
CRASHING_WRITER = textwrap.dedent("""
    import os, signal, sys, torch
    from pathlib import Path
    from global_convergence.training import TrainConfig, train
    from global_convergence.training.checkpoint import atomic_write
    from global_convergence.training import loop
    loop.plot_run = lambda *args, **kwargs: []
    out = Path(sys.argv[1])
    config = TrainConfig(**{CONFIG})
    train(config, out, progress=False, stop_after={STOP})     # the previous, good checkpoint
    good = (out / "checkpoint.pt").read_bytes()

    def half_then_die(handle):      # a newer checkpoint, killed half-way through its write
        handle.write(good[: len(good) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    atomic_write(out / "checkpoint.pt", half_then_die)
""")


@pytest.mark.parametrize("stop", [4, pytest.param(9, marks=pytest.mark.slow)])   # τ = 6
def test_a_crash_mid_write_leaves_the_previous_checkpoint_and_the_run_resumes_from_it(
        tmp_path, no_plots, stop):
    options = dict(data="sine", model="mlp", method="ee", n=20, steps=12, tau=6, batch_size=8,
                   eps=0.01, checkpoint_every=2)
    out = tmp_path / "run"
    script = CRASHING_WRITER.replace("{CONFIG}", repr(options)).replace("{STOP}", str(stop))
    done = subprocess.run([sys.executable, "-c", script, str(out)], env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr
    partial = list(out.glob(f".{CHECKPOINT_NAME}.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0     # the torn write is there
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == stop   # ... beside the intact one

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train(TrainConfig(**options), out, progress=False, resume=True)
        reference = train(TrainConfig(**options), tmp_path / "reference", progress=False)
    finally:
        torch.set_num_threads(previous)
    assert {k: resumed[k] for k in FIGURES} == {k: reference[k] for k in FIGURES}
    assert not list(out.glob(".*.tmp"))      # the resumed run cleared the torn write


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"step": 3, "weights": torch.arange(5.0)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"step": 4, "weights": torch.zeros(5), "bad": Unpicklable()})
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["weights"], torch.arange(5.0))
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", lambda handle: handle.write(b"x"))
    finally:
        os.umask(umask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_a_truncated_checkpoint_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"step": 1, "weights": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserInputError, match=rf"^checkpoint {path} is unreadable \("):
        load_checkpoint(path)


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it would call ``os.system`` (weights_only must refuse it)."""

    def __reduce__(self):
        return (os.system, ("echo pickled code ran >&2",))


def test_a_checkpoint_holding_pickled_objects_is_refused_not_executed(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    torch.save({"step": 1, "payload": _RunsCodeWhenUnpickled()}, path)
    with pytest.raises(UserInputError, match=rf"^checkpoint {path} is unreadable \(it holds "
                                             r"pickled Python objects \(posix.system\)"):
        load_checkpoint(path)


def test_the_checkpointed_rng_states_restore_every_generator(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    np.random.seed(5)
    np.random.standard_normal()              # leaves a cached Gaussian in numpy's state
    save_checkpoint(path, {"step": 1})
    expected = (torch.rand(3), np.random.standard_normal(4), random.random())
    np.random.seed(0), torch.manual_seed(0), random.seed(0)
    restore_rng(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.standard_normal(4), expected[1])
    assert random.random() == expected[2]


# -- bad input to the public Python functions -----------------------------------------------------
def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("call, message", [
    (lambda: ee_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus()), n=4),
     "ee_model could not find the output nn.Linear layer: the last layer with parameters of "
     "Sequential is '0' (Conv2d)"),
    (lambda: two_phase_model(nn.Sequential(nn.Softplus(), nn.Flatten()), n=4),
     "two_phase_model could not find the output layer: Sequential has no module with parameters"),
    (lambda: ee_model(MLP(2, 1), n=0), "n must be a positive integer, got 0"),
    (lambda: ee_model(MLP(2, 1), n=4, head_width=0), "head_width must be a positive integer, got 0"),
    (lambda: two_phase_model(MLP(2, 1), n=4, c=0), "two_phase_model: width factor c must be > 0, got 0"),
    (lambda: EEWrapper(m := ee_model(MLP(2, 1), n=4), _optimizer(m), tau=5, eps=1e-3, total_steps=5),
     "tau=5 is beyond the run: it must satisfy 0 < tau < T=5"),
    (lambda: EEWrapper(m := ee_model(MLP(2, 1), n=4), _optimizer(m), tau=2, eps=0.0),
     "eps must be a positive finite number, got 0.0"),
    (lambda: EEWrapper(m := ee_model(MLP(2, 1), n=4), _optimizer(m), tau=2, eps=float("inf")),
     "eps must be a positive finite number, got inf"),
    (lambda: TwoPhase(m := two_phase_model(MLP(2, 1), n=4), _optimizer(m), tau=2, delta0=-1e-3),
     "delta0 must be a positive finite number, got -0.001"),
    (lambda: TwoPhase(m := two_phase_model(MLP(2, 1), n=4), _optimizer(m), tau=2.5, delta0=1e-3),
     "tau must be a positive integer number of steps, got 2.5"),
    (lambda: TwoPhase(m := two_phase_model(MLP(2, 1), n=4), "sgd", tau=2, delta0=1e-3),
     "optimizer must be a torch.optim.Optimizer, got str"),
    (lambda: EEWrapper(m := MLP(2, 1), _optimizer(m), tau=2, eps=1e-3),
     r"EEWrapper needs a model built by ee_model(base, n), got MLP"),
    (lambda: EEWrapper(m := ee_model(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8),
                                                   nn.ReLU(), nn.Linear(8, 1)), n=4),
                       _optimizer(m), tau=2, eps=1e-3),
     "EEWrapper: the guarantee needs a real-analytic model, but these modules are not: trunk.1 "
     "(convert with make_analytic, or pass allow_non_analytic=True to run without it)"),
    (lambda: validate_arrays(np.ones((3, 2)), np.array([0, 1, 2]), loss="ce", name="mine",
                             num_classes=2),
     "mine: label 2 is outside 0..1; expected class labels 0..1"),
    (lambda: validate_arrays(torch.ones(3, 2), torch.tensor([[0.0], [np.nan], [1.0]]), loss="mse",
                             name="mine"),
     "mine: y has 1 NaN and 0 inf values; expected only finite numbers"),
    (lambda: validate_arrays(np.ones((0, 2)), np.ones(0), loss="ce", name="mine"),
     "mine: the dataset is empty (0 samples); expected at least 1"),
    (lambda: validate_arrays(np.ones(3), np.ones(3), loss="ce", name="mine"),
     "mine: x has shape (3,) (1-D); expected 2-D (n, features) or 4-D (n, C, H, W)"),
    (lambda: train({"data": "sine"}), "config must be a TrainConfig, got dict"),
    (lambda: train(TrainConfig(steps=4), stop_after=0), "stop_after must be a positive integer, got 0"),
    (lambda: train(TrainConfig(steps=4), resume=True), "--resume needs --out DIR holding checkpoint.pt"),
    (lambda: train(TrainConfig(steps=4, batch_size=2.5)),
     "--batch-size must be an integer >= 0 (0 means full batch), got 2.5"),
    (lambda: train(TrainConfig(steps=4, method="ee", tau=2.0)), "--tau must be a positive integer, got 2.0"),
    (lambda: train(TrainConfig(steps=4, lr="0.1")), "--lr must be a positive number, got '0.1'"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_public_functions_refuse_bad_input_with_one_clear_message(call, message):
    with pytest.raises(UserInputError) as err:
        call()
    assert str(err.value) == message


def test_a_non_analytic_model_runs_when_allowed_and_says_so():
    model = ee_model(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                   nn.Linear(8, 1)), n=4)
    wrapper = EEWrapper(model, _optimizer(model), tau=2, eps=1e-3, allow_non_analytic=True)
    assert wrapper.analytic is False


# -- ill-conditioned rank checks say inconclusive ---------------------------------------------------
def test_rank_check_on_nearly_repeated_inputs_is_inconclusive_not_a_guess():
    """Two inputs 1e-11 and 1e-12 apart make [h_X, 1] singular to within rounding: the smallest
    singular value sits inside the tolerance band, and the answer must be 'inconclusive'."""
    torch.manual_seed(0)
    model = two_phase_model(MLP(2, 1), n=10)
    x = torch.randn(10, 2, dtype=torch.float64)
    verdicts = {}
    for gap in (1e-3, 1e-11, 1e-12, 0.0):
        nearly = x.clone()
        nearly[1] = nearly[0] + gap
        verdicts[gap] = expressivity(model, nearly).verdict
    assert verdicts == {1e-3: "verified", 1e-11: "inconclusive", 1e-12: "inconclusive",
                        0.0: "not-verified"}


def test_a_checkpoint_of_an_earlier_version_with_numpys_rng_tuple_still_restores(tmp_path):
    """Before numpy's RNG state was stored as a tensor it was numpy's own tuple (an array
    inside): such checkpoints load under ``weights_only`` and restore the same generator."""
    path = tmp_path / CHECKPOINT_NAME
    np.random.seed(11)
    torch.save({"step": 2, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                   "python": random.getstate()}}, path)
    expected = np.random.standard_normal(3)
    np.random.seed(0)
    restore_rng(load_checkpoint(path)["rng"])
    assert np.array_equal(np.random.standard_normal(3), expected)


def test_a_corrupt_checkpoint_is_called_unreadable_not_dangerous(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(b"x" * 100)
    with pytest.raises(UserInputError, match=rf"^checkpoint {path} is unreadable \((?!it holds)"):
        load_checkpoint(path)
