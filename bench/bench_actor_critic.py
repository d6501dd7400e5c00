"""Update speed of the actor-critic algorithms at DBRL's defaults on ml-100k-sized data.

Transitions per second of ``update`` for DDPG and BCQ (H=10, D=32, hidden 64, batch 2048,
concat encoder; 943 users, 1682 items, random batches), next to the GFLOP/s a plain
``torch.matmul`` of the main layer shapes reaches in the same run, and the matrix-product
GFLOP of one update (FlopCounterMode), so each rate reads as a fraction of the machine.
Targets (issue 4): DDPG >= 100k/s, BCQ >= 30k/s; DBRL's own code: DDPG ~57k/s, BCQ
~14.5k/s.  ``ddpg``/``bcq`` are the papers' algorithms (as DBRL runs them, ``bc=null``);
``+bc`` adds recloop's default behaviour-cloning term (TD3+BC's form).

    .venv/bin/python bench/bench_actor_critic.py [--algos ddpg bcq td3 sac dqn] [--seconds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from recloop.algos.base import ALGOS, DatasetSpec
from recloop.algos.bcq import BCQ  # noqa: F401  (registers)
from recloop.algos.bcq_discrete import BCQDiscrete  # noqa: F401
from recloop.algos.cql import CQL  # noqa: F401
from recloop.algos.ddpg import DDPG  # noqa: F401
from recloop.algos.dqn import DQN  # noqa: F401
from recloop.algos.sac import SACContinuous, SACDiscrete  # noqa: F401
from recloop.algos.td3 import TD3  # noqa: F401
from recloop.data.batch import TransitionBatch
from recloop.encoders.base import EncoderConfig

N_USERS, N_ITEMS, H, D, HIDDEN, BATCH = 943, 1682, 10, 32, 64, 2048


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def random_batches(n: int, *, seed: int = 0) -> list[TransitionBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        hist = torch.randint(1, N_ITEMS + 1, (BATCH, H), generator=g)
        hist[:, :2] *= torch.rand(BATCH, 1, generator=g) > 0.1  # some left padding
        action = torch.randint(1, N_ITEMS + 1, (BATCH,), generator=g)
        hr = torch.rand(BATCH, H, generator=g)
        out.append(
            TransitionBatch(
                user=torch.randint(1, N_USERS + 1, (BATCH,), generator=g),
                history=hist,
                history_reward=hr,
                action=action,
                reward=torch.rand(BATCH, generator=g),
                returns=torch.rand(BATCH, generator=g),
                next_history=torch.cat([hist[:, 1:], action[:, None]], dim=1),
                next_history_reward=torch.cat([hr[:, 1:], torch.rand(BATCH, 1, generator=g)], 1),
                done=torch.rand(BATCH, generator=g) < 0.05,
            )
        )
    return out


def matmul_gflops(m: int, k: int, n: int, *, seconds: float = 0.5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.matmul(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, b)
        reps += 1
    return 2.0 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


@dataclass(frozen=True)
class Result:
    rate: float
    """Transitions per second of ``update``."""
    gflop_per_update: float
    """Matrix-product GFLOP of one update (forward and backward), by FlopCounterMode."""


def bench_algo(name: str, batches: list[TransitionBatch], *, seconds: float, **over: Any) -> Result:
    cfg_cls = ALGOS.get(name).config_class
    enc = EncoderConfig(kind="concat", history=H, embedding_dim=D, hidden_dim=HIDDEN)
    cfg = cfg_cls(encoder=enc, batch_size=BATCH, **over)
    spec = DatasetSpec(
        n_users=N_USERS, n_items=N_ITEMS, popularity=np.ones(N_ITEMS + 1, np.float32)
    )
    torch.manual_seed(0)
    algo = ALGOS.get(name)(cfg, spec, device=torch.device("cpu"))
    for b in batches[:3]:
        algo.update(b)
    with FlopCounterMode(display=False) as counter:
        algo.update(batches[3])
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        algo.update(batches[steps % len(batches)])
        steps += 1
    rate = steps * BATCH / (time.perf_counter() - t0)
    return Result(rate=rate, gflop_per_update=counter.get_total_flops() / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--algos",
        nargs="+",
        default=["ddpg", "bcq", "ddpg+bc", "bcq+bc"],
        help="registered names; NAME runs the paper's algorithm (bc=null where the config "
        "has a bc field, as DBRL), NAME+bc the recloop default with its behaviour-cloning term",
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"cpu: {cpu_model()}, {torch.get_num_threads()} torch threads")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"shapes: users {N_USERS}, items {N_ITEMS}, H={H}, D={D}, hidden {HIDDEN}, batch {BATCH}")
    s = D * (H + 1)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    peak = 0.0
    for m, k, n in [(BATCH, s, HIDDEN), (BATCH * 10, HIDDEN, HIDDEN), (BATCH, HIDDEN, D)]:
        g = matmul_gflops(m, k, n)
        peak = max(peak, g)
        print(f"matmul ({m}x{k}) @ ({k}x{n}): {g:.1f} GFLOP/s")
    batches = random_batches(8)
    targets = {"ddpg": 100_000, "bcq": 30_000}
    for label in args.algos:
        name, _, variant = label.partition("+")
        fields = {f.name for f in dataclasses.fields(ALGOS.get(name).config_class)}
        over = {"bc": None} if "bc" in fields and variant != "bc" else {}
        r = bench_algo(name, batches, seconds=args.seconds, **over)
        achieved = r.gflop_per_update * r.rate / BATCH
        goal = f", target >= {targets[label] / 1000:.0f}k/s" if label in targets else ""
        print(
            f"{label}: {r.rate / 1000:.1f}k transitions/s ({r.gflop_per_update:.2f} GFLOP per "
            f"update, {achieved:.1f} GFLOP/s = {achieved / peak:.0%} of the best matmul{goal})"
        )


if __name__ == "__main__":
    main()
