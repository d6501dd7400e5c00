"""Run configs: YAML layout (flat or sections), --set overrides, errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from recloop.algos.reinforce import ReinforceConfig
from recloop.algos.supervised import SupervisedConfig
from recloop.errors import ConfigError
from recloop.training.runconfig import load_run_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_flat_file_with_fit_section_and_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "algo: reinforce\nlr: 0.01\nencoder: {kind: mean, history: 5}\nfit: {epochs: 3}\n",
    )
    run = load_run_config(None, path=path, overrides=["top_k=4", "fit.patience=2"])
    assert run.algo == "reinforce"
    assert isinstance(run.config, ReinforceConfig)
    assert run.config.lr == 0.01 and run.config.top_k == 4
    assert run.config.encoder.kind == "mean" and run.config.encoder.history == 5
    assert run.fit.epochs == 3 and run.fit.patience == 2


def test_algo_section_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "algo: {lr: 0.5}\nbatch_size: 7\n")
    run = load_run_config("supervised", path=path)
    assert isinstance(run.config, SupervisedConfig)
    assert run.config.lr == 0.5 and run.config.batch_size == 7


def test_values_sit_between_file_and_set(tmp_path: Path) -> None:
    path = write(tmp_path, "fit: {epochs: 3, device: cpu}\n")
    run = load_run_config(
        "supervised",
        path=path,
        values={"fit": {"epochs": 5, "device": None}},
        overrides=["fit.epochs=9"],
    )
    assert run.fit.epochs == 9 and run.fit.device == "cpu"
    run = load_run_config("supervised", path=path, values={"fit": {"epochs": 5}})
    assert run.fit.epochs == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lr2=0.1"], r"unknown field 'lr2' for ReinforceConfig \(did you mean lr"),
        (["lr=fast"], "field 'lr' expects float"),
        (["top_k=0"], "top_k must be >= 1"),
        (["encoder.kind=lstmm"], None),
        (["fit.epoch=3"], "unknown field 'epoch' for FitConfig"),
        (["fit.metric=auc@10"], "fit.metric must be NAME@K"),
        (["fit=3"], "field 'fit' must be a mapping"),
    ],
)
def test_errors_name_the_field(overrides: list[str], message: str | None) -> None:
    if message is None:  # an unknown encoder kind fails when the networks are built
        run = load_run_config("reinforce", overrides=overrides)
        assert run.config.encoder.kind == "lstmm"
        return
    with pytest.raises(ConfigError, match=message):
        load_run_config("reinforce", overrides=overrides)


def test_algorithm_name_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no algorithm given"):
        load_run_config(None)
    with pytest.raises(ConfigError, match="unknown algorithm 'ppo'"):
        load_run_config("ppo")
    path = write(tmp_path, "algo: supervised\n")
    with pytest.raises(ConfigError, match="field 'algo' is 'supervised' but --algo is 'reinforce'"):
        load_run_config("reinforce", path=path)


def test_nested_overrides_keep_the_algorithms_defaults() -> None:
    default = ReinforceConfig().encoder
    run = load_run_config("reinforce", overrides=["encoder.kind=mean"])
    assert run.config.encoder.kind == "mean"
    assert run.config.encoder.history == default.history
    assert run.config.encoder.embedding_dim == default.embedding_dim
    assert run.config.encoder.dropout == default.dropout
    with pytest.raises(ConfigError, match=r"unknown field 'encoder\.kindd'"):
        load_run_config("reinforce", overrides=["encoder.kindd=mean"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=inf", r"^--set: lr must be finite, got inf$"),
        ("lr=nan", r"^--set: lr must be finite, got nan$"),
        ("encoder.dropout=.nan", r"^--set: encoder\.dropout must be finite, got nan$"),
        ("fit.min_delta=-.inf", r"^--set \(fit section\): min_delta must be finite, got -inf$"),
    ],
)
def test_non_finite_hyper_parameters_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_run_config("supervised", overrides=[override])


def test_non_finite_value_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "algo: reinforce\nweight_cap: .inf\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: weight_cap must be finite, got inf"):
        load_run_config(None, path=path)


def test_algorithm_fit_defaults_apply_under_the_users_settings() -> None:
    """gru4rec was tuned with up to 40 epochs and patience 5: those are its defaults, and a
    run's own fit settings still win."""
    run = load_run_config("gru4rec")
    assert (run.fit.epochs, run.fit.patience) == (40, 5)
    run = load_run_config("gru4rec", overrides=["fit.epochs=3"])
    assert (run.fit.epochs, run.fit.patience) == (3, 5)
    assert load_run_config("supervised").fit.epochs == 8
