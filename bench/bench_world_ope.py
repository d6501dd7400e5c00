"""OPE against the truth in the ground-truth worlds, with the power to rank the policies.

bench_world.py scores each run on its training log's leave-one-out test split: 1,500 events
(one per user).  This script asks whether the estimators rank the policies once they have
the events they need: every run is evaluated on *fresh* logs — users no run was trained on
(index 0, unknown, as in the roll-outs) — of three behaviour policies:

- popularity ε = 0.3 (the training logs' behaviour; a non-top item has propensity ε / N),
- uniform random,
- popularity softmax T = 1 (an item drawn with probability proportional to its popularity
  among the unshown ones: every item has support, popular ones the most).

For each log and estimator: bias and RMSE against the exact one-step truth (the same
target policy on the same states), the mean standard error (user-clustered), Spearman ρ
over the runs and over the algorithms (seed means), beside the spread of the truths.
The reward model of DM / DR is the item baseline, cross-fitted over two halves of the users.
SLOPE picks the clipped DR's cap from the log alone; nothing here looks at the truth to
choose anything.

Runs live in ``WORKDIR/<world>-popularity/<algo>-<seed>`` (bench_world.py's layout);
missing ones are trained first on a ``--users``-user popularity ε = 0.3 log.

    PYTHONPATH=src python bench/bench_world_ope.py --workdir /tmp/bw --fresh-users 5000
    PYTHONPATH=src python bench/bench_world_ope.py --workdir /tmp/bw --worlds ml100k \
        --logs epsilon --fresh-users 2000,8000,32000 --no-train   # ρ and SE vs log size
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import numpy as np

from bench_world import _machine, _main  # same machine line and CLI runner


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _p(p: float) -> str:
    return "< 1e-5" if p == 0 else f"{p:.2g}"  # 0 of the 10⁵ Monte Carlo orders


def chance_rho(n: int, threshold: float = 0.8) -> float:
    """P(Spearman ρ ≥ threshold) between a random ranking of n policies and the truth (no
    ties): exact over all n! orders for n ≤ 8, else Monte Carlo (10⁵ orders, fixed seed)."""
    if n < 2:
        return float("nan")
    denom = n * (n * n - 1)
    if n <= 8:
        ranks = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(0)
        ranks = np.argsort(rng.random((100_000, n)), axis=1)
    rho = 1 - 6 * ((ranks - np.arange(n)) ** 2).sum(1) / denom
    return float(np.mean(rho >= threshold - 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--worlds", default="shop,ml100k")
    ap.add_argument(
        "--algos",
        default="popularity,supervised,gru4rec,sasrec,reinforce,reinforce:behaviour=logged,"
        "sqn,cql,td3,bcq,sac",
    )
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--users", type=int, default=1500, help="Users of the training log.")
    ap.add_argument("--epochs", type=int, default=1, help="Epochs of runs trained here.")
    ap.add_argument(
        "--fresh-users",
        default="5000",
        help="Users per fresh OPE log; a comma list (2000,8000,32000) scores each size in turn "
        "(a curve of ρ and SE against the log's size).",
    )
    ap.add_argument(
        "--logs",
        default="epsilon,random,softmax",
        help="Behaviour logs: epsilon (popularity ε=0.3), random, softmax (popularity T=1).",
    )
    ap.add_argument("--in-log", action="store_true", help="Also the LOO test split (old way).")
    ap.add_argument(
        "--references",
        action="store_true",
        help="Also rank the world's popularity, random and oracle policies (labelled apart).",
    )
    ap.add_argument("--no-train", action="store_true", help="Use only the runs already there.")
    ap.add_argument("--workdir", type=Path, required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from recloop.data.dataset import PreparedDataset
    from recloop.evaluation.ope import OPEConfig
    from recloop.evaluation.worlds import build_world
    from recloop.evaluation.worlds.ope_check import (
        ESTIMATORS,
        REFERENCE_TARGETS,
        group_means,
        ope_against_truth,
        ope_fresh,
        spearman,
    )
    from recloop.evaluation.worlds.rollout import Selection, make_policy

    start = time.perf_counter()
    algos = [a for a in args.algos.split(",") if a]
    known = {
        "epsilon": ("popularity ε=0.3", "popularity", Selection(epsilon=0.3)),
        "random": ("random", "random", Selection(epsilon=1.0)),
        "softmax": (
            "popularity softmax T=1", "popularity", Selection(kind="softmax", temperature=1.0)
        ),
    }  # fmt: skip
    behaviours = [known[k] for k in args.logs.split(",") if k]
    sizes = [int(n) for n in args.fresh_users.split(",") if n]
    head = (
        "| world | log | users / events | estimator | bias | RMSE | mean SE | ρ runs "
        "| ρ algos | ρ with references |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for wname in args.worlds.split(","):
        world = build_world(wname)
        tag = args.workdir / f"{wname}-popularity"
        log, data = tag / "log", tag / "data"
        if not (data / "manifest.json").is_file():
            gen = ["--policy", "popularity", "--epsilon", "0.3", "--users", str(args.users)]
            _main(["-q", "world", "generate", "--world", wname, *gen, "--output", str(log)])
            _main(["-q", "prepare", "--format", "csv", "--input", str(log / "events.csv"),
                   "--split", "loo", "--output", str(data)])  # fmt: skip
        runs: list[Path] = []
        groups: list[str] = []
        for algo in algos:
            name, _, sets = algo.partition(":")
            extra = [x for kv in sets.split(";") if kv for x in ("--set", kv)]
            for seed in range(args.seeds if name != "popularity" else 1):
                run = tag / f"{algo.replace(':', '_').replace(';', '_')}-{seed}"
                if not (run / "artifact" / "manifest.json").is_file():
                    if run.exists() or args.no_train:
                        notes.append(f"{run}: missing or incomplete, skipped")
                        continue
                    _main(["-q", "train", "--algo", name, "--data", str(data), "--out",
                           str(run), "--epochs", str(args.epochs), "--set", f"seed={seed}",
                           *extra])  # fmt: skip
                runs.append(run)
                groups.append(algo)
        n_algos = len(set(groups))
        notes.append(
            f"{wname}: {len(runs)} runs of {n_algos} algorithms; P(ρ ≥ 0.8 by chance) "
            f"{_p(chance_rho(len(runs)))} over the runs, {_p(chance_rho(n_algos))} over the "
            "algorithms"
        )
        n_trained = len(runs)
        targets: list[Path | str] = list(runs)
        if args.references:
            targets += list(REFERENCE_TARGETS)
            groups += [f"world {t}" for t in REFERENCE_TARGETS]
        if args.in_log:
            dataset = PreparedDataset.load(data)
            rep = ope_against_truth(runs, dataset, world, cfg=OPEConfig(n_boot=0), rollout_users=0)
            _, t_g = group_means(rep.one_step_truth, groups[:n_trained])
            for est_name, err in rep.errors.items():
                vals = [r["value"] for r in rep.estimates[est_name]]
                _, e_g = group_means(vals, groups[:n_trained])
                lines.append(
                    f"| {wname} | training log's LOO test (popularity ε=0.3) "
                    f"| {args.users} / {rep.n_events} | {est_name} | {_num(err['bias'])} "
                    f"| {_num(err['rmse'])} | - | {_num(err['spearman'])} "
                    f"| {_num(spearman(e_g, t_g))} | - |"
                )
        for (label, spec, sel), n_fresh in ((b, n) for b in behaviours for n in sizes):
            t0 = time.perf_counter()
            fr = ope_fresh(
                targets, world, make_policy(world, spec, sel), users=n_fresh, groups=groups,
            )  # fmt: skip
            truth = np.asarray(fr.truth)
            _, t_g = group_means(fr.truth[:n_trained], groups[:n_trained])
            for est_name in ESTIMATORS:
                est = np.array([r["value"] for r in fr.estimates[est_name]])
                _, e_g = group_means(list(est[:n_trained]), groups[:n_trained])
                err = {
                    "bias": float(np.mean(est[:n_trained] - truth[:n_trained])),
                    "rmse": float(np.sqrt(np.mean((est[:n_trained] - truth[:n_trained]) ** 2))),
                    "mean_se": float(
                        np.mean([r["se"] for r in fr.estimates[est_name][:n_trained]])
                    ),
                    "spearman": spearman(est[:n_trained], truth[:n_trained]),
                    "spearman_groups": spearman(e_g, t_g),
                    "with_refs": spearman(est, truth) if args.references else None,
                }
                name = "dr_clip10" if est_name == "dr_clip" else est_name
                if est_name == "dr_slope":
                    caps = sorted({r["cap"] for r in fr.estimates[est_name]})
                    name += f" (caps {', '.join(f'{c:g}' for c in caps)})"
                lines.append(
                    f"| {wname} | fresh {label} | {fr.n_users} / {fr.n_events} | {name} "
                    f"| {_num(err['bias'])} | {_num(err['rmse'])} | {_num(err['mean_se'])} "
                    f"| {_num(err['spearman'])} | {_num(err['spearman_groups'])} "
                    f"| {_num(err['with_refs'])} |"
                )
            sd_runs = float(truth[:n_trained].std(ddof=1)) if n_trained > 1 else 0.0
            notes.append(
                f"{wname} / {label}: trained runs' truths {truth[:n_trained].min():.3f}.."
                f"{truth[:n_trained].max():.3f} (sd {sd_runs:.4f}); logged reward "
                f"{fr.logged_value['reward']:.4f} vs exact {fr.logged_value['expected']:.4f}; "
                f"{time.perf_counter() - t0:.0f} s"
            )
            per_run = ", ".join(f"{g}={t:.3f}" for g, t in zip(groups, fr.truth, strict=True))
            notes.append(f"  truths: {per_run}")
    print("\n".join(lines))
    print()
    print("\n".join(notes))
    print(f"{time.perf_counter() - start:.0f} s; machine: {_machine()}")


if __name__ == "__main__":
    main()
