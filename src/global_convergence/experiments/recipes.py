"""The papers' SGD recipe for the image-classification runs ([K22] §3.4.2, [KS21] §7).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..training import TrainConfig
from .standins import data_arg, training_inputs
from .subruns import Context, base_config


@dataclass(frozen=True)
class SGDRecipe:
    """The papers' SGD setting for the ResNets (batch 64, momentum 0.9, weight decay 1e-5), and
    how often a run is evaluated (every epoch in the papers; less often saves time on a CPU)."""

    lr: float
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-5
    log_epochs: int = 1


def image_config(ctx: Context, recipe: SGDRecipe, *, data: str, model: str, method: str,
                 seed: int, augment: bool, epochs: int, n: int | None = None,
                 **options: Any) -> TrainConfig:
    """A ResNet run of the papers' SGD recipe on data set ``data``, evaluated (one log row) every
    ``recipe.log_epochs`` epochs, at the switch and at the end."""
    config = base_config(ctx, data=data_arg(ctx, data), model=model, method=method, seed=seed,
                         augment=augment, epochs=epochs, n=n, optimizer="sgd", lr=recipe.lr,
                         batch_size=recipe.batch_size, momentum=recipe.momentum,
                         weight_decay=recipe.weight_decay, **options)
    if recipe.log_epochs > 1:
        config.log_every = recipe.log_epochs * epoch_steps(config)
    return config


def epoch_steps(config: TrainConfig) -> int:
    """Steps per epoch of a run of ``config`` (its training set after any ``holdout``)."""
    from ..training import make_schedule

    n = len(training_inputs(config))
    if config.holdout is not None:
        n -= max(1, round(config.holdout * n))
    return make_schedule(config, n).steps_per_epoch
