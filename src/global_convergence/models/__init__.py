"""Real-analytic models and the model modifications behind the guarantees ([KS21] §3, [K22] §3.2; docs/design.md)."""
from __future__ import annotations

from torch import nn

from ..errors import UserInputError
from .analytic import (SOFTPLUS_BETA, flush_denormals, is_non_analytic, make_analytic,
                       non_analytic_modules, softplus)
from .heads import (EEModel, GatedHead, SplitNet, TwoPhaseModel, ee_head_width, ee_model,
                    two_phase_model)
from .lenet import LeNet
from .mlp import MLP, input_features
from .resnet import PreActResNet18, ResNet18

MODEL_NAMES = ("mlp", "lenet", "resnet18", "preact-resnet18")


def build_model(name: str, input_shape: tuple[int, ...], num_outputs: int, width: int = 1) -> nn.Module:
    """One of the library's base models (docs/design.md) for inputs of ``input_shape`` (one sample)."""
    if name == "mlp":
        return MLP(input_features(input_shape), num_outputs)
    if name in ("lenet", "resnet18", "preact-resnet18") and len(input_shape) != 3:
        raise UserInputError(f"model '{name}' needs image inputs (C, H, W), got input shape "
                             f"{tuple(input_shape)}")
    if name == "lenet":
        return LeNet(input_shape[0], num_outputs, width=width, image_size=input_shape[1])
    if name == "resnet18":
        return ResNet18(input_shape[0], num_outputs)
    if name == "preact-resnet18":
        return PreActResNet18(input_shape[0], num_outputs)
    raise UserInputError(f"unknown model '{name}'; expected one of {', '.join(MODEL_NAMES)}")


__all__ = ["MODEL_NAMES", "SOFTPLUS_BETA", "EEModel", "GatedHead", "LeNet", "MLP", "PreActResNet18",
           "ResNet18", "SplitNet", "TwoPhaseModel", "build_model", "ee_head_width", "ee_model",
           "flush_denormals", "input_features", "is_non_analytic", "make_analytic",
           "non_analytic_modules", "softplus", "two_phase_model"]
