"""RecBole atomic files: ``<name>.inter`` plus optional ``<name>.user`` and ``<name>.item``.

Tab-separated, no quoting, one typed header line such as ``user_id:token	rating:float``
(RecBole docs, "Atomic Files").  ``user_id``, ``item_id``, ``timestamp`` and ``rating``
become the schema's columns; every other field keeps its name without the type: float
fields as Float64, token_seq fields as lists of strings (split on spaces, e.g. the genres
of a movie), token and float_seq fields as strings.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recloop.data.loaders._read import Table, read_text
from recloop.data.loaders._validate import FieldSpec, Kind, Validated, assemble, validate
from recloop.data.loaders.base import LOADERS, LoadOptions
from recloop.data.schema import ITEM, RATING, TIMESTAMP, USER, RawData
from recloop.errors import DataError, Location

TYPES = ("token", "token_seq", "float", "float_seq")


def find_inter(path: Path) -> Path:
    """The ``.inter`` file: ``path`` itself, or the only one in directory ``path``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError("no such file or directory", location=Location(file=str(path)))
    found = sorted(path.glob("*.inter"))
    if len(found) != 1:
        what = "no .inter file" if not found else f"{len(found)} .inter files"
        names = "" if not found else f" ({', '.join(p.name for p in found)}); pass one of them"
        raise DataError(f"{what} in this directory{names}", location=Location(file=str(path)))
    return found[0]


_ROLES: dict[str, tuple[str, Kind]] = {
    "user_id": (USER, "id"),
    "item_id": (ITEM, "id"),
    "timestamp": (TIMESTAMP, "timestamp"),
    "rating": (RATING, "float"),
}


def _fields(table: Table, roles: tuple[str, ...], required: tuple[str, ...]) -> list[FieldSpec]:
    """FieldSpecs from a typed header: ``roles`` fields map to the schema, the rest pass."""
    fields: list[FieldSpec] = []
    for column in table.frame.columns[:-1]:
        name, _, kind = column.partition(":")
        kind = kind or "token"
        if kind not in TYPES:
            raise DataError(
                f'unknown field type "{kind}" (expected one of {", ".join(TYPES)})',
                location=Location(file=table.file, line=1, column=column, value=column),
            )
        if name in roles:
            out, role_kind = _ROLES[name]
            fields.append(FieldSpec(source=column, name=out, kind=role_kind))
        else:
            kept: Kind = "float" if kind == "float" else "str"
            fields.append(FieldSpec(source=column, name=name, kind=kept, required=False))
    present = {f.source.partition(":")[0] for f in fields}
    for need in required:
        if need not in present:
            raise DataError(
                f'missing field "{need}" in the header {table.header_line!r}',
                location=Location(file=table.file, line=1, column=need),
            )
    return fields


def _read(
    path: Path, options: LoadOptions, *, roles: tuple[str, ...], required: tuple[str, ...]
) -> Validated:
    table = read_text(path, delimiter="\t", has_header=True)
    out = validate(
        table,
        _fields(table, roles, required),
        skip_bad_rows=options.skip_bad_rows,
        max_examples=options.max_examples,
    )
    seqs = [
        c.partition(":")[0]
        for c in table.frame.columns
        if c.partition(":")[2] == "token_seq" and c.partition(":")[0] not in roles
    ]
    if not seqs:
        return out
    tokens = [
        pl.col(n).str.split(" ").list.eval(pl.element().filter(pl.element() != "")).alias(n)
        for n in seqs
    ]
    return Validated(frame=out.frame.with_columns(tokens), skipped=out.skipped)


@LOADERS.register("recbole")
def load_recbole(path: Path, options: LoadOptions) -> RawData:
    """Load ``<name>.inter`` (and its ``.user``/``.item`` siblings, when present)."""
    inter = find_inter(path)
    needed = ("user_id", "item_id", "timestamp")
    events = _read(inter, options, roles=tuple(_ROLES), required=needed)
    user_file, item_file = inter.with_suffix(".user"), inter.with_suffix(".item")
    users = items = None
    if user_file.is_file():
        users = _read(user_file, options, roles=("user_id",), required=("user_id",))
    if item_file.is_file():
        items = _read(item_file, options, roles=("item_id",), required=("item_id",))
    return assemble(
        events=events,
        users=users,
        items=items,
        source=f"recbole {inter}",
        files=(str(user_file), str(item_file)),
    )
