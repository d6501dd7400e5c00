"""``recloop flink``: run the online half as one Apache Flink job on a local mini-cluster.

The job itself is :mod:`recloop.streaming.flink.job`, a self-contained PyFlink file.  It runs
in the interpreter named by ``python`` (``RECLOOP_FLINK_PYTHON``): ``apache-flink`` pins
numpy, pandas and pyarrow versions that recloop's own environment does not share, so Flink
usually lives in a virtual environment of its own and recloop only launches it.  This module
turns recloop's URLs into the job's settings (Kafka bootstrap servers and topic, a JDBC URL,
the Redis store and its key prefix), creates the behaviour-log table with recloop's own DDL
(the table ``recloop prepare --from-db`` reads), picks the checkpoint or savepoint to resume
from, launches the job and returns its report.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from recloop.errors import ConfigError, RecloopError

logger = logging.getLogger(__name__)

JOB_FILE = Path(__file__).with_name("job.py")
"""The PyFlink job: ``flink run -py`` takes this file unchanged."""

CONNECTOR_JARS = (
    "flink-connector-kafka.jar",
    "kafka-clients.jar",
    "flink-connector-jdbc-core.jar",
    "flink-connector-jdbc-postgres.jar",
    "postgresql.jar",
)
"""The only jars the job adds to Flink's own (``pipeline.jars``): the Kafka and JDBC
connectors, the Kafka client and the PostgreSQL driver.  Flink's core jars are never added
twice."""

MYSQL_JARS = ("recloop-flink-jdbc-mysql.jar", "mariadb-java-client.jar")
"""With a MySQL/MariaDB log, in place of the PostgreSQL dialect and driver: recloop's own
MySQL dialect for the JDBC connector (``java/flink-jdbc-mysql``, built by
``scripts/flink_env.sh --mysql``) and MariaDB Connector/J (Debian's ``libmariadb-java``),
both under ``<flink env>/recloop-jars``."""

UDF_JAR = "recloop-flink-udf.jar"
"""recloop's Flink functions (``java/flink-udf``, built by ``scripts/flink_env.sh`` under
``<flink env>/recloop-jars``): the event parse, the popular items' sliding Top-N and the
recent events.  A jar list given by hand must hold it under this name."""

STOP_MODES = ("drain", "savepoint", "cancel")


class FlinkJobError(RecloopError):
    """The Flink job could not be started or failed."""


@dataclass(frozen=True, kw_only=True)
class FlinkJobConfig:
    """What the Flink job reads, where it writes, its windows and its checkpoints."""

    bus_url: str
    """Kafka topic: ``kafka://host:port[,host:port...]/topic``."""
    database_url: str
    """Behaviour log (SQLAlchemy URL): ``postgresql+psycopg://`` or, with recloop's MySQL
    dialect and MariaDB's driver in the Flink environment, ``mysql+pymysql://``."""
    store_url: str | None = None
    """Online store for popular items: ``redis://host:port/db``; None skips popular items."""
    table_prefix: str = ""
    """Prefix of the log's table names, as ``recloop stream --table-prefix``."""
    store_prefix: str = "recloop:"
    """Namespace of the online store's Redis keys."""
    dead_letters: bool = True
    """Send records that are not valid events to the dead-letter topic (else drop them)."""
    dead_letter_topic: str | None = None
    """Kafka topic of the dead letters (None: ``<topic>.dead``, as the Kafka bus); created
    with one partition when missing."""
    group: str = "recloop-flink"
    """Kafka consumer group of the job (offsets live in the checkpoints; Flink commits them to
    the group for monitoring only)."""
    window_s: int = 3600
    """Popular-items sliding window, event-time seconds (FlinkRL: 60 min)."""
    slide_s: int = 80
    """Slide of the window (FlinkRL: 80 s); must divide window_s."""
    top: int = 20
    """Items in the published popular list."""
    allowed_lateness_s: int = 300
    """Bounded out-of-orderness of the watermark: a window fires once the newest event time
    is this far past its end; events for windows that already fired are not counted there."""
    recent_len: int | None = None
    """Keep each user's last N events in keyed state and push them to the store's recent
    lists (as ``recloop stream --recent-len``); None leaves recent items out (they cost a
    Python step per event)."""
    recent_ttl_s: int = 30 * 86400
    """A user's kept events expire from the job's state this long after the last change."""
    artifact: Path | None = None
    """Refresh the recommendations of the users with new events with this artifact's scorer
    (an artifact or run directory; needs recent_len and store_url, and torch in the Flink
    environment), logging each list with the realised reward of the previous one — as
    ``recloop stream --artifact``.  None: no refresh."""
    rec_n: int = 10
    """Items in a refreshed list."""
    parallelism: int = 1
    """Parallelism of every operator."""
    checkpoint_dir: Path | None = None
    """Where checkpoints and savepoints go; None disables checkpointing (and resuming)."""
    checkpoint_interval_s: float = 5.0
    """Seconds between checkpoints."""
    resume: bool = True
    """Start from the newest checkpoint or savepoint in checkpoint_dir when there is one."""
    exit_when_idle_s: float | None = None
    """Stop once no record moved for this long (bounded runs, tests); None runs until
    stopped."""
    stop_mode: str = "drain"
    """How an idle job stops: ``drain`` (fire every window, then a savepoint), ``savepoint``
    (windows stay open in the savepoint) or ``cancel`` (after one more checkpoint, as a
    crash would leave it)."""
    source_idle_timeout_s: float | None = None
    """A Kafka partition without records for this long stops holding the watermark back (for
    topics with partitions that get no events).  None: never — a drain (``stop_mode`` drain)
    fires no window once the source is idle (Flink 2.0 drops its end-of-time watermark)."""
    python: str | None = None
    """Interpreter with ``apache-flink`` (None: ``RECLOOP_FLINK_PYTHON``, else this one)."""
    jars: tuple[Path, ...] = ()
    """Connector jars (None found: ``RECLOOP_FLINK_JARS``, else the connectors directory
    beside the Flink interpreter's environment)."""
    flink_conf: dict[str, str] = field(default_factory=dict)
    """Extra Flink options (``key: value``), applied last."""
    jvm_args: tuple[str, ...] = ()
    """Options of the JVM that runs the local mini-cluster (PyFlink's ``JVM_ARGS``, after any
    already in the environment).  ``-XX:TieredStopAtLevel=1`` (no C2 compiler) made a
    100,000-event replay on 2 cores 1.35× faster (medians of three): C2 spent 7.5–8.5
    CPU-seconds compiling while the job ran; after 500,000 events both settings are level
    (docs/flink.md).  On a cluster the
    TaskManagers' options are ``env.java.opts.taskmanager`` in its config instead.  One option
    per entry, without spaces (PyFlink splits ``JVM_ARGS`` on whitespace)."""

    def __post_init__(self) -> None:
        if self.window_s < 1 or self.slide_s < 1 or self.window_s % self.slide_s:
            raise ConfigError(
                f"window_s ({self.window_s}) must be a positive multiple of slide_s "
                f"({self.slide_s})"
            )
        if self.recent_len is not None and self.recent_len < 1:
            raise ConfigError(f"recent_len must be >= 1, got {self.recent_len}")
        if self.artifact is not None and (self.recent_len is None or self.store_url is None):
            raise ConfigError(
                "a refresh (artifact) scores each user's recent list: it needs recent_len "
                "and store_url"
            )
        if self.rec_n < 1:
            raise ConfigError(f"rec_n must be >= 1, got {self.rec_n}")
        for arg in self.jvm_args:
            if not arg.startswith("-") or any(c.isspace() for c in arg):
                raise ConfigError(
                    f"jvm_args: {arg!r} is not one JVM option (starts with '-', no spaces)"
                )
        if self.top < 1 or self.parallelism < 1:
            raise ConfigError(f"top ({self.top}) and parallelism ({self.parallelism}) must be >= 1")
        if self.allowed_lateness_s < 0:
            raise ConfigError(f"allowed_lateness_s must be >= 0, got {self.allowed_lateness_s}")
        if self.stop_mode not in STOP_MODES:
            raise ConfigError(f"stop_mode {self.stop_mode!r}: expected one of {STOP_MODES}")
        if (
            self.stop_mode == "drain"
            and self.exit_when_idle_s is not None
            and self.source_idle_timeout_s is not None
        ):
            raise ConfigError(
                "stop_mode 'drain' with a source idle timeout publishes no final window "
                "(Flink drops the drain's watermark of an idle source): leave one of them out"
            )
        if self.exit_when_idle_s is not None and self.checkpoint_dir is None:
            raise ConfigError(
                f"stop_mode {self.stop_mode!r} after exit_when_idle_s needs a checkpoint_dir "
                "(the savepoint or checkpoint goes there)"
            )
        if self.stop_mode == "cancel" and self.checkpoint_dir is None:
            raise ConfigError("stop_mode 'cancel' keeps nothing without a checkpoint_dir")


