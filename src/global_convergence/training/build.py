"""Building a run: data, loss, model, optimizer and wrapper, validated before any file is written.

The model is the built-in network of ``--model`` with the architecture change its method needs:
the wide last hidden layer of [KS21] §3 (``two_phase_model``) for ``two-phase`` (and for
``base --wide-layer``), the gated exploration head of [K22] §3.2.2 (``ee_model``) for ``ee``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data import Dataset, load_dataset
from ..errors import UserInputError
from ..losses import Loss, make_loss
from ..models import SplitNet, build_model, ee_model, two_phase_model
from ..models.surgery import replace_module
from ..wrappers import EEWrapper, PhaseWrapper, TwoPhase
from . import evaluation
from .checkpoint import seed_everything
from .config import Schedule, TrainConfig, make_schedule
from .distributed import DistContext, globalise_batchnorm, init_distributed
from .state import RunState
from .storage import inputs_on_device, place_inputs, tensor_bytes

if TYPE_CHECKING:
    from .feature_cache import FeatureCache
    from .kernel_steps import KernelSteps

HOLDOUT_SEED = 0
"""Seed of the ``holdout`` split: the same split for every run, whatever its ``--seed``."""


@dataclass(kw_only=True, eq=False)
class Run:
    """A training run: what :func:`build_run` made (fixed for the run), its checkpointed
    :class:`~.state.RunState`, and what phase 2 sets up (not checkpointed: rebuilt on resume)."""

    config: TrainConfig
    dataset: Dataset
    loss: Loss
    model: nn.Module
    optimizer: torch.optim.Optimizer
    wrapper: PhaseWrapper | None
    schedule: Schedule
    ctx: DistContext
    x: torch.Tensor
    """Training inputs: on ``ctx.device``, or in (pinned) CPU memory (``data_on_device``)."""
    y: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    eval_chunk: int = evaluation.EVAL_CHUNK
    """Samples per forward pass when evaluating or caching features."""
    state: RunState = field(default_factory=RunState)
    cache: "FeatureCache | None" = None
    cache_dir: Path | None = None
    """Folder of an on-disk feature cache (the run's ``out``); None: a temporary folder."""
    train_module: nn.Module | None = None
    """What the training step calls (:func:`.steps.attach_train_module`)."""
    kernel: "KernelSteps | None" = None
    """Phase 2's exact SGD steps in coefficient space (:mod:`.kernel_steps`), where they apply."""
    checkpoint_step: int | None = None
    """Step of the last checkpoint written (or resumed from); None before the first."""
    epoch_order: tuple[int, torch.Tensor] | None = None
    """``(epoch, permutation)`` last drawn by :func:`.steps.batch_indices`."""

    @property
    def phase(self) -> int:
        return self.wrapper.phase if self.wrapper is not None else 1

    @property
    def split(self) -> SplitNet | None:
        return self.model if isinstance(self.model, SplitNet) else None

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def certificate(self) -> dict[str, Any] | None:
        return self.state.certificate

    @certificate.setter
    def certificate(self, value: dict[str, Any] | None) -> None:
        self.state.certificate = value


def build_run(config: TrainConfig, ctx: DistContext | None = None, *,
              eval_chunk: int | None = None) -> Run:
    """Load data, build model, optimizer and wrapper; raise UserInputError on any bad input.
    ``eval_chunk``: samples per forward pass of evaluation and feature caching (default
    :data:`.evaluation.EVAL_CHUNK`)."""
    config.validate()
    ctx = ctx or init_distributed(config.device)
    seed_everything(config.seed)
    dataset = load_dataset(config.data, n=config.n, seed=config.seed, data_root=config.data_root,
                           download=config.download, loss=config.loss, noise=config.noise)
    if config.holdout is not None:
        dataset = holdout_split(dataset, config.holdout)
    target_dim = dataset.y_train.shape[1] if dataset.y_train.is_floating_point() else None
    loss = make_loss(config.loss, dataset.num_classes, target_dim)
    if config.loss == "ce" and dataset.y_train.is_floating_point():
        raise UserInputError(f"--loss ce needs integer class labels, but {dataset.name} has real targets")
    schedule = make_schedule(config, dataset.n)
    if config.augment and dataset.augment is None:
        raise UserInputError(f"--augment: no augmentation applies to {dataset.name} "
                             f"(inputs of shape {dataset.input_shape})")
    torch.manual_seed(config.seed)
    base = build_model(config.model, dataset.input_shape, loss.output_dim, width=config.width)
    if config.activation == "relu":
        _softplus_to_relu(base)
    model = _modify_model(base, config, dataset.n)
    if ctx.distributed:
        globalise_batchnorm(model)     # batch statistics of the global batch, as one process has
    model.to(ctx.device)
    if config.channels_last and len(dataset.input_shape) == 3:
        model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(config, model.parameters())
    on_device = inputs_on_device(config.data_on_device,
                                 tensor_bytes(dataset.x_train, dataset.x_test), ctx.device)
    x = place_inputs(dataset.x_train, on_device, ctx.device)
    x_test = place_inputs(dataset.x_test, on_device, ctx.device) if dataset.x_test is not None else None
    chunk = eval_chunk or evaluation.EVAL_CHUNK
    wrapper = _make_wrapper(config, model, optimizer, schedule, x, chunk)
    return Run(config=config, dataset=dataset, loss=loss, model=model, optimizer=optimizer,
               wrapper=wrapper, schedule=schedule, ctx=ctx, x=x, y=dataset.y_train.to(ctx.device),
               x_test=x_test,
               y_test=dataset.y_test.to(ctx.device) if dataset.y_test is not None else None,
               eval_chunk=chunk)


def holdout_split(dataset: Dataset, fraction: float) -> Dataset:
    """[K22]'s selection split: a fixed random ``fraction`` of the training split becomes the
    evaluation (``test``) split, the rest the training split; the real test split is not used."""
    order = torch.randperm(dataset.n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    held = max(1, round(fraction * dataset.n))
    keep, out = order[held:].sort().values, order[:held].sort().values
    note = f"{dataset.note}; " if dataset.note else ""
    return dataclasses.replace(
        dataset, x_train=dataset.x_train[keep], y_train=dataset.y_train[keep],
        x_test=dataset.x_train[out], y_test=dataset.y_train[out],
        note=f"{note}{fraction:.0%} of the training split held out for validation")


def _modify_model(base: nn.Module, config: TrainConfig, n: int) -> nn.Module:
    if config.method == "two-phase" or config.wide_layer:
        return two_phase_model(base, n)
    if config.method == "ee":
        return ee_model(base, n, head_width=config.head_width)
    return base


def _softplus_to_relu(model: nn.Module) -> None:
    """``--activation relu``: every softplus of a built-in model becomes a ReLU (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Softplus):
            replace_module(model, name, nn.ReLU())


def _make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _make_wrapper(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                  schedule: Schedule, x: torch.Tensor, chunk: int) -> PhaseWrapper | None:
    bn_data = list(torch.split(x, chunk))
    common = dict(seed=config.seed, bn_data=bn_data, total_steps=schedule.total,
                  allow_non_analytic=config.allow_non_analytic, exploit_lr=config.exploit_lr)
    if config.method == "two-phase":
        return TwoPhase(model, optimizer, schedule.tau, config.delta0, **common)
    if config.method == "ee":
        return EEWrapper(model, optimizer, schedule.tau, config.eps,
                         exploit_optimizer=config.exploit_optimizer, **common)
    return None
