"""``recloop train --track tensorboard|mlflow``: what a run logs, read back from TensorBoard's
event files and from a local MLflow file store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recloop.cli import main
from recloop.data.dataset import PreparedDataset
from recloop.errors import ConfigError
from recloop.training.tracking import mlflow_key, open_trackers

FAST = [
    "--set", "encoder.kind=mean",
    "--set", "encoder.history=3",
    "--set", "encoder.embedding_dim=8",
    "--set", "batch_size=16",
    "--set", "lr=0.01",
]  # fmt: skip
EPOCHS = 3


@pytest.fixture
def data_dir(tiny_dataset: PreparedDataset, tmp_path: Path) -> Path:
    return tiny_dataset.save(tmp_path / "data")


def _train(data_dir: Path, out: Path, *extra: str) -> int:
    argv = ["--no-progress", "-q", "train", "--algo", "supervised", "--data", str(data_dir)]
    argv += ["--out", str(out), "--epochs", str(EPOCHS), *FAST, *extra]
    return main(argv)


def test_mlflow_keys_lose_the_at_sign() -> None:
    assert mlflow_key("valid/ndcg@10") == "valid/ndcg_at_10"
    assert mlflow_key("encoder.kind") == "encoder.kind"
    assert mlflow_key("a b:c-d/e") == "a b:c-d/e"
    assert mlflow_key("x[0]") == "x_0_"


def test_unknown_tracker_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--track 'wandb'"):
        open_trackers(["wandb"], run_dir=tmp_path)


def test_tensorboard_run_reads_back(data_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    assert _train(data_dir, run, "--track", "tensorboard", "--set", "fit.tensorboard=false") == 0
    results = json.loads((run / "results.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    # per-epoch metrics, even with fit.tensorboard off in the config: --track turns it on
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, EPOCHS + 1))
    assert [e.value for e in loss] == pytest.approx([h["train"]["loss"] for h in history])
    ndcg = acc.Scalars("valid/ndcg@10")
    assert [e.value for e in ndcg] == pytest.approx([h["valid"]["ndcg@10"] for h in history])
    # the evaluation table and the artifact, as text
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}
    table = texts["evaluation/text_summary"][-1].tensor_proto.string_val[0].decode()
    cells = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ")
    ]
    header, rows = cells[0], {r[0]: dict(zip(cells[0], r, strict=True)) for r in cells[1:]}
    assert header[0] == "split" and set(rows) == {"valid", "test"}
    for split in ("valid", "test"):
        for metric, value in results[split].items():
            assert rows[split][metric] == f"{value:.4f}"
    artifact_text = texts["artifact/text_summary"][-1].tensor_proto.string_val[0].decode()
    assert str(run / "artifact") in artifact_text and '"format_version"' in artifact_text

    # hyper-parameters with the final metrics (the HPARAMS plugin's records)
    hp = EventAccumulator(str(run / "tensorboard"))
    hp.Reload()
    content = hp.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    assert session.hparams["algo"].string_value == "supervised"
    assert session.hparams["lr"].number_value == pytest.approx(0.01)
    assert session.hparams["fit.epochs"].number_value == EPOCHS
    final = acc.Scalars("final/test/ndcg@10")
    assert final[-1].value == pytest.approx(results["test"]["ndcg@10"])


def test_mlflow_run_reads_back(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    uri = store.resolve().as_uri()
    run = tmp_path / "run"
    code = _train(
        data_dir, run, "--track", "mlflow", "--mlflow-uri", uri, "--mlflow-experiment", "t"
    )
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((run / "results.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t")
    assert exp is not None
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_id in out  # the CLI says where the run went
    assert found.info.status == "FINISHED"
    assert found.data.tags["recloop.algo"] == "supervised"
    params = found.data.params
    assert params["algo"] == "supervised" and params["fit.epochs"] == str(EPOCHS)
    assert params["lr"] == "0.01" and params["encoder.kind"] == "mean"

    steps = client.get_metric_history(found.info.run_id, "valid/ndcg_at_10")
    assert [m.step for m in sorted(steps, key=lambda m: m.step)] == list(range(1, EPOCHS + 1))
    assert [m.value for m in sorted(steps, key=lambda m: m.step)] == pytest.approx(
        [h["valid"]["ndcg@10"] for h in history]
    )
    assert found.data.metrics["final/test/hr_at_10"] == pytest.approx(results["test"]["hr@10"])

    files = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"artifact", "evaluation.md", "results.json", "run.json"} <= files
    inside = {a.path for a in client.list_artifacts(found.info.run_id, "artifact")}
    assert "artifact/manifest.json" in inside
    local = Path(client.download_artifacts(found.info.run_id, "evaluation.md", str(tmp_path)))
    assert f"{results['test']['ndcg@10']:.4f}" in local.read_text()


def test_a_failed_run_is_marked_failed(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    import recloop.training.recommender as recommender

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the GPU caught fire")

    monkeypatch.setattr(recommender, "fit_loop", broken)
    uri = (tmp_path / "mlruns").resolve().as_uri()
    with pytest.raises(RuntimeError, match="caught fire"):
        _train(data_dir, tmp_path / "run", "--track", "mlflow", "--mlflow-uri", uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("recloop")
    assert exp is not None
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.status == "FAILED"
    assert found.data.tags["error"] == "RuntimeError: the GPU caught fire"
