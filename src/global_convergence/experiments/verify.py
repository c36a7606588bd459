"""``gconv verify``: check a condition on a dataset and model, at initialisation or on a
checkpoint of ``gconv train``.

- expressivity ([KS21] Assumption 1) on the model :func:`two_phase_model` builds, at its PyTorch
  default initialisation (seeded), or on the checkpoint's state;
- safe exploration ([K22] Assumption 10) as the paper checked it: a He-initialised trunk and gate
  vectors ``q ~ N(0, 1)``; on a checkpoint, the actual state (``q = R(j)`` after the switch);
- alignment ([K22] Definition 2) on the initial model, or the checkpoint's.

At initialisation the trunk's batch-norm statistics are first recomputed over the inputs
checked (``batchnorm="recompute"``, the fixed function the second phase would use;
docs/verifiers.md "Batch norm at initialisation"); ``batchnorm="model"`` keeps the defaults. On a
checkpoint the run's own statistics are used (after the switch they are the fixed ones). The
JSON's ``batchnorm`` entry names the statistics used.

Under ``torchrun --nproc_per_node=N``, safe exploration's Gram certificate is split over the N
ranks (``distributed=True`` of :func:`~global_convergence.conditions.safe_exploration`); rank 0
prints the verdict.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import conditions
from ..data import load_dataset
from ..errors import UserInputError
from ..losses import make_loss
from ..models import build_model, ee_model, two_phase_model
from ..training import TrainConfig, build_run, load_checkpoint
from ..training.distributed import init_distributed


def verify(condition: str, *, data: str, model: str, n: int | None = None, seed: int = 0,
           loss: str = "ce", width: int = 1, checkpoint: str | None = None,
           data_root: str | None = None, device: str = "cpu", batchnorm: str = "recompute",
           precision: str = "auto"):
    """The :class:`~global_convergence.linalg.Verdict` of ``condition``; ``batchnorm`` is
    ``"recompute"`` or ``"model"`` (checks at initialisation), ``precision`` ``"auto"`` (float32
    features with their noise floor where they verify) or ``"float64"``."""
    if batchnorm not in BATCHNORM_CHOICES:
        raise UserInputError(f"batchnorm must be one of {', '.join(BATCHNORM_CHOICES)}, got "
                             f"{batchnorm!r}")
    distributed = _on_ranks(device)
    if checkpoint is not None:
        return _verify_checkpoint(condition, checkpoint, device, precision, distributed)
    options = dict(recompute_batchnorm=batchnorm == "recompute", precision=precision)
    dataset = load_dataset(data, n=n, seed=seed, data_root=data_root, loss=loss)
    target_dim = dataset.y_train.shape[1] if dataset.y_train.is_floating_point() else None
    loss_fn = make_loss(loss, dataset.num_classes, target_dim)
    torch.manual_seed(seed)
    base = build_model(model, dataset.input_shape, loss_fn.output_dim, width=width)
    x = dataset.x_train.to(device)
    with torch.no_grad():
        if condition == "expressivity":
            return conditions.expressivity(two_phase_model(base, dataset.n).to(device), x,
                                           **options)
        if condition == "safe-exploration":
            modified = ee_model(base, dataset.n)
            conditions.he_initialise(modified.trunk, seed)
            return conditions.safe_exploration(modified.to(device), x, q="random", seed=seed,
                                               distributed=distributed, **options)
    if condition == "alignment":
        return conditions.alignment(base.to(device), x, dataset.y_train.to(device), loss=loss_fn)
    raise UserInputError(f"unknown condition '{condition}'; expected expressivity, "
                         "safe-exploration or alignment")


BATCHNORM_CHOICES = ("recompute", "model")


def _verify_checkpoint(condition: str, path: str, device: str, precision: str,
                       distributed: bool = False):
    """Rebuild the run of a checkpoint, load its state and check ``condition`` on it."""
    state = load_checkpoint(path)
    config = TrainConfig.from_dict({**state["config"], "device": device})
    run = build_run(config)
    run.model.load_state_dict(state["model"])
    model: nn.Module = run.model
    if condition == "alignment":
        return conditions.alignment(model, run.x, run.y, loss=run.loss)
    if condition == "expressivity":
        if config.method != "two-phase":
            raise UserInputError(f"expressivity is the condition of two-phase runs; {path} is a "
                                 f"'{config.method}' run")
        return conditions.expressivity(model, run.x, recompute_batchnorm=False,
                                       precision=precision)
    if config.method != "ee":
        raise UserInputError(f"safe-exploration is the condition of ee runs; {path} is a "
                             f"'{config.method}' run")
    return conditions.safe_exploration(model, run.x, recompute_batchnorm=False,
                                       precision=precision, distributed=distributed)


def _on_ranks(device: str) -> bool:
    """Whether ``torchrun`` started this process among others (it then joins their process
    group): safe exploration's Gram certificate is split over the ranks."""
    return init_distributed("cuda" if device.startswith("cuda") else "cpu").distributed
