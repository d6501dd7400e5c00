"""A registry of artifacts: versioned directories and an atomically switched ``current`` pointer.

::

    REGISTRY/
      versions/<model_version>/   one verified artifact each (manifest.json, weights, id maps)
                 registry.json    lineage: parent version, data window, gate metrics, when
      current.json                {"version", "previous", "promoted_at", "reason", "stack",
                                   "canary"}
      history.jsonl               every publish, promote, rollback and canary start and stop

Every change is crash-safe on one filesystem.  A version is copied into a temporary directory
first and renamed into ``versions/`` only when complete (``os.rename`` is atomic), so a
version directory is always whole.  ``current.json`` is rewritten through a temporary file,
``fsync`` and ``os.replace``: a reader sees the old pointer or the new one, never half of
one.  ``current.json`` is the truth, and it carries the rollback stack (the versions that
were current, oldest first), so a rollback depends on nothing else; ``history.jsonl`` is the
audit trail (appended after the pointer moved, so a crash between the two loses at most one
history line, never the pointer).  Services watch ``current.json`` and hot-swap.

Canary.  ``current.json`` may also name a *canary*: a published version that serves a
``share`` of the users (by a stable hash of the user id, salted per canary)
while the current version serves the rest (:meth:`ArtifactRegistry.start_canary`).  Services
following the registry split their traffic accordingly, and every served list records the
version that answered it, so ``recloop loop`` can compare the two on what users actually did
and then promote the canary or stop it (:mod:`recloop.loop.canary`).  A promotion or a
rollback ends any canary.

Every change of ``current.json`` holds an exclusive ``flock`` on ``REGISTRY/.lock`` while
it reads and rewrites the pointer, so a controller's verdict and an operator's command in
another process never overwrite each other (:meth:`ArtifactRegistry.finish_canary` acts
only if the pointer still names the canary it judged).

On an object store.  ``s3://bucket/prefix`` keeps the same layout in an S3 (or
S3-compatible: MinIO, Ceph, R2, ...) bucket, for services and controllers on several machines
(:mod:`recloop.artifacts.s3`).  There the pointer changes by a conditional ``PutObject``
(``If-Match`` on the ETag read, ``If-None-Match: *`` for the first one) instead of a lock: a
writer that lost the race reads the pointer again and decides again.  A version is whole
once its ``registry.json`` is there, uploaded last; the history is one object per line.
Readers download a version once into a local cache, checked, and load it from there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from recloop.artifacts.bundle import load_artifact, resolve_artifact_dir
from recloop.errors import ArtifactError

logger = logging.getLogger(__name__)

VERSIONS = "versions"
CURRENT = "current.json"
HISTORY = "history.jsonl"
LINEAGE = "registry.json"


@dataclass(frozen=True)
class RegistryEntry:
    """One published version."""

    version: str
    """The artifact's model version (its directory name under ``versions/``)."""
    location: str
    """Where it lies: ``REGISTRY/versions/VERSION`` (a directory, or an ``s3://`` prefix)."""
    algo: str
    """The algorithm that trained it."""
    lineage: dict[str, Any]
    """Parent version, data window, gate metrics and publish time (``registry.json``)."""
    current: bool
    """Whether ``current.json`` points at it."""


