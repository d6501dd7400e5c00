"""``recloop world generate | evaluate | ope``: ground-truth worlds (docs/worlds.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from recloop.cli.app import PLAIN, app, echo, echo_json
from recloop.errors import ConfigError

world_app = typer.Typer(
    help="Ground-truth worlds: generate logs with exact propensities, roll policies out, "
    "check OPE against the truth.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN,
)
app.add_typer(world_app, name="world")

_WORLD_HELP = "World: shop or ml100k."
_SET_HELP = "World config override KEY=VALUE, e.g. mechanics.horizon=10 (repeatable)."


def _selection(epsilon: float | None, temperature: float | None, top_k: int | None) -> Any:
    from recloop.evaluation.worlds.rollout import Selection

    if epsilon is not None and temperature is not None:
        raise ConfigError("--epsilon and --temperature are exclusive: pick one selection rule")
    if temperature is not None:
        if temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {temperature}")
        return Selection(kind="softmax", temperature=temperature, top_k=top_k)
    eps = 0.0 if epsilon is None else epsilon
    if not 0.0 <= eps <= 1.0:
        raise ConfigError(f"--epsilon must lie in [0, 1], got {eps}")
    return Selection(kind="epsilon", epsilon=eps)


@world_app.command("generate")
def generate_cmd(
    world_name: str = typer.Option("shop", "--world", "-w", help=_WORLD_HELP),
    policy: str = typer.Option(
        "popularity", "--policy", "-p", help="popularity, random or a run/artifact directory."
    ),
    epsilon: float = typer.Option(
        None, "--epsilon", help="ε-greedy exploration (default 0.3 unless --temperature)."
    ),
    temperature: float = typer.Option(None, "--temperature", help="Softmax temperature."),
    top_k: int = typer.Option(None, "--top-k", help="Softmax over the K best (default all)."),
    users: int = typer.Option(1000, "--users", "-n", min=1, help="Users to simulate."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulated outcomes."),
    horizon: int = typer.Option(None, "--horizon", "-T", help="Steps per session."),
    sets: list[str] = typer.Option([], "--set", "-s", help=_SET_HELP),
) -> None:
    """Simulate sessions and write DIR/events.csv (exact propensities) and DIR/world.json."""
    import numpy as np

    from recloop.evaluation.worlds import build_world
    from recloop.evaluation.worlds.base import WORLD_JSON
    from recloop.evaluation.worlds.rollout import make_policy, simulate, write_events

    overrides = list(sets) + ([f"mechanics.horizon={horizon}"] if horizon is not None else [])
    world = build_world(world_name, overrides)
    if epsilon is None and temperature is None:
        epsilon = 0.3
    selection = _selection(epsilon, temperature, top_k)
    pol = make_policy(world, policy, selection)
    start = time.perf_counter()
    roll = simulate(world, pol, np.arange(users, dtype=np.int64), seed=seed)
    sim_s = time.perf_counter() - start
    n_rows = write_events(world, roll, output / "events.csv", selection=selection)
    total_s = time.perf_counter() - start
    meta = {
        **world.describe(),
        "policy": {"name": pol.name, **pol.selection.describe()},
        "seed": seed,
        "users": users,
        "first_user": 0,
        "events": n_rows,
        "seconds": {"simulate": round(sim_s, 3), "total": round(total_s, 3)},
    }
    (output / WORLD_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    echo(
        f"{world.name} ({world.version}): {users} users, {n_rows} events "
        f"(mean reward {roll.reward.mean():.3f}) in {total_s:.1f} s -> {output / 'events.csv'}"
    )


@world_app.command("evaluate")
def evaluate_cmd(
    runs: list[Path] = typer.Argument(None, help="Run or artifact directories."),
    world_name: str = typer.Option("shop", "--world", "-w", help=_WORLD_HELP),
    data: Path = typer.Option(
        None, "--data", help="A generated log directory: use its world.json's world config."
    ),
    users: int = typer.Option(2000, "--users", "-n", min=1, help="Fresh users per policy."),
    seed: int = typer.Option(0, "--seed", help="Seed of the outcomes, shared by every run."),
    temperature: float = typer.Option(
        None, "--temperature", help="Serve the softmax over the top K (OPE's target policy)."
    ),
    top_k: int = typer.Option(None, "--top-k", help="K of the softmax (default all)."),
    sets: list[str] = typer.Option([], "--set", "-s", help=_SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """True return per session, session length, coverage and diversity of each run rolled
    out on the same fresh users, with 95 % intervals, beside popularity and random."""
    from recloop.evaluation.worlds.ope_check import load_world_for
    from recloop.evaluation.worlds.rollout import (
        REFERENCE_POLICIES,
        Selection,
        evaluation_users,
        make_policy,
        rollout_metrics,
        simulate,
    )

    world = load_world_for(world_name, data, sets)
    selection = _selection(None, temperature, top_k) if temperature is not None else Selection()
    ids = evaluation_users(users)
    rows: list[dict[str, Any]] = []
    specs = [str(r) for r in runs or []] + list(REFERENCE_POLICIES)
    for spec in specs:
        sel = Selection() if spec in REFERENCE_POLICIES else selection
        pol = make_policy(world, spec, sel)
        roll = simulate(world, pol, ids, seed=seed)
        metrics = rollout_metrics(world, roll, seed=seed)
        rows.append(
            {"policy": spec, "selection": sel.describe(),
             **{k: v.to_dict() for k, v in metrics.items()}}
        )  # fmt: skip
    out = {**world.describe(), "users": users, "seed": seed, "rows": rows}
    if as_json:
        echo_json(out)
        return
    from recloop.training.compare import format_table

    header = ["policy", "return/session", "length", "coverage", "diversity"]
    table = [
        [r["policy"]]
        + [
            f"{r[k]['value']:.3f} [{r[k]['low']:.3f}, {r[k]['high']:.3f}]"
            for k in ("return", "length", "coverage", "diversity")
        ]
        for r in rows
    ]
    echo(format_table(header, table))
    echo(f"({world.name} {world.version}, {users} fresh users, seed {seed}, 95 % intervals)")


@world_app.command("ope")
def ope_cmd(
    runs: list[Path] = typer.Argument(..., help="Run or artifact directories."),
    world_name: str = typer.Option(None, "--world", "-w", help=_WORLD_HELP),
    data: Path = typer.Option(
        None, "--data", "-d", help="Prepared dataset (default: the first run's)."
    ),
    log: Path = typer.Option(
        None, "--log", help="The generated log directory (default: the dataset's source)."
    ),
    temperature: float = typer.Option(1.0, "--temperature", help="Target softmax temperature."),
    top_k: int = typer.Option(10, "--top-k", help="Target policy's K."),
    target: str = typer.Option(
        "softmax",
        "--target",
        help="The policy each run is evaluated as: softmax (over its top K, --temperature) or "
        "served (as the service would serve it with the log's own exploration; the log must "
        "come from `recloop world generate` with --epsilon, or --temperature without --top-k).",
    ),
    clip: float = typer.Option(10.0, "--clip", help="Weight cap of the clipped DR."),
    users: int = typer.Option(1000, "--users", "-n", min=1, help="Roll-out users per run."),
    seed: int = typer.Option(0, "--seed", help="Seed of the roll-outs and the bootstrap."),
    n_boot: int = typer.Option(500, "--n-boot", help="Bootstrap replicates."),
    fresh_users: int = typer.Option(
        0,
        "--fresh-users",
        min=0,
        help="Instead of the log's test split, a fresh log of N users no run saw, from the "
        "log's own behaviour policy (many events, none selected on its outcome).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """OPE estimates (IPS, SNIPS, DR, DM, clipped DR, self-normalised DR, SLOPE-clipped DR)
    of each run beside the TRUE one-step value on the logged states and the true roll-out
    return; bias, RMSE, Spearman."""
    from recloop.artifacts import load_artifact
    from recloop.data.dataset import PreparedDataset
    from recloop.evaluation.ope import OPEConfig
    from recloop.evaluation.worlds.ope_check import load_world_for, log_dir_of, ope_against_truth
    from recloop.training.compare import check_same_ids, recorded_data_path

    first = load_artifact(runs[0])
    path = data if data is not None else recorded_data_path(runs[0], first.manifest)
    dataset = PreparedDataset.load(path)
    for run in runs:
        check_same_ids(load_artifact(run).manifest, dataset, run)
    log_dir = log if log is not None else log_dir_of(dataset)
    if log_dir is None:
        raise ConfigError(f"{path}: cannot find the generated log's world.json; pass --log")
    if target not in ("softmax", "served"):
        raise ConfigError(f"--target must be softmax or served, got {target!r}")
    world = load_world_for(world_name, log_dir)
    if fresh_users > 0:
        if target != "softmax":
            # the fresh log's estimators score the softmax target only
            raise ConfigError("--fresh-users evaluates the softmax target; drop --target served")
        _fresh_ope(runs, world, log_dir, fresh_users, temperature, top_k, clip, seed, as_json)
        return
    cfg = OPEConfig(temperature=temperature, top_k=top_k, n_boot=n_boot, seed=seed, target=target)
    report = ope_against_truth(
        runs, dataset, world, cfg=cfg, clip=clip, rollout_users=users, seed=seed
    )
    if as_json:
        echo_json(report.to_dict())
        return
    from recloop.training.compare import format_table

    names = list(report.estimates)
    header = ["run", "truth (1-step)", "rollout return", *names]
    table: list[list[str]] = []
    for i, run_name in enumerate(report.runs):
        roll = report.rollout_return[i]
        table.append(
            [run_name, f"{report.one_step_truth[i]:.4f}", f"{roll['value']:.3f} ± "
             f"{(roll['high'] - roll['low']) / 2:.3f}"]
            + [
                f"{report.estimates[n][i]['value']:.4f} [{report.estimates[n][i]['low']:.4f}, "
                f"{report.estimates[n][i]['high']:.4f}]"
                for n in names
            ]
        )  # fmt: skip
    echo(format_table(header, table))
    err_rows = [
        [n] + [
            "n/a" if report.errors[n][k] is None else f"{report.errors[n][k]:.4f}"
            for k in ("bias", "rmse", "spearman", "spearman_rollout", "covered")
        ]
        for n in names
    ]  # fmt: skip
    echo()
    echo(format_table(["estimator", "bias", "rmse", "spearman", "spearman_rollout", "covered"],
                      err_rows))  # fmt: skip
    echo(
        f"({report.n_events} logged test events; logged policy's true value "
        f"{report.logged_truth:.4f}; {world.name} {world.version})"
    )


def _fresh_ope(
    runs: list[Path],
    world: Any,
    log_dir: Path,
    users: int,
    temperature: float,
    top_k: int,
    clip: float,
    seed: int,
    as_json: bool,
) -> None:
    """``world ope --fresh-users``: every estimator on a fresh log of the log's behaviour."""
    from recloop.evaluation.worlds.base import read_world_json
    from recloop.evaluation.worlds.ope_check import ESTIMATORS, ope_fresh
    from recloop.evaluation.worlds.rollout import Selection, make_policy
    from recloop.training.compare import format_table

    pol = read_world_json(log_dir).get("policy", {})
    kind = pol.get("kind", "epsilon")
    if kind == "softmax":
        sel = Selection(kind="softmax", temperature=pol.get("temperature", 1.0),
                        top_k=pol.get("top_k"))  # fmt: skip
    else:
        sel = Selection(epsilon=pol.get("epsilon", 0.0))
    behaviour = make_policy(world, str(pol.get("name", "popularity")), sel)
    report = ope_fresh(
        runs, world, behaviour, users=users, temperature=temperature, top_k=top_k, clip=clip,
        seed=seed,
    )  # fmt: skip
    if as_json:
        echo_json(report.to_dict())
        return
    header = ["run", "truth (1-step)", *ESTIMATORS]
    table = [
        [run, f"{report.truth[i]:.4f}"]
        + [
            f"{report.estimates[n][i]['value']:.4f} ± {report.estimates[n][i]['se']:.4f}"
            for n in ESTIMATORS
        ]
        for i, run in enumerate(report.runs)
    ]
    echo(format_table(header, table))
    echo()
    keys = ("bias", "rmse", "mean_se", "spearman")
    err_rows = [
        [n] + ["n/a" if report.errors[n][k] is None else f"{report.errors[n][k]:.4f}"
               for k in keys]
        for n in ESTIMATORS
    ]  # fmt: skip
    echo(format_table(["estimator", *keys], err_rows))
    echo(
        f"({report.n_users} fresh users, {report.n_events} events of {report.behaviour}; "
        f"± = standard error by user; {world.name} {world.version})"
    )
