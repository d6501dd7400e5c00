"""``recloop report``: one self-contained HTML page from recloop's outputs.

The page has no script and fetches nothing: charts are inline SVG drawn by
:mod:`recloop.report.svg`, styles are inline, and the numbers behind every figure are
embedded as JSON (``<script type="application/json" id="report-data">``, which a browser
never executes).  So it opens offline, and stays readable when the runs are gone.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from recloop import __version__
from recloop.report import svg
from recloop.report.figures import (
    METRICS,
    dataset_figures,
    recommendation_mix,
    seed_interval,
    training_curves,
)
from recloop.report.inputs import ReportInputs, RunInput, collect_inputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """What the report shows."""

    k: int = 10
    """Cut-off K of the compared metrics (HR/NDCG/MRR@K) and of the recommendation mix."""
    recommendation_mix: bool = True
    """Rank the test users with each algorithm's artifact for the popularity-decile chart
    (loads the weights; off, the report reads files only)."""
    title: str = "recloop report"
    """The page's title."""


@dataclass(frozen=True, kw_only=True)
class ReportResult:
    path: Path
    """The HTML file written."""
    bytes: int
    seconds: float
    charts: int
    """Number of SVG charts on the page."""
    sections: list[str]
    """Titles of the sections the inputs filled."""


