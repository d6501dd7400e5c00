"""Benchmark ``recloop prepare`` end to end on synthetic Tianchi logs.

    .venv/bin/python bench/bench_prepare.py                 # 10M events (the target run)
    .venv/bin/python bench/bench_prepare.py --events 1000000  # quick check

    .venv/bin/python bench/bench_prepare.py --events 100000000  # the out-of-core run

Generates the logs once with ``recloop data synth`` (reused on later runs), then runs load +
prepare + save in a fresh child process, so the peak RSS (``getrusage`` max RSS) covers only
the prepare job.  The child hands the loaded table straight to ``prepare`` (as the CLI does),
so it is freed once it is codes.  Targets (issue 15): >= 2M events/s end to end at 10M
events; peak RSS <= 3 GB at 10M (issue 3) and <= 8 GB at 100M.  Wall rates need a quiet
machine: the CPU seconds (all threads) and the load average before and after are printed too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET_EVENTS_PER_S = 2_000_000
TARGET_RSS_GB = 3.0
TARGET_RSS_GB_LARGE = 8.0
"""At 50M events and more (the 100M run)."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import numpy
    import polars
    import pyarrow

    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "polars": polars.__version__,
        "pyarrow": pyarrow.__version__,
    }


def child(input_dir: Path, output: Path) -> None:
    """Load + prepare + save in this process; print timings and peak RSS as JSON."""
    from recloop.data.loaders import LoadOptions, load_raw
    from recloop.data.prepare import PrepareConfig, prepare

    marks = [(time.perf_counter(), time.process_time())]
    skipped = 0

    def loaded() -> Any:
        nonlocal skipped
        raw = load_raw("tianchi", input_dir, LoadOptions())
        skipped = raw.skipped.count
        marks.append((time.perf_counter(), time.process_time()))
        return raw

    # No reference kept here: prepare frees the raw table once it is codes.
    dataset = prepare(loaded(), PrepareConfig())
    marks.append((time.perf_counter(), time.process_time()))
    dataset.save(output)
    marks.append((time.perf_counter(), time.process_time()))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = usage.ru_maxrss
    phases = {}
    for name, (a, b) in zip(("load", "prepare", "save"), itertools.pairwise(marks), strict=True):
        phases[f"{name}_s"] = b[0] - a[0]
        phases[f"{name}_cpu_s"] = b[1] - a[1]
    print(
        json.dumps(
            {
                "input_events": dataset.manifest["counts"]["steps"][0]["events"] + skipped,
                "kept_events": dataset.n_events,
                "users": dataset.n_users,
                "items": dataset.n_items,
                **phases,
                "total_s": marks[-1][0] - marks[0][0],
                "total_cpu_s": marks[-1][1] - marks[0][1],
                "peak_rss_gb": peak_kb * 1024 / 1e9,
            }
        )
    )


def ensure_data(events: int, seed: int, workdir: Path) -> Path:
    """Synthesise the logs unless an identical set is already there."""
    directory = workdir / f"synth-{events}-seed{seed}"
    marker = directory / "synth.json"
    want = {"events": events, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        print(f"reusing {directory}")
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    _synth(events, seed, directory)
    print(f"synthesised {events:,} events into {directory} in {time.perf_counter() - start:.1f} s")
    marker.write_text(json.dumps(want))
    return directory


def _synth(events: int, seed: int, directory: Path) -> None:
    """Generate in a child process so the parent stays small."""
    code = (
        "from pathlib import Path; from recloop.data.synth import SynthConfig, generate; "
        f"generate(SynthConfig(events={events}, seed={seed}), Path({str(directory)!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recloop-bench"))
    parser.add_argument(
        "--keep", action="store_true", help="keep the prepared output (e.g. for bench_sampler)"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.output)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args.events, args.seed, args.workdir)
    output = args.workdir / f"prepared-{args.events}"
    shutil.rmtree(output, ignore_errors=True)
    info = machine()
    load_before = os.getloadavg()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(data), "--output", str(output)],
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    rate = r["input_events"] / r["total_s"]
    cpu_rate = r["input_events"] / r["total_cpu_s"]
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, load avg (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_before)} before, "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} after; "
        f"python {info['python']}, numpy {info['numpy']}, polars {info['polars']}, "
        f"pyarrow {info['pyarrow']}"
    )
    print(
        f"prepare (tianchi, default config) on {r['input_events']:,} synthetic events → "
        f"{r['kept_events']:,} kept, {r['users']:,} users, {r['items']:,} items"
    )
    total = r["total_s"]
    print("  phase      wall s   share   CPU s (user + sys, all threads)")
    for phase in ("load", "prepare", "save"):
        s = r[f"{phase}_s"]
        print(f"  {phase:<8} {s:8.2f}  {s / total:6.1%}  {r[f'{phase}_cpu_s']:6.2f}")
    print(f"  total    {total:8.2f}          {r['total_cpu_s']:6.2f}")
    ok_rate = rate >= TARGET_EVENTS_PER_S
    target_rss = TARGET_RSS_GB_LARGE if r["input_events"] >= 50_000_000 else TARGET_RSS_GB
    ok_rss = r["peak_rss_gb"] <= target_rss
    print(
        f"throughput {rate / 1e6:.2f} M events/s wall (target >= "
        f"{TARGET_EVENTS_PER_S / 1e6:.0f}): {'ok' if ok_rate else 'MISSED'}; "
        f"{cpu_rate / 1e6:.2f} M events per CPU second (all threads; a 2-core machine to "
        "itself would give at most twice that in wall rate)"
    )
    print(
        f"peak RSS   {r['peak_rss_gb']:.2f} GB (target <= {target_rss:.0f}): "
        f"{'ok' if ok_rss else 'MISSED'}"
    )
    print(
        json.dumps(
            {
                "machine": info,
                "load_avg_before": load_before,
                "load_avg_after": load_after,
                "result": r,
                "events_per_s": rate,
                "events_per_cpu_s": cpu_rate,
            }
        )
    )
    if args.keep:
        print(f"prepared dataset kept in {output}")
    else:
        shutil.rmtree(output, ignore_errors=True)


if __name__ == "__main__":
    main()
