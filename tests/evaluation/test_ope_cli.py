"""``recloop evaluate RUN_A RUN_B --ope``: one beta for both runs and their paired difference."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, save_artifact
from recloop.cli import main
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.encoders.base import EncoderConfig


def _data(n_users: int = 12, n_items: int = 10, length: int = 8) -> PreparedDataset:
    """User u walks items s_u, s_u + 1, ...; the last event is test, the one before valid;
    rewards cycle through 1, 2, 3."""
    t = np.arange(length)
    start = np.arange(n_users) % n_items
    return PreparedDataset.from_arrays(
        user=np.repeat(np.arange(1, n_users + 1), length),
        item=((start[:, None] + t[None, :]) % n_items + 1).ravel(),
        timestamp=np.tile(t, n_users),
        reward=(1.0 + (np.arange(n_users)[:, None] + t[None, :]) % 3).ravel(),
        split=np.tile(
            np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN)), n_users
        ),
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"m{i}" for i in range(1, n_items + 1)],
    )


def _save(run: Path, ds: PreparedDataset, seed: int) -> None:
    torch.manual_seed(seed)
    spec = PolicySpec(
        n_users=ds.n_users,
        n_items=ds.n_items,
        encoder=EncoderConfig(kind="mean", history=3 + seed, embedding_dim=8),
        head=HeadConfig(),
    )
    save_artifact(
        run / "artifact", algo="supervised", config={}, policy=PolicyNet(spec).eval(),
        popularity=np.zeros(ds.n_items + 1, np.float32), user_ids=ds.user_ids,
        item_ids=ds.item_ids,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ope_cli")
    ds = _data()
    _save(base / "a", ds, seed=0)  # the two runs have different history lengths (3 and 4)
    _save(base / "b", ds, seed=1)
    rng = np.random.default_rng(0)
    logged = replace(ds, extra={"propensity": rng.uniform(0.05, 0.5, ds.n_events)})
    return {
        "a": base / "a",
        "b": base / "b",
        "data": ds.save(base / "data"),
        "logged": logged.save(base / "logged"),
    }


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["--no-progress", "-q", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


FAST = ["--ope-set", "n_boot=50", "--ope-set", "behaviour_epochs=1"]


@pytest.mark.parametrize(("data", "source"), [("data", "fitted"), ("logged", "logged")])
def test_two_runs_share_one_beta_and_are_paired(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], data: str, source: str
) -> None:
    a, b = setup["a"], setup["b"]
    code, out, err = run(capsys, "evaluate", a, b, "--data", setup[data], "--ope", "--json", *FAST)
    assert code == 0, err
    doc = json.loads(out)
    reps = [r["ope"] for r in doc["runs"]]
    assert [r["behaviour"] for r in reps] == [source, source]
    assert reps[0]["behaviour_nll"] == reps[1]["behaviour_nll"]  # the same beta
    assert reps[0]["reward_range"] == [1.0, 3.0]
    assert all(isinstance(r["flags"], list) for r in reps)
    (diff,) = doc["paired"]
    assert (diff["run"], diff["baseline"]) == (str(b), str(a))
    assert diff["behaviour"] == source and diff["n_events"] == 12
    for k in ("ips", "snips", "dr"):
        d = diff["differences"][k]
        expected = reps[1]["estimates"][k]["value"] - reps[0]["estimates"][k]["value"]
        assert d["value"] == pytest.approx(expected, abs=1e-9)
        assert d["excludes_zero"] == (d["low"] > 0 or d["high"] < 0)


def test_text_table_prints_the_paired_section(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "evaluate", setup["a"], setup["b"], "--data", setup["logged"], "--ope", *FAST
    )
    assert code == 0, err
    assert "mean w" in out and "IPS - first" in out and "paired bootstrap" in out
    # Random propensities are not the logging policy's: the mean weight says so.
    assert "mean importance weight" in err or "leaves the logged reward range" in err


def test_beta_head_is_refused_for_several_runs(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "evaluate", setup["a"], setup["b"], "--data", setup["data"], "--ope",
        "--ope-set", "behaviour=beta_head",
    )  # fmt: skip
    assert code == 2
    assert "not be comparable" in err
