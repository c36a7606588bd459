"""``gconv train --nproc-per-node N``: worker processes started through ``torch.distributed.run``.

``torchrun``'s own parser reads every option of the command line, including those meant for the
training script, and takes ``--n 256`` (or ``--n=256``) for an ambiguous abbreviation of its
``--nnodes`` / ``--nproc-per-node`` / ``--no-python`` / ``--node-rank`` / ``--numa-binding`` and
stops. Here the launcher's options are parsed alone and the user's arguments are handed to the
workers as they are, so every ``gconv train`` option reaches them unchanged. Each worker runs
``python -m global_convergence train`` with the same arguments and joins the process group the
launcher describes in its environment (:func:`.distributed.init_distributed`).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..errors import UserInputError

MODULE = "global_convergence"


def launched_worker() -> bool:
    """Whether this process is a worker of a launcher (``torchrun`` or :func:`launch_workers`)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launcher_args(nproc: int, argv: Sequence[str]) -> argparse.Namespace:
    """``torch.distributed.run``'s arguments for ``nproc`` workers on this machine
    (``--standalone``: a local rendezvous on a free port) running ``python -m global_convergence``
    with ``argv``, which its parser never sees."""
    from torch.distributed import run as distributed_run

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UserInputError(f"--nproc-per-node must be a positive integer, got {nproc!r}")
    args = distributed_run.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", MODULE])
    args.training_script_args = list(argv)
    return args


def launch_workers(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m global_convergence *argv`` on ``nproc`` workers; the first failed worker's
    exit status (each worker reports its own error), else 0."""
    from torch.distributed import run as distributed_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launcher_args(nproc, argv)
    try:
        distributed_run.run(args)
    except ChildFailedError as failed:
        codes = [f.exitcode for f in failed.failures.values() if f.exitcode]
        return codes[0] if codes else 1
    return 0
