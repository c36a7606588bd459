"""The Gram certificate split over torch.distributed ranks decides what one process decides.

Two gloo ranks (two plain processes joined through a file store, one intra-op thread each) run
:func:`distributed_factor_rank_verdict` on factors the test writes to disk; the verdicts are
compared with :func:`factor_rank_verdict` in this process on the same factors. The per-rank memory
budget given to the ranks is below what the one-process blocked factorisation needs (checked: with
that budget one process cannot run the certificate), and the block width makes 8-10 block columns,
so the split is forced and panels travel between the ranks.

Cases: a well-conditioned Khatri-Rao ``ϕ`` and a dense ``[h_X, 1]``-like matrix (*verified* by the
certificate); the same with a repeated row / a rank-450 product, where the certificate must break
down at the same row as in one process and the factor route decides *not-verified*; and the
repeated row without room for the factor route, *inconclusive* with the certified rows as the
lower bound. ``gconv verify safe-exploration`` started on 2 ranks (as torchrun starts them: the
environment names rank, world and rendezvous) reports, on rank 0 only, the verdict one process
reports. Tolerance and margin are computed from ``σ_max``, which rank 0 computes with one
thread and this process with one too: they must agree to 1e-12 relative against the same
blocked layout in one process (to the Lanczos tolerance against its default dense layout);
verdict word, rank, methods and breakdown row exactly.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from global_convergence.cli import main as gconv
from global_convergence.linalg import DenseFactor, KhatriRaoFactor, factor_rank_verdict
from global_convergence.linalg.cholesky import blocked_bytes, shifted_cholesky
from global_convergence.linalg.distributed_cholesky import (distributed_bytes,
                                                           distributed_shifted_cholesky)
from global_convergence.linalg.distributed_rank import default_block

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

WORLD = 2
BLOCK = 40
LAUNCH_TIMEOUT = 60
"""Seconds a 2-rank launch of the linear algebra may take (measured 20-24 s at load 9-11 on 2
cores, mostly importing torch), so that a bug cannot hang the suite."""
CLI_TIMEOUT = 180
"""The same for two ``gconv verify`` processes (measured 39-43 s at load 8-11 on 2 cores)."""
RTOL = 1e-12
"""Figures computed the same way on the ranks and in one process (the same blocked layout)."""
LANCZOS_RTOL = 1e-8
"""Figures that rest on ``σ_max`` where one process may take it by another route (Lanczos on a
formed dense Gram rather than on products): the Lanczos tolerance of :mod:`.rank`."""
SAME = ("verdict", "rank", "n", "precision", "methods", "agree", "shape", "cholesky_failed_at")
CLOSE = ("tolerance", "margin", "sigma_max", "cholesky_shift", "certified_sigma_min_lower_bound",
         "largest_dropped")

DRIVER = '''
import json, sys
import torch
import torch.distributed as dist
from global_convergence.linalg import DenseFactor, KhatriRaoFactor
from global_convergence.linalg.distributed_cholesky import distributed_shifted_cholesky
from global_convergence.linalg.distributed_rank import distributed_factor_rank_verdict

rank, world, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
tensors = torch.load(f"{root}/factors.pt")
cases = json.loads(open(f"{root}/cases.json").read())
groups = {tuple(c["members"]): dist.new_group(c["members"])      # every rank creates each group
          for c in cases.values() if "members" in c}
out = {}
for name, case in cases.items():
    members = case.get("members")
    if members is not None and rank not in members:
        continue
    parts = tensors[case["factor"]]
    factor = KhatriRaoFactor(*parts) if len(parts) == 2 else DenseFactor(parts[0])
    group = None if members is None else groups[tuple(members)]
    out[name] = distributed_factor_rank_verdict(factor, group=group, **case["options"]).to_dict()
    if name == "kr-full":
        held = distributed_shifted_cholesky(factor, out[name]["cholesky_shift"],
                                            case["options"]["block"])
        out["held"] = held.factor.local_numel()
open(f"{root}/rank{rank}.json", "w").write(json.dumps(out))
dist.destroy_process_group()
'''


def khatri_rao(n: int, m_s: int, m_z: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, m_s, generator=g, dtype=torch.float64),
            torch.randn(n, m_z, generator=g, dtype=torch.float64))


def factors() -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs of every case: ``(s, z)`` of a Khatri-Rao factor or ``(a,)`` of a dense one."""
    s, z = khatri_rao(480, 16, 32, seed=0)
    s_rep, z_rep = s.clone(), z.clone()
    s_rep[337], z_rep[337] = s[100], z[100]           # ϕ_337 = ϕ_100: rank 479
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 520, generator=g, dtype=torch.float64)
    low = torch.randn(400, 330, generator=g, dtype=torch.float64) @ torch.randn(
        330, 520, generator=g, dtype=torch.float64)  # rank 330
    # positive gates near 0.5 and features on a large common mean (trained features): the plain
    # certificate's floor hides λ_min, the preconditioned one decides
    z_mean = torch.randn(480, 48, generator=g, dtype=torch.float64) + 1e5 * torch.rand(
        48, generator=g, dtype=torch.float64)
    s_mean = 0.5 + 1e-2 * torch.randn(480, 24, generator=g, dtype=torch.float64)
    return {"kr": (s, z), "kr-repeated": (s_rep, z_rep), "dense": (a,), "dense-low": (low,),
            "kr-mean": (s_mean, z_mean)}


