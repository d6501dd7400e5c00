"""recloop CLI: ``recloop pretrain``, DSSM user and item embeddings from a prepared dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from recloop.cli.app import app, echo, echo_json, output_dir

if TYPE_CHECKING:
    from recloop.embeddings import EpochStats


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@app.command("pretrain")
def pretrain(
    data: Path = typer.Option(..., "--data", help="Prepared dataset directory (recloop prepare)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the embeddings to."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with DSSM config fields."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a config field, KEY=VALUE (repeatable)."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Pretrain DSSM two-tower user and item embeddings; print valid loss and AUC per epoch."""
    from recloop.config import config_to_dict, load_config
    from recloop.data.dataset import PreparedDataset
    from recloop.embeddings import DSSMConfig, pretrain_dssm, save_embeddings

    output_dir(out, "--out")
    cfg = load_config(
        DSSMConfig,
        path=config,
        values={"epochs": epochs, "device": device},
        overrides=overrides,
    )
    dataset = PreparedDataset.load(data)

    def report(stats: EpochStats) -> None:
        if not as_json:
            echo(
                f"epoch {stats.epoch}/{cfg.epochs}: train loss {stats.train_loss:.4f}  "
                f"valid loss {_fmt(stats.valid_loss)}  valid AUC {_fmt(stats.valid_auc)}"
            )

    result = pretrain_dssm(dataset, cfg, on_epoch=report)
    save_embeddings(result, out)
    if as_json:
        doc: dict[str, Any] = {
            "out": str(out),
            "config": config_to_dict(cfg),
            "shapes": {
                "user_embeddings": list(result.user_embeddings.shape),
                "item_embeddings": list(result.item_embeddings.shape),
            },
            "history": [dataclasses.asdict(s) for s in result.history],
        }
        echo_json(doc)
        return
    echo(
        f"embeddings saved to {out}  (users {tuple(result.user_embeddings.shape)}, "
        f"items {tuple(result.item_embeddings.shape)})"
    )
