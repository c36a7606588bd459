"""``gconv reproduce``: the registry, presets, errors, and every experiment's ``smoke`` preset.

The smoke runs share one temporary folder per test module; ``neco-fig1a`` and ``neco-fig1bc``
write where ``neco-table1`` looks for their runs, so Table 1 must reuse them all.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from global_convergence.cli import main
from global_convergence.errors import UserInputError
from global_convergence.experiments import EXPERIMENTS, reproduce
from global_convergence.experiments import standins
from global_convergence.experiments.report import beside_paper
from global_convergence.experiments.subruns import Context, cached_result, completed_summary
from global_convergence.training import TrainConfig

EXPERIMENT_IDS = {"neco-fig1a", "neco-fig1bc", "neco-table1", "neco-fig2", "neco-table2",
            "neco-table3-5", "aaai-table1", "aaai-table2"}
OUT_DIRS = {"neco-fig1a": "neco-table1/fig1a", "neco-fig1bc": "neco-table1/fig1bc"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: small steps on a shared 2-core machine are many times faster than with two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``smoke(name)`` runs an experiment's smoke preset once per module; returns its folder."""
    root = tmp_path_factory.mktemp("reproduce")
    done: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in done:
            out = root / OUT_DIRS.get(name, name)
            report = reproduce(name, preset="smoke", out=out, progress=False)
            assert report == out / "report.md"
            done[name] = out
        return done[name]
    return run


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def report(out: Path) -> str:
    return (out / "report.md").read_text()


# -- registry, presets, errors ----------------------------------------------------------------
def test_registry_has_every_paper_experiment_with_three_presets():
    assert set(EXPERIMENTS) == EXPERIMENT_IDS
    for name, module in EXPERIMENTS.items():
        assert set(module.PRESETS) == {"smoke", "cpu", "paper"}, name
        for preset in module.PRESETS.values():
            assert dataclasses.is_dataclass(preset) and type(preset).__dataclass_params__.frozen


def test_paper_presets_carry_the_papers_settings():
    fig2 = EXPERIMENTS["neco-fig2"].PRESETS["paper"]
    assert (fig2.eps, fig2.tau, fig2.n, len(fig2.seeds)) == (0.01, 2000, 100, 3)
    fig1bc = EXPERIMENTS["neco-fig1bc"].PRESETS["paper"]
    assert (fig1bc.datasets, fig1bc.widths, fig1bc.n, len(fig1bc.seeds)) == (
        ("semeion", "random"), (4, 2, 1), 1000, 2)
    k22 = EXPERIMENTS["neco-table3-5"].PRESETS["paper"]
    assert (k22.recipe.lr, k22.recipe.batch_size, k22.recipe.momentum, k22.recipe.weight_decay) == (
        0.1, 64, 0.9, 1e-5)
    assert (k22.epochs_aug, k22.epochs_plain, len(k22.seeds), k22.select, k22.holdout) == (
        200, 100, 5, True, 0.2)
    assert (k22.eps_grid, k22.tau0_grid, k22.lr_grid) == ((1e-3, 1e-5), (0.4, 0.6, 0.8),
                                                          (0.2, 0.1, 0.01, 0.001))
    ks21 = EXPERIMENTS["aaai-table1"].PRESETS["paper"]
    assert (ks21.recipe.lr, ks21.epochs_plain, ks21.epochs_aug, ks21.tau0, ks21.delta0,
            len(ks21.seeds), ks21.expressivity_seed) == (0.01, 100, 400, 0.6, 1e-3, 5, 1)
    grid = EXPERIMENTS["aaai-table2"].PRESETS["paper"]
    assert (grid.dataset, grid.tau0_grid, grid.delta0_grid, len(grid.seeds)) == (
        "kmnist", (0.4, 0.5, 0.6, 0.8), (1e-4, 1e-3, 1e-2), 3)
    table2 = EXPERIMENTS["neco-table2"].PRESETS["paper"]
    assert {name for name, _ in table2.datasets} == {"mnist", "cifar10", "cifar100", "semeion",
                                                       "kmnist", "svhn"}