@dataclass(frozen=True, kw_only=True)
class Canary:
    """A version serving a share of the users beside the current one."""

    version: str
    """The canary's version."""
    parent: str
    """The version that was current when the canary started (it serves the other users)."""
    share: float
    """Share of users (0 < share < 1) the canary answers."""
    salt: str
    """Salt of the user hash that splits the traffic: ``canary-VERSION-SINCE_TS``, so a
    version canaried again (later in the log) meets a new draw of users, and a replay of
    the same log the same one."""
    since_ts: int
    """Event time (unix seconds) after which the log's impressions count for the comparison:
    the newest served impression's time when the canary started (``recloop loop``), or the
    caller's choice (``recloop registry canary --since-ts``)."""
    started_at: str
    """Wall-clock time of the start (ISO 8601, UTC)."""
    reason: str = ""
    """Why it started (the offline gate's line)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_tree(root: Path) -> None:
    """Every file under ``root`` and every directory, ``root`` included, on disk: a version
    the pointer names must not come back empty after a power cut (the pointer is synced)."""
    for path in sorted(root.rglob("*"), reverse=True):  # files before their directories
        if path.is_dir():
            _fsync_dir(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself survives a power cut


class RegistryStorage(Protocol):
    """Where a registry's files live: one filesystem (:class:`LocalStorage`) or an S3
    bucket (:class:`recloop.artifacts.s3.S3Storage`).  The registry's logic is the same on
    both; a storage gives it a pointer that changes only by compare-and-swap, whole versions,
    and an append-only history."""

    location: str
    """The registry as a user names it: a directory, or ``s3://bucket/prefix``."""

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Held around one read-modify-write of the pointer (a no-op where the write itself
        is conditional)."""
        ...

    def read_pointer(self) -> tuple[bytes | None, str | None]:
        """``current.json``'s bytes (None before the first promotion) and a tag that
        :meth:`write_pointer` checks."""
        ...

    def write_pointer(self, data: bytes, *, tag: str | None) -> bool:
        """Replace the pointer, atomically, if it is still the one read with ``tag`` (None:
        if there is none yet); False, writing nothing, when it changed meanwhile."""
        ...

    def has_version(self, version: str) -> bool:
        """Whether ``version`` is published whole."""
        ...

    def put_version(self, src: Path, version: str, *, lineage: bytes) -> bool:
        """Publish the artifact directory ``src`` as ``version`` with its ``registry.json``,
        so that no reader sees a part of it; False when the version was there already (the
        first copy is kept)."""
        ...

    def local_version(self, version: str) -> Path:
        """A local directory holding the published ``version`` (a download, once, for an
        object store)."""
        ...

    def versions(self) -> list[tuple[str, bytes | None]]:
        """Every whole version with its ``registry.json`` bytes (None when it has none)."""
        ...

    def append_history(self, line: str) -> None:
        """Add one JSON line to the history, durably."""
        ...

    def history_lines(self) -> list[str]:
        """The history, oldest first."""
        ...


class LocalStorage:
    """A registry in a directory (the module docstring's layout); every change is crash-safe
    on one filesystem, and pointer changes hold an exclusive ``flock`` on ``.lock``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def read_pointer(self) -> tuple[bytes | None, str | None]:
        path = self.root / CURRENT
        return (path.read_bytes(), None) if path.is_file() else (None, None)

    def write_pointer(self, data: bytes, *, tag: str | None) -> bool:
        # the caller holds lock(): nothing changed the pointer since it was read
        _write_atomic(self.root / CURRENT, data.decode("utf-8"))
        return True

    def _dir(self, version: str) -> Path:
        return self.root / VERSIONS / version

    def has_version(self, version: str) -> bool:
        return (self._dir(version) / "manifest.json").is_file()

    def put_version(self, src: Path, version: str, *, lineage: bytes) -> bool:
        if self.has_version(version):
            return False
        dest = self._dir(version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{uuid.uuid4().hex}"
        shutil.copytree(src, tmp)
        (tmp / LINEAGE).write_bytes(lineage)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, dest)  # atomic: a version directory is always whole
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.has_version(version):
                raise
            return False  # another process published it meanwhile
        _fsync_dir(dest.parent)
        return True

    def local_version(self, version: str) -> Path:
        return self._dir(version)

    def versions(self) -> list[tuple[str, bytes | None]]:
        vdir = self.root / VERSIONS
        if not vdir.is_dir():
            return []
        out = []
        for path in vdir.iterdir():
            if path.name.startswith(".") or not (path / "manifest.json").is_file():
                continue
            lineage = path / LINEAGE
            out.append((path.name, lineage.read_bytes() if lineage.is_file() else None))
        return out

    def append_history(self, line: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / HISTORY, "a+b") as f:
            # a line torn by a crash has no newline: end it, or this one would join it and
            # be skipped with it
            torn = False
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((b"\n" if torn else b"") + line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def history_lines(self) -> list[str]:
        path = self.root / HISTORY
        return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def open_storage(location: Path | str, *, cache_dir: Path | None = None) -> RegistryStorage:
    """The storage of a registry named ``location``: ``s3://bucket/prefix`` for an S3 (or
    S3-compatible) bucket, anything else a directory."""
    if is_object_store(location):
        from recloop.artifacts.s3 import S3Storage

        return S3Storage(str(location), cache_dir=cache_dir)
    return LocalStorage(Path(location))


def is_object_store(location: Path | str | None) -> bool:
    """Whether ``location`` names a registry on an object store (``s3://...``)."""
    return isinstance(location, str) and location.startswith("s3://")


def is_registry_dir(path: Path) -> bool:
    """Whether the directory ``path`` is a registry (rather than an artifact or a run)."""
    return (path / CURRENT).is_file() or (path / VERSIONS).is_dir()


@dataclass
class _Change:
    """What a read-modify-write of the pointer decided."""

    doc: dict[str, Any] | None
    """The new pointer; None writes nothing."""
    result: Any = None
    """What the registry method returns."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """History lines (``action``, ``version`` and fields) to append once the pointer moved."""
    message: str = ""
    """Logged once the pointer moved."""


_POINTER_TRIES = 20
"""Read-modify-write attempts of the pointer before giving up (object stores: each lost
race with another writer costs one)."""


_WRITES_KEPT = 32
"""Ids of the newest pointer writes that the pointer carries (``writes``)."""


def _writes(raw: bytes | None) -> list[str]:
    """The ids of the last pointer writes, oldest first (none in older pointers)."""
    if raw is None:
        return []
    try:
        ids = json.loads(raw).get("writes", [])
    except (ValueError, AttributeError):
        return []
    return [str(i) for i in ids] if isinstance(ids, list) else []


class ArtifactRegistry:
    """Versioned artifacts with one current version (module docstring), in a directory or,
    with ``s3://bucket/prefix``, in an S3 bucket (``recloop[s3]``)."""

    def __init__(self, root: Path | str, *, cache_dir: Path | None = None) -> None:
        self.storage = open_storage(root, cache_dir=cache_dir)
        self.location = self.storage.location
        """The registry as a user names it, for messages."""

    @property
    def root(self) -> Path:
        """The registry's directory (local registries only)."""
        if not isinstance(self.storage, LocalStorage):
            raise ArtifactError(f"{self.location}: not a directory")
        return self.storage.root

    @property
    def versions_dir(self) -> Path:
        """The directory of the published versions (local registries only)."""
        return self.root / VERSIONS

    def _check_version(self, version: str) -> str:
        if (
            not version
            or "/" in version
            or version.startswith(".")
            or not self.storage.has_version(version)
        ):
            raise ArtifactError(f"{self.location}: no published version {version!r}")
        return version

    def publish(
        self,
        artifact: Path,
        *,
        parent: str | None = None,
        lineage: dict[str, Any] | None = None,
        promote: bool = False,
        reason: str = "",
    ) -> str:
        """Copy a verified artifact into the registry; returns its version.

        Publishing the same version again keeps the first copy.  ``lineage`` (data window,
        gate metrics, ...) is stored beside it with ``parent``; ``promote`` makes it current.
        """
        src = resolve_artifact_dir(Path(artifact))
        art = load_artifact(src)  # refuses anything damaged before it can be published
        version = art.model_version
        if not self.storage.has_version(version):
            doc = {"parent": parent, "published_at": _now(), "algo": art.algo, **(lineage or {})}
            data = json.dumps(doc, indent=2, default=str).encode("utf-8")
            if self.storage.put_version(src, version, lineage=data):
                self._log("publish", version, parent=parent, reason=reason)
                logger.info("published %s to %s", version, self.location)
        if promote:
            self.promote(version, reason=reason or "published")
        return version

    def _parse_pointer(self, raw: bytes | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        where = f"{self.location}/{CURRENT}"
        try:
            doc = json.loads(raw.decode("utf-8"))
            version = doc["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{where}: unreadable pointer ({exc})") from exc
        if not isinstance(version, str):
            raise ArtifactError(f"{where}: field 'version' must be a string")
        stack = doc.get("stack", [version])
        if not isinstance(stack, list) or not all(isinstance(v, str) for v in stack):
            raise ArtifactError(f"{where}: field 'stack' must be a list of versions")
        canary = doc.get("canary")
        if canary is not None:
            try:
                share = float(canary["share"])
                if not 0.0 < share < 1.0:
                    raise ValueError(f"share must lie in (0, 1), got {share}")
                doc["canary"] = Canary(
                    version=str(canary["version"]),
                    parent=str(canary["parent"]),
                    share=share,
                    salt=str(canary["salt"]),
                    since_ts=int(canary["since_ts"]),
                    started_at=str(canary.get("started_at", "")),
                    reason=str(canary.get("reason", "")),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ArtifactError(f"{where}: unreadable field 'canary' ({exc!r})") from exc
        return {**doc, "stack": stack}

    def _pointer(self) -> dict[str, Any] | None:
        return self._parse_pointer(self.storage.read_pointer()[0])

    def _update(self, decide: Callable[[dict[str, Any] | None], _Change]) -> Any:
        """One read-modify-write of the pointer: ``decide`` sees the pointer and returns the
        change.  Under the directory's lock it runs once; on an object store the write is
        conditional on the pointer read, and a lost race runs ``decide`` again on the
        pointer that won (so it must do nothing but decide)."""
        for attempt in range(_POINTER_TRIES):
            if attempt:  # lost the race: let the other writers finish (jittered backoff)
                time.sleep(random.uniform(0.0, 0.01 * 2 ** min(attempt, 6)))
            with self.storage.lock():
                raw, tag = self.storage.read_pointer()
                change = decide(self._parse_pointer(raw))
                if change.doc is None:
                    return change.result
                out = dict(change.doc)
                if isinstance(out.get("canary"), Canary):
                    out["canary"] = out["canary"].to_dict()
                # Which write this is, beside the last ones: a write refused or failed whose
                # id the pointer carries landed after all, done by an earlier try of the
                # same request (a client retry after a timeout or a 5xx, maybe with other
                # writes since); deciding again on it would apply the change twice.
                write_id = uuid.uuid4().hex
                out["writes"] = [*_writes(raw)[-(_WRITES_KEPT - 1) :], write_id]
                data = json.dumps(out, indent=2).encode()
                try:
                    done = self.storage.write_pointer(data, tag=tag)
                except ArtifactError:
                    if write_id not in _writes(self.storage.read_pointer()[0]):
                        raise
                    done = True
                if not done:
                    done = write_id in _writes(self.storage.read_pointer()[0])
                if done:
                    for line in change.history:
                        try:
                            self._log(**line)
                        except Exception:  # the change is made: say so, not that it failed
                            logger.exception(
                                "%s: %s is done, but its history line could not be written",
                                self.location,
                                line.get("action"),
                            )
                    if change.message:
                        logger.info("%s: %s", self.location, change.message)
                    return change.result
            logger.info("%s: the pointer changed meanwhile, reading it again", self.location)
        raise ArtifactError(
            f"{self.location}: the pointer changed under every one of {_POINTER_TRIES} tries"
        )

    def current(self) -> str | None:
        """The current version, or None before the first promotion."""
        doc = self._pointer()
        return None if doc is None else str(doc["version"])

    def canary(self) -> Canary | None:
        """The running canary, or None."""
        doc = self._pointer()
        return None if doc is None else doc.get("canary")

    def state(self) -> tuple[str | None, Canary | None]:
        """The current version and the running canary, from one read of the pointer."""
        doc = self._pointer()
        return (None, None) if doc is None else (str(doc["version"]), doc.get("canary"))

    def version_path(self, version: str) -> Path:
        """A published version's local directory (raises when there is none; on an object
        store, downloads it once into the cache)."""
        return self.storage.local_version(self._check_version(version))

    def start_canary(
        self,
        version: str,
        *,
        share: float,
        since_ts: int,
        reason: str = "",
        expect_current: str | None = None,
        tag: str = "",
    ) -> Canary | None:
        """Let the published ``version`` serve a ``share`` of the users beside the current
        one.  By hand (``expect_current`` None) it replaces any running canary (logging its
        stop); with ``expect_current`` -- what ``recloop loop`` does -- it starts only if
        that version is still current and no canary runs, and returns None otherwise, so
        an operator's canary, promotion or rollback made meanwhile stands.  ``tag`` is
        recorded in the history line (the loop's round)."""
        if not 0.0 < share < 1.0:
            raise ArtifactError(f"canary share must lie in (0, 1), got {share}")
        load_artifact(self.version_path(version))

        def decide(pointer: dict[str, Any] | None) -> _Change:
            if pointer is None:
                raise ArtifactError(f"{self.location}: a canary needs a current version beside it")
            if pointer["version"] == version:
                raise ArtifactError(f"{self.location}: {version} is already current")
            running = pointer.get("canary")
            if expect_current is not None and (
                pointer["version"] != expect_current or running is not None
            ):
                return _Change(None)
            history = []
            if running is not None:
                history.append(dict(action="canary-stop", version=running.version,
                                    parent=running.parent,
                                    reason=f"replaced by canary {version}"))  # fmt: skip
            canary = Canary(
                version=version,
                parent=str(pointer["version"]),
                share=float(share),
                # fresh for every canary (a version canaried again starts later in the
                # log) and reproducible from the log alone
                salt=f"canary-{version}-{int(since_ts)}",
                since_ts=int(since_ts),
                started_at=_now(),
                reason=reason,
            )
            history.append(dict(
                action="canary-start", version=version, parent=canary.parent, share=share,
                salt=canary.salt, since_ts=canary.since_ts, tag=tag, reason=reason,
            ))  # fmt: skip
            message = f"canary {version} on {100 * share:.0f} % of users ({reason})"
            return _Change({**pointer, "canary": canary}, canary, history, message)

        return cast(Canary | None, self._update(decide))

    def stop_canary(self, *, reason: str = "") -> Canary | None:
        """End the running canary without promoting it; returns it (None when none ran)."""

        def decide(pointer: dict[str, Any] | None) -> _Change:
            canary = None if pointer is None else pointer.get("canary")
            if pointer is None or canary is None:
                return _Change(None)
            return self._stop(pointer, canary, reason)

        return cast(Canary | None, self._update(decide))

    def _stop(self, pointer: dict[str, Any], canary: Canary, reason: str) -> _Change:
        return _Change(
            {k: v for k, v in pointer.items() if k != "canary"},
            canary,
            [dict(action="canary-stop", version=canary.version, parent=canary.parent,
                  reason=reason)],
            f"canary {canary.version} stopped ({reason})",
        )  # fmt: skip

    def finish_canary(self, canary: Canary, *, promote: bool, reason: str = "") -> bool:
        """Promote or stop ``canary`` -- only if the pointer still names it (same version,
        salt and start) beside the version it started from; False, changing nothing, when someone
        stopped, replaced, promoted or rolled back meanwhile."""
        if promote:
            load_artifact(self.version_path(canary.version))

        def decide(pointer: dict[str, Any] | None) -> _Change:
            now = None if pointer is None else pointer.get("canary")
            if (
                pointer is None
                or now is None
                or (now.version, now.salt, now.started_at)
                != (canary.version, canary.salt, canary.started_at)
                or pointer["version"] != canary.parent
            ):
                return _Change(None, False)
            change = (
                self._promote(canary.version, pointer, reason=reason)
                if promote
                else self._stop(pointer, canary, reason)
            )
            change.result = True
            return change

        return bool(self._update(decide))

    def current_path(self) -> Path:
        """The current version's local directory (raises when nothing is current)."""
        version = self.current()
        if version is None:
            raise ArtifactError(f"{self.location}: no current version (publish and promote one)")
        return self.version_path(version)

    def promote(
        self, version: str, *, reason: str = "", expect_current: str | None = None, tag: str = ""
    ) -> bool:
        """Make ``version`` current (it must be published and load cleanly); ends any
        canary.  With ``expect_current``, only if that version is still current (False,
        changing nothing, otherwise).  ``tag`` goes on the history line (the loop's round,
        so a restarted controller can tell its promotion was done before a crash)."""
        load_artifact(self.version_path(version))

        def decide(pointer: dict[str, Any] | None) -> _Change:
            now = None if pointer is None else pointer["version"]
            if expect_current is not None and now != expect_current:
                return _Change(None, False)
            change = self._promote(version, pointer, reason=reason)
            if tag:
                change.history[0]["tag"] = tag
            change.result = True
            return change

        return bool(self._update(decide))

    def _promote(self, version: str, pointer: dict[str, Any] | None, *, reason: str) -> _Change:
        previous = None if pointer is None else pointer["version"]
        stack = [] if pointer is None else list(pointer["stack"])
        doc = {
            "version": version,
            "previous": previous,
            "promoted_at": _now(),
            "reason": reason,
            "stack": [*stack, version],
        }
        return _Change(
            doc,
            None,
            [dict(action="promote", version=version, previous=previous, reason=reason)],
            f"current version {version} (was {previous}; {reason})",
        )

    def rollback(self, *, reason: str = "") -> str:
        """Make the version that was current before the current one current again; ends
        any canary."""

        def decide(pointer: dict[str, Any] | None) -> _Change:
            if pointer is None:
                raise ArtifactError(f"{self.location}: nothing to roll back (no current version)")
            now = pointer["version"]
            stack = list(pointer["stack"])
            while stack and stack[-1] == now:  # a version promoted twice is left once
                stack.pop()
            if not stack:
                raise ArtifactError(f"{self.location}: no earlier version to roll back to")
            target = stack[-1]
            load_artifact(self.version_path(target))
            doc = {
                "version": target,
                "previous": now,
                "promoted_at": _now(),
                "reason": reason,
                "stack": stack,
            }
            return _Change(
                doc,
                target,
                [dict(action="rollback", version=target, previous=now, reason=reason)],
                f"rolled back to {target} (was {now}; {reason})",
            )

        return str(self._update(decide))

    def entries(self) -> list[RegistryEntry]:
        """Published versions, oldest first."""
        current = self.current()
        out = []
        for version, raw in self.storage.versions():
            lineage = json.loads(raw) if raw is not None else {}
            out.append(
                RegistryEntry(
                    version=version,
                    location=f"{self.location}/{VERSIONS}/{version}",
                    algo=str(lineage.get("algo", "")),
                    lineage=lineage,
                    current=version == current,
                )
            )
        return sorted(out, key=lambda e: (str(e.lineage.get("published_at", "")), e.version))

    def history(self) -> list[dict[str, Any]]:
        """Every publish, promote and rollback, oldest first (a torn last line is skipped)."""
        out = []
        for line in self.storage.history_lines():
            try:
                out.append(json.loads(line))
            except ValueError:
                logger.warning("%s: skipping a torn history line", self.location)
        return out

    def _log(self, action: str, version: str, **fields: Any) -> None:
        line = json.dumps({"at": _now(), "action": action, "version": version, **fields})
        self.storage.append_history(line)
