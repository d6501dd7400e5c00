"""Fixtures of the hostile-input tests: the real services' URLs and names no other test uses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from recloop.streaming.log import BehaviorLog

REDIS_URL = os.environ.get("RECLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "RECLOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_URL = os.environ.get("RECLOOP_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def names() -> dict[str, str]:
    """Stream, group and key names no other test uses."""
    tag = unique("rlr")
    return {
        "stream": f"{tag}:events",
        "group": f"{tag}-group",
        "store_prefix": f"{tag}:store:",
        "table_prefix": f"{tag}_",
    }


def db_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'log.db'}"
    return POSTGRES_URL if kind == "postgres" else MARIADB_URL


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.integration),
        pytest.param("mariadb", marks=pytest.mark.integration),
    ]
)
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BehaviorLog]:
    """A behaviour log on each database, with its own table prefix, dropped afterwards."""
    blog = BehaviorLog(db_url(request.param, tmp_path), prefix=unique("rlr") + "_")
    try:
        yield blog
    finally:
        blog.drop_schema()
        blog.dispose()


@pytest.fixture
def mariadb_log() -> Iterator[BehaviorLog]:
    """A behaviour log on MariaDB only."""
    blog = BehaviorLog(MARIADB_URL, prefix=unique("rlr") + "_")
    try:
        yield blog
    finally:
        blog.drop_schema()
        blog.dispose()


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL
