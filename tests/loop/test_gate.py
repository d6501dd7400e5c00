"""The gate scores the current model through its own id map on the candidate's holdout."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recloop.algos.supervised import SupervisedConfig
from recloop.artifacts.bundle import Artifact, load_artifact
from recloop.data.dataset import TEST, TRAIN, PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.evaluation.ope import OPEConfig
from recloop.loop.gate import gate, index_translation, mapped_scorer, popularity_scorer


def _dataset(user_ids: list[str], item_ids: list[str], seed: int = 0) -> PreparedDataset:
    rng = np.random.default_rng(seed)
    n_u, n_i = len(user_ids), len(item_ids)
    user = np.repeat(np.arange(1, n_u + 1), 4)
    item = rng.integers(1, n_i + 1, user.shape[0])
    split = np.tile([TRAIN, TRAIN, TRAIN, TEST], n_u)
    return PreparedDataset.from_arrays(
        user=user,
        item=item,
        timestamp=np.tile(np.arange(4) * 10, n_u),
        reward=rng.integers(0, 2, user.shape[0]).astype(np.float32),
        split=split,
        n_users=n_u,
        n_items=n_i,
        user_ids=user_ids,
        item_ids=item_ids,
    )


def _current_model(tmp_path: Path) -> tuple[Any, Artifact, PreparedDataset]:
    """(the recommender, its saved artifact, the dataset): a tiny supervised model of 12
    users and 8 items, one holdout event each."""
    cfg = SupervisedConfig(encoder=EncoderConfig(kind="mean", history=2, embedding_dim=4))
    ds = _dataset([f"u{i}" for i in range(12)], [f"i{i}" for i in range(8)], seed=5)
    rec = cfg.create()
    rec.build(ds, device="cpu")
    return rec, load_artifact(rec.save(tmp_path / "cur")), ds


def test_index_translation() -> None:
    assert index_translation(["a", "b"], ["b", "z", "a"]).tolist() == [0, 2, 0, 1]


def test_mapped_scorer_scores_raw_ids_as_the_old_model_does(tmp_path: Path) -> None:
    cfg = SupervisedConfig(encoder=EncoderConfig(kind="mean", history=2, embedding_dim=4))
    old_ds = _dataset(["u1", "u2"], ["a", "b", "c"])
    rec = cfg.create()
    rec.build(old_ds, device="cpu")
    art = load_artifact(rec.save(tmp_path / "old"))
    new_ds = _dataset(["u2", "u9"], ["c", "new", "a", "b"])
    score = mapped_scorer(art, new_ds)
    with torch.no_grad():
        got = score(torch.tensor([1, 2]), torch.tensor([[0, 3], [2, 1]]), torch.ones(2, 2))
        # u2 with history [a]; the unknown user u9 with history [new -> padding, c]
        want = art.policy(
            torch.tensor([art.user_index["u2"], 0]),
            torch.tensor([[0, art.item_index["a"]], [0, art.item_index["c"]]]),
            torch.ones(2, 2),
        )
    for new_col, raw in enumerate(new_ds.item_ids, start=1):
        if raw == "new":
            assert torch.isinf(got[:, new_col]).all()  # it cannot serve what it never saw
        else:
            assert torch.allclose(got[:, new_col], want[:, art.item_index[raw]])
    assert torch.isinf(got[:, 0]).all()


def test_popularity_scorer_ranks_by_train_counts() -> None:
    ds = _dataset(["u1", "u2", "u3"], ["a", "b", "c", "d"], seed=3)
    counts = np.bincount(ds.item[ds.split == TRAIN], minlength=5)
    got = popularity_scorer(ds)(torch.tensor([1, 2]), torch.zeros(2, 1), torch.zeros(2, 1))
    assert got.shape == (2, 5)
    assert got[0, 1:].tolist() == counts[1:].astype(float).tolist()


def test_an_identical_model_passes_and_a_worse_one_is_kept_out(tmp_path: Path) -> None:
    rec, cur, ds = _current_model(tmp_path)
    ope = OPEConfig(n_boot=50, behaviour_epochs=1)
    # 12 holdout events: no estimate is trusted (ESS < 30); the warnings are tested below
    same = gate(cur, cur, ds, metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr",
                ope_cfg=ope, require_trusted=False)  # fmt: skip
    assert same.promote, same.reason
    assert same.candidate == same.baseline
    assert same.ope["paired"]["differences"]["dr"]["value"] == 0.0
    # a candidate scoring the current model's ranking upside down
    with torch.no_grad():
        for p in rec.algo.policy.head.parameters():
            p.neg_()
    worse = load_artifact(rec.save(tmp_path / "worse"))
    res = gate(worse, cur, ds, metric="ndcg@5", margin=0.0, use_ope=False, estimator="dr",
               ope_cfg=ope)  # fmt: skip
    c, b = res.candidate["ndcg@5"], res.baseline["ndcg@5"]
    assert res.promote is (c >= b)
    assert ("promote" if c >= b else "keep current") in res.reason
    loose = gate(worse, cur, ds, metric="ndcg@5", margin=1.0, use_ope=False, estimator="dr",
                 ope_cfg=ope)  # fmt: skip
    assert loose.promote  # any ndcg difference is within a margin of 1


def test_the_gates_ope_scores_the_candidate_without_the_items_only_the_holdout_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The candidate is trained on the dataset, whose id maps hold the holdout's items
    too; OPE scores it without them (TrainedCatalogue), and the current model through its
    own id maps and catalogue (MappedScorer), unrestricted."""
    import recloop.loop.gate as gate_mod
    from recloop.evaluation.ope import TrainedCatalogue

    _, cur, ds = _current_model(tmp_path)
    scored: list[object] = []
    real = gate_mod.policy_terms
    monkeypatch.setattr(
        gate_mod, "policy_terms", lambda p, *a, **k: scored.append(p) or real(p, *a, **k)
    )
    gate(cur, cur, ds, metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr",
         ope_cfg=OPEConfig(n_boot=10, behaviour_epochs=1), require_trusted=False)  # fmt: skip
    current, candidate = scored
    assert isinstance(current, gate_mod.MappedScorer)
    assert isinstance(candidate, TrainedCatalogue) and candidate.policy is cur.policy


