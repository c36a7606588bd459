"""The training loop behind ``gconv train``: data order, both phases, metrics, certificates,
checkpoints, resume, DDP.

Determinism: the data order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)`` and the augmentation of step ``t`` from one seeded with ``(seed, t)``, so a resumed
run replays exactly the batches an uninterrupted run sees, on any number of ranks.

The second phase trains only the head on a frozen trunk. Without augmentation the trunk features
of the whole training (and test) set are computed once at the switch and the head trains on them
(``feature_cache``: in memory or in a file on disk); with augmentation the trunk runs forward-only
under ``no_grad``. On CUDA, inputs too large for the device stay in pinned CPU memory and each
batch is copied over (``data_on_device``, see :mod:`.storage`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import Dataset, augment_batch, load_dataset
from ..errors import NumericalError, UserInputError
from ..losses import Loss, make_loss
from ..models import (SplitNet, TwoPhaseModel, build_model, ee_model, flush_denormals,
                      non_analytic_modules, two_phase_model)
from ..models.surgery import replace_module
from ..wrappers import EEWrapper, PhaseWrapper, TwoPhase
from ..wrappers.ee import LBFGS_OPTIONS
from .checkpoint import (atomic_write_text, load_checkpoint, remove_stale_temporaries, restore_rng,
                         save_checkpoint, seed_everything)
from .config import Schedule, TrainConfig, make_schedule
from .kernel_steps import KernelSteps, kernel_steps_for
from .distributed import (DistContext, all_reduce_sum, assemble_chunks, barrier, broadcast_object,
                          globalise_batchnorm, init_distributed, owns_chunk, rank_share,
                          stream_chunks, synchronised_batchnorm)
from .metrics import plot_run, write_metrics
from .storage import (Features, cache_storage, chunk_count, gather_rows, inputs_on_device,
                      open_feature_file, place_inputs, read_rows, remove_files, tensor_bytes,
                      to_device)

EVAL_CHUNK = 1024
"""Samples per forward pass when evaluating or caching features."""
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
OUTPUT_FILES = ("metrics.csv", "summary.json", "training.png", "q_t.png")
"""What a finished run writes besides the checkpoint; a fresh run removes a previous run's copies
first, so that a folder never mixes a new checkpoint with an old summary."""
RESULT_INSENSITIVE = {"device", "data_root", "download", "checkpoint_every", "log_every",
                      "data_on_device"}
"""Options a resumed run may change: they do not alter the numbers a run produces."""


@dataclass
class LogEvent:
    """What a callback sees at each logged step; it may add columns to ``row``."""

    step: int
    phase: int
    model: nn.Module
    dataset: Dataset
    loss: Loss
    row: dict[str, Any]


Callback = Callable[[LogEvent], None]


@dataclass
class Run:
    """Everything a training run is made of, built and validated before any file is written."""

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
    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    q_t: int = 0
    alignment_checks: int = 0
    certificate: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=lambda: {"phase1": 0.0, "phase2": 0.0,
                                                               "switch": 0.0, "evaluation": 0.0})
    cache: "FeatureCache | None" = None
    cache_dir: Path | None = None
    """Folder of an on-disk feature cache (the run's ``out``); None: a temporary folder."""
    train_module: nn.Module | None = None
    checkpoint_step: int | None = None
    """Step of the last checkpoint written (or resumed from); None before the first."""
    epoch_order: tuple[int, torch.Tensor] | None = None
    """``(epoch, permutation)`` last drawn by :func:`batch_indices`."""
    kernel: KernelSteps | None = None
    """Phase 2's exact SGD steps in coefficient space (:mod:`.kernel_steps`), where they apply."""

    @property
    def phase(self) -> int:
        return self.wrapper.phase if self.wrapper is not None else 1

    @property
    def split(self) -> SplitNet | None:
        return self.model if isinstance(self.model, SplitNet) else None


@dataclass(eq=False)
class FeatureCache:
    """Trunk features ``z̄`` of the training (and test) inputs under the frozen trunk: tensors, or
    memmaps of the float32 ``files`` (in ``folder`` when it is a temporary one). :meth:`close`,
    or garbage collection, deletes the files and the temporary folder."""

    train: Features
    test: Features | None
    files: list[Path] = field(default_factory=list)
    folder: Path | None = None

    def __post_init__(self) -> None:
        self._cleanup = weakref.finalize(self, remove_files, list(self.files), self.folder)

    def close(self) -> None:
        self._cleanup()


# -- building a run -----------------------------------------------------------------------------
def build_run(config: TrainConfig, ctx: DistContext | None = None) -> Run:
    """Load data, build model, optimizer and wrapper; raise UserInputError on any bad input."""
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
    _check_analytic(model, config)
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
    y = dataset.y_train.to(ctx.device)
    y_test = dataset.y_test.to(ctx.device) if dataset.y_test is not None else None
    wrapper = _make_wrapper(config, model, optimizer, schedule, x)
    return Run(config, dataset, loss, model, optimizer, wrapper, schedule, ctx, x, y, x_test, y_test)


HOLDOUT_SEED = 0
"""Seed of the ``holdout`` split: the same split for every run, whatever its ``--seed``."""


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


def _check_analytic(model: nn.Module, config: TrainConfig) -> None:
    """Refuse a guarantee for a non-analytic model unless the user allowed it (SPEC §2)."""
    offending = non_analytic_modules(model)
    if config.method == "base" or config.allow_non_analytic or not offending:
        return
    names = ", ".join(offending[:4]) + (f" and {len(offending) - 4} more" if len(offending) > 4 else "")
    raise UserInputError(f"--method {config.method} needs a real-analytic model for its guarantee, but "
                         f"these modules are not: {names}; use --activation softplus, or pass "
                         "--allow-non-analytic to run with a certificate saying the guarantee does "
                         "not apply")


def _make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _make_wrapper(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                  schedule: Schedule, x: torch.Tensor) -> PhaseWrapper | None:
    bn_data = list(torch.split(x, EVAL_CHUNK))
    common = dict(seed=config.seed, bn_data=bn_data, total_steps=schedule.total,
                  allow_non_analytic=config.allow_non_analytic)
    if config.method == "two-phase":
        return TwoPhase(model, optimizer, schedule.tau, config.delta0, **common)
    if config.method == "ee":
        return EEWrapper(model, optimizer, schedule.tau, config.eps,
                         exploit_optimizer=config.exploit_optimizer, **common)
    return None


# -- evaluation -----------------------------------------------------------------------------------
@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def predict(run: Run, split: str = "train") -> torch.Tensor:
    """Model outputs on a whole split, in chunks (cached features in phase 2)."""
    source, fn = _eval_source(run, split)
    device = run.ctx.device
    with evaluation_mode(run.model):
        return torch.cat([_autocast_forward(run, fn, read_rows(source, k * EVAL_CHUNK,
                                                                (k + 1) * EVAL_CHUNK, device))
                          for k in range(chunk_count(source, EVAL_CHUNK))])


def _eval_source(run: Run, split: str) -> tuple[Features, nn.Module]:
    """What evaluates a split: its cached features and the head, or its inputs and the model."""
    cached = None
    if run.cache is not None:
        cached = run.cache.train if split == "train" else run.cache.test
    if cached is not None:
        return cached, run.split.head
    return (run.x if split == "train" else run.x_test), run.model


def evaluate(run: Run) -> dict[str, Any]:
    """Training loss and error on the whole training set; test error where there is a test set.

    Under DDP every rank must call it: chunk ``k`` is evaluated on rank ``k mod world`` and the
    per-chunk sums are reduced across ranks and added in chunk order (in float64), so the figures
    do not depend on the number of ranks.
    """
    loss_sum, errors = _split_sums(run, "train")
    row: dict[str, Any] = {"loss": loss_sum / run.dataset.n}
    row["train_error"] = None if errors is None else errors / run.dataset.n
    row["test_error"] = None
    if run.x_test is not None:
        _, test_errors = _split_sums(run, "test")
        row["test_error"] = None if test_errors is None else test_errors / len(run.y_test)
    return row


def _split_sums(run: Run, split: str) -> tuple[float, float | None]:
    """Summed per-sample loss and number of errors over a split (None: no classes)."""
    source, fn = _eval_source(run, split)
    targets = run.y if split == "train" else run.y_test
    count = chunk_count(source, EVAL_CHUNK)
    sums = torch.zeros(count, 2, dtype=torch.float64, device=run.ctx.device)
    with evaluation_mode(run.model):
        for k in range(count):
            if owns_chunk(k, run.ctx):
                chunk = read_rows(source, k * EVAL_CHUNK, (k + 1) * EVAL_CHUNK, run.ctx.device)
                out = _autocast_forward(run, fn, chunk).float()
                y = targets[k * EVAL_CHUNK:(k + 1) * EVAL_CHUNK]
                sums[k, 0] = run.loss.per_sample(out, y).double().sum()
                errors = run.loss.errors(out, y)
                sums[k, 1] = math.nan if errors is None else errors
    sums = all_reduce_sum(sums, run.ctx).sum(dim=0).tolist()
    return sums[0], None if math.isnan(sums[1]) else sums[1]


def _autocast_forward(run: Run, fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if run.config.amp and run.ctx.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(x).float()
    return fn(x)


# -- one step ----------------------------------------------------------------------------------
def batch_indices(run: Run, step: int) -> torch.Tensor:
    """Global batch of ``step``: a slice of the seeded permutation of its epoch (drawn once per
    epoch: it depends on the seed and the epoch alone, so a resumed run draws the same)."""
    s = run.schedule
    epoch, position = divmod(step, s.steps_per_epoch)
    if s.batch >= s.n:
        return torch.arange(s.n)
    if run.epoch_order is None or run.epoch_order[0] != epoch:
        generator = torch.Generator().manual_seed(run.config.seed * 1_000_003 + epoch)
        run.epoch_order = (epoch, torch.randperm(s.n, generator=generator))
    return run.epoch_order[1][position * s.batch:(position + 1) * s.batch]


def _inputs(run: Run, index: torch.Tensor, step: int) -> torch.Tensor:
    """Inputs of a batch on the device: cached features in a cached phase 2, else (augmented) raw
    inputs, gathered where they live."""
    if run.cache is not None:
        return gather_rows(run.cache.train, index, run.ctx.device)
    xb = run.x[index.to(run.x.device)]
    if run.config.augment:
        generator = torch.Generator().manual_seed(run.config.seed * 7_919 + step)
        xb = augment_batch(xb.cpu(), run.dataset.augment, generator)
    xb = to_device(xb, run.ctx.device)
    if run.config.channels_last and xb.dim() == 4:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb


def make_closure(run: Run, step: int) -> Callable[[], torch.Tensor]:
    """Closure of one step: zero grads, loss of this rank's share of the global batch, backward.

    Returns the global-batch mean loss (all ranks agree on it, which L-BFGS's line search needs).
    L-BFGS exploitation always uses the full batch.
    """
    lbfgs = run.phase == 2 and isinstance(run.wrapper.active_optimizer, torch.optim.LBFGS)
    global_index = torch.arange(run.schedule.n) if lbfgs else batch_indices(run, step)
    local = rank_share(global_index, run.ctx)
    inputs, targets = _inputs(run, local, step), run.y[local.to(run.y.device)]
    scale = run.ctx.world / len(global_index)

    def closure() -> torch.Tensor:
        zero_grad(run)
        with synchronised_batchnorm(run.ctx.distributed):
            out = _autocast_forward(run, run.train_module, inputs)
        local_sum = run.loss.per_sample(out.float(), targets).sum()
        (local_sum * scale).backward()
        return all_reduce_sum(local_sum.detach(), run.ctx) / len(global_index)

    return closure


def zero_grad(run: Run) -> None:
    (run.wrapper or run.optimizer).zero_grad(set_to_none=True)


def train_step(run: Run) -> float:
    if run.kernel is not None:
        loss = run.kernel.step(batch_indices(run, run.step).to(run.y.device))
        run.wrapper.step_count += 1
        return loss
    closure = make_closure(run, run.step)
    stepper = run.wrapper or run.optimizer
    if run.wrapper is None or not isinstance(run.wrapper.active_optimizer, torch.optim.LBFGS):
        loss = closure()
        stepper.step()
    else:
        loss = stepper.step(closure)
    return float(loss)


# -- phases ------------------------------------------------------------------------------------
def attach_train_module(run: Run) -> None:
    """The module the closure calls: the (DDP-wrapped) model in phase 1; in phase 2 the head on
    cached features, or the model with its frozen trunk. Under DDP phase 2 wraps only the head
    in a fresh DDP instance: the trunk's ``requires_grad`` changed at the switch."""
    if run.phase == 1:
        module = _ddp(run.model, run.ctx) if run.ctx.distributed else run.model
        run.train_module = torch.compile(module) if run.config.compile else module
        return
    head = run.split.head
    if run.ctx.distributed:
        head = _ddp(head, run.ctx)
    module = head if run.cache is not None else _FrozenTrunkThen(run.split, head)
    run.train_module = torch.compile(module) if run.config.compile else module


def _ddp(module: nn.Module, ctx: DistContext) -> DistributedDataParallel:
    """``module`` in DDP, on this rank's GPU where there is one."""
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


class _FrozenTrunkThen(nn.Module):
    """``head(trunk(x))`` with the frozen trunk of ``split`` and a possibly DDP-wrapped head."""

    def __init__(self, split: SplitNet, head: nn.Module) -> None:
        super().__init__()
        self.split, self.head = split, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.split.features(x))


def build_feature_cache(run: Run) -> FeatureCache | None:
    """Trunk features of every training (and test) input, once, under the frozen trunk: in memory,
    or written chunk by chunk to float32 files (``feature_cache``)."""
    if run.config.feature_cache_mode == "off" or run.config.augment or run.split is None:
        return None
    with evaluation_mode(run.model):
        if _cache_storage(run) == "disk":
            return _disk_feature_cache(run)
        train = _trunk_features(run, run.x)
        test = _trunk_features(run, run.x_test) if run.x_test is not None else None
    return FeatureCache(train, test)


def _cache_storage(run: Run) -> str:
    """``memory`` or ``disk``; for ``auto`` the size follows from the features of one input, and
    under DDP rank 0's choice holds on every rank."""
    choice = run.config.feature_cache_mode
    if choice != "auto":
        return choice
    row = run.split.features(read_rows(run.x, 0, 1, run.ctx.device))
    rows = len(run.x) + (len(run.x_test) if run.x_test is not None else 0)
    return broadcast_object(cache_storage(choice, rows * row.numel() * row.element_size(),
                                          run.ctx.device), run.ctx)


def _trunk_features(run: Run, x: torch.Tensor) -> torch.Tensor:
    """Trunk features of ``x`` in chunks; under DDP each rank computes its chunks and every rank
    receives all of them (the same tensor one process computes)."""
    sizes = _chunk_sizes(len(x))
    parts = {k: _chunk_features(run, x, k) for k in range(len(sizes)) if owns_chunk(k, run.ctx)}
    return assemble_chunks(parts, sizes, run.ctx)


def _chunk_features(run: Run, x: torch.Tensor, k: int) -> torch.Tensor:
    return run.split.features(read_rows(x, k * EVAL_CHUNK, (k + 1) * EVAL_CHUNK, run.ctx.device))


def _chunk_sizes(n: int) -> list[int]:
    return [min(EVAL_CHUNK, n - start) for start in range(0, n, EVAL_CHUNK)]


CACHE_FILE = "feature-cache-{split}{rank}.npy"
"""On-disk feature cache of a split (``-rank<r>`` under DDP: every rank writes its own copy)."""


def _disk_feature_cache(run: Run) -> FeatureCache:
    """The features in float32 ``.npy`` files in ``run.cache_dir`` (else a temporary folder)."""
    temporary = Path(tempfile.mkdtemp(prefix="gconv-features-")) if run.cache_dir is None else None
    folder = run.cache_dir if temporary is None else temporary
    rank = f"-rank{run.ctx.rank}" if run.ctx.distributed else ""
    inputs = {"train": run.x, "test": run.x_test}
    files = {split: folder / CACHE_FILE.format(split=split, rank=rank)
             for split, x in inputs.items() if x is not None}
    try:
        arrays = {split: _write_trunk_features(run, inputs[split], path) for split, path in files.items()}
    except BaseException:
        remove_files(list(files.values()), temporary)
        raise
    return FeatureCache(arrays["train"], arrays.get("test"), list(files.values()), temporary)


def _write_trunk_features(run: Run, x: torch.Tensor, path: Path) -> np.memmap:
    """Trunk features of ``x`` written to ``path`` one chunk at a time (under DDP each chunk is
    computed on its rank and broadcast, as in :func:`_trunk_features`)."""
    out, start = None, 0
    for part in stream_chunks(lambda k: _chunk_features(run, x, k), _chunk_sizes(len(x)), run.ctx):
        if out is None:
            out = open_feature_file(path, len(x), tuple(part.shape[1:]))
        out[start:start + len(part)] = part.float().cpu().numpy()
        start += len(part)
    out.flush()
    return out


def make_certificate(run: Run) -> dict[str, Any]:
    """The condition checked on the actual state at the switch, constants and bound (SPEC §4),
    from the phase-2 feature cache where there is one (``certificate_precision``)."""
    from .. import conditions

    c = run.config
    cached = _cached_train_features(run)
    precision = c.certificate_precision if _float32_attempt_pays(run, cached) else "float64"
    facts = dict(full_batch=run.schedule.batch >= run.schedule.n,
                 momentum=c.momentum if c.optimizer == "sgd" else 0.0,
                 weight_decay=c.weight_decay,
                 optimizer_name=c.optimizer if c.method != "ee" or c.exploit_optimizer == "same"
                 else c.exploit_optimizer,
                 lr_used=_exploit_step(c),
                 analytic=not non_analytic_modules(run.model),
                 features=cached, precision=precision)
    if isinstance(run.model, TwoPhaseModel):
        return conditions.two_phase_certificate(run.model, run.x, run.loss, **facts)
    return conditions.ee_certificate(run.model, run.x, run.loss, **facts)


def _float32_attempt_pays(run: Run, cached: torch.Tensor | None) -> bool:
    """Whether ``certificate_precision="auto"`` should first try the float32 features. Not
    without a cache (augmentation, ``--feature-cache off``): a float32 pass made only to try is
    wasted whenever float32 cannot decide (ResNet features). Not on CUDA: there the float64
    trunk pass is cheap and the attempt's own rank check is what costs (H200, ResNet-18:
    2.4 s against 1.4 s at n = 10,000, 26.6 s against 16.5 s at n = 50,000)."""
    return cached is not None and run.ctx.device.type != "cuda"


def _exploit_step(config: TrainConfig) -> float | None:
    """The step of the second phase as the certificate states it: None for ``1/L`` itself,
    L-BFGS's initial step (its line search scales it), or the learning rate used."""
    if config.exploit_lr == "auto":
        return None
    if config.method == "ee" and config.exploit_optimizer == "lbfgs":
        return LBFGS_OPTIONS["lr"]
    return config.exploit_lr or config.lr


def _cached_train_features(run: Run) -> torch.Tensor | None:
    """The cached float32 trunk features of the training inputs as one tensor, or None."""
    if run.cache is None:
        return None
    train = run.cache.train
    return train if isinstance(train, torch.Tensor) else torch.from_numpy(np.asarray(train))


def set_exploit_step(run: Run) -> None:
    """``exploit_lr``: the step of the second phase's optimizer — the certificate's ``step_used``
    (``1/L`` for ``auto``) or the number given."""
    if run.config.exploit_lr is None or run.wrapper is None:
        return
    step = float(run.certificate["step_used"]) if run.certificate else float(run.config.exploit_lr)
    if not math.isfinite(step):
        raise NumericalError("--exploit-lr auto: the certificate's smoothness constant is 0 (the "
                             "output weights are all zero), so 1/L is infinite; give a number")
    for group in run.wrapper.active_optimizer.param_groups:
        group["lr"] = step


def enter_phase2(run: Run) -> None:
    started = time.perf_counter()
    run.cache = build_feature_cache(run)
    attach_train_module(run)
    run.kernel = kernel_steps_for(run)
    run.seconds["switch"] += time.perf_counter() - started


def sync_kernel(run: Run) -> None:
    """Materialise the kernel engine's weights (and momentum) before anything reads them."""
    if run.kernel is not None:
        run.kernel.write_back()


# -- logging -----------------------------------------------------------------------------------
def log_row(run: Run, callbacks: list[Callback]) -> dict[str, Any]:
    """Evaluate (on every rank, reduced across ranks); alignment checks and callbacks run on
    rank 0, whose row every rank then keeps."""
    started = time.perf_counter()
    sync_kernel(run)
    row: dict[str, Any] = {"step": run.step, "epoch": run.step / run.schedule.steps_per_epoch,
                           "phase": run.phase, **evaluate(run), "alignment_ok": None, "q_t": None}
    every = run.config.track_alignment_every

    def checks_and_callbacks() -> tuple[dict[str, Any], int, int]:
        if every and run.step % every == 0:
            _track_alignment(run, row)
        if every:
            row["q_t"] = run.q_t
        for callback in callbacks:
            callback(LogEvent(run.step, run.phase, run.model, run.dataset, run.loss, row))
        return {k: _plain(v) for k, v in row.items()}, run.q_t, run.alignment_checks

    done, failure = on_rank_zero(run, checks_and_callbacks)
    if failure is not None:
        raise NumericalError(f"alignment check at step {run.step} (phase {run.phase}): {failure}; "
                             "the run has diverged. Lower --lr or check the data.")
    row, run.q_t, run.alignment_checks = done
    run.rows.append(row)
    run.seconds["evaluation"] += time.perf_counter() - started
    return row


def on_rank_zero(run: Run, work: Callable[[], Any]) -> tuple[Any, str | None]:
    """``work()`` on rank 0 alone, its result on every rank. A :class:`NumericalError` comes
    back as its message (the caller adds where it happened); any other failure is raised on
    every rank — rank 0 re-raises it, the others raise a ``RuntimeError`` naming it — so no rank
    waits for a broadcast that never comes."""
    result, numerical, error = None, None, None
    if run.ctx.is_main:
        try:
            result = work()
        except NumericalError as exc:
            numerical = str(exc)
        except Exception as exc:
            error = exc
    if run.ctx.distributed:
        described = None if error is None else f"{type(error).__name__}: {error}"
        result, numerical, described = broadcast_object((result, numerical, described), run.ctx)
        if described is not None and error is None:
            raise RuntimeError(f"rank 0 failed: {described}")
    if error is not None:
        raise error
    return result, numerical


def _plain(value: Any) -> Any:
    """A numpy or one-element torch scalar as a Python number (checkpoints hold plain values)."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    return value


def _track_alignment(run: Run, row: dict[str, Any]) -> None:
    """One check of data-architecture alignment ([K22] eq. 2): Q_T counts the failed ones."""
    from .. import conditions

    verdict = conditions.alignment(run.model, run.x, run.y, loss=run.loss)
    ok = verdict.verdict == "verified"
    run.alignment_checks += 1
    run.q_t += 0 if ok else 1
    row["alignment_ok"] = int(ok)


def _should_log(run: Run) -> bool:
    s = run.schedule
    every = run.config.track_alignment_every
    return (run.step % s.log_every == 0 or run.step == s.total or run.step == s.tau
            or bool(every and run.step % every == 0))


# -- checkpoints -------------------------------------------------------------------------------
def checkpoint_state(run: Run) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "config": run.config.to_dict(), "step": run.step,
            "model": run.model.state_dict(),
            "wrapper": run.wrapper.state_dict() if run.wrapper else None,
            "optimizer": run.optimizer.state_dict() if run.wrapper is None else None,
            "rows": run.rows, "q_t": run.q_t, "alignment_checks": run.alignment_checks,
            "certificate": run.certificate, "seconds": run.seconds}


def write_checkpoint(run: Run, out: Path | None, phase: int | None = None) -> None:
    """Save the run's state, after checking that every parameter is finite: a checkpoint is
    always a good one (``phase``: that of the step just taken, for the error message)."""
    sync_kernel(run)
    _check_parameters(run, run.phase if phase is None else phase, out)
    if out is not None and run.ctx.is_main:
        save_checkpoint(out / CHECKPOINT_NAME, checkpoint_state(run))
    run.checkpoint_step = run.step
    barrier(run.ctx)


def restore(run: Run, state: dict[str, Any]) -> None:
    """Continue ``run`` from a checkpoint of the same configuration."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserInputError(f"the checkpoint is not one of gconv train (format {found!r}); expected "
                             f"format {CHECKPOINT_FORMAT}")
    saved, current = result_options(TrainConfig.from_dict(state["config"])), result_options(run.config)
    changed = [k for k, v in current.items() if saved.get(k) != v]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise UserInputError(f"--resume with options that differ from the checkpoint's ({details})")
    run.model.load_state_dict(state["model"])
    if run.wrapper is not None:
        run.wrapper.load_state_dict(state["wrapper"])
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.step, run.rows, run.q_t = state["step"], state["rows"], state["q_t"]
    run.alignment_checks, run.certificate = state["alignment_checks"], state["certificate"]
    run.seconds.update(state["seconds"])
    run.checkpoint_step = run.step
    restore_rng(state["rng"])


