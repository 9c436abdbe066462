"""The Gradio app (magcache_framepack/app/ and the two demo scripts), driven as users and API clients drive it.

Tiny random-weight models keep every job a CPU job of seconds: the videos are
noise, but their length, the per-section skip report and the calibration
round trip are exactly what the real app does.
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
import logging
import math
import re
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from magcache_framepack.app import (CUSTOM_PRESET, GENERATE_OUTPUTS, Job, ProfileCatalog, SessionJobs, StepClock,
                                    build_ui, eta_seconds, format_duration, image_frame_resolution, launch, main,
                                    plan_panel_html, preset_for, preset_values, profile_selection, run_job_thread)
import magcache_core
from conftest import library_choice, library_plan_ratios

ROOT = pathlib.Path(__file__).resolve().parent.parent
FPS = 30

# Small jobs: short latent windows make a section a couple of seconds on the CPU; a higher
# threshold and K make sure a few of the 8 steps are skipped, so the report has something to check.
# (1 s is the UI's shortest video; Gradio 6 refuses values outside a slider's range.)
FAST = dict(latent_window_size=4, total_second_length=1.0, steps=8, magcache_thresh=0.3, magcache_K=4,
            retention_ratio=0.2)            # 2 sections
ONE_SECTION = dict(FAST, latent_window_size=6)      # round(30 / 24) = 1 section


# ---------------------------------------------------------------------------
# Independent restatements (not imported from the code under test)
# ---------------------------------------------------------------------------

def framepack_frame_count(total_second_length: float, latent_window_size: int) -> int:
    """FramePack's video length: sections of ``window`` latents, 4 frames per latent, plus the first frame."""
    sections = int(max(round(total_second_length * FPS / (latent_window_size * 4)), 1))
    return sections * latent_window_size * 4 + 1


def reference_skips(ratios: list[float], thresh: float, k: int, retention: float) -> list[bool]:
    """MagCache's rule on a table already at the run's step count (no resampling)."""
    n = len(ratios)
    out, acc_ratio, acc_err, acc_steps = [], 1.0, 0.0, 0
    for t, r in enumerate(ratios):
        if t < max(int(retention * n), 1):
            out.append(False)
            continue
        acc_ratio *= r
        acc_err += abs(1 - acc_ratio)
        acc_steps += 1
        skip = acc_err <= thresh and acc_steps <= k and abs(1 - r) <= 0.06
        if not skip:
            acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        out.append(skip)
    return out


def plan_summary(panel: str) -> str:
    """The plan panel's bold summary line, as the page shows it."""
    match = re.search(r'<div class="mc-plan-summary"><b>(.*?)</b>', panel)
    assert match, panel
    return html.unescape(match.group(1))


def video_file(output: Any) -> str | None:
    """The file path in the video output as gradio_client returns it: the path itself (2.x, Gradio 6), or
    ``{"video": path or a FileData dict, "subtitles": None}`` (1.x, Gradio 5)."""
    if isinstance(output, dict):
        output = output.get("video")
        if isinstance(output, dict):
            output = output.get("path")
    return str(output) if output else None


def decoded_frames(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


# ---------------------------------------------------------------------------
# Pure parts: skip plan text, presets, profiles
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["framepack", "f1"])
@pytest.mark.parametrize("thresh,k,retention", [(0.10, 3, 0.2), (0.15, 4, 0.2), (0.0, 3, 0.2), (0.3, 5, 0.0),
                                                (0.25, 2, 0.5)])
def test_plan_panel_counts_the_passes(tmp_path: pathlib.Path, variant: str, thresh: float, k: int,
                                      retention: float) -> None:
    """The plan panel's line counts the passes MagCache's rule computes on the table in use (here a profile
    holding the published 25-step table, so no resampling is involved)."""
    ratios = list(magcache_core.VARIANT_MAG_RATIOS[variant])
    write_profile(tmp_path, "published.json", variant, ratios)
    catalog = ProfileCatalog(variant, tmp_path)
    computed = reference_skips(ratios, thresh, k, retention).count(False)
    text = plan_summary(plan_panel_html(catalog, "magcache", 25, thresh, k, retention, "published.json", False))
    assert text.startswith(f"{computed} of 25 transformer passes, about {25 / computed:.2f}x faster")
    # real CFG doubles the passes, not the ratio
    text = plan_summary(plan_panel_html(catalog, "magcache", 25, thresh, k, retention, "published.json", False,
                                        cfg=3.0))
    assert text.startswith(f"{2 * computed} of 50 transformer passes, about {25 / computed:.2f}x faster")


