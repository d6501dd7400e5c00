"""``recloop flink``: the online half (log, popular and recent items, refresh) as one Apache
Flink job."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli.app import app


@app.command("flink")
def flink(
    bus_url: str = typer.Option(
        ..., envvar="RECLOOP_BUS_URL", help="Kafka topic: kafka://host:port[,host:port]/topic."
    ),
    database_url: str = typer.Option(
        ..., envvar="RECLOOP_DATABASE_URL", help="Behaviour log: postgresql+psycopg://..."
    ),
    store_url: str | None = typer.Option(
        None, envvar="RECLOOP_STORE_URL", help="Online store for popular items: redis://..."
    ),
    table_prefix: str = typer.Option("", help="Prefix of the log's table names."),
    store_prefix: str = typer.Option("recloop:", help="Namespace of the store's Redis keys."),
    group: str = typer.Option("recloop-flink", help="Kafka consumer group of the job."),
    dead_letters: bool = typer.Option(
        True, help="Send records that are not valid events to the dead-letter topic."
    ),
    dead_letter_topic: str | None = typer.Option(
        None, help="Dead-letter topic (default TOPIC.dead, as the Kafka bus)."
    ),
    window_s: int = typer.Option(3600, help="Popular-items window, event-time seconds."),
    slide_s: int = typer.Option(80, help="Slide of the window; must divide --window-s."),
    top: int = typer.Option(20, help="Items in the popular list."),
    allowed_lateness_s: int = typer.Option(300, help="Watermark's bounded out-of-orderness."),
    recent_len: int | None = typer.Option(
        None, help="Keep each user's last N events (keyed state) in the store's recent lists."
    ),
    recent_ttl_s: int = typer.Option(30 * 86400, help="State TTL of a user's recent events."),
    parallelism: int = typer.Option(1, help="Parallelism of every operator."),
    checkpoint_dir: Path | None = typer.Option(
        None, help="Checkpoints and savepoints (enables checkpointing and resuming)."
    ),
    checkpoint_interval_s: float = typer.Option(5.0, help="Seconds between checkpoints."),
    resume: bool = typer.Option(
        True, help="Resume from the newest checkpoint/savepoint in --checkpoint-dir."
    ),
    exit_when_idle: float | None = typer.Option(
        None, "--exit-when-idle", help="Stop once no record moved for this many seconds."
    ),
    stop_mode: str = typer.Option(
        "drain", help="Idle stop: drain (fire every window), savepoint or cancel."
    ),
    python: str | None = typer.Option(
        None, envvar="RECLOOP_FLINK_PYTHON", help="Interpreter that has apache-flink."
    ),
    jar: list[Path] = typer.Option(
        [],
        help=(
            "Connector jar (repeat; recloop-flink-udf.jar among them); default: "
            "RECLOOP_FLINK_JARS or the Flink env's."
        ),
    ),
    jvm_arg: list[str] = typer.Option(
        [],
        help="Option of the mini-cluster's JVM (repeat), e.g. -XX:TieredStopAtLevel=1 "
        "(no C2 compiler: faster short runs on 2 cores; docs/flink.md).",
    ),
    artifact: Path | None = typer.Option(
        None,
        help="Refresh the recommendations of users with new events with this artifact "
        "(needs --recent-len, --store-url and torch in the Flink environment).",
    ),
    rec_n: int = typer.Option(10, help="Items in a refreshed list."),
) -> None:
    """Run the behaviour log, popular items, recent items and (with --artifact) the
    recommendation refresh as one Flink job on a local mini-cluster."""
    from recloop.streaming.flink.runner import FlinkJobConfig, run_flink

    report = run_flink(
        FlinkJobConfig(
            bus_url=bus_url,
            database_url=database_url,
            store_url=store_url,
            table_prefix=table_prefix,
            store_prefix=store_prefix,
            group=group,
            dead_letters=dead_letters,
            dead_letter_topic=dead_letter_topic,
            window_s=window_s,
            slide_s=slide_s,
            top=top,
            allowed_lateness_s=allowed_lateness_s,
            recent_len=recent_len,
            recent_ttl_s=recent_ttl_s,
            artifact=artifact,
            rec_n=rec_n,
            parallelism=parallelism,
            checkpoint_dir=checkpoint_dir,
            checkpoint_interval_s=checkpoint_interval_s,
            resume=resume,
            exit_when_idle_s=exit_when_idle,
            stop_mode=stop_mode,
            python=python,
            jars=tuple(jar),
            jvm_args=tuple(jvm_arg),
        )
    )
    restored = f" (resumed from {report.restored_from})" if report.restored_from else ""
    print(f"job {report.job_id}{restored}: all tasks running after {report.startup_s:.1f} s")
    if report.savepoint:
        print(f"savepoint: {report.savepoint}")
