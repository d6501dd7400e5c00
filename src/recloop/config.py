"""Frozen, keyword-only dataclass configs: YAML files, ``--set key=value`` overrides and help.

Every config class is a ``@dataclass(frozen=True, kw_only=True)`` whose fields carry a
docstring (a string literal right after the field).  This module turns mappings (from YAML
or the command line) into config objects, failing before any data is read with an error that
names the field, and renders configs back to plain JSON-able dicts for manifests.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from recloop.errors import ConfigError

C = TypeVar("C")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside ``X`` or ``X | None``, if any."""
    if _is_dataclass_type(tp):
        return typing.cast(type, tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and _is_dataclass_type(inner[0]):
            return typing.cast(type, inner[0])
    return None


@functools.cache
def _adapter(tp: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(tp)


def config_from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
    """Build ``cls`` from a mapping, validating names and types.

    Raises :class:`ConfigError` naming ``source`` and the dotted field path on an unknown
    field (with the closest known names), a missing required field, or a value of the wrong
    type.
    """
    return typing.cast(C, _build(cls, data, source=source, prefix=""))


def _build(cls: type, data: Mapping[str, Any], *, source: str, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"{source}: unknown field '{prefix}{key}' for {cls.__name__}{hint}; "
            f"known fields: {', '.join(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        sub = _dataclass_in(tp)
        path = f"{prefix}{name}"
        if sub is not None and isinstance(value, Mapping):
            # A partial section lands on the field's own default (an algorithm's default
            # encoder, say), not on the nested class's defaults.
            base = _field_default(fields[name])
            if dataclasses.is_dataclass(base) and not isinstance(base, type):
                value = merge(config_to_dict(base), value)
            kwargs[name] = _build(sub, value, source=source, prefix=f"{path}.")
            continue
        try:
            kwargs[name] = _adapter(tp).validate_python(value)
        except pydantic.ValidationError as exc:
            msg = "; ".join(e["msg"] for e in exc.errors())
            raise ConfigError(
                f"{source}: field '{path}' expects {_type_name(tp)}, got {value!r} ({msg})"
            ) from None
        check_finite(kwargs[name], field=path, source=source)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required field '{prefix}{missing[0]}'")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of a config (tuples become lists, paths strings)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    out = conv(cfg)
    assert isinstance(out, dict)
    return out


def parse_overrides(items: Sequence[str], *, source: str = "--set") -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` → ``{"a": {"b": 1}, "c": [1, 2]}``; values parse as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{source} {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ConfigError(f"{source} {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value, where=f"{source} {item!r}")
    return out


def set_dotted(out: dict[str, Any], key: str, value: Any, *, where: str) -> None:
    """``out["a"]["b"] = value`` for ``key`` ``"a.b"``, making the groups on the way; a
    name set both as a value and as a group is an error naming ``where``."""
    node = out
    *groups, last = key.split(".")
    for i, g in enumerate(groups):
        node = node.setdefault(g, {})
        if not isinstance(node, dict):
            group = ".".join(groups[: i + 1])
            raise ConfigError(f"{where}: '{group}' is set both as a value and a group")
    if isinstance(node.get(last), dict):
        raise ConfigError(f"{where}: '{key}' is set both as a group and a value")
    node[last] = value


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two mappings; ``over`` wins."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; every error is one line naming the file (and line, column)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path} line {line}: not a YAML config (invalid UTF-8 byte "
            f"0x{raw[exc.start]:02X}; is it a binary file?)"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_message(path, exc, text)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def _yaml_message(path: Path, exc: yaml.YAMLError, text: str) -> str:
    """``FILE line N: invalid YAML at column C (problem)``: PyYAML's own message quotes the
    file over several lines."""
    where = column = ""
    mark = getattr(exc, "problem_mark", None)
    position = getattr(exc, "position", None)  # a ReaderError: a character YAML forbids
    if mark is not None:
        where, column = f" line {mark.line + 1}", f" at column {mark.column + 1}"
    elif isinstance(position, int):
        where = f" line {text.count(chr(10), 0, position) + 1}"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        problem = "; ".join(p for p in (exc.problem, exc.context) if p)
    else:
        lines = str(exc).strip().splitlines()
        problem = lines[0] if lines else type(exc).__name__
    return f"{path}{where}: invalid YAML{column} ({' '.join(problem.split())})"


def load_config(
    cls: type[C],
    *,
    path: Path | None = None,
    values: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> C:
    """Config from (in rising priority) defaults, a YAML file, explicit values and ``--set``."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        data = read_yaml(path)
        source = str(path)
    if values:
        data = merge(data, {k: v for k, v in values.items() if v is not None})
    if overrides:
        data = merge(data, parse_overrides(overrides))
        source = f"{source} with --set" if path is not None else "--set"
    return config_from_dict(cls, data, source=source)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields: the string literal after each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        stmts = body.body
        for a, b in itertools.pairwise(stmts):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


def describe(
    cls: type, *, prefix: str = "", instance: Any = None
) -> list[tuple[str, str, str, str]]:
    """Rows ``(name, type, default, doc)`` for every field, nested configs flattened.

    Defaults are read from ``instance`` when given (a nested section's own default).
    """
    rows: list[tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = _dataclass_in(tp)
        if instance is not None:
            value = getattr(instance, f.name)
            default = repr(value)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            value = _field_default(f)
            default = repr(value)
        else:
            value, default = None, "required"
        if sub is not None and f.default is dataclasses.MISSING:
            rows.extend(describe(sub, prefix=f"{prefix}{f.name}.", instance=value))
            continue
        rows.append((f"{prefix}{f.name}", _type_name(tp), default, docs.get(f.name, "")))
    return rows


def _first_non_finite(value: Any, path: str) -> tuple[str, float] | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items: Any = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    elif isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, tuple | list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        found = _first_non_finite(item, sub)
        if found is not None:
            return found
    return None


def check_finite(value: Any, *, field: str = "", source: str | None = None) -> None:
    """Raise :class:`ConfigError` if a float in ``value`` is NaN or infinite.

    ``value`` is a number, a sequence, a mapping or a config, searched recursively; the
    error names the dotted field (``field`` is the path of ``value`` itself).  Every
    config built from a mapping passes through here, and the fit loop checks the configs
    of the Python API: no hyper-parameter is meaningful as NaN or ±inf, and ``lr=inf``
    would train to NaN weights.
    """
    found = _first_non_finite(value, field)
    if found is not None:
        path, x = found
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}{path or 'value'} must be finite, got {x}")


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` unless ``condition``; for ``__post_init__`` range checks."""
    if not condition:
        raise ConfigError(message)
