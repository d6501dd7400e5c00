"""REINFORCE with top-K off-policy correction: config checks, one update, sampled softmax."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from recloop.algos.base import DatasetSpec, clip_grad_norm, optimizer_step
from recloop.algos.losses import OffPolicyTerms, log_prob_of, topk_off_policy_loss
from recloop.algos.reinforce import Reinforce, ReinforceConfig
from recloop.data.batch import TransitionBatch
from recloop.data.dataset import PreparedDataset
from recloop.data.sampler import TransitionSampler
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError, DataError
from recloop.training.fit import FitConfig

ENC = EncoderConfig(kind="mean", history=4, embedding_dim=8, hidden_dim=8)


def make(ds: PreparedDataset, **kw: object) -> Reinforce:
    torch.manual_seed(0)
    cfg = ReinforceConfig(encoder=ENC, batch_size=32, lr=0.01, **kw)  # type: ignore[arg-type]
    return Reinforce(cfg, DatasetSpec.from_dataset(ds), device=torch.device("cpu"))


def first_batch(ds: PreparedDataset, size: int = 32) -> TransitionBatch:
    return next(iter(TransitionSampler(ds, history=4, batch_size=size, shuffle=False)))


def rewarded_batch(ds: PreparedDataset) -> TransitionBatch:
    """Eight rows of which 0, 3 and 5 are rewarded."""
    batch = first_batch(ds, size=8)
    return dataclasses.replace(batch, reward=torch.tensor([1.0, 0, 0, 2, 0, 1, 0, 0]))


def spy_on_losses(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The total loss of every update from now on, whose optimiser steps are skipped."""
    import recloop.algos.reinforce as reinforce_module

    losses: list[torch.Tensor] = []

    def spy(*args: Any, **kw: Any) -> None:
        losses.append(args[1].detach())

    monkeypatch.setattr(reinforce_module, "optimizer_step", spy)
    return losses


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top_k", 0, "top_k must be >= 1"),
        ("weight_cap", 0.0, "weight_cap must be > 0"),
        ("returns_scale", "max", "returns_scale must be one of"),
        ("sampled_softmax", 0, "sampled_softmax must be >= 1"),
        ("proposal", "zipf", "proposal must be one of"),
        ("lr", -1.0, "lr must be > 0"),
        ("ce_weight", -1.0, "ce_weight must be >= 0"),
        ("ce_epochs", -1, "ce_epochs must be >= 0"),
    ],
)
def test_config_errors_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReinforceConfig(**{field: value})  # type: ignore[arg-type]


def test_head_must_be_linear() -> None:
    from recloop.artifacts.heads import HeadConfig

    with pytest.raises(ConfigError, match=r"head\.kind must be linear"):
        ReinforceConfig(head=HeadConfig(kind="dot"))


def test_update_uses_per_row_log_probs(tiny_dataset: PreparedDataset) -> None:
    algo = make(tiny_dataset, returns_scale="none")
    batch = first_batch(tiny_dataset)
    algo.train(False)  # no dropout, so the reference below sees the same network
    with torch.no_grad():
        state = algo.policy.state(batch.user, batch.history, batch.history_reward)
        logits = algo.pi.net(state)
        logp = torch.log_softmax(logits, dim=1)[torch.arange(len(batch)), batch.action]
        beta_logp = log_prob_of(algo.beta.net(state), batch.action)
        w = torch.exp(logp - beta_logp).clamp(max=2.0)
        lam = 10 * (1 - logp.exp()) ** 9
        expected = -(w * lam * batch.returns * logp).mean()
    stats = algo.update(batch)
    assert float(stats.logp) == pytest.approx(logp.mean().item(), rel=1e-5)
    assert float(stats.loss) == pytest.approx(expected.item(), rel=1e-5)
    assert float(stats.beta_nll) == pytest.approx(-beta_logp.mean().item(), rel=1e-5)
    assert float(stats.weight) == pytest.approx(w.mean().item(), rel=1e-5)


@pytest.mark.parametrize("sampled", [None, 6])
def test_updates_lower_the_losses_on_a_fixed_batch(
    tiny_dataset: PreparedDataset, sampled: int | None
) -> None:
    algo = make(tiny_dataset, sampled_softmax=sampled, proposal="uniform")
    algo.train(True)
    batch = first_batch(tiny_dataset)
    first = algo.update(batch)
    for _ in range(30):
        last = algo.update(batch)
    assert float(last.logp) > float(first.logp) + 0.5
    assert float(last.beta_nll) < float(first.beta_nll) - 0.5
    assert float(last.loss) < float(first.loss)


