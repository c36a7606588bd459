"""Benchmark of the empirical NTK (SPEC §4): structured method vs torch.func alternatives.

Measures, in one run, for the SPEC's ``mlp`` (2 → 300 → 300 → 300 → 1, softplus β=100,
d = 181,801) at n ∈ {250, 500, 1000, 2000}, float32:

* ``structured``  — ``empirical_ntk(method="structured")`` (the default): per-layer sums;
* ``vmap(jacrev)``— the torch.func tutorial's Jacobian contraction: ``vmap(jacrev)`` for all of
  J, then ``J Jᵀ`` (skipped when J would exceed ``BASELINE_MAX_BYTES``);
* ``jacobian``    — ``empirical_ntk(method="jacobian")``: the same torch.func Jacobian, chunked,
  subnormals zeroed, one symmetric product (the best torch.func alternative found here);
* ``ntvp``        — ``empirical_ntk(method="ntvp")``: vmapped vjp → jvp column blocks (the
  tutorial's NTK-vector-product route), skipped when projected beyond ``SLOW_SECONDS``;

each with its relative Frobenius error against a float64 reference (float64 structured; checked
against float64 ``jacobian`` at the smallest n). The table is printed twice: with the caller's
``torch.set_flush_denormal`` off (PyTorch's default) and on — the library's results must not
depend on it. Then a small ResNet-like convolutional case (eval-mode and train-mode batch norm).

Usage::

    PYTHONPATH=src python benchmarks/bench_ntk.py            # full run (a few minutes, 2 cores)
    PYTHONPATH=src python benchmarks/bench_ntk.py --quick    # n ∈ {250, 500}, no conv case

The machine load (``os.getloadavg``) is printed: timings on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from global_convergence.ntk import empirical_ntk

MLP_SIZES = (250, 500, 1000, 2000)
CONV_SIZES = (64, 128, 256)
REPEATS = 5
"""Timed repetitions of the fast methods (the minimum is reported); slow ones run once."""
BASELINE_MAX_BYTES = 6 * 2**30
"""Skip vmap(jacrev) + J Jᵀ when its Jacobian (× 2 for intermediate copies) exceeds this."""
SLOW_SECONDS = 60.0
"""Skip an O(n²)-pass method when its time projected from the previous n exceeds this."""


def spec_mlp(m: int = 1) -> nn.Module:
    """The SPEC §2 ``mlp``: input 2 → 300 → 300 → 300 → m, softplus(β=100)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 300), nn.Softplus(beta=100), nn.Linear(300, 300),
                         nn.Softplus(beta=100), nn.Linear(300, 300), nn.Softplus(beta=100),
                         nn.Linear(300, m))


class BasicBlock(nn.Module):
    """ResNet basic block with softplus: conv-bn-σ-conv-bn + shortcut, σ."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        h = F.softplus(self.bn1(self.conv1(x)), beta=100)
        return F.softplus(self.bn2(self.conv2(h)) + self.short(x), beta=100)


def resnet_like(m: int = 2) -> nn.Module:
    """A small CIFAR-style ResNet: 3×3 stem (16), blocks 16 → 16 → 32 (stride 2), GAP, FC."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                         nn.Softplus(beta=100), BasicBlock(16, 16, 1), BasicBlock(16, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, m))


def vmap_jacrev_ntk(model: nn.Module, x: Tensor) -> Tensor:
    """The torch.func tutorial's NTK: all of J by ``vmap(jacrev)``, then ``J Jᵀ`` (SPEC order)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    J = torch.cat([j.flatten(2) for j in jac.values()], dim=2)          # (n, m, d)
    J = J.transpose(0, 1).reshape(-1, J.shape[2])
    return J @ J.T


Method = Callable[[nn.Module, Tensor], Tensor]
METHODS: dict[str, Method] = {
    "structured": lambda model, x: empirical_ntk(model, x, method="structured"),
    "auto": lambda model, x: empirical_ntk(model, x),
    "vmap(jacrev)": vmap_jacrev_ntk,
    "jacobian": lambda model, x: empirical_ntk(model, x, method="jacobian"),
    "ntvp": lambda model, x: empirical_ntk(model, x, method="ntvp"),
}
"""The timed NTK routes; each takes ``(model, x)`` and returns the ``n·m × n·m`` NTK."""


def timed(name: str, model: nn.Module, x: Tensor, repeats: int) -> tuple[float, Tensor]:
    """Minimum wall time of ``METHODS[name]`` over ``repeats`` calls, and its last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = METHODS[name](model, x)
        best = min(best, time.perf_counter() - t0)
    return best, out


def warm_up(model: nn.Module, x: Tensor) -> None:
    """One untimed call of every method on a few samples (torch.func's first-call costs)."""
    for name in METHODS:
        METHODS[name](model, x[:8])


def rel_err(a: Tensor, ref: Tensor) -> float:
    """Relative Frobenius error of ``a`` against the float64 ``ref``."""
    return float((a.double() - ref).norm() / ref.norm())


