"""The condition verifiers on the library's models: expressivity, safe exploration, input
distinguishability, widths, and the certificates (alignment: tests/test_alignment.py)."""
import copy
import json

import pytest
import torch
from torch import nn

from conftest import reference_jacobian

from global_convergence.conditions import (NOT_VERIFIED, VERIFIED, ee_certificate, ee_row_bounds,
                                           expressivity, he_initialise, input_distinguishability,
                                           safe_exploration, two_phase_certificate,
                                           width_condition)
from global_convergence.errors import NumericalError, UserInputError
from global_convergence.linalg import RANK_BAND
from global_convergence.losses import make_loss
from global_convergence.models import (MLP, EEModel, LeNet, ResNet18, TwoPhaseModel, ee_model,
                                       two_phase_model)
from global_convergence.models.heads import GatedHead

F64 = torch.float64




def with_duplicates(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first n − k points, then copies of the first k of them (still n points)."""
    return torch.cat([x[:x.shape[0] - k], x[:k]])


@pytest.fixture(scope="module")
def points():
    return torch.randn(60, 5, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def images():
    return torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- expressivity

def test_expressivity_verified_without_and_refuted_with_duplicates(points):
    torch.manual_seed(0)
    model = two_phase_model(MLP(5, 1), 60)
    model.train()
    before = copy.deepcopy(model.state_dict())
    v = expressivity(model, points)
    assert v.verdict == VERIFIED and v.rank == 60 and v.n == 60
    assert v.shape == [60, 301] and v.precision == "float64"
    assert v.methods == {"svd": 60, "qr": 60} and v.agree
    assert v.smallest_kept > 10 * v.tolerance
    dup = expressivity(model, with_duplicates(points, 3))
    assert dup.verdict == NOT_VERIFIED and dup.rank == 57
    assert dup.largest_dropped < dup.tolerance / 10
    # the caller's model is untouched: mode, dtype, parameters
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_expressivity_gram_method_agrees_and_needs_a_split_model(points):
    torch.manual_seed(0)
    model = two_phase_model(MLP(5, 1), 60)
    assert expressivity(model, points, method="gram").verdict == VERIFIED
    assert expressivity(model, with_duplicates(points, 2), method="gram").rank == 58
    with pytest.raises(UserInputError, match="trunk and head"):
        expressivity(MLP(5, 1), points)


# ------------------------------------------------------------------------- safe exploration

def test_safe_exploration_lenet_per_output_and_duplicates(images):
    torch.manual_seed(0)
    model = ee_model(LeNet(1, 3), 40)                      # m_y = 3 outputs, m_H = 128
    v = safe_exploration(model, images)
    assert v.verdict == VERIFIED and v.rank == 40
    assert v.shape == [40, 128 * 129]
    assert [o["output"] for o in v.details["per_output"]] == [0, 1, 2]
    assert all(o["verdict"] == VERIFIED for o in v.details["per_output"])
    assert "weights" in v.details["q"]                     # gates still tied: current weights
    dup = safe_exploration(model, with_duplicates(images, 4))
    assert dup.verdict == NOT_VERIFIED and dup.rank == 36
    assert dup.methods == {"svd": 36, "qr": 36}            # decided from ϕ itself
    assert all(o["verdict"] == NOT_VERIFIED for o in dup.details["per_output"])
    checked = safe_exploration(model, images, q="random", cross_check=True)
    certificate = {"cholesky", "preconditioned_cholesky"} & set(checked.methods)
    assert len(certificate) == 1 and checked.agree          # the certificate, then SVD and QR
    assert checked.methods["svd"] == checked.methods["qr"] == 40
    assert [o["output"] for o in checked.details["per_output"]] == ["shared"]


def test_safe_exploration_uses_frozen_gates_per_output():
    """After the switch the check uses R(j) (the gates), per output, not the current weights."""
    torch.manual_seed(0)
    model = ee_model(MLP(5, 2, hidden=(8, 8)), 40)         # z ∈ R^9, m_H = 8: ϕ is 40 × 72
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(4))
    model.head.freeze_gates()
    with torch.no_grad():
        model.head.gates[1].zero_()        # output 1: σ̃(0) = ½, ϕ_i = ½[z_i, …, z_i], rank ≤ 9
    v = safe_exploration(model, x)
    assert "gates" in v.details["q"]
    per = {o["output"]: o for o in v.details["per_output"]}
    assert per[0]["verdict"] == VERIFIED and per[0]["rank"] == 40
    assert per[1]["verdict"] == NOT_VERIFIED and per[1]["rank"] == 9
    assert v.verdict == NOT_VERIFIED and v.details["deciding_output"] == 1 and v.rank == 9
    with torch.no_grad():
        model.head.weight.mul_(-3.0)       # the trained w moves; the gates R(j) do not
    again = safe_exploration(model, x)
    figures = lambda r: [(o["rank"], o["verdict"], o["tolerance"]) for o in r.details["per_output"]]
    assert figures(again) == figures(v)


def test_safe_exploration_resnet_he_initialised():
    torch.manual_seed(0)
    model = ee_model(ResNet18(3, 2), 24)                   # m_{H−1} = 513, m_H = ⌈48/513⌉ = 1
    he_initialise(model.trunk, seed=0)
    x = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    v = safe_exploration(model, x, q="random", recompute_batchnorm=False)
    assert v.details["batchnorm"]["statistics"] == "model"
    assert v.verdict == VERIFIED and v.shape == [24, 513]
    assert safe_exploration(model, with_duplicates(x, 2), q="random").verdict == NOT_VERIFIED


def test_he_initialise_is_seeded_he_normal():
    a, b = nn.Linear(400, 300), nn.Linear(400, 300)
    he_initialise(a, 3), he_initialise(b, 3)
    assert torch.equal(a.weight, b.weight) and torch.count_nonzero(a.bias) == 0
    assert float(a.weight.detach().std()) == pytest.approx((2 / 400) ** 0.5, rel=0.02)


def test_sample_index_stays_inside_large_n():
    from global_convergence.conditions.features import sample_index
    for n in (1, 2, 63, 64, 65, 1000, 16_777_220, 100_000_006):
        index = sample_index(n)
        assert len(index) == min(n, 64) and index[0] == 0 and index[-1] == n - 1
        assert bool((index[1:] > index[:-1]).all())


def test_float64_gemm_convolution_equals_conv2d():
    from global_convergence.conditions.features import GemmConv2d, precise_copy
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1,
                                                                 bias=False),
                        nn.Conv2d(16, 4, 2, dilation=2))
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    copy64 = precise_copy(net, torch.float64)
    assert all(type(m) is GemmConv2d for m in copy64 if isinstance(m, nn.Conv2d))
    assert torch.allclose(copy64(x), net.double()(x), rtol=1e-12, atol=1e-12)
    assert type(precise_copy(net.float(), torch.float32)[0]) is nn.Conv2d
    assert copy64(x[:0]).shape == (0, 4, 2, 2)


def test_noise_floor_bounds_the_change_of_phi():
    """‖ϕ(z + δz) − ϕ(z)‖₂ ≤ noise_floor when every ‖δz̄_i‖ ≤ e‖z̄_i‖ (first order, small e)."""
    from global_convergence.conditions.safe_exploration import gate_values, noise_floor
    g = torch.Generator().manual_seed(3)
    n, m, width, e = 30, 6, 4, 1e-4
    z = torch.cat([torch.randn(n, m, generator=g, dtype=F64), torch.ones(n, 1, dtype=F64)], 1)
    q = torch.randn(width, m + 1, generator=g, dtype=F64)
    s = gate_values(z, q, 1.0)
    floor = noise_floor(z, s, q, 1.0, e)
    for _ in range(5):
        direction = torch.randn(n, m, generator=g, dtype=F64)
        direction *= (e * z[:, :-1].norm(dim=1) / direction.norm(dim=1))[:, None]
        moved = z.clone()
        moved[:, :-1] += direction
        phi = lambda zz: (gate_values(zz, q, 1.0)[:, :, None] * zz[:, None, :]).reshape(n, -1)
        change = torch.linalg.matrix_norm(phi(moved) - phi(z), ord=2)
        assert 0 < change <= floor


# ------------------------------------------------------------------ distinguishability, widths

def test_input_distinguishability():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 4, generator=g)
    x = x / x.norm(dim=1, keepdim=True)                    # unit norm: margins 1 − cos > 0
    ok = input_distinguishability(x)
    assert ok.verdict == VERIFIED and ok.figures["min_margin"] > 0
    dup = input_distinguishability(torch.cat([x, x[7:8]]))
    assert dup.verdict == NOT_VERIFIED and dup.figures["duplicate_pair"] == [7, 50]
    scaled = x.clone()
    scaled[3] = 2 * x[9]                                   # ‖x_9‖² − x_9ᵀx_3 = 1 − 2 < 0
    bad = input_distinguishability(scaled)
    assert bad.verdict == NOT_VERIFIED and bad.figures["pair"] == [9, 3]
    assert bad.figures["min_margin"] == pytest.approx(-1.0, abs=1e-6)
    json.dumps(bad.to_dict())


def test_width_condition():
    mlp = MLP(5, 1)                                        # widths 300, 300, 300
    assert width_condition(mlp, 100, 5).verdict == VERIFIED
    wide = width_condition(mlp, 400, 5)
    assert wide.verdict == NOT_VERIFIED and wide.figures["failing"] == ["last_hidden_ok"]
    narrow = width_condition(MLP(50, 1, hidden=(20, 300)), 100, 50)
    assert narrow.figures["failing"] == ["inner_widths_ok"]
    fixed = width_condition(two_phase_model(mlp, 400), 400, 5)
    assert fixed.verdict == VERIFIED and fixed.figures["last_hidden"] == 440
    with pytest.raises(UserInputError, match="convolution"):
        width_condition(LeNet(1, 1), 10, 256)


# ------------------------------------------------------------------------------ certificates

GD = dict(full_batch=True, momentum=0.0, weight_decay=0.0, optimizer_name="sgd")


def test_two_phase_certificate_bound_only_for_full_batch_gd(points):
    torch.manual_seed(0)
    model = two_phase_model(MLP(5, 1), 60)
    model.freeze_trunk()
    loss = make_loss("ce", 2)
    cert = two_phase_certificate(model, points, loss, lr_used=1e-3, precision="float64", **GD)
    # L_H = (L_ℓ/n) Σ ‖[h_i, 1]‖², and ‖[h_i, 1]‖² = ‖∂f(x_i)/∂(output weight, bias)‖²
    head_grads = reference_jacobian(copy.deepcopy(model).double(), points.double())[:, -301:]
    expected = 0.25 / 60 * float(head_grads.pow(2).sum())
    assert cert["constants"]["L_H"] == pytest.approx(expected, rel=1e-10)
    assert cert["condition"]["feature_precision"] == "float64"
    # from float32 features: verified with the noise floor counted, L_H to float32 accuracy
    fast = two_phase_certificate(model, points, loss, lr_used=1e-3, **GD)
    assert fast["condition"]["feature_precision"] == "float32"
    assert fast["condition"]["verdict"] == VERIFIED
    assert fast["condition"]["tolerance"] >= fast["condition"]["noise_floor"] > 0
    assert 0 < fast["condition"]["feature_error"]["measured_relative_error"] < 1e-5
    assert fast["constants"]["L_H"] == pytest.approx(expected, rel=1e-5)
    none = two_phase_certificate(model, points, loss, lr_used=None, **GD)
    assert none["step_used"] == none["step_max"] and none["bound"] is not None
    assert cert["step_max"] == pytest.approx(1 / expected)
    assert cert["condition"]["verdict"] == VERIFIED
    assert all(cert["assumptions"].values()) and cert["bound_withheld_because"] == []
    assert cert["bound"]["coefficient"] == pytest.approx(expected / 2)
    assert "R^2" in cert["bound"]["formula"]
    json.dumps(cert)
    for change, failing in [({"momentum": 0.9}, "no_momentum"),
                            ({"full_batch": False}, "full_batch"),
                            ({"optimizer_name": "lbfgs"}, "gradient_descent"),
                            ({"weight_decay": 1e-5}, "no_weight_decay")]:
        c = two_phase_certificate(model, points, loss, lr_used=1e-3, **{**GD, **change})
        assert c["bound"] is None and c["bound_withheld_because"] == [failing]
    big = two_phase_certificate(model, points, loss, lr_used=2 / expected, **GD)
    assert big["bound_withheld_because"] == ["step_at_most_1_over_L"]
    relu = two_phase_model(nn.Sequential(nn.Linear(5, 300), nn.ReLU(), nn.Linear(300, 1)), 60)
    assert "real_analytic" in two_phase_certificate(relu, points, loss, lr_used=1e-3,
                                                    **GD)["bound_withheld_because"]
    dup = two_phase_certificate(model, with_duplicates(points, 2), loss, lr_used=1e-3, **GD)
    assert dup["bound_withheld_because"] == ["condition_verified"]


def test_certificate_decides_on_float64_features_when_float32_noise_hides_sigma_min(points):
    """Two inputs 1e-5 apart: σ_min of [h, 1] is below the float32 features' noise floor but far
    above the float64 tolerance, so the float32 attempt must not decide."""
    torch.manual_seed(0)
    model = two_phase_model(MLP(5, 1), 100)               # n = 100 > the 64 sampled rows
    model.freeze_trunk()
    close = torch.cat([points, torch.randn(40, 5, generator=torch.Generator().manual_seed(4))])
    close[1] = close[0] + 1e-5
    cert = two_phase_certificate(model, close, make_loss("ce", 2), lr_used=None, **GD)
    condition = cert["condition"]
    assert condition["feature_precision"] == "float64" and condition["verdict"] == VERIFIED
    # rows 0 and 1 are both sampled: σ_n ≤ σ_min(sample) is below the float32 noise floor, so
    # the float32 attempt is not even made
    assert any("float32 attempt skipped" in note for note in condition["notes"])
    skipped = condition["float32_attempt"]["skipped"]
    assert skipped["sigma_n_upper_bound"] < RANK_BAND * skipped["noise_floor_estimate"]
    assert skipped["sigma_n_upper_bound"] >= condition["smallest_kept"] * (1 - 1e-9)
    exact = two_phase_certificate(model, close, make_loss("ce", 2), lr_used=None,
                                  precision="float64", **GD)
    assert exact["constants"]["L_H"] == pytest.approx(cert["constants"]["L_H"], rel=1e-12)
    with pytest.raises(UserInputError, match="certificate precision"):
        two_phase_certificate(model, close, make_loss("ce", 2), lr_used=None, precision="half",
                              **GD)


def test_ee_certificate_constants_and_withholding(images):
    torch.manual_seed(0)
    model = ee_model(LeNet(1, 3), 40)
    model.freeze_trunk()
    model.head.freeze_gates()
    loss = make_loss("ce", 3)
    cert = ee_certificate(model, images, loss, lr_used=1e-4, precision="float64", **GD)
    # Z_i = max_j ‖∂f_j(x_i)/∂W(H−1, j)‖ with the gates frozen ([diag(W(H)_j) ⊗ I] ϕ(R(j))_i)
    m64 = copy.deepcopy(model).double()
    j = reference_jacobian(m64.head, m64.features(images.double()))   # rows j·n + i
    per_unit = 128 * 129
    grads = torch.stack([j[k * 40:(k + 1) * 40, k * per_unit:(k + 1) * per_unit].norm(dim=1)
                         for k in range(3)], dim=1)
    z_rows = grads.amax(dim=1)
    z = m64.head.augmented_input(m64.features(images.double()))
    assert torch.allclose(ee_row_bounds(m64, z), z_rows, rtol=1e-10)
    expected = 0.5 * float(z_rows.pow(2).sum()) / 40
    assert cert["constants"]["L_hat"] == pytest.approx(expected, rel=1e-10)
    assert cert["condition"]["verdict"] == VERIFIED and len(cert["condition"]["per_output"]) == 3
    assert cert["bound"] is not None and cert["bound"]["coefficient"] == pytest.approx(expected / 2)
    assert "B_eps_bar" in cert["bound"]["formula"]
    fast = ee_certificate(model, images, loss, lr_used=1e-4, **GD)     # float32 features first
    assert fast["condition"]["verdict"] == VERIFIED
    assert fast["constants"]["L_hat"] == pytest.approx(expected, rel=1e-5)
    lbfgs = ee_certificate(model, images, loss, lr_used=1.0, **{**GD, "optimizer_name": "LBFGS"})
    assert lbfgs["bound"] is None and "gradient_descent" in lbfgs["bound_withheld_because"]
    minibatch = ee_certificate(model, images, loss, lr_used=1e-4, **{**GD, "full_batch": False})
    assert minibatch["bound_withheld_because"] == ["full_batch"]
    json.dumps(minibatch)


def _scaled_trunk(model, scale: float):
    """A copy of ``model`` with every trunk parameter multiplied by ``scale`` (a diverged run:
    finite parameters whose forward pass overflows)."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.trunk.parameters():
            p.mul_(scale)
    return copy_


def test_certificate_goes_to_float64_when_float32_features_overflow_and_refuses_inf(points):
    torch.manual_seed(0)
    model = two_phase_model(MLP(5, 1), 100)
    model.freeze_trunk()
    loss = make_loss("ce", 2)
    big = _scaled_trunk(model, 1e25)              # 1e25² overflows float32, not float64
    assert not torch.isfinite(big.features(points)).all()
    cert = two_phase_certificate(big, points, loss, lr_used=None, **GD)
    condition = cert["condition"]
    assert condition["feature_precision"] == "float64" and condition["verdict"] == VERIFIED
    assert condition["float32_attempt"]["verdict"] is None
    assert any("overflowed" in note for note in condition["notes"])
    json.dumps(cert)
    with pytest.raises(NumericalError, match=r"not finite in float64 for 60 of 60 inputs"):
        two_phase_certificate(_scaled_trunk(model, 1e160), points, loss, lr_used=None, **GD)


def test_certificate_mode_is_validated_and_recorded(points):
    torch.manual_seed(0)
    model = two_phase_model(MLP(5, 1), 60)
    model.freeze_trunk()
    loss = make_loss("ce", 2)
    with pytest.raises(UserInputError, match="mode"):
        two_phase_certificate(model, points, loss, lr_used=None, mode="cheap", **GD)
    full = two_phase_certificate(model, points, loss, lr_used=None, mode="full",
                                 precision="float64", **GD)
    assert full["condition"]["mode"] == "full" and full["condition"]["verdict"] == VERIFIED


# ------------------------------------------------------------- batch norm at initialisation

def _bn_trunk() -> nn.Sequential:
    """Linear → BatchNorm1d → softplus, still at the default statistics (mean 0, variance 1)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 300), nn.BatchNorm1d(300), nn.Softplus())


def _offset_points() -> torch.Tensor:
    """60 inputs with a common offset of 1000: with the default statistics every pre-activation
    is ±hundreds for nearly every unit, the softplus is linear or zero there with one sign
    pattern, so ``[h, 1]`` has rank far below 60; normalised by these inputs' statistics it is
    full."""
    return torch.randn(60, 5, generator=torch.Generator().manual_seed(3)) + 1000.0


def test_expressivity_recomputes_batchnorm_statistics_on_a_copy():
    model = TwoPhaseModel(_bn_trunk(), nn.Linear(300, 1))
    x = _offset_points()
    before = copy.deepcopy(model.state_dict())
    kept = expressivity(model, x, recompute_batchnorm=False)
    assert kept.verdict == NOT_VERIFIED and kept.rank < 20
    assert kept.details["batchnorm"]["statistics"] == "model"
    fresh = expressivity(model, x)                              # the default: recompute
    assert fresh.verdict == VERIFIED and fresh.rank == 60
    record = fresh.to_dict()["batchnorm"]
    assert record["statistics"] == "recomputed" and record["layers"] == 1
    assert record["inputs"] == 60
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    plain = expressivity(two_phase_model(MLP(5, 1), 60), x[:, :] - 1000.0)
    assert plain.details["batchnorm"]["statistics"] == "none"


def test_safe_exploration_recomputes_batchnorm_statistics():
    model = EEModel(_bn_trunk(), GatedHead(300, 2, 1))
    x = _offset_points()
    kept = safe_exploration(model, x, q="random", recompute_batchnorm=False)
    assert kept.verdict == NOT_VERIFIED and kept.rank < 40    # rank ≤ m_H · rank [h, 1]
    fresh = safe_exploration(model, x, q="random")
    assert fresh.verdict == VERIFIED and fresh.rank == 60
    assert fresh.details["batchnorm"]["statistics"] == "recomputed"
    assert model.trunk[1].running_mean.abs().max() == 0          # the caller's buffers untouched


def _nearly_dependent_inputs(n: int = 600, m: int = 700) -> torch.Tensor:
    """Rows 0 and 1 differ by ~1e-6 relative: σ_n of ``[x, 1]`` is far above the float64
    tolerance but too small for a Gram certificate (which squares it)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, m, generator=g)
    x[1] = x[0] * (1 + 2e-6 * torch.randn(m, generator=g).sign())
    return x


def test_auto_mode_reports_where_the_budget_stops_it_and_full_mode_decides():
    model = TwoPhaseModel(nn.Identity(), nn.Linear(700, 1))
    x = _nearly_dependent_inputs()
    loss = make_loss("mse", 1)
    auto = two_phase_certificate(model, x, loss, lr_used=None, budget_flops=0.0, **GD)
    c = auto["condition"]
    assert c["verdict"] == "inconclusive" and c["mode"] == "auto"
    assert c["route"] == "gram-cholesky" and c["factor_route_skipped"]["flops_budget"] == 0.0
    assert c["decide_offline"] == "gconv verify expressivity --checkpoint DIR/checkpoint.pt"
    assert auto["bound"] is None and "condition_verified" in auto["bound_withheld_because"]
    full = two_phase_certificate(model, x, loss, lr_used=None, mode="full", **GD)
    assert full["condition"]["verdict"] == VERIFIED
    # the row preconditioner of a shifted Cholesky factor decides (no SVD of the features)
    assert full["condition"]["methods"] == {"shift_preconditioned_cholesky": 600}
    assert full["condition"]["route"] == "gram-cholesky+shift-preconditioned-gram-cholesky"
    assert "decide_offline" not in full["condition"]
