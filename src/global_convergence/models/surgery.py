"""Locating and replacing the last layers of an arbitrary ``nn.Module``.

Module order is registration order (``named_modules``), which is execution order for
``nn.Sequential`` models, the library's ResNets and torchvision's classifiers.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UserInputError

_ACTIVATIONS = (nn.Softplus, nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU,
                nn.Mish, nn.ReLU6, nn.SELU, nn.CELU, nn.Hardtanh, nn.Hardswish)


@dataclass(frozen=True)
class LastLayers:
    """Qualified names of the output layer and, when the net ends in two FC layers, the
    penultimate FC layer and the activation between them."""

    output: str
    penultimate: str | None = None
    activation: str | None = None


def _parameterised_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]


def find_last_layers(model: nn.Module, caller: str) -> LastLayers:
    """Find the output ``nn.Linear`` and, if directly preceded by ``Linear → activation`` in the
    same ``nn.Sequential``, the penultimate FC layer. Refuses models it cannot modify."""
    leaves = _parameterised_leaves(model)
    if not leaves:
        raise UserInputError(f"{caller} could not find the output layer: {type(model).__name__} has "
                             "no module with parameters")
    out_name, out = leaves[-1]
    if not isinstance(out, nn.Linear):
        raise UserInputError(f"{caller} could not find the output nn.Linear layer: the last layer "
                             f"with parameters of {type(model).__name__} is '{out_name}' "
                             f"({type(out).__name__})")
    parent_name, _, child = out_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential) and child.isdigit():
        index = int(child)
        if index >= 2:
            act, pen = parent[index - 1], parent[index - 2]
            if isinstance(act, _ACTIVATIONS) and isinstance(pen, nn.Linear):
                prefix = f"{parent_name}." if parent_name else ""
                return LastLayers(out_name, f"{prefix}{index - 2}", f"{prefix}{index - 1}")
    return LastLayers(out_name)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
