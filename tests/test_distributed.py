"""Two processes under ``torchrun`` (gloo, CPU) train what one process trains (DDP).

``--batch-size`` is the global batch: both ranks draw the same global batch and take every second
index of it, so 1 and 2 processes see the same batches, perturbations and gates. Two 2-rank launches
run at once: ``python -m torch.distributed.run --nproc_per_node=2 -m global_convergence train`` for
EE, and a driver script that runs the same ``gconv train`` entry point (``cli.main``) for
two-phase, stops two more 2-rank runs early (one before, one after the switch) so that their
checkpoints can be resumed in one process, and checks batch norm in float64. (Start-up dominates:
each launch imports torch in three processes.)

Tolerance. One process and two cannot agree bit for bit: with two ranks the gradient of the global
batch is the sum of two half-batch sums (added by DDP's all-reduce) instead of one sum over the
batch, the evaluation adds per-chunk sums, and torchrun's workers run one intra-op thread, so
float32 rounding differs at the level of a few ulp (~1e-7 relative) in every step. Over the 24
steps here those differences stay at that level: measured, the final losses agree to 5e-8
(two-phase) and 6e-9 (ee) relative, and so does the 1-process resume of a 2-rank checkpoint. We
require ``RTOL = 1e-5``: over 100x the measured figure, and far below what a real mistake does
(measured on the same runs): a wrong loss scale (ranks averaging instead of summing their shares,
i.e. half the step) moves the final loss by 22-29 %, a perturbation 5 % larger (eps, delta0 =
0.021 instead of 0.02) by 2e-4 (ee) to 1.3e-3 (two-phase), so a perturbation or gates drawn
differently on some rank would not pass. The float64 check of :class:`GlobalBatchNorm` has no
such rounding and is held to 1e-12.

The global batch of 25 splits 13 / 12 across the ranks (unequal shares), and the driver's runs
use chunks of 16 samples for evaluation and the feature cache, so that chunks are spread over both
ranks and reassembled. The driver's two-phase run keeps its phase-2 features on disk
(``--feature-cache disk``: chunks computed on both ranks, broadcast, each rank writing its own
file), the 1-process reference in memory.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from global_convergence.cli import main as gconv
from global_convergence.training import CHECKPOINT_NAME, TrainConfig, load_checkpoint, loop, train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

RTOL = 1e-5
COMMON = dict(data="two-moons", model="mlp", epochs=6, batch_size=25, lr=0.1, eps=0.02, delta0=0.02)
"""n = 100, 4 steps per epoch, 24 steps, switch at step round(0.6 * 24) = 14."""
STOPS = {"two-phase": 9, "ee": 18}
"""The driver's runs stop after these steps: before the switch (two-phase), after it (ee)."""
PARTIAL = {"two-phase": {}, "ee": {"cache_features": False}}
"""The stopped EE run recomputes the frozen trunk under DDP (phase 2 without the feature cache);
it is resumed that way and compared with the cached 1-process run."""
LAUNCH_TIMEOUT = 900
AUTO = {**COMMON, "method": "ee", "batch_size": 0, "epochs": None, "steps": 8, "tau": 4,
        "momentum": 0.0, "weight_decay": 0.0, "exploit_lr": "auto"}
"""EE at the certificate's step 1/L: rank 0 certifies, every rank must take its step."""

BN_CHECK = '''
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from global_convergence.training.distributed import globalise_batchnorm, synchronised_batchnorm

def bn_gradients(ctx=None):
    """Gradients and buffers of a small batch-norm net on 10 samples, float64: in one process
    with nn.BatchNorm*, or as this rank's share (every second sample) with GlobalBatchNorm."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Softplus(beta=100),
                        nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.Softplus(beta=100),
                        nn.Flatten(), nn.Linear(16, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(10, 1, generator=g, dtype=torch.float64)
    if ctx is None:
        ((net(x) - y).pow(2).sum() / 10).backward()
    else:
        globalise_batchnorm(net)
        ddp = DistributedDataParallel(net)
        share = torch.arange(10)[ctx.rank::ctx.world]
        with synchronised_batchnorm():
            out = ddp(x[share])
        ((out - y[share]).pow(2).sum() * ctx.world / 10).backward()
    return (torch.cat([p.grad.flatten() for p in net.parameters()]),
            torch.cat([b.double().flatten() for b in net.buffers()]))
'''