def test_rewarded_holdout_keeps_only_rewarded_targets() -> None:
    from recloop.evaluation.protocol import build_eval_users
    from recloop.loop.gate import rewarded_holdout

    ds = _dataset([f"u{i}" for i in range(30)], [f"i{j}" for j in range(12)])
    ranked = rewarded_holdout(ds)
    test = ds.split == TEST
    assert ((ranked.split == TEST) == (test & (ds.reward > 0))).all()
    assert (ranked.split[~test] == ds.split[~test]).all()  # train rows untouched
    users = build_eval_users(ranked, split="test", history=3)
    assert (users.target_rewards > 0).all()
    assert len(users) == int((test & (ds.reward > 0)).sum())  # one test row per user here
    assert ds.split[test].tolist() == [TEST] * int(test.sum())  # the input is not modified


def test_without_the_metric_ope_alone_decides(tmp_path: Path) -> None:
    rec, cur, ds = _current_model(tmp_path)
    ope = OPEConfig(n_boot=50, behaviour_epochs=1)
    same = gate(cur, cur, ds, metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr",
                ope_cfg=ope, use_metric=False, require_trusted=False)  # fmt: skip
    assert same.promote and "(not gating)" in same.reason
    with torch.no_grad():
        for p in rec.algo.policy.head.parameters():
            p.neg_()
    worse = load_artifact(rec.save(tmp_path / "worse"))
    both = gate(worse, cur, ds, metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr",
                ope_cfg=ope, require_trusted=False)  # fmt: skip
    alone = gate(worse, cur, ds, metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr",
                 ope_cfg=ope, use_metric=False, require_trusted=False)  # fmt: skip
    low = alone.ope["paired"]["differences"]["dr"]["low"]
    assert alone.promote is (low >= 0)  # the metric no longer counts
    assert both.promote is (alone.promote and both.candidate["ndcg@5"] >= both.baseline["ndcg@5"])
    # without a current model the metric still decides (there is no OPE then)
    first = gate(cur, None, ds, metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr",
                 ope_cfg=ope, use_metric=False)  # fmt: skip
    assert "vs popularity" in first.reason and "(not gating)" not in first.reason


