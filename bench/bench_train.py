"""Training throughput of REINFORCE (and the supervised baseline) on these cores.

Measures, in one run:

1. transitions/s of REINFORCE at DBRL's defaults (concat state, H=10, D=32, hidden 64,
   batch 128, full softmax) on MovieLens-100K, data gathering included;
2. the wall time of one full fit-loop epoch of the same on MovieLens-100K (per-user 80/20
   split as DBRL, about 80k train transitions; validation excluded);
3. transitions/s of REINFORCE with a sampled softmax (1024 negatives) on a synthetic
   catalogue of 100k items;
4. the GFLOP/s of a plain ``torch.matmul`` of each run's main layer shapes, so every
   figure reads as a fraction of what the machine does on bare matrix products.

Run: ``.venv/bin/python bench/bench_train.py [--threads N] [--steps 300]``.  Uses
``$RECLOOP_ML100K`` or ``../shared/datasets/ml-100k`` for MovieLens-100K.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import recloop.algos  # noqa: F401  (fills the registry)
from recloop.algos.base import ALGOS, Algo, AlgoConfig, DatasetSpec
from recloop.algos.reinforce import ReinforceConfig
from recloop.artifacts.heads import HeadConfig
from recloop.data.dataset import PreparedDataset
from recloop.data.sampler import TransitionSampler
from recloop.encoders.base import EncoderConfig
from recloop.training.fit import FitConfig, fit

ROOT = Path(__file__).resolve().parents[1]

DBRL = ReinforceConfig(
    encoder=EncoderConfig(kind="concat", history=10, embedding_dim=32, hidden_dim=64),
    head=HeadConfig(hidden_dims=(64, 64)),
    beta_hidden_dims=(64,),
    batch_size=128,
    returns_scale="none",
)
"""DBRL's REINFORCE: state [user, 10 items] (352), policy 352→64→64→N, beta 352→64→N."""


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}"
    )


def ml100k(split_mode: str) -> PreparedDataset:
    from recloop.data.loaders import load_raw
    from recloop.data.prepare import PrepareConfig, prepare
    from recloop.data.splits import SplitConfig

    env = os.environ.get("RECLOOP_ML100K")
    path = Path(env) if env else ROOT.parent / "shared" / "datasets" / "ml-100k"
    raw = load_raw("recbole", path)
    return prepare(raw, PrepareConfig(split=SplitConfig(mode=split_mode)))  # type: ignore[arg-type]


def synthetic(n_items: int, n_users: int, events_per_user: int, seed: int = 0) -> PreparedDataset:
    """Zipf-popular items, uniform users, every event a train event with reward 1."""
    rng = np.random.default_rng(seed)
    n = n_users * events_per_user
    weights = 1.0 / np.arange(1, n_items + 1)
    item = rng.choice(n_items, size=n, p=weights / weights.sum()) + 1
    user = np.repeat(np.arange(1, n_users + 1), events_per_user)
    ts = np.tile(np.arange(events_per_user), n_users)
    return PreparedDataset.from_arrays(
        user=user, item=item, timestamp=ts, n_users=n_users, n_items=n_items
    )


def build(cfg: AlgoConfig, ds: PreparedDataset) -> Algo[AlgoConfig]:
    torch.manual_seed(0)
    return ALGOS.get(cfg.algo)(cfg, DatasetSpec.from_dataset(ds), device=torch.device("cpu"))


def best_rate(step: Callable[[], int], *, steps: int, trials: int, warmup: int) -> float:
    """Best items/s over ``trials`` timed runs of ``steps`` calls of ``step`` (which returns
    the items it processed): on a shared machine the best run is the one least disturbed."""
    for _ in range(warmup):
        step()
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        n = sum(step() for _ in range(steps))
        best = max(best, n / (time.perf_counter() - t0))
    return best


def steps_per_second(
    cfg: AlgoConfig, ds: PreparedDataset, *, steps: int, trials: int = 5, warmup: int = 20
) -> float:
    """Transitions/s of updates fed by the sampler (data gathering included), best trial."""
    algo = build(cfg, ds)
    algo.train(True)
    sampler = TransitionSampler(ds, history=cfg.encoder.history, batch_size=cfg.batch_size)
    it = iter(sampler)

    def step() -> int:
        nonlocal it
        try:
            batch = next(it)
        except StopIteration:
            it = iter(sampler)
            batch = next(it)
        algo.update(batch)
        return len(batch)

    return best_rate(step, steps=steps, trials=trials, warmup=warmup)


