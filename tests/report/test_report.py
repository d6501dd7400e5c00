"""The report builder without a browser: inputs, figure numbers, SVG and the page."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from recloop.cli import main
from recloop.errors import ConfigError, DataError
from recloop.report import ReportConfig, collect_inputs, render, write_report
from recloop.report.figures import popularity_deciles, seed_interval
from recloop.report.inputs import json_kind, read_experiment_csv
from recloop.report.svg import Interval, Series, interval_chart, line_chart

if TYPE_CHECKING:  # the fixture's type; tests/*/conftest.py are several modules named conftest
    from conftest import ReportFiles


def test_seed_interval_is_the_student_t_interval() -> None:
    iv = seed_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
    assert iv["value"] == pytest.approx(2.0)
    assert iv["high"] - iv["value"] == pytest.approx(4.303 / math.sqrt(3))
    one = seed_interval([0.5])
    assert one == {"value": 0.5, "low": None, "high": None, "n": 1}


def test_popularity_deciles_put_the_most_popular_tenth_in_decile_10() -> None:
    pop = np.concatenate([[0], np.arange(1, 21)])  # item i has i events
    dec = popularity_deciles(pop)
    assert dec[0] == 0
    assert dec[1:3].tolist() == [1, 1]  # the two least popular
    assert dec[19:21].tolist() == [10, 10]  # the two most popular
    assert np.bincount(dec[1:], minlength=11)[1:].tolist() == [2] * 10


def test_line_chart_draws_every_point_and_skips_non_positive_on_log_axes() -> None:
    svg = line_chart(
        "c", "t", [Series(name="a", x=[1, 10, 100], y=[5, 0, 50], marks=[2])],
        x_label="x", y_label="y", log_x=True, log_y=True,
    )  # fmt: skip
    assert 'data-points="2"' in svg  # y = 0 cannot sit on a log axis
    assert svg.count('class="pt"') == 2 and svg.count('class="mark"') == 1
    assert "<title>a: x=100, y=50 (best)</title>" in svg


def test_interval_chart_shows_the_truth_beside_the_estimate() -> None:
    svg = interval_chart(
        "o", "OPE", [Interval(label="r DR", value=0.2, lo=0.1, hi=0.3, truth=0.25)], x_label="v"
    )
    assert 'class="truth" data-value="0.25"' in svg and 'data-value="0.2"' in svg


def test_json_kinds() -> None:
    assert json_kind({"split": "test", "protocol": "both", "runs": []}) == "evaluate"
    assert json_kind({"one_step_truth": [], "estimates": {}, "runs": []}) == "world_ope"
    assert json_kind({"rows": [{"policy": "p", "return": {}}]}) == "world_evaluate"
    assert json_kind([{"round": 1, "arm": "a"}]) == "experiment"
    assert json_kind({"something": 1}) is None


def test_experiment_csv_errors_name_the_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "exp.csv"
    bad.write_text("round,arm,algo,reward,lo,hi\n1,a,pop,0.3,0.2,0.4\n2,a,pop,high,0.2,0.4\n")
    with pytest.raises(DataError, match=r"exp.csv: line 3: field 'reward': not a number: 'high'"):
        read_experiment_csv(bad)
    bad.write_text("round,arm,reward\n1,a,0.3\n")
    with pytest.raises(DataError, match=r"line 1: .*missing algo, lo, hi"):
        read_experiment_csv(bad)
    bad.write_text("round,arm,algo,reward,lo,hi\n1,a,pop,0.5,0.2,0.4\n")
    with pytest.raises(DataError, match=r"line 2: reward 0.5 lies outside .*\[0.2, 0.4\]"):
        read_experiment_csv(bad)


def test_unknown_inputs_are_errors_naming_them(tmp_path: Path) -> None:
    other = tmp_path / "notes.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match=r"notes\.json: not a JSON document the report knows"):
        collect_inputs([other])
    with pytest.raises(ConfigError, match="nope: no such file"):
        collect_inputs([tmp_path / "nope"])
    broken = tmp_path / "broken.json"
    broken.write_text('{"split": ')
    with pytest.raises(DataError, match=r"broken\.json: line 1: not valid JSON"):
        collect_inputs([broken])


class _Cells(HTMLParser):
    """The text of every <td> with its data-* attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[dict[str, str], str]] = []
        self._open: dict[str, str] | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "td":
            self._open, self._text = {k: v or "" for k, v in attrs}, ""

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._open is not None:
            self.cells.append((self._open, self._text))
            self._open = None


@pytest.fixture(scope="module")
def page(report_files: ReportFiles) -> str:
    inputs = collect_inputs(
        [report_files.root / "runs", report_files.evaluate_json, report_files.world_ope_json,
         report_files.world_evaluate_json, report_files.experiment_csv]
    )  # fmt: skip
    html, _ = render(inputs, ReportConfig())
    return html


