"""Compare with no cache, and Render without cache: the last job again with the cache Off (issue #16).

The uncached rerun must be exactly the job a user would get by choosing Off
and pressing Start (frame for frame), the figures must be what the metrics
library and plain arithmetic give on the two files, and the two records must
name each other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np
import pytest

from magcache_framepack.app.jobs import JobRequest
from magcache_framepack.app.rerun import COMPARE_OUTPUTS, uncached_rerun
from magcache_framepack.app.views import GENERATE_OUTPUTS
from magcache_framepack.records import decode_frames
from magcache_framepack.settings import JobSettings
from test_app import ONE_SECTION, Server, video_file


# -- the decision, by hand ---------------------------------------------------------------------------

class _Result:
    video_path = "outputs/x.mp4"
    status = "done"


def test_rerun_is_the_same_request_with_the_cache_off() -> None:
    settings = JobSettings(prompt="a cat", seed=7, steps=12, magcache_thresh=0.2, cache="magcache")
    request = JobRequest(settings, np.zeros((4, 4, 3), np.uint8), "library")
    rerun, refusal = uncached_rerun((request, _Result()))
    assert refusal == ""
    assert rerun.settings.cache == "off" and not rerun.settings.calibrate
    # everything else as it was: the image, its file, the table and every other setting
    assert rerun.image is request.image and rerun.profile_choice == "library"
    assert dataclasses.replace(rerun.settings, cache="magcache") == settings
    teacache = dataclasses.replace(request, settings=dataclasses.replace(settings, cache="teacache"))
    assert uncached_rerun((teacache, _Result()))[0].settings.cache == "off"


@pytest.mark.parametrize("change, why", [({"cache": "off"}, "run with the cache Off"),
                                         ({"calibrate": True}, "a calibration run")])
def test_rerun_refuses_what_is_already_uncached(change: dict[str, Any], why: str) -> None:
    request = JobRequest(JobSettings(prompt="", **change), None, None)
    rerun, refusal = uncached_rerun((request, _Result()))
    assert rerun is None and why in refusal and "outputs/x.mp4" in refusal


def test_rerun_refuses_before_any_job() -> None:
    rerun, refusal = uncached_rerun(None)
    assert rerun is None and refusal.startswith("Nothing to run again yet")


# -- through the API, on a tiny app ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = Server("framepack", tmp_path_factory.mktemp("compare"))
    yield server
    server.demo.close()


def outputs(result: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return dict(zip(names, result, strict=True))


def psnr_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def ssim_by_torchmetrics(reference: np.ndarray, other: np.ndarray) -> list[float]:
    """torchmetrics' SSIM called directly, with the settings the README states (0..1, Gaussian sigma 1.5)."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    def batch(frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0

    return structural_similarity_index_measure(batch(other), batch(reference), gaussian_kernel=True, sigma=1.5,
                                               kernel_size=11, data_range=1.0, reduction="none").tolist()


@pytest.mark.slow
def test_compare_and_render_without_cache(server: Server) -> None:
    settings = dict(ONE_SECTION, cache="magcache", seed=5)
    client = server.client()
    cached = server.generate(client, **settings)
    assert cached["report"]["status"] == "done", cached["report"]["message"]
    assert cached["report"]["plan"]["computed_steps"] != list(range(settings["steps"])), "should skip some steps"

    got = outputs(client.predict(api_name="/compare"), GENERATE_OUTPUTS + COMPARE_OUTPUTS)
    report, comparison = got["report"], got["comparison"]
    assert report["status"] == "done", report["message"]
    assert report["settings"]["cache"] == "off" and report["settings"]["seed"] == 5
    uncached_path = pathlib.Path(report["video"])
    cached_path = pathlib.Path(cached["report"]["video"])

    # the uncached video is the one an Off job gives (a separate client, Start with Off)
    off = server.generate(**dict(settings, cache="off"))
    reference = decode_frames(off["video_file"])
    np.testing.assert_array_equal(decode_frames(uncached_path), reference)
    np.testing.assert_array_equal(decode_frames(video_file(got["uncached_video"])), reference)
    np.testing.assert_array_equal(decode_frames(video_file(got["cached_video"])), decode_frames(cached_path))

    # the figures: PSNR by hand on the decoded files; every frame scored
    cached_frames = decode_frames(cached_path)
    expected_psnr = [psnr_by_hand(u, c) for u, c in zip(reference, cached_frames, strict=True)]
    per_frame = [math.inf if v == "inf" else v for v in comparison["psnr"]["per_frame"]]
    assert per_frame == pytest.approx(expected_psnr, abs=1e-3)
    assert comparison["ssim"]["per_frame"] == pytest.approx(ssim_by_torchmetrics(reference, cached_frames), abs=1e-5)
    assert comparison["lpips_note"]          # LPIPS shown, or one line saying why not
    # times and speedups from the two records; the planned one from the cached plan
    plan = cached["report"]["plan"]
    assert comparison["speedup"]["planned"] == pytest.approx(settings["steps"] / len(plan["computed_steps"]))
    cached_record = json.loads(cached_path.with_suffix(".json").read_text(encoding="utf-8"))
    uncached_record = json.loads(uncached_path.with_suffix(".json").read_text(encoding="utf-8"))
    assert comparison["cached"]["seconds"] == cached_record["timings"]["seconds"]
    assert comparison["speedup"]["wall"] == pytest.approx(
        uncached_record["timings"]["seconds"] / cached_record["timings"]["seconds"])
    # each record names the other
    assert cached_record["compare"]["with"] == uncached_path.name
    assert uncached_record["compare"]["with"] == cached_path.name
    assert "PSNR" in got["comparison_summary"] and "<svg" in got["comparison_charts"]

    # the last job is now the uncached one: Render without cache says so, Compare too
    again = outputs(client.predict(api_name="/render_without_cache"), GENERATE_OUTPUTS)
    assert again["report"]["status"] == "error"
    assert "already the uncached render" in again["report"]["message"]

    # after another cached job, Render without cache gives the Off video again, in one call
    assert server.generate(client, **settings)["report"]["status"] == "done"
    rendered = outputs(client.predict(api_name="/render_without_cache"), GENERATE_OUTPUTS)
    assert rendered["report"]["status"] == "done" and rendered["report"]["settings"]["cache"] == "off"
    np.testing.assert_array_equal(decode_frames(video_file(rendered["video"])), reference)


def test_compare_before_any_job_says_why(server: Server) -> None:
    got = outputs(server.client().predict(api_name="/compare"), GENERATE_OUTPUTS + COMPARE_OUTPUTS)
    assert got["report"]["status"] == "error"
    assert got["report"]["message"].startswith("Nothing to run again yet")
