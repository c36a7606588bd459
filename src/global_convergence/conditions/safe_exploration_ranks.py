"""[K22] Assumption 10 decided with the Gram certificate split over ``torch.distributed`` ranks.

:func:`safe_exploration_on_ranks` is :func:`.safe_exploration.safe_exploration` for n where one
machine cannot hold the lower triangle of ``ϕϕᵀ`` (n = 73,257 for SVHN in [K22] Table 2: 21.5 GB
in float64; docs/verifiers.md): every rank computes ``Z = [z̄, 1]`` and ``S = σ̃(Z qᵀ)`` itself
(the same trunk, inputs and gates on every rank; n × (m_{H−1} + m_H) numbers), and each
output's verdict comes from
:func:`~global_convergence.linalg.distributed_rank.distributed_factor_rank_verdict`, which
rebuilds on each rank only its own block columns of ``(S Sᵀ) ⊙ (Z Zᵀ)``. Every rank returns the
same verdict. Under ``torchrun``, ``gconv verify safe-exploration`` takes this route.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..linalg import FACTOR_MEMORY_BUDGET, RANK_BAND, KhatriRaoFactor, Verdict
from ..linalg.distributed_rank import distributed_factor_rank_verdict
from .features import FEATURE_CHUNK
from .safe_exploration import combine_outputs, gate_matrices, gate_values, gated_inputs


def safe_exploration_on_ranks(model: nn.Module, x: Tensor, *, q: Tensor | str | None = None,
                              seed: int = 0, dtype: torch.dtype = torch.float64,
                              chunk_size: int = FEATURE_CHUNK, tol: float | None = None,
                              band: float = RANK_BAND, cross_check: bool = False,
                              factor_memory_budget: int = FACTOR_MEMORY_BUDGET,
                              memory_budget_per_rank: int | None = None,
                              block: int | None = None,
                              group: dist.ProcessGroup | None = None) -> Verdict:
    """``rank ϕ(q_j, θ(1:H−2)) = n`` for every output ``j`` ([K22] Assumption 10), called by
    every rank of ``group`` with the same model and inputs.

    Arguments as in :func:`.safe_exploration.safe_exploration`; ``memory_budget_per_rank`` and
    ``block`` as in ``distributed_factor_rank_verdict``. ``details["world_size"]`` is the number
    of ranks that decided it.
    """
    z, seconds = gated_inputs(model, x, dtype, chunk_size)
    start = time.perf_counter()
    gates, source = gate_matrices(model.head, q, seed, z.dtype, z.device)
    results = []
    for label, qj in gates:
        factor = KhatriRaoFactor(gate_values(z, qj, model.head.gate_sharpness), z)
        results.append((label, distributed_factor_rank_verdict(
            factor, condition="safe-exploration", group=group, tol=tol, band=band,
            cross_check=cross_check, factor_memory_budget=factor_memory_budget,
            memory_budget_per_rank=memory_budget_per_rank, block=block, seed=seed)))
    combined = combine_outputs(results)
    combined.details["q"] = source
    combined.details["assumption"] = "[K22] Assumption 10: rank ϕ(q, θ(1:H-2)) = n"
    combined.seconds.update(features=seconds, rank=time.perf_counter() - start)
    return combined
