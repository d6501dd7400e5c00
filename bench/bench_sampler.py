"""Transition sampler throughput and memory on a synthetic ~10M-event log.

    .venv/bin/python bench/bench_sampler.py [--events 10000000] [--history 10] [--batch 2048]
    .venv/bin/python bench/bench_sampler.py --mmap            # the same, saved and memory-mapped
    .venv/bin/python bench/bench_sampler.py --data DIR        # a prepared dataset, memory-mapped
    .venv/bin/python bench/bench_sampler.py --lists 10        # also states="lists" vs "rows"

``--data`` opens a prepared dataset (e.g. ``bench_prepare.py --events 100000000 --keep``'s
output) with ``PreparedDataset.load``, which memory-maps the events; ``--mmap`` saves the
synthetic dataset and reopens it that way.  With a mapped dataset the RSS is reported in its
two parts: anonymous memory (the heap: the permutation and batch scratch) and file-backed
pages of the mapping, which the kernel shares between processes and may drop and re-read.

Builds the events directly with ``PreparedDataset.from_arrays`` (numpy random: Zipf-ish user
lengths, session breaks, an 80/10/10 per-user chronological split), then times one full
training epoch (permutation included) and, in the same run, the variants that bound it:
rows in order (cache-friendly) and ``done`` gathered per batch instead of packed into the
permutation.  Memory: the peak RSS during the epoch minus the RSS before building the
sampler, next to the bytes of the event arrays and of the permutation.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import orjson
import torch

from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.data.sampler import TransitionSampler


def machine() -> str:
    cpu = "unknown cpu"
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (
        f"{cpu}, {os.cpu_count()} cores, load avg {load[0]:.1f}/{load[1]:.1f}, "
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


class AnonPeak:
    """Peak RssAnon (heap) seen at the samples taken; there is no kernel high-water mark."""

    def __init__(self) -> None:
        self.peak = rss_mb("RssAnon")

    def sample(self) -> None:
        self.peak = max(self.peak, rss_mb("RssAnon"))


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so that the next peak belongs to what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def synthetic(n_events: int, seed: int) -> PreparedDataset:
    rng = np.random.default_rng(seed)
    n_users = max(1, n_events // 100)
    weights = rng.zipf(1.5, n_users).astype(np.float64).clip(max=5_000)
    lengths = np.maximum(1, np.round(weights / weights.sum() * n_events)).astype(np.int64)
    lengths[-1] += n_events - lengths.sum() if lengths.sum() < n_events else 0
    user = np.repeat(np.arange(1, n_users + 1, dtype=np.int32), lengths)[:n_events]
    e = user.shape[0]
    starts = np.r_[0, np.flatnonzero(user[1:] != user[:-1]) + 1]
    first_of_user = np.zeros(e, bool)
    first_of_user[starts] = True
    session = np.cumsum(first_of_user | (rng.random(e) < 0.1)).astype(np.int32)
    pos = np.arange(e) - np.repeat(starts, np.diff(np.r_[starts, e]))
    length = np.repeat(np.diff(np.r_[starts, e]), np.diff(np.r_[starts, e]))
    frac = pos / length
    split = np.where(frac < 0.8, TRAIN, np.where(frac < 0.9, VALID, TEST)).astype(np.int8)
    n_items = 100_000
    item = (rng.zipf(1.2, size=(e,)) % n_items + 1).astype(np.int32)
    return PreparedDataset.from_arrays(
        user=user,
        item=item,
        timestamp=np.arange(e, dtype=np.int64),
        reward=rng.integers(1, 4, size=(e,)).astype(np.float32),
        returns=rng.random((e,), dtype=np.float32),
        session=session,
        split=split,
        n_users=n_users,
        n_items=n_items,
    )


def event_bytes(ds: PreparedDataset) -> int:
    arrays = (ds.user, ds.item, ds.timestamp, ds.reward, ds.returns, ds.session, ds.split)
    return sum(a.nbytes for a in arrays) + ds.user_offsets.nbytes


class Clock:
    """Wall and CPU seconds of a block; CPU time reads through other processes' load."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def rates(self, n: int) -> str:
        return f"{n / self.wall / 1e6:6.2f} M/s wall, {n / self.cpu / 1e6:6.2f} M/s CPU"


def time_epoch(
    sampler: TransitionSampler, max_batches: int | None = None, anon: AnonPeak | None = None
) -> tuple[int, Clock]:
    n = 0
    with Clock() as clock:
        for i, batch in enumerate(sampler):
            n += len(batch)
            if anon is not None and i % 256 == 0:
                anon.sample()
            if max_batches is not None and i + 1 >= max_batches:
                break
    return n, clock


