"""How fast the command line starts: ``recloop --help`` and ``recloop prepare`` on ml-100k.

    .venv/bin/python bench/bench_cli.py                  # 10 runs each
    .venv/bin/python bench/bench_cli.py --runs 20 --json

Each command runs as a fresh process (the ``recloop`` entry point beside this Python, else
``python -c 'from recloop.cli import main'``).  Prints the median and best wall time and
the median CPU time (user + sys of the child, from ``wait4``) of each, with the load average
before and after: on a busy machine the CPU time is the steadier figure, and the reference
rows (a bare interpreter, ``import typer``, ``import torch``) measured in the same run say
how much of the wall time is the machine.  Targets (issue 13): ``recloop --help`` < 0.4 s,
``recloop prepare`` on ml-100k < 1 s end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS_S = {"recloop --help": 0.4, "recloop prepare (ml-100k)": 1.0}


def _entry() -> list[str]:
    script = Path(sys.executable).parent / "recloop"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from recloop.cli import main; sys.exit(main())"]


def _time(argv: list[str], runs: int) -> dict[str, float]:
    """Median and best wall seconds, median CPU seconds of ``runs`` fresh processes."""
    walls: list[float] = []
    cpus: list[float] = []
    env = {**os.environ, "RECLOOP_NO_PROGRESS": "1"}
    for _ in range(runs):
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=_quiet())
        _, status, usage = os.wait4(pid, 0)
        walls.append(time.perf_counter() - start)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(argv)} failed with status {status}")
        cpus.append(usage.ru_utime + usage.ru_stime)
    return {
        "wall_median_s": round(statistics.median(walls), 3),
        "wall_best_s": round(min(walls), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
    }


def _quiet() -> list[tuple[Any, ...]]:
    devnull = os.open(os.devnull, os.O_WRONLY)
    return [(os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--ml100k",
        type=Path,
        default=Path(os.environ.get("RECLOOP_ML100K", "/work/shared/datasets/ml-100k")),
        help="MovieLens-100K RecBole atomic files (RECLOOP_ML100K).",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON document.")
    args = parser.parse_args()

    recloop = _entry()
    out_dir = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    py = sys.executable
    cases: dict[str, list[str]] = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import typer'": [py, "-c", "import typer"],
        "python -c 'import torch'": [py, "-c", "import torch"],
        "recloop --help": [*recloop, "--help"],
        "recloop prepare --help": [*recloop, "prepare", "--help"],
        "recloop prepare (ml-100k)": [
            *recloop,
            "prepare",
            "--format",
            "recbole",
            "--input",
            str(args.ml100k),
            "--output",
            str(out_dir / "ml-100k"),
        ],
    }
    load_before = os.getloadavg()
    try:
        rows = {name: _time(argv, args.runs) for name, argv in cases.items()}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    load_after = os.getloadavg()
    doc = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in load_after],
        },
        "runs": args.runs,
        "results": rows,
        "targets_s": TARGETS_S,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    m = doc["machine"]
    print(
        f"{m['cores']} cores, Python {m['python']}, load average {m['load_avg_before']} before,"
        f" {m['load_avg_after']} after; {args.runs} runs each"
    )
    print(f"{'command':<28} {'wall median':>12} {'wall best':>10} {'cpu median':>11}  target")
    for name, r in rows.items():
        target = TARGETS_S.get(name)
        goal = f"< {target:.1f} s" if target else ""
        print(
            f"{name:<28} {r['wall_median_s']:>10.3f} s {r['wall_best_s']:>8.3f} s "
            f"{r['cpu_median_s']:>9.3f} s  {goal}"
        )


if __name__ == "__main__":
    main()
