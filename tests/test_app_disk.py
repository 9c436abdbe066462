"""Bounded disk: Gradio's cache is cleaned as the app runs, the input is kept once per image and only
with a video, and the prompt has a length limit everywhere a job can come from (#15 item 11).

The soak test drives the tiny app over loopback with gradio_client, as a client would, with the
cache cleaned every second of files over a few seconds old (the app's default is hourly, of files
over 6 hours old: the same code, on a clock a test can wait for).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from magcache_framepack.settings import LIMITS, JobSettings

ROOT = pathlib.Path(__file__).resolve().parent.parent
LONGEST = 4000          # the README's documented prompt limit, restated


def files(folder: pathlib.Path) -> dict[str, int]:
    """Every file under ``folder``: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------
# The prompt's length limit
# ---------------------------------------------------------------------------

def test_prompt_limit_is_one_documented_rule() -> None:
    assert LIMITS["prompt"].high == LIMITS["n_prompt"].high == LONGEST
    assert f"at most {LONGEST:,} characters" in (ROOT / "README.md").read_text(encoding="utf-8")
    JobSettings(prompt="a" * LONGEST, n_prompt="b" * LONGEST).validate()
    for field in ("prompt", "n_prompt"):
        with pytest.raises(ValueError) as exc:
            JobSettings(**{"prompt": "ok", field: "a" * (LONGEST + 1)}).validate()
        message = str(exc.value)
        # one line that says what is accepted and how long the text was, without repeating the text
        assert message == (f"{field}: must be a text of at most {LONGEST} characters (FramePack reads the "
                           f"first 256 tokens, about 1,000 characters), got {LONGEST + 1} characters")


def test_cli_and_job_files_refuse_a_long_prompt(image: pathlib.Path, tmp_path: pathlib.Path,
                                                capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from magcache_framepack import models as models_module
    from magcache_framepack.cli import main

    def no_models(*a: object, **k: object) -> None:
        raise AssertionError("models were loaded for a refused prompt")

    monkeypatch.setattr(models_module, "load_models", no_models)
    monkeypatch.chdir(tmp_path)
    long_prompt = "word " * 1000          # 5,000 characters
    with pytest.raises(SystemExit) as exc:
        main(["--image", str(image), "--tiny", "--prompt", long_prompt])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--prompt must be a text of at most {LONGEST} characters" in err and "got 5000 characters" in err
    assert "word word" not in err
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(image), "n_prompt": "x" * (LONGEST + 1)}) + "\n")
    assert main(["--jobs", str(jobs), "--tiny"]) == 1
    out = capsys.readouterr().out
    assert f"line 1: invalid: --n-prompt must be a text of at most {LONGEST} characters" in out
    assert not (tmp_path / "outputs").exists()


def test_the_prompt_boxes_stop_at_the_limit(tmp_path: pathlib.Path) -> None:
    import gradio as gr

    from magcache_framepack.app import build_ui

    demo = build_ui(None, "framepack", outputs_dir=tmp_path / "out", profiles_dir=tmp_path / "prof")
    boxes = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Textbox)}
    assert boxes["Prompt"].max_length == boxes["Negative Prompt"].max_length == LONGEST


# ---------------------------------------------------------------------------
# The input kept once per image, and only with a video
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_framepack() -> Any:
    from magcache_framepack.models import load_models

    return load_models("framepack", tiny=True)


def small_job(**changes: Any) -> JobSettings:
    return JobSettings(**{"prompt": "a box", "seconds": 1, "latent_window_size": 6, "steps": 2, "cache": "off",
                          "resolution": 64, **changes})


def test_the_input_is_kept_once_per_image(tiny_framepack: Any, tmp_path: pathlib.Path) -> None:
    from magcache_framepack.job import run_job

    rng = np.random.default_rng(3)
    first, second = (rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2))
    results = [run_job(tiny_framepack, image, small_job(seed=seed), outputs_dir=tmp_path)
               for image, seed in ((first, 1), (first, 2), (second, 1))]
    assert [r.status for r in results] == ["done"] * 3, [r.message for r in results]
    kept = sorted(tmp_path.glob("*.png"))
    assert len(kept) == 2                                 # two distinct images: two files, for three jobs
    for result, image in zip(results, (first, first, second)):
        named = pathlib.Path(result.record["image"]["path"])
        assert named.parent == tmp_path.resolve() and named in [k.resolve() for k in kept]
        assert np.array_equal(np.asarray(Image.open(named)), image)          # the exact input, lossless
    assert results[0].record["image"] == results[1].record["image"]


def test_a_job_stopped_before_its_first_video_leaves_nothing(tiny_framepack: Any, tmp_path: pathlib.Path) -> None:
    from magcache_framepack.job import run_job

    image = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    steps_seen: list[int] = []
    result = run_job(tiny_framepack, image, small_job(), outputs_dir=tmp_path,
                     on_progress=lambda update: steps_seen.append(update.step),
                     should_stop=lambda: max(steps_seen, default=0) >= 1)        # after the first step
    assert result.status == "stopped" and result.video_path is None, result.message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# The app over a soak