def as_lists(ds: PreparedDataset, k: int, share: float, history: int) -> PreparedDataset:
    """``ds`` as impressions of served lists of ``k`` slots (each user's events cut in
    runs of k, one time per list), a ``share`` of the lists with a logged context of
    ``history`` random recent items (JSON on the list's first row)."""
    rng = np.random.default_rng(7)
    e = ds.n_events
    at = np.arange(e) - ds.user_offsets[ds.user]  # position in the user's events
    position = (at % k).astype(np.int32)
    head = np.flatnonzero((position == 0) & (rng.random(e) < share))
    ids = np.asarray([str(i) for i in ds.item_ids], dtype=object)
    recent = ids[rng.integers(0, ds.n_items, (head.shape[0], history))]
    context = np.full(e, "", dtype=object)
    rewards = [1.0] * history
    context[head] = [
        orjson.dumps({"recent": list(r), "rewards": rewards, "excluded": []}).decode()
        for r in recent
    ]
    # one time per list: the user's events keep their order, a list's slots share a time
    timestamp = ds.timestamp - at % k
    return dataclasses.replace(
        ds, timestamp=timestamp, extra={"position": position, "served_context": context}
    )


def lists_variant(ds: PreparedDataset, args: argparse.Namespace) -> None:
    """Batches of ``states="lists"`` against ``"rows"`` on the same impressions, same run."""
    with Clock() as build:
        listed = as_lists(ds, args.lists, args.contexts, args.history)
    kw = {"history": args.history, "batch_size": args.batch, "splits": (TRAIN,)}
    rows = TransitionSampler(listed, **kw, seed=args.seed)  # type: ignore[arg-type]
    with Clock() as setup:
        lists = TransitionSampler(listed, **kw, seed=args.seed, states="lists")  # type: ignore[arg-type]
    packed = rows.epoch_rows(2)
    bs = args.batch
    n_b = min(len(rows), 1500)
    m = n_b * bs
    timed = {}
    for _ in range(2):  # alternated, twice: the second pass of each is kept
        for name, sampler in (("rows", rows), ("lists", lists)):
            with Clock() as clock:
                for b in range(n_b):
                    part = sampler.unpack(packed[b * bs : (b + 1) * bs])
                    sampler._batch(part.rows, part.done)
            timed[name] = clock
    print(
        f"served lists of {args.lists} slots, {args.contexts:.0%} with a logged context of "
        f"{args.history} items ({lists._lists.n_contexts if lists._lists else 0:,} contexts; "
        f"building the impressions {build.wall:.1f} s, not timed below)"
    )
    ls = lists._lists
    assert ls is not None
    held = (ls.segment, ls.first, ls.end, ls.context, ls.item, ls.reward)
    held_mb = (sum(a.nbytes for a in held) + lists._segment_next.nbytes) / 2**20
    print(
        f"  states=lists setup (list runs, contexts parsed)  {setup.wall:.2f} s wall, "
        f"{setup.cpu:.2f} s CPU; holds {held_mb:.0f} MiB "
        f"({held_mb * 2**20 / listed.n_events:.1f} bytes an event)"
    )
    print(f"  batches only, states=rows    {timed['rows'].rates(m)}")
    print(
        f"  batches only, states=lists   {timed['lists'].rates(m)} "
        f"(x{timed['lists'].cpu / timed['rows'].cpu:.2f} the CPU of rows)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, help="a prepared dataset directory (memory-mapped)")
    ap.add_argument("--mmap", action="store_true", help="save the synthetic data and map it")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/recloop-bench"))
    ap.add_argument(
        "--lists",
        type=int,
        default=0,
        help="also time states='lists': the events as served lists of this many slots",
    )
    ap.add_argument(
        "--contexts",
        type=float,
        default=0.5,
        help="with --lists: share of lists carrying a logged context of H recent items",
    )
    args = ap.parse_args()
    print("machine:", machine())

    t = time.perf_counter()
    mapped = args.data is not None or args.mmap
    if args.data is not None:
        ds = PreparedDataset.load(args.data, verify=False)
        source = f"prepared {args.data}, memory-mapped"
    else:
        ds = synthetic(args.events, args.seed)
        source = "synthetic, in memory"
        if args.mmap:
            directory = ds.save(args.workdir / f"sampler-{args.events}-seed{args.seed}")
            del ds
            gc.collect()
            ds = PreparedDataset.load(directory, verify=False)
            source = f"synthetic, saved to {directory} and memory-mapped"
            # Unlinked now, read through the mapping until the process ends: nothing is left.
            shutil.rmtree(directory)
    print(
        f"dataset ({source}): {ds.n_events:,} events, {ds.n_users:,} users, "
        f"{ds.n_items:,} items, splits {ds.split_counts()} "
        f"(ready in {time.perf_counter() - t:.1f} s)"
    )
    ev_mb = event_bytes(ds) / 2**20
    gc.collect()
    peak_ok = reset_peak_rss()
    base = rss_mb()
    base_anon, base_file = rss_mb("RssAnon"), rss_mb("RssFile")
    anon = AnonPeak()

    sampler = TransitionSampler(
        ds, history=args.history, batch_size=args.batch, splits=(TRAIN,), seed=args.seed
    )
    with Clock() as setup:
        perm = sampler.epoch_rows(0)
    perm_mb = perm.nbytes / 2**20
    del perm

    sampler.set_epoch(0)
    n, full = time_epoch(sampler, anon=anon)
    peak = rss_mb("VmHWM") if peak_ok else float("nan")
    after_file = rss_mb("RssFile")

    # Variants in the same run: batch building alone, rows in order, done gathered per batch.
    packed = sampler.epoch_rows(1)
    bs = args.batch
    n_b = min(len(sampler), 1500)
    with Clock() as only:
        for b in range(n_b):
            part = sampler.unpack(packed[b * bs : (b + 1) * bs])
            sampler._batch(part.rows, part.done)
    with Clock() as gathered:
        for b in range(n_b):
            sampler.batch(sampler.unpack(packed[b * bs : (b + 1) * bs]).rows)
    del packed
    ordered = TransitionSampler(
        ds, history=args.history, batch_size=args.batch, splits=(TRAIN,), shuffle=False
    )
    n_o, in_order = time_epoch(ordered, max_batches=n_b)
    # A yardstick: one random (B, H + 1) element gather of int32 from the item array.
    rng = np.random.default_rng(1)
    idx = rng.integers(0, ds.n_events - args.history - 1, (n_b, bs))
    win = np.arange(args.history + 1)
    with Clock() as floor:
        for b in range(n_b):
            ds.item[idx[b][:, None] + win]
    m = n_b * bs

    print(f"H={args.history}, batch {args.batch}, {sampler.n_transitions:,} train transitions")
    print(
        f"  full epoch (permutation + batches)  {full.rates(n)} "
        f"({full.wall:.2f} s wall, {full.cpu:.2f} s CPU; permutation {setup.cpu:.2f} s CPU)"
    )
    print(f"  batches only                        {only.rates(m)}")
    print(
        f"  batches, done gathered per batch    {gathered.rates(m)} "
        f"(packed done: x{gathered.cpu / only.cpu:.2f} CPU)"
    )
    print(f"  rows in order (no shuffle)          {in_order.rates(n_o)}")
    print(
        f"  floor: one item-window gather       {floor.rates(m)} "
        f"(batches cost {only.cpu / floor.cpu:.1f} such gathers)"
    )
    print(
        f"memory: event arrays {ev_mb:.0f} MiB; permutation {perm_mb:.0f} MiB; "
        f"RSS before sampler {base:.0f} MiB, peak during epoch {peak:.0f} MiB "
        f"(+{peak - base:.0f} MiB = permutation + {peak - base - perm_mb:.0f} MiB); "
        f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
        "(includes building the dataset)"
    )
    if mapped:
        print(
            f"mapped dataset: heap (RssAnon) {base_anon:.0f} MiB before the sampler, peak "
            f"{anon.peak:.0f} MiB during the epoch (+{anon.peak - base_anon:.0f} MiB: the "
            f"{perm_mb:.0f} MiB permutation and batch scratch); file-backed pages (RssFile) "
            f"{base_file:.0f} -> {after_file:.0f} MiB (+{after_file - base_file:.0f} MiB of the "
            f"{ev_mb:.0f} MiB of event columns paged in: page cache, shared with any other "
            "process mapping the dataset, dropped by the kernel under pressure)"
        )
        grow = anon.peak - base_anon
        print(
            f"target RSS growth < 1 GiB: heap {'met' if grow < 1024 else 'NOT met'} "
            f"(+{grow:.0f} MiB); total VmRSS +{peak - base:.0f} MiB including the mapped pages"
        )
    if args.lists:
        lists_variant(ds, args)
    wall_rate, cpu_rate = n / full.wall, n / full.cpu
    target = 2e6
    print(
        f"target >= {target / 1e6:.0f}M transitions/s for a full epoch: "
        f"wall {'met' if wall_rate >= target else 'NOT met'} ({wall_rate / 1e6:.2f}M/s), "
        f"CPU {'met' if cpu_rate >= target else 'NOT met'} ({cpu_rate / 1e6:.2f}M/s); "
        "wall figures are only meaningful at a load average below the core count"
    )


if __name__ == "__main__":
    main()
