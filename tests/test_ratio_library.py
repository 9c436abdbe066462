"""The ratio library: which table a job plans from, and that every tool plans from it.

The choice is checked against ``conftest.library_choice``, a restatement of the
rule that reads the data file itself; plans are recomputed with skip_schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from magcache_framepack import bench, cli, settings as settings_module
from magcache_framepack.bench.ratios import library_plan_rows
import magcache_core as core
from magcache_framepack.settings import JobSettings
from magcache_framepack.job import magcache_config, ratio_source, run_job
from magcache_framepack.models import TINY_MODEL_ID, build_tiny_models
from conftest import library_choice, library_plan_ratios

RESOLUTIONS = (10, 128, 150, 192, 200, 320, 383.5, 448, 576, 600, 624, 688, 704, 705, 768, 1000, 4096)
STEPS = (1, 2, 24, 25, 26, 37, 40, 50, 62, 63, 75, 100)


@pytest.mark.parametrize("variant", ["framepack", "f1"])
def test_library_choice_matches_the_rule(variant: str) -> None:
    for res in RESOLUTIONS:
        for steps in STEPS:
            table_res, table_steps, table = library_choice(variant, res, steps)
            ratios, source = core.library_ratios(variant, res, steps)
            assert len(ratios) == steps
            assert ratios == core.resample_mag_ratios(table, steps, "magnitude"), (res, steps)
            name = "published MagCache table" if (table_res, table_steps) == (640, 25) else "FramePack-Studio"
            expected = f"{name}, {table_res} px, {table_steps} steps"
            if table_steps != steps:
                expected += f", resampled to {steps} steps"
            assert source == expected
            nearest, _ = core.library_ratios(variant, res, steps, mode="nearest")
            assert nearest == core.resample_mag_ratios(table, steps, "nearest")


def test_ties_go_to_the_larger() -> None:
    # 320 px is as far from 256 as from 384; 37.5 steps would tie 25 and 50, 62/63 straddle 50 and 75
    assert core.pick_ratio_table("framepack", 320, 25).resolution == 384
    assert core.pick_ratio_table("f1", 704, 25).resolution == 768      # between 640 and 768
    assert core.pick_ratio_table("framepack", 640, 63).steps == 75 and core.pick_ratio_table("f1", 640, 62).steps == 50
    assert core.pick_ratio_table("framepack", 512, 38).steps == 50 and core.pick_ratio_table("framepack", 512, 37).steps == 25


def test_published_plans_at_640_and_25_steps() -> None:
    for variant, published in core.VARIANT_MAG_RATIOS.items():
        ratios, source = core.library_ratios(variant, 640, 25)
        assert ratios == list(published) and source.startswith("published")
        # a 640 bucket gives 624 to 688 px: all of them plan from the published table
        for res in (624, 640, 656, 688):
            assert core.library_ratios(variant, res, 25)[0] == list(published)
        for preset in core.PRESETS.values():
            assert core.skip_schedule(ratios, 25, *preset) == core.skip_schedule(published, 25, *preset)


def test_bad_lookups_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="must be one of framepack, f1"):
        core.library_ratios("sdxl", 640, 25)
    with pytest.raises(ValueError, match="positive number of pixels"):
        core.library_ratios("f1", 0, 25)
    with pytest.raises(ValueError, match="integer >= 1"):
        core.library_ratios("f1", 640, 0)


def test_a_384_px_job_plans_from_the_384_table_and_a_profile_overrides(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "TINY_RESOLUTION", 384)       # tiny models may render this large, for this test
    models = build_tiny_models("framepack")
    image = np.full((400, 400, 3), 90, np.uint8)
    settings = JobSettings(prompt="a box", seconds=1, steps=6, resolution=384, seed=3)
    result = run_job(models, image, settings, outputs_dir=tmp_path)
    assert result.status == "done", result.message
    frame = result.record["frame"]
    table_res, table_steps, _ = library_choice("framepack", (frame["height"] + frame["width"]) / 2, 6)
    assert table_res == 384
    ratios = library_plan_ratios("framepack", frame["height"], frame["width"], 6)
    record = json.loads(Path(result.video_path).with_suffix(".json").read_text())
    assert record["magcache"]["ratios"] == ratios
    assert record["magcache"]["ratio_source"] == "FramePack-Studio, 384 px, 25 steps, resampled to 6 steps"
    plan = core.skip_schedule(ratios, 6, 0.10, 3, 0.2)
    assert result.sections[0].skipped_steps == [i for i, s in enumerate(plan) if s]

    # a profile chosen by the user wins over the library
    profile = core.MagCacheProfile(variant="framepack", num_steps=6, ratios=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                                   model=TINY_MODEL_ID).save(tmp_path / "flat.json")
    config = magcache_config(JobSettings(prompt="x", steps=6, mag_ratios=str(profile)),
                             "framepack", TINY_MODEL_ID, 384)
    assert list(config.mag_ratios) == [1.0] * 6 and "flat.json" in ratio_source(config)
    assert "chosen by you" in ratio_source(config)


@pytest.mark.slow
def test_cli_resample_nearest_and_calibration_grid(tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "in.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(image)
    out = tmp_path / "near.mp4"
    common = ["--image", str(image), "--tiny", "--seconds", "1", "--no-progress", "--outputs-dir", str(tmp_path / "o")]
    assert cli.main([*common, "--steps", "40", "--resample", "nearest", "--output", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    frame = record["frame"]
    ratios = library_plan_ratios("framepack", frame["height"], frame["width"], 40, mode="nearest")
    assert record["settings"]["resample"] == "nearest" and record["magcache"]["resample"] == "nearest"
    assert record["magcache"]["ratios"] == ratios and record["magcache"]["ratio_source"].endswith("(nearest)")
    plan = core.skip_schedule(ratios, 40, 0.10, 3, 0.2, resample="nearest")
    assert record["sections"][0]["skipped_steps"] == [i for i, s in enumerate(plan) if s]

    # a grid: one calibration per (resolution, steps), each profile saying what it measured
    profiles = tmp_path / "profiles"
    rc = cli.main([*common, "--calibrate", "--resolutions", "64,96", "--steps", "3,4",
                   "--profiles-dir", str(profiles)])
    assert rc == 0
    got = sorted((p["resolution"] > 72, p["num_steps"]) for p in
                 (json.loads(f.read_text()) for f in profiles.glob("*.json")))
    assert got == [(False, 3), (False, 4), (True, 3), (True, 4)]

    with pytest.raises(SystemExit):
        cli.main([*common, "--resolutions", "64,96"])      # a grid only calibrates


def test_bench_ratios_chart_and_plan_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    profile = core.MagCacheProfile(variant="f1", num_steps=4, resolution=300, ratios=[1.0, 1.2, 1.0, 0.9])
    path = profile.save(tmp_path / "mine.json")
    png = tmp_path / "ratios.png"
    assert bench.main(["ratios", str(path), "--steps", "25,50", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    for row in library_plan_rows():
        res, steps, table = library_choice(row["variant"], row["resolution"], row["steps"])
        ratios = core.resample_mag_ratios(table, row["steps"])
        for preset, params in core.PRESETS.items():
            assert row[preset] == core.skip_schedule(ratios, row["steps"], *params).count(False)
    assert "| framepack | 256 | 50 | FramePack-Studio, 256 px, 50 steps |" in printed
    with pytest.raises(SystemExit):
        bench.main(["ratios", "--steps", "30", "--out", str(png)])
