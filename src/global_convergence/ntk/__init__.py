"""Jacobians and empirical neural tangent kernels of any ``nn.Module`` ([K22] §2; docs/performance.md, "Empirical NTK").

``J(θ) = ∂ vec(f_X(θ)) / ∂θ ∈ R^{(n·m_y)×d}`` where ``f_X ∈ R^{n×m_y}`` stacks the model's
outputs (logits) on the n inputs, ``vec`` stacks *columns* (row ``j·n + i`` is sample i, output j;
0-based), and θ are the parameters with ``requires_grad``. The empirical NTK is ``M = J Jᵀ``
([K22]'s ``M(θ)``, [KS21]'s ``K(w)``) in the same order.

Example::

    import torch
    from torch import nn
    from global_convergence.ntk import (empirical_ntk, jacobian, ntk_vector_product,
                                        representation_change, smallest_eigenvalue)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 300), nn.Softplus(beta=100), nn.Linear(300, 300),
                          nn.Softplus(beta=100), nn.Linear(300, 1))
    x = torch.rand(100, 2) * 2 - 1
    M0 = empirical_ntk(model, x)                      # structured: per-layer sums, no J
    J = jacobian(model, x)                            # (100, 91201)
    assert torch.allclose(M0, J @ J.T, rtol=1e-4, atol=1e-4)
    v = torch.randn(100)
    assert torch.allclose(ntk_vector_product(model, x, v), M0 @ v, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    print(representation_change(empirical_ntk(model, x), M0), smallest_eigenvalue(M0))

How each method works, and when ``"auto"`` picks which, is in :mod:`.empirical`; the structured
method in :mod:`.structured`, and which parameters it computes from captures in :mod:`.plan`
(decided once per model structure and cached; :func:`forget_plans` empties the cache). Memory knobs (bytes per chunk, cache size, rows per
whole-batch pass) are the constants of :mod:`.common`.

Numerics (docs/performance.md, "Subnormals"): softplus(β=100) networks produce float32 subnormals that make CPU arithmetic
many times slower. Every function here turns on ``torch.set_flush_denormal`` inside (restoring the
caller's setting) and, because that setting reaches only the calling thread, also zeroes float32
entries below ``sqrt(finfo(float32).tiny)`` in captured activations, output-gradients and
Jacobian rows before large products; results agree with float64 to about 1e-6 either way.

Batch norm (docs/verifiers.md): with batch statistics (train mode) the outputs of a batch are coupled, so
per-sample derivatives would be wrong. There ``jacobian`` and ``empirical_ntk`` differentiate the
whole-batch function (``"jacobian"`` or ``"ntvp"`` method), which is exact: row ``j·n + i`` is
``∂f(x_i)_j/∂θ`` with the batch statistics depending on θ too, as in a training step on that
batch. ``ntk_vector_product`` always differentiates the whole-batch function. In eval mode (fixed
statistics) batch norm is a per-sample affine map and the structured method handles it. Running
statistics are never updated by these functions, and the model's train/eval mode, parameters and
buffers are left as they were.
"""
from .common import batch_statistics_modules, flush_denormal
from .empirical import METHODS, empirical_ntk
from .jacobian import jacobian
from .plan import forget_plans
from .products import ntk_vector_product
from .spectral import representation_change, smallest_eigenvalue

__all__ = ["METHODS", "batch_statistics_modules", "empirical_ntk", "flush_denormal", "forget_plans", "jacobian",
           "ntk_vector_product", "representation_change", "smallest_eigenvalue"]
