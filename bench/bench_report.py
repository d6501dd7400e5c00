"""Benchmark ``recloop report`` on the demo's outputs (issue 13: < 5 s, file < 10 MB).

    .venv/bin/recloop demo --workdir runs/demo          # once: the runs to report on
    .venv/bin/python bench/bench_report.py --workdir runs/demo --repeat 3

Times ``write_report`` in this process (the work itself: datasets, curves, the three
artifacts' top-10 lists, the page) and the whole ``recloop report`` command in a child
process (adds interpreter start-up and imports).  Prints the figures, the machine and the
load average before and after: the machine is shared, so read the figures with the load.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 5.0
TARGET_MB = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not (args.workdir / "runs").is_dir():
        sys.exit(f"{args.workdir}: no demo outputs; run `recloop demo --workdir {args.workdir}`")
    from recloop.report import write_report

    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.html"
        in_process = []
        for _ in range(args.repeat):
            res = write_report([args.workdir], out)
            in_process.append(res.seconds)
        mb = res.bytes / 1e6
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import sys; from recloop.cli import main; sys.exit(main())",
             "report", str(args.workdir), "--out", str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        command_s = time.perf_counter() - start
    print(f"load average after: {os.getloadavg()}")
    runs = ", ".join(f"{s:.2f}" for s in in_process)
    print(
        f"write_report: best {min(in_process):.2f} s of {args.repeat} ({runs}; the first pays "
        f"the imports), {res.charts} charts, {mb:.2f} MB; `recloop report` command end to end "
        f"{command_s:.2f} s"
    )
    print(
        f"targets: < {TARGET_S} s {'met' if command_s < TARGET_S else 'MISSED'} (command), "
        f"< {TARGET_MB} MB {'met' if mb < TARGET_MB else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