@pytest.mark.parametrize("resolution", [128, 384, 640])
@pytest.mark.parametrize("resample", ["magnitude", "nearest"])
def test_skip_plan_panel_follows_the_run_schedule(tmp_path: pathlib.Path, resolution: int, resample: str) -> None:
    catalog = ProfileCatalog("framepack", tmp_path, resolution=resolution)
    for steps in (8, 25, 40, 50):
        ratios = library_plan_ratios("framepack", resolution, resolution, steps, resample)
        schedule = reference_skips(ratios, 0.15, 4, 0.2)
        panel = plan_panel_html(catalog, "magcache", steps, 0.15, 4, 0.2, "library", False,
                                             resample=resample)
        assert panel.count('class="mc-step mc-skip"') == sum(schedule)
        assert panel.count('class="mc-step mc-run"') == steps - sum(schedule)
        assert f"{steps - sum(schedule)} of {steps} transformer passes" in panel
        table_res, table_steps, _ = library_choice("framepack", resolution, steps)
        where = "published MagCache table" if (table_res, table_steps) == (640, 25) else "FramePack-Studio"
        assert f"Ratio table: {where}, {table_res} px, {table_steps} steps" in panel
    assert "no MagCache plan applies" in plan_panel_html(catalog, "teacache", 25, .1, 3, .2, "", False)
    assert "no MagCache plan applies" in plan_panel_html(catalog, "off", 25, .1, 3, .2, "", False)
    assert "nothing skipped" in plan_panel_html(catalog, "magcache", 25, .1, 3, .2, "", True)