def test_page_has_every_section_and_no_external_resource(page: str) -> None:
    for anchor in ("dataset", "training", "comparison", "ope", "mix", "experiment", "provenance"):
        assert f'<section id="{anchor}">' in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<script>" not in page and "<script src" not in page  # only the JSON data block


def test_comparison_cells_equal_the_evaluate_json(page: str, report_files: ReportFiles) -> None:
    doc = json.loads(report_files.evaluate_json.read_text())
    parser = _Cells()
    parser.feed(page)
    shown = {
        (a["data-algo"], a["data-protocol"], a["data-metric"]): text
        for a, text in parser.cells
        if "data-metric" in a
    }
    by_algo: dict[str, list[dict]] = {}
    for run in doc["runs"]:
        by_algo.setdefault(run["algo"], []).append(run)
    assert {k[0] for k in shown} == set(by_algo)
    for algo, runs in by_algo.items():
        for protocol, key in (("masked", "metrics"), ("unmasked", "metrics_unmasked")):
            for metric in ("hr@10", "ndcg@10", "mrr@10"):
                values = [r[key][metric] for r in runs]
                text = shown[(algo, protocol, metric)]
                assert float(text.split(" ± ")[0]) == pytest.approx(np.mean(values), abs=5e-5)
                # two seeds of supervised → an interval; popularity is one run → none
                assert (" ± " in text) == (len(runs) > 1)


def test_world_returns_are_drawn_with_their_intervals(page: str, report_files: ReportFiles) -> None:
    doc = json.loads(report_files.world_evaluate_json.read_text())
    chart = re.search(r'<svg [^>]*id="world-0-return".*?</svg>', page, re.S)
    assert chart is not None
    values = [float(v) for v in re.findall(r'class="pt" data-value="([^"]+)"', chart.group(0))]
    assert values == [row["return"]["value"] for row in doc["rows"]]
    assert "recloop world evaluate" in page and "recloop world ope" in page


def test_embedded_data_is_the_figures_numbers(page: str, report_files: ReportFiles) -> None:
    raw = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert raw is not None
    data = json.loads(raw.group(1).replace("<\\/", "</"))
    ds = data["datasets"][0]
    assert ds["splits"] == {"train": 400, "valid": 40, "test": 40}
    assert sum(ds["reward_mix"]["counts"]) == 480
    for curve in data["training"]:
        lines = (Path(curve["run"]) / "metrics.jsonl").read_text().splitlines()
        assert len(curve["epochs"]) == len(lines)
    mix = data["recommendation_mix"]
    assert {m["algo"] for m in mix} == {"popularity", "supervised"}
    for m in mix:
        assert sum(m["share"]) == pytest.approx(1.0)
        assert 0 < m["coverage"] <= 1
    pop = next(m for m in mix if m["algo"] == "popularity")
    sup = next(m for m in mix if m["algo"] == "supervised")
    # Popularity ranks by train counts: with 10 of ~20 unconsumed items per user, the least
    # popular tenths never make a list; the learned model reaches into them.
    assert sum(pop["share"][:3]) == 0 and sum(sup["share"][:3]) > 0
    assert sum(pop["share"][5:]) > sum(sup["share"][5:])
    assert pop["coverage"] < sup["coverage"]


def test_cli_writes_the_report(report_files: ReportFiles, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    code = main(["report", str(report_files.root), "--out", str(out)])
    assert code == 0
    assert "charts" in capsys.readouterr().out
    assert out.stat().st_size > 10_000
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_result_counts_charts(report_files: ReportFiles, tmp_path: Path) -> None:
    res = write_report(
        [report_files.root], tmp_path / "r.html", ReportConfig(recommendation_mix=False)
    )
    html = res.path.read_text()
    assert res.charts == len(re.findall(r'<svg [^>]*class="chart"', html)) and res.charts >= 10
    assert "Coverage and popularity bias" not in res.sections


def test_an_unfinished_run_has_curves_but_no_comparison_row(
    report_files: ReportFiles, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(report_files.runs[1], run)
    (run / "results.json").unlink()  # training was stopped before the end
    shutil.rmtree(run / "artifact")
    inputs = collect_inputs([run])
    assert [d.path for d in inputs.datasets] == [report_files.data]  # followed from run.json
    html, page = render(inputs, ReportConfig())
    assert 'id="train-valid"' in html
    assert "comparison" not in page.data and "recommendation_mix" not in page.data
    assert len(page.data["training"][0]["epochs"]) == 2


def test_a_csv_without_the_experiment_columns_is_an_error_only_when_named(
    report_files: ReportFiles, tmp_path: Path
) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    other = folder / "other.csv"
    other.write_text("a,b\n1,2\n")
    (folder / "exp.csv").write_bytes(report_files.experiment_csv.read_bytes())
    found = collect_inputs([folder])  # met while searching: skipped
    assert [e.path.name for e in found.experiments] == ["exp.csv"]
    with pytest.raises(DataError, match=r"other\.csv: line 1: .*missing round, arm"):
        collect_inputs([other])
