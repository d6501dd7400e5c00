"""The dashboard as a person sees it, in headless Chromium: it updates while a bounded load
runs against the service, and its user box shows what ``POST /v1/recommend`` answers.

The service runs for real (uvicorn on a free port, in a thread); the page is driven by
Playwright on Debian's chromium (the ``browser`` fixture).  A screenshot of the page is
saved to ``out/screenshots/`` (git-ignored) as an artifact of the run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import settings_for

from recloop.serving.app import create_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCREENSHOTS = Path(__file__).resolve().parents[2] / "out" / "screenshots"
KNOWN = ["u1", "u2", "u3", "u4", "u5"]


def wait_until(page: Any, check: Any, what: str, timeout_s: float = 20.0) -> None:
    """Poll ``check()`` from Python: the page's Content-Security-Policy forbids the string
    evaluation Playwright's ``wait_for_function`` uses."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(50)


def _polls(page: Any) -> int:
    return int(page.get_attribute("body", "data-polls") or 0)


def _run_in_thread(coro: Any) -> None:
    # Playwright's sync API keeps an event loop running in this thread
    t = threading.Thread(target=asyncio.run, args=(coro,))
    t.start()
    t.join()


def _shown_number(page: Any, selector: str) -> int:
    text = page.text_content(selector) or ""
    return int(text.replace(",", "")) if text.strip().replace(",", "").isdigit() else -1


def test_dashboard_updates_under_load_and_user_box_matches_the_api(
    browser: Any, artifact_dir: Path, serve_in_thread: Any
) -> None:
    app = create_app(settings_for(artifact_dir))
    with serve_in_thread(app, lifespan="on") as running:
        base = running.url
        # the stream processor's window, as `recloop stream` would publish it
        _run_in_thread(app.state.service.store.set_popular([("i9", 12.0), ("i4", 7.0)]))
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(f"{base}/dashboard?poll=250")
        wait_until(page, lambda: _polls(page) >= 1, "the first poll")
        assert _shown_number(page, "#total") == 0

        n_known, n_strangers = 150, 10
        seen: list[int] = []
        done = threading.Event()

        def load() -> None:
            # paced, so that the page polls several times while it runs
            with httpx.Client(base_url=base, timeout=10) as client:
                for k in range(n_known + n_strangers):
                    user = KNOWN[k % 5] if k < n_known else f"stranger-{k}"
                    assert client.post("/v1/recommend", json={"user_id": user}).status_code == 200
                    time.sleep(0.01)
            done.set()

        worker = threading.Thread(target=load)
        worker.start()
        while not done.is_set():
            seen.append(_shown_number(page, "#total"))
            page.wait_for_timeout(150)
        worker.join()
        total = n_known + n_strangers
        wait_until(page, lambda: _shown_number(page, "#total") == total, f"{total} requests")
        # it moved while the load ran: counts strictly between nothing and everything
        assert any(0 < v < total for v in seen), seen
        assert seen == sorted(seen)
        assert _shown_number(page, "#requests") == total
        assert _shown_number(page, "#fallbacks") == n_strangers
        assert page.locator("#popular li").count() == 2
        assert (page.text_content("#popular li") or "").startswith("i9")
        assert app.state.service.model.model_version in (page.text_content("#model-versions") or "")
        polylines = page.locator("#chart-rps polyline[data-key=rps]")
        assert polylines.count() == 1 and len(polylines.get_attribute("points") or "") > 10

        # the user box asks the API and shows its answer
        page.fill("#user-id", "u2")
        page.fill("#user-n", "5")
        page.click("#user-form button")
        wait_until(page, lambda: page.get_attribute("body", "data-answered") == "u2", "answer")
        shown_items = page.locator("#user-items td.item").all_text_contents()
        shown_scores = page.locator("#user-items td.score").all_text_contents()
        api = httpx.post(f"{base}/v1/recommend", json={"user_id": "u2", "n": 5}).json()
        assert shown_items == [x["item_id"] for x in api["items"]]
        assert shown_scores == [f"{x['score']:.4f}" for x in api["items"]]

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert problems == []


def test_dashboard_with_an_api_key(browser: Any, artifact_dir: Path, serve_in_thread: Any) -> None:
    app = create_app(settings_for(artifact_dir, api_key="k3y"))
    with serve_in_thread(app, lifespan="on") as running:
        base = running.url
        anonymous = browser.new_page()
        assert anonymous.goto(f"{base}/dashboard").status == 401
        # a browser that sends the key (a header extension, a proxy) gets the page and data
        context = browser.new_context(extra_http_headers={"X-API-Key": "k3y"})
        page = context.new_page()
        assert page.goto(f"{base}/dashboard?poll=250").status == 200
        wait_until(page, lambda: _polls(page) >= 2, "two polls")
        assert "live" in (page.text_content("#status") or "")
        context.close()
