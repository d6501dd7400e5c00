"""Chronological order, session cuts and discounted returns against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.data.sessions import (
    SessionConfig,
    chronological_order,
    discounted_returns,
    session_starts,
)
from recloop.errors import ConfigError


def _returns_reference(reward: np.ndarray, starts: np.ndarray, gamma: float) -> np.ndarray:
    out = np.zeros(reward.shape[0])
    for i in range(reward.shape[0] - 1, -1, -1):
        last = i == reward.shape[0] - 1 or starts[i + 1]
        out[i] = reward[i] + (0.0 if last else gamma * out[i + 1])
    return out


def test_returns_of_a_three_event_session_by_hand() -> None:
    # G_2 = 3; G_1 = 2 + 0.9 * 3 = 4.7; G_0 = 1 + 0.9 * 4.7 = 5.23
    got = discounted_returns(np.array([1.0, 2.0, 3.0]), np.array([True, False, False]), 0.9)
    np.testing.assert_allclose(got, [5.23, 4.7, 3.0])


def test_returns_stop_at_session_boundaries_and_use_gamma() -> None:
    reward = np.array([1.0, 1.0, 2.0, 3.0, 1.0])
    starts = np.array([True, False, True, False, True])
    np.testing.assert_allclose(discounted_returns(reward, starts, 0.5), [1.5, 1.0, 3.5, 3.0, 1.0])
    np.testing.assert_allclose(discounted_returns(reward, starts, 0.0), reward)
    np.testing.assert_allclose(discounted_returns(reward, starts, 1.0), [2.0, 1.0, 5.0, 3.0, 1.0])


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 0.99, 1.0])
def test_returns_match_the_reference_on_random_sessions(gamma: float) -> None:
    rng = np.random.default_rng(7)
    for _ in range(30):
        e = int(rng.integers(1, 600))
        starts = rng.random(e) < rng.choice([0.005, 0.05, 0.4])
        starts[0] = True
        reward = rng.integers(1, 4, e).astype(np.float32)
        want = _returns_reference(reward, starts, gamma)
        np.testing.assert_allclose(
            discounted_returns(reward, starts, gamma, dtype=np.float64), want, rtol=1e-12
        )
        np.testing.assert_allclose(discounted_returns(reward, starts, gamma), want, rtol=2e-6)


def test_returns_of_a_very_long_session_stay_finite() -> None:
    # gamma^-t would overflow float64 after ~6700 steps at gamma 0.9.
    e = 50_000
    starts = np.zeros(e, bool)
    starts[[0, 20_000]] = True
    got = discounted_returns(np.ones(e), starts, 0.9, dtype=np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0], 10.0, rtol=1e-12)  # 1 / (1 - 0.9)
    np.testing.assert_allclose(got[19_999], 1.0)
    np.testing.assert_allclose(got[-2:], [1.9, 1.0])
    np.testing.assert_allclose(got, _returns_reference(np.ones(e), starts, 0.9), rtol=1e-12)
    # Undiscounted, a 30 000-event session sums to 30 000 even in float32.
    flat = discounted_returns(np.ones(e, np.float32), starts, 1.0)
    assert flat.dtype == np.float32
    np.testing.assert_allclose(flat[[0, 20_000, e - 1]], [20_000, 30_000, 1], rtol=1e-6)


def test_session_split_at_the_gap() -> None:
    user = np.array([1, 1, 1, 1, 2, 2])
    ts = np.array([0, 3600, 7201, 7300, 7301, 99_999])
    # 0 → 3600 is exactly the gap (same session); 3600 → 7201 is longer (new session).
    np.testing.assert_array_equal(
        session_starts(user, ts, gap_seconds=3600), [True, False, True, False, True, True]
    )
    np.testing.assert_array_equal(
        session_starts(user, ts, gap_seconds=None), [True, False, False, False, True, False]
    )


def test_session_config_rejects_a_negative_gap() -> None:
    with pytest.raises(ConfigError, match="gap_seconds"):
        SessionConfig(gap_seconds=-1)


@pytest.mark.parametrize("span", [5, 10**6, 2**50, 2**60])
def test_chronological_order_is_a_stable_sort_by_user_then_time(span: int) -> None:
    # Spans cover the one-sort, the two-pass and the lexsort paths.
    rng = np.random.default_rng(span % 1000)
    for _ in range(20):
        e = int(rng.integers(1, 500))
        user = rng.integers(0, int(rng.integers(1, 40)), e)
        ts = rng.integers(0, span, e)
        want = np.lexsort((np.arange(e), ts, user))
        got = chronological_order(user, ts)
        np.testing.assert_array_equal(got.order, want)
        np.testing.assert_array_equal(got.user, user[want])
        np.testing.assert_array_equal(got.timestamp, ts[want])


@pytest.mark.parametrize("span", [10**6, 2**50])
def test_chronological_order_of_logs_written_in_time_order(span: int) -> None:
    rng = np.random.default_rng(1)
    e = 400
    user = rng.integers(0, 30, e)
    ts = np.sort(rng.integers(0, span, e))
    ts[10:20] = ts[10]  # ties across users
    want = np.lexsort((np.arange(e), ts, user))
    got = chronological_order(user, ts)
    np.testing.assert_array_equal(got.order, want)
    np.testing.assert_array_equal(got.timestamp, ts[want])
    np.testing.assert_array_equal(got.user, user[want])


def test_chronological_order_keeps_source_order_on_ties() -> None:
    user = np.array([2, 1, 2, 1, 1])
    ts = np.array([5, 7, 5, 7, 3])
    np.testing.assert_array_equal(chronological_order(user, ts).order, [4, 1, 3, 0, 2])


@pytest.mark.parametrize("gamma", [0.5, 0.9, 1.0])
def test_returns_sparse_path_many_short_sessions_beside_one_long(gamma: float) -> None:
    """Thousands of one- and two-event sessions next to one of 300 events: after a few passes
    only the long session's rows are still open, and the scan switches to updating just
    those (the sparse path).  Its discount update must match the reference exactly."""
    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(1, 3, 4000), [300], rng.integers(1, 3, 4000)])
    starts = np.zeros(int(lengths.sum()), bool)
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    reward = rng.integers(1, 4, starts.shape[0]).astype(np.float64)
    want = _returns_reference(reward, starts, gamma)
    got = discounted_returns(reward, starts, gamma, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-12)