def test_unknown_experiment_lists_the_valid_names(tmp_path):
    with pytest.raises(UserInputError) as err:
        reproduce("neco-fig9", preset="smoke", out=tmp_path)
    assert all(name in str(err.value) for name in EXPERIMENT_IDS)


def test_unknown_preset_lists_the_valid_presets(tmp_path):
    with pytest.raises(UserInputError, match="smoke, cpu, paper"):
        reproduce("neco-fig1a", preset="gpu", out=tmp_path)


def test_missing_torchvision_data_is_one_line_naming_the_data_root(tmp_path, capsys):
    root = tmp_path / "no-data-here"
    with pytest.raises(UserInputError) as err:
        reproduce("neco-table2", preset="paper", out=tmp_path / "out", data_root=str(root))
    message = str(err.value)
    assert "\n" not in message and str(root) in message and "mnist" in message
    code = main(["reproduce", "neco-table2", "--preset", "paper", "--data-root", str(root),
                 "--out", str(tmp_path / "cli"), "--quiet"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1 and str(root) in stderr


# -- helpers --------------------------------------------------------------------------------------
def test_binary_labels_file_has_the_documented_labels(tmp_path):
    ctx = Context("neco-fig1bc", "smoke", tmp_path, progress=False)
    with np.load(standins.binary_labels_file(ctx, "digits")) as f:
        from global_convergence.data import load_dataset
        digits = load_dataset("digits")
        assert np.array_equal(f["y"], (digits.y_train.numpy() >= 5).astype(np.int64))
        assert set(np.unique(f["y_test"])) == {0, 1}


def test_a_cached_result_of_a_run_is_reused_only_for_that_runs_options(tmp_path):
    ctx = Context("neco-fig2", "smoke", tmp_path, progress=False)
    calls = []

    def compute(value):
        return lambda: calls.append(value) or {"value": value}

    run = TrainConfig(data="sine", model="mlp", method="ee", steps=20, tau=10)
    assert cached_result(ctx, "k", compute(1), of_run=run)["value"] == 1
    moved = dataclasses.replace(run, checkpoint_every=5)         # does not alter the numbers
    assert cached_result(ctx, "k", compute(2), of_run=moved)["value"] == 1
    other = dataclasses.replace(run, lr=0.3)
    assert cached_result(ctx, "k", compute(3), of_run=other)["value"] == 3
    assert calls == [1, 3]


def test_beside_paper_puts_a_stand_in_in_the_row_it_replaces():
    paper = {"mnist": [(0.40, 0.05)], "semeion": [(2.59, 0.57)]}
    rows = beside_paper(paper, {"digits": ["3.10"], "random": ["50.00"]})
    assert rows[0] == ["MNIST", "0.40 (0.05)", "not run"]
    assert rows[1][0].startswith("Semeion — ours: digits") and rows[1][1:] == ["2.59 (0.57)", "3.10"]
    assert rows[2] == ["random", "—", "50.00"]


def test_a_changed_config_is_not_taken_for_a_completed_run(tmp_path):
    config = TrainConfig(data="sine", steps=3)
    summary = {"completed": True, "config": config.to_dict()}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert completed_summary(tmp_path, config) is not None
    assert completed_summary(tmp_path, dataclasses.replace(config, device="cuda")) is not None
    assert completed_summary(tmp_path, dataclasses.replace(config, lr=0.2)) is None
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "completed": False}))
    assert completed_summary(tmp_path, config) is None


