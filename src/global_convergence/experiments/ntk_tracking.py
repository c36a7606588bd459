"""NTK tracking: the change of the gradient representation ``‖M(θ_t) − M(θ_0)‖_F²`` of [K22]
Table 1 and Figure 3, logged by a training callback.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..models import SplitNet
from ..training import LogEvent


@contextmanager
def all_parameters_in_eval(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` itself in eval mode with every parameter trainable (a frozen trunk unfrozen),
    restored on exit: modes, ``requires_grad`` and the trunk's frozen flag as they were.

    No copy is made, so the NTK's structured plan, cached per model object (docs/performance.md),
    is reused from one call to the next; gradients (``.grad``) are not touched.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    frozen = isinstance(model, SplitNet) and model.is_trunk_frozen
    try:
        if frozen:
            model.unfreeze_trunk()
        for p, _ in grads:
            p.requires_grad_(True)
        model.eval()
        yield model
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        if frozen:
            model.set_flag("trunk_frozen", True)
        for m, mode in modes:
            m.training = mode


def full_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``M(θ) = J Jᵀ`` with respect to **all** parameters of ``model`` ([K22] Table 1, Fig. 3).

    Computed in eval mode (batch norm with running statistics, the function used for
    predictions); a frozen trunk counts as trainable and gate buffers stay as they are, so after
    the EE switch θ = (trunk, θ(H−1), W(H)) with the gates R fixed. The model is left as it was
    (:func:`all_parameters_in_eval`).
    """
    from ..ntk import empirical_ntk

    with all_parameters_in_eval(model) as work:
        device = next(work.parameters()).device
        return empirical_ntk(work, x.to(device))


class NtkTracker:
    """Callback adding ``ntk_change = ‖M(θ_t) − M(θ_0)‖_F²`` to the logged rows every ``every``
    steps and at the last step ([K22] Table 1 and Fig. 3). ``M(θ_0)`` is stored in the sub-run's
    folder so a resumed run keeps its reference.
    """

    def __init__(self, folder: Path, total_steps: int, every: int | None = None) -> None:
        self.path, self.total, self.every = folder / "ntk0.pt", total_steps, every
        self.m0: torch.Tensor | None = None

    def due(self, step: int) -> bool:
        return step == 0 or step == self.total or bool(self.every and step % self.every == 0)

    def __call__(self, event: LogEvent) -> None:
        from ..ntk import representation_change

        if not self.due(event.step):
            return
        m = full_ntk(event.model, event.dataset.x_train).cpu()
        if event.step == 0:
            self.m0 = m
            torch.save(m, self.path)
        elif self.m0 is None:
            self.m0 = torch.load(self.path, weights_only=True)
        event.row["ntk_change"] = representation_change(m, self.m0)


class NtkCallbacks:
    """A :data:`~.subruns.CallbackFactory` with one :class:`NtkTracker`; a plain object (not a
    closure) so that jobs carrying it can be sent to worker processes (:func:`.subruns.run_jobs`)."""

    def __init__(self, total_steps: int, every: int | None = None) -> None:
        self.total, self.every = total_steps, every

    def __call__(self, folder: Path) -> list[NtkTracker]:
        return [NtkTracker(folder, self.total, self.every)]


def ntk_callbacks(total_steps: int, every: int | None = None) -> NtkCallbacks:
    """The callback factory of a sub-run whose ‖ΔM‖² is tracked (:class:`NtkCallbacks`)."""
    return NtkCallbacks(total_steps, every)