@dataclass
class _Page:
    """Sections of HTML in order, the data embedded, and the provenance of each figure."""

    sections: list[tuple[str, str, list[str]]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    charts: int = 0

    def section(self, anchor: str, title: str, parts: list[str]) -> None:
        self.sections.append((anchor, title, parts))

    def figure(self, chart: str, caption: str, sources: list[str]) -> str:
        self.charts += 1
        src = ", ".join(f"<code>{escape(s)}</code>" for s in sources)
        return (
            f'<figure>{chart}<figcaption>{escape(caption)}<br><span class="src">from {src}'
            "</span></figcaption></figure>"
        )


def _f4(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def _table(header: list[str], rows: list[str], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _cell(v: Any, **attrs: Any) -> str:
    """A numeric cell; its ``data-*`` attributes say where the number came from."""
    a = "".join(f' data-{k}="{escape(str(x))}"' for k, x in attrs.items())
    return f'<td class="num"{a}>{_f4(v)}</td>'


# --- dataset ------------------------------------------------------------------------------


def _dataset_section(page: _Page, inputs: ReportInputs) -> None:
    from recloop.data.dataset import PreparedDataset

    parts: list[str] = []
    out = []
    for i, d in enumerate(inputs.datasets):
        ds = PreparedDataset.load(d.path)
        fig = dataset_figures(ds)
        fig["path"] = str(d.path)
        out.append(fig)
        src = [str(d.path)]
        s = fig["summary"]
        source = d.manifest.get("source")
        parts.append(
            f"<h3>{escape(str(d.path))}</h3>"
            + (f"<p>prepared from <code>{escape(str(source))}</code></p>" if source else "")
        )
        parts.append(
            _table(
                ["users", "items", "events", "sessions", "mean reward", "train", "valid", "test"],
                [
                    "<tr>"
                    + "".join(
                        f'<td class="num" data-dataset="{i}" data-field="{k}">{svg.fmt(v)}</td>'
                        for k, v in (
                            ("n_users", s["n_users"]),
                            ("n_items", s["n_items"]),
                            ("n_events", s["n_events"]),
                            ("sessions", s["sessions"]),
                            ("mean_reward", round(s["mean_reward"], 4)),
                            ("train", s["splits"]["train"]),
                            ("valid", s["splits"]["valid"]),
                            ("test", s["splits"]["test"]),
                        )
                    )
                    + "</tr>"
                ],
            )
        )
        t = fig["time"]
        unit = "day" if fig["bucket_seconds"] == 86_400 else "week"
        charts = [
            page.figure(
                svg.line_chart(
                    f"ds{i}-time",
                    f"Events per {unit}",
                    [
                        svg.Series(name=name, x=t["x"], y=ys, points=False)
                        for name, ys in t["splits"].items()
                        if any(ys)
                    ],
                    x_label="date (UTC)",
                    y_label=f"events per {unit}",
                    x_format="date",
                ),
                "Events over time, by split (a temporal split shows valid/test at the end).",
                src,
            ),
            page.figure(
                svg.line_chart(
                    f"ds{i}-users",
                    "User activity",
                    [svg.Series(name="", **fig["user_activity"])],
                    x_label="events per user (log)",
                    y_label="users (log)",
                    log_x=True,
                    log_y=True,
                ),
                "How many users have how many events (log-spaced bins, log-log).",
                src,
            ),
            page.figure(
                svg.line_chart(
                    f"ds{i}-items",
                    "Item popularity (rank-frequency)",
                    [svg.Series(name="", points=False, **fig["item_popularity"])],
                    x_label="item rank (log)",
                    y_label="events (log)",
                    log_x=True,
                    log_y=True,
                ),
                "Events of the r-th most popular item: the long tail.",
                src,
            ),
            page.figure(
                svg.line_chart(
                    f"ds{i}-sessions",
                    "Session lengths",
                    [svg.Series(name="", **fig["session_lengths"])],
                    x_label="events per session (log)",
                    y_label="sessions (log)",
                    log_x=True,
                    log_y=True,
                ),
                "Sessions per length (sessions as prepare cut them).",
                src,
            ),
            page.figure(
                svg.bar_chart(
                    f"ds{i}-rewards",
                    "Reward mix",
                    svg.Bars(
                        categories=fig["reward_mix"]["labels"],
                        series={"": fig["reward_mix"]["counts"]},
                    ),
                    x_label="reward",
                    y_label="events (log)",
                    log_y=True,
                ),
                "Events per reward value.",
                src,
            ),
            page.figure(
                svg.bar_chart(
                    f"ds{i}-splits",
                    "Split sizes",
                    svg.Bars(
                        categories=list(fig["splits"]),
                        series={"": list(fig["splits"].values())},
                    ),
                    x_label="split",
                    y_label="events (log)",
                    log_y=True,
                ),
                "Events per split.",
                src,
            ),
        ]
        parts.append('<div class="grid">' + "".join(charts) + "</div>")
    page.data["datasets"] = out
    if parts:
        page.section("dataset", "Dataset", parts)


# --- training -----------------------------------------------------------------------------


def _run_name(run: RunInput, runs: list[RunInput]) -> str:
    """The algorithm, plus the seed when several runs share the algorithm."""
    same = [r for r in runs if r.algo == run.algo]
    return f"{run.algo} s{run.seed}" if len(same) > 1 else run.algo


def _training_section(page: _Page, inputs: ReportInputs) -> None:
    curves = [training_curves(r) for r in inputs.runs]
    page.data["training"] = curves
    trained = [(r, c) for r, c in zip(inputs.runs, curves, strict=True) if c["epochs"]]
    if not trained:
        return
    src = [str(r.path / "metrics.jsonl") for r, _ in trained]
    loss_names = list(dict.fromkeys(n for _, c in trained for n in c["train"]))
    metric = trained[0][1]["metric"]
    charts = []
    for j, name in enumerate(loss_names):
        series = [
            svg.Series(
                name=_run_name(r, inputs.runs),
                x=[e for e, v in zip(c["epochs"], c["train"][name], strict=True) if v is not None],
                y=[v for v in c["train"][name] if v is not None],
            )
            for r, c in trained
            if name in c["train"]
        ]
        charts.append(
            page.figure(
                svg.line_chart(
                    f"train-loss-{j}",
                    f"Training {name} per epoch",
                    series,
                    x_label="epoch",
                    y_label=name,
                    integer_x=True,
                ),
                f"Mean training {name} of each epoch.",
                src,
            )
        )
    series = []
    for r, c in trained:
        ys = c["valid"].get(metric) or []
        xs = [e for e, v in zip(c["epochs"], ys, strict=True) if v is not None]
        best = c["best_epoch"]
        series.append(
            svg.Series(
                name=_run_name(r, inputs.runs),
                x=xs,
                y=[v for v in ys if v is not None],
                marks=[xs.index(best)] if best in xs else [],
            )
        )
    charts.append(
        page.figure(
            svg.line_chart(
                "train-valid",
                f"Validation {metric} per epoch",
                series,
                x_label="epoch",
                y_label=metric,
                integer_x=True,
            ),
            f"Validation {metric} after each epoch; the ringed point is the best epoch (the "
            "weights kept).",
            src,
        )
    )
    rows = [
        f"<tr><td>{escape(_run_name(r, inputs.runs))}</td><td><code>{escape(str(r.path))}"
        f'</code></td><td class="num">{len(c["epochs"])}</td>'
        f'<td class="num" data-run="{escape(str(r.path))}" data-field="best_epoch">'
        f"{c['best_epoch'] if c['best_epoch'] is not None else '-'}</td></tr>"
        for r, c in trained
    ]
    page.section(
        "training",
        "Training",
        ['<div class="grid">' + "".join(charts) + "</div>",
         _table(["run", "directory", "epochs", "best epoch"], rows)],
    )  # fmt: skip


# --- comparison ---------------------------------------------------------------------------


def _comparison_rows(inputs: ReportInputs) -> list[dict[str, Any]]:
    """One row per run: its label, seed, split and masked / unmasked metrics, taken from
    ``recloop evaluate --json`` documents when given, else from the run's results.json."""
    from recloop.algos.base import run_label

    by_path = {r.path.resolve(): r for r in inputs.runs}
    rows: dict[Path, dict[str, Any]] = {}
    for run in inputs.runs:
        if not run.results or not run.results.get("test"):
            continue
        config = {k: v for k, v in (run.run.get("config") or {}).items() if k != "seed"}
        masked = bool(run.results.get("mask_consumed", True))
        rows[run.path.resolve()] = {
            "run": str(run.path),
            "algo": run_label(run.algo, config),
            "seed": run.seed,
            "split": "test",
            "masked": run.results["test"] if masked else None,
            "unmasked": None if masked else run.results["test"],
            "source": str(run.path / "results.json"),
        }
    for doc in inputs.docs("evaluate"):
        first_masked = bool(doc.doc.get("mask_consumed", True))
        for rec in doc.doc["runs"]:
            path = Path(rec["run"]).resolve()
            known = by_path.get(path)
            rows[path] = {
                "run": rec["run"],
                "algo": rec.get("algo", "?"),
                "seed": known.seed if known is not None else None,
                "split": doc.doc["split"],
                "masked": rec["metrics"] if first_masked else None,
                "unmasked": rec.get("metrics_unmasked")
                or (None if first_masked else rec["metrics"]),
                "source": str(doc.path),
            }
    return list(rows.values())


def _comparison_section(page: _Page, inputs: ReportInputs, cfg: ReportConfig) -> None:
    rows = _comparison_rows(inputs)
    if not rows:
        return
    k = cfg.k
    names = [f"{m}@{k}" for m in METRICS]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["algo"], row["split"]), []).append(row)
    summary: list[dict[str, Any]] = []
    for (algo, split), members in groups.items():
        entry: dict[str, Any] = {"algo": algo, "split": split, "runs": [m["run"] for m in members]}
        for protocol in ("masked", "unmasked"):
            have = [m[protocol] for m in members if m[protocol]]
            if have and all(n in h for h in have for n in names):
                entry[protocol] = {n: seed_interval([h[n] for h in have]) for n in names}
        summary.append(entry)
    page.data["comparison"] = {"k": k, "runs": rows, "groups": summary}
    parts: list[str] = []
    sources = sorted({r["source"] for r in rows})
    charts = []
    for protocol, what in (
        ("masked", "consumed items removed from the ranking (targets stay)"),
        ("unmasked", "nothing removed: items seen before may be recommended again"),
    ):
        have = [g for g in summary if protocol in g]
        if not have:
            continue
        label = {id(g): f"{g['algo']} ({g['split']})" for g in have}
        spread = [g for g in have if g[protocol][names[0]]["low"] is not None]
        bars = svg.Bars(
            categories=[n.upper() for n in names],
            series={label[id(g)]: [g[protocol][n]["value"] for n in names] for g in have},
            lo={label[id(g)]: [g[protocol][n]["low"] for n in names] for g in spread},
            hi={label[id(g)]: [g[protocol][n]["high"] for n in names] for g in spread},
        )
        charts.append(
            page.figure(
                svg.bar_chart(
                    f"cmp-{protocol}", f"Full ranking, {protocol.upper()}", bars,
                    x_label="metric", y_label="value",
                ),
                f"{protocol.upper()}: {what}. Bars: mean over seeds; whiskers: 95 % Student-t "
                "interval over seeds (none with one seed).",
                sources,
            )
        )  # fmt: skip
        table_rows = []
        for g in have:
            cells = []
            for n in names:
                iv = g[protocol][n]
                half = "" if iv["low"] is None else f" ± {(iv['high'] - iv['low']) / 2:.4f}"
                cells.append(
                    f'<td class="num" data-algo="{escape(g["algo"])}" data-split="{g["split"]}" '
                    f'data-protocol="{protocol}" data-metric="{n}" data-seeds="{iv["n"]}">'
                    f"{_f4(iv['value'])}{half}</td>"
                )
            table_rows.append(
                f"<tr><td>{escape(g['algo'])}</td><td>{g['split']}</td>"
                f'<td class="num">{g[protocol][names[0]]["n"]}</td>{"".join(cells)}</tr>'
            )
        parts.append(f"<h3>{protocol.upper()} ({escape(what)})</h3>")
        parts.append(
            _table(["algorithm", "split", "seeds", *(n.upper() for n in names)], table_rows)
        )
    parts.insert(0, '<div class="grid">' + "".join(charts) + "</div>")
    page.section("comparison", "Comparison", parts)


def _ope_section(page: _Page, inputs: ReportInputs) -> None:
    parts: list[str] = []
    charts: list[str] = []
    data: dict[str, Any] = {"evaluate": [], "world": []}
    for n_doc, doc in enumerate(inputs.docs("evaluate")):
        rows = []
        for rec in doc.doc["runs"]:
            ope = rec.get("ope")
            if not ope:
                continue
            for est, iv in ope["estimates"].items():
                rows.append(
                    svg.Interval(
                        label=f"{rec.get('algo', '?')} {est.upper()}", value=iv["value"],
                        lo=iv["low"], hi=iv["high"], group=est,
                    )
                )  # fmt: skip
            data["evaluate"].append({"run": rec["run"], "algo": rec.get("algo"), **ope})
        if rows:
            charts.append(
                page.figure(
                    svg.interval_chart(
                        f"ope-eval-{n_doc}", f"Off-policy value ({doc.doc['split']} split)", rows,
                        x_label="estimated value per event",
                    ),
                    "IPS, SNIPS and doubly-robust estimates with bootstrap intervals on the "
                    "logged events (no ground truth for a real log).",
                    [str(doc.path)],
                )
            )  # fmt: skip
    for n_doc, doc in enumerate(inputs.docs("world_ope")):
        d = doc.doc
        rows = []
        for est, per_run in d["estimates"].items():
            for i, run in enumerate(d["runs"]):
                iv = per_run[i]
                rows.append(
                    svg.Interval(
                        label=f"{Path(run).name} {est.upper()}", value=iv["value"],
                        lo=iv.get("low"), hi=iv.get("high"), truth=d["one_step_truth"][i],
                        group=est,
                    )
                )  # fmt: skip
        data["world"].append({"path": str(doc.path), **d})
        charts.append(
            page.figure(
                svg.interval_chart(
                    f"ope-world-{n_doc}", "OPE against the truth", rows,
                    x_label="value per event (◇ = true one-step value)",
                ),
                "Each estimator's estimate and interval beside the true value the world gives.",
                [str(doc.path)],
            )
        )  # fmt: skip
        roll = [
            svg.Interval(label=Path(run).name, value=r["value"], lo=r.get("low"), hi=r.get("high"))
            for run, r in zip(d["runs"], d["rollout_return"], strict=True)
        ]
        charts.append(
            page.figure(
                svg.interval_chart(
                    f"ope-roll-{n_doc}", "True return (roll-out)", roll,
                    x_label="return per session",
                ),
                "Each run rolled out in the world on fresh users.",
                [str(doc.path)],
            )
        )  # fmt: skip
        err = d.get("errors") or {}
        rows_html = [
            f"<tr><td>{escape(est.upper())}</td>"
            + "".join(
                _cell(e.get(k), estimator=est, field=k)
                for k in ("bias", "rmse", "spearman", "covered")
            )
            + "</tr>"
            for est, e in err.items()
        ]
        if rows_html:
            parts.append(_table(["estimator", "bias", "RMSE", "Spearman", "covered"], rows_html))
    for n_doc, doc in enumerate(inputs.docs("world_evaluate")):
        d = doc.doc
        data["world"].append({"path": str(doc.path), **d})
        for key, what in (("return", "True return per session"), ("length", "Session length"),
                          ("coverage", "Coverage"), ("diversity", "Diversity")):  # fmt: skip
            rows = [
                svg.Interval(
                    label=Path(r["policy"]).name or r["policy"], value=r[key]["value"],
                    lo=r[key].get("low"), hi=r[key].get("high"),
                )
                for r in d["rows"] if key in r
            ]  # fmt: skip
            if rows:
                charts.append(
                    page.figure(
                        svg.interval_chart(f"world-{n_doc}-{key}", what, rows, x_label=key),
                        f"{what} of each policy rolled out on the same {d.get('users', '?')} "
                        f"fresh users of {d.get('name', 'the world')} (95 % intervals).",
                        [str(doc.path)],
                    )
                )
    page.data["ope"] = data
    if charts:
        page.section(
            "ope",
            "Off-policy and true value",
            ['<div class="grid">' + "".join(charts) + "</div>", *parts],
        )


def _mix_section(page: _Page, inputs: ReportInputs, cfg: ReportConfig) -> None:
    if not cfg.recommendation_mix:
        return
    # One run per algorithm (the first seed): the mix barely moves between seeds.
    chosen: dict[str, RunInput] = {}
    for run in inputs.runs:
        if run.manifest is not None and run.data is not None and run.data.is_dir():
            chosen.setdefault(run.algo, run)
    if not chosen:
        return
    from recloop.data.dataset import PreparedDataset

    loaded: dict[Path, PreparedDataset] = {}
    mixes = []
    for run in chosen.values():
        assert run.data is not None
        if run.data not in loaded:
            loaded[run.data] = PreparedDataset.load(run.data)
        mixes.append(recommendation_mix(run.path, loaded[run.data], k=cfg.k))
    page.data["recommendation_mix"] = mixes
    series: dict[str, list[float]] = {m["algo"]: [100 * s for s in m["share"]] for m in mixes}
    series["test events (logged)"] = [100 * s for s in mixes[0]["target_share"]]
    chart = page.figure(
        svg.bar_chart(
            "mix-deciles", f"Top-{cfg.k} recommendations per popularity decile",
            svg.Bars(categories=[str(i) for i in range(1, 11)], series=series),
            x_label="item popularity decile (10 = most popular tenth, by train events)",
            y_label="% of recommendations",
        ),
        "Popularity bias: the share of all top-K lists (consumed items masked) in each tenth "
        "of the catalogue, beside what the test users actually consumed.",
        [str(m["run"]) for m in mixes],
    )  # fmt: skip
    rows = [
        f'<tr><td>{escape(m["algo"])}</td><td class="num">{m["users"]}</td>'
        + _cell(m["coverage"], algo=m["algo"], field="coverage")
        + _cell(m["share"][9], algo=m["algo"], field="top_decile_share")
        + _cell(sum(m["share"][:5]), algo=m["algo"], field="bottom_half_share")
        + "</tr>"
        for m in mixes
    ]
    page.section(
        "mix",
        "Coverage and popularity bias",
        [
            chart,
            _table(
                [
                    "algorithm",
                    "users",
                    f"coverage@{cfg.k}",
                    "top-decile share",
                    "bottom-half share",
                ],
                rows,
            ),
        ],
    )


def _experiment_section(page: _Page, inputs: ReportInputs) -> None:
    charts = []
    data = []
    for n, exp in enumerate(inputs.experiments):
        arms: dict[str, list[Any]] = {}
        for r in sorted(exp.rows, key=lambda r: (r.arm, r.round)):
            arms.setdefault(r.arm, []).append(r)
        series = [
            svg.Series(
                name=f"{arm} ({rs[0].algo})", x=[r.round for r in rs], y=[r.reward for r in rs],
                lo=[r.lo for r in rs], hi=[r.hi for r in rs],
            )
            for arm, rs in arms.items()
        ]  # fmt: skip
        data.append({"path": str(exp.path), "rows": [r.__dict__ for r in exp.rows]})
        charts.append(
            page.figure(
                svg.line_chart(
                    f"exp-{n}", "Closed-loop experiment: reward per round", series,
                    x_label="round", y_label="reward", integer_x=True,
                ),
                "Mean reward of each arm in each round; bands: the intervals in the table.",
                [str(exp.path)],
            )
        )  # fmt: skip
    if charts:
        page.data["experiments"] = data
        page.section("experiment", "Closed-loop experiment", charts)


def _provenance_section(page: _Page, inputs: ReportInputs) -> None:
    rows = []
    for d in inputs.datasets:
        m = d.manifest
        source = str(m.get("source", "?"))
        fmt_, _, src_path = source.partition(" ")
        if fmt_ == "sql":  # "sql URL table NAME": read back from the behaviour log
            url, _, table = src_path.partition(" table ")
            cmd = f"recloop prepare --from-db {url} --table {table or 'behavior_log'}"
        else:
            cmd = f"recloop prepare --format {fmt_} --input {src_path}"
        cmd += f" --output {d.path}"
        split = (m.get("config") or {}).get("split", {}).get("mode")
        if split:
            cmd += f" --split {split}"
        rows.append(
            ("dataset", d.path, cmd, m.get("recloop_version"), None, m.get("created_at"), None)
        )
    for r in inputs.runs:
        epochs = (r.run.get("fit") or {}).get("epochs")
        cmd = f"recloop train --algo {r.algo} --data {r.run.get('data')} --out {r.path}"
        if epochs is not None:
            cmd += f" --epochs {epochs}"
        if r.seed is not None:
            cmd += f" --set seed={r.seed}"
        pretrained = (r.run.get("config") or {}).get("pretrained")
        if pretrained:
            cmd += f" --pretrained {pretrained}"
        man = r.manifest or {}
        rows.append(("run", r.path, cmd, r.run.get("recloop_version"), man.get("torch_version"),
                     r.run.get("created_at"), man.get("model_version")))  # fmt: skip
    commands = {
        "evaluate": "recloop evaluate {runs} --split {split} --protocol {protocol}{ope} --json",
        "world_evaluate": "recloop world evaluate {runs} --json",
        "world_ope": "recloop world ope {runs} --json",
    }
    for doc in inputs.documents:
        doc_d = doc.doc
        runs = " ".join(
            str(r["run"]) if isinstance(r, dict) else str(r)
            for r in (doc_d.get("runs") or [x.get("policy") for x in doc_d.get("rows", [])])
        )
        with_ope = any(isinstance(r, dict) and r.get("ope") for r in doc_d.get("runs", []))
        cmd = (
            commands[doc.kind].format(
                runs=runs,
                split=doc_d.get("split"),
                protocol=doc_d.get("protocol"),
                ope=" --ope" if with_ope else "",
            )
            + f" > {doc.path}"
        )
        rows.append((doc.kind.replace("_", " "), doc.path, cmd, None, None, None, None))
    for exp in inputs.experiments:
        rows.append(("experiment", exp.path, "(experiment table)", None, None, None, None))
    html_rows = [
        "<tr>" + "".join(
            f"<td>{escape(str(v)) if v is not None else '-'}</td>" if j != 2 else
            f"<td><code>{escape(str(v))}</code></td>"
            for j, v in enumerate(row)
        ) + "</tr>"
        for row in rows
    ]  # fmt: skip
    page.data["provenance"] = [
        dict(zip(("kind", "path", "command", "recloop", "torch", "created", "model"),
                 [str(v) if v is not None else None for v in row], strict=True))
        for row in rows
    ]  # fmt: skip
    page.section(
        "provenance",
        "How each figure was made",
        [
            "<p>Every input with the command that writes it (reconstructed from its manifest "
            "or run.json: the recorded config is the full truth) and the versions recorded. "
            "Each figure's caption names the inputs it was drawn from.</p>",
            _table(["kind", "path", "command", "recloop", "torch", "created", "model version"],
                   html_rows, cls="prov"),
        ],
    )  # fmt: skip


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222;
background:#fafafa}header{background:#233;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}header p{margin:4px 0 0;opacity:.8}
nav a{color:#cde;margin-right:14px}main{padding:8px 24px 40px;max-width:1240px}
h2{border-bottom:2px solid #233;padding-bottom:4px;margin-top:32px}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;background:#fff;border:1px solid #ddd;
padding:6px;max-width:572px}figcaption{font-size:12px;color:#444;max-width:560px}
.src{color:#777;word-break:break-all}table{border-collapse:collapse;margin:10px 0;background:#fff}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.prov td{font-size:12px}code{font-size:12px;word-break:break-all}
svg .t{font-size:13px;font-weight:600}svg .k,svg .l{font-size:10px}svg .a{font-size:11px}
svg .ax{stroke:#333}svg .g{stroke:#e5e5e5}
"""


def render(inputs: ReportInputs, cfg: ReportConfig = ReportConfig()) -> tuple[str, _Page]:
    """The HTML page for ``inputs``, and the page (sections, embedded data, chart count)."""
    page = _Page()
    _dataset_section(page, inputs)
    _training_section(page, inputs)
    _comparison_section(page, inputs, cfg)
    _ope_section(page, inputs)
    _mix_section(page, inputs, cfg)
    _experiment_section(page, inputs)
    _provenance_section(page, inputs)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t, _ in page.sections)
    body = "".join(
        f'<section id="{a}"><h2>{escape(t)}</h2>{"".join(parts)}</section>'
        for a, t, parts in page.sections
    )
    # "</" inside the embedded JSON would end the script element early.
    data = json.dumps(page.data, default=str, separators=(",", ":")).replace("</", "<\\/")
    html = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(cfg.title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{escape(cfg.title)}</h1><p>recloop {__version__}, written {now}</p>"
        f"<nav>{nav}</nav></header><main>{body}</main>"
        f'<script type="application/json" id="report-data">{data}</script></body></html>\n'
    )
    return html, page


def write_report(paths: list[Path], out: Path, cfg: ReportConfig = ReportConfig()) -> ReportResult:
    """Collect the inputs under ``paths``, render the page and write it to ``out``."""
    start = time.perf_counter()
    inputs = collect_inputs(paths)
    html, page = render(inputs, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    seconds = time.perf_counter() - start
    logger.debug("report: %d charts, %d bytes in %.2f s → %s", page.charts, len(html), seconds, out)
    return ReportResult(
        path=out,
        bytes=out.stat().st_size,
        seconds=seconds,
        charts=page.charts,
        sections=[t for _, t, _ in page.sections],
    )
