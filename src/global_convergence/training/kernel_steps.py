"""Exact (S)GD steps of the second phase in the n-dimensional span of its features.

Both second phases train a model that is *linear* in the trained weights, on features that do not
change (trunk frozen, gates frozen, output row fixed):

- EE exploitation ([K22] §3.2, eq. 3.4 after line 10 of Algorithm 1): per output ``j``,
  ``f_j(x_i) = Σ_k W(H)_{jk} σ̃(R_{jk}·z_i) (w_{jk}·z_i) = Φ_j(x_i) · vec(W(H−1, j))`` with
  ``Φ_j(x_i) = A_j[i] ⊗ z_i`` and ``A_j[i, k] = W(H)_{jk} σ̃(ς' R_{jk}·z_i)``;
- the two-phase method's phase 2 ([KS21] Algorithm 1): the output layer on ``Φ(x_i) = [h(x_i), 1]``.

A gradient of the training loss is ``Φᵀ g`` with ``g = ∂L/∂f`` (an n-vector per output), so
SGD — with momentum, Nesterov, weight decay, minibatches — never leaves
``span{w_τ, m_τ} ⊕ row(Φ)`` (``w_τ`` the weights and ``m_τ`` the momentum buffer where the engine
starts). We keep ``w_t = α_t w_τ + γ_t m_τ + Φᵀ c_t`` and the buffer ``β_t w_τ + δ_t m_τ + Φᵀ b_t``;
the outputs are ``f_t = α_t Φw_τ + γ_t Φm_τ + K c_t`` with the kernel
``K_j = Φ_j Φ_jᵀ = (A_j A_jᵀ) ⊙ (Z Zᵀ)`` (EE; the Gram of the safe-exploration features,
docs/verifiers.md) or ``K = h hᵀ + 1`` (two-phase). One step is a few operations on n-vectors
instead of a forward and backward pass through a head of ``m_H · m_{H−1}`` weights per output; the
weights are materialised (``Φᵀ c`` in factored form, never forming Φ) only when something reads
them: evaluation, a checkpoint, the end of the run.

The update is the one of ``torch.optim.SGD`` term by term, so the iterates are the optimizer's
own, computed in float64 (the float32 autograd step drifts from exact arithmetic by more than
this engine does). The coefficients live in the optimizer's state under the key
:data:`STATE_KEY` — not a parameter, so ``load_state_dict`` keeps them as saved, in float64 — and
a checkpoint of the optimizer carries them: a resumed run continues bit for bit. Where the identity does not hold or does not pay — another
optimizer (Adam, L-BFGS), several parameter groups, ``maximize``, DDP, augmentation or no feature
cache (features not fixed per input), a kernel over the memory budget — :func:`kernel_steps_for`
answers None and the autograd step is used. Measured speed: docs/performance.md ("Coefficient-space phase-2 steps").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import Loss
from ..models import GatedHead

if TYPE_CHECKING:
    from .build import Run

STATE_KEY = "kernel_steps"
"""Key of the engine's coefficients in ``optimizer.state`` (beside the per-parameter entries)."""
DTYPE = torch.float64
"""Precision of the engine's kernel, factors and coefficients."""
MAX_KERNEL_BYTES = 2 * 1024 ** 3
"""Default memory budget of the kernels and factors the engine keeps."""


