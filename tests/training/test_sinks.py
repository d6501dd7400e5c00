"""Metric sinks and device selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recloop.errors import ConfigError
from recloop.training.device import resolve_device
from recloop.training.sinks import JsonlSink, flatten, open_sinks, tensorboard_available


def test_jsonl_sink_appends_one_object_per_line(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "m.jsonl")
    sink.write({"epoch": 1, "valid": {"hr@10": 0.5}})
    sink.close()
    sink = JsonlSink(tmp_path / "m.jsonl")
    sink.write({"epoch": 2})
    sink.close()
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": 1, "valid": {"hr@10": 0.5}}, {"epoch": 2}]


def test_flatten() -> None:
    rec = {"epoch": 3, "best": True, "train": {"loss": 1.5}, "valid": {"hr@10": 0.25}, "x": "s"}
    assert flatten(rec) == {"epoch": 3.0, "train/loss": 1.5, "valid/hr@10": 0.25}


def test_open_sinks(tmp_path: Path) -> None:
    sinks = open_sinks(tmp_path, tensorboard=True)
    assert len(sinks) == (2 if tensorboard_available() else 1)
    for s in sinks:
        s.write({"epoch": 1, "train": {"loss": 1.0}})
        s.close()
    assert (tmp_path / "metrics.jsonl").is_file()


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
