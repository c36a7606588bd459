"""[K22] Definition 2 (alignment): the float32 rank test, decided from the float64 Gram of the
float32 model's captures with a proven uncertainty, and its fallbacks (docs/verifiers.md)."""
import copy
import importlib

import numpy as np
import pytest
import torch
from torch import nn

from conftest import reference_jacobian

from global_convergence.conditions import (NOT_VERIFIED, VERIFIED, alignment, alignment_of_gram,
                                           alignment_of_jacobian)
from global_convergence.errors import NumericalError, UserInputError
from global_convergence.losses import make_loss
from global_convergence.models import MLP, LeNet
from global_convergence.ntk import structured
from global_convergence.ntk.common import numerics_guard
from global_convergence.ntk.plan import cached_plan

F64 = torch.float64
alignment_module = importlib.import_module("global_convergence.conditions.alignment")




def numpy_ranks(j: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """numpy.linalg.matrix_rank of the float32 J and of [J, y'] (the paper's evident test)."""
    jn = j.numpy()
    yp = y.numpy().astype(np.float32)[:, None]
    return int(np.linalg.matrix_rank(jn)), int(np.linalg.matrix_rank(np.hstack([jn, yp])))


def test_alignment_inside_and_outside_column_space():
    """d < n·m_y, so Col(J) is a proper subspace: a target built inside is aligned, a generic
    one is not; the residual separates them too."""
    torch.manual_seed(0)
    model = MLP(3, 2, hidden=(4,))                        # d = 16 + 10 = 26, rows = 2·30 = 60
    x = torch.randn(30, 3)
    j = reference_jacobian(model, x).double()
    inside = j @ torch.randn(j.shape[1], dtype=F64)
    y_inside = inside.reshape(2, 30).T                    # Y' with vec(Y') = inside
    v = alignment(model, x, y_inside)
    assert v.verdict == VERIFIED and v.precision == "float32"
    assert v.details["rank_augmented"] == v.rank and v.details["relative_residual"] < 1e-5
    assert v.shape == [60, 26] and v.n == 30
    outside = torch.randn(30, 2, dtype=F64)
    w = alignment(model, x, outside)
    assert w.verdict == NOT_VERIFIED and w.details["rank_augmented"] == w.rank + 1
    assert w.details["relative_residual"] > 0.3
    assert alignment(model, x, inside.reshape(30, 2)).verdict == NOT_VERIFIED   # row order
    r_in = alignment(model, x, y_inside, method="residual")
    r_out = alignment(model, x, outside, method="residual")
    assert (r_in.verdict, r_out.verdict) == (VERIFIED, NOT_VERIFIED)


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_alignment_float32_test_against_numpy_matrix_rank(name):
    """The default reproduces numpy.linalg.matrix_rank on the float32 J and [J, y'], decided
    from the Gram of the captures (no J formed)."""
    torch.manual_seed(1)
    if name == "mlp":
        model, x = MLP(2, 1, hidden=(16, 16)), torch.rand(40, 2) * 2 - 1
        y = (torch.sin(20 * x[:, 0]) < 0).long()
    else:
        model, x = LeNet(1, 1), torch.rand(40, 1, 16, 16)
        y = torch.randint(0, 2, (40,))
    v = alignment(model, x, y, loss=make_loss("ce", 2))
    assert v.details["route"] == "gram-float64-eigh"
    j = reference_jacobian(model, x)                          # float32, as the paper's
    assert (v.rank, v.details["rank_augmented"]) == numpy_ranks(j, 2.0 * y - 1.0)
    assert v.verdict == (VERIFIED if v.rank == v.details["rank_augmented"] else NOT_VERIFIED)
    assert v.tolerance == pytest.approx(np.linalg.svd(j.double().numpy(), compute_uv=False)[0]
                                        * max(j.shape) * np.finfo(np.float32).eps, rel=1e-5)
    assert 0 < v.details["singular_value_uncertainty"] < 0.05 * v.tolerance
    f64 = alignment(model, x, y, loss=make_loss("ce", 2), precision="float64")
    j64 = reference_jacobian(copy.deepcopy(model).double(), x.double()).numpy()
    assert f64.precision == "float64" and f64.rank == np.linalg.matrix_rank(j64) >= v.rank


class ConvNet(nn.Module):
    """A convolution with several positions and one sharing the ReLU-free softplus path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 9, 3, stride=2)
        self.fc = nn.Linear(9 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.softplus(self.conv(x), beta=100)
        return self.fc(nn.functional.softplus(self.conv2(h), beta=100).flatten(1))


def rows_from_captures(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J̃: rows of J from the float32 model's captures, products and sums in float64."""
    plan = cached_plan(model, x)
    blocks = []
    for lp, (inp, delta) in zip(plan.layers, structured.capture(model, plan, x, zero=False)):
        u, d = structured._positions_last(lp, model.get_submodule(lp.path), inp.double(),
                                          delta.double())
        blocks += structured._gradient_rows(lp, u, d)
    rows = torch.cat(blocks, dim=2)
    return rows.reshape(-1, rows.shape[2])


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_entry_error_bounds_the_float32_jacobian(net):
    """The proven part: the float32 J (J̃ rounded to float32) is within entry_error of J̃ in
    the Frobenius norm, so (Weyl) are its singular values; the Gram is J̃ J̃ᵀ to rounding; and
    the float32 J agrees with torch.func's float32 Jacobian to float32 accuracy."""
    torch.manual_seed(4)
    model, x = (MLP(3, 2, hidden=(32, 32)), torch.randn(25, 3)) if net == "mlp" else \
        (ConvNet(), torch.rand(12, 1, 8, 8))
    with numerics_guard(model):
        sg = structured.structured_gram(model, x, F64)
        exact = rows_from_captures(model, x)
    j32 = exact.float().double()
    assert 0 < float((j32 - exact).norm()) <= sg.entry_error < 1e-6 * float(exact.norm())
    assert torch.allclose(sg.gram, exact @ exact.T, rtol=1e-12, atol=1e-12 * float(sg.gram.max()))
    sigma32, sigma = torch.linalg.svdvals(j32), torch.linalg.svdvals(exact)
    assert float((sigma32 - sigma).abs().max()) <= sg.entry_error
    func = reference_jacobian(model, x).double()
    assert float((func - j32).norm()) < 1e-5 * float(exact.norm())


def test_alignment_from_the_gram_falls_back_where_the_bound_does_not_resolve(monkeypatch):
    """A Gram whose uncertainty meets the tolerance must be decided from the float32 J: first
    its own Gram in float64, then its TSQR factor; all routes give numpy's ranks."""
    torch.manual_seed(2)
    model = LeNet(1, 1)
    x = torch.randn(24, 1, 16, 16)
    y = torch.randint(0, 2, (24,))
    loss = make_loss("ce", 2)
    j = reference_jacobian(model, x)
    yv = 2.0 * y.double() - 1.0
    expected = numpy_ranks(j, yv)
    fast = alignment(model, x, y, loss=loss)
    assert fast.details["route"] == "gram-float64-eigh"
    gram = j.double() @ j.double().T
    slow = alignment_of_gram(gram, yv, d=j.shape[1], n=24, entry_error=1e3,
                             jacobian=lambda: j)
    assert slow.details["route"] == "jacobian-gram-float64-eigh"
    monkeypatch.setattr(alignment_module, "gram_rounding_bound", lambda *args: 1e12)
    slowest = alignment_of_gram(gram, yv, d=j.shape[1], n=24, jacobian=lambda: j)
    assert slowest.details["route"] == "tsqr-float64-svd"
    for v in (fast, slow, slowest):
        assert (v.rank, v.details["rank_augmented"]) == expected
    assert slowest.tolerance == pytest.approx(slow.tolerance, rel=1e-6)


def test_train_mode_batch_norm_forms_the_float32_jacobian():
    """Coupled samples: the float32 J of the whole-batch function, numpy's ranks."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Softplus(beta=100),
                          nn.Linear(6, 1)).train()
    x = torch.randn(16, 3)
    yv = torch.randn(16, dtype=F64)
    v = alignment(model, x, yv)
    assert v.details["route"] in ("jacobian-gram-float64-eigh", "tsqr-float64-svd")
    from global_convergence.ntk import jacobian
    j = jacobian(model, x)
    assert (v.rank, v.details["rank_augmented"]) == numpy_ranks(j, yv)
    assert model.training and int(model[1].num_batches_tracked) == 0


def test_alignment_from_the_gram_refuses_inf_and_survives_a_float32_jacobian_overflow():
    j = torch.randn(6, 20, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.randn(6, dtype=F64)
    gram = j @ j.T
    overflowed = torch.full((6, 20), float("inf"))
    v = alignment_of_gram(gram, y, d=20, entry_error=1e6, jacobian=lambda: overflowed)
    assert v.details["route"] == "gram-float64-eigh (unresolved; the float32 Jacobian overflows)"
    assert v.rank == 6 and v.verdict == VERIFIED
    gram[1, 2] = float("nan")
    with pytest.raises(NumericalError, match="alignment: the Gram matrix J Jᵀ holds 1 non-finite"):
        alignment_of_gram(gram, y, d=20)
    with pytest.raises(NumericalError, match="alignment: the Jacobian holds 120 non-finite"):
        alignment_of_jacobian(overflowed, y)


def test_alignment_of_jacobian_checks_sizes():
    with pytest.raises(UserInputError, match="rows"):
        alignment_of_jacobian(torch.randn(10, 50), torch.randn(9))
