"""Checkpoints: safe loading, RNG state, and resuming equals training straight through."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.algos.base import AlgoConfig
from recloop.algos.critics import QLearningConfig
from recloop.algos.dqn import DQNConfig
from recloop.algos.reinforce import ReinforceConfig
from recloop.algos.td3 import TD3Config
from recloop.data.dataset import PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ArtifactError, ConfigError
from recloop.training.checkpoint import (
    FitProgress,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from recloop.training.fit import FitConfig

CFG = ReinforceConfig(
    encoder=EncoderConfig(kind="gru", history=3, embedding_dim=8, hidden_dim=8, dropout=0.1),
    batch_size=16,
)
QUIET = {"progress": False, "tensorboard": False, "patience": None}


def test_rng_state_round_trip() -> None:
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3))
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_checkpoint_holds_only_plain_data(tmp_path: Path, tiny_dataset: PreparedDataset) -> None:
    algo = CFG.create().build(tiny_dataset, device="cpu")
    progress = FitProgress(epoch=2, step=10, transitions=160, best_metric=0.5, best_epoch=1)
    path = save_checkpoint(
        tmp_path, algo_state=algo.state_dict(), progress=progress, config={"a": 1}
    )
    raw = torch.load(path, weights_only=True)  # refuses anything but tensors and containers
    assert raw["progress"]["step"] == 10
    ck = load_checkpoint(tmp_path)
    assert ck.progress == progress and ck.config == {"a": 1} and ck.best_networks is None
    assert set(ck.algo_state["networks"]) == {"policy", "beta"}


def test_unreadable_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)


SMALL = EncoderConfig(kind="mean", history=3, embedding_dim=8)
# Schedules of 5 updates against 6 updates an epoch: a step counter that restarted at the
# resume would move the delayed actor / target updates to other steps.
SCHEDULED: dict[str, AlgoConfig] = {
    "reinforce": CFG,
    "td3": TD3Config(encoder=SMALL, batch_size=16, policy_delay=5),
    "dqn": DQNConfig(
        encoder=SMALL,
        batch_size=16,
        critic=QLearningConfig(target_update_interval=5, tau=1.0),
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULED))
def test_resume_matches_an_uninterrupted_run(
    name: str, tiny_dataset: PreparedDataset, tmp_path: Path
) -> None:
    cfg = SCHEDULED[name]
    straight = cfg.create()
    straight.fit(tiny_dataset, fit=FitConfig(epochs=4, **QUIET), run_dir=tmp_path / "a")

    first = cfg.create()
    first.fit(tiny_dataset, fit=FitConfig(epochs=2, **QUIET), run_dir=tmp_path / "b")
    torch.manual_seed(123)  # resuming must restore the RNG, whatever happened since
    resumed = cfg.create()
    result = resumed.fit(
        tiny_dataset, fit=FitConfig(epochs=4, **QUIET), run_dir=tmp_path / "b", resume=True
    )
    assert result.epochs == 4 and result.steps == 4 * 6
    for (name, a), b in zip(
        straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]


def test_resume_refuses_another_config(tiny_dataset: PreparedDataset, tmp_path: Path) -> None:
    CFG.create().fit(tiny_dataset, fit=FitConfig(epochs=1, **QUIET), run_dir=tmp_path)
    other = ReinforceConfig(encoder=CFG.encoder, batch_size=16, top_k=3)
    with pytest.raises(ConfigError, match="field 'top_k' was 10, now 3"):
        other.create().fit(
            tiny_dataset, fit=FitConfig(epochs=2, **QUIET), run_dir=tmp_path, resume=True
        )


def test_a_run_saved_before_a_config_field_was_added_resumes(
    tiny_dataset: PreparedDataset, tmp_path: Path
) -> None:
    """A checkpoint written by an older version lacks the fields added since: they take
    their defaults, so it resumes; a field it has that no longer exists still refuses."""
    CFG.create().fit(tiny_dataset, fit=FitConfig(epochs=1, **QUIET), run_dir=tmp_path)
    path = tmp_path / "checkpoint" / "last.pt"
    obj = torch.load(path, weights_only=True)
    del obj["config"]["ce_epochs"]  # as saved before ce_epochs existed
    torch.save(obj, path)
    result = CFG.create().fit(
        tiny_dataset, fit=FitConfig(epochs=2, **QUIET), run_dir=tmp_path, resume=True
    )
    assert result.epochs == 2
    obj = torch.load(path, weights_only=True)
    obj["config"]["retired_field"] = 1
    torch.save(obj, path)
    with pytest.raises(ConfigError, match="field 'retired_field' was 1, now None"):
        CFG.create().fit(
            tiny_dataset, fit=FitConfig(epochs=3, **QUIET), run_dir=tmp_path, resume=True
        )
