"""SQN and SA2C: one update against a hand-assembled loss, double Q, warm-up, serving head."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from actor_critic_helpers import N_ITEMS, first_last, make, run, snapshot, tiny_batch

import recloop.algos.sa2c as sa2c_module
from recloop.algos.sa2c import SA2C, SA2CConfig
from recloop.algos.sqn import SQN, SQNConfig, TwinNetworks, TwoHeadNet
from recloop.artifacts.heads import HeadConfig
from recloop.data.batch import TransitionBatch
from recloop.data.dataset import PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError
from recloop.training.fit import FitConfig


def sqn(**over: Any) -> SQN:
    algo = make("sqn", **over)
    assert isinstance(algo, SQN)
    return algo


def sa2c(**over: Any) -> SA2C:
    algo = make("sa2c", **over)
    assert isinstance(algo, SA2C)
    return algo


def force_main(monkeypatch: pytest.MonkeyPatch, algo: TwinNetworks[Any], which: int) -> None:
    """Make network ``which`` (0 or 1) learn every step."""
    nets = (algo.net1, algo.net2)
    monkeypatch.setattr(algo, "pick", lambda: (which, nets[which], nets[1 - which]))


def q_all(net: TwoHeadNet, batch: TransitionBatch, *, nxt: bool) -> torch.Tensor:
    if nxt:
        return net.q(net.state(batch.user, batch.next_history, batch.next_history_reward))
    return net.q(net.state(batch.user, batch.history, batch.history_reward))


def test_sqn_update_is_ce_plus_double_q_td(monkeypatch: pytest.MonkeyPatch) -> None:
    algo = sqn(gamma=0.5, td_weight=0.7)
    algo.train(False)  # no dropout: the reference below sees the same networks
    force_main(monkeypatch, algo, 0)
    batch = tiny_batch()
    with torch.no_grad():
        state = algo.net1.state(batch.user, batch.history, batch.history_reward)
        ce = F.cross_entropy(algo.net1.logits(state), batch.action, reduction="none")
        q = algo.net1.q(state)[torch.arange(len(batch)), batch.action - 1]
        best = q_all(algo.net1, batch, nxt=True).argmax(1)  # online network chooses
        value = q_all(algo.net2, batch, nxt=True)[torch.arange(len(batch)), best]  # target values
        y = batch.reward + 0.5 * (~batch.done).float() * value
        expected = (ce + 0.7 * 0.5 * (y - q) ** 2).mean()
    stats = algo.update(batch)
    assert float(stats.loss) == pytest.approx(expected.item(), rel=1e-5)
    assert float(stats.ce) == pytest.approx(ce.mean().item(), rel=1e-5)
    assert float(stats.target) == pytest.approx(y.mean().item(), rel=1e-5)


@pytest.mark.parametrize("which", [0, 1])
def test_only_the_picked_network_learns(monkeypatch: pytest.MonkeyPatch, which: int) -> None:
    algo = sqn(lr=1e-2)
    force_main(monkeypatch, algo, which)
    nets = (algo.net1, algo.net2)
    before = [snapshot(n.policy) + snapshot(n.q_head) for n in nets]
    run(algo, tiny_batch(), 1)
    after = [snapshot(n.policy) + snapshot(n.q_head) for n in nets]
    moved = [
        any(not torch.equal(a, b) for a, b in zip(x, y, strict=True))
        for x, y in zip(before, after, strict=True)
    ]
    assert moved == [which == 0, which == 1]


def test_the_coin_alternates_between_the_networks() -> None:
    algo = sqn()
    torch.manual_seed(0)
    picks = [algo.pick()[0] for _ in range(200)]
    assert 60 < sum(picks) < 140


def test_sqn_losses_fall_on_a_fixed_batch() -> None:
    stats = run(sqn(lr=1e-2), tiny_batch(), 60)
    first, last = first_last(stats, "ce")
    assert last < first - 0.5
    first_td, last_td = first_last(stats, "td")
    assert last_td < first_td


def test_the_served_policy_is_network_1s_supervised_head() -> None:
    algo = sqn()
    run(algo, tiny_batch(), 3)
    algo.train(False)
    batch = tiny_batch(1)
    with torch.no_grad():
        served = algo.policy(batch.user, batch.history, batch.history_reward)
        state = algo.net1.state(batch.user, batch.history, batch.history_reward)
        logits = algo.net1.logits(state)
    torch.testing.assert_close(served[:, 1:], logits[:, 1:])
    assert algo.policy is algo.net1.policy
    assert set(algo.networks()) == {"policy", "q1", "policy2", "q2"}


def sa2c_reference(
    algo: SA2C, batch: TransitionBatch, negatives: torch.Tensor, *, warm: bool, gamma: float
) -> dict[str, float]:
    rows = torch.arange(len(batch))
    with torch.no_grad():
        state = algo.net1.state(batch.user, batch.history, batch.history_reward)
        ce = F.cross_entropy(algo.net1.logits(state), batch.action, reduction="none")
        q = algo.net1.q(state)
        q_pos = q[rows, batch.action - 1]
        q_neg = q.gather(1, negatives - 1)
        best_next = q_all(algo.net1, batch, nxt=True).argmax(1)
        y_pos = (
            batch.reward
            + gamma * (~batch.done).float() * q_all(algo.net2, batch, nxt=True)[rows, best_next]
        )
        # negatives bootstrap from the current state, reward 0, never done
        y_neg = gamma * q_all(algo.net2, batch, nxt=False)[rows, q.argmax(1)]
        td = 0.5 * (y_pos - q_pos) ** 2 + (0.5 * (y_neg[:, None] - q_neg) ** 2).sum(1)
        if warm:
            adv = torch.ones_like(ce)
        else:
            mean = (q_pos + q_neg.sum(1)) / (1 + q_neg.shape[1])
            adv = (q_pos - mean).clamp(0.0, 10.0)
        return {"loss": (td + adv * ce).mean().item(), "advantage": adv.mean().item()}


@pytest.mark.parametrize("warm", [True, False])
def test_sa2c_update_matches_the_paper(monkeypatch: pytest.MonkeyPatch, warm: bool) -> None:
    algo = sa2c(gamma=0.5, num_negatives=3, warmup_steps=1 if warm else 0)
    run(algo, tiny_batch(), 2)  # the networks differ from their initialisation
    algo.steps = 0
    algo.train(False)
    force_main(monkeypatch, algo, 0)
    batch = tiny_batch(1)
    negatives = (batch.action.unsqueeze(1) + torch.tensor([1, 2, 3])) % N_ITEMS + 1
    monkeypatch.setattr(sa2c_module, "sample_negatives", lambda *a, **k: negatives)
    expected = sa2c_reference(algo, batch, negatives, warm=warm, gamma=0.5)
    opts = algo.warmup_opts if warm else algo.actor_opts
    idle = algo.actor_opts if warm else algo.warmup_opts
    stats = algo.update(batch)
    assert float(stats.loss) == pytest.approx(expected["loss"], rel=1e-5)
    assert float(stats.advantage) == pytest.approx(expected["advantage"], rel=1e-5)
    # The warm-up and the actor phase each step their own Adam (the paper's opt1 / opt2).
    assert opts[0].state and not idle[0].state


def test_sa2c_warmup_then_advantage(monkeypatch: pytest.MonkeyPatch) -> None:
    algo = sa2c(warmup_steps=2)
    stats = run(algo, tiny_batch(), 4)
    assert [s["advantage"] for s in stats[:2]] == [1.0, 1.0]
    assert all(s["advantage"] >= 0.0 for s in stats[2:])


def test_sa2c_actor_lr_defaults_to_the_papers_second_rate() -> None:
    algo = sa2c(lr=0.01)
    assert algo.warmup_opts[0].param_groups[0]["lr"] == 0.01
    assert algo.actor_opts[0].param_groups[0]["lr"] == 1e-3
    assert sa2c(lr=0.01, actor_lr=None).actor_opts[1].param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize(
    ("cls", "field", "value", "message"),
    [
        (SQNConfig, "gamma", 1.5, "gamma must be in"),
        (SQNConfig, "td_weight", -1.0, "td_weight must be >= 0"),
        (SQNConfig, "head", HeadConfig(kind="dot"), r"head\.kind must be 'linear'"),
        (SA2CConfig, "num_negatives", 0, "num_negatives must be >= 1"),
        (SA2CConfig, "warmup_steps", -1, "warmup_steps must be >= 0"),
        (SA2CConfig, "advantage_min", 20.0, "advantage_min must be <"),
        (SA2CConfig, "advantage_norm", "std", "advantage_norm must be one of"),
    ],
)
def test_config_errors_name_the_field(cls: type, field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls(**{field: value})


def test_paper_defaults() -> None:
    cfg = SA2CConfig()
    assert (cfg.gamma, cfg.num_negatives, cfg.negative_reward) == (0.5, 10, 0.0)
    assert (cfg.advantage_min, cfg.advantage_max) == (0.0, 10.0)
    assert (cfg.lr, cfg.td_weight, cfg.actor_lr) == (1e-2, 1.0, 1e-3)
    assert SQNConfig().gamma == 0.5


@pytest.mark.parametrize("name", ["sqn", "sa2c"])
@pytest.mark.parametrize("kind", ["attention", "tcn"])
def test_fits_on_sequence_encoders(tiny_dataset: PreparedDataset, name: str, kind: str) -> None:
    cls = SQNConfig if name == "sqn" else SA2CConfig
    cfg = cls(
        encoder=EncoderConfig(kind=kind, history=4, embedding_dim=8, hidden_dim=8),
        batch_size=16,
        lr=1e-2,
    )
    rec = cfg.create()
    result = rec.fit(
        tiny_dataset, fit=FitConfig(epochs=1, max_steps=3, progress=False, tensorboard=False)
    )
    assert result.steps == 3
    assert rec.algo is not None and rec.algo.steps == 3
