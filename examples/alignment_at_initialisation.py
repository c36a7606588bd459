"""The alignment check of [K22] Definition 2 at t = 0 on LeNet variants (docs/reproduction.md).

[K22] Fig. 1b reports Q_T = 0 on Semeion for every width and seed, which includes the check at
initialisation. This script builds each LeNet of Fig. 1b,c (m_c = 1, 2, 4; seeds 0, 1) the way
``gconv train --model lenet`` does, optionally changes what the paper leaves open (pooling,
ReLU instead of its softplus(100) approximation, He initialisation, standardised inputs), and
prints the float32 rank test at t = 0: verdict, rank([J, y']) and the residual of y' outside
the significant column space (the last line: a JSON summary).

    python examples/alignment_at_initialisation.py --data digits
    python examples/alignment_at_initialisation.py --data semeion-binary.npz --variant relu max
    python examples/alignment_at_initialisation.py --data random --variant he

``--data``: a built-in data set name or an ``.npz`` (``x``, ``y`` with y ∈ {0, 1}).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from global_convergence import build_model, flush_denormals, make_loss
from global_convergence.conditions import alignment
from global_convergence.data import load_dataset

VARIANTS = ("max", "relu", "he", "standardise")


def lenet_variant(width: int, seed: int, input_shape: tuple[int, ...], variant: set[str]
                  ) -> nn.Module:
    """The library's LeNet (softplus(100), average pooling, PyTorch's initialisation), with the
    named changes: ``max`` pooling, ``relu`` activations, ``he`` (Kaiming-normal weights, zero
    biases)."""
    torch.manual_seed(seed)
    model = build_model("lenet", input_shape, 1, width=width)
    for i, module in enumerate(model):
        if "max" in variant and isinstance(module, nn.AvgPool2d):
            model[i] = nn.MaxPool2d(module.kernel_size)
        elif "relu" in variant and isinstance(module, nn.Softplus):
            model[i] = nn.ReLU()
        elif "he" in variant and isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variant", nargs="*", choices=VARIANTS, default=[])
    args = parser.parse_args()
    variant = set(args.variant)
    loss = make_loss("ce", 2)
    print(f"{args.data}, n = {args.n}, LeNet {' + '.join(sorted(variant)) or 'as built'}")
    checks = []
    for width in args.widths:
        for seed in args.seeds:
            data = load_dataset(args.data, n=args.n, seed=seed)
            x, y = data.x_train, data.y_train
            if data.num_classes > 2:        # Semeion / digits made binary as in Fig. 1b,c
                y = (y >= 5).long()
            if "standardise" in variant:
                x = (x - x.mean()) / x.std()
            model = lenet_variant(width, seed, tuple(x.shape[1:]), variant)
            with flush_denormals():
                verdict = alignment(model, x, y, loss=loss)
            residual = verdict.details.get("relative_residual")
            print(f"m_c = {width}, seed {seed}: {verdict.verdict:12s} rank(J) = {verdict.rank}, "
                  f"rank([J, y']) = {verdict.details.get('rank_augmented')}, y' outside the "
                  f"significant column space: {'-' if residual is None else f'{residual:.3f}'}")
            checks.append({"width": width, "seed": seed, "verdict": verdict.verdict,
                           "rank": verdict.rank,
                           "rank_augmented": verdict.details.get("rank_augmented")})
    print(json.dumps({"data": args.data, "n": args.n, "variant": sorted(variant),
                      "checks": checks}))


if __name__ == "__main__":
    main()
