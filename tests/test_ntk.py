"""Tests of global_convergence.ntk against a brute-force float64 autograd loop."""
from __future__ import annotations

import copy
import math
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from global_convergence.ntk import (
    METHODS,
    common,
    empirical,
    empirical_ntk,
    jacobian,
    ntk_vector_product,
    representation_change,
    smallest_eigenvalue,
    structured,
)
from global_convergence.ntk import plan as ntk_plan
from global_convergence.linalg import symmetric
from global_convergence.models.analytic import _flush_denormal_state
from global_convergence.ntk.common import SUBNORMAL_CUTOFF

TOL32 = 1e-5     # float32 results vs the float64 reference, relative Frobenius
TOL64 = 1e-10    # float64 results vs the float64 reference


# ----------------------------------------------------------------------------- test models


def mlp(m: int = 2, width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(3, width), nn.Softplus(beta=100), nn.Linear(width, width),
                         nn.Softplus(beta=100), nn.Linear(width, m))


class SmallCNN(nn.Module):
    """Conv2d (zero, reflect, "same" padding; stride; dilation), BatchNorm2d, AvgPool, Linear."""

    def __init__(self, m: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.conv3 = nn.Conv2d(5, 3, 2, padding="same", bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 2 * 2, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.softplus(self.bn1(self.conv1(x)), beta=100))
        h = F.softplus(self.conv2(h), beta=100)
        h = F.softplus(self.bn2(self.conv3(h)), beta=100)
        return self.fc(h.flatten(1))


class SharedNet(nn.Module):
    """One Linear applied twice, a weight tied between two Linears, and a sequence Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.seq = nn.Linear(2, 3)
        self.out = nn.Linear(4 + 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        h = torch.tanh(self.b(torch.tanh(self.a(h))))
        s = F.softplus(self.seq(x[:, :2].unsqueeze(1) * torch.arange(1.0, 4.0).to(x)[:, None]))
        return self.out(torch.cat([h, s.mean(1)], dim=1))


class GatedNet(nn.Module):
    """Linear + BatchNorm1d trunk, an EE-style gated head with a raw 3-D parameter (einsum)."""

    def __init__(self, m: int = 3, k: int = 5, h: int = 4) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, h), nn.BatchNorm1d(h), nn.Softplus(beta=100))
        self.weight = nn.Parameter(torch.randn(m, k, h + 1) * 0.5)
        self.out_weight = nn.Parameter(torch.randn(m, k))
        self.scale = nn.Parameter(torch.tensor(1.3))       # a 0-dim parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        z = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)
        q = torch.einsum("jkh,nh->njk", self.weight, z) * self.scale
        return torch.einsum("jk,njk->nj", self.out_weight, torch.sigmoid(q) * q)


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A seeded model in eval mode and its inputs."""
    torch.manual_seed(0)
    if name == "mlp":
        model, x = mlp(), torch.rand(7, 3) * 2 - 1
    elif name == "cnn":
        model, x = SmallCNN(), torch.randn(6, 2, 8, 8)
        _warm_batchnorm(model, x)
    elif name == "shared":
        model, x = SharedNet(), torch.randn(7, 3)
    elif name == "gated":
        model, x = GatedNet(), torch.randn(6, 3)
        _warm_batchnorm(model, x)
    else:
        raise KeyError(name)
    return model.eval(), x


def _warm_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Give batch norm non-trivial running statistics and affine parameters."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 1.5 + 0.3)
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)


# ----------------------------------------------------------------------------- reference


def brute_force_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float64 J by one backward pass per (sample, output), rows in vec order (j·n + i).

    The forward pass is over the whole batch, so coupling through batch statistics is included.
    """
    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]   # named_parameters order
    out = model(x.double()).reshape(x.shape[0], -1)
    n, m = out.shape
    rows = []
    for j in range(m):
        for i in range(n):
            grads = torch.autograd.grad(out[i, j], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                   for g, p in zip(grads, params)]))
    return torch.stack(rows)


@functools.cache
def reference(name: str, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached float64 ``(J, J Jᵀ)`` of ``make(name)`` (in train mode when ``train``)."""
    model, x = make(name)
    J = brute_force_jacobian(model.train(train), x)
    return J, J @ J.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], training: bool) -> None:
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert all(mod.training == training for mod in model.modules())
    assert all(p.grad is None for p in model.parameters())


MODELS = ["mlp", "cnn", "shared", "gated"]


# ----------------------------------------------------------------------------- Jacobian