def result_options(config: TrainConfig) -> dict[str, Any]:
    """The options that alter a run's numbers. Of the feature cache only whether there is one
    counts: memory and disk hold the same float32 features."""
    options = {k: v for k, v in config.to_dict().items() if k not in RESULT_INSENSITIVE}
    del options["feature_cache"]
    options["cache_features"] = config.feature_cache_mode != "off"
    return options


# -- the run -----------------------------------------------------------------------------------
def train(config: TrainConfig, out: str | Path | None = None, *, resume: bool = False,
          progress: bool = True, callbacks: list[Callback] | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run ``config`` and return the summary (also written to ``out/summary.json``).

    Runs on the CPU with float32 subnormals flushed to zero (SPEC §2). ``stop_after`` ends the
    run early after that many steps (with a checkpoint), as an interruption would.
    """
    if not isinstance(config, TrainConfig):
        raise UserInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if stop_after is not None and (not isinstance(stop_after, int) or isinstance(stop_after, bool)
                                   or stop_after < 1):
        raise UserInputError(f"stop_after must be a positive integer, got {stop_after!r}")
    out_path = check_out(out)
    if resume and out_path is None:
        raise UserInputError("--resume needs --out DIR holding checkpoint.pt")
    run = build_run(config)
    run.cache_dir = out_path
    if resume:
        restore(run, load_checkpoint(out_path / CHECKPOINT_NAME))
    created = out_path is not None and run.ctx.is_main and not out_path.exists()
    if out_path is not None and run.ctx.is_main:
        out_path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_path, (CHECKPOINT_NAME, *OUTPUT_FILES))
        if not resume:
            for name in OUTPUT_FILES:
                (out_path / name).unlink(missing_ok=True)
    try:
        with flush_denormals(run.ctx.device.type == "cpu"):
            if run.phase == 2:
                enter_phase2(run)
            else:
                attach_train_module(run)
            _loop(run, out_path, callbacks or [], progress, stop_after)
            summary = make_summary(run)
        if out_path is not None and run.ctx.is_main:
            write_outputs(run, out_path, summary)
    except BaseException:
        close_cache(run)
        if created and out_path.is_dir() and not any(out_path.iterdir()):
            out_path.rmdir()        # leave no empty folder behind a run that wrote nothing
        raise
    close_cache(run)
    barrier(run.ctx)
    return summary


def close_cache(run: Run) -> None:
    """Drop the run's feature cache and delete its files, if it has any."""
    if run.cache is not None:
        run.cache.close()
        run.cache = None


def check_out(out: str | Path | None) -> Path | None:
    """``out`` as a Path, refused when it cannot become the run's folder."""
    if out is None:
        return None
    if not isinstance(out, (str, Path)) or not str(out).strip():
        raise UserInputError(f"--out must name a folder, got {out!r}")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserInputError(f"--out {str(out)!r} exists and is not a folder; expected a folder "
                             "(new or from an earlier run)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserInputError(f"--out {str(out)!r} cannot be created: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"--out {str(out)!r} cannot be written: no write permission on "
                             f"{str(existing)!r}")
    return path


def _loop(run: Run, out: Path | None, callbacks: list[Callback], progress: bool,
          stop_after: int | None) -> None:
    s, every = run.schedule, run.config.checkpoint_every
    if run.step == 0 and not run.rows:
        log_row(run, callbacks)
    bar = _progress_bar(run, progress)
    last = s.total if stop_after is None else min(s.total, run.step + stop_after)
    while run.step < last:
        phase, started = run.phase, time.perf_counter()
        loss = train_step(run)
        run.step += 1
        run.seconds[f"phase{phase}"] += time.perf_counter() - started
        _check_finite(run, loss, phase, out)
        switched = phase == 1 and run.phase == 2
        if switched:
            _on_switch(run, out)
        if _should_log(run):
            row = log_row(run, callbacks)
            _check_finite(run, row["loss"], run.phase, out)
            if bar is not None:
                bar.set_postfix(phase=run.phase, loss=f"{row['loss']:.3g}",
                                error=row["train_error"] if row["train_error"] is None
                                else f"{row['train_error']:.3f}")
        if switched or (every and run.step % every == 0):     # after the log row: it holds
            write_checkpoint(run, out, phase)                   # the switch's alignment check
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    write_checkpoint(run, out)


def _on_switch(run: Run, out: Path | None) -> None:
    """Phase-2 set-up (feature cache), then the certificate on those features and the
    exploitation step; ``_loop`` writes the switch's checkpoint after its log row."""
    _check_parameters(run, 1, out)
    enter_phase2(run)
    started = time.perf_counter()
    run.certificate, failure = on_rank_zero(run, lambda: make_certificate(run))
    if failure is not None:
        raise NumericalError(f"certificate at the switch, step {run.step} (phase 1): {failure}; "
                             f"{_last_good(run, out)}. Lower --lr or check the data.")
    set_exploit_step(run)
    run.seconds["switch"] += time.perf_counter() - started


def _check_finite(run: Run, loss: float, phase: int, out: Path | None) -> None:
    if math.isfinite(loss):
        return
    raise NumericalError(f"training loss became {loss} at step {run.step} (phase {phase}); "
                         f"{_last_good(run, out)}. Lower --lr or check the data.")


def _check_parameters(run: Run, phase: int, out: Path | None) -> None:
    """A finite loss can still be followed by an update to inf/NaN parameters: never checkpoint
    (or certify) those."""
    named = list(run.model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]) if named else None
    if finite is not None and not bool(finite.all()):     # one device sync, not one per tensor
        bad = [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NumericalError(f"parameters became non-finite at step {run.step} (phase {phase}): "
                             f"{names}; {_last_good(run, out)}. Lower --lr or check the data.")


def _last_good(run: Run, out: Path | None) -> str:
    if out is not None and run.checkpoint_step is not None and (out / CHECKPOINT_NAME).exists():
        return (f"the last good checkpoint (step {run.checkpoint_step}) is kept in "
                f"{out / CHECKPOINT_NAME}")
    return "no checkpoint was written"


def _progress_bar(run: Run, progress: bool):
    if not progress or not run.ctx.is_main:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=run.schedule.total, initial=run.step, unit="step",
                desc=f"{run.config.method} {run.config.model} on {run.dataset.name}", leave=False)


def make_summary(run: Run) -> dict[str, Any]:
    last = run.rows[-1] if run.rows else evaluate(run)
    tracked = bool(run.config.track_alignment_every)
    return {"train_loss": last["loss"], "train_error": last["train_error"],
            "test_error": last["test_error"], "q_t": run.q_t if tracked else None,
            "alignment_checks": run.alignment_checks if tracked else None,
            "steps": run.step, "completed": run.step >= run.schedule.total,
            "switch_step": run.schedule.tau, "seconds": dict(run.seconds),
            "n": run.dataset.n, "data_note": run.dataset.note, "world_size": run.ctx.world,
            "config": run.config.to_dict(), "certificate": run.certificate}


def write_outputs(run: Run, out: Path, summary: dict[str, Any]) -> None:
    write_metrics(out / "metrics.csv", run.rows)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    plot_run(out, run.rows, run.schedule.tau,
             f"{run.config.method} · {run.config.model} · {run.dataset.name} (n={run.dataset.n})")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
