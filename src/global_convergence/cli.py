"""``gconv``: argument parsing and error reporting, nothing else (docs/design.md).

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

from .allocator import keep_freed_memory
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


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default, where it has one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _exploit_lr(text: str) -> float | str:
    """``--exploit-lr``: ``auto`` or a number (checked by TrainConfig.validate)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _choice(p: argparse.ArgumentParser, flag: str, choices: Sequence[str], help: str,
            **kwargs) -> None:
    """An option with a fixed set of values, listed in the help; a value outside them is
    refused by :meth:`TrainConfig.validate` with one line naming the choices."""
    p.add_argument(flag, metavar="{" + ",".join(choices) + "}", help=help, **kwargs)


def _add_train(sub) -> None:
    from .data import DATASET_NAMES
    from .losses import LOSS_NAMES
    from .models import MODEL_NAMES
    from .training import config as c
    from .wrappers import EXPLOIT_CHOICES

    p = sub.add_parser("train", help="train a model with base, two-phase or ee",
                       formatter_class=_DefaultsFormatter,
                       description="Train a built-in model with the two-phase algorithm of [KS21] "
                       "(§4), the exploration-exploitation wrapper of [K22] (§3.2) or the base "
                       "optimizer alone. Outputs and resume: docs/design.md.")
    p.add_argument("--data", required=True,
                   help=f"dataset: {', '.join(DATASET_NAMES)}, or the path of an .npz file with "
                        "arrays x and y")
    _choice(p, "--model", MODEL_NAMES, "built-in network (softplus with ς = 100)", required=True)
    _choice(p, "--method", c.METHODS, "base: the optimizer alone; two-phase: [KS21] §4; ee: "
            "[K22] §3.2", required=True)
    _choice(p, "--activation", c.ACTIVATIONS, "hidden activation; relu is not real analytic, so "
            "two-phase and ee then need --allow-non-analytic", default="softplus")
    p.add_argument("--out", help="output folder (default runs/<data>-<model>-<method>-s<seed>)")
    p.add_argument("--seed", type=int, default=0, help="seed of data subset, model, order, noise")
    _choice(p, "--optimizer", c.OPTIMIZERS, "base optimizer G", default="sgd")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="weight decay")
    p.add_argument("--batch-size", type=int, default=64, help="global batch; 0 = full batch")
    run = p.add_mutually_exclusive_group(required=True)
    run.add_argument("--epochs", type=int, help="length of the run in epochs")
    run.add_argument("--steps", type=int, help="length of the run in steps")
    switch = p.add_mutually_exclusive_group()
    switch.add_argument("--tau0", type=float, default=0.6,
                        help="switch as a fraction of the run ([K22] §3.4.2: τ = τ0·T)")
    switch.add_argument("--tau", type=int, help="switch time in the run's unit (steps or epochs)")
    p.add_argument("--eps", type=float, default=1e-3, help="EE perturbation std ε ([K22] §3.2.1)")
    p.add_argument("--delta0", type=float, default=1e-3,
                   help="two-phase perturbation std δ0 ([KS21] §4)")
    _choice(p, "--exploit-optimizer", EXPLOIT_CHOICES, "EE's exploitation optimizer G̃",
            default="same")
    p.add_argument("--exploit-lr", type=_exploit_lr, default=None, metavar="{auto,NUMBER}",
                   help="step of the second phase: a number, or auto = the certificate's 1/L "
                        "(the largest step its theorem allows); default: --lr")
    _choice(p, "--certificate", c.CERTIFICATE_MODES,
            "the certificate at the switch: auto (cheap routes and a bounded fallback, else "
            "inconclusive naming the reason; gconv verify --checkpoint decides), full (decide "
            "whatever it costs), off (none: \"certificate\": null); docs/verifiers.md",
            default="auto")
    _choice(p, "--certificate-precision", c.CERTIFICATE_PRECISIONS,
            "features of the certificate: auto (on the CPU, decide from the float32 feature "
            "cache with its measured error as a noise floor, float64 features only when that "
            "does not verify; on CUDA float64 at once) | float64 (always a float64 feature pass)",
            default="auto")
    _choice(p, "--loss", LOSS_NAMES, "training loss", default="ce")
    p.add_argument("--n", type=int, help="number of training points (a seeded subset); under "
                   "torchrun write `train -- --n N ...` or use --nproc-per-node (docs/design.md)")
    p.add_argument("--noise", type=float, help="two-moons noise")
    p.add_argument("--augment", action="store_true", help="random crop (+ flip for CIFAR)")
    p.add_argument("--width", type=int, default=1, help="LeNet width multiplier m_c")
    p.add_argument("--head-width", type=int,
                   help="EE head width m_H (default: that of [K22] §3.2.2, see ee_model)")
    p.add_argument("--track-alignment-every", type=int,
                   help="check data-architecture alignment ([K22] §2.1.2) every K steps: Q_T")
    p.add_argument("--checkpoint-every", type=int, help="write checkpoint.pt every K steps")
    p.add_argument("--log-every", type=int, help="evaluate and log every K steps")
    _choice(p, "--device", c.DEVICES, "training device", default="cpu")
    p.add_argument("--data-root", help="folder of the torchvision datasets")
    p.add_argument("--download", action="store_true", help="download torchvision datasets")
    p.add_argument("--no-cache-features", dest="cache_features", action="store_false",
                   help="recompute trunk features every phase-2 step (= --feature-cache off)")
    _choice(p, "--feature-cache", c.FEATURE_CACHES,
            "where phase 2 keeps the frozen trunk's features of every input: memory | disk (a "
            "float32 .npy file in OUT, written in chunks, read per batch, deleted at the end) | "
            "off (run the trunk every step) | auto (memory when it takes at most half the free "
            "GPU memory on CUDA, half the available RAM on the CPU, or 2 GiB without psutil; "
            "else disk)", default="auto")
    _choice(p, "--data-on-device", c.DATA_PLACEMENTS,
            "CUDA only: yes (copy the data to the GPU) | no (keep them in pinned CPU memory, "
            "copy each batch) | auto (yes when they take at most half the free GPU memory)",
            default="auto")
    p.add_argument("--allow-non-analytic", action="store_true",
                   help="run a non-analytic model; the certificate then says the guarantee fails")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile what trains: the model in phase 1; in phase 2 the head "
                   "(with the frozen trunk when features are not cached)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt; start the run when OUT holds none yet")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="launch N worker processes on this machine through torch.distributed.run "
                        "(DDP; gloo on the CPU, nccl on CUDA); --batch-size stays the global batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a condition of the guarantees")
    p.add_argument("condition", choices=CONDITIONS)
    p.add_argument("--data", help="dataset name or .npz path (not needed with --checkpoint)")
    p.add_argument("--model", help="mlp | lenet | resnet18 | preact-resnet18")
    p.add_argument("--n", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default="ce")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--checkpoint", help="checkpoint.pt of a gconv train run: decide the "
                                        "condition on its state, whatever it costs")
    p.add_argument("--data-root")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batchnorm", default="recompute", choices=("recompute", "model"),
                   help="at initialisation: recompute the trunk's batch-norm statistics over the "
                        "inputs (default) or keep the model's (docs/verifiers.md)")
    p.add_argument("--precision", default="auto", choices=("auto", "float64"),
                   help="features: float32 with its noise floor where it verifies, else float64")
    p.add_argument("--plot", help="write the decided spectrum to this .png")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_reproduce(sub) -> None:
    from .experiments import EXPERIMENTS

    p = sub.add_parser("reproduce", help="re-run an experiment of the papers",
                       formatter_class=_DefaultsFormatter,
                       description="Re-run a table or figure of [KS21] or [K22] and write its "
                       "report.md beside the paper's numbers (docs/reproduction.md).")
    p.add_argument("experiment", metavar="{" + ",".join(EXPERIMENTS) + "}",
                   help="the experiment (see docs/reproduction.md)")
    p.add_argument("--preset", default="cpu", choices=("smoke", "cpu", "paper"),
                   help="smoke: seconds, for tests; cpu: minutes on a CPU with offline stand-ins; "
                        "paper: the papers' settings, for a GPU")
    p.add_argument("--out", help="output folder (default runs/reproduce/<experiment>-<preset>)")
    p.add_argument("--data-root", help="folder of the torchvision datasets")
    _choice(p, "--device", ("cpu", "cuda"), "training device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gconv", description="Training with global convergence guarantees.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_verify(sub)
    _add_reproduce(sub)
    demo = sub.add_parser("demo", help="the sine-wave story of [K22] on the CPU (make run)",
                          formatter_class=_DefaultsFormatter)
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from .training import TrainConfig, train
    from .training.folder import check_out
    from .training.launch import launch_workers, launched_worker

    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "out", "resume", "quiet", "nproc_per_node")}
    config = TrainConfig.from_dict(options)
    out = args.out or f"runs/{Path(args.data).stem}-{args.model}-{args.method}-s{args.seed}"
    if args.nproc_per_node not in (None, 1) and not launched_worker():
        config.validate()                   # bad options: one line here, not one per worker
        check_out(out)
        return launch_workers(args.nproc_per_node, argv)
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

    if args.checkpoint is None and (args.data is None or args.model is None):
        raise UserInputError("verify needs --data and --model, or --checkpoint")
    verdict = verify(args.condition, data=args.data, model=args.model, n=args.n, seed=args.seed,
                     loss=args.loss, width=args.width, checkpoint=args.checkpoint,
                     data_root=args.data_root, device=args.device, batchnorm=args.batchnorm,
                     precision=args.precision)
    if os.environ.get("RANK", "0") != "0":
        return 0      # under torchrun only rank 0 reports
    if args.plot:
        from .conditions.plot import plot_spectrum

        plot_spectrum(verdict, args.plot)
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


COMMANDS = {"verify": _verify, "reproduce": _reproduce, "demo": _demo}
"""The sub-commands besides ``train`` (which also takes the command line, to hand it to workers)."""


def command_line(argv: Sequence[str]) -> list[str]:
    """``argv`` without the ``--`` that ``torchrun ... -m global_convergence train -- --n 256 ...``
    needs: torchrun's parser stops at ``--n`` (an ambiguous abbreviation of its own options) but
    passes everything after ``--`` on unread. ``train`` has no positional arguments, so its first
    ``--`` separates nothing."""
    argv = list(argv)
    if argv[:1] == ["train"] and "--" in argv:
        argv.remove("--")
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = command_line(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    try:
        if args.command == "train":
            return _train(args, argv)
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
