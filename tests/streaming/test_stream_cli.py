"""``recloop stream`` and ``recloop replay`` through the real entry point."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from recloop.cli import main
from recloop.streaming.bus import RedisStreamBus
from recloop.streaming.buses import open_bus
from recloop.streaming.log import BehaviorLog


def test_stream_with_in_process_replay_logs_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_dataset: Any, names: dict[str, str]
) -> None:
    make_dataset(200).save(tmp_path / "ds")
    db = f"sqlite:///{tmp_path / 'log.db'}"
    code = main(
        [
            "--no-progress", "stream", "--replay", str(tmp_path / "ds"),
            "--bus-url", f"memory://{names['stream']}", "--store-url", "memory://",
            "--database-url", db, "--batch-size", "64", "--exit-when-idle", "0.3", "--json",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    stats = json.loads(out)
    assert stats["logged"] == 200 and stats["dead_letters"] == 0 and stats["batches"] >= 4
    assert BehaviorLog(db).count() == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "DS", "--bus-url", "memory://"], "memory:// lives in one process"),
        (["stream", "--workers", "2", "--bus-url", "memory://"], "needs a shared bus"),
        (["stream", "--window", "100", "--slide", "80"], "window_s (100) must be a multiple"),
        (["stream", "--bus-url", "amqp://x", "--exit-when-idle", "0.1"], "unsupported scheme"),
        (["stream", "--bus-url", "kafka://h:1/a:b", "--exit-when-idle", "0.1"], "topic 'a:b'"),
        (
            [
                "replay",
                "DS",
                "--bus-url",
                "redis://127.0.0.1:6379/0",
                "--rate",
                "5",
                "--speed",
                "2",
            ],
            "not both",
        ),
        (["replay", "nowhere", "--bus-url", "redis://127.0.0.1:6379/0"], "not a prepared dataset"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_dataset: Any,
    args: list[str],
    message: str,
) -> None:
    make_dataset(5).save(tmp_path / "DS")
    args = [str(tmp_path / a) if a in ("DS", "nowhere") else a for a in args]
    db = ["--database-url", f"sqlite:///{tmp_path / 'x.db'}"] if args[0] == "stream" else []
    assert main([*args, *db]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


@pytest.mark.integration
def test_replay_command_publishes_to_redis(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_dataset: Any,
    names: dict[str, str],
    redis_url: str,
) -> None:
    make_dataset(150).save(tmp_path / "ds")
    code = main(
        [
            "--no-progress", "replay", str(tmp_path / "ds"), "--bus-url", redis_url,
            "--stream", names["stream"], "--limit", "120", "--batch-size", "50", "--json",
        ]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["events"] == 120 and out["published"] == 120 and out["restarts"] == 0

    async def length() -> int:
        bus = RedisStreamBus(redis_url, stream=names["stream"])
        try:
            return await bus.length()
        finally:
            await bus.delete()
            await bus.close()

    assert asyncio.run(length()) == 120


@pytest.mark.kafka
def test_replay_then_stream_on_kafka(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_dataset: Any,
    names: dict[str, str],
    kafka_broker: Any,
    kafka_topic: str,
) -> None:
    """`recloop replay` and `recloop stream --workers 2` with --bus-url kafka://."""
    make_dataset(400).save(tmp_path / "ds")
    url = kafka_broker.url(kafka_topic)
    code = main(
        [
            "--no-progress", "replay", str(tmp_path / "ds"), "--bus-url", url,
            "--batch-size", "100", "--json",
        ]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["events"] == 400 and out["stream"] == "recloop:events"
    db = f"sqlite:///{tmp_path / 'log.db'}"
    code = main(
        [
            "--no-progress", "stream", "--bus-url", url, "--workers", "2",
            "--store-url", f"sqlite:///{tmp_path / 'store.db'}", "--database-url", db,
            "--group", names["group"], "--batch-size", "64", "--exit-when-idle", "3", "--json",
        ]
    )  # fmt: skip
    stats = json.loads(capsys.readouterr().out)
    assert code == 0, stats
    assert stats["logged"] == 400 and stats["duplicates"] == 0 and stats["lag"] == 0
    assert BehaviorLog(db).count() == 400

    async def cleanup() -> None:
        bus = open_bus(url)
        await bus.delete()

    asyncio.run(cleanup())