def test_behaviour_head_does_not_train_the_state(tiny_dataset: PreparedDataset) -> None:
    algo = make(tiny_dataset)
    batch = first_batch(tiny_dataset)
    state = algo.policy.state(batch.user, batch.history, batch.history_reward)
    beta_nll = -log_prob_of(algo.beta.net(state.detach()), batch.action).mean()
    beta_nll.backward()
    assert algo.policy.item_embedding.weight.grad is None
    assert all(p.grad is not None for p in algo.beta.parameters())


def test_sampled_softmax_uses_sparse_rows_and_sparse_adam(tiny_dataset: PreparedDataset) -> None:
    algo = make(tiny_dataset, sampled_softmax=3, proposal="popularity")
    assert set(algo.optimizers()) == {"adam", "row_adam"}
    before_out = algo.pi.output.weight.detach().clone()
    before_emb = algo.policy.item_embedding.weight.detach().clone()
    batch = first_batch(tiny_dataset, size=4)
    torch.manual_seed(1)
    algo.update(batch)
    changed_out = (algo.pi.output.weight != before_out).any(dim=1)
    changed_emb = (algo.policy.item_embedding.weight != before_emb).any(dim=1)
    # Output rows of items that were neither logged nor drawn stay as they were.
    assert 0 < int(changed_out.sum()) <= 4 + 3
    assert not changed_out[0]
    seen = torch.unique(batch.history[batch.history != 0])
    assert set(torch.nonzero(changed_emb).flatten().tolist()) <= set(seen.tolist())


def test_grad_clip_scales_without_flipping_signs() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, -4.0])
    norm = clip_grad_norm([p], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, -0.8]), atol=1e-6, rtol=0)
    q = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([q], lr=1.0)
    optimizer_step(opt, (q * 10.0).sum(), grad_clip=0.5)
    # gradient +10 clipped to +0.5: the step goes down, not up
    assert q.item() == pytest.approx(0.5, abs=1e-5)