@pytest.mark.parametrize("name", MODELS)
def test_jacobian_matches_brute_force(name):
    model, x = make(name)
    before = snapshot(model)
    ref, _ = reference(name)
    J = jacobian(model, x)
    assert J.shape == ref.shape
    assert J.dtype == torch.float32
    assert rel(J, ref) < TOL32
    assert rel(jacobian(model, x, chunk_size=4), ref) < TOL32
    assert_unchanged(model, before, training=False)


def test_jacobian_row_order_is_vec_of_columns():
    """f(x) = W x (no bias), W ∈ R^{3×4}: ∂f(x_i)_j/∂W_kl = [j = k] x_il at row j·n + i."""
    torch.manual_seed(1)
    model, x = nn.Linear(4, 3, bias=False), torch.randn(5, 4)
    n, m = 5, 3
    expected = torch.zeros(n * m, m * 4)
    for j in range(m):
        for i in range(n):
            expected[j * n + i, j * 4:(j + 1) * 4] = x[i]
    assert torch.allclose(jacobian(model, x), expected)
    gram = x @ x.T
    for method in METHODS:
        ntk = empirical_ntk(model, x, method=method)
        assert torch.allclose(ntk, torch.kron(torch.eye(m), gram), atol=1e-5), method


# ----------------------------------------------------------------------------- NTK, eval mode


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_ntk_matches_brute_force(name, method):
    model, x = make(name)
    before = snapshot(model)
    _, ref = reference(name)
    ntk = empirical_ntk(model, x, method=method)
    assert ntk.shape == ref.shape and ntk.dtype == torch.float32
    assert rel(ntk, ref) < TOL32
    assert rel(empirical_ntk(model, x, method=method, dtype=torch.float64), ref) < TOL64
    assert rel(empirical_ntk(model, x, method=method, chunk_size=4), ref) < TOL32
    assert_unchanged(model, before, training=False)


def test_structured_plan_falls_back_exactly_where_needed():
    net, xm = make("mlp")
    plan = ntk_plan.plan_structured(net, xm)       # J is never formed for an MLP
    assert plan.fallback == []                      # a one-output last layer joins the rows
    assert [lp.strategy for lp in plan.layers][:-1] == ["gram"] * (len(plan.layers) - 1)
    model, x = make("shared")
    plan = ntk_plan.plan_structured(model, x)
    planned = {lp.path for lp in plan.layers}
    assert "shared" not in planned                    # called twice
    assert {"a.weight", "shared.weight", "shared.bias"} <= set(plan.fallback)   # tied, shared
    assert {"inp.weight", "inp.bias", "out.weight", "a.bias", "b.bias"}.isdisjoint(plan.fallback)
    assert next(lp for lp in plan.layers if lp.path == "seq").positions == 3
    gated, xg = make("gated")
    assert ntk_plan.plan_structured(gated, xg).fallback == ["weight", "out_weight", "scale"]
    cnn, xc = make("cnn")
    plan = ntk_plan.plan_structured(cnn, xc)
    assert plan.fallback == []                  # eval-mode batch norm: a per-sample affine map
    assert [lp.kind for lp in plan.layers].count("batchnorm") == 2
    cnn.bn1.bias.requires_grad_(False)
    cnn.bn2.momentum = None                         # still eval mode: no effect on the plan
    assert ntk_plan.plan_structured(cnn, xc).fallback == []


@pytest.mark.parametrize("strategy", ["gram", "grad"])
def test_both_convolution_contractions(monkeypatch, strategy):
    model, x = make("cnn")
    monkeypatch.setattr(ntk_plan, "STRATEGY", strategy)
    plan = ntk_plan.plan_structured(model, x)
    assert {lp.strategy for lp in plan.layers if lp.kind == "conv2d"} == {strategy}
    assert rel(empirical_ntk(model, x, method="structured"), reference("cnn")[1]) < TOL32


@pytest.mark.parametrize("channels", [0, 100])
def test_both_per_sample_convolution_gradients(monkeypatch, channels):
    """float32 per-sample convolution gradients by unfolded patches (0) or by one grouped
    convolution (100): both exact, with zero, reflect and "same" padding, stride and dilation."""
    model, x = make("cnn")
    monkeypatch.setattr(ntk_plan, "STRATEGY", "grad")
    monkeypatch.setattr(structured, "GROUPED_CONV_CHANNELS", channels)
    assert rel(empirical_ntk(model, x, method="structured"), reference("cnn")[1]) < TOL32


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=5, padding=2), dict(kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2)),
    dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect"),
    dict(kernel_size=2, padding="same")])