@dataclass(frozen=True, kw_only=True)
class FlinkRunReport:
    """What one run of the job did."""

    job_id: str
    """Flink's job id."""
    restored_from: str | None
    """Checkpoint or savepoint the run resumed from (None: a fresh start)."""
    startup_s: float
    """Launch → every task running: JVM, planning, Python workers."""
    first_progress_s: float | None
    """Launch → first records seen moving."""
    last_progress_s: float | None
    """Launch → last records seen moving (before the idle stop)."""
    savepoint: str | None
    """Savepoint written by a drain/savepoint stop."""
    raw: dict[str, Any]
    """The job's own report (vertex record counts and timings)."""


def kafka_topic(url: str) -> tuple[str, str]:
    """``kafka://h1:9092,h2:9092/topic`` → (bootstrap servers, topic)."""
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise ConfigError(f"bus url {url!r}: the Flink job reads Kafka (kafka://host:port/topic)")
    topic = unquote(parts.path.lstrip("/"))
    if not parts.netloc or not topic or "/" in topic:
        raise ConfigError(f"bus url {url!r}: expected kafka://host:port[,host:port]/topic")
    return parts.netloc, topic


def jdbc_target(url: str) -> tuple[str, str | None, str | None]:
    """SQLAlchemy PostgreSQL or MySQL/MariaDB URL → (JDBC URL, user, password)."""
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"database url {url!r}: {exc}") from None
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "mysql", "mariadb"):
        raise ConfigError(
            f"database url {url!r}: the Flink job writes PostgreSQL or MySQL/MariaDB through "
            "JDBC (postgresql+psycopg://... or mysql+pymysql://...)"
        )
    host = parsed.host or "localhost"
    if backend == "postgresql":
        jdbc = f"jdbc:postgresql://{host}:{parsed.port or 5432}/{parsed.database or ''}"
        # The sink's batches as multi-row INSERTs (pgjdbc sends a batch row by row
        # otherwise): PostgreSQL's CPU in a 500,000-event bench run 9.3 → 7.3 s (one run
        # each).  Safe for the upsert: the sink reduces a batch to one row per event id
        # before it writes it (a multi-row INSERT ... ON CONFLICT must not hold a key twice).
        jdbc += "?reWriteBatchedInserts=true"
    else:
        # jdbc:mysql: — MariaDB Connector/J 2.x takes it, and recloop's dialect accepts it.
        jdbc = f"jdbc:mysql://{host}:{parsed.port or 3306}/{parsed.database or ''}"
    return jdbc, parsed.username, parsed.password


