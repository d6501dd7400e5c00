"""Fetch the canonical GroupLens MovieLens archives into a cache, verified and unpacked.

Layout of the cache (``$RECLOOP_CACHE``, default ``~/.cache/recloop``)::

    movielens-100k/ml-100k/u.data ...   the unpacked archive
    movielens-100k/.complete            sha256 of the archive it came from

A dataset whose ``.complete`` marker exists is returned without touching the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from recloop.errors import DataError, Location, RecloopError
from recloop.progress import progress

logger = logging.getLogger(__name__)

CACHE_ENV = "RECLOOP_CACHE"
ML100K_ENV = "RECLOOP_ML100K"
_MARKER = ".complete"


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """One downloadable archive."""

    name: str
    """Registry name, e.g. movielens-100k; also the cache sub-directory."""
    url: str
    """Canonical download URL."""
    sha256: str
    """SHA-256 of the archive (hex)."""
    size: int
    """Size of the archive in bytes."""
    folder: str
    """Top-level folder inside the archive, returned by :func:`download`."""
    format: str = "movielens"
    """Loader format of the unpacked folder."""
    md5: str = ""
    """MD5 that GroupLens publishes beside the archive (``<url>.md5``), for reference."""


_GROUPLENS = "https://files.grouplens.org/datasets/movielens"

# SHA-256 and sizes as pinned by TensorFlow Datasets (url_checksums/movielens.txt) and
# matching GroupLens' published MD5s; MovieLens archives are frozen releases.
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="movielens-100k",
            url=f"{_GROUPLENS}/ml-100k.zip",
            sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
            size=4_924_029,
            folder="ml-100k",
            md5="0e33842e24a9c977be4e0107933c0723",
        ),
        DatasetInfo(
            name="movielens-1m",
            url=f"{_GROUPLENS}/ml-1m.zip",
            sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
            size=5_917_549,
            folder="ml-1m",
            md5="c4d9eecfca2ab87c1945afe126590906",
        ),
        DatasetInfo(
            name="movielens-20m",
            url=f"{_GROUPLENS}/ml-20m.zip",
            sha256="96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
            size=198_702_078,
            folder="ml-20m",
            md5="cd245b17a1ae2cc31bb14903e1204af3",
        ),
    )
}


def default_cache_dir() -> Path:
    """``$RECLOOP_CACHE`` or ``~/.cache/recloop``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recloop"


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(DATASETS)
        raise RecloopError(f"unknown dataset {name!r} (known: {known})") from None


def download(
    name: str,
    cache_dir: Path | None = None,
    *,
    base_url: str | None = None,
    force: bool = False,
    timeout: float = 30.0,
) -> Path:
    """Download, verify and unpack dataset ``name``; return the unpacked folder.

    ``base_url`` replaces the directory part of the canonical URL (mirrors, tests).
    Idempotent: a completed download is reused unless ``force``.
    """
    info = dataset_info(name)
    if base_url is not None:
        info = replace(info, url=f"{base_url.rstrip('/')}/{info.url.rsplit('/', 1)[1]}")
    return fetch(info, cache_dir or default_cache_dir(), force=force, timeout=timeout)


def cached(info: DatasetInfo, cache_dir: Path) -> Path | None:
    """The unpacked folder of a completed download in ``cache_dir``, if any."""
    target = cache_dir / info.name
    marker = target / _MARKER
    if marker.is_file() and marker.read_text().strip() == info.sha256:
        return target / info.folder
    return None