DRIVER = BN_CHECK + '''
import json, os, sys
from global_convergence.cli import main
from global_convergence.training import TrainConfig, evaluation, train, loop
from global_convergence.training.distributed import init_distributed

loop.plot_run = lambda *args, **kwargs: []
spec = json.loads(sys.argv[1])
evaluation.EVAL_CHUNK = 16
assert main(spec["cli"]) == 0
for name, (options, stop) in spec["runs"].items():
    train(TrainConfig(**options), os.path.join(spec["root"], name), progress=False, stop_after=stop)
ctx = init_distributed("cpu")
grads = bn_gradients(ctx)
if ctx.rank == 0:
    torch.save(grads, os.path.join(spec["root"], "bn-two-ranks.pt"))
'''


def cli_args(method: str, out: Path, *extra: str) -> list[str]:
    args = ["train", "--method", method, "--out", str(out), "--quiet", *extra]
    for key, value in COMMON.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def torchrun(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *args]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait(process: subprocess.Popen, log: Path) -> None:
    try:
        code = process.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert code == 0, f"torchrun failed with status {code}:\n{log.read_text()[-4000:]}"


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def losses(folder: Path) -> dict[int, float]:
    import csv
    with (folder / "metrics.csv").open() as handle:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All 2-rank launches at once (they overlap their start-up), the 1-process references
    in-process meanwhile."""
    root = tmp_path_factory.mktemp("ddp")
    log = root / "ee-two-ranks.log"
    ee = cli_args("ee", root / "ee-2", "--n", "100")       # torchrun needs "--" before "--n"
    launches = [(torchrun(["-m", "global_convergence", "train", "--", *ee[1:]], log), log)]
    log = root / "launcher.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    own = [sys.executable, "-m", "global_convergence",
           *cli_args("ee", root / "ee-launcher", "--n", "100", "--nproc-per-node", "2")]
    launches.append((subprocess.Popen(own, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env),
                     log))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    spec = {"root": str(root), "cli": cli_args("two-phase", root / "two-phase-2", "--feature-cache", "disk"),
            "runs": {**{f"{m}-partial": ({**COMMON, **PARTIAL[m], "method": m}, stop)
                        for m, stop in STOPS.items()}, "ee-auto-2": (AUTO, None)}}
    log = root / "driver.log"
    launches.append((torchrun([str(driver), json.dumps(spec)], log), log))

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    saved_plot = loop.plot_run
    loop.plot_run = lambda *args, **kwargs: []
    try:
        for method in ("two-phase", "ee"):
            assert gconv(cli_args(method, root / f"{method}-1")) == 0
        train(TrainConfig(**AUTO), root / "ee-auto-1", progress=False)
        namespace: dict = {}
        exec(BN_CHECK, namespace)
        torch.save(namespace["bn_gradients"](), root / "bn-one-process.pt")
    finally:
        loop.plot_run = saved_plot
        torch.set_num_threads(previous)
        for process, log in launches:
            wait(process, log)
    return root


def assert_close(a: float, b: float, what: str) -> None:
    assert math.isclose(a, b, rel_tol=RTOL, abs_tol=RTOL * 1e-3), f"{what}: {a!r} vs {b!r}"


@pytest.mark.parametrize("method", ["two-phase", "ee"])
def test_two_ranks_train_what_one_process_trains(runs, method):
    one, two = summary(runs / f"{method}-1"), summary(runs / f"{method}-2")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["completed"] and two["steps"] == one["steps"] == 24
    assert two["switch_step"] == one["switch_step"] == 14
    assert_close(two["train_loss"], one["train_loss"], "final training loss")
    assert abs(two["train_error"] - one["train_error"]) <= 0.01      # at most 1 of 100 points
    curve_one, curve_two = losses(runs / f"{method}-1"), losses(runs / f"{method}-2")
    assert curve_one.keys() == curve_two.keys()
    for step in curve_one:
        assert_close(curve_two[step], curve_one[step], f"loss at step {step}")
    # the certificate at the switch is the same statement about the same state
    statement = lambda s: (s["certificate"]["condition"]["verdict"], s["certificate"]["condition"]["rank"],
                           s["certificate"]["assumptions"], s["certificate"]["bound"])
    assert statement(two) == statement(one)


def test_gconv_train_nproc_per_node_launches_the_same_two_rank_run(runs):
    """``gconv train --nproc-per-node 2`` (workers started through torch.distributed.run, with
    ``--n``, which torchrun's own parser refuses) trains what ``torchrun ... train -- ...`` does."""
    own, two, one = (summary(runs / name) for name in ("ee-launcher", "ee-2", "ee-1"))
    assert own["world_size"] == two["world_size"] == 2 and own["config"]["n"] == 100
    assert own["train_loss"] == two["train_loss"]           # the same two-rank computation
    assert_close(own["train_loss"], one["train_loss"], "launcher vs 1 process")
    assert losses(runs / "ee-launcher") == losses(runs / "ee-2")


def test_every_rank_takes_the_step_rank_zero_certified(runs):
    """``exploit_lr="auto"`` under DDP: the certificate is made on rank 0 and the other ranks'
    wrappers adopt it and its 1/L (without it they would refuse the phase-2 step)."""
    one, two = summary(runs / "ee-auto-1"), summary(runs / "ee-auto-2")
    assert two["world_size"] == 2 and two["completed"] and two["certificate"] is not None
    assert two["certificate"]["step_used"] == two["certificate"]["step_max"]
    assert math.isclose(two["certificate"]["step_used"], one["certificate"]["step_used"], rel_tol=RTOL)
    assert_close(two["train_loss"], one["train_loss"], "1/L steps on 2 ranks vs 1 process")
    state = load_checkpoint(runs / "ee-auto-2" / CHECKPOINT_NAME)
    assert state["wrapper"]["certificate"]["step_used"] == two["certificate"]["step_used"]


@pytest.mark.parametrize("method", ["two-phase", "ee"])
def test_one_checkpoint_written_by_rank_zero_loads_without_ddp_prefixes(runs, method):
    folder = runs / f"{method}-2"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "checkpoint"))) \
        == [CHECKPOINT_NAME]
    assert not list(folder.glob("feature-cache*"))      # the two-phase run's disk cache is gone
    state = load_checkpoint(folder / CHECKPOINT_NAME)
    assert not any(key.startswith("module.") for key in state["model"])
    assert state["step"] == 24 and state["config"]["method"] == method


