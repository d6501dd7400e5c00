"""``recloop simulate RUN_DIR``: simulated long-term return of a saved policy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from recloop.cli.app import app, echo, echo_json
from recloop.errors import DataError

if TYPE_CHECKING:
    from recloop.data.dataset import PreparedDataset


def _dataset_for(run: Path, data: Path | None, manifest: dict[str, object]) -> PreparedDataset:
    from recloop.data.dataset import PreparedDataset
    from recloop.training.compare import check_same_ids, recorded_data_path

    path = data if data is not None else recorded_data_path(run, manifest)
    dataset = PreparedDataset.load(path)
    check_same_ids(manifest, dataset, run)
    return dataset


@app.command("simulate")
def simulate_cmd(
    run: Path = typer.Argument(..., help="Run or artifact directory."),
    data: Path = typer.Option(None, "--data", "-d", help="Prepared dataset (default: the run's)."),
    horizon: int = typer.Option(None, "--horizon", "-T", help="Steps per session."),
    users: int = typer.Option(None, "--users", "-n", help="Users to roll out (default: all)."),
    sets: list[str] = typer.Option([], "--set", "-s", help="Simulator field KEY=VALUE."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fit a user simulator on the logged data and roll the policy out in four modes.

    Modes: repeats allowed / no repeats x fixed horizon / quit enabled (users leave after
    `patience` low-reward steps). Reports cumulative reward, session length, coverage and
    diversity, and the simulator's own accuracy on the valid split (AUC, RMSE).
    """
    from recloop.artifacts import load_artifact
    from recloop.config import load_config
    from recloop.evaluation.simulator import SimulatorConfig, fit_simulator, simulate

    cfg = load_config(
        SimulatorConfig, values={"horizon": horizon, "n_users": users}, overrides=sets
    )
    art = load_artifact(run)
    dataset = _dataset_for(run, data, art.manifest)
    if art.n_items != dataset.n_items or art.n_users != dataset.n_users:
        raise DataError(
            f"{run}: the policy has {art.n_users} users and {art.n_items} items, the dataset "
            f"{dataset.path} {dataset.n_users} and {dataset.n_items}"
        )
    sim = fit_simulator(dataset, cfg)
    result = simulate(art.policy, sim, dataset, policy_history=art.history_len)
    if as_json:
        echo_json({"run": str(run), "algo": art.algo, **result.to_dict()})
        return
    from recloop.training.compare import format_table

    acc = result.accuracy
    echo(
        f"{art.algo}: simulator accuracy on valid: AUC {acc.auc:.3f}, reward RMSE {acc.rmse:.3f} "
        f"({acc.n_events} events); quit after {cfg.patience} steps with reward < "
        f"{result.threshold:.3g}"
    )
    echo(
        f"fitted on {result.fit['train_events']} TRAIN events with {cfg.negatives} uniform "
        f"negatives each: {result.fit['scale']}"
    )
    header = ["repeats", "quit", "return [95% CI]", "length [95% CI]", "coverage", "diversity"]
    header.append("distinct")
    rows = [
        [
            "yes" if m.repeats else "no",
            "yes" if m.quit else "no",
            f"{m.cumulative_reward:.3f} [{m.cumulative_reward_interval[0]:.3f}, "
            f"{m.cumulative_reward_interval[1]:.3f}]",
            f"{m.session_length:.2f} [{m.session_length_interval[0]:.2f}, "
            f"{m.session_length_interval[1]:.2f}]",
            f"{m.coverage:.3f}",
            f"{m.diversity:.3f}",
            f"{m.distinct_ratio:.3f}",
        ]
        for m in result.modes
    ]
    echo(format_table(header, rows))
    echo(f"({result.modes[0].n_users} users, horizon {cfg.horizon}, {cfg.reward_mode} rewards)")
