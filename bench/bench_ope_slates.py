"""OPE of softmax lists at every slot: the served target's cascade weights against the truth.

A service that serves softmax (Plackett-Luce) lists logs each slot's choice probability
given the slots above it.  The ``served`` OPE target scores a slot j > 0 given the items
logged above it, weighted by their probability under the target over the logged one
(Cascade-DR, Kiyohara et al., WSDM 2022; src/recloop/evaluation/ope.py).  This script checks
that on lists of realistic size, slot by slot: the estimate against the exact truth, and what
the weights cost (the effective sample size falls with the depth of the slot).

The world: U users and N items with latent vectors x_u, y_a (dimension 16, entries
N(0, 0.7^2): scores spread by about 2); a shown item is clicked with probability
sigmoid(x_u . y_a - 2) / log2(j + 2) at slot j (an item-position model, so every slot's value
is well defined and the cascade assumption holds).  Each log gives every user one list of K
items from the logging model, drawn by the service's own sampler with its propensities; the
first half of the users are TRAIN (the reward model q = mu + b_user + b_item is fitted on
them), the second half TEST.  The logging model scores x_u . y_a + noise 0.5; the targets
are the logging model itself (every weight 1), the true scores x_u . y_a, the logging scores
with 0.5 more noise, and random scores of the same spread, all served with the log's
softmax temperature.

The truth of a slot is the mean over the test users of the expected click at that slot of
the target's own lists, from ``--truth-draws`` lists per user drawn by Gumbel-top-k (exact
Plackett-Luce samples) with expected clicks.  Over ``--logs`` logs (fresh lists and clicks,
the same world and targets): per slot, the mean of IPS and DR, how many of their 95 % normal
intervals (one event per user and slot: independent) hold the truth, and the effective
sample size; over all slots, the served target's report (user-bootstrap intervals, flags).

    PYTHONPATH=src python bench/bench_ope_slates.py                    # U=3000, N=1000, K=10
    PYTHONPATH=src python bench/bench_ope_slates.py --users 20000 --temperature 0.5
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench_eval import machine  # the same machine line
from recloop.data.dataset import TEST, TRAIN, PreparedDataset
from recloop.evaluation.ope import (
    OPEConfig,
    importance_weights,
    logged_events,
    ope_report,
    policy_terms,
)
from recloop.serving.exploration import sample_plackett_luce_many


def click_prob(x: np.ndarray, y: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """P(click) of item rows ``y`` shown to user rows ``x`` at ``slot`` (broadcasting)."""
    return 1.0 / (1.0 + np.exp(-((x * y).sum(-1) - 2.0))) / np.log2(slot + 2.0)


def _scorer(table: np.ndarray) -> Any:
    t = torch.from_numpy(table).float()

    def score(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return t[user]

    return score


def _z(values: np.ndarray, truth: float, truth_se: float) -> float:
    """(mean of the logs' estimates - truth) over its standard error: the logs' spread and
    the truth's own Monte Carlo error."""
    se = float(np.hypot(values.std(ddof=1) / np.sqrt(values.shape[0]), truth_se))
    return float((values.mean() - truth) / se) if se > 0 else 0.0


def _mean_ci(v: np.ndarray) -> tuple[float, float, float]:
    h = 1.96 * float(v.std(ddof=1)) / np.sqrt(v.shape[0])
    return float(v.mean()), float(v.mean()) - h, float(v.mean()) + h


def softmax_log(
    log: np.ndarray, x: np.ndarray, y: np.ndarray, *, k: int, temperature: float, seed: int
) -> PreparedDataset:
    """One softmax list of ``k`` per user, drawn by the service's sampler from ``log``
    (U + 1, N + 1), clicks from :func:`click_prob`; the first half of the users TRAIN."""
    u, n = log.shape[0] - 1, log.shape[1] - 1
    slates = sample_plackett_luce_many(
        log[1:], np.full(u, k), temperature=np.full(u, temperature),
        seeds=range(seed * u, (seed + 1) * u),
    )  # fmt: skip
    items = np.stack([s.items for s in slates]).reshape(-1)
    prop = np.stack([s.propensity for s in slates]).reshape(-1)
    slot = np.tile(np.arange(k), u)
    user = np.repeat(np.arange(1, u + 1), k)
    rng = np.random.default_rng(seed)
    clicked = rng.random(user.shape[0]) < click_prob(x[user], y[items], slot)
    e = user.shape[0]
    ds = PreparedDataset.from_arrays(
        user=user, item=items, timestamp=np.repeat(np.arange(u), k) + 1_000,
        reward=clicked.astype(np.float32), split=np.where(user <= u // 2, TRAIN, TEST),
        n_users=u, n_items=n,
    )  # fmt: skip
    return replace(
        ds,
        extra={
            "propensity": prop,
            "policy": np.full(e, "softmax"),
            "position": slot.astype(np.int32),
            "list_length": np.full(e, k, np.int32),
            "epsilon": np.full(e, np.nan),
            "temperature": np.full(e, temperature),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10, help="List length.")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--truth-draws", type=int, default=200, help="Target lists per user.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the world and targets.")
    ap.add_argument("--logs", type=int, default=10, help="Logs drawn (each its own seed).")
    ap.add_argument(
        "--targets",
        default="logging,true scores,logging + noise 0.5,random",
        help="Comma-separated targets to score (the world and log are the same whatever).",
    )
    args = ap.parse_args()
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    u, n, k, temp = args.users, args.items, args.k, args.temperature
    rng = np.random.default_rng(args.seed)
    x = rng.normal(0, 0.7, (u + 1, 16))
    y = rng.normal(0, 0.7, (n + 1, 16))
    true_scores = x @ y.T  # (U + 1, N + 1)
    tables = {
        "logging": true_scores + rng.normal(0, 0.5, true_scores.shape),
    }
    tables["true scores"] = true_scores
    tables["logging + noise 0.5"] = tables["logging"] + rng.normal(0, 0.5, true_scores.shape)
    tables["random"] = rng.normal(0, true_scores.std(), true_scores.shape)
    for name in tables:  # float32, as a model's scores; column 0 is padding
        t = tables[name].astype(np.float32).astype(np.float64)
        t[:, 0] = -np.inf
        tables[name] = t
    log_table = tables["logging"]
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(tables))
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join(tables)}")
    tables = {name: tables[name] for name in wanted}

    # the truth: each target's own lists for the test users, expected clicks per slot
    test_users = np.arange(u // 2 + 1, u + 1)  # the second half: the first is TRAIN
    truth: dict[str, np.ndarray] = {}
    truth_se: dict[str, np.ndarray] = {}
    gen = torch.Generator().manual_seed(args.seed + 1)
    for name, table in tables.items():
        t = np.zeros((test_users.shape[0], k))
        var = np.zeros((test_users.shape[0], k))
        for lo in range(0, test_users.shape[0], 100):
            rows = test_users[lo : lo + 100]
            sc = torch.from_numpy(table[rows]) / temp  # (b, N + 1)
            g = -torch.log(
                torch.empty((args.truth_draws, *sc.shape), dtype=torch.float64).exponential_(
                    generator=gen
                )
            )
            lists = torch.topk(sc[None] + g, k, dim=2).indices.numpy()  # (D, b, K) exact PL
            clicks = click_prob(x[rows][None, :, None], y[lists], np.arange(k))  # (D, b, K)
            t[lo : lo + 100] = clicks.mean(0)
            var[lo : lo + 100] = clicks.var(0) / args.truth_draws
        truth[name] = t.mean(0)  # (K,)
        truth_se[name] = np.sqrt(var.sum(0)) / test_users.shape[0]  # (K,) Monte Carlo error
    stats = {name: {"ips": [], "dr": [], "ess": [], "all": []} for name in tables}
    for rep_seed in range(args.logs):
        ds = softmax_log(log_table, x, y, k=k, temperature=temp, seed=1000 + rep_seed)
        cfg = OPEConfig(target="served", weight_cap=None, n_boot=200, seed=rep_seed)
        events = logged_events(ds, cfg=cfg)
        ev_slot = ds.extra["position"][events.rows]
        for name, table in tables.items():
            terms = policy_terms(_scorer(table), ds, events, history=1, cfg=cfg)
            w, _, _ = importance_weights(events, terms, None)
            rep = ope_report(events, terms, cfg)
            st = stats[name]
            per = {"ips": [], "dr": [], "ess": []}
            for j in range(k):
                at = ev_slot == j
                wj, rj = w[at], events.reward[at]
                per["ips"].append(_mean_ci(wj * rj))
                per["dr"].append(_mean_ci(terms.v_target[at] + wj * (rj - events.q_logged[at])))
                per["ess"].append(wj.sum() ** 2 / max((wj**2).sum(), 1e-300) / at.sum())
            for key, v in per.items():
                st[key].append(v)
            st["all"].append(rep)
        print(f"log {rep_seed + 1}/{args.logs} done ({time.perf_counter() - t0:.0f} s)")
    print(
        f"\n{args.logs} logs of {u // 2} test users x 1 list of {k} from {n} items (and "
        f"{u // 2} TRAIN users for q), softmax T = {temp}; truth from {args.truth_draws} "
        "target lists per user; 95 % normal intervals per slot (one event per user and slot)"
    )
    for name in tables:
        st = stats[name]
        ips, dr = np.array(st["ips"]), np.array(st["dr"])  # (L, K, 3) value, low, high
        ess = np.array(st["ess"])  # (L, K)
        tr = truth[name]
        print(f"\ntarget: {name}")
        print(
            "  slot   truth    IPS mean   (z)  covered   DR mean   (z)  covered   ESS/n"
            "   (z: mean minus truth over its standard error, the logs' spread and the "
            "truth's Monte Carlo error)"
        )
        for j in range(k):
            cov_i = int(((ips[:, j, 1] <= tr[j]) & (tr[j] <= ips[:, j, 2])).sum())
            cov_d = int(((dr[:, j, 1] <= tr[j]) & (tr[j] <= dr[:, j, 2])).sum())
            zi = _z(ips[:, j, 0], tr[j], truth_se[name][j])
            zd = _z(dr[:, j, 0], tr[j], truth_se[name][j])
            print(
                f"  {j:4d}  {tr[j]:.4f}   {ips[:, j, 0].mean():.4f} {zi:+5.1f}"
                f"  {cov_i:3d}/{args.logs}    {dr[:, j, 0].mean():.4f} {zd:+5.1f}"
                f"  {cov_d:3d}/{args.logs}    {ess[:, j].mean():.3f}"
            )
        reps = st["all"]
        t_all = tr.mean()
        for est in ("ips", "dr"):
            iv = [r.estimates[est] for r in reps]
            cov = sum(1 for v in iv if v.low <= t_all <= v.high)
            print(
                f"  all slots, {est.upper()}: truth {t_all:.4f}, "
                f"mean {np.mean([v.value for v in iv]):.4f}, "
                f"bootstrap interval covers the truth in {cov}/{len(iv)} logs"
            )
        flags = sorted({f for r in reps for f in r.flags})
        counts = ", ".join(f"{f} {sum(f in r.flags for r in reps)}/{len(reps)}" for f in flags)
        print(
            f"  mean weight {np.mean([r.mean_weight for r in reps]):.3f}, ESS/n "
            f"{np.mean([r.ess / r.n_events for r in reps]):.3f}; flagged logs: "
            f"{sum(bool(r.flags) for r in reps)}/{len(reps)} ({counts or '-'})"
        )
    print(f"\nseconds: {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
