"""Readable profiles (#15 item 7): short, sortable file names that never overwrite each other, a short
label in the app's dropdown, and no empty line under it."""

from __future__ import annotations

import datetime
import pathlib
import re
from typing import Any

import numpy as np
import pytest

import magcache_core
from magcache_framepack.app import ProfileCatalog, build_ui
from magcache_framepack.app.profiles import FITS_MARK, profile_status_update
from magcache_framepack.records import publish_new
from magcache_framepack.settings import JobSettings, profile_file_stem

NEW_NAME = re.compile(r"^(framepack|f1)-\d+px-\d+steps-\d{8}-\d{4}(-\d+)?\.json$")


def profile(folder: pathlib.Path, name: str, variant: str = "framepack", steps: int = 25,
            resolution: int | None = 128, created: str = "2026-12-01T19:51:19") -> pathlib.Path:
    return magcache_core.MagCacheProfile(variant=variant, num_steps=steps, ratios=[1.0] * steps,
                                         resolution=resolution, created=created).save(folder / name)


def test_new_names_are_short_and_sortable() -> None:
    when = datetime.datetime(2026, 12, 1, 19, 51, 7)
    assert profile_file_stem("framepack", 128, 25, when) == "framepack-128px-25steps-20261201-1951"
    later = [profile_file_stem("f1", 640, 50, datetime.datetime(2026, m, d, h, 0)) + ".json"
             for m, d, h in ((1, 2, 3), (3, 1, 0), (11, 30, 23))]
    assert sorted(later) == later and all(NEW_NAME.match(name) for name in later)       # in time order


def test_a_name_taken_in_the_same_minute_gets_a_number(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "framepack-128px-25steps-20261201-1951.json"
    saved = []
    for text in ("first", "second", "third"):
        staged = tmp_path / f".{text}.staged"
        staged.write_text(text)
        saved.append(publish_new(staged, target))
    assert [p.name for p in saved] == [target.name, "framepack-128px-25steps-20261201-1951-2.json",
                                       "framepack-128px-25steps-20261201-1951-3.json"]
    assert [p.read_text() for p in saved] == ["first", "second", "third"]      # none overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in saved)   # no staged file left


@pytest.fixture(scope="module")
def tiny_framepack() -> Any:
    from magcache_framepack.models import load_models

    return load_models("framepack", tiny=True)


def test_calibration_jobs_save_short_names(tiny_framepack: Any, tmp_path: pathlib.Path) -> None:
    from magcache_framepack.job import run_job

    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    settings = JobSettings(prompt="a box", seconds=1, latent_window_size=6, steps=3, resolution=64, calibrate=True)
    paths, frames = [], []
    for _ in range(2):
        result = run_job(tiny_framepack, image, settings, outputs_dir=tmp_path / "out", profiles_dir=tmp_path)
        assert result.status == "done", result.message
        paths.append(pathlib.Path(result.profile_path))
        frames.append(result.record["frame"])
    assert len(set(paths)) == 2 and all(p.is_file() and NEW_NAME.match(p.name) for p in paths), paths
    resolution = round((frames[0]["width"] + frames[0]["height"]) / 2)        # the frames' (w + h) / 2
    assert all(p.name.startswith(f"framepack-{resolution}px-3steps-") for p in paths)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(p.name for p in paths)   # nothing else


def test_the_dropdown_shows_short_labels(tmp_path: pathlib.Path) -> None:
    profile(tmp_path, "framepack-128px-25steps-20261201-1951.json")
    # a file saved under the earlier long name still loads, and reads as short as a new one
    old = "magcache_framepack_8steps_128px_20261201-195119_261201_195103_768_9786.json"
    profile(tmp_path, old, steps=8, created="2026-11-30T08:05:59")
    profile(tmp_path, "no_resolution.json", steps=30, resolution=None, created="2026-01-02T03:04:05")
    profile(tmp_path, "f1.json", variant="f1")              # another variant: left out
    catalog = ProfileCatalog("framepack", tmp_path)
    labels = dict((value, label) for label, value in catalog.choices())
    assert labels["framepack-128px-25steps-20261201-1951.json"] == "FramePack · 128 px · 25 steps · 12-01 19:51"
    assert labels[old] == "FramePack · 128 px · 8 steps · 11-30 08:05"
    assert labels["no_resolution.json"] == "FramePack · 30 steps · 01-02 03:04"
    assert "f1.json" not in labels
    assert labels["library"] == "Ratio library · FramePack" and catalog.value_for(labels["library"]) == "library"
    assert max(len(label) for value, label in labels.items() if value != "library") <= 45
    # made for this job (128 px, 8 steps): listed first and marked
    first_label, first_value = catalog.choices(8, 128)[0]
    assert (first_label, first_value) == (FITS_MARK + "FramePack · 128 px · 8 steps · 11-30 08:05", old)
    # every label selects its file (Gradio 5 may send the label instead of the value)
    for label, value in catalog.choices() + catalog.choices(8, 128):
        assert catalog.path_for(label) == catalog.path_for(value)
    f1 = ProfileCatalog("f1", tmp_path)
    assert ("FramePack-F1 · 128 px · 25 steps · 12-01 19:51", "f1.json") in f1.choices()


def test_two_profiles_that_read_the_same_are_told_apart_by_file(tmp_path: pathlib.Path) -> None:
    profile(tmp_path, "framepack-128px-25steps-20261201-1951.json")
    profile(tmp_path, "framepack-128px-25steps-20261201-1951-2.json")
    catalog = ProfileCatalog("framepack", tmp_path)
    entries = [(label, value) for label, value in catalog.choices() if value != "library"]
    assert [label for label, _ in entries] == [
        "FramePack · 128 px · 25 steps · 12-01 19:51 · framepack-128px-25steps-20261201-1951-2.json",
        "FramePack · 128 px · 25 steps · 12-01 19:51 · framepack-128px-25steps-20261201-1951.json"]
    for label, value in entries:
        assert catalog.value_for(label) == value


def test_no_empty_line_under_the_dropdown(tmp_path: pathlib.Path) -> None:
    empty = profile_status_update("", "")
    assert empty["visible"] is False and empty["value"] == ""
    shown = profile_status_update("Using profile x.json", "")
    assert shown["visible"] is True and "x.json" in shown["value"]

    def status_component(profiles: pathlib.Path) -> Any:
        demo = build_ui(None, "framepack", outputs_dir=tmp_path / "out", profiles_dir=profiles)
        return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "profile-status")

    assert status_component(tmp_path / "none").visible is False             # nothing to say: no band
    profile(tmp_path / "some", "f1.json", variant="f1")
    assert status_component(tmp_path / "some").visible is True              # "1 file left out" is said