def fetch(
    info: DatasetInfo, cache_dir: Path, *, force: bool = False, timeout: float = 30.0
) -> Path:
    """Download ``info.url`` into ``cache_dir``, check its SHA-256, unpack it safely."""
    if not force and (done := cached(info, cache_dir)) is not None:
        logger.info("%s: using the cached copy in %s", info.name, done)
        return done
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / f"{info.name}.zip.part"
    try:
        digest = _stream(info, archive, timeout=timeout)
        if digest != info.sha256:
            raise RecloopError(
                f"{info.name}: checksum mismatch for {info.url}: expected sha256 {info.sha256}, "
                f"got {digest}; the download was deleted (try again, or check the mirror)"
            )
        target = cache_dir / info.name
        staging = Path(tempfile.mkdtemp(prefix=f".{info.name}-", dir=cache_dir))
        try:
            extract_zip(archive, staging)
            if not (staging / info.folder).is_dir():
                raise DataError(
                    f"the archive has no {info.folder}/ folder", location=Location(file=info.url)
                )
            (staging / _MARKER).write_text(info.sha256 + "\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    finally:
        archive.unlink(missing_ok=True)
    logger.info("%s: unpacked into %s", info.name, target)
    return target / info.folder


def _unreachable(info: DatasetInfo, reason: object) -> RecloopError:
    env = f", or set {ML100K_ENV}=PATH/{info.folder}" if info.name == "movielens-100k" else ""
    return RecloopError(
        f"cannot download {info.name} from {info.url}: {reason}. The network looks "
        f"unreachable. Fetch {info.url} on a connected machine, unzip it, and point recloop at "
        f"the local copy: --format {info.format} --input PATH/{info.folder}{env}"
    )


def _stream(info: DatasetInfo, dest: Path, *, timeout: float) -> str:
    """Write the response body to ``dest``; return its SHA-256."""
    # imported here: http.client and urllib.request cost ~50 ms, paid by every command
    # that lists DATASETS in its help otherwise
    import http.client
    import urllib.error
    import urllib.request

    sha = hashlib.sha256()
    request = urllib.request.Request(info.url, headers={"User-Agent": "recloop"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or info.size)
            with progress(total=total, desc=info.name, unit="B", unit_scale=True) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    sha.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise RecloopError(
            f"cannot download {info.name} from {info.url}: HTTP {exc.code}"
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise _unreachable(info, getattr(exc, "reason", exc)) from None
    except http.client.HTTPException as exc:
        raise RecloopError(
            f"download of {info.name} from {info.url} was interrupted ({exc!r}); try again"
        ) from None
    return sha.hexdigest()


def extract_zip(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into ``dest``, refusing members that would land outside it."""
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                parts = PurePosixPath(member.filename.replace("\\", "/")).parts
                mode = member.external_attr >> 16
                target = root.joinpath(*parts).resolve() if parts else root
                if (
                    member.filename.startswith(("/", "\\"))
                    or ".." in parts
                    or (parts and ":" in parts[0])
                    or not target.is_relative_to(root)
                    or stat.S_ISLNK(mode)
                ):
                    raise DataError(
                        f"unsafe archive member {member.filename!r} (absolute path, '..' or "
                        "link); refusing to unpack",
                        location=Location(file=str(archive)),
                    )
            zf.extractall(root)
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"not a zip archive ({exc})", location=Location(file=str(archive))
        ) from None


class LocatedDataset(NamedTuple):
    """Where a dataset was found, and the loader format to read it with."""

    format: str
    path: Path


def _detect(path: Path) -> str | None:
    if path.is_dir() and any(path.glob("*.inter")):
        return "recbole"
    if path.is_file() and path.suffix == ".inter":
        return "recbole"
    if (path / "u.data").is_file() or (path / "ml-100k" / "u.data").is_file():
        return "movielens"
    return None


def _repo_root() -> Path | None:
    here = Path(__file__).resolve()
    # src/recloop/data/download.py in a source checkout; absent for an installed wheel.
    root = here.parents[3]
    return root if (root / "pyproject.toml").is_file() else None


def locate_movielens_100k(cache_dir: Path | None = None) -> LocatedDataset:
    """Find MovieLens-100K locally, else download it.

    Looks at ``$RECLOOP_ML100K``, then ``../shared/datasets/ml-100k`` beside the current
    directory and beside the repository, then the download cache.
    """
    env = os.environ.get(ML100K_ENV)
    if env:
        path = Path(env).expanduser()
        fmt = _detect(path)
        if fmt is None:
            raise DataError(
                f"{ML100K_ENV} points here, but there is no MovieLens-100K in it (expected "
                "RecBole ml-100k.inter or GroupLens u.data)",
                location=Location(file=str(path)),
            )
        return LocatedDataset(fmt, path)
    bases = [Path.cwd()] + ([root] if (root := _repo_root()) is not None else [])
    for base in bases:
        candidate = base.parent / "shared" / "datasets" / "ml-100k"
        if (fmt := _detect(candidate)) is not None:
            return LocatedDataset(fmt, candidate)
    info = DATASETS["movielens-100k"]
    cache = cache_dir or default_cache_dir()
    if (done := cached(info, cache)) is not None:
        return LocatedDataset("movielens", done)
    return LocatedDataset("movielens", fetch(info, cache))