def job_environment(config: FlinkJobConfig) -> dict[str, str]:
    """The job process's environment: this one without ``PYTHONPATH`` (the Flink
    environment has its own packages), with :attr:`FlinkJobConfig.jvm_args` added to
    ``JVM_ARGS``, which PyFlink passes to the JVM it starts."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if config.jvm_args:
        env["JVM_ARGS"] = " ".join([env.get("JVM_ARGS", ""), *config.jvm_args]).strip()
    return env


def flink_python(configured: str | None) -> str:
    """The interpreter that runs the job (see :attr:`FlinkJobConfig.python`)."""
    return configured or os.environ.get("RECLOOP_FLINK_PYTHON") or sys.executable


def connector_jars(configured: tuple[Path, ...], python: str, *, mysql: bool = False) -> list[Path]:
    """The connector jars: given, else ``RECLOOP_FLINK_JARS`` (``os.pathsep``-separated),
    else :data:`CONNECTOR_JARS` under ``<env of python>/connectors/pyflink/lib`` — with
    ``mysql``, the PostgreSQL dialect and driver replaced by :data:`MYSQL_JARS` under
    ``<env of python>/recloop-jars``."""
    if configured:
        jars = list(configured)
    elif os.environ.get("RECLOOP_FLINK_JARS"):
        jars = [Path(p) for p in os.environ["RECLOOP_FLINK_JARS"].split(os.pathsep) if p]
    else:
        env = Path(python).absolute().parent.parent
        base = env / "connectors" / "pyflink" / "lib"
        jars = [base / name for name in CONNECTOR_JARS]
        if mysql:
            jars = [j for j in jars if "postgres" not in j.name]
            jars += [env / "recloop-jars" / name for name in MYSQL_JARS]
        jars.append(env / "recloop-jars" / UDF_JAR)
    if not any(j.name == UDF_JAR for j in jars):
        raise ConfigError(
            f"the Flink jars ({', '.join(str(j) for j in jars)}) lack {UDF_JAR}, recloop's "
            "own functions the job calls: build it with java/build.sh flink-udf FLINK_ENV "
            f"OUT/{UDF_JAR} (scripts/flink_env.sh does) and add it; see docs/flink.md"
        )
    missing = [str(j) for j in jars if not j.is_file()]
    if missing:
        raise ConfigError(
            "Flink connector jars not found: "
            + ", ".join(missing)
            + " (build them with scripts/flink_env.sh"
            + (" --mysql" if mysql else "")
            + ", or set RECLOOP_FLINK_JARS or --jar; see docs/flink.md)"
        )
    return jars


def java_causes(output: str, most: int = 6) -> str:
    """The exception lines of a failed job's output (``…Exception: message`` and ``Caused
    by:``, without their stack frames), the last ``most`` of them, so that the root cause
    is shown even when the stack traces fill the tail of the output."""
    lines = [
        line.strip()
        for line in output.splitlines()
        if line.startswith("Caused by:") or ("Exception: " in line and not line[:1].isspace())
    ]
    return "".join(f"{line}\n" for line in lines[-most:]) + ("...\n" if lines else "")


def latest_restore_point(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (``<job>/chk-N``) or savepoint under ``checkpoint_dir``:
    a directory holding ``_metadata``, newest by that file's time."""
    if not checkpoint_dir.is_dir():
        return None
    found = [p.parent for p in checkpoint_dir.glob("**/_metadata")]
    return max(found, key=lambda p: (p / "_metadata").stat().st_mtime_ns, default=None)


