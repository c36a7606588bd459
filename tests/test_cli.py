"""``gconv``: the outputs of ``gconv train``, ``python -m global_convergence``, and the
exact one-line message of every bad input (exit 2, nothing written)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from global_convergence.cli import main
from global_convergence.training import CHECKPOINT_NAME, TrainConfig, load_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS_COLUMNS = ["step", "epoch", "phase", "loss", "train_error", "test_error", "alignment_ok",
                   "q_t"]
SUMMARY_KEYS = {"train_loss", "train_error", "test_error", "q_t", "alignment_checks", "steps",
                "switch_step", "seconds", "config", "certificate"}


def child_env() -> dict[str, str]:
    """Environment of a ``gconv`` child process: one thread (deterministic, and fast on a busy
    machine), no progress bar noise."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def gconv(*argv: str) -> tuple[int, str, str]:
    """Run ``gconv argv`` in this process; (exit status, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:       # argparse usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


# -- a whole run through the real entry points -----------------------------------------------------
def test_python_dash_m_train_writes_every_output_of_a_run(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", "sine", "--n", "30", "--model", "mlp", "--method", "ee", "--tau", "4",
            "--eps", "0.01", "--steps", "8", "--batch-size", "0", "--optimizer", "sgd", "--lr",
            "0.5", "--momentum", "0", "--exploit-optimizer", "lbfgs", "--track-alignment-every", "4",
            "--checkpoint-every", "3", "--out", str(out), "--quiet"]
    done = subprocess.run([sys.executable, "-m", "global_convergence", *argv], capture_output=True,
                          text=True, env=child_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ee mlp on sine: train loss ")
    assert done.stdout.rstrip().endswith(f"after 8 steps -> {out}")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CHECKPOINT_NAME, "metrics.csv", "summary.json", "training.png", "q_t.png",
         "certificate.png"])

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0]) == METRICS_COLUMNS + ["alignment_margin", "alignment_rank",
                                               "alignment_rank_augmented"]
    assert [int(r["step"]) for r in rows] == list(range(9))
    assert [int(r["phase"]) for r in rows] == [1] * 4 + [2] * 5
    assert [r["alignment_ok"] != "" for r in rows] == [s % 4 == 0 for s in range(9)]
    assert all((r["alignment_rank"] != "") == (r["alignment_ok"] != "") for r in rows)
    assert all(r["test_error"] == "" for r in rows)          # the sine wave has no test set

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 8 and summary["switch_step"] == 4 and summary["test_error"] is None
    assert summary["alignment_checks"] == 3 and 0 <= summary["q_t"] <= 3
    assert summary["train_loss"] == pytest.approx(float(rows[-1]["loss"]))
    assert {"phase1", "phase2"} <= set(summary["seconds"])
    assert set(summary["config"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert summary["config"]["exploit_optimizer"] == "lbfgs" and summary["config"]["n"] == 30
    certificate = summary["certificate"]
    assert certificate["method"] == "ee" and certificate["condition"]["condition"] == "safe-exploration"
    assert certificate["condition"]["verdict"] in ("verified", "not-verified", "inconclusive")
    assert certificate["bound"] is None      # L-BFGS: Theorem 5 is for gradient descent

    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 8 and state["wrapper"]["phase"] == 2
    assert certificate["condition"]["spectrum"]["values"]      # what certificate.png draws
    for png in ("training.png", "q_t.png", "certificate.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*"))           # no temporary file left


def test_gconv_console_script_is_installed_and_runs_main():
    """``gconv`` is the console script of ``main`` (a process start costs seconds; the outputs
    test above runs a real process through ``python -m global_convergence``)."""
    from importlib.metadata import entry_points
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "gconv"]
    assert script.value == "global_convergence.cli:main" and script.load() is main
    assert shutil.which("gconv", path=str(Path(sys.executable).parent)) is not None


@pytest.mark.slow
def test_ee_with_lbfgs_exploitation_reaches_zero_training_error_on_the_sine_wave(tmp_path):
    """The [K22] sine-wave story: full-batch GD explores for τ = 2000 steps, L-BFGS exploits."""
    out = tmp_path / "sine"
    done = subprocess.run(
        [sys.executable, "-m", "global_convergence", "train", "--data", "sine", "--model", "mlp",
         "--method", "ee", "--tau", "2000", "--eps", "0.01", "--steps", "4000", "--batch-size",
         "0", "--optimizer", "sgd", "--lr", "0.5", "--momentum", "0", "--exploit-optimizer",
         "lbfgs", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=1800,
        env=child_env())     # one thread: 71 s on a busy 2-core machine, 847 s with two (spinning)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4000 and summary["switch_step"] == 2000
    assert summary["train_error"] == 0.0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert float(next(r for r in rows if int(r["step"]) == 2000)["train_error"]) > 0.1  # GD stuck


# -- bad input: the exact line the user sees ---------------------------------------------------------
BASE = ["train", "--data", "sine", "--model", "mlp", "--quiet"]

BAD_OPTIONS = [
    # τ beyond the run, in steps and in epochs; τ and τ0 themselves
    (["--method", "ee", "--steps", "40", "--tau", "40"],
     "--tau 40 is outside the run: it must satisfy 0 < tau < T = 40 steps"),
    (["--method", "ee", "--epochs", "3", "--tau", "3"],
     "--tau 3 is outside the run: it must satisfy 0 < tau < T = 3 epochs"),
    (["--method", "ee", "--steps", "40", "--tau", "0"], "--tau must be a positive integer, got 0"),
    (["--method", "ee", "--steps", "40", "--tau0", "1.5"],
     "--tau0 must satisfy 0 < tau0 < 1, got 1.5"),
    # non-positive or non-finite ε, δ0, lr (negative numbers in any notation reach validation)
    (["--method", "ee", "--steps", "40", "--eps", "0"], "--eps must be a positive number, got 0.0"),
    (["--method", "ee", "--steps", "40", "--eps", "-1e-2"],
     "--eps must be a positive number, got -0.01"),
    (["--method", "ee", "--steps", "40", "--eps", "nan"],
     "--eps must be a positive number, got nan"),
    (["--method", "two-phase", "--steps", "40", "--delta0", "0"],
     "--delta0 must be a positive number, got 0.0"),
    (["--method", "two-phase", "--steps", "40", "--delta0", "-1e-3"],
     "--delta0 must be a positive number, got -0.001"),
    (["--method", "base", "--steps", "40", "--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--method", "base", "--steps", "40", "--lr", "-0.1"],
     "--lr must be a positive number, got -0.1"),
    (["--method", "base", "--steps", "40", "--lr", "inf"], "--lr must be a positive number, got inf"),
    (["--method", "base", "--steps", "40", "--momentum", "-0.9"], "--momentum must be >= 0, got -0.9"),
    (["--method", "base", "--steps", "40", "--weight-decay", "-1"],
     "--weight-decay must be >= 0, got -1.0"),
    # sizes and counts
    (["--method", "base", "--steps", "40", "--batch-size", "-1"],
     "--batch-size must be an integer >= 0 (0 means full batch), got -1"),
    (["--method", "base", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--method", "base", "--epochs", "-2"], "--epochs must be a positive integer, got -2"),
    (["--method", "base", "--steps", "4", "--n", "1"], "n=1 is too small; expected an integer >= 2"),
    (["--method", "base", "--steps", "4", "--seed", "-1"],
     "--seed must be an integer in 0..4294967295, got -1"),
    (["--method", "base", "--steps", "4", "--width", "0"], "--width must be a positive integer, got 0"),
    (["--method", "ee", "--steps", "4", "--head-width", "0"],
     "--head-width must be a positive integer, got 0"),
    (["--method", "base", "--steps", "4", "--checkpoint-every", "0"],
     "--checkpoint-every must be a positive integer, got 0"),
    (["--method", "base", "--steps", "4", "--track-alignment-every", "-1"],
     "--track-alignment-every must be a positive integer, got -1"),
    (["--method", "base", "--steps", "4", "--log-every", "0"],
     "--log-every must be a positive integer, got 0"),
    # unknown names
    (["--method", "newton", "--steps", "4"],
     "unknown --method 'newton'; expected one of base, two-phase, ee"),
    (["--method", "base", "--steps", "4", "--model", "vgg"],
     "unknown --model 'vgg'; expected one of mlp, lenet, resnet18, preact-resnet18"),
    (["--method", "base", "--steps", "4", "--optimizer", "lion"],
     "unknown --optimizer 'lion'; expected one of sgd, adam"),
    (["--method", "base", "--steps", "4", "--loss", "hinge"],
     "unknown --loss 'hinge'; expected one of ce, mse"),
    (["--method", "ee", "--steps", "4", "--exploit-optimizer", "newton"],
     "unknown --exploit-optimizer 'newton'; expected one of same, lbfgs"),
    (["--method", "base", "--steps", "4", "--device", "tpu"],
     "unknown --device 'tpu'; expected one of cpu, cuda"),
    (["--method", "base", "--steps", "4", "--activation", "gelu"],
     "unknown --activation 'gelu'; expected one of softplus, relu"),
    (["--method", "base", "--steps", "4", "--data", "foo"],
     "dataset 'foo' is not known; expected one of two-moons, sine, random, digits, semeion, mnist, "
     "kmnist, cifar10, cifar100, svhn or the path of a .npz file"),
    # options that do not fit the data or the model
    (["--method", "base", "--steps", "4", "--noise", "0.1"],
     "noise=0.1 was given for dataset 'sine'; noise applies only to 'two-moons'"),
    (["--method", "base", "--steps", "4", "--augment"],
     "--augment: no augmentation applies to sine (inputs of shape (1,))"),
    (["--method", "base", "--steps", "4", "--model", "lenet"],
     "model 'lenet' needs image inputs (C, H, W), got input shape (1,)"),
    # a non-analytic model asked for a guarantee, refused unless --allow-non-analytic
    (["--method", "two-phase", "--steps", "4", "--activation", "relu"],
     "TwoPhase: the guarantee needs a real-analytic model, but these modules are not: trunk.2, "
     "trunk.4, trunk.6 (convert with make_analytic, or pass allow_non_analytic=True to run without "
     "it)"),
    (["--method", "ee", "--steps", "4", "--activation", "relu"],
     "EEWrapper: the guarantee needs a real-analytic model, but these modules are not: trunk.2, "
     "trunk.4 (convert with make_analytic, or pass allow_non_analytic=True to run without it)"),
    # argparse's own usage errors, in the same one-line form
    (["--method", "base", "--steps", "4", "--epochs", "2"],
     "argument --epochs: not allowed with argument --steps"),
    (["--method", "base"], "one of the arguments --epochs --steps is required"),
    (["--method", "base", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--method", "base", "--steps", "4", "--device", "cuda"],
                        "--device cuda was asked for but no CUDA device is available"))


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_exit_2_and_writes_nothing(tmp_path, options, message):
    out = tmp_path / "out"
    code, stdout, stderr = gconv(*BASE, *options, "--out", str(out))
    assert (code, stderr) == (2, f"gconv: error: {message}\n")
    assert stdout == "" and not out.exists()


def _npz(folder: Path, name: str, **arrays) -> str:
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


BAD_DATA = {
    "nan": (dict(x=np.array([[0.0, np.nan], [1, 2], [3, 4]]), y=np.array([0, 1, 0])), "ce",
            "{name}: x has 1 NaN and 0 inf values; expected only finite numbers"),
    "inf-target": (dict(x=np.arange(6.0).reshape(3, 2), y=np.array([0.5, np.inf, 1.0])), "mse",
                   "{name}: y has 0 NaN and 1 inf values; expected only finite numbers"),
    "negative-label": (dict(x=np.arange(6.0).reshape(3, 2), y=np.array([0, -1, 1])), "ce",
                       "{name}: label -1 is outside 0..1; expected class labels 0..1"),
    "test-label": (dict(x=np.arange(6.0).reshape(3, 2), y=np.array([0, 1, 1]),
                        x_test=np.arange(4.0).reshape(2, 2), y_test=np.array([0, 5])), "ce",
                   "{name} test set: label 5 is outside 0..1; expected class labels 0..1"),
    "fractional-label": (dict(x=np.arange(6.0).reshape(3, 2), y=np.array([0, 0.5, 1])), "ce",
                         "{name}: y has non-integer label 0.5; loss='ce' expects integer class "
                         "labels 0..C-1 (use loss 'mse' for real targets)"),
    "empty": (dict(x=np.zeros((0, 2)), y=np.zeros((0,), dtype=np.int64)), "ce",
              "{name}: the dataset is empty (0 samples); expected at least 1"),
    "3d": (dict(x=np.zeros((3, 2, 2)), y=np.array([0, 1, 0])), "ce",
           "{name}: x has shape (3, 2, 2) (3-D); expected 2-D (n, features) or 4-D (n, C, H, W)"),
    "lengths": (dict(x=np.zeros((3, 2)), y=np.array([0, 1])), "ce",
                "{name}: x has 3 samples but y has 2; expected the same number"),
    "strings": (dict(x=np.array([["a", "b"], ["c", "d"]]), y=np.array([0, 1])), "ce",
                "{name}: x has dtype <U1; expected real numbers"),
    "complex": (dict(x=np.ones((2, 2), dtype=complex), y=np.array([0, 1])), "ce",
                "{name}: x has dtype complex128; expected real numbers"),
    "no-y": (dict(x=np.arange(6.0).reshape(3, 2)), "ce",
             "{name}: array 'y' is missing (found ['x']); expected arrays 'x' and 'y', optionally "
             "'x_test' and 'y_test'"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    arrays, loss, message = BAD_DATA[case]
    path = _npz(tmp_path, case, **arrays)
    out = tmp_path / "out"
    code, stdout, stderr = gconv("train", "--data", path, "--model", "mlp", "--method", "base",
                                 "--steps", "3", "--loss", loss, "--out", str(out), "--quiet")
    assert (code, stderr) == (2, f"gconv: error: {message.format(name=f'npz:{path}')}\n")
    assert not out.exists()


def test_missing_data_file(tmp_path):
    path = tmp_path / "missing.npz"
    code, _, stderr = gconv(*BASE, "--method", "base", "--steps", "3", "--data", str(path),
                            "--out", str(tmp_path / "out"))
    assert (code, stderr) == (2, f"gconv: error: npz:{path}: file '{path}' does not exist; expected "
                                 "a .npz file with arrays 'x' and 'y'\n")


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("mine")
    code, _, stderr = gconv(*BASE, "--method", "base", "--steps", "3", "--out", str(target))
    assert (code, stderr) == (2, f"gconv: error: --out '{target}' exists and is not a folder; "
                                 "expected a folder (new or from an earlier run)\n")
    code, _, stderr = gconv(*BASE, "--method", "base", "--steps", "3", "--out", str(target / "sub"))
    assert (code, stderr) == (2, f"gconv: error: --out '{target / 'sub'}' cannot be created: "
                                 f"'{target}' is not a folder\n")
    assert target.read_text() == "mine"


def test_resume_on_a_folder_without_a_checkpoint_starts_the_run(tmp_path):
    """A job pre-empted before its first checkpoint is re-submitted unchanged: ``--resume`` on a
    folder holding no checkpoint yet starts the run, and gives what a run without it gives."""
    job = (*BASE, "--method", "ee", "--steps", "6", "--n", "10", "--batch-size", "0")
    code, _, stderr = gconv(*job, "--out", str(tmp_path / "fresh"), "--resume")
    assert code == 0, stderr
    (tmp_path / "empty").mkdir()
    assert gconv(*job, "--out", str(tmp_path / "empty"), "--resume")[0] == 0
    assert gconv(*job, "--out", str(tmp_path / "plain"))[0] == 0
    summaries = [json.loads((tmp_path / name / "summary.json").read_text())
                 for name in ("fresh", "empty", "plain")]
    assert summaries[0]["steps"] == 6 and summaries[0]["completed"]
    assert summaries[0]["train_loss"] == summaries[1]["train_loss"] == summaries[2]["train_loss"]
    verdicts = [(c["condition"]["verdict"], c["condition"]["rank"])
                for c in (summary["certificate"] for summary in summaries)]
    assert verdicts[0] == verdicts[1] == verdicts[2]
    assert gconv(*job, "--out", str(tmp_path / "fresh"), "--resume")[0] == 0     # completed: kept
    again = json.loads((tmp_path / "fresh" / "summary.json").read_text())
    assert again["train_loss"] == summaries[0]["train_loss"]


def test_resume_refuses_a_folder_holding_another_runs_files(tmp_path):
    out = tmp_path / "out"
    job = (*BASE, "--method", "base", "--steps", "3", "--n", "10")
    assert gconv(*job, "--out", str(out))[0] == 0
    code, _, stderr = gconv(*job, "--lr", "0.2", "--out", str(out), "--resume")
    assert (code, stderr) == (2, "gconv: error: --resume with options that differ from the "
                                 "checkpoint's (lr: 0.1 -> 0.2)\n")
    (out / CHECKPOINT_NAME).unlink()                     # a summary.json of another configuration
    code, _, stderr = gconv(*job, "--lr", "0.2", "--out", str(out), "--resume")
    assert (code, stderr) == (2, "gconv: error: --resume with options that differ from the run "
                                 f"whose summary.json is in {out} (lr: 0.1 -> 0.2)\n")
    (out / "summary.json").unlink()                      # results nobody can attribute
    code, _, stderr = gconv(*job, "--out", str(out), "--resume")
    assert (code, stderr) == (2, f"gconv: error: --resume: {out} holds a metrics.csv but neither "
                                 "checkpoint.pt nor summary.json, so it cannot be told to be this "
                                 "run's; give another --out or empty the folder\n")
    assert (out / "metrics.csv").is_file()               # nothing was removed
    (out / "summary.json").write_text("{not json")
    code, _, stderr = gconv(*job, "--out", str(out), "--resume")
    assert code == 2 and stderr.startswith(f"gconv: error: --resume: {out} holds a summary.json "
                                           "that is not one of gconv train") and stderr.count("\n") == 1
    (out / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    code, _, stderr = gconv(*job, "--out", str(out), "--resume")
    assert code == 2 and stderr.startswith(f"gconv: error: checkpoint {out / CHECKPOINT_NAME} is "
                                           "unreadable (") and stderr.count("\n") == 1


def test_allow_non_analytic_runs_and_the_certificate_says_the_guarantee_does_not_apply(tmp_path):
    out = tmp_path / "relu"
    code, stdout, stderr = gconv(*BASE, "--data", "two-moons", "--n", "20", "--method", "two-phase",
                                 "--activation", "relu", "--allow-non-analytic", "--steps", "4",
                                 "--batch-size", "0", "--momentum", "0", "--weight-decay", "0",
                                 "--out", str(out))
    assert code == 0, stderr
    certificate = json.loads((out / "summary.json").read_text())["certificate"]
    assert certificate["assumptions"]["real_analytic"] is False
    assert certificate["bound"] is None and "real_analytic" in certificate["bound_withheld_because"]


def test_base_runs_a_relu_model_without_asking_for_a_guarantee(tmp_path):
    """Only the wrappers check analyticity: ``--method base`` trains a ReLU baseline."""
    out = tmp_path / "relu-base"
    code, _, stderr = gconv(*BASE, "--n", "20", "--method", "base", "--activation", "relu",
                            "--steps", "3", "--out", str(out))
    assert (code, stderr) == (0, "")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["activation"] == "relu" and summary["certificate"] is None
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["step"] == 3 and state["wrapper"] is None


def test_numerical_error_is_one_line_exit_3_naming_step_and_phase(tmp_path):
    out = tmp_path / "nan"
    code, _, stderr = gconv(*BASE, "--n", "20", "--method", "ee", "--tau", "2", "--steps", "12",
                            "--lr", "1", "--momentum", "0", "--weight-decay", "0", "--batch-size",
                            "0", "--loss", "mse", "--checkpoint-every", "1", "--out", str(out))
    assert code == 3
    step = load_checkpoint(out / CHECKPOINT_NAME)["step"] + 1
    assert stderr == (f"gconv: numerical error: training loss became inf at step {step} (phase 2); "
                      f"the last good checkpoint (step {step - 1}) is kept in "
                      f"{out / CHECKPOINT_NAME}. Lower --lr or check the data.\n")


# -- launchers ------------------------------------------------------------------------------------
REQUIRED = {"--data": "two-moons", "--model": "mlp", "--method": "ee", "--steps": "5"}


def typed_forms(action) -> list[list[str]]:
    """How a user types ``action`` on a command line: ``--flag``, or ``--opt V`` and ``--opt=V``
    with a value it accepts (the first of its listed choices)."""
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return [[flag]]
    metavar = action.metavar or ""
    value = metavar[1:].split(",")[0] if metavar.startswith("{") else REQUIRED.get(flag, "1")
    return [[flag, value], [f"{flag}={value}"]]


def train_command_lines() -> list[list[str]]:
    """One complete ``train`` command line per typed form of every option of ``gconv train``."""
    from global_convergence.cli import build_parser
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    lines = []
    for action in train_parser._actions:
        if not action.option_strings or action.option_strings == ["-h", "--help"]:
            continue
        for form in typed_forms(action):
            base = {k: v for k, v in REQUIRED.items()
                    if k != form[0].split("=")[0] and not (k == "--steps" and "--epochs" in form[0])}
            lines.append(["train", *[t for kv in base.items() for t in kv], *form])
    return lines


def test_every_train_option_reaches_the_workers_unchanged_through_both_launchers():
    """Each option of ``gconv train``, typed as a user types it, goes through torchrun's own
    parser (after ``train --``, its documented form) and through ``--nproc-per-node``'s launcher,
    and the workers' ``gconv`` parses exactly what one process parses."""
    from torch.distributed.run import config_from_args, get_args_parser

    from global_convergence.cli import build_parser, command_line
    from global_convergence.training.launch import launcher_args
    parser, torchrun = build_parser(), get_args_parser()
    lines = train_command_lines()
    covered = {line[-1].split("=")[0] if line[-1].startswith("--") else line[-2] for line in lines}
    assert {"--n", "--nproc-per-node", "--certificate", "--resume", "--exploit-lr"} <= covered
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    assert covered == {a.option_strings[-1] for a in train_parser._actions
                       if a.option_strings and a.option_strings[-1] != "--help"}
    refused = set()
    for line in lines:
        expected = vars(parser.parse_args(line))
        prefix = ["--standalone", "--nproc-per-node=2", "-m", "global_convergence"]
        separated = torchrun.parse_args([*prefix, "train", "--", *line[1:]])
        assert separated.module and separated.training_script == "global_convergence"
        assert command_line(separated.training_script_args) == line
        assert vars(parser.parse_args(command_line(separated.training_script_args))) == expected
        _, _, worker_args = config_from_args(launcher_args(2, line))
        assert worker_args[-len(line):] == line and worker_args[:3] == ["-u", "-m", "global_convergence"]
        try:                                       # without "--": torchrun reads them itself
            plain = torchrun.parse_args([*prefix, *line])
            assert plain.training_script_args == line
        except SystemExit:
            refused.add(line[-1].split("=")[0] if "=" in line[-1] else line[-2])
    assert refused == {"--n"}     # torchrun: "ambiguous option: --n could match --nnodes, ..."


def test_the_launcher_refuses_bad_options_once_before_starting_workers(tmp_path):
    code, _, stderr = gconv(*BASE, "--method", "ee", "--steps", "4", "--lr", "-1",
                            "--nproc-per-node", "2", "--out", str(tmp_path / "x"))
    assert (code, stderr) == (2, "gconv: error: --lr must be a positive number, got -1.0\n")
    code, _, stderr = gconv(*BASE, "--method", "ee", "--steps", "4", "--nproc-per-node", "0",
                            "--out", str(tmp_path / "x"))
    assert (code, stderr) == (2, "gconv: error: --nproc-per-node must be a positive integer, got 0\n")
    assert not (tmp_path / "x").exists()


def test_help_lists_the_choices_and_defaults_of_train(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--method {base,two-phase,ee}", "--certificate {auto,full,off}",
                  "--feature-cache {auto,memory,disk,off}", "--model {mlp,lenet,resnet18,preact-resnet18}",
                  "learning rate (default: 0.1)", "(default: 1e-05)", "(default: sgd)"):
        assert shown in text, shown
    assert "SPEC" not in text
