"""One rank of a distributed ``recloop train``: ``torchrun --nproc-per-node N -m recloop.train
--algo ALGO --data DATA --out RUN_DIR [train options]``.

``recloop train --nproc N`` runs exactly this under ``torch.distributed.run``; call it
directly to use torchrun's own options (several nodes, ``--rdzv-endpoint``, ...).  Each rank
joins the process group torchrun describes (gloo on the CPU, NCCL on CUDA; see
:mod:`recloop.training.distributed`) and runs ``recloop train`` with the same arguments.
"""

from __future__ import annotations

import sys

from recloop.cli import main as cli_main
from recloop.training import distributed


def _device(args: list[str]) -> str:
    """The value of ``--device`` among ``args`` (``auto`` when absent)."""
    for i, arg in enumerate(args):
        if arg == "--device" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "auto"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    distributed.setup(_device(args))
    try:
        return cli_main(["train", *args])
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