def job_settings(config: FlinkJobConfig, *, python: str, jars: list[Path]) -> dict[str, Any]:
    """The JSON settings :mod:`recloop.streaming.flink.job` reads."""
    bootstrap, topic = kafka_topic(config.bus_url)
    jdbc_url, user, password = jdbc_target(config.database_url)
    store_scheme = None if config.store_url is None else urlsplit(config.store_url).scheme
    if store_scheme not in (None, "redis", "rediss"):
        raise ConfigError(f"store url {config.store_url!r}: the Flink job writes Redis (redis://)")
    refresh = None
    if config.artifact is not None:
        from recloop.artifacts import resolve_artifact_dir

        refresh = {
            "artifact": str(resolve_artifact_dir(config.artifact).absolute()),
            "database_url": config.database_url,
            "table_prefix": config.table_prefix,
            "store_url": config.store_url,
            "store_prefix": config.store_prefix,
            "recent_len": config.recent_len,
            "rec_n": config.rec_n,
            "python_files": None,  # run_flink zips recloop's package for a local run
        }
    restore = None
    if config.checkpoint_dir is not None and config.resume:
        point = latest_restore_point(config.checkpoint_dir)
        restore = str(point) if point is not None else None
    return {
        "topic": topic,
        "bootstrap_servers": bootstrap,
        "group": config.group,
        "dead_letter_topic": (
            (config.dead_letter_topic or f"{topic}.dead") if config.dead_letters else None
        ),
        "lateness_s": config.allowed_lateness_s,
        "jdbc_url": jdbc_url,
        "jdbc_user": user,
        "jdbc_password": password,
        "log_table": f"{config.table_prefix}behavior_log",
        "redis_url": config.store_url,
        "store_prefix": config.store_prefix,
        "window_s": config.window_s,
        "slide_s": config.slide_s,
        "top": config.top,
        "recent_len": config.recent_len,
        "recent_ttl_s": config.recent_ttl_s,
        "refresh": refresh,
        "parallelism": config.parallelism,
        "checkpoint_dir": None if config.checkpoint_dir is None else str(config.checkpoint_dir),
        "checkpoint_interval_ms": int(config.checkpoint_interval_s * 1000),
        "restore_from": restore,
        "exit_when_idle_s": config.exit_when_idle_s,
        "stop_mode": config.stop_mode,
        "source_idle_timeout_ms": (
            None
            if config.source_idle_timeout_s is None
            else int(config.source_idle_timeout_s * 1000)
        ),
        "python_executable": python,
        "jars": [str(j) for j in jars],
        "flink_conf": dict(config.flink_conf),
    }


