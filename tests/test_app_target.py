"""A target speedup in the app (issue #16 item 4): the plan, the sliders, the job and its record follow it.

The planner itself is checked against a brute force in test_core_plan.py; here,
that the app hands it the table the job plans from (the library's, restated in
conftest), that the job runs its choice, and that the record keeps the target.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import pytest

import magcache_core
from conftest import library_plan_ratios
from magcache_framepack.app.requests import typed_settings
from magcache_framepack.app.views import tradeoff_chart
from magcache_framepack.sensitivity import framepack_step_weights
from test_app import ONE_SECTION, Server

ARGS = dict(prompt="", n_prompt="", seed=1, total_second_length=1, latent_window_size=9, steps=25, cfg=1, gs=10,
            rs=0, gpu_memory_preservation=6, magcache_thresh=0.1, magcache_K=3, retention_ratio=0.2,
            calibrate=False, mp4_crf=16, resample="magnitude", profile_path=None)


@pytest.mark.parametrize("cache, calibrate, target, kept", [
    ("magcache", False, 2, 2), ("magcache", False, "2.5", 2.5), ("magcache", False, None, None),
    ("magcache", False, "", None), ("magcache", False, 0, None), ("off", False, 2, None), ("teacache", False, 2, None), ("magcache", True, 2, None)])
def test_a_target_applies_to_magcache_jobs_only(cache: str, calibrate: bool, target: Any, kept: Any) -> None:
    settings = typed_settings(**{**ARGS, "cache": cache, "calibrate": calibrate}, target_speedup=target)
    assert settings.target_speedup == kept
    settings.clamped().validate()           # a dropped target never makes a job invalid


def test_tradeoff_chart_marks_the_plan_and_the_target() -> None:
    svg = tradeoff_chart([(1.0, 0.0), (2.0, 0.5), (3.0, 1.0)], current=(2.0, 0.5), target=2.5)
    # x: 1x at the left edge (44 px) to 3x * 1.04 at 450 px; y: 0 at the bottom (142 px) to 1.1 at the top (22 px)
    x = 44 + 406 * (2.0 - 1.0) / (3.12 - 1.0)
    y = 22 + 120 * (1 - 0.5 / 1.1)
    circle = re.search(r'class="mc-tradeoff-current" cx="([\d.]+)" cy="([\d.]+)"', svg)
    assert circle and float(circle[1]) == pytest.approx(x, abs=0.06) and float(circle[2]) == pytest.approx(y, abs=0.06)
    assert "target 2.5x" in svg and svg.count("<polyline") == 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = Server("framepack", tmp_path_factory.mktemp("target"))
    yield server
    server.demo.close()


@pytest.mark.slow
def test_a_job_with_a_target_runs_the_planners_choice(server: Server) -> None:
    steps, target = 12, 1.5       # the tiny frames' library table (128 px) reaches 1.5x at 12 steps
    out = server.generate(**dict(ONE_SECTION, steps=steps), target_speedup=target)
    report = out["report"]
    assert report["status"] == "done", report["message"]
    record = json.loads(pathlib.Path(report["video"]).with_suffix(".json").read_text(encoding="utf-8"))
    frame = record["frame"]
    ratios = library_plan_ratios("framepack", frame["height"], frame["width"], steps)
    weights = framepack_step_weights(steps, magcache_core.frame_resolution(frame["height"], frame["width"]), 9)
    chosen = magcache_core.plan_for_target(ratios, steps, target, step_weights=weights).chosen
    ran = record["magcache"]
    assert (ran["magcache_thresh"], ran["magcache_K"], ran["retention_ratio"]) == \
        (chosen.magcache_thresh, chosen.magcache_K, chosen.retention_ratio)
    assert record["settings"]["target_speedup"] == target and report["settings"]["target_speedup"] == target
    assert len(ran["computed_steps"]) <= steps / target
    assert report["plan"]["computed_steps"] == ran["computed_steps"]     # the page planned what ran


def test_an_unreachable_target_is_refused_with_the_best_reachable(server: Server) -> None:
    report = server.generate(**dict(ONE_SECTION, steps=8), target_speedup=10)["report"]
    assert report["status"] == "error"
    assert "no setting reaches a 10.00x speed-up at 8 steps" in report["message"]


def test_the_plan_weighs_steps_for_the_jobs_latent_window() -> None:
    """The page and the job plan a target with the same step weights: those of the job's latent window."""
    from magcache_framepack.app.handlers import AppEvents
    from magcache_framepack.job import magcache_config
    from magcache_framepack.settings import JobSettings

    # at window 3 the 640-px schedule's shift is below its cap, so the weights differ from window 9's
    assert framepack_step_weights(25, 640, 3) != framepack_step_weights(25, 640, 9)
    for window in (3, 9):
        config = magcache_config(JobSettings(prompt="", latent_window_size=window, target_speedup=2.0), "framepack",
                                 None, 640)
        assert config.step_weights == framepack_step_weights(25, 640, window)
    assert AppEvents.window_of("40") == 33 and AppEvents.window_of(None) == 9 and AppEvents.window_of(5) == 5