def test_logged_behaviour_weights_by_pi_over_the_logged_propensity(
    tiny_dataset: PreparedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recloop.algos.reinforce as reinforce_module

    algo = make(tiny_dataset, behaviour="logged", weight_cap=1e9, top_k=1)
    algo.train(False)
    batch = dataclasses.replace(
        first_batch(tiny_dataset, size=4), propensity=torch.tensor([0.5, 0.25, 1.0, 0.02])
    )
    seen: list[OffPolicyTerms] = []

    def spy(**kw: Any) -> OffPolicyTerms:
        seen.append(topk_off_policy_loss(**kw))
        return seen[-1]

    monkeypatch.setattr(reinforce_module, "topk_off_policy_loss", spy)
    with torch.no_grad():
        state = algo.policy.state(batch.user, batch.history, batch.history_reward)
        pi = torch.softmax(algo.pi.net(state), dim=1)[torch.arange(4), batch.action]
    algo.update(batch)
    torch.testing.assert_close(seen[0].weight, pi / batch.propensity, rtol=1e-5, atol=0)


def test_estimated_behaviour_ignores_the_logged_propensity(tiny_dataset: PreparedDataset) -> None:
    batch = first_batch(tiny_dataset, size=4)
    logged = dataclasses.replace(batch, propensity=torch.full((4,), 1e-3))
    a, b = make(tiny_dataset), make(tiny_dataset)
    a.train(False)
    b.train(False)
    assert float(a.update(batch).weight) == pytest.approx(float(b.update(logged).weight))


def test_logged_behaviour_refuses_data_without_the_column(tiny_dataset: PreparedDataset) -> None:
    cfg = ReinforceConfig(encoder=ENC, batch_size=16, behaviour="logged")
    rec = cfg.create()
    with pytest.raises(DataError, match='"propensity" event column'):
        rec.fit(tiny_dataset, fit=FitConfig(epochs=1, progress=False, tensorboard=False))
    assert rec.algo is not None and rec.algo.steps == 0


def test_logged_behaviour_trains_on_data_with_the_column(tiny_dataset: PreparedDataset) -> None:
    prop = np.random.default_rng(0).uniform(0.05, 1.0, tiny_dataset.n_events)
    ds = dataclasses.replace(tiny_dataset, extra={"propensity": prop})
    cfg = ReinforceConfig(encoder=ENC, batch_size=16, behaviour="logged")
    result = cfg.create().fit(
        ds, fit=FitConfig(epochs=1, max_steps=2, progress=False, tensorboard=False)
    )
    assert result.steps == 2


def test_behaviour_must_be_estimated_or_logged() -> None:
    with pytest.raises(ConfigError, match="behaviour"):
        ReinforceConfig(behaviour="fitted")  # type: ignore[arg-type]


def test_ce_weight_adds_the_rewarded_cross_entropy_and_names_the_variant(
    tiny_dataset: PreparedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REINFORCE+CE's step minimises the corrected loss plus λ · the rewarded rows' −log π:
    the gradient reaching π's head equals that of the two terms computed by hand."""
    assert ReinforceConfig().label() == "reinforce"
    assert ReinforceConfig(ce_weight=0.5).label() == "reinforce (+CE, λ=0.5)"
    batch = rewarded_batch(tiny_dataset)  # rows 0, 3 and 5 rewarded
    losses = spy_on_losses(monkeypatch)
    plain, with_ce = make(tiny_dataset), make(tiny_dataset, ce_weight=0.5)
    plain.update(batch)
    stats = with_ce.update(batch)
    state = with_ce.policy.state(batch.user, batch.history, batch.history_reward)
    logp = torch.log_softmax(with_ce.pi.net(state), dim=1)[torch.arange(8), batch.action]
    expected_ce = -(logp[[0, 3, 5]]).mean()
    torch.testing.assert_close(stats.ce, expected_ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        losses[1] - losses[0], 0.5 * expected_ce.detach(), rtol=1e-4, atol=1e-5
    )


def test_ce_warm_start_trains_pi_on_the_cross_entropy_alone_then_switches(
    tiny_dataset: PreparedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During the first ``ce_epochs`` the step minimises −mean log π over the rewarded rows
    (+ β's NLL, as always); from epoch ``ce_epochs`` on, the corrected loss."""
    assert ReinforceConfig(ce_epochs=1).label() == "reinforce (CE warm start 1 ep)"
    assert (
        ReinforceConfig(ce_epochs=2, ce_weight=1).label()
        == "reinforce (+CE, λ=1, CE warm start 2 ep)"
    )
    batch = rewarded_batch(tiny_dataset)  # rows 0, 3 and 5 rewarded
    losses = spy_on_losses(monkeypatch)
    algo = make(tiny_dataset, ce_epochs=2)
    assert algo.ce_phase  # before the fit loop calls begin_epoch
    state = algo.policy.state(batch.user, batch.history, batch.history_reward)
    logp = torch.log_softmax(algo.pi.net(state), dim=1)[torch.arange(8), batch.action]
    expected_ce = -(logp[[0, 3, 5]]).mean().detach()
    beta_logits = algo.beta.net(state.detach())
    beta_nll = -torch.log_softmax(beta_logits, dim=1)[torch.arange(8), batch.action].mean()
    for epoch in (0, 1):
        algo.begin_epoch(epoch)
        stats = algo.update(batch)
        torch.testing.assert_close(stats.ce, expected_ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.loss, expected_ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            losses[-1], expected_ce + beta_nll.detach(), rtol=1e-5, atol=1e-6
        )
    algo.begin_epoch(2)
    assert not algo.ce_phase
    stats = algo.update(batch)
    torch.testing.assert_close(stats.ce, torch.zeros(()))
    torch.testing.assert_close(losses[-1], (stats.loss + stats.beta_nll).detach())


def test_fit_sets_the_phase_before_each_epochs_updates_resumed_runs_included(
    tiny_dataset: PreparedDataset, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each update of the first ``ce_epochs`` epochs runs in the CE phase and every later
    one outside it, in a resumed run too (which starts past the warm start)."""
    from recloop.training.fit import fit

    phases: list[tuple[int, bool]] = []
    epochs: list[int] = []
    real_update, real_begin = Reinforce.update, Reinforce.begin_epoch

    def begin(self: Reinforce, epoch: int) -> None:
        epochs.append(epoch)
        real_begin(self, epoch)

    def update(self: Reinforce, batch: TransitionBatch) -> Any:
        phases.append((epochs[-1] if epochs else -1, self.ce_phase))
        return real_update(self, batch)

    monkeypatch.setattr(Reinforce, "begin_epoch", begin)
    monkeypatch.setattr(Reinforce, "update", update)
    cfg = FitConfig(epochs=2, progress=False, tensorboard=False, eval_every=2)
    fit(make(tiny_dataset, ce_epochs=1), tiny_dataset, cfg=cfg, run_dir=tmp_path)
    assert epochs == [0, 1]
    assert {e for e, _ in phases} == {0, 1}
    assert all(ce == (e == 0) for e, ce in phases)
    epochs.clear()
    phases.clear()
    fit(
        make(tiny_dataset, ce_epochs=1),
        tiny_dataset,
        cfg=dataclasses.replace(cfg, epochs=3),
        run_dir=tmp_path,
        resume=True,
    )
    assert epochs == [2] and phases and not any(ce for _, ce in phases)