def recloop_zip(directory: Path) -> str:
    """recloop's package as ``directory/recloop.zip`` (holding ``recloop/``), for the Flink
    job's Python workers: shipped as ``python.files``, whatever way recloop is installed
    here (a directory shipped as such would sit on the workers' path itself, not as a
    package)."""
    import shutil

    import recloop

    package = Path(recloop.__file__).parent
    base = directory / "recloop"
    return shutil.make_archive(
        str(base), "zip", root_dir=package.parent, base_dir=package.name, logger=logger
    )


def create_topics(bus_url: str, dead_letter_topic: str) -> None:
    """Create the topic and its dead-letter topic (one partition) unless they exist, as the
    Kafka bus does; without confluent-kafka they must exist already."""
    from recloop.streaming.buses.kafka import KafkaBus

    try:
        bus = KafkaBus(bus_url, dead_letter_stream=dead_letter_topic)
    except ConfigError as exc:
        logger.warning("not creating the Kafka topics (%s): they must exist", exc)
        return
    bus.create_topics()


def run_flink(config: FlinkJobConfig) -> FlinkRunReport:
    """Create the log table, launch the job on a local mini-cluster and wait for it (with
    ``exit_when_idle_s`` it stops by itself; otherwise it runs until interrupted)."""
    from recloop.streaming.log import BehaviorLog

    python = flink_python(config.python)
    mysql = jdbc_target(config.database_url)[0].startswith("jdbc:mysql:")
    jars = connector_jars(config.jars, python, mysql=mysql)
    settings = job_settings(config, python=python, jars=jars)
    log = BehaviorLog(config.database_url, prefix=config.table_prefix)
    try:
        log.create_schema()
    finally:
        log.dispose()
    if settings["dead_letter_topic"]:
        create_topics(config.bus_url, settings["dead_letter_topic"])
    if settings["restore_from"]:
        logger.info("resuming from %s", settings["restore_from"])
    with tempfile.TemporaryDirectory(prefix="recloop-flink-") as tmp:
        cfg_file, report_file = Path(tmp) / "job.json", Path(tmp) / "report.json"
        if settings["refresh"] is not None:
            settings["refresh"]["python_files"] = recloop_zip(Path(tmp))
        cfg_file.write_text(json.dumps(settings))
        env = job_environment(config)
        cmd = [python, str(JOB_FILE), "--config", str(cfg_file), "--report", str(report_file)]
        logger.info("launching the Flink job: %s", " ".join(cmd))
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not report_file.is_file():
            out = done.stdout.decode(errors="replace")
            raise FlinkJobError(
                f"the Flink job failed (exit {done.returncode}):\n{java_causes(out)}{out[-4000:]}"
            )
        raw = json.loads(report_file.read_text())
    return FlinkRunReport(
        job_id=raw["job_id"],
        restored_from=settings["restore_from"],
        startup_s=float(raw.get("running_s", raw.get("submit_s", 0.0))),
        first_progress_s=raw.get("first_progress_s"),
        last_progress_s=raw.get("last_progress_s"),
        savepoint=raw.get("savepoint"),
        raw=raw,
    )