# -- the smoke presets ----------------------------------------------------------------------------
def test_neco_fig1a_smoke_separates_two_moons_from_the_sine_wave(smoke):
    out = smoke("neco-fig1a")
    ours = results(out)["ours"]
    assert ours["two-moons"]["q_t"] == [0] and ours["two-moons"]["train_error"] == [0.0]
    assert ours["sine"]["q_t"][0] > 0 and ours["sine"]["train_error"][0] > 0.2
    text = report(out)
    assert "2.09e+11" in text and "3.95e+09" in text          # [K22] Table 1a beside ours
    assert (out / "fig1a.png").is_file()
    assert all(r["ntk_change"] > 0 for r in results(out)["runs"])


def test_a_rerun_reuses_completed_sub_runs(smoke):
    out = smoke("neco-fig1a")
    summaries = sorted((out / "runs").glob("*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    reproduce("neco-fig1a", preset="smoke", out=out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in summaries} == before
    assert all(r["reused"] for r in results(out)["runs"])


def test_neco_fig1bc_smoke(smoke):
    out = smoke("neco-fig1bc")
    rows = results(out)["ours"]
    assert {r["dataset"] for r in rows} == {"digits", "random"}
    assert all(0.0 <= r["train_error"] <= 1.0 and r["alignment_checks"] == 3 for r in rows)
    text = report(out)
    assert "offline stand-in" in text and "≥ 5" in text and (out / "fig1bc.png").is_file()


def test_neco_table1_smoke_reuses_the_figure_1_runs(smoke):
    smoke("neco-fig1a")
    smoke("neco-fig1bc")
    out = smoke("neco-table1")
    runs = results(out)["runs"]
    assert len(runs) == 4 and all(r["reused"] for r in runs)
    assert all(r["ntk_change"] is not None and r["ntk_change"] >= 0 for r in runs)
    text = report(out)
    assert "8.09e+12" in text and "2.97e+12" in text and "2.09e+11" in text


def test_neco_fig2_smoke_ee_lbfgs_beats_plain_gd(smoke):
    out = smoke("neco-fig2")
    data = results(out)
    ours = data["ours"]
    assert set(ours) == {"base GD", "EE + GD", "EE + GD, step 1/L̂", "EE + L-BFGS"}
    assert ours["EE + L-BFGS"]["train_error"][0] <= ours["base GD"]["train_error"][0]
    assert all(ours["base GD"]["steps"] >= v["steps"] for v in ours.values())   # equal budgets
    for v in ours.values():
        assert v["best_train_error"][0] <= v["train_error"][0]
    assert ours["EE + GD"]["certificate"][0]["verdict"] in ("verified", "not-verified", "inconclusive")
    assert all(v is not None for v in ours["EE + GD"]["ntk_change_final"])
    curvature = data["curvature"][0]
    assert 0 <= curvature["gram"]["min"] <= curvature["gram"]["max"]
    assert curvature["hessian_T"]["max"] <= curvature["gram"]["max"] / 4 * (1 + 1e-9)   # ℓ'' ≤ 1/4
    assert "Curvature of the exploitation problem" in report(out)
    gram = curvature["gram"]          # the report states the span it measured
    span = f"spans {math.log10(gram['max'] / gram['min']):.1f} orders" if gram["min"] > 0 else \
        "smallest computed eigenvalue is not positive"
    assert span in report(out)
    assert (out / "fig2.png").is_file() and (out / "fig3.png").is_file()


def test_demo_table_is_identical_under_other_thread_settings(tmp_path):
    """Two tiny demos in fresh processes with different OMP/MKL/torch thread settings, one
    training in this process and one in two worker processes, print the same table (every run
    uses one intra-op thread)."""
    import os
    import subprocess
    import sys

    script = ("import sys, torch; torch.set_num_threads(int(sys.argv[2]));"
              "from global_convergence.experiments.demo import run_demo, TINY, format_table;"
              "table = format_table(run_demo(sys.argv[1], progress=False, settings=TINY,"
              "workers=int(sys.argv[2])), TINY);"
              "print('TABLE'); print(table)")
    tables = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / threads), threads],
                              env=env, capture_output=True, text=True, check=True)
        tables.append(done.stdout.split("TABLE\n")[-1].strip())
    assert tables[0] == tables[1]
    lines = tables[0].splitlines()
    assert lines[0].startswith("Training error on the sine wave") and len(lines) == 6
    assert [line.split()[0] for line in lines[3:]] == ["base", "EE", "EE"]
    summary = json.loads((tmp_path / "1" / "results.json").read_text())["results"]
    assert summary["base GD"][0]["steps"] >= max(r["steps"] for runs in summary.values() for r in runs)


