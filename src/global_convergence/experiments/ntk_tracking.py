"""NTK tracking: the change of the gradient representation ``‖M(θ_t) − M(θ_0)‖_F²`` of [K22]
Table 1 and Figure 3, logged by a training callback.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..models import SplitNet
from ..training import LogEvent
from .subruns import CallbackFactory


def full_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``M(θ) = J Jᵀ`` with respect to **all** parameters of ``model`` ([K22] Table 1, Fig. 3).

    Computed on a copy in eval mode (batch norm with running statistics, the function used for
    predictions); a frozen trunk is unfrozen on the copy and gate buffers stay as they are, so after
    the EE switch θ = (trunk, θ(H−1), W(H)) with the gates R fixed.
    """
    from ..ntk import empirical_ntk

    work = copy.deepcopy(model)
    if isinstance(work, SplitNet) and work.is_trunk_frozen:
        work.unfreeze_trunk()
    for p in work.parameters():
        p.requires_grad_(True)
    work.eval()
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


def ntk_callbacks(total_steps: int, every: int | None = None) -> CallbackFactory:
    """A :data:`CallbackFactory` with one :class:`NtkTracker`."""
    return lambda folder: [NtkTracker(folder, total_steps, every)]