@pytest.mark.parametrize("method", ["two-phase", "ee"])
def test_a_two_rank_checkpoint_resumes_in_one_process(runs, method, monkeypatch):
    """Stopped on two ranks (two-phase before the switch; ee after it, recomputing the frozen trunk
    under DDP), finished in one process: the whole curve and the end are the 1-process result."""
    monkeypatch.setattr(loop, "plot_run", lambda *args, **kwargs: [])
    folder = runs / f"{method}-partial"
    assert load_checkpoint(folder / CHECKPOINT_NAME)["step"] == STOPS[method]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train(TrainConfig(**COMMON, **PARTIAL[method], method=method), folder, resume=True,
                        progress=False)
    finally:
        torch.set_num_threads(previous)
    assert resumed["completed"] and resumed["world_size"] == 1
    one, two = summary(runs / f"{method}-1"), summary(runs / f"{method}-2")
    assert_close(resumed["train_loss"], one["train_loss"], "resumed vs 1 process")
    assert_close(resumed["train_loss"], two["train_loss"], "resumed vs 2 ranks")
    curve, reference = losses(folder), losses(runs / f"{method}-1")
    assert curve.keys() == reference.keys()
    for step in curve:
        assert_close(curve[step], reference[step], f"loss at step {step}")


def test_global_batchnorm_gives_the_one_process_gradient_in_float64(runs):
    """Batch norm over the global batch across ranks (gloo has no SyncBatchNorm): gradients and
    running statistics of 2 ranks equal those of one process on the whole batch."""
    g1, b1 = torch.load(runs / "bn-one-process.pt")
    g2, b2 = torch.load(runs / "bn-two-ranks.pt")
    assert torch.allclose(g2, g1, rtol=1e-12, atol=1e-12)
    assert torch.allclose(b2, b1, rtol=1e-12, atol=1e-12)


def _rank_zero_failure_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: rank 0's work fails; record what each rank raised."""
    from global_convergence.errors import NumericalError
    from global_convergence.training.distributed import DistContext, on_rank_zero
    from datetime import timedelta
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))      # a rank left waiting fails, not hangs
    ctx = DistContext(rank, 2, torch.device("cpu"))
    outcomes = []
    for failure in (ValueError("bad value on rank 0"), NumericalError("overflow on rank 0"), None):
        def work():
            if failure is not None:
                raise failure
            return "fine"
        try:
            outcomes.append(["returned", *map(str, on_rank_zero(ctx, work))])
        except Exception as exc:                   # noqa: BLE001 - recorded for the test
            outcomes.append(["raised", type(exc).__name__, str(exc)])
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))


def test_a_failure_on_rank_zero_reaches_every_rank_instead_of_hanging_them(tmp_path):
    """The certificate and the alignment checks run on rank 0 alone while the others wait for
    its broadcast: any failure there must end every rank (a hang would time the test out)."""
    import torch.multiprocessing as mp
    mp.start_processes(_rank_zero_failure_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero[0] == ["raised", "ValueError", "bad value on rank 0"]
    assert one[0] == ["raised", "RuntimeError", "rank 0 failed: ValueError: bad value on rank 0"]
    assert zero[1] == one[1] == ["returned", "None", "overflow on rank 0"]
    assert zero[2] == one[2] == ["returned", "fine", "None"]
