"""Errors that name what is wrong and where.

Every user-facing failure derives from :class:`RecloopError`; the CLI prints its message
without a traceback and exits with status 2.
"""

from __future__ import annotations

from dataclasses import dataclass


class RecloopError(Exception):
    """Base class for errors caused by user input (data, config, artifacts)."""


class ConfigError(RecloopError):
    """A config field is unknown, missing or of the wrong type."""


@dataclass(frozen=True, kw_only=True)
class Location:
    """Where a bad value sits in an input file."""

    file: str
    """Path or name of the file."""
    line: int | None = None
    """1-based physical line number in the file, header included."""
    column: str | None = None
    """Column (field) name."""
    value: str | None = None
    """The offending raw value, as read."""

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.column is not None:
            parts.append(f'column "{self.column}"')
        return " ".join([parts[0]] + ([", ".join(parts[1:])] if len(parts) > 1 else []))


class DataError(RecloopError):
    """Bad input data; the message starts with the file, line and column."""

    def __init__(self, message: str, *, location: Location | None = None) -> None:
        self.location = location
        self.reason = message
        super().__init__(f"{location}: {message}" if location is not None else message)


class PrepareError(DataError):
    """Preparation cannot go on with this data or config."""


class ArtifactError(RecloopError):
    """An artifact is missing, corrupt, or does not match what loads it."""


class RegistryUnreachableError(ArtifactError):
    """The store behind a registry did not answer (network, credentials, a 5xx): nothing
    is known to be wrong with what it holds, and trying again later may succeed."""


class TrainingError(RecloopError):
    """Training cannot go on: the loss or the weights became NaN or infinite."""
