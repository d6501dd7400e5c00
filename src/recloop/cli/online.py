"""recloop CLI: online commands."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli.app import app

# ----------------------------------------------------------------------------- serve
# Imports stay inside the command: `recloop --help` must not load torch, FastAPI or uvicorn.


@app.command("serve")
def serve(
    artifact: str | None = typer.Argument(
        None,
        help="Artifact or run directory to serve, or a registry (recloop registry: a "
        "directory or s3://BUCKET/PREFIX): then its current version is served and every "
        "promotion or rollback is followed.  Omit it with --ab.",
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="TCP port, 1 to 65535."),
    workers: int = typer.Option(1, help="Worker processes (each loads the model)."),
    store_url: str | None = typer.Option(
        None,
        help="Online store: redis://…, sqlite:///path or memory:// "
        "(default: RECLOOP_STORE_URL, else RECLOOP_REDIS_URL, else memory).",
    ),
    api_key: str | None = typer.Option(
        None, help="Require this X-API-Key on every route but /healthz, /readyz and /admin/*."
    ),
    admin_key: str | None = typer.Option(
        None,
        help="Turn /admin/reload on, for requests with this X-Admin-Key "
        "(default: RECLOOP_ADMIN_KEY; unset: the admin routes answer 404).",
    ),
    admin_localhost: bool = typer.Option(
        False,
        "--admin-localhost",
        help="Without --admin-key, turn /admin/reload on for clients on 127.0.0.1/::1 only "
        "(not behind a proxy on this host).",
    ),
    artifact_root: Path | None = typer.Option(
        None,
        help="Directory /admin/reload may load artifacts from (default: RECLOOP_ARTIFACT_ROOT, "
        "else only the served artifact itself).",
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    inference: str | None = typer.Option(
        None,
        help="Forward-pass engine: torch or onnxruntime (default: RECLOOP_INFERENCE, else "
        "torch; onnxruntime needs recloop[export]).",
    ),
    ann: bool | None = typer.Option(
        None,
        "--ann/--exact",
        help="Top-k from the artifact's approximate index (recloop index build; refuse to "
        "start without one), or score every item (default: RECLOOP_SEARCH, else the index "
        "when the artifact has one).",
    ),
    policy: str | None = typer.Option(
        None,
        help="Serving policy: topk (deterministic), softmax (= plackett_luce: sampled from "
        "softmax(scores / T)) or epsilon (epsilon-greedy over the top-n); a request may ask "
        "for another (default: RECLOOP_POLICY, else topk).",
    ),
    temperature: float | None = typer.Option(
        None, help="T of the softmax policy (default: RECLOOP_TEMPERATURE, else 1)."
    ),
    epsilon: float | None = typer.Option(
        None, help="Exploration probability of the epsilon policy (default: 0.1)."
    ),
    bus_url: str | None = typer.Option(
        None,
        help="Log every served list onto this event bus (redis://… or kafka://host:port/topic) "
        "for `recloop stream` (default: RECLOOP_BUS_URL).",
    ),
    database_url: str | None = typer.Option(
        None,
        help="Without --bus-url: log every served list straight into this SQL log "
        "(default: RECLOOP_DATABASE_URL; neither: not logged).",
    ),
    ab: list[str] = typer.Option(
        [],
        "--ab",
        help="A/B serving, instead of ARTIFACT: an arm NAME=PATH:WEIGHT, given two or more "
        "times (users are split by a stable hash of their id, each list records its arm; "
        "the first arm is the one /admin/reload switches).  An arm's policy is its "
        "artifact's serving section, else --policy.",
    ),
    ab_salt: str | None = typer.Option(
        None, help="Salt of the A/B user hash: a new one per experiment reshuffles users."
    ),
) -> None:
    """Run the recommendation service (FastAPI on uvicorn) for an artifact.

    Other settings come from RECLOOP_* environment variables (see ServeSettings).  Settings
    and the online store are checked before anything is served.  /admin/reload switches
    every worker (they share a reload state file; each checks it once a second); SIGHUP to
    a worker re-reads the artifact in that worker, SIGHUP to the parent replaces the workers.
    """
    import asyncio
    import json
    import os
    import shutil
    import tempfile

    import pydantic
    import uvicorn

    from recloop.artifacts import load_artifact, resolve_artifact_dir
    from recloop.artifacts.registry import ArtifactRegistry, is_object_store, is_registry_dir
    from recloop.errors import ConfigError
    from recloop.serving.http_protocol import http_protocol
    from recloop.serving.metrics import MULTIPROC_ENV
    from recloop.serving.settings import ServeSettings
    from recloop.stores import StoreError, check_store, open_store

    # Fail here, with one clear line, rather than in every worker.  (Checked here, not
    # with typer's min/max: those raise typer's own click errors, which main() shows as a
    # traceback; and port 0 would bind a random port while logging 0.)
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    from recloop.serving.ab import ArmConfig, check_arms, parse_arm

    registry = None
    arms: list[ArmConfig] = []
    if ab:
        if artifact is not None:
            raise ConfigError("give ARTIFACT or --ab arms, not both (the first arm is control)")
        arms = [parse_arm(a) for a in ab]
        check_arms(arms)
        arms = [
            a.model_copy(update={"artifact": resolve_artifact_dir(a.artifact).resolve()})
            for a in arms
        ]
        for a in arms:
            load_artifact(a.artifact)
        path = arms[0].artifact
    elif artifact is None:
        raise ConfigError("name an ARTIFACT (or a registry) to serve, or two or more --ab arms")
    elif is_object_store(artifact) or is_registry_dir(Path(artifact)):
        # a registry (recloop registry): serve its current version and follow promotions
        reg = ArtifactRegistry(artifact if is_object_store(artifact) else Path(artifact).resolve())
        registry = reg.location
        path = reg.current_path().resolve()
        if artifact_root is None:  # where its versions lie on this machine
            artifact_root = path.parent
    else:
        path = resolve_artifact_dir(Path(artifact)).resolve()
    checked = load_artifact(path)
    # Workers are fresh processes that build the app from the environment.
    env = {"RECLOOP_ARTIFACT": str(path), "RECLOOP_LOG_LEVEL": log_level}
    if registry is not None:
        env["RECLOOP_REGISTRY"] = str(registry)
    given = {
        "RECLOOP_STORE_URL": store_url,
        "RECLOOP_API_KEY": api_key,
        "RECLOOP_ADMIN_KEY": admin_key,
        "RECLOOP_ADMIN_LOCALHOST": "true" if admin_localhost else None,
        "RECLOOP_ARTIFACT_ROOT": str(artifact_root.resolve()) if artifact_root else None,
        "RECLOOP_INFERENCE": inference,
        "RECLOOP_SEARCH": None if ann is None else ("ann" if ann else "exact"),
        "RECLOOP_POLICY": policy,
        "RECLOOP_TEMPERATURE": None if temperature is None else repr(temperature),
        "RECLOOP_EPSILON": None if epsilon is None else repr(epsilon),
        "RECLOOP_BUS_URL": bus_url,
        "RECLOOP_DATABASE_URL": database_url,
        "RECLOOP_AB": (
            json.dumps([a.model_dump(mode="json", exclude_none=True) for a in arms])
            if arms
            else None
        ),
        "RECLOOP_AB_SALT": ab_salt,
    }
    env.update({k: v for k, v in given.items() if v is not None})
    run_dir = tempfile.mkdtemp(prefix="recloop-serve-")  # private (0700) to this run
    if not os.environ.get("RECLOOP_RELOAD_STATE"):
        env["RECLOOP_RELOAD_STATE"] = os.path.join(run_dir, "reload.json")
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        env[MULTIPROC_ENV] = os.path.join(run_dir, "metrics")
        os.mkdir(env[MULTIPROC_ENV])
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        try:
            settings = ServeSettings()  # type: ignore[call-arg]  # fields come from the environment
        except pydantic.ValidationError as exc:
            # one line naming the setting, as the option when it came from the command line
            first = exc.errors()[0]
            name = "RECLOOP_" + ".".join(str(x) for x in first["loc"]).upper()
            if given.get(name) is not None:
                name = f"--{name.removeprefix('RECLOOP_').lower().replace('_', '-')} ({name})"
            msg = str(first["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"{name}: {msg}") from None
        if settings.search == "ann":
            # here, with one line, rather than in every worker: no index, or a broken one
            from recloop.serving.service import load_ann

            load_ann(checked, search="ann", threads=1)

        async def probe() -> None:
            store = open_store(
                settings.resolved_store_url,
                prefix=settings.store_prefix,
                timeout_s=settings.store_timeout_s,
            )
            try:
                await check_store(store)
            finally:
                await store.close()

        try:
            asyncio.run(probe())
        except StoreError as exc:
            raise ConfigError(f"online store: {exc}") from None
        uvicorn.run(
            "recloop.serving.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level.lower(),
            access_log=False,
            lifespan="on",
            # each response's head and body in one socket write (recloop.serving.http_protocol)
            http=http_protocol(),
            # a worker importing torch on a busy machine can take longer than the default 5 s
            timeout_worker_healthcheck=120,
        )
    finally:
        # leave the caller's environment as it was (``main([...])`` runs in-process)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(run_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- end serve


# ----------------------------------------------------------------------------- stream, replay
# Owned by the streaming side.  Imports stay inside the commands (no torch for --help).


@app.command("stream")
def stream(
    bus_url: str | None = typer.Option(
        None,
        help="Event bus: redis://host:port/db, kafka://host:port/topic or memory:// (default "
        "RECLOOP_BUS_URL, else RECLOOP_REDIS_URL, else memory://).",
    ),
    database_url: str | None = typer.Option(
        None,
        help="Behaviour log (SQLAlchemy URL; default RECLOOP_DATABASE_URL, else "
        "sqlite:///./recloop-log.db).",
    ),
    store_url: str | None = typer.Option(
        None,
        help="Online store: redis://, sqlite:///path or memory:// (default: the bus's "
        "Redis, else memory).",
    ),
    artifact: Path | None = typer.Option(
        None, help="Artifact: refresh each batch's users' recommendations with it."
    ),
    workers: int | None = typer.Option(
        None,
        min=1,
        help="Worker processes (default 1).  If one dies, the others stop after their batch "
        "and the command exits 1 naming it (not restarted: leave that to the supervisor).",
    ),
    group: str | None = typer.Option(None, help="Consumer group (default recloop-stream)."),
    stream_name: str | None = typer.Option(
        None, "--stream", help="Event stream name (default recloop:events)."
    ),
    table_prefix: str | None = typer.Option(None, help="Prefix of the SQL table names."),
    batch_size: int | None = typer.Option(None, min=1, help="Events per batch (default 1000)."),
    window: int | None = typer.Option(None, min=1, help="Popular-items window, s (3600)."),
    slide: int | None = typer.Option(None, min=1, help="Window slide, s (80)."),
    top: int | None = typer.Option(None, min=1, help="Popular items published (20)."),
    allowed_lateness: int | None = typer.Option(
        None,
        help="Seconds an event may lag the newest event time and still count in the "
        "popular items (300; -1: any).",
    ),
    claim_min_idle_ms: int | None = typer.Option(
        None, min=0, help="Take over entries pending this long at a dead consumer (30000)."
    ),
    attribution_window: int | None = typer.Option(
        None,
        min=0,
        help="Feedback without a recommendation_id goes to the latest list that showed the "
        "user the item at most this many seconds before (1800; RECLOOP_ATTRIBUTION_WINDOW_S).",
    ),
    exit_when_idle: float | None = typer.Option(
        None, help="Stop after this many seconds without events (default: run until stopped)."
    ),
    replay_dir: Path | None = typer.Option(
        None,
        "--replay",
        help="Replay this prepared dataset onto the bus first, in this "
        "process (works with memory://).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the final counters as JSON."),
) -> None:
    """Run stream workers: behaviour log, popular and recent items, recommendation refresh.

    Every setting also reads from RECLOOP_<NAME> (e.g. RECLOOP_BATCH_SIZE).  SIGTERM or
    Ctrl-C lets each worker finish its batch and stop.  With --workers N, a worker process
    that dies (killed, or failed) is not restarted: the others finish their batch and stop,
    the counters are printed (the dead worker's up to its last report, at most a second
    old), each dead worker is named on stderr with its exit status or signal, and the
    command exits with status 1 -- a supervisor restarts the processor, and the new workers
    take over the dead one's pending events.
    """
    from recloop.cli.app import echo, echo_json, warn
    from recloop.streaming.runner import WorkersFailed, run_stream, run_with_replay
    from recloop.streaming.settings import load_stream_settings

    values = {
        "bus_url": bus_url,
        "database_url": database_url,
        "store_url": store_url,
        "artifact": artifact,
        "workers": workers,
        "group": group,
        "stream": stream_name,
        "table_prefix": table_prefix,
        "batch_size": batch_size,
        "window_s": window,
        "slide_s": slide,
        "top": top,
        "claim_min_idle_ms": claim_min_idle_ms,
        "exit_when_idle_s": exit_when_idle,
        "allowed_lateness_s": allowed_lateness,
        "attribution_window_s": attribution_window,
    }
    if replay_dir is not None and exit_when_idle is None:
        values["exit_when_idle_s"] = 2.0
    settings = load_stream_settings(**values)
    failure: WorkersFailed | None = None
    if replay_dir is None:
        try:
            stats = run_stream(settings)
        except WorkersFailed as exc:
            failure, stats = exc, exc.stats
    else:
        from recloop.streaming.replay import load_replay_events

        stats = run_with_replay(settings, load_replay_events(replay_dir))
    if as_json:
        out: dict[str, object] = dict(stats.as_dict())
        if failure is not None:
            out["failed_workers"] = [
                {
                    "name": e.name,
                    "pid": e.pid,
                    "exitcode": e.exitcode,
                    "counts_final": e.final_counts,
                }
                for e in failure.exits
                if e.failed
            ]
        echo_json(out)
    else:
        echo(" ".join(f"{k}={v}" for k, v in stats.as_dict().items()))
    if failure is not None:
        for e in failure.exits:
            if e.failed:
                warn(f"error: {e.describe()}")
        # SystemExit, not typer.Exit: in non-standalone mode click turns Exit into a return
        # value that main() does not pass on.
        raise SystemExit(1)


@app.command("replay")
def replay_command(
    prepared_dir: Path = typer.Argument(..., help="Prepared dataset directory."),
    bus_url: str | None = typer.Option(
        None,
        help="Event bus: redis://host:port/db or kafka://host:port/topic (default "
        "RECLOOP_BUS_URL, else RECLOOP_REDIS_URL).",
    ),
    stream_name: str | None = typer.Option(
        None, "--stream", help="Event stream name (default recloop:events)."
    ),
    rate: float | None = typer.Option(
        None, help="Events per second (default: as fast as possible)."
    ),
    speed: float | None = typer.Option(
        None, help="Time compression: 3600 replays an hour of the log per second."
    ),
    limit: int | None = typer.Option(None, min=1, help="Only the first N events (by time)."),
    batch_size: int = typer.Option(500, min=1, help="Events per publish round trip."),
    as_json: bool = typer.Option(False, "--json", help="Print the counters as JSON."),
) -> None:
    """Publish a prepared dataset's events to the bus in event-time order."""
    import asyncio

    from recloop.cli.app import echo, echo_json
    from recloop.errors import ConfigError
    from recloop.streaming.buses import is_in_process, open_bus
    from recloop.streaming.replay import ReplayStats, load_replay_events, replay
    from recloop.streaming.settings import load_stream_settings

    settings = load_stream_settings(bus_url=bus_url, stream=stream_name)
    if is_in_process(settings.bus_url):
        raise ConfigError(
            "replay: memory:// lives in one process, nothing else could read it; use "
            "--bus-url redis://... or kafka://..., or `recloop stream --replay DIR` for an "
            "in-process run"
        )
    events = load_replay_events(prepared_dir, limit=limit)

    async def run() -> ReplayStats:
        bus = open_bus(
            settings.bus_url, stream=settings.stream, dead_letter_stream=settings.dead_letters
        )
        try:
            return await replay(events, bus, rate=rate, speed=speed, batch_size=batch_size)
        finally:
            await bus.close()

    stats = asyncio.run(run())
    out = {
        "events": stats.events,
        "published": stats.published,
        "restarts": stats.restarts,
        "seconds": round(stats.seconds, 3),
        "events_per_s": round(stats.events_per_s, 1),
        "stream": settings.stream,
    }
    if as_json:
        echo_json(out)
    else:
        echo(" ".join(f"{k}={v}" for k, v in out.items()))


# ----------------------------------------------------------------------------- end stream, replay
