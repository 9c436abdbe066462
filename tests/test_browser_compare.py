"""Compare with no cache, Render without cache and the Cache grid, clicked in Chromium (issue #16).

Uses the browser and tiny app of ``test_browser.py`` (its fixtures); skipped
the same way without Chromium or Playwright, and failing instead in CI.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from typing import Any

import pytest

from test_browser import JOB_TIMEOUT_MS, ROOT, app, browser, set_slider  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCREENSHOTS = {"compare": ROOT / "assets" / "magcache_compare.png", "grid": ROOT / "assets" / "magcache_grid.png"}


def keep_screenshot(page: Any, locator: str, name: str, tmp_path: pathlib.Path) -> None:
    """A screenshot of one part of the page; the README's copy is written when it is missing."""
    shot = tmp_path / f"{name}.png"
    page.locator(locator).screenshot(path=str(shot))
    assert shot.stat().st_size > 5_000
    if not SCREENSHOTS[name].exists():
        shutil.copyfile(shot, SCREENSHOTS[name])


def finished_job(page: Any, before: set[pathlib.Path], outputs: pathlib.Path) -> dict[str, Any]:
    """The record of the one video the last job added to the outputs folder (its final section)."""
    page.locator("#start:not([disabled])").wait_for(timeout=JOB_TIMEOUT_MS)
    new = sorted(set(outputs.glob("*.json")) - before)
    assert new, "the job should have written a video and its record"
    return json.loads(new[-1].read_text(encoding="utf-8"))


def test_compare_render_and_grid_in_chromium(browser: Any, app: dict[str, Any],  # noqa: F811 - fixtures
                                             tmp_path: pathlib.Path) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1500})
    page = context.new_page()
    page.goto(app["url"])
    page.locator("#skip-plan .mc-plan-summary").wait_for()
    page.locator("#input-image input[type=file]").set_input_files(str(app["image"]))
    page.locator("#input-image img").first.wait_for()
    page.locator("#prompt textarea").fill("A calm test pattern drifts slowly.")
    set_slider(page, "total-length", 1)
    set_slider(page, "steps", 8)
    set_slider(page, "magcache-thresh", 0.3)
    set_slider(page, "magcache-k", 4)
    outputs = app["outputs"]

    # before any job of this page, Compare says there is nothing to compare yet
    page.locator("#compare").click()
    page.get_by_text("Nothing to run again yet").first.wait_for(timeout=JOB_TIMEOUT_MS)

    before = set(outputs.glob("*.json"))
    page.locator("#start").click()
    page.get_by_text(re.compile(r"^done: ")).wait_for(timeout=JOB_TIMEOUT_MS)
    cached = finished_job(page, before, outputs)
    assert cached["settings"]["cache"] == "magcache" and cached["magcache"]["plan"].count("skip") > 0, (cached["settings"], cached["magcache"])

    # Compare: the same job with the cache Off, both videos side by side, the figures and both charts
    before = set(outputs.glob("*.json"))
    page.locator("#compare").click()
    page.locator("#compare-summary").get_by_text("against no cache").wait_for(timeout=JOB_TIMEOUT_MS)
    uncached = finished_job(page, before, outputs)
    assert uncached["settings"]["cache"] == "off" and uncached["seed"] == cached["seed"]
    assert uncached["compare"]["which"] == "cached version"
    assert page.locator("#compare-cached video").count() == 1
    assert page.locator("#compare-uncached video").count() == 1
    assert page.locator("#compare-charts svg").count() == 2
    summary = page.locator("#compare-summary").inner_text()
    assert f"planned {8 / cached['magcache']['plan'].count('compute'):.2f}x" in summary, summary
    keep_screenshot(page, "#compare-panel", "compare", tmp_path)

    # Render without cache after another cached job: one click, the exact video
    page.locator("#start").click()
    page.locator("#end:not([disabled])").wait_for()
    finished_job(page, set(), outputs)
    before = set(outputs.glob("*.json"))
    page.locator("#render-uncached").click()
    page.locator("#end:not([disabled])").wait_for()
    rendered = finished_job(page, before, outputs)
    assert rendered["settings"]["cache"] == "off"
    assert rendered["frames_sha256"] == uncached["frames_sha256"]      # the same job without the cache
    assert "computed 8/8 steps" in page.locator("#job-summary").inner_text()

    # a 2x2 grid on the same job: the table, both scatters and the four videos, then the exports
    page.get_by_role("tab", name="Cache grid").click()
    page.locator("#grid-thresholds textarea, #grid-thresholds input").first.fill("0.1, 0.3")
    page.locator("#grid-ks textarea, #grid-ks input").first.fill("1, 4")
    page.locator("#grid-run").click()
    page.locator("#grid-status").get_by_text("Done: 4 cells").wait_for(timeout=JOB_TIMEOUT_MS)
    table = page.locator("#grid-table").inner_text()
    for name in ("E0.1 K1 R0.2", "E0.1 K4 R0.2", "E0.3 K1 R0.2", "E0.3 K4 R0.2"):
        assert name in table
    assert page.locator("#grid-scatter svg").count() == 2
    assert page.locator("#grid-scatter circle").count() == 8
    assert page.locator("#grid-videos video").count() >= 1
    assert page.locator("#grid-csv a, #grid-json a").count() >= 2
    keep_screenshot(page, "#tab-grid", "grid", tmp_path)
    context.close()