def build(parts: tuple[torch.Tensor, ...]):
    return KhatriRaoFactor(*parts) if len(parts) == 2 else DenseFactor(parts[0])


def per_rank_budget(n: int, world: int = WORLD) -> int:
    """What the busiest rank needs: less than one process's blocked factorisation."""
    return max(distributed_bytes(n, BLOCK, 8, world))


def case(tensors, name: str, world: int = WORLD, **extra) -> dict:
    n = tensors[name][0].shape[0]
    return {"factor": name, "options": {"block": BLOCK, "memory_budget_per_rank":
                                        per_rank_budget(n, world), **extra}}


def cases(tensors) -> dict[str, dict]:
    return {"kr-full": case(tensors, "kr"), "kr-repeated": case(tensors, "kr-repeated"),
            "kr-repeated-no-factor-route": case(tensors, "kr-repeated", factor_memory_budget=1),
            "dense-full": case(tensors, "dense"), "dense-low": case(tensors, "dense-low"),
            "kr-mean": case(tensors, "kr-mean"),
            "kr-too-large": {"factor": "kr", "options": {"block": BLOCK,
                                                         "memory_budget_per_rank": 10_000}}}


def launch(root: Path, world: int, spec: dict, tensors) -> list[dict]:
    """Run the driver on ``world`` gloo ranks; each rank's results."""
    torch.save(tensors, root / "factors.pt")
    (root / "cases.json").write_text(json.dumps(spec))
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    logs = [(root / f"rank{r}.log").open("w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(root / "driver.py"), str(r), str(world),
                               str(root)], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    try:
        codes = [p.wait(timeout=LAUNCH_TIMEOUT * world / 2) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    for r, code in enumerate(codes):
        assert code == 0, f"rank {r} failed:\n{(root / f'rank{r}.log').read_text()[-4000:]}"
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case decided on 2 gloo ranks: ``(cases, inputs, [rank 0's results, rank 1's])``."""
    tensors = factors()
    spec = cases(tensors)
    return spec, tensors, launch(tmp_path_factory.mktemp("distchol"), WORLD, spec, tensors)


def one_process(spec: dict, tensors, **layout) -> dict:
    """The one-process verdict, with one intra-op thread as each rank has (rounding-level
    singular values, which a *not-verified* margin reports, depend on the BLAS's split)."""
    options = {k: v for k, v in spec["options"].items()
               if k not in ("block", "memory_budget_per_rank")}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return factor_rank_verdict(build(tensors[spec["factor"]]), **options, **layout).to_dict()
    finally:
        torch.set_num_threads(previous)


def assert_same_verdict(two: dict, one: dict, smallest_rtol: float, rtol: float = RTOL) -> None:
    for key in SAME:
        assert two.get(key) == one.get(key), f"{key}: {two.get(key)!r} vs {one.get(key)!r}"
    for key in CLOSE:
        a, b = two.get(key), one.get(key)
        assert (a is None) == (b is None), f"{key}: {a!r} vs {b!r}"
        if a is not None:
            assert math.isclose(a, b, rel_tol=rtol), f"{key}: {a!r} vs {b!r}"
    a, b = two["smallest_kept"], one["smallest_kept"]
    assert (a is None) == (b is None) and (a is None or math.isclose(a, b, rel_tol=smallest_rtol))


def layout(result: dict) -> str:
    """The layout of the factorisation that decided: the plain certificate's, else the
    preconditioned one's."""
    return result.get("cholesky_layout") or result["preconditioned"]["cholesky_layout"]


EXPECTED = {"kr-full": ("verified", 480), "kr-repeated": ("not-verified", 479),
            "kr-repeated-no-factor-route": ("inconclusive", 337),
            "dense-full": ("verified", 400), "dense-low": ("not-verified", 330),
            "kr-mean": ("verified", 480)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_ranks_decide_what_one_process_decides(two_ranks, name):
    spec, tensors, results = two_ranks
    two = results[0][name]
    assert (two["verdict"], two["rank"]) == EXPECTED[name]
    assert two["world_size"] == WORLD and "gram-cholesky-distributed" in two["route"]
    assert layout(two) == "distributed-blocked"
    # the same blocked layout in one process: the same arithmetic, so the same figures
    assert_same_verdict(two, one_process(spec[name], tensors, block=BLOCK), 1e-10)
    # the default one-process layout (the dense Gram at this size)
    dense = one_process(spec[name], tensors)
    assert layout(dense) == "dense"
    assert_same_verdict(two, dense, 1e-6, LANCZOS_RTOL)


def test_the_preconditioned_certificate_decides_on_the_ranks_as_in_one_process(two_ranks):
    spec, tensors, results = two_ranks
    two = results[0]["kr-mean"]
    # it lowers the trace enough to go first, on the ranks as in one process
    assert two["route"] == "preconditioned-gram-cholesky-distributed"
    assert two["methods"] == {"preconditioned_cholesky": 480}
    one = one_process(spec["kr-mean"], tensors)
    assert one["route"] == "preconditioned-gram-cholesky"
    for key in ("norm_bound", "forming_error", "trace_ratio", "certified_sigma_min_lower_bound",
                "sigma_n_estimate"):
        assert math.isclose(two["preconditioned"][key], one["preconditioned"][key], rel_tol=1e-6)


def test_over_the_budget_per_rank_the_factor_route_decides_as_in_one_process(two_ranks):
    spec, tensors, results = two_ranks
    two = results[0]["kr-too-large"]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = factor_rank_verdict(build(tensors["kr"]), gram_memory_budget=10_000, block=BLOCK)
    finally:
        torch.set_num_threads(previous)
    assert two["cholesky_layout"] == one.details["cholesky_layout"] == "too-large"
    assert two["route"] == "gram-cholesky-distributed+factor-svd-qr"
    assert any("GiB on some rank" in note for note in two["notes"])
    assert two["verdict"] == "verified" and two["methods"] == {"svd": 480, "qr": 480}
    assert_same_verdict(two, one.to_dict(), 1e-6, LANCZOS_RTOL)


@pytest.mark.parametrize("name", sorted(EXPECTED) + ["kr-too-large"])
def test_every_rank_returns_the_same_verdict(two_ranks, name):
    _, _, results = two_ranks
    first, second = ({k: v for k, v in r[name].items() if k != "seconds"} for r in results)
    assert first == second


def test_the_budget_forces_the_split(two_ranks):
    spec, tensors, results = two_ranks
    n = tensors["kr"][0].shape[0]
    budget = spec["kr-full"]["options"]["memory_budget_per_rank"]
    triangle = sum((n - k0) * min(BLOCK, n - k0) for k0 in range(0, n, BLOCK))
    assert n // BLOCK >= 8 and budget < 8 * triangle <= blocked_bytes(n, BLOCK, 8)
    alone = factor_rank_verdict(build(tensors["kr"]), gram_memory_budget=budget, block=BLOCK,
                                factor_memory_budget=1)
    assert alone.details["cholesky_layout"] == "too-large" and alone.verdict == "inconclusive"
    assert results[0]["kr-full"]["cholesky_bytes_per_rank"] == distributed_bytes(n, BLOCK, 8, 2)
    # each rank held the block columns of L it owns and no more: about half the triangle each
    held = [r["held"] for r in results]
    assert sum(held) == triangle and max(held) < 0.6 * triangle


def test_one_rank_factorises_as_the_one_process_blocked_layout():
    s, z = khatri_rao(300, 10, 40, seed=3)
    factor = KhatriRaoFactor(s, z)
    one, split = shifted_cholesky(factor, 1e-3, 48), distributed_shifted_cholesky(factor, 1e-3, 48)
    assert split.success and len(split.factor.panels) == len(one.factor.panels) == 7
    for k, (k0, panel) in enumerate(one.factor.panels):
        assert torch.equal(split.factor.panels[k], panel)
    assert split.factor.smallest_eigenvalue_estimate() == one.factor.smallest_eigenvalue_estimate()
    s[250], z[250] = s[7], z[7]
    repeated = KhatriRaoFactor(s, z)
    assert distributed_shifted_cholesky(repeated, 1e-3, 48).failed_at == 250
    assert shifted_cholesky(repeated, 1e-3, 48).failed_at == 250


def test_shares_cover_the_triangle_and_balance():
    n, block = 73_257, 4096
    triangle = sum((n - k0) * min(block, n - k0) for k0 in range(0, n, block))
    for world in (2, 4, 8):
        need = distributed_bytes(n, block, 8, world)
        extra = (n + 8192) * block * 8                # a received panel + a solve chunk
        assert sum(b - extra for b in need) == triangle * 8
        assert max(need) - extra < 1.6 * triangle * 8 / world
    assert default_block(8000, 2) == 1000 and default_block(600, 2) == 256
    assert default_block(73_257, 4) == 4096


VERIFY = ["verify", "safe-exploration", "--data", "digits", "--model", "mlp", "--n", "400",
          "--precision", "float64", "--json"]     # the route ranks take: float64 features


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gconv_verify_on_two_ranks_reports_the_one_process_verdict(tmp_path, capsys):
    port = free_port()
    procs, logs = [], []
    for r in range(WORLD):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(tmp_path / f"rank{r}.err")
        procs.append(subprocess.Popen([sys.executable, "-m", "global_convergence", *VERIFY],
                                      stdout=subprocess.PIPE, stderr=logs[r].open("w"), env=env,
                                      text=True))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gconv(VERIFY) == 0                 # the one-process reference, meanwhile
        outputs = [p.communicate(timeout=CLI_TIMEOUT)[0] for p in procs]
    finally:
        torch.set_num_threads(previous)
        for p in procs:
            if p.poll() is None:
                p.kill()
    one = json.loads(capsys.readouterr().out)
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r].read_text()[-4000:]}"
    assert outputs[1] == ""                       # only rank 0 reports
    two = json.loads(outputs[0])
    # features at initialisation: the plain certificate decides
    assert (two["world_size"], two["route"], layout(two)) == (
        WORLD, "gram-cholesky-distributed", "distributed-blocked")
    assert one["route"] == "gram-cholesky" and "world_size" not in one
    assert_same_verdict(two, one, 1e-6, LANCZOS_RTOL)
    assert two["verdict"] == "verified" and two["q"] == one["q"]


def test_three_ranks_and_a_subgroup_decide_what_one_process_decides(tmp_path):
    """Block columns dealt over 3 ranks (one rank neither sends nor looks ahead at each step),
    and the certificate on the subgroup of ranks 0 and 2 (group rank 1 is global rank 2) while
    rank 1 sits out."""
    tensors = {k: v for k, v in factors().items() if k.startswith("kr")}
    spec = {"kr-full": case(tensors, "kr", 3), "kr-repeated": case(tensors, "kr-repeated", 3),
            "kr-full-sub": {**case(tensors, "kr"), "members": [0, 2]},
            "kr-repeated-sub": {**case(tensors, "kr-repeated"), "members": [0, 2]}}
    results = launch(tmp_path, 3, spec, tensors)
    assert "kr-full-sub" not in results[1]
    for name, world in (("kr-full", 3), ("kr-repeated", 3), ("kr-full-sub", 2),
                        ("kr-repeated-sub", 2)):
        members = spec[name].get("members", range(3))
        first, *others = (results[r][name] for r in members)
        assert first["world_size"] == world
        assert all({k: v for k, v in o.items() if k != "seconds"}
                   == {k: v for k, v in first.items() if k != "seconds"} for o in others)
        assert_same_verdict(first, one_process(spec[name], tensors, block=BLOCK), 1e-10)
    assert results[0]["kr-repeated"]["cholesky_failed_at"] == 337