def bare_reinforce(
    n_users: int, n_items: int, *, steps: int, trials: int = 5, batch: int = 128
) -> float:
    """Transitions/s of a hand-written REINFORCE step of DBRL's shapes, no recloop code.

    Random pre-made batches (no data gathering), plain layers, one fused Adam: the floor
    of what the shapes cost here, to read recloop's figure against.
    """
    torch.manual_seed(0)
    d, h, hidden = 32, 10, 64
    emb_u, emb_i = nn.Embedding(n_users + 1, d), nn.Embedding(n_items + 1, d)
    s = d * (h + 1)
    pi = nn.Sequential(nn.Linear(s, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    pi_out = nn.Linear(hidden, n_items + 1)
    beta = nn.Sequential(nn.Linear(s, hidden), nn.ReLU(), nn.Linear(hidden, n_items + 1))
    params = [p for m in (emb_u, emb_i, pi, pi_out, beta) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    batches = [
        (
            torch.randint(1, n_users + 1, (batch,)),
            torch.randint(0, n_items + 1, (batch, h)),
            torch.randint(1, n_items + 1, (batch,)),
            torch.rand(batch),
        )
        for _ in range(16)
    ]

    i = 0

    def step() -> int:
        nonlocal i
        i += 1
        user, hist, action, ret = batches[i % len(batches)]
        state = torch.cat([emb_u(user), emb_i(hist).flatten(1)], dim=1)
        logp = -F.cross_entropy(pi_out(pi(state)), action, reduction="none")
        beta_logp = -F.cross_entropy(beta(state.detach()), action, reduction="none")
        w = torch.exp(logp.detach() - beta_logp.detach()).clamp(max=2.0)
        lam = 10 * (1 - logp.detach().exp()).pow(9)
        loss = -(w * lam * ret * logp).mean() - beta_logp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return batch

    return best_rate(step, steps=steps, trials=trials, warmup=20)


def matmul_gflops(shapes: list[tuple[int, int, int]], *, trials: int = 5) -> float:
    """GFLOP/s of forward matmuls (m×k)@(k×n) over ``shapes`` in rotation, best trial."""
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def step() -> int:
        for a, b in mats:
            torch.matmul(a, b)
        return flops

    return best_rate(step, steps=20, trials=trials, warmup=3) / 1e9


def step_gflop(batch: int, layers: list[tuple[int, int]]) -> float:
    """Approximate GFLOP of one update: forward + backward (≈ 3× forward) of the layers."""
    return 3 * sum(2 * batch * k * n for k, n in layers) / 1e9


def report(name: str, tps: float, gflop_per_step: float, batch: int, mm: float) -> None:
    achieved = tps / batch * gflop_per_step
    print(
        f"  {name:<44} {tps:>10,.0f} transitions/s   "
        f"~{achieved:5.1f} GFLOP/s = {100 * achieved / mm:4.0f}% of plain matmul ({mm:.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=100, help="timed updates per trial")
    parser.add_argument("--trials", type=int, default=5, help="trials; the best is reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", machine())

    loo = ml100k("ratio")
    n = loo.n_items + 1
    s = 32 + 10 * 32
    dbrl_layers = [(s, 64), (64, 64), (64, n), (s, 64), (64, n)]
    mm = matmul_gflops([(128, k, m) for k, m in dbrl_layers])
    print(f"\nMovieLens-100K: {loo.n_users} users, {loo.n_items} items, {loo.split_counts()}")
    tps = steps_per_second(DBRL, loo, steps=args.steps, trials=args.trials)
    report("reinforce, DBRL defaults (batch 128)", tps, step_gflop(128, dbrl_layers), 128, mm)
    bare = bare_reinforce(loo.n_users, loo.n_items, steps=args.steps, trials=args.trials)
    report("bare hand-written step, same shapes", bare, step_gflop(128, dbrl_layers), 128, mm)
    print(f"  {'recloop update / bare step':<44} {tps / bare:>10.0%}")

    sup = ALGOS.get("supervised").config_class(encoder=DBRL.encoder, head=DBRL.head, batch_size=128)
    tps = steps_per_second(sup, loo, steps=args.steps, trials=args.trials)
    report("supervised, same shapes (batch 128)", tps, step_gflop(128, dbrl_layers[:3]), 128, mm)

    rec = DBRL.create()
    rec.build(loo, device="cpu")
    assert rec.algo is not None
    result = fit(
        rec.algo,
        loo,
        cfg=FitConfig(epochs=3, eval_every=0, final_eval=False, progress=False, tensorboard=False),
    )
    epoch = min(result.history, key=lambda r: r["seconds"])
    print(
        f"  {'reinforce, one full epoch (fit loop, best of 3)':<44} {epoch['seconds']:>10.2f} s "
        f"for {epoch['transitions']:,} transitions ({epoch['transitions_per_s']:,.0f}/s)"
    )

    big = synthetic(n_items=100_000, n_users=10_000, events_per_user=20)
    m = 1024
    sampled = ReinforceConfig(
        encoder=DBRL.encoder,
        head=DBRL.head,
        beta_hidden_dims=DBRL.beta_hidden_dims,
        batch_size=128,
        sampled_softmax=m,
        returns_scale="none",
    )
    big_layers = [(s, 64), (64, 64), (64, m), (s, 64), (64, m)]
    mm_big = matmul_gflops([(128, k, c) for k, c in big_layers])
    print(f"\nsynthetic: {big.n_users:,} users, {big.n_items:,} items, {big.n_events:,} events")
    tps = steps_per_second(sampled, big, steps=args.steps, trials=args.trials)
    report(
        f"reinforce, sampled softmax M={m} (batch 128)",
        tps,
        step_gflop(128, big_layers),
        128,
        mm_big,
    )
    full_layers = [(s, 64), (64, 64), (64, big.n_items + 1), (s, 64), (64, big.n_items + 1)]
    full = steps_per_second(
        dataclasses.replace(sampled, sampled_softmax=None),
        big,
        steps=max(3, args.steps // 30),
        trials=2,
        warmup=2,
    )
    report(
        "reinforce, full softmax 100k (reference)", full, step_gflop(128, full_layers), 128, mm_big
    )


if __name__ == "__main__":
    main()