class Projector:
    """Skips an O(n²)-pass method whose time, projected from its last run, exceeds SLOW_SECONDS."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, float]] = {}

    def allows(self, name: str, n: int) -> bool:
        if name not in self.last:
            return True
        n0, t0 = self.last[name]
        return t0 * (n / n0) ** 2 <= SLOW_SECONDS

    def record(self, name: str, n: int, t: float) -> None:
        self.last[name] = (n, t)


def cell(name: str, model: nn.Module, x: Tensor, ref: Tensor, base: float | None,
         repeats: int = 1, skip: str = "") -> tuple[str, float | None]:
    """``time  err  ratio`` for one method (or why it was skipped), and its time."""
    width = max(len(name), 8)
    if skip:
        return f"{'skip: ' + skip:>{width}} {'':8} {'':7}", None
    t, k = timed(name, model, x, repeats)
    ratio = f"{t / base:6.1f}x" if base else ""
    return f"{t:{width}.4f} {rel_err(k, ref):8.1e} {ratio:>7}", t


def header(names: list[str]) -> str:
    return " | ".join(f"{name:>{max(len(name), 8)}} {'err':>8} {'ratio':>7}" for name in names)


def mlp_table(sizes: tuple[int, ...], flush: bool, refs: dict[int, Tensor]) -> None:
    """One table of the mlp with the caller's flush-denormal setting ``flush``."""
    torch.set_flush_denormal(flush)
    model = spec_mlp()
    d = sum(p.numel() for p in model.parameters())
    print(f"\n== mlp 2-300-300-300-1, softplus(100), d={d:,}, float32, caller flush_denormal="
          f"{flush}, threads={torch.get_num_threads()}, load={os.getloadavg()[0]:.2f}")
    others = ["vmap(jacrev)", "jacobian", "ntvp"]
    print(f"{'n':>5} | " + header(["structured"] + others))
    proj = Projector()
    for n in sizes:
        x = torch.rand(n, 2, generator=torch.Generator().manual_seed(n)) * 2 - 1
        if n not in refs:
            refs[n] = empirical_ntk(model, x, method="structured", dtype=torch.float64)
        text, t_s = cell("structured", model, x, refs[n], None, REPEATS)
        cells = [f"{n:>5}", text]
        for name in others:
            too_big = name == "vmap(jacrev)" and 2 * n * d * 4 > BASELINE_MAX_BYTES
            skip = "memory" if too_big else ("time" if not proj.allows(name, n) else "")
            text, t = cell(name, model, x, refs[n], t_s, skip=skip)
            if t is not None:
                proj.record(name, n, t)
            cells.append(text)
        print(" | ".join(cells), flush=True)
    torch.set_flush_denormal(False)


def reference_check(n: int) -> None:
    """float64 structured vs float64 jacobian: validates the reference used in the tables."""
    model = spec_mlp()
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(n)) * 2 - 1
    a = empirical_ntk(model, x, method="structured", dtype=torch.float64)
    b = empirical_ntk(model, x, method="jacobian", dtype=torch.float64)
    print(f"reference check n={n}: float64 structured vs float64 jacobian, relative Frobenius "
          f"difference {rel_err(a, b):.1e}")


def conv_table(sizes: tuple[int, ...]) -> None:
    """The ResNet-like model on 3×16×16 inputs, m=2 outputs, eval- and train-mode batch norm.

    ``auto`` is the structured method in eval mode and the whole-batch Jacobian in train mode.
    """
    model = resnet_like()
    d = sum(p.numel() for p in model.parameters())
    warm = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()(warm)
    model.eval()
    warm_up(model, warm)
    print(f"\n== ResNet-like (stem 16, blocks 16/32, GAP, FC→2), 3×16×16, d={d:,}, float32, "
          f"load={os.getloadavg()[0]:.2f}")
    print(f"{'n':>5} {'BN':>5} | " + header(["auto", "vmap(jacrev)", "jacobian"]))
    for n in sizes:
        x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(n))
        for mode in ("eval", "train") if n == sizes[0] else ("eval",):
            model.train(mode == "train")
            ref = empirical_ntk(model, x, method="jacobian", dtype=torch.float64)
            text, t_a = cell("auto", model, x, ref, None, 3 if mode == "eval" else 1)
            cells = [f"{n:>5} {mode:>5}", text]
            skip = "coupled" if mode == "train" else ""   # per-sample vmap would be wrong
            cells.append(cell("vmap(jacrev)", model, x, ref, t_a, skip=skip)[0])
            cells.append(cell("jacobian", model, x, ref, t_a)[0])
            print(" | ".join(cells), flush=True)
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n ∈ {250, 500}, no conv case")
    args = parser.parse_args()
    sizes = MLP_SIZES[:2] if args.quick else MLP_SIZES
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; times in seconds (minimum of "
          f"{REPEATS} runs for structured/auto, else one run); ratio = time / structured (auto) "
          "time; err = relative Frobenius error vs float64")
    refs: dict[int, Tensor] = {}
    warm_up(spec_mlp(), torch.rand(8, 2))
    reference_check(sizes[0])
    for flush in (False, True):
        mlp_table(sizes, flush, refs)
    if not args.quick:
        conv_table(CONV_SIZES)


if __name__ == "__main__":
    main()