def test_rewarded_training_counts_only_rewarded_rows_as_targets(tmp_path: Path) -> None:
    from recloop.algos.base import DatasetSpec
    from recloop.data.sampler import TransitionSampler
    from recloop.loop.gate import rewarded_training

    ds = _dataset([f"u{i}" for i in range(30)], [f"i{j}" for j in range(12)])
    trained = rewarded_training(ds)
    train = ds.split == TRAIN
    assert ((trained.split == TRAIN) == (train & (ds.reward > 0))).all()
    assert (trained.split[~train] == ds.split[~train]).all()  # the holdout is untouched
    assert trained.n_events == ds.n_events  # ignored rows stay in the sequences
    assert ds.split[train].tolist() == [TRAIN] * int(train.sum())  # input not modified
    # popularity counts clicks, not impressions
    spec = DatasetSpec.from_dataset(trained)
    clicks = np.bincount(ds.item[train & (ds.reward > 0)], minlength=ds.n_items + 1)
    np.testing.assert_array_equal(spec.popularity, clicks.astype(np.float32) * (np.arange(13) > 0))
    # a trainer's sampler sees only the rewarded rows as transitions
    sampler = TransitionSampler(trained, history=3, batch_size=8)
    assert sampler.n_transitions == int((train & (ds.reward > 0)).sum())


def _with_propensity(ds: PreparedDataset, value: float) -> PreparedDataset:
    from recloop.data.schema import PROPENSITY

    extra = {**ds.extra, PROPENSITY: np.full(ds.n_events, value)}
    return dataclasses.replace(ds, extra=extra)


def test_untrusted_lists_the_gating_estimates_flags_a_far_mean_weight_and_a_small_ess() -> None:
    from recloop.evaluation.ope import Interval, OPEReport
    from recloop.loop.gate import untrusted

    def report(mean_weight: float, flags: tuple[str, ...], ess: float = 40.0) -> OPEReport:
        return OPEReport(
            split="test", n_events=100, behaviour="logged",
            estimates={"dr": Interval(0.1, -0.2, 0.3, flags), "ips": Interval(0.1, 0.0, 0.2)},
            logged_value=0.1, reward_range=(0.0, 1.0), behaviour_nll=1.0, support=1.0,
            mean_weight=mean_weight, max_weight=3.0, clipped_share=0.0, ess=ess,
            flags=flags + (("mean_weight_far_from_1",) if not 0.5 <= mean_weight <= 2 else ()),
        )  # fmt: skip

    assert untrusted(report(1.0, ()), "dr", min_ess=30) == []
    assert untrusted(report(1.0, ("dr_out_of_range",)), "dr") == ["dr_out_of_range"]
    assert untrusted(report(1.0, ("dr_out_of_range",)), "ips") == []  # another estimate's
    assert untrusted(report(9.68, ()), "ips") == ["mean weight 9.68"]
    assert untrusted(report(0.07, ()), "ips") == ["mean weight 0.07"]
    assert untrusted(report(1.0, (), ess=4.1), "dr", min_ess=30) == ["ESS 4.1 < 30"]
    assert untrusted(report(1.0, (), ess=30.0), "dr", min_ess=30) == []
    assert untrusted(report(1.0, (), ess=29.5), "dr", min_ess=30) == ["ESS 29.5 < 30"]
    assert untrusted(report(1.0, (), ess=4.1), "dr") == []  # no minimum by default
    disagree = dataclasses.replace(
        report(1.0, ()),
        estimates={"dr": Interval(0.45, 0.44, 0.47), "ips": Interval(0.31, 0.30, 0.33)},
        flags=("dr_ips_disagree",),
    )
    assert untrusted(disagree, "dr") == ["DR [0.440, 0.470] vs IPS [0.300, 0.330]"]
    assert untrusted(disagree, "ips") == []  # IPS does not rest on the reward model


