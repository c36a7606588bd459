"""Sub-runs of the reproductions in worker processes, and the ‖ΔM‖² tracker's NTK."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from global_convergence.experiments.ntk_tracking import all_parameters_in_eval, full_ntk, ntk_callbacks
from global_convergence.experiments.subruns import Context, Job, _worker, base_config, run_jobs
from global_convergence.models import ee_model
from global_convergence.models.mlp import MLP
from global_convergence.ntk import empirical_ntk
from global_convergence.ntk import plan as ntk_plan


def _jobs(ctx: Context) -> list[Job]:
    """Two short full-batch runs of the mlp on two moons, alignment and ‖ΔM‖² tracked."""
    out = []
    for seed in (0, 1):
        config = base_config(ctx, data="two-moons", model="mlp", seed=seed, n=24, optimizer="sgd",
                             lr=0.5, momentum=0.0, weight_decay=0.0, batch_size=0, steps=6,
                             track_alignment_every=3)
        out.append(Job(f"moons-s{seed}", config, ntk_callbacks(6), {"seed": seed}, cost=seed))
    return out


def test_a_workers_task_pickles_and_gives_the_run_of_this_process(tmp_path):
    ctx = Context("t", "smoke", tmp_path / "here", progress=False)
    job = _jobs(ctx)[0]
    here = run_jobs(ctx, [job], threads=1)[job.key]
    there = Context("t", "smoke", tmp_path / "there", progress=False)
    summary, rows, reused = _worker(pickle.loads(pickle.dumps((there, _jobs(there)[0], "", 1))))
    assert rows == here.rows and summary["train_loss"] == here.summary["train_loss"] and not reused
    assert (tmp_path / "there" / "runs" / job.key / "summary.json").is_file()


@pytest.mark.slow        # two spawned processes import torch, sklearn and the library (~1 min shared)
def test_two_workers_give_the_runs_of_one_process_on_one_thread(tmp_path):
    one = run_jobs(Context("t", "smoke", tmp_path / "one", progress=False),
                   _jobs(Context("t", "smoke", tmp_path / "one")), threads=1)
    ctx = Context("t", "smoke", tmp_path / "two", progress=False)
    two = run_jobs(ctx, _jobs(ctx), workers=2, threads=1)
    assert list(two) == ["moons-s0", "moons-s1"]            # the jobs' order, not the cost order
    for key in one:
        assert two[key].rows == one[key].rows and not two[key].reused
        assert two[key].summary["train_loss"] == one[key].summary["train_loss"]
        assert two[key].rows[-1]["ntk_change"] > 0 and two[key].summary["alignment_checks"] == 3
        assert (two[key].folder / "summary.json").is_file()
    again = run_jobs(ctx, _jobs(ctx), workers=2, threads=1)
    assert all(r.reused and r.rows == two[k].rows for k, r in again.items())


def test_run_jobs_restores_the_thread_count(tmp_path):
    ctx = Context("t", "smoke", tmp_path, progress=False)
    before = torch.get_num_threads()
    run_jobs(ctx, _jobs(ctx)[:1], threads=1)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="workers"):
        run_jobs(ctx, _jobs(ctx), workers=0)


def test_ntk_callbacks_can_be_sent_to_a_worker(tmp_path):
    factory = pickle.loads(pickle.dumps(ntk_callbacks(10, 5)))
    tracker, = factory(tmp_path)
    assert (tracker.total, tracker.every, tracker.path) == (10, 5, tmp_path / "ntk0.pt")


def _state(model: nn.Module) -> tuple:
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            getattr(model, "is_trunk_frozen", None))


def test_full_ntk_is_over_all_parameters_in_eval_mode_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = ee_model(MLP(2, 2), n=8)
    model.freeze_trunk()
    model.train()
    x = torch.randn(8, 2)
    before = _state(model)
    assert before[2] and not all(before[1])                  # frozen trunk: some fixed parameters
    reference = copy.deepcopy(model)
    reference.unfreeze_trunk()
    for p in reference.parameters():
        p.requires_grad_(True)
    expected = empirical_ntk(reference.eval(), x)
    got = full_ntk(model, x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert _state(model) == before


def test_full_ntk_reuses_the_plan_of_its_model():
    torch.manual_seed(0)
    model, x = MLP(2, 1), torch.randn(6, 2)
    ntk_plan.forget_plans()
    full_ntk(model, x)
    first = ntk_plan._PLANS[model][1]
    full_ntk(model, x)
    assert ntk_plan._PLANS[model][1] is first


def test_all_parameters_in_eval_restores_the_model_after_an_error():
    model = ee_model(MLP(2, 2), n=8)
    model.freeze_trunk()
    before = _state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with all_parameters_in_eval(model) as work:
            assert all(p.requires_grad for p in work.parameters()) and not work.training
            raise RuntimeError("inside")
    assert _state(model) == before


def test_keep_freed_memory_takes_effect_on_glibc():
    import platform
    import subprocess
    import sys

    code = ("from global_convergence.allocator import keep_freed_memory; "
            "print(keep_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(platform.libc_ver()[0] == "glibc")


def test_keeping_freed_memory_stops_numpys_huge_page_advice():
    import platform
    import subprocess
    import sys

    code = ("import numpy; m = getattr(numpy, '_core', None) or numpy.core; m = m.multiarray; "
            "from global_convergence.allocator import keep_freed_memory; "
            "kept = keep_freed_memory(); print(kept, m._set_madvise_hugepage(True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kept, advised = out.stdout.split()
    assert kept == str(platform.libc_ver()[0] == "glibc")
    assert advised == str(kept != "True")        # the advice was off exactly when memory is kept
