"""Discrete BCQ: behaviour model, eligibility threshold in the target and in serving."""

from __future__ import annotations

import pytest
import torch
from actor_critic_helpers import (
    N_ITEMS,
    assert_clipping_keeps_direction,
    assert_policy_reloads,
    assert_polyak,
    assert_recommendations,
    first_last,
    make,
    run,
    snapshot,
    tiny_batch,
)

from recloop.algos.bcq_discrete import BCQDiscrete, BCQDiscreteConfig
from recloop.algos.targets import bcq_eligible
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.heads_bcq import BCQDiscreteHead
from recloop.errors import ConfigError


def bcqd(**over: object) -> BCQDiscrete:
    algo = make("bcq_discrete", **over)
    assert isinstance(algo, BCQDiscrete)
    return algo


def test_td_and_behaviour_losses_fall_on_a_fixed_batch() -> None:
    stats = run(bcqd(lr=1e-2), tiny_batch(), 30)
    for key in ("loss", "td_loss", "behaviour_nll"):
        first, last = first_last(stats, key)
        assert last < 0.5 * first, key


def test_eligible_set_shrinks_as_the_behaviour_model_learns() -> None:
    stats = run(bcqd(lr=1e-2, threshold=0.3), tiny_batch(), 30)
    assert stats[0]["eligible"] > stats[-1]["eligible"] >= 1.0


def test_threshold_is_a_saved_buffer() -> None:
    algo = bcqd(threshold=0.45)
    assert algo.policy.state_dict()["head.threshold"].item() == pytest.approx(0.45)


def test_serving_ranks_eligible_items_by_q_then_the_rest_by_behaviour() -> None:
    torch.manual_seed(0)
    head = BCQDiscreteHead(
        HeadConfig(kind="bcq_discrete"), state_dim=3, n_items=N_ITEMS, embedding_dim=2
    )
    head.threshold.fill_(0.5)
    state = torch.randn(6, 3)
    scores = head(state, torch.zeros(N_ITEMS + 1, 2))[:, 1:]
    q = head.q(state)[:, 1:]
    logp = head.behaviour_log_prob(state)[:, 1:]
    eligible = logp - logp.max(1, keepdim=True).values > torch.log(torch.tensor(0.5))
    for b in range(6):
        e, rest = eligible[b], ~eligible[b]
        assert e.any()
        torch.testing.assert_close(scores[b, e], q[b, e])
        if rest.any():
            assert scores[b, e].min() > scores[b, rest].max()
            order = torch.argsort(scores[b, rest], descending=True)
            assert torch.equal(order, torch.argsort(logp[b, rest], descending=True))


def test_padding_is_never_eligible_nor_ranked() -> None:
    head = BCQDiscreteHead(
        HeadConfig(kind="bcq_discrete"), state_dim=3, n_items=N_ITEMS, embedding_dim=2
    )
    logp = head.behaviour_log_prob(torch.randn(4, 3))
    assert torch.isneginf(logp[:, 0]).all()
    assert not head.eligible(logp)[:, 0].any()


def test_target_moves_by_tau() -> None:
    algo = bcqd(critic={"tau": 0.5})
    before = snapshot(algo.target_policy)
    run(algo, tiny_batch(), 1)
    assert_polyak(before, algo.target_policy, algo.policy, 0.5)


def test_gradient_clipping_keeps_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_clipping_keeps_direction(monkeypatch, "bcq_discrete", steps=2)


def test_recommendations_and_reload() -> None:
    algo = bcqd()
    batch = tiny_batch()
    run(algo, batch, 3)
    assert_recommendations(algo, batch)
    assert_policy_reloads(algo, batch)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        BCQDiscreteConfig(threshold=1.0)  # nothing would be eligible (strict >)
    with pytest.raises(ConfigError, match="threshold"):
        BCQDiscreteConfig(threshold=-0.1)
    with pytest.raises(ConfigError, match=r"head\.kind"):
        BCQDiscreteConfig(head=HeadConfig(kind="linear"))


def test_serving_eligibility_is_strict_at_the_threshold() -> None:
    # the head's rule is the target's: G / max G > τ, so an item exactly at τ is out
    head = BCQDiscreteHead(HeadConfig(kind="bcq_discrete"), state_dim=3, n_items=3, embedding_dim=2)
    head.threshold.fill_(0.5)
    logp = torch.log(torch.tensor([[0.0, 1.0, 0.5, 0.25]]))  # padding, then ratios 1, .5, .25
    assert head.eligible(logp).tolist() == [[False, True, False, False]]
    assert torch.equal(head.eligible(logp)[:, 1:], bcq_eligible(logp[:, 1:], 0.5))
