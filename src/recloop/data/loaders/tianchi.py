"""Tianchi ECommAI EUIR round 2 (and ``recloop data synth`` output): headerless CSV files.

    user_behavior.csv   user, item, behavior (pv, cart, fav, buy), time (integer seconds)
    user.csv            user, sex, age, pur_power          (optional)
    item.csv            item, category, shop, brand        (optional)

Round-2 times are integers relative to the start of the log; they are read as seconds.
Feature columns become Int64 when every value is an integer, else stay strings.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recloop.data.loaders._read import read_text, read_text_blocks
from recloop.data.loaders._validate import (
    FieldSpec,
    Validated,
    assemble,
    concat_validated,
    infer_int,
    validate,
)
from recloop.data.loaders.base import LOADERS, LoadOptions
from recloop.data.schema import BEHAVIOR, BEHAVIORS, ITEM, TIMESTAMP, USER, RawData
from recloop.errors import DataError, Location

BEHAVIOR_FILE = "user_behavior.csv"
USER_FILE = "user.csv"
ITEM_FILE = "item.csv"
USER_FEATURES = ("sex", "age", "pur_power")
ITEM_FEATURES = ("category", "shop", "brand")


def _features(path: Path, key: str, names: tuple[str, ...], options: LoadOptions) -> Validated:
    table = read_text(path, delimiter=",", names=(key, *names))
    fields = [FieldSpec(source=key, name=key, kind="id")]
    fields += [FieldSpec(source=n, name=n, kind="str", required=False) for n in names]
    out = validate(
        table, fields, skip_bad_rows=options.skip_bad_rows, max_examples=options.max_examples
    )
    frame = out.frame.with_columns(infer_int(out.frame[n]) for n in names)
    return Validated(frame=frame, skipped=out.skipped)


@LOADERS.register("tianchi")
def load_tianchi(path: Path, options: LoadOptions) -> RawData:
    """Load a Tianchi directory (or its ``user_behavior.csv``)."""
    if path.is_file():
        root, behavior_file = path.parent, path
    elif path.is_dir():
        root, behavior_file = path, path / BEHAVIOR_FILE
        if not behavior_file.is_file():
            raise DataError(
                f"no {BEHAVIOR_FILE} in this directory (expected the Tianchi ECommAI files "
                f"{BEHAVIOR_FILE}, {USER_FILE}, {ITEM_FILE})",
                location=Location(file=str(path)),
            )
    else:
        raise DataError("no such file or directory", location=Location(file=str(path)))
    blocks = read_text_blocks(
        behavior_file,
        delimiter=",",
        names=(USER, ITEM, BEHAVIOR, "time"),
        fast_types={USER: pl.Int64, ITEM: pl.Int64, "time": pl.Int64},
    )
    fields = [
        FieldSpec(source=USER, name=USER, kind="id"),
        FieldSpec(source=ITEM, name=ITEM, kind="id"),
        FieldSpec(source="time", name=TIMESTAMP, kind="timestamp"),
        FieldSpec(source=BEHAVIOR, name=BEHAVIOR, kind="enum", values=BEHAVIORS),
    ]
    parts = []
    for table in blocks:
        # Block by block, each validated and its behaviour names turned into one-byte Enum
        # codes before the next is read: 100M events never sit in memory as text.
        part = validate(
            table, fields, skip_bad_rows=options.skip_bad_rows, max_examples=options.max_examples
        )
        frame = part.frame.with_columns(pl.col(BEHAVIOR).cast(pl.Enum(list(BEHAVIORS))))
        parts.append(Validated(frame=frame, skipped=part.skipped))
    events = concat_validated(parts, file=str(behavior_file))
    user_file, item_file = root / USER_FILE, root / ITEM_FILE
    users = _features(user_file, USER, USER_FEATURES, options) if user_file.is_file() else None
    items = _features(item_file, ITEM, ITEM_FEATURES, options) if item_file.is_file() else None
    return assemble(
        events=events,
        users=users,
        items=items,
        source=f"tianchi {root}",
        files=(str(user_file), str(item_file)),
    )
