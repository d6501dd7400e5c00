"""Synthetic Tianchi logs: format, determinism, funnel, popularity, sessions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recloop.data.synth import SynthConfig, generate
from recloop.errors import ConfigError


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.csv"))
    }


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(events=60_000, seed=3, chunk_events=20_000), out)
    return out


def _events(directory: Path) -> pl.DataFrame:
    return pl.read_csv(
        directory / "user_behavior.csv",
        has_header=False,
        new_columns=["user", "item", "behavior", "time"],
    )


def test_files_are_headerless_tianchi_csv(synth_dir: Path) -> None:
    assert sorted(p.name for p in synth_dir.iterdir()) == [
        "item.csv",
        "user.csv",
        "user_behavior.csv",
    ]
    first = (synth_dir / "user_behavior.csv").read_text().splitlines()[0].split(",")
    assert len(first) == 4 and first[0].isdigit() and first[1].isdigit() and first[3].isdigit()
    assert first[2] in {"pv", "cart", "fav", "buy"}
    for name, width in (("user.csv", 4), ("item.csv", 4)):
        line = (synth_dir / name).read_text().splitlines()[0].split(",")
        assert len(line) == width and all(x.lstrip("-").isdigit() for x in line)
    ev = _events(synth_dir)
    assert ev.height == 60_000
    assert set(ev["behavior"].unique()) == {"pv", "cart", "fav", "buy"}
    users = pl.read_csv(synth_dir / "user.csv", has_header=False, new_columns=["id", "a", "b", "c"])
    items = pl.read_csv(synth_dir / "item.csv", has_header=False, new_columns=["id", "a", "b", "c"])
    assert users.height == 600 and items.height == 3000
    assert users["id"].n_unique() == 600 and items["id"].n_unique() == 3000
    assert ev["user"].is_in(users["id"].implode()).all()
    assert ev["item"].is_in(items["id"].implode()).all()


def test_the_tianchi_loader_reads_it(synth_dir: Path) -> None:
    from recloop.data.loaders import load_raw

    raw = load_raw("tianchi", synth_dir)
    assert raw.events.height == 60_000
    assert raw.users is not None and raw.users.columns == ["user", "sex", "age", "pur_power"]
    assert raw.items is not None and raw.items.columns == ["item", "category", "shop", "brand"]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, synth_dir: Path) -> None:
    generate(SynthConfig(events=60_000, seed=3, chunk_events=20_000), tmp_path / "a")
    assert _digest(tmp_path / "a") == _digest(synth_dir)
    generate(SynthConfig(events=60_000, seed=4, chunk_events=20_000), tmp_path / "b")
    assert _digest(tmp_path / "b")["user_behavior.csv"] != _digest(synth_dir)["user_behavior.csv"]


def test_funnel_shares_and_buys_follow_views(synth_dir: Path) -> None:
    ev = _events(synth_dir)
    share = ev["behavior"].value_counts(normalize=True)
    rate = dict(zip(share["behavior"], share["proportion"], strict=True))
    assert rate["buy"] < rate["cart"] < rate["pv"]
    assert 0.85 < rate["pv"] < 0.94
    # Most buys have an earlier (or same-second) pv of the same item by the same user.
    with_row = ev.with_row_index("row")
    first_pv = (
        with_row.filter(pl.col("behavior") == "pv")
        .group_by("user", "item")
        .agg(pl.col("row").min().alias("pv_row"))
    )
    buys = with_row.filter(pl.col("behavior") == "buy").join(
        first_pv, on=["user", "item"], how="left"
    )
    preceded = (buys["pv_row"] < buys["row"]).fill_null(False).mean()
    assert preceded is not None and float(preceded) > 0.9  # type: ignore[arg-type]


def test_item_popularity_is_zipf_like(synth_dir: Path) -> None:
    counts = np.sort(_events(synth_dir)["item"].value_counts()["count"].to_numpy())[::-1]
    top = counts[: max(1, len(counts) // 100)].sum() / counts.sum()
    assert top > 0.1  # the top 1 % of items draw over 10 % of events
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
    assert -1.6 < slope < -0.4


def test_sessions_have_short_inner_gaps_and_long_outer_gaps(synth_dir: Path) -> None:
    ev = _events(synth_dir).sort("user", "time", maintain_order=True)
    gaps = ev.select(pl.col("time").diff().over("user").alias("gap"))["gap"].drop_nulls().to_numpy()
    assert np.median(gaps) < 120  # inside sessions: seconds to minutes
    assert (gaps > 3600).mean() > 0.05  # a fair share of hour-to-day pauses
    assert gaps.max() > 86_400


def test_users_prefer_their_cluster_categories(synth_dir: Path) -> None:
    ev = _events(synth_dir)
    items = pl.read_csv(
        synth_dir / "item.csv", has_header=False, new_columns=["item", "category", "shop", "brand"]
    )
    joined = ev.join(items, on="item")
    per_user = (
        joined.group_by("user")
        .agg(
            (
                pl.col("category").value_counts(sort=True).first().struct.field("count") / pl.len()
            ).alias("top"),
            pl.len().alias("n"),
        )
        .filter(pl.col("n") >= 50)
    )
    n_categories = items["category"].n_unique()
    # A user's favourite category takes far more than a uniform share of its events.
    assert per_user["top"].median() > 5.0 / n_categories  # type: ignore[operator]


def test_synth_config_checks() -> None:
    with pytest.raises(ConfigError, match="behavior_shares"):
        SynthConfig(events=10, behavior_shares=(0.5, 0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="users"):
        SynthConfig(events=10, users=0)


def test_tiny_sizes(tmp_path: Path) -> None:
    result = generate(SynthConfig(events=5, users=2, items=3, seed=1), tmp_path)
    assert result.n_events == 5 and sum(result.behavior_counts.values()) == 5
    assert len((tmp_path / "user_behavior.csv").read_text().splitlines()) == 5
    generate(SynthConfig(events=0, seed=1), tmp_path / "empty")
    assert (tmp_path / "empty" / "user_behavior.csv").read_text() == ""