def test_table_in_use_follows_the_image_and_a_chosen_profile(tmp_path: pathlib.Path) -> None:
    """The line under the plan names the library table for the job's frames, or the profile the user chose."""
    from framepack.diffusers_helper.bucket_tools import find_nearest_bucket

    catalog = ProfileCatalog("framepack", tmp_path, resolution=640)
    # an image's frames are FramePack's bucket for it: (height + width) / 2 of that bucket picks the table
    for height, width in ((480, 832), (1080, 1920), (1024, 1024), (300, 2000)):
        image = tmp_path / f"in_{height}x{width}.png"
        Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(image)
        bucket_h, bucket_w = find_nearest_bucket(height, width, resolution=640)
        assert image_frame_resolution(str(image), 640) == (bucket_h + bucket_w) / 2
    (tmp_path / "text.png").write_text("not an image", encoding="utf-8")
    assert image_frame_resolution(str(tmp_path / "text.png"), 640) is None

    for resolution in (300, 700, None):
        panel = plan_panel_html(catalog, "magcache", 25, 0.1, 3, 0.2, "library", False,
                                             resolution=resolution)
        res, steps, ratios = library_choice("framepack", resolution or 640, 25)
        where = "published MagCache table" if (res, steps) == (640, 25) else "FramePack-Studio"
        assert f"Ratio table: {where}, {res} px, {steps} steps" in panel
        assert (f"your image's {resolution} px frames" if resolution else "this app's 640 px frames") \
            in html.unescape(panel)
        computed = reference_skips(ratios, 0.1, 3, 0.2).count(False)
        assert f"{computed} of 25 transformer passes" in panel

    # a chosen profile overrides the library, whatever the frames
    write_profile(tmp_path, "flat.json", "framepack", [1.0] * 25)
    panel = plan_panel_html(catalog, "magcache", 25, 0.1, 3, 0.2, "flat.json", False, resolution=300)
    assert "Ratio table: your profile flat.json (chosen by you)" in panel
    assert f"{reference_skips([1.0] * 25, 0.1, 3, 0.2).count(False)} of 25 transformer passes" in panel

    # "nearest" fits a table to another step count as the MagCache reference does: index i * 25 // steps
    _, _, table = library_choice("framepack", 640, 40)
    stretched = [table[i * len(table) // 40] for i in range(40)]
    nearest = plan_panel_html(catalog, "magcache", 40, 0.1, 3, 0.2, "library", False,
                                           resample="nearest")
    expected = magcache_core.skip_schedule(table, 40, 0.1, 3, 0.2, "nearest")
    assert f"{expected.count(False)} of 40 transformer passes" in nearest
    assert f"{reference_skips(stretched, 0.1, 3, 0.2).count(False)} of 40 transformer passes" in nearest


def test_eta_by_hand() -> None:
    """Only computed steps cost time: the ETA counts those still to come, plus a decode per section left."""
    plan = [False, False, True, False, True, True, False, True]       # 4 computed of 8
    # 3 sections; in the 2nd (index 1) after 3 steps: steps 3 and 6 computed here (2), 4 in the 3rd section,
    # 2 s per computed step, 5 s decode for this and the next section
    assert eta_seconds(plan, 3, 1, 3, 2.0, 5.0) == (2 + 4) * 2.0 + 2 * 5.0 == 22.0
    # the last step of the last section: only its decode is left
    assert eta_seconds(plan, 3, 2, 8, 2.0, 5.0) == 5.0
    # before anything: every computed step of every section and every decode
    assert eta_seconds(plan, 3, 0, 0, 1.5, 0.5) == 12 * 1.5 + 3 * 0.5

    # the clock measures computed steps only (a skipped step's time is not counted) and the decode overhead
    update = lambda step, t, section=0: type("U", (), {"step": step, "time": t, "section": section})()  # noqa: E731
    clock = StepClock(plan, 3, started=100.0)
    for step, t in ((1, 101.0), (2, 103.0), (3, 103.1), (4, 106.0)):
        clock.step(update(step, t))
    assert (clock.computed_steps, clock.computed_seconds) == (2, pytest.approx(2.0 + 2.9))
    clock.section(type("S", (), {"seconds": 10.0, "sampling_seconds": 7.0})())
    # 1 computed step left in section 0 after 4 steps (step 6), 8 in the two later ones, at 2.45 s; 3 s decode x 3
    left = clock.label(update(4, 106.0), now=160.0)
    assert left == f"elapsed 1:00, about {format_duration(9 * 2.45 + 3 * 3.0)} left"
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"


def test_presets_round_trip() -> None:
    for name, values in magcache_core.PRESETS.items():
        assert preset_values(name) == values
        assert preset_for(*values) == name
    assert preset_for(0.105, 3, 0.2) == CUSTOM_PRESET
    assert preset_for(0.10, 4, 0.2) == CUSTOM_PRESET


def write_profile(folder: pathlib.Path, name: str, variant: str, ratios: list[float]) -> pathlib.Path:
    return magcache_core.MagCacheProfile(variant=variant, num_steps=len(ratios), ratios=ratios).save(folder / name)


def test_profile_selection_refuses_bad_profiles(tmp_path: pathlib.Path) -> None:
    write_profile(tmp_path, "other.json", "f1", list(magcache_core.FRAMEPACK_F1_MAG_RATIOS))
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    good = write_profile(tmp_path, "flat.json", "framepack", [1.0] * 25)
    catalog = ProfileCatalog("framepack", tmp_path)
    # only what this app can use is offered; the rest is counted, with the reasons
    values = [value for _, value in catalog.choices()]
    assert values == ["library", "flat.json"]
    assert catalog.left_out() == ("2 file(s) in " + tmp_path.name + "/ left out, not usable by this app: "
                                  "1 calibrated for f1; 1 not a readable profile.")

    for bad, why in (("other.json", "calibrated for 'f1'"), ("broken.json", "not valid JSON"),
                     ("../etc/passwd", "unknown calibration profile"), ("missing.json", "unknown")):
        value, status, chart, warning = profile_selection(catalog, bad)
        assert value == "library"
        assert warning and why in warning
        assert "Refused" in status and "<svg" in chart
        # the plan panel says why instead of raising
        assert "No plan" in plan_panel_html(catalog, "magcache", 25, 0.1, 3, 0.2, bad, False)

    value, status, chart, warning = profile_selection(catalog, "flat.json")
    assert (value, warning) == ("flat.json", None) and "flat.json" in status
    # all ratios 1.0: every step after retention is skippable, K caps the run of skips
    panel = plan_panel_html(catalog, "magcache", 25, 0.1, 3, 0.2, "flat.json", False)
    computed = reference_skips([1.0] * 25, 0.1, 3, 0.2).count(False)
    assert computed == 10                               # steps 0-4, then 1 of every 4 (K = 3)
    assert f"{computed} of 25 transformer passes" in panel
    assert catalog.path_for("flat.json") == good.resolve()


def test_an_entrys_label_names_the_same_entry(tmp_path: pathlib.Path) -> None:
    """Gradio 5's dropdown sends the label in its box (not the value) when it loses focus after being
    opened: every label the dropdown shows selects what its value selects."""
    flat = write_profile(tmp_path, "flat.json", "framepack", [1.0] * 25)
    made = magcache_core.MagCacheProfile(variant="framepack", num_steps=8, ratios=[1.0] * 8, resolution=128)
    made.save(tmp_path / "made.json")
    catalog = ProfileCatalog("framepack", tmp_path)
    entries = catalog.choices() + catalog.choices(8, 128)           # the "made for this job" labels too
    assert len({label for label, _ in entries}) == 4                # library, flat, made, made-for-this-job
    for label, value in entries:
        assert catalog.path_for(label) == catalog.path_for(value)
        selected, _, _, warning = profile_selection(catalog, label)
        assert (selected, warning) == (value, None)
    paths = {label: catalog.path_for(label) for label, _ in entries}
    assert sorted(str(p) for p in paths.values()) == sorted(
        [str(flat.resolve()), str((tmp_path / "made.json").resolve()), str((tmp_path / "made.json").resolve()),
         "None"])
    with pytest.raises(ValueError, match="unknown calibration profile"):
        catalog.path_for("flat.json (a label of no entry)")


def test_mag_ratios_file_is_preselected(tmp_path: pathlib.Path) -> None:
    """build_ui(mag_ratios=FILE) starts on that profile, plan and all; a refused file stops the build."""
    elsewhere = tmp_path / "elsewhere"
    chosen = write_profile(elsewhere, "mine.json", "framepack", [1.0] * 25)
    demo = build_ui(None, "framepack", outputs_dir=tmp_path / "out", profiles_dir=tmp_path / "prof",
                                 mag_ratios=chosen, tiny=True)
    by_id = {getattr(block, "elem_id", None): block for block in demo.blocks.values()}
    assert by_id["profile"].value == str(chosen.resolve())
    assert str(chosen.resolve()) in [value for _, value in by_id["profile"].choices]
    flat = reference_skips([1.0] * 25, 0.10, 3, 0.2).count(False)
    assert f"{flat} of 25 transformer passes" in by_id["skip-plan"].value
    assert "random" in by_id["tiny-banner"].value

    other = write_profile(elsewhere, "f1.json", "f1", list(magcache_core.FRAMEPACK_F1_MAG_RATIOS))
    with pytest.raises(ValueError, match="calibrated for 'f1'"):
        build_ui(None, "framepack", outputs_dir=tmp_path / "out", profiles_dir=tmp_path / "prof",
                              mag_ratios=other)


def test_sessions_share_nothing() -> None:
    template = SessionJobs()
    tab_a, tab_b = copy.deepcopy(template), copy.deepcopy(template)
    assert tab_a is not tab_b and tab_a is not template
    job_a = tab_a.begin()
    assert job_a is not None
    assert tab_b.request_stop() is False          # tab B has no job: nothing of A's is touched
    assert not job_a.stop.is_set()
    assert tab_a.request_stop() is True and job_a.stop.is_set()
    tab_b.arm()                                     # Start clears B's early End
    assert tab_b.begin() is not None


def test_worker_always_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job thread posts a final result even when run_job raises, or when End comes while it waits."""
    import threading

    from magcache_framepack import job as job_module

    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(job_module, "run_job", explode)
    job, lock = Job(), threading.Lock()
    run_job_thread(job, lock, None, None, None, "out", "prof")
    kind, result = job.events.get_nowait()
    assert kind == "done" and result.status == "error" and "boom" in result.message
    assert not lock.locked()

    job = Job()
    lock.acquire()                                  # another session's job holds the GPU
    worker = threading.Thread(target=run_job_thread, args=(job, lock, None, None, None, "o", "p"))
    worker.start()
    assert job.events.get(timeout=10) == ("waiting", None)
    job.stop.set()
    worker.join(timeout=10)
    kind, result = job.events.get_nowait()
    assert kind == "done" and result.status == "stopped"
    lock.release()


# ---------------------------------------------------------------------------
# Entry points: import, argv, CUDA
# ---------------------------------------------------------------------------

def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) \
        -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_imports_have_no_side_effects() -> None:
    """Importing the demo scripts or the app module loads no model, builds no UI, starts nothing.

    The app imports gradio only inside the functions that build or serve the
    UI, so "gradio was not imported" proves no Blocks and no server could exist;
    nor huggingface_hub, which reads HF_HOME once, at import, before main() sets it.
    """
    app_modules = ("magcache_framepack.app", "magcache_framepack.app.views", "magcache_framepack.app.profiles",
                   "magcache_framepack.app.requests", "magcache_framepack.app.jobs", "magcache_framepack.app.handlers",
                   "magcache_framepack.app.rerun", "magcache_framepack.app.grid", "magcache_framepack.app.layout",
                   "magcache_framepack.app.serve")
    code = textwrap.dedent(f"""
        import importlib, json, os, sys, threading
        sys.argv = ["demo", "--not-an-option"]      # argparse would exit if anything parsed argv
        hf_home = os.environ.get("HF_HOME")
        report = {{}}
        for name in ("magcache_demo_gradio", "magcache_demo_gradio_f1"):
            report[name] = importlib.import_module(name).VARIANT
        app = {app_modules!r}
        report["heavy_after_demos"] = sorted(m for m in ("gradio", "torch", *app) if m in sys.modules)

        from magcache_framepack import job, models
        calls = []
        models.load_models = lambda *a, **k: calls.append("load_models")
        models.build_tiny_models = lambda *a, **k: calls.append("build_tiny_models")
        threads = set(threading.enumerate())
        import magcache_framepack.app
        report["app_modules"] = sorted(m for m in app if m in sys.modules)
        report["calls"] = calls
        report["new_threads"] = [t.name for t in threading.enumerate() if t not in threads]
        report["gradio_imported"] = "gradio" in sys.modules
        report["hf_hub_imported"] = "huggingface_hub" in sys.modules
        report["hf_home_unchanged"] = os.environ.get("HF_HOME") == hf_home
        report["cuda_initialised"] = sys.modules["torch"].cuda.is_initialized()
        print(json.dumps(report))
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["magcache_demo_gradio"] == "framepack"
    assert report["magcache_demo_gradio_f1"] == "f1"
    assert report["heavy_after_demos"] == []
    assert report["app_modules"] == sorted(app_modules)        # the face imported every part, which did no work
    assert report["calls"] == [] and report["new_threads"] == []
    assert not report["gradio_imported"] and not report["hf_hub_imported"]
    assert report["hf_home_unchanged"] and not report["cuda_initialised"]


def test_the_four_items_the_readme_lists_run_everything_on_their_own(tmp_path: pathlib.Path) -> None:
    """What the README tells a user to copy into a FramePack checkout is enough: in a folder holding
    only those items, both apps build, a CLI job writes its video and record, and --ray gets as far as
    importing Ray (here: an install hint, as Ray is hidden)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| copy | what it holds |"):].split("\n\n")[0]
    rows = re.findall(r"^\| (`[^|]+) \|", table, flags=re.M)
    assert len(rows) <= 4, rows
    listed = [name for row in rows for name in re.findall(r"`([\w./]+)`", row)]
    assert {"magcache_demo_gradio.py", "magcache_demo_gradio_f1.py", "magcache_core.py",
            "magcache_ratio_library.json", "magcache_framepack/"} == set(listed)
    for name in listed:
        if name.endswith("/"):
            shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, tmp_path / name)
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    code = textwrap.dedent("""
        import json, pathlib, sys
        import magcache_demo_gradio, magcache_demo_gradio_f1
        from magcache_framepack.app import build_ui
        from magcache_framepack.models import load_models
        for variant in ("framepack", "f1"):
            build_ui(load_models(variant, tiny=True), variant, outputs_dir="outputs", profiles_dir="profiles")
        from magcache_framepack.cli import main
        rc = main(["--tiny", "--image", "in.png", "--prompt", "a box", "--seconds", "1", "--steps", "4",
                   "--output", "out.mp4", "--no-progress"])
        here = pathlib.Path.cwd()
        print(json.dumps({"rc": rc, "from": sorted({str(pathlib.Path(m.__file__).resolve().is_relative_to(here))
                                                    for n, m in sys.modules.items() if n.startswith("magcache")})}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0 and (tmp_path / "out.mp4").is_file() and (tmp_path / "out.json").is_file()
    assert report["from"] == ["True"]          # every magcache module came from the copied items
    # --ray up to Ray's own import: with Ray hidden, the CLI says what to install
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"image": "in.png"}) + "\n")
    hide_ray = "import sys; sys.modules['ray'] = None; from magcache_framepack.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", hide_ray, "--jobs", "jobs.jsonl", "--tiny", "--ray"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install -r requirements-ray.txt" in proc.stderr, proc.stderr[-2000:]


def test_demo_script_without_cuda_names_tiny() -> None:
    proc = run_python("", str(ROOT / "magcache_demo_gradio.py"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert "--tiny" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


class FakeDemo:
    def __init__(self) -> None:
        self.launched: dict[str, Any] | None = None

    def launch(self, **kwargs: Any) -> None:
        self.launched = kwargs


@pytest.fixture
def fake_main(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """main() with the model loading, UI building and server replaced by recorders."""
    import torch

    from magcache_framepack import models as models_module
    from magcache_framepack.app import serve as app_module

    seen: dict[str, Any] = {"loads": []}
    demo = FakeDemo()
    seen["demo"] = demo
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models_module, "load_models",
                        lambda variant, tiny=False: seen["loads"].append((variant, tiny)) or "models")

    def fake_build_ui(models: Any, variant: str, **kwargs: Any) -> FakeDemo:
        seen["build"] = (models, variant, kwargs)
        return demo

    monkeypatch.setattr(app_module, "build_ui", fake_build_ui)
    # setenv first so that monkeypatch restores the original state (even "unset") after main() set them:
    # a GRADIO_TEMP_DIR left set would move the cache of the servers later tests start
    for name in ("HF_HOME", "GRADIO_TEMP_DIR"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    yield seen


def test_main_without_cuda_exits_naming_tiny(fake_main: dict[str, Any]) -> None:
    with pytest.raises(SystemExit) as exc:
        main("f1", [])
    assert "--tiny" in str(exc.value.code)
    assert fake_main["loads"] == [] and fake_main["demo"].launched is None


def test_main_binds_loopback_and_warns_when_exposed(fake_main: dict[str, Any], tmp_path: pathlib.Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    outputs = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="magcache_framepack.app"):
        main("framepack", ["--tiny", "--outputs", str(outputs), "--port", "7999"])
    assert fake_main["loads"] == [("framepack", True)]
    launched = fake_main["demo"].launched
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert not launched["share"]
    assert os.environ["HF_HOME"] == str(ROOT / "hf_download")
    assert not [r for r in caplog.records if "reachable" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="magcache_framepack.app"):
        main("framepack", ["--tiny", "--server", "0.0.0.0", "--outputs", str(outputs)])
    assert fake_main["demo"].launched["server_name"] == "0.0.0.0"
    assert [r for r in caplog.records if "reachable" in r.getMessage()]


def test_console_entry_points_read_the_command_line(fake_main: dict[str, Any], tmp_path: pathlib.Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """main_framepack() and main_f1() (console scripts) take no arguments: they serve their variant with argv."""
    from magcache_framepack.app import main_f1, main_framepack

    for entry, variant in ((main_framepack, "framepack"), (main_f1, "f1")):
        monkeypatch.setattr(sys, "argv", [f"magcache-{variant}", "--tiny", "--outputs", str(tmp_path / "out"),
                                          "--port", "7998"])
        entry()
        assert fake_main["loads"][-1] == (variant, True) and fake_main["build"][1] == variant
        assert fake_main["demo"].launched["server_port"] == 7998


def test_main_refuses_a_bad_mag_ratios_file(fake_main: dict[str, Any], tmp_path: pathlib.Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    other = write_profile(tmp_path, "f1.json", "f1", list(magcache_core.FRAMEPACK_F1_MAG_RATIOS))
    with pytest.raises(SystemExit) as exc:
        main("framepack", ["--tiny", "--mag-ratios", str(other)])
    assert exc.value.code != 0
    assert "calibrated for 'f1'" in capsys.readouterr().err
    assert fake_main["loads"] == []


def test_main_accepts_a_relative_mag_ratios_path(fake_main: dict[str, Any], tmp_path: pathlib.Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "magcache_profiles").mkdir()
    write_profile(tmp_path / "magcache_profiles", "mine.json", "framepack", list(magcache_core.FRAMEPACK_MAG_RATIOS))
    monkeypatch.chdir(tmp_path)
    main("framepack", ["--tiny", "--mag-ratios", "magcache_profiles/mine.json",
                                    "--outputs", str(tmp_path / "out")])
    assert fake_main["loads"] == [("framepack", True)]
    assert fake_main["build"][2]["mag_ratios"] == "magcache_profiles/mine.json"


def test_main_refuses_a_profile_of_another_model(fake_main: dict[str, Any], tmp_path: pathlib.Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    real = magcache_core.MagCacheProfile(variant="framepack", num_steps=25, model="lllyasviel/FramePackI2V_HY",
                                         ratios=list(magcache_core.FRAMEPACK_MAG_RATIOS)).save(tmp_path / "real.json")
    with pytest.raises(SystemExit) as exc:
        main("framepack", ["--tiny", "--mag-ratios", str(real)])
    assert exc.value.code != 0
    assert "calibrated on 'lllyasviel/FramePackI2V_HY', not 'tiny-random'" in capsys.readouterr().err
    assert fake_main["loads"] == []


# ---------------------------------------------------------------------------
# The real app on a real server, through gradio_client
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, variant: str, root: pathlib.Path) -> None:
        from magcache_framepack.models import load_models

        self.variant = variant
        self.outputs = root / "outputs"
        self.profiles = root / "profiles"
        self.profiles.mkdir(parents=True)
        models = load_models(variant, tiny=True)
        self.demo = build_ui(models, variant, outputs_dir=self.outputs, profiles_dir=self.profiles)
        launch(self.demo, server_port=free_port(), outputs_dir=self.outputs,
                            prevent_thread_lock=True, quiet=True)
        self.url = self.demo.local_url
        self.image = root / "input.png"
        rng = np.random.default_rng(0)
        Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(self.image)

    def client(self) -> Any:
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def generate(self, client: Any = None, **inputs: Any) -> dict[str, Any]:
        from gradio_client import handle_file

        client = client or self.client()
        result = client.predict(input_image=handle_file(str(self.image)), api_name="/generate",
                                **{"prompt": "a cat walks", **inputs})
        out = dict(zip(GENERATE_OUTPUTS, result, strict=True))
        out["video_file"] = video_file(out["video"])
        return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started: dict[str, Server] = {}

    def get(variant: str) -> Server:
        if variant not in started:
            started[variant] = Server(variant, tmp_path_factory.mktemp(variant))
        return started[variant]

    yield get
    for server in started.values():
        server.demo.close()


def test_generate_api_contract(servers: Any) -> None:
    api = servers("framepack").client().view_api(return_format="dict", print_info=False)
    params = api["named_endpoints"]["/generate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert names[:2] == ["input_image", "prompt"]
    assert {"steps", "magcache_thresh", "magcache_K", "retention_ratio", "cache", "mag_ratios", "calibrate",
            "cfg", "mp4_crf", "seed", "total_second_length"} <= set(names)
    assert all(p["parameter_has_default"] for p in params if p["parameter_name"] != "input_image")
    assert len(api["named_endpoints"]["/generate"]["returns"]) == len(GENERATE_OUTPUTS)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["framepack", "f1"])
def test_tiny_job_end_to_end(servers: Any, variant: str) -> None:
    server = servers(variant)
    out = server.generate(**FAST)
    report = out["report"]
    assert report["status"] == "done", report["message"]
    assert decoded_frames(out["video_file"]) == framepack_frame_count(FAST["total_second_length"],
                                                                      FAST["latent_window_size"])
    with av.open(out["video_file"]) as container:
        stream = container.streams.video[0]
        height, width = stream.height, stream.width
    ratios = library_plan_ratios(variant, height, width, FAST["steps"])
    plan = reference_skips(ratios, FAST["magcache_thresh"], FAST["magcache_K"], FAST["retention_ratio"])
    expected_skipped = [t for t, skipped in enumerate(plan) if skipped]
    assert expected_skipped, "the settings should skip some steps"
    # the report says which plan and table ran: the same the page shows (computed by the same rule here)
    assert report["plan"]["computed_steps"] == [t for t, s in enumerate(plan) if not s]
    assert report["plan"]["ratio_source"].startswith("FramePack-Studio, 128 px, 25 steps")
    assert report["settings"]["steps"] == FAST["steps"] and report["resample"] == "magnitude"
    assert len(report["sections"]) == 2
    for section in report["sections"]:
        assert section["skipped_steps"] == expected_skipped
        assert sorted(section["computed_steps"] + section["skipped_steps"]) == list(range(FAST["steps"]))
        assert f"Section {section['index'] + 1}/2: computed {FAST['steps'] - len(expected_skipped)}/8" \
            in out["summary"]
    assert "Total:" in out["summary"]
    assert out["preview"] is None and out["progress"] == ""
    assert pathlib.Path(report["video"]).parent == server.outputs.resolve()
    # the video's record names the input kept in the outputs folder (the upload is in Gradio's cache,
    # which is cleaned): a PNG of the uploaded pixels, its SHA-256 that of the file
    record = json.loads(pathlib.Path(report["video"]).with_suffix(".json").read_text(encoding="utf-8"))
    kept = pathlib.Path(record["image"]["path"])
    assert kept.parent == server.outputs.resolve() and record["image"]["name"] == kept.name
    assert record["image"]["sha256"] == hashlib.sha256(kept.read_bytes()).hexdigest()
    assert np.array_equal(np.asarray(Image.open(kept)), np.asarray(Image.open(server.image).convert("RGB")))
    assert record["magcache"]["computed_steps"] == report["plan"]["computed_steps"]


@pytest.mark.slow
def test_calibration_profile_is_saved_and_used(servers: Any) -> None:
    server = servers("framepack")
    settings = ONE_SECTION
    calib = server.generate(calibrate=True, **settings)["report"]
    assert calib["status"] == "done", calib["message"]
    assert all(not s["skipped_steps"] for s in calib["sections"])
    profile_path = pathlib.Path(calib["profile"])
    assert profile_path.parent == server.profiles.resolve()
    profile = magcache_core.MagCacheProfile.load(profile_path)
    assert profile.variant == "framepack" and profile.num_steps == FAST["steps"]
    catalog = ProfileCatalog("framepack", server.profiles)
    assert profile_path.name in [value for _, value in catalog.choices()]

    used = server.generate(mag_ratios=profile_path.name, **settings)["report"]
    assert used["status"] == "done", used["message"]
    assert used["mag_ratios"] == profile_path.name
    plan = magcache_core.skip_schedule(profile.ratios, FAST["steps"], FAST["magcache_thresh"],
                                       FAST["magcache_K"], FAST["retention_ratio"])
    assert used["sections"][0]["skipped_steps"] == [t for t, s in enumerate(plan) if s]


@pytest.mark.slow
def test_bad_inputs_end_the_job_with_a_message(servers: Any, capfd: pytest.CaptureFixture) -> None:
    from gradio_client import handle_file

    server = servers("framepack")
    write_profile(server.profiles, "for_f1.json", "f1", list(magcache_core.FRAMEPACK_F1_MAG_RATIOS))
    refused = server.generate(mag_ratios="for_f1.json", **ONE_SECTION)
    assert refused["report"]["status"] == "error"
    assert "calibrated for 'f1'" in refused["report"]["message"]
    assert "calibrated for 'f1'" in refused["summary"] and refused["video_file"] is None

    client = server.client()
    no_image = dict(zip(GENERATE_OUTPUTS,
                        client.predict(input_image=None, prompt="x", api_name="/generate"), strict=True))
    assert no_image["report"]["status"] == "error" and "No input image" in no_image["report"]["message"]

    tiny = server.image.with_name("too_small.png")
    Image.fromarray(np.zeros((8, 300, 3), np.uint8)).save(tiny)
    odd = dict(zip(GENERATE_OUTPUTS,
                   client.predict(input_image=handle_file(str(tiny)), prompt="x", api_name="/generate"),
                   strict=True))
    assert odd["report"]["status"] == "error" and "16x16" in odd["report"]["message"]

    # a text file named .png: the message says so and which files work, and nothing crashed
    fake = server.image.with_name("holiday.png")
    fake.write_text("this is not a picture", encoding="utf-8")
    not_image = dict(zip(GENERATE_OUTPUTS,
                         client.predict(input_image=handle_file(str(fake)), prompt="x", api_name="/generate"),
                         strict=True))
    assert not_image["report"]["status"] == "error"
    assert "holiday.png is not a readable image: use a PNG, JPEG" in not_image["report"]["message"]
    assert "Traceback" not in capfd.readouterr().err          # the server logged no traceback for any of it

    # the app still works after all that
    after = server.generate(client=client, **ONE_SECTION)
    assert after["report"]["status"] == "done"
    assert math.isfinite(after["report"]["seconds"])


def test_a_profile_made_for_this_job_is_offered_first(tmp_path: pathlib.Path) -> None:
    def profile(name: str, resolution: int, steps: int, model: str | None = "tiny-random") -> None:
        magcache_core.MagCacheProfile(variant="framepack", num_steps=steps, resolution=resolution,
                                      ratios=[1.0] * steps, model=model).save(tmp_path / name)

    profile("a_other_steps.json", 128, 30)
    profile("b_other_size.json", 640, 25)
    profile("c_this_job.json", 120, 25)            # 120 px frames pick the 128-px table, as this app's do
    profile("d_real_model.json", 128, 25, model="lllyasviel/FramePackI2V_HY")
    catalog = ProfileCatalog("framepack", tmp_path, model="tiny-random", resolution=128)
    assert [value for _, value in catalog.choices(25)] == \
        ["c_this_job.json", "library", "a_other_steps.json", "b_other_size.json"]
    assert [value for _, value in catalog.choices(30)] == \
        ["a_other_steps.json", "library", "b_other_size.json", "c_this_job.json"]
    assert "1 measured on lllyasviel/FramePackI2V_HY" in catalog.left_out()


def test_a_profile_of_the_same_checkpoint_under_another_name_is_offered(tmp_path: pathlib.Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog accepts what the engine accepts: a profile calibrated on the same checkpoint is offered
    whatever name its model was loaded under (a Hub-cache snapshot path, the Hub id diffusers' class records,
    an alias of it); one of another checkpoint is left out and counted."""
    repo = "lllyasviel/FramePackI2V_HY"
    snapshot = "/hf/hub/models--lllyasviel--FramePackI2V_HY/snapshots/0123abc"

    def profile(name: str, model: str) -> None:
        magcache_core.MagCacheProfile(variant="framepack", num_steps=25, ratios=[1.0] * 25,
                                      model=model).save(tmp_path / name)

    profile("a_hub_cache.json", snapshot)                 # FramePack's packed model, from a local snapshot
    profile("b_hub_id.json", repo)                        # diffusers' model, from the Hub id
    profile("c_alias.json", "someone/framepack-diffusers")
    profile("d_f1.json", "lllyasviel/FramePack_F1_I2V_HY_20250503")
    monkeypatch.setitem(magcache_core.CHECKPOINT_ALIASES, "someone/framepack-diffusers", repo)
    for model in (repo, snapshot):
        catalog = ProfileCatalog("framepack", tmp_path, model=model)
        assert [value for _, value in catalog.choices()] == \
            ["library", "a_hub_cache.json", "b_hub_id.json", "c_alias.json"]
        assert catalog.left_out().endswith("1 measured on lllyasviel/FramePack_F1_I2V_HY_20250503.")
        for name in ("a_hub_cache.json", "b_hub_id.json", "c_alias.json"):
            assert profile_selection(catalog, name)[3] is None            # selected, not refused
            panel = plan_panel_html(catalog, "magcache", 25, 0.1, 3, 0.2, name, False)
            assert f"Ratio table: your profile {name} (chosen by you)" in panel


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_end_through_the_api_stops_only_this_clients_job(servers: Any) -> None:
    """/end from the Client that started a job stops it mid-way; another client's queued job runs; a stray
    /end (no job) returns False and leaves the client's next job alone."""
    from magcache_framepack.settings import JobSettings, section_count
    from gradio_client import handle_file

    server = servers("framepack")
    long_client, other_client = server.client(), server.client()
    long_job = long_client.submit(input_image=handle_file(str(server.image)), prompt="a long one",
                                  total_second_length=20, steps=8, api_name="/generate")
    # running: the generator has yielded beyond its "Starting ..." update
    wait_for(lambda: len(long_job.outputs()) >= 2, 120, "the long job's first progress update")
    other_job = other_client.submit(input_image=handle_file(str(server.image)), prompt="a short one",
                                    api_name="/generate", **ONE_SECTION)
    assert other_client.predict(api_name="/end") is False      # its job waits in the queue: not running, not touched
    assert long_client.predict(api_name="/end") is True
    stopped = dict(zip(GENERATE_OUTPUTS, long_job.result(timeout=120), strict=True))
    assert stopped["report"]["status"] == "stopped", stopped["report"]["message"]
    sections = section_count(20, JobSettings(prompt="").latent_window_size)
    assert len(stopped["report"]["sections"]) < sections       # it stopped mid-way
    finished = dict(zip(GENERATE_OUTPUTS, other_job.result(timeout=120), strict=True))
    assert finished["report"]["status"] == "done", finished["report"]["message"]
    assert pathlib.Path(finished["report"]["video"]).is_file()
    # nothing was left armed by the stray /end: this client's next job runs to the end
    again = server.generate(other_client, **ONE_SECTION)["report"]
    assert again["status"] == "done", again["message"]


def test_models_download_beside_the_demos_or_into_the_current_folder(tmp_path: pathlib.Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from magcache_framepack.app import serve

    assert serve.default_hf_home() == ROOT / "hf_download"          # this checkout: beside the demo scripts
    monkeypatch.setattr(serve, "APP_DIR", tmp_path / "site-packages")   # installed with pip: no demos beside it
    monkeypatch.chdir(tmp_path)
    assert serve.default_hf_home() == tmp_path / "hf_download"


def test_main_refuses_folders_it_cannot_write_before_loading(fake_main: dict[str, Any], tmp_path: pathlib.Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "outputs"
    a_file.write_text("a file where the outputs folder would go")
    for flag in ("--outputs", "--profiles"):
        with pytest.raises(SystemExit) as exc:
            main("framepack", ["--tiny", flag, str(a_file / "inner")])
        assert exc.value.code == 2
        assert f"{flag} {a_file / 'inner'}: cannot write there: {a_file} is a file" in capsys.readouterr().err
    assert fake_main["loads"] == [] and fake_main["demo"].launched is None
