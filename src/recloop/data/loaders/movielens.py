"""MovieLens as GroupLens ships it: 100K (``u.data``), 1M (``ratings.dat``), 20M/25M/latest
(``ratings.csv``).  The variant is told by the files in the directory.

Every variant gives events (user, item, rating, timestamp) and, where the archive has them,
item features ``title``, ``year`` (from the title) and ``genres`` ("Action|Comedy") and user
features (``age``, ``gender``, ``occupation``, ``zip_code``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recloop.data.loaders._read import read_text
from recloop.data.loaders._validate import FieldSpec, Kind, Validated, assemble, validate
from recloop.data.loaders.base import LOADERS, LoadOptions
from recloop.data.schema import ITEM, RATING, TIMESTAMP, USER, RawData
from recloop.errors import DataError, Location

GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
"""The 19 genre flags at the end of each ``u.item`` line, in order (ml-100k README)."""

_MARKERS = ("u.data", "ratings.dat", "ratings.csv")

_EVENT_FIELDS = (
    FieldSpec(source=USER, name=USER, kind="id"),
    FieldSpec(source=ITEM, name=ITEM, kind="id"),
    FieldSpec(source=RATING, name=RATING, kind="float"),
    FieldSpec(source=TIMESTAMP, name=TIMESTAMP, kind="timestamp"),
)
_EVENT_NAMES = (USER, ITEM, RATING, TIMESTAMP)
_EVENT_TYPES = {USER: pl.Int64, ITEM: pl.Int64, RATING: pl.Float64, TIMESTAMP: pl.Int64}


def find_root(path: Path) -> Path:
    """The directory holding the MovieLens files: ``path``, its parent, or its one child."""
    if not path.exists():
        raise DataError("no such file or directory", location=Location(file=str(path)))
    root = path.parent if path.is_file() else path
    if any((root / m).is_file() for m in _MARKERS):
        return root
    # An archive unpacks into ml-100k/ etc.; accept the folder it was unpacked in.
    children = [c for c in sorted(root.iterdir()) if c.is_dir()]
    found = [c for c in children if any((c / m).is_file() for m in _MARKERS)]
    if len(found) == 1:
        return found[0]
    raise DataError(
        f"not a MovieLens directory: expected one of {', '.join(_MARKERS)} in it",
        location=Location(file=str(path)),
    )


def _year(title: pl.Expr) -> pl.Expr:
    return title.str.extract(r"\((\d{4})\)\s*$", 1).cast(pl.Int64, strict=False)


def _side(
    path: Path,
    fields: list[FieldSpec],
    options: LoadOptions,
    *,
    delimiter: str,
    names: list[str] | None = None,
    has_header: bool = False,
    quote_char: str | None = None,
    encoding: str = "utf-8",
) -> Validated | None:
    if not path.is_file():
        return None
    table = read_text(
        path,
        delimiter=delimiter,
        names=names,
        has_header=has_header,
        quote_char=quote_char,
        encoding=encoding,
    )
    return validate(
        table, fields, skip_bad_rows=options.skip_bad_rows, max_examples=options.max_examples
    )


def _with_frame(v: Validated | None, frame: pl.DataFrame | None) -> Validated | None:
    return None if v is None or frame is None else Validated(frame=frame, skipped=v.skipped)


def _opt(name: str, kind: Kind = "str") -> FieldSpec:
    return FieldSpec(source=name, name=name, kind=kind, required=False)


def _load_100k(root: Path, options: LoadOptions) -> RawData:
    table = read_text(root / "u.data", delimiter="\t", names=_EVENT_NAMES, fast_types=_EVENT_TYPES)
    events = validate(
        table,
        _EVENT_FIELDS,
        skip_bad_rows=options.skip_bad_rows,
        max_examples=options.max_examples,
    )
    user_fields = [FieldSpec(source=USER, name=USER, kind="id"), _opt("age", "int")]
    user_fields += [_opt("gender"), _opt("occupation"), _opt("zip_code")]
    users = _side(
        root / "u.user", user_fields, options, delimiter="|", names=[f.name for f in user_fields]
    )
    flags = [f"genre_{i}" for i in range(len(GENRES_100K))]
    item_names = [ITEM, "title", "release_date", "video_release_date", "imdb_url", *flags]
    item_fields = [FieldSpec(source=ITEM, name=ITEM, kind="id"), _opt("title")]
    item_fields += [_opt(f, "int") for f in flags]
    items = _side(
        root / "u.item",
        item_fields,
        options,
        delimiter="|",
        names=item_names,
        encoding="latin-1",
    )
    item_frame = None
    if items is not None:
        genre = [
            pl.when(pl.col(f) == 1).then(pl.lit(g)) for f, g in zip(flags, GENRES_100K, strict=True)
        ]
        joined = pl.concat_list(genre).list.drop_nulls().list.join("|")
        item_frame = items.frame.select(
            ITEM,
            "title",
            year=_year(pl.col("title")),
            genres=pl.when(joined != "").then(joined),
        )
    return assemble(
        events=events,
        users=users,
        items=_with_frame(items, item_frame),
        source=f"movielens-100k {root}",
        files=(str(root / "u.user"), str(root / "u.item")),
    )


def _load_1m(root: Path, options: LoadOptions) -> RawData:
    table = read_text(
        root / "ratings.dat", delimiter="::", names=_EVENT_NAMES, fast_types=_EVENT_TYPES
    )
    events = validate(
        table,
        _EVENT_FIELDS,
        skip_bad_rows=options.skip_bad_rows,
        max_examples=options.max_examples,
    )
    user_fields = [FieldSpec(source=USER, name=USER, kind="id"), _opt("gender")]
    user_fields += [_opt("age", "int"), _opt("occupation", "int"), _opt("zip_code")]
    users = _side(
        root / "users.dat",
        user_fields,
        options,
        delimiter="::",
        names=[f.name for f in user_fields],
    )
    item_fields = [FieldSpec(source=ITEM, name=ITEM, kind="id"), _opt("title"), _opt("genres")]
    items = _side(
        root / "movies.dat",
        item_fields,
        options,
        delimiter="::",
        names=[f.name for f in item_fields],
        encoding="latin-1",
    )
    return assemble(
        events=events,
        users=users,
        items=_with_frame(items, _movies(items)),
        source=f"movielens-1m {root}",
        files=(str(root / "users.dat"), str(root / "movies.dat")),
    )


def _movies(items: Validated | None) -> pl.DataFrame | None:
    if items is None:
        return None
    genres = pl.col("genres")
    return items.frame.select(
        ITEM,
        "title",
        year=_year(pl.col("title")),
        genres=pl.when(genres != "(no genres listed)").then(genres),
    )


def _load_csv_variant(root: Path, options: LoadOptions) -> RawData:
    """20M, 25M and latest: ``ratings.csv`` and ``movies.csv`` with headers."""
    renames = {USER: "userId", ITEM: "movieId", RATING: RATING, TIMESTAMP: TIMESTAMP}
    table = read_text(
        root / "ratings.csv",
        delimiter=",",
        has_header=True,
        quote_char='"',
        fast_types={renames[k]: t for k, t in _EVENT_TYPES.items()},
    )
    fields = [FieldSpec(source=renames[f.name], name=f.name, kind=f.kind) for f in _EVENT_FIELDS]
    events = validate(
        table, fields, skip_bad_rows=options.skip_bad_rows, max_examples=options.max_examples
    )
    item_fields = [FieldSpec(source="movieId", name=ITEM, kind="id"), _opt("title"), _opt("genres")]
    items = _side(
        root / "movies.csv",
        item_fields,
        options,
        delimiter=",",
        has_header=True,
        quote_char='"',
    )
    return assemble(
        events=events,
        items=_with_frame(items, _movies(items)),
        source=f"movielens {root}",
        files=("", str(root / "movies.csv")),
    )


@LOADERS.register("movielens")
def load_movielens(path: Path, options: LoadOptions) -> RawData:
    """Load any MovieLens variant from its directory (or one of its files)."""
    root = find_root(path)
    if (root / "u.data").is_file():
        return _load_100k(root, options)
    if (root / "ratings.dat").is_file():
        return _load_1m(root, options)
    return _load_csv_variant(root, options)