def test_neco_table2_smoke(smoke):
    out = smoke("neco-table2")
    verdict = results(out)["ours"]["digits"]["verdict"]
    assert verdict["condition"] == "safe-exploration" and verdict["n"] == 40
    assert verdict["verdict"] in ("verified", "not-verified", "inconclusive")
    assert 0 < verdict["rank"] <= 40 and verdict["shape"] == [40, 513]
    assert "stand-in for semeion" in report(out) and "| verified |" in report(out)


def test_neco_table3_5_smoke(smoke):
    out = smoke("neco-table3-5")
    data = results(out)
    errors = data["ours"]["table4"]["digits-small"]
    assert all(0.0 <= e <= 1.0 for m in ("Standard", "A(Standard)") for e in errors[m])
    assert data["selected"]["digits-small-plain"] == {"eps": 1e-3, "tau0": 0.5}
    lr_runs = [r for r in data["runs"] if r["key"].startswith("lr")]
    assert lr_runs and all(r["reused"] for r in lr_runs)     # identical to the main runs
    text = report(out)
    assert "364.60 (0.94)" in text and "7.80 (0.50)" in text and "0.26" in text and "4.64e+12" in text


def test_aaai_table1_smoke(smoke):
    out = smoke("aaai-table1")
    data = results(out)
    assert data["expressivity"]["digits-small"]["verdict"]["condition"] == "expressivity"
    errors = data["ours"]["digits-small-plain"]
    assert all(0.0 <= e <= 1.0 for m in ("base", "A(base)") for e in errors[m])
    text = report(out)
    assert "7.01 (0.18)" in text and "6.84 (0.16)" in text and (out / "fig2-plain.png").is_file()


def test_aaai_table2_smoke(smoke):
    out = smoke("aaai-table2")
    data = results(out)
    assert list(data["ours"]) == ["delta0.001-tau0.5"] and data["best"] == {"delta0": 1e-3,
                                                                            "tau0": 0.5}
    assert "1.92 (0.06)" in report(out) and "KMNIST" in report(out)


# -- the cpu presets (minutes; run with -m slow) -----------------------------------------------
@pytest.mark.slow
def test_neco_fig1a_cpu_shows_the_phenomenon(tmp_path):
    reproduce("neco-fig1a", preset="cpu", out=tmp_path, progress=False)
    ours = results(tmp_path)["ours"]
    assert ours["two-moons"]["train_error"] == [0.0, 0.0]
    assert all(f == 0 for f in ours["two-moons"]["failed_after_start"])
    assert all(e > 0.15 for e in ours["sine"]["train_error"])
    assert all(q > c / 2 for q, c in zip(ours["sine"]["q_t"], ours["sine"]["alignment_checks"]))


@pytest.mark.slow
def test_neco_fig2_cpu_ee_escapes_where_gd_is_stuck(tmp_path):
    reproduce("neco-fig2", preset="cpu", out=tmp_path, progress=False)
    ours = results(tmp_path)["ours"]
    assert all(e > 0.10 for e in ours["base GD"]["best_train_error"])
    assert ours["EE + L-BFGS"]["train_error"] == [0.0, 0.0, 0.0]
    assert min(ours["EE + GD"]["train_error"]) < min(ours["base GD"]["train_error"])
    assert all(f > t for f, t in zip(ours["EE + GD"]["ntk_change_final"],
                                      ours["EE + GD"]["ntk_change_at_tau"]))