def test_dr_and_ips_disagree_only_when_their_intervals_are_disjoint() -> None:
    from recloop.evaluation.ope import Interval, estimators_disagree

    assert estimators_disagree(Interval(0.45, 0.44, 0.47), Interval(0.31, 0.30, 0.33))
    assert estimators_disagree(Interval(0.1, 0.0, 0.2), Interval(0.5, 0.3, 0.7))
    assert not estimators_disagree(Interval(0.45, 0.40, 0.47), Interval(0.35, 0.30, 0.40))
    assert not estimators_disagree(Interval(0.45, 0.44, 0.47), Interval(0.5, 0.2, 0.9))
    # intervals that touch overlap
    assert not estimators_disagree(Interval(0.45, 0.40, 0.47), Interval(0.5, 0.47, 0.6))


def test_the_ope_check_fails_on_a_warning_about_either_model_when_trust_is_required() -> None:
    from recloop.evaluation.ope import Interval
    from recloop.loop.gate import ope_check

    up, down = Interval(0.2, 0.01, 0.5), Interval(0.2, -0.3, 0.5)
    clean: dict[str, list[str]] = {"candidate": [], "current": []}
    only_current = {"candidate": [], "current": ["mean weight 9.68"]}
    only_candidate = {"candidate": ["ESS 4.1 < 30"], "current": []}
    for trusted in (True, False):
        c = ope_check(up, clean, margin=0.0, require_trusted=trusted)
        assert c.passed and c.words == "low >= -0"
        assert not ope_check(down, clean, margin=0.0, require_trusted=trusted).passed
        assert ope_check(down, clean, margin=0.5, require_trusted=trusted).passed
    for warned in (only_current, only_candidate):
        kept = ope_check(up, warned, margin=0.0, require_trusted=True)
        assert not kept.passed and "OPE untrusted: " in kept.words
        told = ope_check(up, warned, margin=0.0, require_trusted=False)
        assert told.passed and "OPE warnings, not gating: " in told.words
        # not gating on the warnings still gates on the interval
        assert not ope_check(down, warned, margin=0.0, require_trusted=False).passed
    assert ope_check(up, only_current, margin=0.0, require_trusted=True).words == (
        "low >= -0; OPE untrusted: current mean weight 9.68"
    )


