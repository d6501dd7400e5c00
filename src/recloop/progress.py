"""Progress bars and logging set-up shared by the library and the CLI."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_ENV = "RECLOOP_NO_PROGRESS"


def progress_enabled() -> bool:
    """Bars show only on a terminal, unless ``RECLOOP_NO_PROGRESS`` is set (``--no-progress``)."""
    return sys.stderr.isatty() and os.environ.get(_ENV, "") in ("", "0")


def disable_progress() -> None:
    os.environ[_ENV] = "1"


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar on stderr, off when not a TTY or when asked."""
    # imported here: tqdm.auto costs ~30 ms, which `recloop --help` need not pay
    from tqdm.auto import tqdm

    show = progress_enabled() if enabled is None else enabled
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=not show, leave=False, **kwargs
    )


def iterate(iterable: Iterable[T], **kwargs: Any) -> Iterator[T]:
    """Typed wrapper of :func:`progress` for plain iteration."""
    yield from progress(iterable, **kwargs)


def setup_logging(level: int = logging.INFO) -> None:
    """One stderr handler with a compact format; idempotent."""
    root = logging.getLogger("recloop")
    if not any(getattr(h, "_recloop", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._recloop = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
