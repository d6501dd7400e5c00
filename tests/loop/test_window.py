"""Window, holdout cut and trigger: pure functions against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from loop_helpers import append_events, walk_events

from recloop.errors import ConfigError
from recloop.evaluation.ope import OPEConfig
from recloop.loop.config import LoopConfig
from recloop.loop.window import (
    count_newer,
    holdout_cuts,
    quantile_cut,
    round_due,
    window_events,
)


def test_quantile_cut_takes_the_time_of_the_first_held_out_event() -> None:
    ts = np.array([50, 10, 40, 20, 30, 60, 70, 80, 90, 100])
    # 10 events, share 0.2: the last round(2.0) = 2 events -> sorted position 8 = 90
    assert quantile_cut(ts, 0.2) == 90
    # share 0.25: round(2.5) = 3 (half up) -> position 7 = 80
    assert quantile_cut(ts, 0.25) == 80
    assert quantile_cut(ts, 0.0) is None
    assert quantile_cut(ts, 0.01) is None  # round(0.1) = 0 events: nothing held out


def test_holdout_cut_never_before_the_current_models_cut() -> None:
    ts = np.arange(10, 110, 10)  # 10 .. 100
    free = holdout_cuts(ts, holdout=0.2, valid=0.2, floor=None)
    assert (free.valid_start, free.test_start) == (70, 90)
    floored = holdout_cuts(ts, holdout=0.2, valid=0.2, floor=95)
    # the current model trained on everything before 95: the holdout starts there, and
    # validation keeps its own cut
    assert (floored.valid_start, floored.test_start) == (70, 95)
    low_floor = holdout_cuts(ts, holdout=0.2, valid=0.2, floor=40)
    assert low_floor.test_start == 90
    assert holdout_cuts(ts, holdout=0.2, valid=0.0, floor=None).valid_start is None
    # validation never starts after the holdout
    assert holdout_cuts(ts, holdout=0.2, valid=0.1, floor=100).valid_start == 80


def test_sliding_window_keeps_the_last_days_by_event_time() -> None:
    day = 86_400
    ev = pl.DataFrame({"timestamp": [0, day, 2 * day, 3 * day, 3 * day + 5]})
    kept = window_events(ev, window="sliding", days=2)
    assert kept["timestamp"].to_list() == [2 * day, 3 * day, 3 * day + 5]
    assert window_events(ev, window="growing", days=None).height == 5


@pytest.mark.parametrize(
    ("new", "events", "minutes", "since", "due"),
    [
        (0, 1, None, None, False),  # nothing logged yet
        (5, 100, None, None, True),  # first round: any event
        (99, 100, None, 10.0, False),
        (100, 100, None, 10.0, True),
        (1, None, 5.0, 299.0, False),
        (1, None, 5.0, 300.0, True),
        (0, None, 5.0, 1e9, False),  # the clock alone never retrains the same window
        (3, 100, 5.0, 301.0, True),
    ],
)
def test_round_due(
    new: int, events: int | None, minutes: float | None, since: float | None, due: bool
) -> None:
    got, why = round_due(
        new_events=new, every_events=events, every_minutes=minutes, seconds_since_last=since
    )
    assert got is due, why


def test_count_newer_counts_rows_after_the_watermark(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    ev = walk_events(steps=range(0, 3), n_users=2)  # ts 1_000_000 + 60 t + u
    append_events(url, ev)
    assert count_newer(url, table="behavior_log", ts=None) == 6
    assert count_newer(url, table="behavior_log", ts=1_000_061) == 2  # t = 2, both users (u = 0, 1)
    assert count_newer(url, table="behavior_log", ts=1_000_121) == 0


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="window_days"):
        LoopConfig(window="sliding", every_events=1)
    with pytest.raises(ConfigError, match="trigger"):
        LoopConfig()
    with pytest.raises(ConfigError, match="metric"):
        LoopConfig(every_events=1, metric="ndcg10")
    with pytest.raises(ConfigError, match="holdout"):
        LoopConfig(every_events=1, holdout=0.6, valid=0.5)
    served = OPEConfig(target="served")
    with pytest.raises(ConfigError, match=r"ope.target=served .* needs source: impressions"):
        LoopConfig(every_events=1, ope=served)
    assert LoopConfig(every_events=1, ope=served, source="impressions").ope.target == "served"
