"""An artifact registry in an S3 bucket: ``s3://bucket/prefix`` (``pip install 'recloop[s3]'``).

The layout is the directory registry's (:mod:`recloop.artifacts.registry`), as keys under
``prefix/``::

    versions/<model_version>/...    the artifact's files (manifest.json, weights, id maps)
    versions/<model_version>/registry.json   lineage; uploaded last, and only once
    current.json                    changed only by conditional PutObject
    history/<time>-<random>.json    one object per history line

What replaces the directory's atomic renames and lock:

- **The pointer** is written with ``If-Match: <ETag read>`` (or ``If-None-Match: *`` when
  there was none), so of two writers that read the same pointer one wins and the other gets
  412 and decides again on the winner's pointer.  The pointer carries the ids of its last
  32 writes: a write refused (or failed) whose id is among them landed after all, done by an
  earlier try of the same request (a client retry after a timeout or a 5xx, other writes
  maybe since), and is not applied again.  Amazon S3 has had conditional writes since 2024,
  MinIO, Ceph RGW and Cloudflare R2 have them too; a store that ignores the headers (check
  yours) would let a lost race overwrite.
- **A version** is whole once its ``registry.json`` is there: every file of the artifact
  goes first, and the lineage's put is ``If-None-Match: *``, so of two publishers of one
  version the first to finish keeps its lineage.  Their artifacts are the same model (the
  version hashes the weights and everything else that changes behaviour), though the
  manifest's bookkeeping (creation time, metrics) may end up from either.  A publish that
  died half way leaves files no reader counts; publishing again completes it.
- **The history** has no append: each line is its own object, named by the writer's clock
  when the pointer had moved (writers on several machines: as far as their clocks agree).

Readers (services, the loop's warm start) download a version into a local cache (once per
cache; workers that miss it at the same moment each download it),
``RECLOOP_REGISTRY_CACHE`` or ``~/.cache/recloop/registry``, as
``<cache>/<bucket>/<prefix>/<version>/``: downloaded into a temporary directory, synced,
checked by :func:`recloop.artifacts.load_artifact` (the weights' and id maps' sha256 against
the manifest, the manifest's schema) and only then renamed into place, so a cached version
is whole and sound.  A damaged version is never cached; what a download left behind when its
process died is removed by a later download once nothing in it changed for six hours.

Credentials, region and endpoint come from boto3's usual places (environment, ``~/.aws``,
instance roles); ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) points at a non-AWS store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recloop.errors import ArtifactError, ConfigError, RegistryUnreachableError

CACHE_ENV = "RECLOOP_REGISTRY_CACHE"
"""Environment variable naming the local cache of downloaded versions."""

_VERSIONS = "versions"
_CURRENT = "current.json"
_HISTORY = "history"
_MANIFEST = "manifest.json"
_LINEAGE = "registry.json"
_STALE_S = 6 * 3600.0
"""Time since anything in a download's temporary directory last changed after which it is
taken for a dead process's (a live download keeps writing its current file)."""


