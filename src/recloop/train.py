"""One rank of a distributed ``recloop train``: ``torchrun --nproc-per-node N -m recloop.train
--algo ALGO --data DATA --out RUN_DIR [train options]``.

``recloop train --nproc N`` runs exactly this under ``torch.distributed.run``; call it
directly to use torchrun's own options (several nodes, ``--rdzv-endpoint``, ...).  Each rank
joins the process group torchrun describes (gloo on the CPU, NCCL on CUDA; see
:mod:`recloop.training.distributed`) and runs ``recloop train`` with the same arguments.
"""

from __future__ import annotations

import json
import os
import sys

from recloop.cli import main as cli_main
from recloop.training import distributed

ROOT_OPTIONS_ENV = "RECLOOP_ROOT_OPTIONS"
"""JSON list of the ``recloop`` options given before ``train`` (``--threads 4 -v``), which
``recloop train --nproc`` hands on to its ranks."""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    root = json.loads(os.environ.get(ROOT_OPTIONS_ENV, "[]"))
    try:
        # train_run joins the process group once the run's fit.device is known.
        return cli_main([*root, "train", *args])
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
