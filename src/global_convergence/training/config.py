"""The options of ``gconv train`` as one validated dataclass, and the step schedule."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import UserInputError
from ..losses import LOSS_NAMES
from ..models import MODEL_NAMES
from ..wrappers import EXPLOIT_CHOICES

METHODS = ("base", "two-phase", "ee")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("cpu", "cuda")
ACTIVATIONS = ("softplus", "relu")
"""Hidden activation of the built-in models: softplus(ς=100) is real analytic, as both theorems
assume ([KS21] §5.2, [K22] Assumption 12); ``relu`` is not, so ``two-phase`` and ``ee``
refuse it unless ``allow_non_analytic`` (then the certificate says that the guarantee does not
apply). ``relu`` is there for baselines and for that refusal."""
CERTIFICATE_PRECISIONS = ("auto", "float64")
CERTIFICATE_MODES = ("auto", "full", "off")
MAX_SEED = 2**32 - 1
FEATURE_CACHES = ("auto", "memory", "disk", "off")
DATA_PLACEMENTS = ("auto", "yes", "no")


@dataclass
class TrainConfig:
    """Every option of a training run. Defaults are the [K22] ResNet setting (§3.4.2: SGD, lr 0.1,
    momentum 0.9, weight decay 1e-5, batch 64)."""

    data: str = "sine"
    model: str = "mlp"
    method: str = "base"
    activation: str = "softplus"
    seed: int = 0
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 64
    epochs: int | None = None
    steps: int | None = None
    tau0: float = 0.6
    tau: int | None = None
    eps: float = 1e-3
    delta0: float = 1e-3
    exploit_optimizer: str = "same"
    exploit_lr: float | str | None = None
    """Step of a gradient exploitation optimizer from the switch on: None keeps ``lr``; ``"auto"``
    takes the step ``1/L`` of the certificate ([KS21] ``1/L_H``, [K22] ``1/L̂``), the largest its
    theorem allows; a number sets it. Not for L-BFGS (its line search sets the step)."""
    certificate_precision: str = "auto"
    """Features of the certificate at the switch: ``auto`` decides from the float32 features
    (the phase-2 cache) with their measured error counted as a noise floor and recomputes them in
    float64 only when that does not verify (without a cache — augmentation, ``feature_cache="off"``
    — and on CUDA, where the attempt costs more than it saves, it computes float64 features at
    once); ``float64`` always recomputes (docs/verifiers.md)."""
    certificate: str = "auto"
    """The certificate at the switch: ``auto`` decides by the cheap routes and a bounded fallback,
    else reports *inconclusive* with the reason (``gconv verify --checkpoint`` then decides);
    ``full`` decides whatever it costs; ``off`` makes none (``"certificate": null``)."""
    loss: str = "ce"
    n: int | None = None
    augment: bool = False
    width: int = 1
    head_width: int | None = None
    noise: float | None = None
    holdout: float | None = None
    """Hold out this fraction of the training split (fixed seed) as the evaluation set, whose
    error is then reported as ``test_error``: the 80/20 selection split of [K22] §3.4."""
    wide_layer: bool = False
    """``method="base"`` on the two-phase architecture (``two_phase_model``'s wide last hidden
    layer), as [KS21] §7 compares base and A(base) on one network."""
    track_alignment_every: int | None = None
    checkpoint_every: int | None = None
    log_every: int | None = None
    device: str = "cpu"
    data_root: str | None = None
    download: bool = False
    cache_features: bool = True
    """False: no phase-2 feature cache (the same as ``feature_cache="off"``)."""
    feature_cache: str = "auto"
    """Where phase 2 keeps the frozen trunk's features of every input: ``memory``, ``disk`` (a
    float32 ``.npy`` file in the run's folder, or a temporary one, written chunk by chunk, read
    per batch, removed at the end), ``off`` (the trunk runs in every step) or ``auto`` (memory
    up to ``training.storage.memory_budget``, disk above)."""
    data_on_device: str = "auto"
    """CUDA only: ``yes`` copies the inputs to the GPU; ``no`` keeps them in pinned CPU memory and
    copies each batch; ``auto``: yes when they take at most half the free GPU memory."""
    allow_non_analytic: bool = False
    amp: bool = False
    channels_last: bool = False
    compile: bool = False

    @property
    def feature_cache_mode(self) -> str:
        """``feature_cache``, or ``off`` when ``cache_features`` is False."""
        return self.feature_cache if self.cache_features else "off"

    def _validate_exploit_lr(self) -> None:
        value = self.exploit_lr
        if value is None:
            return
        if value != "auto" and not (_is_number(value) and value > 0):
            raise UserInputError(f"--exploit-lr must be a positive number or 'auto', got {value!r}")
        if self.method == "base":
            raise UserInputError("--exploit-lr sets the step of the second phase; --method base "
                                 "has none")
        if value == "auto" and self.certificate == "off":
            raise UserInputError("--exploit-lr auto takes the certificate's step 1/L, but "
                                 "--certificate off makes none; give a number or --certificate auto")
        if self.method == "ee" and self.exploit_optimizer == "lbfgs":
            raise UserInputError("--exploit-lr does not apply to --exploit-optimizer lbfgs: its "
                                 "line search sets the step")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> "TrainConfig":
        """Check every option that can be checked without data; raise UserInputError."""
        _one_of(self.model, MODEL_NAMES, "model")
        _one_of(self.method, METHODS, "method")
        _one_of(self.optimizer, OPTIMIZERS, "optimizer")
        _one_of(self.loss, LOSS_NAMES, "loss")
        _one_of(self.exploit_optimizer, EXPLOIT_CHOICES, "exploit-optimizer")
        _one_of(self.device, DEVICES, "device")
        _one_of(self.activation, ACTIVATIONS, "activation")
        _one_of(self.certificate_precision, CERTIFICATE_PRECISIONS, "certificate-precision")
        _one_of(self.certificate, CERTIFICATE_MODES, "certificate")
        self._validate_exploit_lr()
        _one_of(self.feature_cache, FEATURE_CACHES, "feature-cache")
        _one_of(self.data_on_device, DATA_PLACEMENTS, "data-on-device")
        if not self.cache_features and self.feature_cache in ("memory", "disk"):
            raise UserInputError(f"--no-cache-features contradicts --feature-cache "
                                 f"{self.feature_cache}; give only one of them")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise UserInputError(f"--seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        _positive(self.lr, "lr")
        _non_negative(self.momentum, "momentum")
        _non_negative(self.weight_decay, "weight-decay")
        _positive(self.eps, "eps")
        _positive(self.delta0, "delta0")
        if self.holdout is not None and not (isinstance(self.holdout, float) and 0.0 < self.holdout < 1.0):
            raise UserInputError(f"holdout must be a fraction 0 < holdout < 1, got {self.holdout}")
        if not _is_int(self.batch_size) or self.batch_size < 0:
            raise UserInputError(f"--batch-size must be an integer >= 0 (0 means full batch), "
                                 f"got {self.batch_size!r}")
        if (self.epochs is None) == (self.steps is None):
            raise UserInputError("give exactly one of --epochs and --steps")
        _positive_int(self.epochs if self.epochs is not None else self.steps,
                      "epochs" if self.epochs is not None else "steps")
        if self.tau is None and not (_is_number(self.tau0) and 0.0 < self.tau0 < 1.0):
            raise UserInputError(f"--tau0 must satisfy 0 < tau0 < 1, got {self.tau0!r}")
        if self.tau is not None:
            _positive_int(self.tau, "tau")
            run = self.epochs if self.epochs is not None else self.steps
            unit = "epochs" if self.epochs is not None else "steps"
            if not 0 < self.tau < run:
                raise UserInputError(f"--tau {self.tau} is outside the run: it must satisfy "
                                     f"0 < tau < T = {run} {unit}")
        for value, name in ((self.width, "width"), (self.head_width, "head-width"),
                            (self.track_alignment_every, "track-alignment-every"),
                            (self.checkpoint_every, "checkpoint-every"), (self.log_every, "log-every")):
            if value is not None:
                _positive_int(value, name)
        if self.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise UserInputError("--device cuda was asked for but no CUDA device is available")
        return self


@dataclass(frozen=True)
class Schedule:
    """Steps of a run: ``total`` steps of ``batch`` samples, switch after ``tau`` steps."""

    n: int
    batch: int
    steps_per_epoch: int
    total: int
    tau: int | None
    log_every: int

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def make_schedule(config: TrainConfig, n: int) -> Schedule:
    """Turn epochs/steps, τ/τ0 and the batch size into step counts (``tau`` is in the run's unit: steps or epochs)."""
    batch = n if config.batch_size in (0, None) or config.batch_size >= n else config.batch_size
    per_epoch = math.ceil(n / batch)
    total = config.epochs * per_epoch if config.epochs is not None else config.steps
    tau = None
    if config.method != "base":
        if config.tau is not None:
            tau = config.tau * per_epoch if config.epochs is not None else config.tau
        else:
            tau = max(1, round(config.tau0 * total))
        if not 0 < tau < total:
            raise UserInputError(f"the switch at step {tau} is outside the run of {total} steps")
    log_every = config.log_every or (per_epoch if config.epochs is not None else max(1, total // 200))
    return Schedule(n, batch, per_epoch, total, tau, log_every)


def _one_of(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise UserInputError(f"unknown --{name} '{value}'; expected one of {', '.join(choices)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: float, name: str) -> None:
    if not (_is_number(value) and value > 0):
        raise UserInputError(f"--{name} must be a positive number, got {value!r}")


def _non_negative(value: float, name: str) -> None:
    if not (_is_number(value) and value >= 0):
        raise UserInputError(f"--{name} must be >= 0, got {value!r}")


def _positive_int(value: int, name: str) -> None:
    if not _is_int(value) or value < 1:
        raise UserInputError(f"--{name} must be a positive integer, got {value!r}")
