"""``gconv``: argument parsing and error reporting, nothing else (README.md, docs/design.md).

Errors in what the user gave exit with status 2 and one line on stderr, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import NumericalError, UserInputError

CONDITIONS = ("expressivity", "safe-exploration", "alignment")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2, and ``--lr -1e-3`` or ``--eps -inf``
    reach validation as negative numbers (argparse takes ``-1e-3`` for an option otherwise)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"gconv: error: {message}\n")
        raise SystemExit(2)


def _exploit_lr(text: str) -> float | str:
    """``--exploit-lr``: ``auto`` or a number (checked by TrainConfig.validate)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model with base, two-phase or ee")
    p.add_argument("--data", required=True, help="dataset name or path of an .npz file")
    p.add_argument("--model", required=True, help="mlp | lenet | resnet18 | preact-resnet18")
    p.add_argument("--method", required=True, help="base | two-phase | ee")
    p.add_argument("--activation", default="softplus",
                   help="softplus (real analytic, default) | relu (not analytic: two-phase and ee "
                        "then need --allow-non-analytic)")
    p.add_argument("--out", help="output folder (default runs/<data>-<model>-<method>-s<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", default="sgd", help="sgd | adam")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch; 0 = full batch")
    run = p.add_mutually_exclusive_group(required=True)
    run.add_argument("--epochs", type=int)
    run.add_argument("--steps", type=int)
    switch = p.add_mutually_exclusive_group()
    switch.add_argument("--tau0", type=float, default=0.6, help="switch as a fraction of the run")
    switch.add_argument("--tau", type=int, help="switch time in the run's unit (steps or epochs)")
    p.add_argument("--eps", type=float, default=1e-3, help="EE perturbation std ε")
    p.add_argument("--delta0", type=float, default=1e-3, help="two-phase perturbation std δ0")
    p.add_argument("--exploit-optimizer", default="same", help="same | lbfgs")
    p.add_argument("--exploit-lr", type=_exploit_lr, default=None,
                   help="step of the second phase: a number, or auto = the certificate's 1/L "
                        "(the largest step its theorem allows); default: --lr")
    p.add_argument("--certificate-precision", default="auto",
                   help="auto (on the CPU, decide from the float32 feature cache with its "
                        "measured error as a noise floor, float64 features only when that does "
                        "not verify; on CUDA float64 at once; default) | float64 (always a "
                        "float64 feature pass)")
    p.add_argument("--loss", default="ce", help="ce | mse")
    p.add_argument("--n", type=int, help="number of training points (a seeded subset)")
    p.add_argument("--noise", type=float, help="two-moons noise")
    p.add_argument("--augment", action="store_true", help="random crop (+ flip for CIFAR)")
    p.add_argument("--width", type=int, default=1, help="LeNet width multiplier m_c")
    p.add_argument("--head-width", type=int, help="EE head width m_H (default: docs/design.md)")
    p.add_argument("--track-alignment-every", type=int, help="check alignment every K steps")
    p.add_argument("--checkpoint-every", type=int, help="write checkpoint.pt every K steps")
    p.add_argument("--log-every", type=int, help="evaluate and log every K steps")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--data-root", help="folder of the torchvision datasets")
    p.add_argument("--download", action="store_true", help="download torchvision datasets")
    p.add_argument("--no-cache-features", dest="cache_features", action="store_false",
                   help="recompute trunk features every phase-2 step (= --feature-cache off)")
    p.add_argument("--feature-cache", default="auto",
                   help="where phase 2 keeps the frozen trunk's features of every input: memory | "
                        "disk (a float32 .npy file in OUT, written in chunks, read per batch, "
                        "deleted at the end) | off (run the trunk every step) | auto (memory when it "
                        "takes at most half the free GPU memory on CUDA, half the available RAM "
                        "on the CPU, or 2 GiB without psutil; else disk; default)")
    p.add_argument("--data-on-device", default="auto",
                   help="CUDA only: yes (copy the data to the GPU) | no (keep them in pinned CPU "
                        "memory, copy each batch) | auto (yes when they take at most half the free "
                        "GPU memory; default)")
    p.add_argument("--allow-non-analytic", action="store_true",
                   help="run a non-analytic model; the certificate then says the guarantee fails")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile what trains: the model in phase 1; in phase 2 the head "
                   "(with the frozen trunk when features are not cached)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a condition of the guarantees")
    p.add_argument("condition", choices=CONDITIONS)
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default="ce")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--checkpoint", help="checkpoint.pt of a gconv train run")
    p.add_argument("--data-root")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="re-run an experiment of the papers")
    p.add_argument("experiment")
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "paper"))
    p.add_argument("--out", help="output folder (default runs/reproduce/<experiment>-<preset>)")
    p.add_argument("--data-root")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gconv", description="Training with global convergence guarantees.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_verify(sub)
    _add_reproduce(sub)
    demo = sub.add_parser("demo", help="the sine-wave story of [K22] on the CPU (make run)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quiet", action="store_true")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "out", "resume", "quiet")}
    config = TrainConfig.from_dict(options)
    out = args.out or f"runs/{Path(args.data).stem}-{args.model}-{args.method}-s{args.seed}"
    summary = train(config, out, resume=args.resume, progress=not args.quiet)
    error = summary["train_error"]
    if os.environ.get("RANK", "0") != "0":
        return 0      # under torchrun only rank 0 reports
    print(f"{args.method} {args.model} on {args.data}: train loss {summary['train_loss']:.4g}"
          + ("" if error is None else f", train error {100 * error:.2f} %")
          + ("" if summary["test_error"] is None else f", test error {100 * summary['test_error']:.2f} %")
          + f" after {summary['steps']} steps -> {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .experiments.verify import verify

    verdict = verify(args.condition, data=args.data, model=args.model, n=args.n, seed=args.seed,
                     loss=args.loss, width=args.width, checkpoint=args.checkpoint,
                     data_root=args.data_root, device=args.device)
    if os.environ.get("RANK", "0") != "0":
        return 0      # under torchrun only rank 0 reports
    if args.json:
        print(json.dumps(verdict.to_dict()))
    else:
        d = verdict.to_dict()
        print(f"{d['condition']}: {d['verdict']} (rank {d['rank']} of {d['n']}, tolerance "
              f"{d['tolerance']:.3g}, {d['precision']}, methods {d['methods']}, agree={d['agree']})")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .experiments import reproduce

    out = args.out or f"runs/reproduce/{args.experiment}-{args.preset}"
    report = reproduce(args.experiment, preset=args.preset, out=out, data_root=args.data_root,
                       device=args.device, progress=not args.quiet)
    print(f"{args.experiment} ({args.preset}): report in {report}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    run_demo(args.out, progress=not args.quiet)
    return 0


COMMANDS = {"train": _train, "verify": _verify, "reproduce": _reproduce, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserInputError as exc:
        sys.stderr.write(f"gconv: error: {exc}\n")
        return 2
    except NumericalError as exc:
        sys.stderr.write(f"gconv: numerical error: {exc}\n")
        return 3
    except KeyboardInterrupt:
        sys.stderr.write("gconv: interrupted; rerun with --resume to continue from the last checkpoint\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