def _default_cache() -> Path:
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "recloop" / "registry"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix``) (prefix without slashes
    at either end; empty for the bucket's root)."""
    if not url.startswith("s3://"):
        raise ConfigError(f"{url!r}: an S3 registry is named s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ConfigError(f"{url!r}: no bucket (s3://BUCKET[/PREFIX])")
    return bucket, prefix.strip("/")


class S3Storage:
    """:class:`recloop.artifacts.registry.RegistryStorage` on an S3 bucket (module
    docstring).  ``client`` is a boto3 S3 client (default: ``boto3.client("s3")``)."""

    def __init__(self, url: str, *, cache_dir: Path | None = None, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.location = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        if client is None:
            try:
                import boto3
            except ImportError as exc:
                raise ConfigError(
                    f"{self.location}: an S3 registry needs boto3: pip install 'recloop[s3]'"
                ) from exc
            client = boto3.client("s3")
        self.client = client
        self.cache = (cache_dir or _default_cache()) / self.bucket / (self.prefix or "_root")

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _code(self, exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
            return obj["Body"].read(), str(obj["ETag"])  # the body streams: read it here
        except Exception as exc:
            if self._code(exc) in {"NoSuchKey", "404", "NotFound"}:
                return None
            raise RegistryUnreachableError(f"s3://{self.bucket}/{key}: {exc}") from exc

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if self._code(exc) in {"NoSuchKey", "404", "NotFound"}:
                return False
            raise RegistryUnreachableError(f"s3://{self.bucket}/{key}: {exc}") from exc
        return True

    def _put(self, key: str, data: bytes, **condition: str) -> bool:
        """Put ``data``; False when a condition (IfMatch / IfNoneMatch) did not hold."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
        except Exception as exc:
            # 409 ConditionalRequestConflict: a concurrent conditional write; S3 asks to
            # read again and retry, as for a failed precondition
            if self._code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict"}:
                return False
            raise RegistryUnreachableError(f"s3://{self.bucket}/{key}: {exc}") from exc
        return True

    def _keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        try:
            return [str(obj["Key"]) for page in pages for obj in page.get("Contents", [])]
        except Exception as exc:
            raise RegistryUnreachableError(f"s3://{self.bucket}/{prefix}: {exc}") from exc

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        yield  # the pointer's write is conditional instead

    def read_pointer(self) -> tuple[bytes | None, str | None]:
        got = self._get(self._key(_CURRENT))
        return (None, None) if got is None else got

    def write_pointer(self, data: bytes, *, tag: str | None) -> bool:
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        return self._put(self._key(_CURRENT), data, **condition)

    def has_version(self, version: str) -> bool:
        return self._exists(self._key(_VERSIONS, version, _LINEAGE))

    def put_version(self, src: Path, version: str, *, lineage: bytes) -> bool:
        if self.has_version(version):
            return False
        files = sorted(p for p in Path(src).rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(src).as_posix()
            if rel != _LINEAGE:
                key = self._key(_VERSIONS, version, rel)
                try:
                    self.client.upload_file(str(path), self.bucket, key)
                except Exception as exc:
                    raise RegistryUnreachableError(f"s3://{self.bucket}/{key}: {exc}") from exc
        # last, and once: its presence makes the version whole
        key = self._key(_VERSIONS, version, _LINEAGE)
        if self._put(key, lineage, IfNoneMatch="*"):
            return True
        got = self._get(key)
        if got is not None and got[0] == lineage:  # ours, landed before a client retry
            return True
        if got is None:  # 409: another publisher's write still under way
            raise ArtifactError(
                f"{self.location}: publishing {version} met another publisher's; publish again"
            )
        return False  # another publisher finished first; its lineage stands

    def local_version(self, version: str) -> Path:
        dest = self.cache / version
        if (dest / _MANIFEST).is_file():
            return dest  # checked before it was cached; a version never changes once whole
        from recloop.artifacts.bundle import load_artifact

        base = self._key(_VERSIONS, version) + "/"
        # "folder" markers (keys ending in /) that some consoles create hold no file
        keys = [k for k in self._keys(base) if not k.endswith("/")]
        if base + _LINEAGE not in keys:
            raise ArtifactError(f"{self.location}: no published version {version!r}")
        self.cache.mkdir(parents=True, exist_ok=True)
        for old in self.cache.glob(".tmp-*"):  # left by a process killed mid-download
            with contextlib.suppress(OSError):
                changed = max([old.stat().st_mtime, *(f.stat().st_mtime for f in old.rglob("*"))])
                if time.time() - changed > _STALE_S:
                    shutil.rmtree(old, ignore_errors=True)
        tmp = self.cache / f".tmp-{uuid.uuid4().hex}"
        try:
            for key in keys:
                rel = key.removeprefix(base)
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise ArtifactError(f"s3://{self.bucket}/{key}: not a file of {version}")
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.client.download_file(self.bucket, key, str(out))
                except Exception as exc:
                    raise RegistryUnreachableError(f"s3://{self.bucket}/{key}: {exc}") from exc
                with open(out, "rb") as f:
                    os.fsync(f.fileno())  # a power cut cannot leave a cached half file
            load_artifact(tmp)  # a damaged download is refused here, never cached
            try:
                os.rename(tmp, dest)
            except OSError:
                if not (dest / _MANIFEST).is_file():  # not another reader's finished copy
                    raise
            dir_fd = os.open(self.cache, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def versions(self) -> list[tuple[str, bytes | None]]:
        base = self._key(_VERSIONS) + "/"
        out = []
        for key in self._keys(base):
            version, _, rest = key.removeprefix(base).partition("/")
            if rest == _LINEAGE and version and not version.startswith("."):
                got = self._get(self._key(_VERSIONS, version, _LINEAGE))
                out.append((version, None if got is None else got[0]))
        return out

    def append_history(self, line: str) -> None:
        at = str(json.loads(line).get("at", ""))
        # ISO times sort as text; the random part keeps two lines of one microsecond apart
        self._put(self._key(_HISTORY, f"{at}-{uuid.uuid4().hex[:12]}.json"), line.encode())

    def history_lines(self) -> list[str]:
        out = []
        for key in sorted(self._keys(self._key(_HISTORY) + "/")):
            got = self._get(key)
            if got is not None:
                out.append(got[0].decode("utf-8"))
        return out
