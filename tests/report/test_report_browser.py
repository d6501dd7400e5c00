"""The report as a person sees it: opened in headless Chromium from a file, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from recloop.data.dataset import PreparedDataset
from recloop.report import ReportConfig, write_report

if TYPE_CHECKING:  # the fixture's type; tests/*/conftest.py are several modules named conftest
    from conftest import ReportFiles

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def report_html(report_files: ReportFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    write_report(
        [report_files.root / "runs", report_files.evaluate_json, report_files.world_ope_json,
         report_files.world_evaluate_json, report_files.experiment_csv],
        out,
        ReportConfig(),
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def opened(browser: Any, report_html: Path, screenshot_dir: Path) -> Any:
    """The page, loaded with every non-file request refused and recorded; console messages
    and page errors collected; a full-page screenshot saved."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    messages: list[tuple[str, str]] = []
    remote: list[str] = []
    page.on("console", lambda m: messages.append((m.type, m.text)))
    page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))

    def refuse(route: Any) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            remote.append(route.request.url)
            route.abort()

    page.route("**/*", refuse)
    page.goto(report_html.as_uri(), wait_until="load")
    page.screenshot(path=str(screenshot_dir / "report.png"), full_page=True)
    page.messages, page.remote = messages, remote
    yield page
    page.close()


def test_opens_offline_without_console_errors(opened: Any) -> None:
    assert opened.remote == []  # nothing fetched: the file is self-contained
    errors = [(t, m) for t, m in opened.messages if t in ("error", "pageerror", "warning")]
    assert errors == []
    assert opened.title() == "recloop report"


def test_every_chart_has_rendered(opened: Any) -> None:
    charts = opened.evaluate(
        """() => [...document.querySelectorAll('svg.chart')].map(s => {
            const r = s.getBoundingClientRect();
            return {id: s.id, w: r.width, h: r.height, points: +s.dataset.points,
                    marks: s.querySelectorAll('circle,rect.bar,polyline,path.truth').length,
                    drawn: [...s.querySelectorAll('circle,rect.bar,polyline')]
                        .filter(e => { const b = e.getBBox(); return b.width + b.height > 0; })
                        .length};
        })"""
    )
    assert len(charts) >= 14  # 6 dataset, 4 training, 2 comparison, 2+ others
    empty = [c["id"] for c in charts if not (c["w"] > 100 and c["h"] > 100 and c["drawn"] > 0)]
    assert empty == []
    assert all(c["points"] > 0 for c in charts), charts
    ids = {c["id"] for c in charts}
    for expected in ("ds0-time", "train-valid", "cmp-masked", "cmp-unmasked", "ope-world-0",
                     "world-0-return", "mix-deciles", "exp-0"):  # fmt: skip
        assert expected in ids


def test_numbers_shown_equal_the_json(opened: Any, report_files: ReportFiles) -> None:
    doc = json.loads(report_files.evaluate_json.read_text())
    cells = opened.evaluate(
        """() => [...document.querySelectorAll('td[data-metric]')].map(td => ({
            algo: td.dataset.algo, protocol: td.dataset.protocol, metric: td.dataset.metric,
            seeds: +td.dataset.seeds, text: td.innerText}))"""
    )
    assert len(cells) == 2 * 3 * 2  # 2 protocols x 3 metrics x 2 algorithms
    for c in cells:
        key = "metrics" if c["protocol"] == "masked" else "metrics_unmasked"
        values = [r[key][c["metric"]] for r in doc["runs"] if r["algo"] == c["algo"]]
        assert c["seeds"] == len(values)
        assert float(c["text"].split(" ± ")[0]) == pytest.approx(
            sum(values) / len(values), abs=5e-5
        )
    # The OPE chart's points and diamonds are the world document's estimates and truths.
    world = json.loads(report_files.world_ope_json.read_text())
    shown = opened.evaluate(
        """() => { const s = document.getElementById('ope-world-0');
            return {pts: [...s.querySelectorAll('circle.pt')].map(c => +c.dataset.value),
                    truth: [...s.querySelectorAll('path.truth')].map(p => +p.dataset.value)}; }"""
    )
    expected = [iv["value"] for per_run in world["estimates"].values() for iv in per_run]
    assert shown["pts"] == pytest.approx(expected)
    assert shown["truth"] == pytest.approx(world["one_step_truth"] * len(world["estimates"]))
    # Dataset table: events per split as the prepared dataset holds them.
    ds = PreparedDataset.load(report_files.data)
    splits = opened.evaluate(
        """() => Object.fromEntries(['train','valid','test'].map(k =>
            [k, +document.querySelector(`td[data-dataset="0"][data-field="${k}"]`)
                .innerText.replace(/,/g, '')]))"""
    )
    assert splits == ds.split_counts()


def test_screenshot_saved(opened: Any, screenshot_dir: Path) -> None:
    shot = screenshot_dir / "report.png"
    assert shot.is_file() and shot.stat().st_size > 50_000
