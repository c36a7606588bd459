"""Models, real-analytic conversion and the two model modifications."""
import pytest
import torch
import torchvision
from torch import nn

from global_convergence import (UserInputError, ee_model, make_analytic, non_analytic_modules,
                                two_phase_model)
from global_convergence.models import (MLP, EEModel, GatedHead, LeNet, PreActResNet18, ResNet18,
                                       TwoPhaseModel, build_model, ee_head_width)


def test_mlp_has_three_hidden_layers_of_300_and_spec_parameter_count():
    model = MLP(2, 1)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [300, 300, 300, 1]
    assert sum(p.numel() for p in model.parameters()) == 181_801   # d = 181,801 (docs/design.md)
    assert non_analytic_modules(model) == []


@pytest.mark.parametrize("width", [1, 2, 4])
def test_lenet_width_multiplier_scales_filters_and_units(width):
    model = LeNet(1, 10, width=width)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model if isinstance(m, nn.Linear)]
    assert all(c.out_channels == 8 * width for c in convs)
    assert [f.out_features for f in fcs[:-1]] == [128 * width, 128 * width]
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)


@pytest.mark.parametrize("cls", [ResNet18, PreActResNet18])
def test_resnets_accept_any_channels_and_are_analytic(cls):
    model = cls(1, 3)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    assert non_analytic_modules(model) == []
    assert model.fc.in_features == 512


def test_non_analytic_modules_lists_every_offender_of_torchvision_resnet():
    names = non_analytic_modules(torchvision.models.resnet18())
    assert "maxpool" in names and "relu" in names and "layer4.1.relu" in names


def test_make_analytic_replaces_shared_relu_everywhere_and_keeps_sharing():
    model = torchvision.models.resnet18(num_classes=4)
    block = model.layer1[0]
    make_analytic(model, avgpool=True)
    assert non_analytic_modules(model) == []
    assert isinstance(block.relu, nn.Softplus) and block.relu.beta == 100
    assert isinstance(model.maxpool, nn.AvgPool2d) and model.maxpool.kernel_size == 3
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(model(x)).all()


def test_make_analytic_without_avgpool_keeps_max_pooling_listed():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Hardtanh())
    make_analytic(model)
    assert non_analytic_modules(model) == ["2"]
    assert isinstance(model[1], nn.Softplus) and isinstance(model[3], nn.Tanh)


def test_ee_model_on_mlp_keeps_width_300_and_starts_from_base_function():
    torch.manual_seed(0)
    base = MLP(1, 1)
    model = ee_model(base, n=100)
    assert isinstance(model, EEModel) and isinstance(model.head, GatedHead)
    assert model.head.width == 300 and model.head.in_features == 300
    assert model.head.weight.shape == (1, 300, 301)
    # base unchanged, head initialised from the base's last two layers
    assert isinstance(base[-1], nn.Linear)
    torch.testing.assert_close(model.head.weight[0, :, :300], base[-3].weight)
    torch.testing.assert_close(model.head.weight[0, :, 300], base[-3].bias)


def test_gated_head_computes_the_formula_of_k22():
    head = GatedHead(in_features=3, width=4, outputs=2)
    z_bar = torch.randn(5, 3)
    z = torch.cat([z_bar, torch.ones(5, 1)], 1)
    expected = torch.stack([sum(head.out_weight[j, k] * torch.sigmoid(z @ head.weight[j, k]) * (z @ head.weight[j, k])
                                for k in range(4)) for j in range(2)], 1)
    torch.testing.assert_close(head(z_bar), expected)
    head.freeze_gates()
    with torch.no_grad():
        head.weight.add_(1.0)
    gates_expected = torch.stack([sum(head.out_weight[j, k] * torch.sigmoid(z @ head.gates[j, k]) * (z @ head.weight[j, k])
                                      for k in range(4)) for j in range(2)], 1)
    torch.testing.assert_close(head(z_bar), gates_expected)


def test_ee_model_on_resnet_uses_paper_width_rule():
    model = ee_model(ResNet18(3, 10), n=50_000)
    assert model.head.in_features == 512
    assert model.head.width == ee_head_width(50_000, 512) == 195      # [K22] §3.4: CIFAR 195
    assert ee_head_width(60_000, 512) == 234 and ee_head_width(73_257, 512) == 286
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_ee_model_on_torchvision_resnet18_replaces_fc():
    base = make_analytic(torchvision.models.resnet18(num_classes=7), avgpool=True)
    model = ee_model(base, n=1000, head_width=8)
    assert isinstance(model.trunk.fc, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_ee_model_refuses_a_model_without_output_linear():
    base = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softplus(), nn.Conv2d(2, 1, 3))
    with pytest.raises(UserInputError, match=r"could not find the output nn.Linear layer.*'2' \(Conv2d\)"):
        ee_model(base, n=10)


def test_two_phase_model_inserts_wide_layer_only_where_needed():
    kept = two_phase_model(MLP(2, 1), n=100)
    assert isinstance(kept, TwoPhaseModel) and kept.head.in_features == 300
    widened = two_phase_model(MLP(2, 1), n=1000)
    assert widened.head.in_features == 1100
    conv = two_phase_model(build_model("lenet", (1, 16, 16), 10), n=200)
    assert conv.head.in_features == 220
    assert conv(torch.randn(4, 1, 16, 16)).shape == (4, 10)


def test_frozen_trunk_stays_in_eval_mode_and_records_no_graph():
    model = two_phase_model(ResNet18(1, 2), n=20)
    model.freeze_trunk()
    model.train()
    assert not model.trunk.training and model.head.training
    features = model.features(torch.randn(2, 1, 16, 16))
    assert features.grad_fn is None
    state = model.state_dict()
    fresh = two_phase_model(ResNet18(1, 2), n=20)
    fresh.load_state_dict(state)
    assert fresh.is_trunk_frozen and not any(p.requires_grad for p in fresh.trunk.parameters())


@pytest.mark.parametrize("make", [lambda: ee_model(MLP(3, 2), n=10),
                                  lambda: ee_model(LeNet(1, 2), n=10),
                                  lambda: two_phase_model(MLP(3, 1), n=10)])
def test_forward_passes_read_no_tensor_flags_in_any_state(make):
    """The frozen-trunk and tied-gate flags are buffers (checkpoints keep them), but forward
    reads Python copies: reading a CUDA buffer would wait for the GPU at every step, and would
    break a ``torch.compile`` graph. ``fullgraph=True`` fails on any such read."""
    model = make()
    x = torch.randn(4, *((3,) if isinstance(model.trunk, MLP) else (1, 16, 16)))
    states = [lambda m: None, lambda m: m.freeze_trunk()]
    if isinstance(model, EEModel):
        states.append(lambda m: m.head.freeze_gates())
    for change in states:
        change(model)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.allclose(compiled(x), model(x))
    fresh = make()
    fresh.load_state_dict(model.state_dict())
    assert fresh.is_trunk_frozen
    if isinstance(model, EEModel):
        assert not fresh.head.are_gates_tied and not bool(fresh.head.tied)
        fresh.head.set_tied(True)
        assert fresh.head.are_gates_tied and bool(fresh.head.tied)
    fresh.unfreeze_trunk()
    assert not fresh.is_trunk_frozen and not bool(fresh.trunk_frozen)
