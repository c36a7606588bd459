"""The engine's kernel as it is built (preallocated at the widened size, rank-k updates written into
its slices) against the kernel formed the plain way: ``torch.bmm`` of the factors and ``torch.cat``
of the extra columns."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from global_convergence.losses import make_loss
from global_convergence.models import GatedHead
from global_convergence.linalg.symmetric import symmetric_into
from global_convergence.training.kernel_features import (FeatureMap, ee_feature_map,
                                                         linear_feature_map)
from global_convergence.training.kernel_steps import KernelSteps

N, IN, WIDTH = 50, 7, 11


def ee_map(outputs: int) -> FeatureMap:
    torch.manual_seed(outputs)
    head = GatedHead(IN, WIDTH, outputs)
    head.freeze_gates()
    with torch.no_grad():
        head.weight.add_(0.3 * torch.randn_like(head.weight))
    head.out_weight.requires_grad_(False)
    return ee_feature_map(head, torch.randn(N, IN))


def linear_map(outputs: int) -> FeatureMap:
    torch.manual_seed(10 + outputs)
    return linear_feature_map(nn.Linear(WIDTH, outputs), torch.nn.functional.softplus(torch.randn(N, WIDTH)))


def reference_kernel(fm: FeatureMap) -> torch.Tensor:
    """``K_j = (A_j A_jᵀ) ⊙ (Z Zᵀ)`` (EE) or ``R Rᵀ`` by general products."""
    gram = fm.right @ fm.right.T
    if fm.left is None:
        return gram[None]
    return torch.bmm(fm.left, fm.left.transpose(1, 2)) * gram


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-12) -> None:
    scale = expected.abs().max()
    assert scale > 0
    assert (actual - expected).abs().max() <= rtol * scale


MAPS = [(ee_map, 1), (ee_map, 3), (linear_map, 1), (linear_map, 4)]


@pytest.mark.parametrize("make, outputs", MAPS)
@pytest.mark.parametrize("extra", [0, 5])
def test_kernel_in_its_leading_columns_is_the_bmm_kernel(make, outputs, extra):
    fm = make(outputs)
    wide = fm.kernel(extra=extra)
    assert wide.shape == (1 if fm.left is None else outputs, N, N + extra)
    kernel = wide[..., :N]
    assert_relative(kernel, reference_kernel(fm))
    assert torch.equal(kernel, kernel.transpose(1, 2))     # the rank-k update's mirrored triangle


def momentum_optimizer(fm: FeatureMap) -> torch.optim.SGD:
    """SGD holding a momentum buffer, so that the column ``Φm_τ`` is not zero."""
    optimizer = torch.optim.SGD(fm.params, lr=0.1, momentum=0.9)
    for p in fm.params:
        optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    return optimizer


@pytest.mark.parametrize("make, outputs", MAPS)
def test_widened_kernel_is_the_concatenated_reference(make, outputs):
    fm = make(outputs)
    optimizer = momentum_optimizer(fm)
    y = torch.randint(0, max(2, outputs), (N,))
    engine = KernelSteps(fm, optimizer, y, make_loss("ce", max(2, outputs)))
    kernel = reference_kernel(fm)
    f_w = fm.outputs([p.detach() for p in fm.params])
    f_m = fm.outputs([optimizer.state[p]["momentum_buffer"] for p in fm.params])
    t = engine.targets
    if engine.shared:
        expected = torch.cat([kernel[0], f_w, f_m, kernel[0] @ t], dim=1)
    else:
        f_t = torch.bmm(kernel, t.T[:, :, None])[:, :, 0]
        expected = torch.cat([kernel, f_w.T[:, :, None], f_m.T[:, :, None], f_t[:, :, None]], dim=2)
    assert engine.kernel.shape == expected.shape
    assert_relative(engine.kernel, expected)
    for part in (f_m, kernel @ t if engine.shared else f_t):     # the extra columns are not vacuous
        assert part.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_into_a_slice_agrees_with_the_torch_product(dtype):
    torch.manual_seed(0)
    a = torch.randn(30, 8, dtype=torch.float64).to(dtype).T.contiguous().T    # non-contiguous rows
    wide = torch.full((30, 33), 7.0, dtype=dtype)
    symmetric_into(a, wide[:, :30])
    assert_relative(wide[:, :30], a @ a.T, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.all(wide[:, 30:] == 7.0)                  # columns beyond the slice untouched
    strided = torch.zeros(30, 60, dtype=dtype)[:, ::2]        # no unit column stride: the torch path
    symmetric_into(a, strided)
    assert_relative(strided, a @ a.T, rtol=1e-5 if dtype == torch.float32 else 1e-12)
