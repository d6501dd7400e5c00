"""What /admin/reload needs beyond the service: where it may load from, how every worker
process hears of it, and log fields that a client cannot forge lines into.

Worker processes of one service share nothing but the file system, so a reload is shared
through one small JSON file (:class:`ReloadBroadcast`): the worker that reloads writes the
artifact path, its version and a fresh nonce there (atomically: temporary file, then
``os.replace``); every worker ``stat``\\ s the file about once a second in a background task —
never on the request path — and loads the artifact when the nonce changes.  This works the
same under ``recloop serve --workers N`` (uvicorn's supervisor), plain uvicorn and gunicorn,
with every store (memory and SQLite included), and a worker that (re)starts reads the file
first, so it serves what its siblings serve.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson

from recloop.errors import RecloopError

logger = logging.getLogger(__name__)

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def log_safe(value: object) -> str:
    """``str(value)`` with control characters (newlines, escape sequences, NUL, Unicode line
    separators) written as ``\\xNN``: a client-chosen value in a log line stays one line."""
    return str(value).translate(_CONTROL)


class ArtifactRootError(RecloopError):
    """A reload path outside the artifact root (the message never says if it exists)."""


def reload_target(requested: str, root: Path) -> Path:
    """``requested`` (relative paths read from ``root``) with symlinks and ``..`` resolved;
    raises :class:`ArtifactRootError` when that is not ``root`` or below it.

    ``root`` must already be resolved.  Whether the path exists changes nothing here: the
    same refusal for both, so the route cannot be used to probe the file system.
    """
    refused = ArtifactRootError(
        f"artifact {requested!r} refused: reloads may only read the artifact root "
        "(RECLOOP_ARTIFACT_ROOT)"
    )
    try:
        target = (root / requested).resolve()  # an absolute ``requested`` replaces ``root``
    except (ValueError, OSError, RuntimeError):  # NUL byte, symlink loop: no such artifact
        raise refused from None
    if target != root and not target.is_relative_to(root):
        raise refused
    return target


@dataclass(frozen=True, kw_only=True, slots=True)
class ReloadNotice:
    """One line of the shared reload state."""

    artifact: Path
    """Artifact directory to serve."""
    model_version: str
    """Its version, as loaded by the worker that published it."""
    nonce: str
    """Unique per publication: a reload of the same path is news too."""


class ReloadBroadcast:
    """The shared reload state of one service's workers: a JSON file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self._nonce: str | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        # os.replace gives every publication a new inode; mtime and size guard the rest
        return st.st_ino, st.st_mtime_ns, st.st_size

    def publish(self, artifact: Path, model_version: str) -> ReloadNotice:
        """Tell every worker to serve ``artifact`` (this one already does)."""
        notice = ReloadNotice(
            artifact=Path(artifact), model_version=model_version, nonce=uuid.uuid4().hex
        )
        blob = orjson.dumps(
            {
                "artifact": str(notice.artifact),
                "model_version": notice.model_version,
                "nonce": notice.nonce,
            }
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".reload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._nonce = notice.nonce
        self._seen = self._signature()
        return notice

    def current(self) -> ReloadNotice | None:
        """What the file says now (None: no file, or one that cannot be read, logged)."""
        self._seen = self._signature()
        if self._seen is None:
            return None
        try:
            doc = orjson.loads(self.path.read_bytes())
            notice = ReloadNotice(
                artifact=Path(doc["artifact"]),
                model_version=str(doc["model_version"]),
                nonce=str(doc["nonce"]),
            )
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("reload state %s unreadable, ignored: %s", self.path, log_safe(exc))
            return None
        self._nonce = notice.nonce
        return notice

    def poll(self) -> ReloadNotice | None:
        """A publication this process has not acted on yet, else None; one ``stat`` when
        nothing changed."""
        if self._signature() == self._seen:
            return None
        previous = self._nonce
        notice = self.current()
        if notice is None or notice.nonce == previous:
            return None
        return notice
