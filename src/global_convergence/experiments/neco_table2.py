"""[K22] Table 2: verification of the safe-exploration condition (Assumption 10) for ResNet-18.

As the paper did: the EE model of ``resnet18`` (head width ``m_H = ⌈2n / m_{H−1}⌉``,
``m_{H−1} = 513``), a He-initialised trunk, one ``q ~ N(0, 1)``, and the rank of
``ϕ(q, θ(1:H−2)) ∈ R^{n × m_H m_{H−1}}`` decided — this is exactly
``gconv verify safe-exploration --model resnet18`` (:func:`.verify.verify`). The trunk's
batch-norm statistics are recomputed over the inputs first (what the wrappers do at the switch);
each data set is also checked with the default statistics (mean 0, variance 1), to show what this
changes (docs/verifiers.md "Batch norm at initialisation").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import ee_head_width
from .report import Report, as_dict, md_table, write_results
from .standins import data_arg, data_note, paper_row, require_datasets
from .subruns import Context, cached_result
from .verify import verify

TITLE = "[K22] Table 2: verification of the safe-exploration condition (Assumption 10)"
SOURCE = "Kawaguchi, Neural Computation 34(4) 2022, §3.4.2, Table 2"
TRUNK_FEATURES = 512
"""ResNet-18's pooled features: m_{H−1} = 512 + the constant neuron = 513."""

PAPER = {  # data set -> (n, m_{H-1}, m_H, verdict); Semeion's m_H is lost in our text copy
    "mnist": (60000, 513, 234, "verified"), "cifar10": (50000, 513, 195, "verified"),
    "cifar100": (50000, 513, 195, "verified"), "semeion": (1000, 513, None, "verified"),
    "kmnist": (60000, 513, 234, "verified"), "svhn": (73257, 513, 286, "verified"),
}


@dataclass(frozen=True)
class Table2Settings:
    """(data set, n) pairs; ``n=None`` keeps the whole training split. ``seed`` draws the He
    initialisation of the trunk, the head and q."""

    datasets: tuple[tuple[str, int | None], ...] = (
        ("mnist", None), ("cifar10", None), ("cifar100", None), ("semeion", None),
        ("kmnist", None), ("svhn", None))
    seed: int = 0


PRESETS = {
    "smoke": Table2Settings(datasets=(("digits", 40),)),
    "cpu": Table2Settings(datasets=(("digits", 1000),)),
    "paper": Table2Settings(),
}


BATCHNORM = ("recompute", "model")
"""Statistics each data set is checked with: recomputed over the inputs, and the defaults."""


def check(ctx: Context, name: str, n: int | None, seed: int,
          batchnorm: str = "recompute") -> dict[str, Any]:
    """The verdict of one data set (computed once, then reused from ``runs/<name>/``)."""
    def compute() -> dict[str, Any]:
        verdict = verify("safe-exploration", data=data_arg(ctx, name), model="resnet18", n=n,
                         seed=seed, data_root=ctx.data_root, device=ctx.device,
                         batchnorm=batchnorm)
        return {"dataset": name, "batchnorm": batchnorm, "verdict": verdict.to_dict()}
    return cached_result(ctx, f"safe-exploration-{name}-n{n or 'all'}-s{seed}-bn{batchnorm}",
                         compute)


def row(name: str, result: dict[str, Any], default: dict[str, Any]) -> list[Any]:
    v, d = result["verdict"], default["verdict"]
    n = v["n"]
    paper_name = paper_row(name)
    p_n, p_prev, p_width, p_verdict = PAPER.get(paper_name, (None, None, None, None))
    label = name if paper_name == name else f"{name} (stand-in for {paper_name})"
    width = ee_head_width(n, TRUNK_FEATURES)
    seconds = sum((v.get("seconds") or {}).values())
    return [label, p_n, n, p_prev, TRUNK_FEATURES + 1, p_width, width, p_verdict,
            f"**{v['verdict']}**", f"{v['rank']} / {n}", v.get("methods"),
            _margin(v), f"{seconds:.0f}", f"{d['verdict']} ({d['rank']} / {n})"]


def _margin(v: dict[str, Any]) -> str:
    kept, dropped, tol = v.get("smallest_kept"), v.get("largest_dropped"), v.get("tolerance")
    parts = [f"σ_min kept {kept:.2e}" if kept is not None else None,
             f"tol {tol:.1e}" if tol is not None else None,
             f"max dropped {dropped:.1e}" if dropped is not None else None]
    return ", ".join(p for p in parts if p)


def run(ctx: Context, s: Table2Settings) -> Path:
    """Check Assumption 10 on every data set of the preset; tabulate beside the paper's Table 2."""
    require_datasets(ctx, [name for name, _ in s.datasets])
    results = {name: check(ctx, name, n, s.seed) for name, n in s.datasets}
    defaults = {name: check(ctx, name, n, s.seed, "model") for name, n in s.datasets}
    rows = [row(name, result, defaults[name]) for name, result in results.items()]
    report = Report(ctx, TITLE, SOURCE, s)
    report.section("Data", "\n".join(f"- `{name}`: {data_note(name, ctx.data_root)}, "
                                     f"n = {n or 'whole training split'}"
                                     for name, n in s.datasets))
    report.section(
        "Table 2",
        md_table(["data set", "paper n", "our n", "paper m_{H−1}", "our m_{H−1}", "paper m_H",
                  "our m_H", "paper", "ours", "rank", "rank per method", "margin", "seconds",
                  "ours, default BN statistics"],
                 rows),
        "Model: `resnet18` (softplus, CIFAR variant) modified by `ee_model`, trunk He-initialised, "
        f"q ~ N(0, 1), seed {s.seed}; batch-norm statistics recomputed over the n inputs "
        "(`update_bn`, as at the switch); the last column keeps the defaults (mean 0, variance "
        "1); features float32 with their noise floor where that verifies, else float64 "
        "(docs/verifiers.md). The paper's m_H for Semeion is lost in our text copy; "
        "⌈2·1000/513⌉ = 4.")
    write_results(ctx, {"experiment": ctx.experiment, "preset": ctx.preset, "settings": as_dict(s),
                        "paper": {k: dict(zip(("n", "m_prev", "m_H", "verdict"), v))
                                  for k, v in PAPER.items()},
                        "ours": results, "ours_default_batchnorm": defaults})
    return report.write()
