"""Paper reproductions behind ``gconv reproduce EXPERIMENT --preset {smoke,cpu,paper}``.

Each experiment is one module with a settings dataclass, ``PRESETS`` (``smoke``: seconds,
for tests; ``cpu``: scaled down to minutes on 2 cores, offline stand-ins for missing data; ``paper``:
the papers' settings, for a GPU) and ``run(ctx, settings) -> Path`` of its ``report.md``. All are
built from the library's own training loop, wrappers, condition verifiers and NTK code
(the shared helpers: :mod:`.subruns`, :mod:`.standins`, :mod:`.report`,
:mod:`.figures`, :mod:`.recipes`, :mod:`.ntk_tracking`). Also here: ``demo`` (``gconv demo``) and ``verify``
(``gconv verify``).

On a CPU shared with other work, ``OMP_NUM_THREADS=1`` avoids the thread oversubscription that can
make small steps many times slower.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..errors import UserInputError
from . import (aaai_table1, aaai_table2, neco_fig1a, neco_fig1bc, neco_fig2, neco_table1,
               neco_table2, neco_table3_5)
from .subruns import Context

EXPERIMENTS: dict[str, ModuleType] = {
    "neco-fig1a": neco_fig1a,
    "neco-fig1bc": neco_fig1bc,
    "neco-table1": neco_table1,
    "neco-fig2": neco_fig2,
    "neco-table2": neco_table2,
    "neco-table3-5": neco_table3_5,
    "aaai-table1": aaai_table1,
    "aaai-table2": aaai_table2,
}
"""Experiment ids → their modules."""
PRESET_NAMES = ("smoke", "cpu", "paper")


def reproduce(name: str, *, preset: str, out: str | Path, data_root: str | None = None,
              device: str = "cpu", progress: bool = True) -> Path:
    """Run experiment ``name`` with ``preset`` into ``out``; return the path of its ``report.md``.

    Sub-runs that completed in an earlier invocation with the same ``out`` are reused.
    Raises :class:`~global_convergence.errors.UserInputError` for an unknown experiment or preset,
    or when a data set the preset needs is not in ``data_root``.
    """
    module = EXPERIMENTS.get(name)
    if module is None:
        raise UserInputError(f"unknown experiment '{name}'; expected one of {', '.join(EXPERIMENTS)}")
    if preset not in module.PRESETS:
        raise UserInputError(f"unknown preset '{preset}' for {name}; expected one of "
                             f"{', '.join(module.PRESETS)}")
    ctx = Context(name, preset, Path(out), data_root=data_root, device=device, progress=progress)
    ctx.out.mkdir(parents=True, exist_ok=True)
    return module.run(ctx, module.PRESETS[preset])


__all__ = ["EXPERIMENTS", "PRESET_NAMES", "reproduce"]
