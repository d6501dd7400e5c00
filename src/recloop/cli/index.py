"""``recloop index``: an approximate item index for an artifact (``recloop[ann]``)."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli.app import PLAIN, app, echo, echo_json

index_app = typer.Typer(
    help="Approximate top-k over large catalogues: a FAISS inner-product index of an "
    "artifact's items, which `recloop serve` uses when present (needs recloop[ann]).",
    no_args_is_help=True,
    rich_markup_mode=PLAIN,
)
app.add_typer(index_app, name="index")


@index_app.command("build")
def build_cmd(
    artifact: Path = typer.Argument(..., help="Artifact or run directory."),
    kind: str = typer.Option("ivf", help="ivf (inverted lists) or hnsw (graph)."),
    m: int = typer.Option(32, "--m", help="hnsw: neighbours per item."),
    ef_construction: int = typer.Option(200, help="hnsw: candidate list while building."),
    ef_search: int = typer.Option(256, help="hnsw: candidate list while searching."),
    nlist: int = typer.Option(0, help="ivf: inverted lists (0: 4 * sqrt(items))."),
    nprobe: int = typer.Option(64, help="ivf: lists searched per query."),
    seed: int = typer.Option(0, help="ivf: k-means seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest's index section."),
) -> None:
    """Build the index over the artifact's items and record it in its manifest.

    The policy's head must be an inner product between the state and an item vector (dot,
    bcq, linear); the file (items.faiss) and its sha256, parameters and the weights it was
    built from go into the manifest's index section.  Rebuilding replaces the index.
    """
    from recloop.artifacts.ann import IndexConfig, build_index

    built = build_index(
        artifact,
        IndexConfig(
            kind=kind,
            m=m,
            ef_construction=ef_construction,
            ef_search=ef_search,
            nlist=nlist,
            nprobe=nprobe,
            seed=seed,
        ),
    )
    if as_json:
        echo_json({**built.section, "build_s": round(built.build_s, 3)})
        return
    params = ", ".join(f"{k}={v}" for k, v in built.section["params"].items())
    echo(
        f"{built.path}: {built.section['kind']} index of {built.section['n_items']} items "
        f"(dim {built.section['dim']}; {params}) built in {built.build_s:.1f} s"
    )


@index_app.command("tune")
def tune_cmd(
    artifact: Path = typer.Argument(..., help="Artifact or run directory with an index."),
    effort: int = typer.Argument(
        ..., help="hnsw ef_search or ivf nprobe: more finds more of the exact top-k, slower."
    ),
) -> None:
    """Change the index's search-time parameter in the manifest, without rebuilding it
    (read when a service loads the artifact: reload or restart it)."""
    from recloop.artifacts.ann import set_search_effort

    section = set_search_effort(artifact, effort)
    params = ", ".join(f"{k}={v}" for k, v in section["params"].items())
    echo(f"{section['kind']} index: {params}")