def test_strided_patches_equal_unfold(geometry):
    """The patches' strided copy (:func:`structured._patches`) is ``F.unfold`` of the padded
    input, entry for entry, in the weight's ``(C_in, kh, kw)`` order."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(3, 4, **geometry), torch.randn(5, 3, 9, 7)
    padded = structured._padded(conv, x)
    expected = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    got = structured._patches(conv, x)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    assert got.shape[2] == math.prod(conv(x).shape[2:])

def test_recompute_path_when_cache_is_small(monkeypatch):
    model, x = make("gated")
    monkeypatch.setattr(common, "CACHE_BYTES", 0)
    for method in ("structured", "jacobian"):
        ntk = empirical_ntk(model, x, method=method, chunk_size=2)
        assert rel(ntk, reference("gated")[1]) < TOL32


# ----------------------------------------------------------------------------- train-mode BN


def test_train_mode_batch_norm_is_exact():
    model, x = make("cnn")
    model.train()
    before = snapshot(model)
    J, ref = reference("cnn", train=True)
    assert rel(jacobian(model, x), J) < TOL32
    assert rel(jacobian(model, x, chunk_size=2), J) < TOL32
    for method in ("auto", "jacobian", "ntvp"):
        assert rel(empirical_ntk(model, x, method=method), ref) < TOL32, method
        assert rel(empirical_ntk(model, x, method=method, dtype=torch.float64), ref) < TOL64
    with pytest.raises(ValueError, match="batch statistics"):
        empirical_ntk(model, x, method="structured")
    assert_unchanged(model, before, training=True)      # running stats not updated, still train
    # The coupling matters: the per-sample (eval-style) answer would be far off.
    eval_model = copy.deepcopy(model).eval()
    assert rel(empirical_ntk(eval_model, x), ref) > 1e-2


def test_train_mode_batch_norm_switches_to_ntvp_when_jacobian_is_large(monkeypatch):
    model, x = make("cnn")
    model.train()
    calls = []
    real = empirical.ntvp_ntk
    monkeypatch.setattr(empirical, "ntvp_ntk", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(common, "CACHE_BYTES", 0)
    assert rel(empirical_ntk(model, x), reference("cnn", train=True)[1]) < TOL32
    assert calls == [1]


# ----------------------------------------------------------------------------- numerics


def test_softplus_subnormals_match_float64_reference():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 64), nn.Softplus(beta=100), nn.Linear(64, 64),
                          nn.Softplus(beta=100), nn.Linear(64, 64), nn.Softplus(beta=100),
                          nn.Linear(64, 1))
    x = torch.rand(40, 2) * 2 - 1
    J32 = brute_force_jacobian(model.float(), x).float()     # rounded: just to find subnormals
    tiny = (J32 != 0) & (J32.abs() < SUBNORMAL_CUTOFF)
    assert tiny.any(), "the test model should produce tiny Jacobian entries"
    ref = empirical_ntk(model, x, method="jacobian", dtype=torch.float64)
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        try:
            for method in ("structured", "jacobian"):
                assert rel(empirical_ntk(model, x, method=method), ref) < TOL32
            assert _flush_denormal_state() == flush      # caller's setting restored
        finally:
            torch.set_flush_denormal(False)


def test_symmetric_gram_runs_numpy_blas_on_torch_threads():
    controller = symmetric.blas_controller()
    if controller is None or not controller.select(user_api="blas").lib_controllers:
        pytest.skip("threadpoolctl sees no BLAS library of NumPy's here")
    threads = torch.get_num_threads()
    before = [lib.num_threads for lib in controller.select(user_api="blas").lib_controllers]
    seen = []
    a = torch.randn(50, 7)
    torch.set_num_threads(1)
    try:
        with symmetric.blas_threads_like_torch():
            seen = [lib["num_threads"] for lib in symmetric.blas_controller().info()
                    if lib["user_api"] == "blas"]
        g = symmetric.gram(a)
    finally:
        torch.set_num_threads(threads)
    assert seen and all(t == 1 for t in seen)
    assert torch.allclose(g, a @ a.T, rtol=1e-5, atol=1e-5)
    after = [lib["num_threads"] for lib in symmetric.blas_controller().info()
             if lib["user_api"] == "blas"]
    assert after == before                               # the pool is restored

@pytest.mark.parametrize("threads", [1, 2])
def test_side_by_side_grams_equal_one_at_a_time(threads):
    """Products of mixed sizes (one larger than the rest together, then several alike), in both
    dtypes, each equal to its own ``a aᵀ``; BLAS threads are restored afterwards."""
    controller = symmetric.blas_controller()
    before = controller.info() if controller is not None else None
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(300, 400, generator=gen, dtype=torch.float64)] + \
        [torch.randn(120, 30 + 5 * i, generator=gen) for i in range(5)] + [torch.randn(4, 1)]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = symmetric.grams(mats)
    finally:
        torch.set_num_threads(saved)
    assert len(out) == len(mats)
    for a, g in zip(mats, out):
        assert g.dtype == a.dtype and g.shape == (a.shape[0], a.shape[0])
        assert torch.allclose(g, a @ a.T, rtol=1e-5, atol=1e-4)
    if controller is not None:
        assert controller.info() == before


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_structured_ntk_same_with_two_threads(kind):
    model, x = make(kind)
    ref = empirical_ntk(model, x, method="jacobian", dtype=torch.float64)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = empirical_ntk(model, x, method="structured")
    finally:
        torch.set_num_threads(saved)
    assert rel(got, ref) < TOL32

# ----------------------------------------------------------------------------- other API


@pytest.mark.parametrize("train", [False, True])
def test_ntk_vector_product_matches_dense(train):
    model, x = make("cnn")
    model.train(train)
    before = snapshot(model)
    ntk = empirical_ntk(model, x, dtype=torch.float64)
    torch.manual_seed(5)
    v = torch.randn(ntk.shape[0], 3)
    assert rel(ntk_vector_product(model, x, v), ntk @ v.double()) < TOL32
    w = v[:, 0]
    out = ntk_vector_product(model, x, w)
    assert out.shape == w.shape and rel(out, ntk @ w.double()) < TOL32
    with pytest.raises(ValueError):
        ntk_vector_product(model, x, torch.randn(ntk.shape[0] + 1))
    assert_unchanged(model, before, training=train)


def test_partially_frozen_layers():
    model, x = make("cnn")
    for p in (model.conv1.weight, model.bn1.bias, model.fc.bias, model.bn2.weight):
        p.requires_grad_(False)
    J = brute_force_jacobian(model, x)
    for method in ("structured", "jacobian"):
        assert rel(empirical_ntk(model, x, method=method), J @ J.T) < TOL32, method


def test_requires_grad_false_is_excluded():
    model, x = make("mlp")
    full = empirical_ntk(model, x)
    for p in model[0].parameters():
        p.requires_grad_(False)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    J = brute_force_jacobian(model, x)
    assert jacobian(model, x).shape == (x.shape[0] * 2, d) == J.shape
    for method in METHODS:
        ntk = empirical_ntk(model, x, method=method)
        assert rel(ntk, J @ J.T) < TOL32, method
        assert rel(ntk, full) > 1e-3, method
    model.requires_grad_(False)
    assert jacobian(model, x).shape == (x.shape[0] * 2, 0)
    for method in METHODS:
        assert not empirical_ntk(model, x, method=method).any(), method
    assert not ntk_vector_product(model, x, torch.ones(x.shape[0] * 2)).any()


def test_one_dimensional_output_is_one_column():
    torch.manual_seed(2)
    lin, x = nn.Linear(3, 1), torch.randn(5, 3)
    squeezed = nn.Sequential(lin, nn.Flatten(0))
    assert squeezed(x).shape == (5,)
    assert torch.allclose(empirical_ntk(squeezed, x), x @ x.T + 1, atol=1e-5)
    assert jacobian(squeezed, x).shape == (5, 4)


def test_unknown_method_is_refused():
    model, x = make("mlp")
    with pytest.raises(ValueError, match="unknown NTK method"):
        empirical_ntk(model, x, method="exact")


def test_representation_change_and_smallest_eigenvalue_on_known_matrices():
    a = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    b = torch.eye(2)
    assert representation_change(a, b) == pytest.approx(1 + 1 + 1 + 1)
    assert representation_change(a, a) == 0.0
    assert smallest_eigenvalue(a) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    spectrum = torch.tensor([1e-9, 1e-3, 1, 2, 5, 9], dtype=torch.float64)
    m = q @ torch.diag(spectrum) @ q.T
    assert smallest_eigenvalue(m) == pytest.approx(1e-9, abs=1e-13)
    assert smallest_eigenvalue(torch.diag(torch.tensor([3.0, -2.0, 4.0]))) == pytest.approx(-2.0)
    with pytest.raises(ValueError):
        representation_change(a, torch.eye(3))
    with pytest.raises(ValueError):
        smallest_eigenvalue(torch.ones(2, 3))
