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

One full-batch step costs three operations. The gradient is ``∂L/∂f = s (h(f) − T)`` (``h`` the
sigmoid, the softmax or the identity, ``T`` the targets, ``s = 1/b`` or ``2/b``;
:mod:`.kernel_features`), and the constant ``−s T`` of every full-batch step is carried by one
more scale: ``c_t = d_t + τ_t T``. All scales and coefficients form one matrix ``C = [d; α; γ; τ]``
(``α I`` blocks where one kernel serves all outputs) and the kernel is widened to
``K̂ = [K, Φw_τ, Φm_τ, K T]``, so that a step is ``f = K̂ C`` (one product), ``h(f)`` (one
activation, written into the top of ``e = [h(f); 0; 0; −I]``) and ``C ← C − lr s e`` (one scaled
add; weight decay ``λ C`` and the momentum buffer ``B = [b; β; δ; τ']`` are the same linear
update of ``C`` and ``B``). The loop calls :meth:`KernelSteps.steps` with a block of steps up to
the next one it acts at (docs/performance.md); a block keeps its outputs and computes the losses
of all its steps at its end.

The update is the one of ``torch.optim.SGD`` term by term, so the iterates are the optimizer's
own, computed in float64 (the float32 autograd step drifts from exact arithmetic by more than
this engine does). The coefficients live in the optimizer's state under the key
:data:`STATE_KEY` — not a parameter, so ``load_state_dict`` keeps them as saved, in float64 — and
a checkpoint of the optimizer carries them: a resumed run continues bit for bit. Where the
identity does not hold or does not pay — another
optimizer (Adam, L-BFGS), several parameter groups, ``maximize``, DDP, augmentation or no feature
cache (features not fixed per input), a kernel over the memory budget — :func:`kernel_steps_for`
answers None and the autograd step is used. Measured speed: docs/performance.md
("Coefficient-space phase-2 steps").
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..losses import Loss
from ..models import GatedHead
from .kernel_features import (DTYPE, FeatureMap, activate, block_losses, ee_feature_map,
                              gradient_scale, linear_feature_map, loss_and_gradient, prepare_targets,
                              residual_targets)

if TYPE_CHECKING:
    from .build import Run

__all__ = ["BLOCK_OUTPUT_BYTES", "DTYPE", "MAX_KERNEL_BYTES", "STATE_KEY", "FeatureMap", "KernelSteps",
           "build_kernel_steps", "ee_feature_map", "kernel_steps_for", "kernel_steps_reason",
           "linear_feature_map", "loss_and_gradient", "prepare_targets"]

STATE_KEY = "kernel_steps"
"""Key of the engine's coefficients in ``optimizer.state`` (beside the per-parameter entries)."""
MAX_KERNEL_BYTES = 2 * 1024 ** 3
"""Default memory budget of the kernels and factors the engine keeps."""


# -- the engine -----------------------------------------------------------------------------------
BLOCK_OUTPUT_BYTES = 64 * 1024 ** 2
"""Default memory budget of the outputs a block keeps for its losses (longer blocks are split)."""


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

    :meth:`steps` takes a block of steps in one call and returns their losses (before each step,
    as the closure of the autograd path does); ``step(index)`` is a block of one. How a run is
    cut into blocks does not change the arithmetic of a step: the iterates are the same, bit for
    bit. :meth:`write_back` materialises the weights into the parameters and the momentum buffer
    into the optimizer's state.
    """

    def __init__(self, feature_map: FeatureMap, optimizer: torch.optim.SGD, targets: torch.Tensor,
                 loss: Loss) -> None:
        self.map, self.optimizer, self.loss = feature_map, optimizer, loss
        self.params = feature_map.params
        self.n, self.m = feature_map.n, self.params[0].shape[0]
        self.y = prepare_targets(loss, targets, feature_map.right.dtype)
        self.targets = residual_targets(loss, self.y, self.m)
        self.group = optimizer.param_groups[0]
        saved = optimizer.state.get(STATE_KEY)
        state = self._fresh_state() if saved is None else _own_copy(saved, feature_map.right.device)
        self.shared = feature_map.left is None or self.m == 1     # one kernel for every output
        width = self.m if self.shared else 1
        self.scale_rows = tuple(self.n + k * width for k in range(3))
        self.kernel = self._widened_kernel(state)
        self.coef = self._pack(state["coef"], [*state["scale"], state.get("target_scale", 0.0)])
        self.buffer = None if state["buffer"] is None else \
            self._pack(state["buffer"], [*state["buffer_scale"], state.get("buffer_target_scale", 0.0)])
        self.full_residual = self._pack(torch.zeros_like(state["coef"]), [0.0, 0.0, -1.0])
        self.state: dict[str, Any] = state
        optimizer.state[STATE_KEY] = state
        self._store()

    def _fresh_state(self) -> dict[str, Any]:
        """Start from the current weights ``w_τ = 1·w_τ`` and momentum buffers ``m_τ = 1·m_τ``
        (``α = 1, γ = 0, c = 0``; ``β = 0, δ = 1, b = 0``)."""
        buffers = [self.optimizer.state[p].get("momentum_buffer") for p in self.params]
        dtype = self.map.right.dtype
        momentum = None if any(b is None for b in buffers) else [b.detach().to(dtype) for b in buffers]
        c = self.map.right.new_zeros(self.n, self.m)
        return {"anchor": [p.detach().to(dtype) for p in self.params], "anchor_momentum": momentum,
                "coef": c, "scale": [1.0, 0.0], "target_scale": 0.0,
                "buffer": None if momentum is None else torch.zeros_like(c),
                "buffer_scale": [0.0, 1.0 if momentum is not None else 0.0], "buffer_target_scale": 0.0}

    def _widened_kernel(self, state: dict[str, Any]) -> torch.Tensor:
        """``K̂ = [K, Φw_τ, Φm_τ, K T]``: (n, n + 3 m_y) for one shared kernel (each extra part a
        block of m_y columns), (m_y, n, n + 3) for one kernel per output."""
        with torch.no_grad():
            f_w = self.map.outputs(state["anchor"])
            momentum = state["anchor_momentum"]
            f_m = self.map.outputs(momentum) if momentum is not None else torch.zeros_like(f_w)
            n, m = self.n, self.m
            if self.shared:             # the columns after K: Φw_τ, Φm_τ, K T, m_y of each
                wide = self.map.kernel(extra=3 * m)[0]
                kernel, tail = wide[:, :n], wide[:, n:].view(n, 3, m)
                tail[:, 0], tail[:, 1] = f_w, f_m
                tail[:, 2] = kernel @ self.targets
                return wide
            wide = self.map.kernel(extra=3)
            wide[:, :, n], wide[:, :, n + 1] = f_w.T, f_m.T
            for j in range(m):          # K_j T_j on the kernel's own slice: no copy of it
                wide[j, :, n + 2] = torch.mv(wide[j, :, :n], self.targets[:, j])
            return wide

    def _pack(self, coef: torch.Tensor, scale: list[float]) -> torch.Tensor:
        """``C`` (P, m_y): coefficients ``d`` (n, m_y) on top, then the scales ``[α, γ, τ]`` (as
        ``α I`` blocks for one shared kernel, as rows for one kernel per output)."""
        packed = coef.new_zeros(self.kernel.shape[-1], self.m)
        packed[:self.n] = coef
        for first, value in zip(self.scale_rows, scale):
            if self.shared:
                packed[first:first + self.m].diagonal().fill_(value)
            else:
                packed[first].fill_(value)
        return packed

    def _scales(self, packed: torch.Tensor) -> list[float]:
        return packed[list(self.scale_rows), 0].tolist()

    def _store(self) -> None:
        """The optimizer's state entry (what a checkpoint saves): ``d`` and ``b`` (views), the
        scales as numbers."""
        s = self.state
        s["coef"], (*s["scale"], s["target_scale"]) = self.coef[:self.n], self._scales(self.coef)
        if self.buffer is not None:
            s["buffer"] = self.buffer[:self.n]
            *s["buffer_scale"], s["buffer_target_scale"] = self._scales(self.buffer)

    def outputs(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Current outputs ``f = K̂ C`` (n or batch, m_y) on the training inputs ``index``."""
        return self._outputs(self.kernel if index is None else self.kernel[..., index, :])

    def _outputs(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.shared:
            return torch.mm(rows, self.coef, out=out)
        value = torch.bmm(rows, self.coef.T[:, :, None])[:, :, 0].T
        return value if out is None else out.copy_(value)

    @torch.no_grad()
    def step(self, index: torch.Tensor) -> float:
        """One SGD step on the minibatch ``index`` (global indices; all n of them: the full batch)."""
        return float(self.steps(1, None if len(index) == self.n else [index])[0])

    @torch.no_grad()
    def steps(self, count: int, indices: list[torch.Tensor] | None = None, *,
              max_output_bytes: int = BLOCK_OUTPUT_BYTES) -> torch.Tensor:
        """``count`` SGD steps, on the full batch (``indices`` None) or on the minibatches
        ``indices`` (global indices into the training set, one tensor per step); returns the
        float64 losses (count,) before each step. The outputs of the steps are kept (at most
        ``max_output_bytes`` at once) and their losses computed together."""
        if indices is not None and len(indices) != count:
            raise ValueError(f"{len(indices)} minibatches for {count} steps")
        parts, done = [], 0
        while done < count:
            size = self.n if indices is None else len(indices[done])
            length = max(1, min(count - done, max_output_bytes // (8 * size * self.m)))
            if indices is not None:     # one batch size per block
                length = next((k for k in range(1, length) if len(indices[done + k]) != size), length)
            parts.append(self._block(length, None if indices is None else indices[done:done + length]))
            done += length
        self._store()
        return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else self.coef.new_empty(0)

    def _block(self, count: int, indices: list[torch.Tensor] | None) -> torch.Tensor:
        size = self.n if indices is None else len(indices[0])
        outs = self.coef.new_empty(count, size, self.m)
        scale = gradient_scale(self.loss, size)
        if indices is None:             # e = [h(f); 0; 0; −I]: the −T of the residual lives in τ
            e, top = self.full_residual, self.full_residual[:self.n]
            for out in outs.unbind(0):
                activate(self.loss, self._outputs(self.kernel, out=out), into=top)
                self._update(e, scale)
            return block_losses(self.loss, outs, self.y.expand(count, *self.y.shape))
        e = torch.empty_like(self.coef)
        for out, index in zip(outs.unbind(0), indices):
            residual = activate(self.loss, self._outputs(self.kernel[..., index, :], out=out))
            e.zero_()[:self.n].index_add_(0, index, residual.sub_(self.targets[index]))
            self._update(e, scale)
        return block_losses(self.loss, outs, self.y[torch.stack(indices)])

    def _update(self, e: torch.Tensor, scale: float) -> None:
        """``torch.optim.SGD``'s update of ``C`` for the gradient ``G = s e + λ C``."""
        g, coef, buffer = self.group, self.coef, self.buffer
        lr, mu, wd, damp = g["lr"], g["momentum"], g["weight_decay"], g["dampening"]
        if mu == 0:                                     # C ← (1 − lr λ) C − lr s e
            if wd != 0:
                coef.mul_(1 - lr * wd)
            coef.add_(e, alpha=-lr * scale)
            return
        if buffer is not None and not g["nesterov"]:    # B ← μ B + (1 − d) G; C ← C − lr B
            buffer.mul_(mu).add_(e, alpha=(1 - damp) * scale)
            if wd != 0:
                buffer.add_(coef, alpha=(1 - damp) * wd)
            coef.add_(buffer, alpha=-lr)
            return
        grad = torch.mul(e, scale)
        if wd != 0:
            grad.add_(coef, alpha=wd)
        if buffer is None:                              # the first step: B = G
            self.buffer = buffer = grad
        else:
            buffer.mul_(mu).add_(grad, alpha=1 - damp)
        if g["nesterov"]:                               # C ← C − lr (G + μ B)
            coef.add_(grad, alpha=-lr)
        coef.add_(buffer, alpha=-lr * mu if g["nesterov"] else -lr)

    def _materialise(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """``α w_τ + γ m_τ + Φᵀ (d + τ T)``, parameter-shaped, for ``C = [d; α; γ; τ]``."""
        alpha, gamma, tau = self._scales(packed)
        parts = self.map.transpose(torch.add(packed[:self.n], self.targets, alpha=tau))
        momentum = self.state["anchor_momentum"]
        for k, part in enumerate(parts):
            part.add_(self.state["anchor"][k], alpha=alpha)
            if momentum is not None and gamma != 0.0:
                part.add_(momentum[k], alpha=gamma)
        return parts

    @torch.no_grad()
    def write_back(self) -> None:
        """Weights into the parameters; the momentum buffer into the optimizer's state."""
        for p, value in zip(self.params, self._materialise(self.coef)):
            p.copy_(value)
        if self.buffer is not None:
            for p, value in zip(self.params, self._materialise(self.buffer)):
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
    outputs = weight.shape[0]                       # K̂ (m_y, n, n + 3) or (n, n + 3 m_y)
    if isinstance(head, GatedHead):                 # A (m_y, n, m_H), Z (n, m_{H−1})
        _, width, inputs = weight.shape
        count = (n * (n + 3 * outputs) if outputs == 1 else outputs * n * (n + 3)) \
            + outputs * n * width + n * inputs
    else:                                           # [h, 1] (n, m_H + 1)
        count = n * (n + 3 * outputs) + n * (weight.shape[1] + 1)
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
