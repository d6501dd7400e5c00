"""``recloop prepare``, ``recloop data synth`` and ``recloop demo`` through the entry point."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from recloop.cli import main
from recloop.data.dataset import PreparedDataset


def _run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    doc = json.loads(out.out)
    assert isinstance(doc, dict)
    return doc


def test_prepare_movielens_100k_reports_the_reference_counts(
    ml100k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _run_json(
        capsys,
        [
            "prepare",
            "--format",
            "recbole",
            "--input",
            str(ml100k_dir),
            "--split",
            "loo",
            "--output",
            str(tmp_path / "ml"),
            "--json",
        ],
    )
    assert (doc["n_users"], doc["n_items"], doc["n_events"]) == (943, 1682, 100_000)
    # Temporal leave-one-out: every user (all have >= 20 ratings) gives one valid, one test.
    assert doc["splits"] == {"train": 100_000 - 2 * 943, "valid": 943, "test": 943}
    ds = PreparedDataset.load(tmp_path / "ml")
    assert ds.n_events == 100_000 and ds.manifest["config"]["split"]["mode"] == "loo"
    # The manifest names the exact raw files it came from.
    inputs = ds.manifest["inputs"]
    inter = ml100k_dir / "ml-100k.inter"
    assert inputs["ml-100k.inter"] == {
        "bytes": inter.stat().st_size,
        "sha256": hashlib.sha256(inter.read_bytes()).hexdigest(),
    }
    assert {"ml-100k.user", "ml-100k.item"} <= set(inputs)


def test_readable_summary(
    ml100k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "prepare",
            "--format",
            "recbole",
            "--input",
            str(ml100k_dir),
            "--split",
            "ratio",
            "--output",
            str(tmp_path / "ml"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "users 943" in out and "items 1,682" in out and "events 100,000" in out
    assert "split (ratio)" in out


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    path = tmp_path / "events.csv"
    path.write_text(
        "user,item,timestamp,behavior\n"
        "1,10,100,pv\n1,11,200,cart\n1,10,300,buy\n2,10,50,pv\n2,12,60,pv\n2,12,60,pv\n"
    )
    return path


def test_config_file_and_set_overrides(
    tiny_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("gamma: 0.5\nsplit:\n  mode: loo\nreward:\n  behavior:\n    buy: 10\n")
    out = tmp_path / "out"
    doc = _run_json(
        capsys,
        [
            "prepare",
            "--format",
            "csv",
            "--input",
            str(tiny_csv),
            "--output",
            str(out),
            "--config",
            str(cfg),
            "--set",
            "sessions.mode=user",
            "--json",
        ],
    )
    assert (doc["n_users"], doc["n_items"], doc["n_events"]) == (2, 3, 5)  # one duplicate gone
    assert doc["split_mode"] == "loo"
    ds = PreparedDataset.load(out)
    assert ds.manifest["config"]["gamma"] == 0.5
    assert ds.manifest["config"]["sessions"]["mode"] == "user"
    # User "1" (3 events, one of them in train) pv 1, cart 2, buy 10: one session per user,
    # but under loo each event is in its own split, and no return reaches into the next one.
    # User "2" (2 events, both train) ranks first by TRAIN events.
    assert ds.user_ids == ["2", "1"]
    lo, hi = ds.user_offsets[2], ds.user_offsets[3]
    assert ds.reward[lo:hi].tolist() == [1.0, 2.0, 10.0]
    assert ds.split[lo:hi].tolist() == [0, 1, 2]
    assert ds.returns[lo:hi].tolist() == [1.0, 2.0, 10.0]
    assert ds.returns[:lo].tolist() == [1.0 + 0.5 * 1.0, 1.0]  # user "2": pv, pv in one session


def test_split_flag_beats_the_config_file_and_set_beats_both(
    tiny_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("split:\n  mode: loo\n")
    doc = _run_json(
        capsys,
        [
            "prepare",
            "--format",
            "csv",
            "--input",
            str(tiny_csv),
            "--output",
            str(tmp_path / "o"),
            "--config",
            str(cfg),
            "--split",
            "time",
            "--json",
        ],
    )
    assert doc["split_mode"] == "time"
    doc = _run_json(
        capsys,
        [
            "prepare",
            "--format",
            "csv",
            "--input",
            str(tiny_csv),
            "--output",
            str(tmp_path / "o"),
            "--split",
            "time",
            "--set",
            "split.mode=ratio",
            "--json",
        ],
    )
    assert doc["split_mode"] == "ratio"


def test_bad_field_name_fails_before_reading_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("filters:\n  min_user_event: 5\n")
    missing = tmp_path / "does-not-exist"
    code = main(
        [
            "prepare",
            "--format",
            "csv",
            "--input",
            str(missing),
            "--output",
            str(tmp_path / "o"),
            "--config",
            str(cfg),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown field 'filters.min_user_event'" in err and "min_user_events" in err
    assert "does-not-exist" not in err
    code = main(
        [
            "prepare",
            "--format",
            "csv",
            "--input",
            str(missing),
            "--output",
            str(tmp_path / "o"),
            "--set",
            "gama=0.3",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "unknown field 'gama'" in err and "gamma" in err
    code = main(
        [
            "prepare",
            "--format",
            "csv",
            "--input",
            str(missing),
            "--output",
            str(tmp_path / "o"),
            "--split",
            "random",
        ]
    )
    assert code == 2 and "split.mode" in capsys.readouterr().err


def test_unknown_format_is_named(
    tiny_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["prepare", "--format", "xlsx", "--input", str(tiny_csv), "--output", str(tmp_path / "o")]
    )
    assert code == 2 and "xlsx" in capsys.readouterr().err


def test_skip_bad_rows_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user,item,timestamp\n1,10,100\n1,11,oops\n2,10,50\n")
    out = tmp_path / "o"
    code = main(["prepare", "--format", "csv", "--input", str(path), "--output", str(out)])
    assert code == 2 and "oops" in capsys.readouterr().err
    doc = _run_json(
        capsys,
        [
            "prepare",
            "--format",
            "csv",
            "--input",
            str(path),
            "--output",
            str(out),
            "--skip-bad-rows",
            "--json",
        ],
    )
    assert doc["n_events"] == 2 and doc["skipped_bad_rows"] == 1


def test_synth_then_prepare_tianchi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _run_json(
        capsys,
        [
            "data",
            "synth",
            "--events",
            "5000",
            "--seed",
            "1",
            "--users",
            "50",
            "--items",
            "400",
            "--output",
            str(tmp_path / "raw"),
            "--json",
        ],
    )
    assert doc["n_events"] == 5000 and doc["n_users"] == 50
    assert sum(doc["behaviors"].values()) == 5000  # type: ignore[attr-defined]
    prepared = _run_json(
        capsys,
        [
            "prepare",
            "--format",
            "tianchi",
            "--input",
            str(tmp_path / "raw"),
            "--split",
            "ratio",
            "--output",
            str(tmp_path / "prep"),
            "--json",
        ],
    )
    steps = prepared["steps"]
    assert isinstance(steps, list) and steps[0]["events"] == 5000
    assert prepared["n_events"] == 5000 - steps[1]["removed_events"]
    ds = PreparedDataset.load(tmp_path / "prep")
    assert ds.user_features is not None and ds.user_features.columns == [
        "user",
        "sex",
        "age",
        "pur_power",
    ]
    assert set(ds.extra["behavior"].tolist()) == {1, 2, 3, 4}


@pytest.mark.slow
def test_demo_runs_the_whole_loop(
    ml100k_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECLOOP_ML100K", str(ml100k_dir))
    doc = _run_json(
        capsys, ["demo", "--workdir", str(tmp_path / "demo"), "--epochs", "1", "--json"]
    )
    prepared = doc["prepare"]
    assert isinstance(prepared, dict)
    assert (prepared["n_users"], prepared["n_items"], prepared["n_events"]) == (943, 1682, 100_000)
    assert prepared["splits"]["test"] == 943
    assert (tmp_path / "demo" / "data" / "manifest.json").is_file()
    pretrain = doc["pretrain"]
    assert isinstance(pretrain, dict)
    assert pretrain["valid_auc"] > 0.7
    ev = doc["evaluate"]
    assert isinstance(ev, dict)
    # train-count popularity; which of the items tied at the 10th count is shown follows the
    # hashed tie-break (0.0838 with a lowest-index tie-break)
    assert ev["popularity"]["hr@10"] == pytest.approx(0.0859, abs=1e-4)
    assert ev["supervised"]["hr@10"] > ev["popularity"]["hr@10"]
    # One epoch of REINFORCE is not enough to pass popularity since returns stopped at the
    # split; it must still be far above the random level (10 / 1682 = 0.006).
    assert ev["reinforce"]["hr@10"] > 5 * 10 / 1682
    assert (tmp_path / "demo" / "runs" / "reinforce" / "artifact" / "manifest.json").is_file()
    loop = doc["loop"]
    assert isinstance(loop, dict)
    # one round: the first model is promoted if it beats popularity, else published only
    assert loop["status"] in ("promoted", "published") and loop["version"]
    assert (tmp_path / "demo" / "registry" / "versions" / loop["version"]).is_dir()
    online = doc["online"]
    assert isinstance(online, dict)
    assert online["events_sent"] == 100_000
    assert online["stream"]["logged"] == 100_000
    assert online["stream"]["dead_letters"] == 0
    reply = online["request"]["response"]
    assert reply["source"] == "policy"
    assert len(reply["items"]) == 5
    assert online["next_dataset"]["n_events"] == 100_000
    report = doc["report"]
    assert isinstance(report, dict)
    # everything above in one self-contained page: small, and every section drawn
    assert Path(report["path"]).is_file() and report["bytes"] < 10_000_000
    assert report["charts"] >= 20


def test_prepare_from_db_reads_the_behaviour_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import polars as pl

    from recloop.streaming.events import EVENT_SCHEMA
    from recloop.streaming.log import BehaviorLog

    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = BehaviorLog(url)
    rows = [
        (f"e{u}-{t}", str(u), str(100 + (u * t) % 7), 1000 * t, "pv", None, 1.0)
        for u in range(1, 4)
        for t in range(1, 5)
    ]
    log.append(pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row"), slide_s=80)
    log.append(pl.DataFrame(rows[:3], schema=EVENT_SCHEMA, orient="row"), slide_s=80)  # redelivery
    log.dispose()
    out = _run_json(
        capsys,
        ["prepare", "--from-db", url, "--split", "loo", "--output", str(tmp_path / "p"), "--json"],
    )
    assert out["n_events"] == 12
    assert out["n_users"] == 3
    assert out["splits"] == {"train": 6, "valid": 3, "test": 3}


def test_from_db_and_input_are_exclusive(tmp_path: Path) -> None:
    code = main(["prepare", "--from-db", "sqlite://", "-f", "csv", "-i", str(tmp_path), "-o", "x"])
    assert code == 2
