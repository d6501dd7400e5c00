"""Every-position next-item cross-entropy (the training of gru4rec and sasrec)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from recloop.algos import sequential
from recloop.algos.base import DatasetSpec
from recloop.algos.gru4rec import GRU4Rec, GRU4RecConfig
from recloop.algos.sequential import (
    embedding_dropout,
    position_states,
    prefix_histories,
    select_windows,
)
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.policy import PolicyNet, PolicySpec
from recloop.data.batch import TransitionBatch
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError
from recloop.training.fit import FitConfig

CPU = torch.device("cpu")


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"head\.kind must be one of"):
        GRU4RecConfig(head=HeadConfig(kind="popularity"))
    with pytest.raises(ConfigError, match="window_stride must be >= 1"):
        GRU4RecConfig(window_stride=0)
    with pytest.raises(ConfigError, match="embedding_dropout must be in"):
        GRU4RecConfig(embedding_dropout=1.0)
    assert GRU4RecConfig().stride == 50
    assert GRU4RecConfig(window_stride=7).stride == 7


def test_select_windows() -> None:
    done = torch.tensor([False, True, False, False, True])
    nonempty = torch.tensor([True, True, True, False, False])
    uniform = torch.tensor([0.1, 0.9, 0.6, 0.0, 0.0])
    keep = select_windows(done, nonempty, rate=0.5, uniform=uniform)
    # row 0 drawn, row 1 done, row 2 not drawn, rows 3-4 empty whatever else holds
    assert keep.tolist() == [True, True, False, False, False]
    # nothing drawn: the first non-empty window stands in
    none = select_windows(
        torch.zeros(3, dtype=torch.bool),
        torch.tensor([False, True, True]),
        rate=0.1,
        uniform=torch.full((3,), 0.9),
    )
    assert none.tolist() == [False, True, False]
    empty = torch.zeros(2, dtype=torch.bool)
    assert not select_windows(empty, empty, rate=1.0, uniform=torch.zeros(2)).any()


def test_prefix_histories() -> None:
    history = torch.tensor([[0, 3, 4], [5, 6, 7]])
    reward = torch.tensor([[0.0, 0.3, 0.4], [0.5, 0.6, 0.7]])
    prefix, prefix_reward, rows = prefix_histories(history, reward)
    assert prefix.tolist() == [[0, 0, 3], [0, 3, 4], [0, 0, 5], [0, 5, 6], [5, 6, 7]]
    torch.testing.assert_close(
        prefix_reward,
        torch.tensor([[0, 0, 0.3], [0, 0.3, 0.4], [0, 0, 0.5], [0, 0.5, 0.6], [0.5, 0.6, 0.7]]),
    )
    assert rows.tolist() == [0, 0, 1, 1, 1]


def _policy(kind: str, *, use_user: bool = True, seed: int = 0) -> PolicyNet:
    torch.manual_seed(seed)
    enc = EncoderConfig(
        kind=kind,
        history=5,
        embedding_dim=6,
        hidden_dim=8,
        num_layers=2,
        n_heads=2,
        use_user=use_user,
        use_rewards=True,
    )
    policy = PolicyNet(PolicySpec(n_users=4, n_items=9, encoder=enc, head=HeadConfig()))
    policy.eval()
    return policy


HISTORY = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9], [0, 7, 7, 2, 8]])
REWARD = torch.rand(HISTORY.shape, generator=torch.Generator().manual_seed(1)) * (HISTORY != 0)
USER = torch.tensor([1, 2, 0, 4])


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_recurrent_states_equal_the_encoder_on_every_prefix(kind: str) -> None:
    policy = _policy(kind)
    with torch.no_grad():
        fast = position_states(policy.encoder, USER, HISTORY, REWARD)
        prefix, prefix_reward, rows = prefix_histories(HISTORY, REWARD)
        slow = policy.encoder(USER[rows], prefix, prefix_reward)
    assert fast.shape == (int((HISTORY != 0).sum()), policy.encoder.state_dim)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_attention_state_at_the_last_position_is_the_serving_state() -> None:
    policy = _policy("attention")
    with torch.no_grad():
        states = position_states(policy.encoder, USER, HISTORY, REWARD)
        serving = policy.encoder(USER, HISTORY, REWARD)
    last = (HISTORY != 0).sum(dim=1).cumsum(dim=0) - 1  # row b's last real position in M
    torch.testing.assert_close(states[last], serving, rtol=1e-5, atol=1e-6)


def test_other_encoders_read_each_prefix() -> None:
    """Mean encoder without user or rewards: the state at j is the mean of items <= j."""
    torch.manual_seed(0)
    enc = EncoderConfig(kind="mean", history=3, embedding_dim=4, use_user=False)
    policy = PolicyNet(PolicySpec(n_users=2, n_items=9, encoder=enc, head=HeadConfig()))
    history = torch.tensor([[0, 3, 4], [5, 6, 7]])
    e = policy.item_embedding.weight.detach()
    expected = torch.stack(
        [e[3], (e[3] + e[4]) / 2, e[5], (e[5] + e[6]) / 2, (e[5] + e[6] + e[7]) / 3]
    )
    with torch.no_grad():
        got = position_states(policy.encoder, torch.tensor([1, 2]), history, torch.zeros(2, 3))
    torch.testing.assert_close(got, expected)


def test_embedding_dropout_only_inside_the_block() -> None:
    torch.manual_seed(0)
    table = torch.nn.Embedding(5, 200)
    idx = torch.tensor([1, 2, 3])
    plain = table(idx)
    with embedding_dropout(table, 0.5):
        dropped = table(idx)
    zero = dropped == 0
    assert 0.3 < zero.float().mean() < 0.7
    torch.testing.assert_close(dropped[~zero], 2 * plain[~zero])
    torch.testing.assert_close(table(idx), plain)  # the hook is gone
    with pytest.raises(RuntimeError), embedding_dropout(table, 0.5):
        raise RuntimeError
    torch.testing.assert_close(table(idx), plain)


def _batch(history: torch.Tensor, action: torch.Tensor, done: torch.Tensor) -> TransitionBatch:
    nxt = torch.cat([history[:, 1:], action.unsqueeze(1)], dim=1)
    b = history.shape[0]
    return TransitionBatch(
        user=torch.arange(1, b + 1),
        history=history,
        history_reward=(history != 0).float(),
        action=action,
        reward=torch.ones(b),
        returns=torch.ones(b),
        next_history=nxt,
        next_history_reward=(nxt != 0).float(),
        done=done,
    )


def test_update_loss_is_the_cross_entropy_of_every_position_of_the_kept_windows() -> None:
    """Window [0, 3, 4, 5] → 6 is trained as 3 → 4, (3, 4) → 5, (3, 4, 5) → 6."""
    enc = EncoderConfig(kind="gru", history=4, embedding_dim=6, hidden_dim=8, use_user=False)
    cfg = GRU4RecConfig(encoder=enc, embedding_dropout=0.0, window_stride=10**9, keep_done=True)
    spec = DatasetSpec(n_users=3, n_items=9, popularity=np.ones(10, np.float32))
    torch.manual_seed(0)
    algo = GRU4Rec(cfg, spec, device=CPU)
    # only row 1 is done; row 0 would be drawn with probability 1e-9
    batch = _batch(
        torch.tensor([[1, 2, 3, 4], [0, 3, 4, 5], [7, 8, 9, 1]]),
        torch.tensor([5, 6, 2]),
        torch.tensor([False, True, False]),
    )
    policy = algo.policy
    with torch.no_grad():
        prefixes = torch.tensor([[0, 0, 0, 3], [0, 0, 3, 4], [0, 3, 4, 5]])
        states = policy.state(torch.full((3,), 2), prefixes, (prefixes != 0).float())
        logits = policy.head(states, policy.item_embedding.weight)
        expected = F.cross_entropy(logits, torch.tensor([4, 5, 6]))
    algo.train(True)
    stats = algo.update(batch)
    assert float(stats.windows) == 1 and float(stats.positions) == 3
    assert float(stats.loss) == pytest.approx(float(expected), rel=1e-5)


def _dataset_with_unseen_holdout() -> PreparedDataset:
    """Walks over items 1..12; every valid and test event is one of items 13..16 instead."""
    n_users, length = 10, 12
    t = np.arange(length)
    user = np.repeat(np.arange(1, n_users + 1), length)
    item = ((np.arange(n_users)[:, None] + t[None, :]) % 12 + 1).ravel()
    split = np.tile(
        np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN)), n_users
    )
    held = split != TRAIN
    item[held] = 13 + (np.arange(int(held.sum())) % 4)
    return PreparedDataset.from_arrays(
        user=user,
        item=item,
        timestamp=np.tile(1000 + 60 * t, n_users),
        split=split,
        n_users=n_users,
        n_items=16,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, 17)],
    )


def test_training_sees_train_events_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _dataset_with_unseen_holdout()
    seen_inputs: list[torch.Tensor] = []
    seen_targets: list[torch.Tensor] = []
    real_states, real_ce = sequential.position_states, sequential.F.cross_entropy

    def spy_states(encoder, user, history, reward):  # type: ignore[no-untyped-def]
        seen_inputs.append(history.clone())
        return real_states(encoder, user, history, reward)

    def spy_ce(logits, target):  # type: ignore[no-untyped-def]
        seen_targets.append(target.clone())
        return real_ce(logits, target)

    monkeypatch.setattr(sequential, "position_states", spy_states)
    monkeypatch.setattr(sequential.F, "cross_entropy", spy_ce)
    enc = EncoderConfig(kind="gru", history=4, embedding_dim=8, hidden_dim=8, use_user=False)
    rec = GRU4RecConfig(encoder=enc, batch_size=8, window_stride=2).create()
    rec.fit(ds, fit=FitConfig(epochs=3, patience=None, progress=False, tensorboard=False))
    inputs = torch.cat([h.flatten() for h in seen_inputs])
    targets = torch.cat(seen_targets)
    assert set(targets.tolist()) == set(range(1, 13))  # every train item is a target ...
    assert int(inputs.max()) <= 12  # ... and nothing held out enters, as input or target