def test_a_flagged_estimate_fails_the_gate_only_when_trust_is_required(tmp_path: Path) -> None:
    _, cur, base = _current_model(tmp_path)
    ope = OPEConfig(n_boot=50, behaviour="logged")
    # logged propensities of 0.002 for items the target picks with 1/8: weights ~60
    rare = _with_propensity(base, 0.002)
    kw = dict(metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr", ope_cfg=ope, min_ess=0)
    told = gate(cur, cur, rare, require_trusted=False, **kw)  # type: ignore[arg-type]
    assert told.promote, told.reason  # the difference is 0: the warning alone does not count
    assert "OPE warnings, not gating: candidate dr_out_of_range, mean weight 60." in told.reason
    assert told.ope["warnings"]["current"] and not told.ope["require_trusted"]
    kept = gate(cur, cur, rare, **kw)  # type: ignore[arg-type]
    assert kept.ope["require_trusted"]  # the default
    assert not kept.promote
    assert kept.reason.startswith("keep current") and "OPE untrusted: candidate" in kept.reason
    # propensities of 1 with bounds that admit the resulting mean weight: a target that
    # puts 7/8 of its mass on items the log never shows is scored by the reward model there,
    # and DR and IPS disagree
    sure = _with_propensity(base, 1.0)
    wide = dataclasses.replace(ope, mean_weight_bounds=(0.0, 2.0))
    model_only = gate(cur, cur, sure, **{**kw, "ope_cfg": wide})  # type: ignore[arg-type]
    assert not model_only.promote and "candidate DR [" in model_only.reason
    # ... without intervals there is nothing to compare, and nothing to warn
    wide = dataclasses.replace(wide, n_boot=0)
    ok = gate(cur, cur, sure, **{**kw, "ope_cfg": wide})  # type: ignore[arg-type]
    assert ok.promote, ok.reason
    assert ok.ope["warnings"] == {"candidate": [], "current": []}
    assert "untrusted" not in ok.reason and "warnings" not in ok.reason
    # ... but 12 events are not enough for the default minimum ESS
    few = gate(cur, cur, sure, **{**kw, "ope_cfg": wide, "min_ess": 30})  # type: ignore[arg-type]
    assert not few.promote and "current ESS" in few.reason


def test_the_current_model_drops_the_items_it_does_not_know_before_taking_its_history() -> None:
    """As its service does: unknown items leave the window first, then the last H known
    ones are kept, with their rewards, right-aligned."""
    from types import SimpleNamespace

    import torch

    from recloop.data.dataset import PreparedDataset
    from recloop.loop.gate import MappedScorer

    seen: list[tuple[list[int], list[float]]] = []

    def policy(user: Any, history: Any, reward: Any) -> Any:
        seen.append((history[0].tolist(), reward[0].tolist()))
        return torch.zeros(history.shape[0], 4)

    art = SimpleNamespace(
        user_ids=["u1"], item_ids=["a", "b", "c"], policy=policy, history_len=2
    )  # old indices: a 1, b 2, c 3
    ds = PreparedDataset.from_arrays(
        user=np.array([1] * 5), item=np.array([1, 2, 3, 4, 5]), timestamp=np.arange(5),
        user_ids=["u1"], item_ids=["c", "new1", "a", "new2", "b"], n_users=1, n_items=5,
    )  # fmt: skip
    scorer = MappedScorer(art, ds)  # type: ignore[arg-type]
    # a window of dataset items: c, new1, a, new2, b (0 = padding) and their rewards
    window = torch.tensor([[0, 1, 2, 3, 4, 5]])
    rewards = torch.tensor([[0.0, 0.5, 0.9, 0.7, 0.8, 0.3]])
    scorer(torch.tensor([1]), window, rewards)
    assert seen[-1][0] == [1, 2]  # a then b, the last two known
    np.testing.assert_allclose(seen[-1][1], [0.7, 0.3], rtol=1e-6)
    scorer(torch.tensor([1]), window[:, :3], rewards[:, :3])  # c, new1: one known item
    assert seen[-1][0] == [0, 3]
    np.testing.assert_allclose(seen[-1][1], [0.0, 0.5], rtol=1e-6)


def _served_by(cur: Artifact, ds: PreparedDataset, *, version: str) -> PreparedDataset:
    """``ds`` as if ``cur``'s service (not excluding consumed items) had shown each event's
    item in an ε-greedy list of one (ε = 0.5) with the propensity the served target gives
    the current model back: the log of a service whose state the served target rebuilds
    exactly."""
    from recloop.data.schema import (
        EPSILON,
        LIST_LENGTH,
        POLICY_VERSION,
        POSITION,
        PROPENSITY,
        SERVED_POLICY,
        TEMPERATURE,
    )
    from recloop.evaluation.ope import logged_events, policy_terms
    from recloop.loop.gate import MAPPED_WINDOW

    e = ds.n_events
    extra = {
        SERVED_POLICY: np.full(e, "epsilon"),
        POSITION: np.zeros(e, np.int32),
        LIST_LENGTH: np.ones(e, np.int32),
        EPSILON: np.full(e, 0.5),
        TEMPERATURE: np.full(e, np.nan),
        POLICY_VERSION: np.full(e, version),
        PROPENSITY: np.full(e, 0.5),
    }
    ds = dataclasses.replace(ds, extra=extra)
    cfg = OPEConfig(target="served", n_boot=0, mask_consumed=False)
    p = np.full(e, 0.5)
    for split in ("train", "test"):
        events = logged_events(ds, split=split, cfg=cfg)
        h = MAPPED_WINDOW * cur.history_len
        terms = policy_terms(mapped_scorer(cur, ds), ds, events, history=h, cfg=cfg)
        p[events.rows] = terms.p_target
    return dataclasses.replace(ds, extra={**extra, PROPENSITY: p})


def test_the_gate_distrusts_ope_that_does_not_give_the_current_model_its_propensities_back(
    tmp_path: Path,
) -> None:
    """Target ``served``: the current model must get back the propensities of the
    impressions it served.  Where more than ``max_unreproduced`` of them differ, the served
    target scored both models on a context the service did not see, and the current
    model's estimate carries the warning (so the trusted gate keeps it)."""
    from recloop.data.schema import POLICY_VERSION, PROPENSITY

    _, cur, base = _current_model(tmp_path)
    exact = _served_by(cur, base, version=cur.model_version)
    # (its random items repeat: a service that does not exclude what the user saw)
    ope = OPEConfig(target="served", n_boot=50, mask_consumed=False)
    kw = dict(metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr", ope_cfg=ope, min_ess=0)
    ok = gate(cur, cur, exact, **kw)  # type: ignore[arg-type]
    rs = ok.ope["reserve"]
    assert rs["version"] == cur.model_version and rs["impressions"] == 12
    assert rs["mismatched"] == 0 and rs["worst"] < 1e-6
    assert ok.ope["warnings"]["current"] == [] and ok.promote, ok.reason
    # three of the twelve holdout impressions logged with other propensities
    test_rows = np.flatnonzero(exact.split == TEST)
    p = exact.extra[PROPENSITY].copy()
    p[test_rows[[2, 5, 9]]] *= 0.5
    off = dataclasses.replace(exact, extra={**exact.extra, PROPENSITY: p})
    kept = gate(cur, cur, off, **kw)  # type: ignore[arg-type]
    rs = kept.ope["reserve"]
    assert (rs["impressions"], rs["mismatched"], rs["first_row"]) == (12, 3, int(test_rows[2]))
    assert rs["reserved"] == pytest.approx(2 * rs["logged"]) and rs["worst"] == pytest.approx(1.0)
    assert not kept.promote
    assert "3 of its 12 own impressions re-served with other propensities" in kept.reason
    # ... a tolerance above their share lets the gate act on the estimates again
    told = gate(cur, cur, off, **kw, max_unreproduced=0.25)  # type: ignore[arg-type]
    assert told.ope["reserve"]["mismatched"] == 3
    assert not any("re-served" in w for w in told.ope["warnings"]["current"])
    # ... and impressions of another version are not the current model's to give back
    moved = np.isin(np.arange(off.n_events), test_rows[[2, 5, 9]])
    other = np.where(moved, "v0", cur.model_version)
    mixed = dataclasses.replace(off, extra={**off.extra, POLICY_VERSION: other})
    rs = gate(cur, cur, mixed, **kw).ope["reserve"]  # type: ignore[arg-type]
    assert (rs["impressions"], rs["mismatched"]) == (9, 0)
    # no versions logged: nothing to check against
    bare = {k: v for k, v in off.extra.items() if k != POLICY_VERSION}
    none = gate(cur, cur, dataclasses.replace(off, extra=bare), **kw)  # type: ignore[arg-type]
    assert none.ope["reserve"] is None


def test_the_outer_check_reads_what_the_log_cannot_weigh_at_its_worst(tmp_path: Path) -> None:
    """Propensities of 1 for items a model picks with about 1/8: about 7/8 of each model's
    mass is on items the log never shows.  The outer difference values the candidate's at
    the lowest outcome (0) and the current model's at the highest: with no weight clipped,
    it is the IPS difference minus hi x the current model's unweighed mass, so swapping the
    two models changes it.  It gates only with ``bound_bias``, and is reported either way."""
    rec, cur, base = _current_model(tmp_path)
    with torch.no_grad():
        for p in rec.algo.policy.head.parameters():
            p.neg_()
    other = load_artifact(rec.save(tmp_path / "other"))
    sure = _with_propensity(base, 1.0)
    ope = OPEConfig(n_boot=0, behaviour="logged", mean_weight_bounds=(0.0, 2.0))
    kw = dict(
        metric="ndcg@5", margin=0.0, use_ope=True, estimator="dr", ope_cfg=ope, min_ess=0,
        use_metric=False,
    )  # fmt: skip
    ab = gate(other, cur, sure, **kw)  # type: ignore[arg-type]
    ba = gate(cur, other, sure, **kw)  # type: ignore[arg-type]
    for res in (ab, ba):
        cand, cur_ = res.ope["candidate"], res.ope["current"]
        lo, hi = cand["reward_range"]
        assert lo == 0.0 and hi > 0
        for r in (cand, cur_):  # w <= 1: nothing clipped, the mass is what the mean lacks
            assert r["unweighed_mass"] == pytest.approx(1 - r["mean_weight"])
            assert 0.5 < r["unweighed_mass"] < 1.0
        ips = res.ope["paired"]["differences"]["ips"]["value"]
        assert res.ope["outer"]["value"] == pytest.approx(ips - hi * cur_["unweighed_mass"])
        assert res.ope["outer_low"] == res.ope["outer"]["low"] < 0
        assert not res.ope["bound_bias"] and res.reason.endswith("< -0 (not gating)")
    m_a, m_b = ab.ope["candidate"]["unweighed_mass"], ab.ope["current"]["unweighed_mass"]
    hi = ab.ope["candidate"]["reward_range"][1]
    assert ab.ope["outer"]["value"] + ba.ope["outer"]["value"] == pytest.approx(-hi * (m_a + m_b))
    same = gate(cur, cur, sure, **kw)  # type: ignore[arg-type]
    assert same.promote, same.reason  # the DR difference is 0 and the outer check not gating
    kept = gate(cur, cur, sure, bound_bias=True, **kw)  # type: ignore[arg-type]
    assert not kept.promote and kept.ope["bound_bias"]
    assert kept.reason.endswith(f"outer low {kept.ope['outer_low']:+.4f} < -0")
    assert kept.reason.startswith("keep current")
    # a margin as wide as the outer gap lets it through
    wide = {**kw, "margin": -kept.ope["outer_low"] + 0.01}
    assert gate(cur, cur, sure, bound_bias=True, **wide).promote  # type: ignore[arg-type]


def test_the_outer_check_gates_on_the_outer_interval_only_when_asked() -> None:
    from recloop.evaluation.ope import Interval
    from recloop.loop.gate import ope_check

    clean: dict[str, list[str]] = {"candidate": [], "current": []}
    up = Interval(0.2, 0.05, 0.5)
    fine, short = Interval(0.1, 0.01, 0.2), Interval(0.1, -0.01, 0.2)
    assert ope_check(
        up, clean, margin=0.0, require_trusted=True, outer=fine, bound_bias=True
    ).passed
    c = ope_check(up, clean, margin=0.0, require_trusted=True, outer=short, bound_bias=True)
    assert not c.passed and c.words == "low >= -0; outer low -0.0100 < -0"
    assert ope_check(
        up, clean, margin=0.02, require_trusted=True, outer=short, bound_bias=True
    ).passed
    told = ope_check(up, clean, margin=0.0, require_trusted=True, outer=short)
    assert told.passed and told.words.endswith("< -0 (not gating)")
    # the inner interval still gates on its own
    down = Interval(0.2, -0.01, 0.5)
    assert not ope_check(
        down, clean, margin=0.0, require_trusted=True, outer=fine, bound_bias=True
    ).passed


def test_an_outer_interval_on_fitted_propensities_never_passes_the_outer_check() -> None:
    """Its low end may be far above 0 (a mean weight of 4.6 gave +9.8 on rewards in [1, 5]):
    with bound_bias it fails whatever it says, and the reason says why."""
    from recloop.evaluation.ope import OUTER_NOT_LOGGED, Interval
    from recloop.loop.gate import ope_check

    diff = Interval(0.1, 0.05, 0.15)
    high = Interval(15.5, 9.8, 20.0, (OUTER_NOT_LOGGED,))
    on = ope_check(diff, {}, margin=0.0, require_trusted=True, outer=high, bound_bias=True)
    assert not on.passed and "outer check needs logged propensities" in on.words
    assert "9.8" not in on.words
    off = ope_check(diff, {}, margin=0.0, require_trusted=True, outer=high, bound_bias=False)
    assert off.passed and "(not gating)" in off.words
    fine = ope_check(
        diff, {}, margin=0.0, require_trusted=True, outer=Interval(0.1, 0.0, 0.2), bound_bias=True
    )
    assert fine.passed and "outer low +0.0000 >= -0" in fine.words