# -- the linear second phase: Φ in factored form --------------------------------------------------
@dataclass
class FeatureMap:
    """``f = Φ w`` for the trained parameters ``params`` of a linear head, Φ kept in factors.

    ``left`` (q, n, a) and ``right`` (n, b): ``Φ_j(x_i) = left[j, i] ⊗ right[i]`` for EE
    (q = m_y outputs, a = m_H, b = m_{H−1}); for a linear head ``left`` is None and
    ``Φ(x_i) = right[i] = [h(x_i), 1]`` for every output.
    """

    params: list[nn.Parameter]
    left: torch.Tensor | None
    right: torch.Tensor

    @property
    def n(self) -> int:
        return self.right.shape[0]

    def kernel(self) -> torch.Tensor:
        """``K_j = Φ_j Φ_jᵀ`` of shape (q, n, n)."""
        gram = self.right @ self.right.T
        if self.left is None:
            return gram[None]
        return torch.bmm(self.left, self.left.transpose(1, 2)) * gram

    def outputs(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``Φ w`` (n, m_y) for parameter-shaped ``tensors`` (the weights, or a momentum buffer)."""
        tensors = [t.to(self.right.dtype) for t in tensors]
        if self.left is None:
            weight = _linear_matrix(tensors, self.right.shape[1])
            return self.right @ weight.T
        pre = torch.einsum("il,jkl->jik", self.right, tensors[0])
        return (pre * self.left).sum(dim=2).T

    def transpose(self, c: torch.Tensor) -> list[torch.Tensor]:
        """``Φᵀ c`` as parameter-shaped tensors, for coefficients ``c`` of shape (n, m_y)."""
        if self.left is None:
            weight = c.T @ self.right                      # (m_y, m_H [+ 1])
            return _split_linear(weight, self.params)
        scaled = self.left * c.T[:, :, None]               # (m_y, n, m_H)
        return [torch.bmm(scaled.transpose(1, 2), self.right.expand(len(scaled), -1, -1))]


def _linear_matrix(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """``[W, b]`` of a linear layer (``W`` alone when it has no bias)."""
    weight = tensors[0]
    return torch.cat([weight, tensors[1][:, None]], dim=1) if width > weight.shape[1] else weight


def _split_linear(matrix: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    inputs = params[0].shape[1]
    parts = [matrix[:, :inputs]]
    if len(params) > 1:
        parts.append(matrix[:, inputs])
    return [p.contiguous() for p in parts]


def ee_feature_map(head: GatedHead, features: torch.Tensor, dtype: torch.dtype = DTYPE) -> FeatureMap:
    """Φ of the EE head after the switch: gates ``R(j)`` and ``W(H)`` fixed, ``w_{jk}`` trained.
    The gates are evaluated as the head's forward pass does (its dtype), then widened."""
    with torch.no_grad():
        z = head.augmented_input(features.flatten(1).to(head.weight.dtype))
        gates = torch.sigmoid(head.gate_sharpness * head.preactivations(z, head.gates))
        left = (gates * head.out_weight).permute(1, 0, 2)                  # (m_y, n, m_H)
    return FeatureMap([head.weight], left.to(dtype).contiguous(), z.to(dtype))


def linear_feature_map(head: nn.Linear, features: torch.Tensor, dtype: torch.dtype = DTYPE) -> FeatureMap:
    """Φ of the two-phase output layer: ``[h, 1]`` (``h`` alone without a bias)."""
    h = features.flatten(1).to(dtype)
    if head.bias is not None:
        h = torch.cat([h, h.new_ones(len(h), 1)], dim=1)
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    return FeatureMap(params, None, h)


# -- the loss on the outputs ----------------------------------------------------------------------
def loss_and_gradient(loss: Loss, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-mean loss and its gradient ``∂L/∂f`` (batch, m_y) in closed form (the losses of
    docs/design.md: binary cross-entropy on one logit, softmax cross-entropy, squared error)."""
    return _loss_and_gradient(loss, out, prepare_targets(loss, y, out.dtype))


def prepare_targets(loss: Loss, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Targets in the form the closed-form loss reads: ``y`` and the sign ``2y − 1`` as two
    columns (binary), regression targets (squared error), or the class labels."""
    if loss.kind == "mse":
        return loss._regression_targets(y, dtype)
    if loss.output_dim == 1:
        y = y.to(dtype).reshape(-1, 1)
        return torch.cat([y, 2 * y - 1], dim=1)
    return y


def _loss_and_gradient(loss: Loss, out: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = len(out)
    if loss.kind == "mse":
        residual = out - t
        return residual.pow(2).sum() / b, residual.mul_(2.0 / b)
    if loss.output_dim == 1:         # ℓ = −log σ(s f), s = 2y − 1;  ∂ℓ/∂f = σ(f) − y
        value = F.logsigmoid(out * t[:, 1:]).mean().neg()
        return value, torch.sigmoid(out).sub_(t[:, :1]).div_(b)
    value = F.cross_entropy(out, t)
    grad = torch.softmax(out, dim=1)
    grad[torch.arange(b), t] -= 1.0
    return value, grad / b


# -- the engine -----------------------------------------------------------------------------------
def _own_copy(saved: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The coefficients of a loaded optimizer state as the engine's own tensors on ``device``:
    ``Optimizer.load_state_dict`` keeps a non-parameter entry as given (the caller's objects, on
    the device it was loaded to, e.g. the CPU of ``torch.load(map_location="cpu")``), and the
    engine updates its tensors in place."""
    def own(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device=device, dtype=DTYPE, copy=True)
        if isinstance(value, list):
            return [own(v) for v in value]
        return value
    return {key: own(value) for key, value in saved.items()}


class KernelSteps:
    """``torch.optim.SGD`` on a linear second phase, in coefficient space (see the module text).

    ``step(index)`` takes the step of the minibatch ``index`` and returns its loss before the step
    (as the closure of the autograd path does); :meth:`write_back` materialises the weights into
    the parameters and the momentum buffer into the optimizer's state.
    """

    def __init__(self, feature_map: FeatureMap, optimizer: torch.optim.SGD, targets: torch.Tensor,
                 loss: Loss) -> None:
        self.map, self.optimizer, self.loss = feature_map, optimizer, loss
        self.params = feature_map.params
        self.y = prepare_targets(loss, targets, feature_map.right.dtype)
        self.kernel = feature_map.kernel()
        self.kernel_2d = self.kernel[0]
        self.group = optimizer.param_groups[0]
        saved = optimizer.state.get(STATE_KEY)
        optimizer.state[STATE_KEY] = self._fresh_state() if saved is None else \
            _own_copy(saved, feature_map.right.device)
        self.state: dict[str, Any] = optimizer.state[STATE_KEY]
        self._anchor_outputs()
        self.n = feature_map.n

    def _fresh_state(self) -> dict[str, Any]:
        """Start from the current weights ``w_τ = 1·w_τ`` and momentum buffers ``m_τ = 1·m_τ``
        (``α = 1, γ = 0, c = 0``; ``β = 0, δ = 1, b = 0``)."""
        buffers = [self.optimizer.state[p].get("momentum_buffer") for p in self.params]
        dtype = self.map.right.dtype
        momentum = None if any(b is None for b in buffers) else [b.detach().to(dtype) for b in buffers]
        c = self.map.right.new_zeros(self.map.n, self._outputs())
        return {"anchor": [p.detach().to(dtype) for p in self.params], "anchor_momentum": momentum,
                "coef": c, "scale": [1.0, 0.0],
                "buffer": None if momentum is None else torch.zeros_like(c),
                "buffer_scale": [0.0, 1.0 if momentum is not None else 0.0]}

    def _outputs(self) -> int:
        return self.params[0].shape[0]

    def _anchor_outputs(self) -> None:
        with torch.no_grad():
            self.f_w = self.map.outputs(self.state["anchor"])
            momentum = self.state["anchor_momentum"]
            self.f_m = self.map.outputs(momentum) if momentum is not None else torch.zeros_like(self.f_w)

    def outputs(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Current outputs ``f = α Φw_τ + γ Φm_τ + K c`` on the training inputs ``index``."""
        s = self.state
        alpha, gamma = s["scale"]
        base = self.f_w if index is None else self.f_w[index]
        if self.kernel.shape[0] == 1:            # one kernel for every output: α f_w + K c at once
            kernel = self.kernel_2d if index is None else self.kernel_2d[index]
            out = torch.addmm(base, kernel, s["coef"], beta=alpha)
        else:
            kernel = self.kernel if index is None else self.kernel[:, index]
            out = torch.bmm(kernel, s["coef"].T[:, :, None])[:, :, 0].T.add_(base, alpha=alpha)
        if gamma == 0.0:
            return out
        return out.add_(self.f_m if index is None else self.f_m[index], alpha=gamma)

    @torch.no_grad()
    def step(self, index: torch.Tensor) -> float:
        """One SGD step on the minibatch ``index`` (global indices into the training set)."""
        g = self.group
        lr, mu, wd = g["lr"], g["momentum"], g["weight_decay"]
        damp, nesterov = g["dampening"], g["nesterov"]
        s = self.state
        full = len(index) == self.n
        value, grad_out = _loss_and_gradient(self.loss, self.outputs(None if full else index),
                                             self.y if full else self.y[index])
        # grad = Φᵀ g + λ w in coefficient form: (g scattered on the batch + λ c, λ α, λ γ)
        if full:
            gc = grad_out if wd == 0 else grad_out.add(s["coef"], alpha=wd)
        else:
            gc = s["coef"] * wd if wd != 0 else torch.zeros_like(s["coef"])
            gc.index_add_(0, index, grad_out)
        gs = [wd * v for v in s["scale"]]
        if mu != 0:
            if s["buffer"] is None:
                s["buffer"], s["buffer_scale"] = gc.clone(), list(gs)
            else:
                s["buffer"].mul_(mu).add_(gc, alpha=1 - damp)
                s["buffer_scale"] = [mu * b + (1 - damp) * v for b, v in zip(s["buffer_scale"], gs)]
            if nesterov:
                gc = gc.add(s["buffer"], alpha=mu)
                gs = [v + mu * b for v, b in zip(gs, s["buffer_scale"])]
            else:
                gc, gs = s["buffer"], s["buffer_scale"]
        s["coef"].add_(gc, alpha=-lr)
        s["scale"] = [v - lr * d for v, d in zip(s["scale"], gs)]
        return float(value)

    def _materialise(self, coef: torch.Tensor, scale: list[float]) -> list[torch.Tensor]:
        """``a w_τ + b m_τ + Φᵀ coef`` as parameter-shaped tensors."""
        parts = self.map.transpose(coef)
        momentum = self.state["anchor_momentum"]
        for k, part in enumerate(parts):
            part.add_(self.state["anchor"][k], alpha=scale[0])
            if momentum is not None and scale[1] != 0.0:
                part.add_(momentum[k], alpha=scale[1])
        return parts

    @torch.no_grad()
    def write_back(self) -> None:
        """Weights into the parameters; the momentum buffer into the optimizer's state."""
        for p, value in zip(self.params, self._materialise(self.state["coef"], self.state["scale"])):
            p.copy_(value)
        if self.state["buffer"] is not None:
            buffers = self._materialise(self.state["buffer"], self.state["buffer_scale"])
            for p, value in zip(self.params, buffers):
                self.optimizer.state[p]["momentum_buffer"] = value.to(p.dtype)


# -- where the identity holds ---------------------------------------------------------------------
def kernel_steps_reason(optimizer: torch.optim.Optimizer, head: nn.Module, n: int,
                        max_kernel_bytes: int = MAX_KERNEL_BYTES) -> str | None:
    """Why the coefficient-space step does not apply (None: it applies)."""
    if type(optimizer) is not torch.optim.SGD:
        return f"{type(optimizer).__name__} is not plain SGD"
    if len(optimizer.param_groups) != 1:
        return "several parameter groups"
    group = optimizer.param_groups[0]
    if group.get("maximize"):
        return "maximize=True"
    trained = _trained_params(head)
    if trained is None:
        return f"the head {type(head).__name__} is neither a GatedHead nor an nn.Linear"
    if [id(p) for p in group["params"]] != [id(p) for p in trained]:
        return "the optimizer does not hold exactly the head's trained parameters"
    weight = trained[0]
    if isinstance(head, GatedHead):                 # K (m_y, n, n), A (m_y, n, m_H), Z (n, m_{H−1})
        outputs, width, inputs = weight.shape
        count = outputs * n * (n + width) + n * inputs
    else:                                           # K (1, n, n), [h, 1] (n, m_H + 1)
        count = n * n + n * (weight.shape[1] + 1)
    size = count * torch.finfo(DTYPE).bits // 8
    if size > max_kernel_bytes:
        return f"the kernel would need {size / 2**30:.1f} GiB (budget {max_kernel_bytes / 2**30:.1f} GiB)"
    return None


def _trained_params(head: nn.Module) -> list[nn.Parameter] | None:
    if isinstance(head, GatedHead):
        return [head.weight]
    if isinstance(head, nn.Linear):
        return [head.weight] + ([head.bias] if head.bias is not None else [])
    return None


def build_kernel_steps(optimizer: torch.optim.Optimizer, head: nn.Module, features: torch.Tensor,
                       targets: torch.Tensor, loss: Loss, *,
                       max_kernel_bytes: int = MAX_KERNEL_BYTES) -> KernelSteps | None:
    """The engine for ``head`` trained by ``optimizer`` on fixed ``features`` of the training
    inputs, or None where it does not apply (:func:`kernel_steps_reason`)."""
    if kernel_steps_reason(optimizer, head, len(features), max_kernel_bytes) is not None:
        return None
    feature_map = (ee_feature_map(head, features) if isinstance(head, GatedHead)
                   else linear_feature_map(head, features))
    return KernelSteps(feature_map, optimizer, targets, loss)


def kernel_steps_for(run: "Run", *, max_kernel_bytes: int = MAX_KERNEL_BYTES) -> KernelSteps | None:
    """The engine of a run's second phase where it is exact: a wrapper in phase 2 with a feature
    cache (no augmentation), one process, no autocast; else None (the autograd step), and the
    coefficients a checkpoint may hold are dropped: the autograd steps leave them stale, and a
    later resume would start from them."""
    engine = _run_engine(run, max_kernel_bytes)
    if engine is None and run.wrapper is not None:
        run.wrapper.active_optimizer.state.pop(STATE_KEY, None)
    return engine


def _run_engine(run: "Run", max_kernel_bytes: int) -> KernelSteps | None:
    if run.wrapper is None or run.phase != 2 or run.cache is None or run.ctx.distributed:
        return None
    if run.config.amp and run.ctx.device.type == "cuda":
        return None
    return build_kernel_steps(run.wrapper.active_optimizer, run.split.head,
                              run.cache.train_tensor().to(run.ctx.device), run.y, run.loss,
                              max_kernel_bytes=max_kernel_bytes)
