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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    path: Path
    """Its directory."""
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


class ArtifactRegistry:
    """Versioned artifacts under ``root`` with one current version (module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS

    def _check_version(self, version: str) -> Path:
        path = self.versions_dir / version
        if "/" in version or version.startswith(".") or not (path / "manifest.json").is_file():
            raise ArtifactError(f"{self.root}: no published version {version!r}")
        return path

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
        dest = self.versions_dir / version
        if not (dest / "manifest.json").is_file():
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.versions_dir / f".tmp-{uuid.uuid4().hex}"
            shutil.copytree(src, tmp)
            doc = {"parent": parent, "published_at": _now(), "algo": art.algo, **(lineage or {})}
            (tmp / LINEAGE).write_text(json.dumps(doc, indent=2, default=str))
            try:
                os.rename(tmp, dest)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (dest / "manifest.json").is_file():
                    raise
            self._log("publish", version, parent=parent, reason=reason)
            logger.info("published %s to %s", version, self.root)
        if promote:
            self.promote(version, reason=reason or "published")
        return version

    def _pointer(self) -> dict[str, Any] | None:
        path = self.root / CURRENT
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            version = doc["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path}: unreadable pointer ({exc})") from exc
        if not isinstance(version, str):
            raise ArtifactError(f"{path}: field 'version' must be a string")
        stack = doc.get("stack", [version])
        if not isinstance(stack, list) or not all(isinstance(v, str) for v in stack):
            raise ArtifactError(f"{path}: field 'stack' must be a list of versions")
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
                raise ArtifactError(f"{path}: unreadable field 'canary' ({exc!r})") from exc
        return {**doc, "stack": stack}

    def current(self) -> str | None:
        """The current version, or None before the first promotion."""
        doc = self._pointer()
        return None if doc is None else str(doc["version"])

    def canary(self) -> Canary | None:
        """The running canary, or None."""
        doc = self._pointer()
        return None if doc is None else doc.get("canary")

    def version_path(self, version: str) -> Path:
        """A published version's directory (raises when there is none)."""
        return self._check_version(version)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the registry's pointer for one read-modify-write."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

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
        path = self._check_version(version)
        load_artifact(path)
        with self._locked():
            pointer = self._pointer()
            if pointer is None:
                raise ArtifactError(f"{self.root}: a canary needs a current version beside it")
            if pointer["version"] == version:
                raise ArtifactError(f"{self.root}: {version} is already current")
            running = pointer.get("canary")
            if expect_current is not None and (
                pointer["version"] != expect_current or running is not None
            ):
                return None
            if running is not None:
                self._log("canary-stop", running.version, parent=running.parent,
                          reason=f"replaced by canary {version}")  # fmt: skip
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
            self._write_pointer({**pointer, "canary": canary.to_dict()})
            self._log(
                "canary-start", version, parent=canary.parent, share=share, salt=canary.salt,
                since_ts=canary.since_ts, tag=tag, reason=reason,
            )  # fmt: skip
        logger.info(
            "%s: canary %s on %.0f %% of users (%s)", self.root, version, 100 * share, reason
        )
        return canary

    def stop_canary(self, *, reason: str = "") -> Canary | None:
        """End the running canary without promoting it; returns it (None when none ran)."""
        with self._locked():
            pointer = self._pointer()
            canary = None if pointer is None else pointer.get("canary")
            if pointer is None or canary is None:
                return None
            self._stop(pointer, canary, reason)
            return canary

    def _stop(self, pointer: dict[str, Any], canary: Canary, reason: str) -> None:
        self._write_pointer({k: v for k, v in pointer.items() if k != "canary"})
        self._log("canary-stop", canary.version, parent=canary.parent, reason=reason)
        logger.info("%s: canary %s stopped (%s)", self.root, canary.version, reason)

    def finish_canary(self, canary: Canary, *, promote: bool, reason: str = "") -> bool:
        """Promote or stop ``canary`` -- only if the pointer still names it (same version,
        salt and start) beside the version it started from; False, changing nothing, when someone
        stopped, replaced, promoted or rolled back meanwhile."""
        if promote:
            load_artifact(self._check_version(canary.version))
        with self._locked():
            pointer = self._pointer()
            now = None if pointer is None else pointer.get("canary")
            if (
                pointer is None
                or now is None
                or (now.version, now.salt, now.started_at)
                != (canary.version, canary.salt, canary.started_at)
                or pointer["version"] != canary.parent
            ):
                return False
            if promote:
                self._promote(canary.version, pointer, reason=reason)
            else:
                self._stop(pointer, canary, reason)
            return True

    def _write_pointer(self, doc: dict[str, Any]) -> None:
        out = dict(doc)
        if isinstance(out.get("canary"), Canary):
            out["canary"] = out["canary"].to_dict()
        _write_atomic(self.root / CURRENT, json.dumps(out, indent=2))

    def current_path(self) -> Path:
        """The current version's directory (raises when nothing is current)."""
        version = self.current()
        if version is None:
            raise ArtifactError(f"{self.root}: no current version (publish and promote one)")
        return self._check_version(version)

    def promote(self, version: str, *, reason: str = "", expect_current: str | None = None) -> bool:
        """Make ``version`` current (it must be published and load cleanly); ends any
        canary.  With ``expect_current``, only if that version is still current (False,
        changing nothing, otherwise)."""
        path = self._check_version(version)
        load_artifact(path)
        with self._locked():
            pointer = self._pointer()
            now = None if pointer is None else pointer["version"]
            if expect_current is not None and now != expect_current:
                return False
            self._promote(version, pointer, reason=reason)
        return True

    def _promote(self, version: str, pointer: dict[str, Any] | None, *, reason: str) -> None:
        previous = None if pointer is None else pointer["version"]
        stack = [] if pointer is None else list(pointer["stack"])
        doc = {
            "version": version,
            "previous": previous,
            "promoted_at": _now(),
            "reason": reason,
            "stack": [*stack, version],
        }
        _write_atomic(self.root / CURRENT, json.dumps(doc, indent=2))
        self._log("promote", version, previous=previous, reason=reason)
        logger.info("current version of %s: %s (was %s; %s)", self.root, version, previous, reason)

    def rollback(self, *, reason: str = "") -> str:
        """Make the version that was current before the current one current again; ends
        any canary."""
        with self._locked():
            return self._rollback(reason=reason)

    def _rollback(self, *, reason: str) -> str:
        pointer = self._pointer()
        if pointer is None:
            raise ArtifactError(f"{self.root}: nothing to roll back (no current version)")
        now = pointer["version"]
        stack = list(pointer["stack"])
        while stack and stack[-1] == now:  # a version promoted twice is left once
            stack.pop()
        if not stack:
            raise ArtifactError(f"{self.root}: no earlier version to roll back to")
        target = stack[-1]
        path = self._check_version(target)
        load_artifact(path)
        doc = {
            "version": target,
            "previous": now,
            "promoted_at": _now(),
            "reason": reason,
            "stack": stack,
        }
        _write_atomic(self.root / CURRENT, json.dumps(doc, indent=2))
        self._log("rollback", target, previous=now, reason=reason)
        return target

    def entries(self) -> list[RegistryEntry]:
        """Published versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        current = self.current()
        out = []
        for path in self.versions_dir.iterdir():
            if path.name.startswith(".") or not (path / "manifest.json").is_file():
                continue
            lineage = json.loads((path / LINEAGE).read_text()) if (path / LINEAGE).is_file() else {}
            out.append(
                RegistryEntry(
                    version=path.name,
                    path=path,
                    algo=str(lineage.get("algo", "")),
                    lineage=lineage,
                    current=path.name == current,
                )
            )
        return sorted(out, key=lambda e: (str(e.lineage.get("published_at", "")), e.version))

    def history(self) -> list[dict[str, Any]]:
        """Every publish, promote and rollback, oldest first (a torn last line is skipped)."""
        path = self.root / HISTORY
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                logger.warning("%s: skipping a torn history line", path)
        return out

    def _log(self, action: str, version: str, **fields: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"at": _now(), "action": action, "version": version, **fields})
        with open(self.root / HISTORY, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