# ---------------------------------------------------------------------------

SOAK_JOBS = 40
EVERY, AGE = 1, 5          # clean every second the files over 5 s old (the app: hourly, over 6 hours)
SMALLEST = dict(total_second_length=1.0, latent_window_size=6, steps=1, cache="off")     # 1 section, 1 step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_soak_keeps_the_cache_and_outputs_bounded(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                 capfd: pytest.CaptureFixture) -> None:
    """40 jobs in a row: the outputs folder grows by exactly each job's video and record, and Gradio's
    cache holds only the last few seconds' files (without cleaning it gains each job's previews and
    video copies for good)."""
    from gradio_client import Client, handle_file

    from magcache_framepack.app import build_ui, launch
    from magcache_framepack.models import load_models

    cache, outputs = tmp_path / "gradio", tmp_path / "outputs"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))       # this app's own cache, as main() gives it one
    demo = build_ui(load_models("framepack", tiny=True), "framepack", outputs_dir=outputs,
                    profiles_dir=tmp_path / "profiles", delete_cache=(EVERY, AGE))
    launch(demo, server_port=free_port(), outputs_dir=outputs, prevent_thread_lock=True, quiet=True,
           sweep_cache=(EVERY, AGE))
    try:
        image = tmp_path / "in.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
        client = Client(demo.local_url, verbose=False)

        def job(**inputs: Any) -> dict[str, Any]:
            return client.predict(input_image=handle_file(str(image)), api_name="/generate",
                                  **{**SMALLEST, **inputs})[1]

        # a prompt over the limit is refused with the reason, and writes nothing
        refused = job(prompt="x" * (LONGEST + 1))
        assert refused["status"] == "error" and f"at most {LONGEST} characters" in refused["message"]
        assert not outputs.exists() or files(outputs) == {}

        warm = job(prompt="warm-up")
        assert warm["status"] == "done", warm["message"]
        per_job_cache = sum(files(cache).values())          # what one job leaves in the cache, uncleaned
        assert per_job_cache > 0
        time.sleep(AGE + 2 * EVERY)
        cache_before, outputs_before = files(cache), files(outputs)

        started, cache_peak, own = time.perf_counter(), 0, {}
        for i in range(SOAK_JOBS):
            report = job(prompt=f"soak job {i}")
            assert report["status"] == "done", report["message"]
            video = pathlib.Path(report["video"])
            assert video.parent == outputs.resolve()
            for path in (video, video.with_suffix(".json")):
                own[path.name] = path.stat().st_size
            cache_peak = max(cache_peak, sum(files(cache).values()))
        soak_seconds = time.perf_counter() - started
        time.sleep(AGE + 2 * EVERY)

        grown = {name: size for name, size in files(outputs).items() if name not in outputs_before}
        assert grown == own                     # each job's own video and record, nothing else
        assert len([n for n in files(outputs) if n.endswith(".png")]) == 1           # one kept input
        # the cache never held more than a few jobs' files, and is back to what it was
        assert cache_peak <= sum(cache_before.values()) + 10 * per_job_cache, (cache_peak, per_job_cache)
        assert sum(files(cache).values()) <= sum(cache_before.values()) + max(own.values())
        with capfd.disabled():      # the numbers, for pytest -s
            print(f"\nsoak: {SOAK_JOBS} jobs in {soak_seconds:.1f} s; cache peak {cache_peak} bytes over "
                  f"{sum(cache_before.values())} before, one job's cache files {per_job_cache} bytes")
    finally:
        demo.close()
    assert "Traceback" not in capfd.readouterr().err


def test_sweep_folder_deletes_only_old_files(tmp_path: pathlib.Path) -> None:
    from magcache_framepack.app.serve import sweep_folder

    old, new = tmp_path / "a" / "old.mp4", tmp_path / "b" / "new.webp"
    for path in (old, new):
        if path is new:
            time.sleep(1.5)
        path.parent.mkdir()
        path.write_bytes(b"x" * 10)
        os.utime(path, (1, 1))         # an old modification time (a copy keeps its original's): not its age
    assert sweep_folder(tmp_path, older_than=1.0) == 10
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["b", os.path.join("b", "new.webp")]


def test_the_app_gets_a_cache_folder_of_its_own(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """main() sweeps by age only a Gradio cache folder it made for itself, never one the user named."""
    from magcache_framepack.app.serve import own_gradio_cache

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    assert own_gradio_cache() is None and os.environ["GRADIO_TEMP_DIR"] == str(tmp_path)
    monkeypatch.delenv("GRADIO_TEMP_DIR")
    folder = own_gradio_cache()
    assert folder is not None and os.environ["GRADIO_TEMP_DIR"] == folder
    assert pathlib.Path(folder).is_dir() and not any(pathlib.Path(folder).iterdir())
    os.rmdir(folder)
