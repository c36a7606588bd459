"""Batch-norm statistics for a condition checked at initialisation (docs/verifiers.md "Batch norm
at initialisation").

A freshly built network in eval mode still has the default running statistics (mean 0,
variance 1): nothing normalises its activations, and a ResNet-18's features collapse onto a common
mode (rank 1229 of 4000 on random images). The function the second phase trains on is the trunk
with statistics recomputed over the training inputs at the switch ([K22] §3.2; the wrappers do it
with ``torch.optim.swa_utils.update_bn``). A check at initialisation therefore first recomputes
them the same way over the inputs it is given — on a copy; the caller's model is never modified.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from ..models import SplitNet
from .features import FEATURE_CHUNK, model_device

BATCHNORM = nn.modules.batchnorm._BatchNorm
RECOMPUTED = "recomputed"
KEPT = "model"
NONE = "none"


def batchnorm_layers(module: nn.Module) -> int:
    """The number of batch-norm layers in ``module``."""
    return sum(isinstance(m, BATCHNORM) for m in module.modules())


def with_recomputed_batchnorm(model: SplitNet, x: Tensor, *, recompute: bool = True,
                              batch_size: int = FEATURE_CHUNK) -> tuple[SplitNet, dict[str, Any]]:
    """``model``, or a copy whose trunk's batch-norm running statistics are recomputed over ``x``,
    and the record of the statistics used (``details["batchnorm"]`` of the verdict).

    ``recompute=True``: a deep copy, its trunk's statistics reset and averaged over batches of
    ``batch_size`` inputs (cumulative average, ``torch.optim.swa_utils.update_bn``, without
    gradients). ``False``: the model's own running statistics. A trunk without batch norm is
    returned as it is.
    """
    layers = batchnorm_layers(model.trunk)
    if layers == 0:
        return model, {"statistics": NONE, "layers": 0,
                       "note": "the trunk has no batch normalisation"}
    if not recompute:
        return model, {"statistics": KEPT, "layers": layers,
                       "note": "the model's own running statistics (not recomputed)"}
    clone = copy.deepcopy(model)
    device = model_device(clone)
    batches = [x[s:s + batch_size] for s in range(0, x.shape[0], batch_size)]
    with torch.no_grad():
        update_bn(batches, clone.trunk, device=device)
    clone.eval()
    return clone, {"statistics": RECOMPUTED, "layers": layers, "inputs": int(x.shape[0]),
                   "batch_size": int(batch_size),
                   "note": f"running statistics of the {layers} batch-norm layers recomputed over "
                           f"the {x.shape[0]} inputs checked (torch.optim.swa_utils.update_bn, "
                           f"batches of {batch_size}), as the wrappers do at the switch"}
