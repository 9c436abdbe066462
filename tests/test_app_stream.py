"""A running job's page: the live preview and progress reach it a few times a second, not once per step.

Each page update costs the server Gradio's work beside the sampler (a
component rebuilt for every ``gr.update``, the preview encoded to a file, the
report sent); once per step it made a tiny job's steps ~30 ms dearer in the app
than in the CLI (README, "What a step costs in the app").  These tests drive the
/generate function as Gradio does, with a fake runner posting a job's events
through the runner seam, and count what the page is given.
"""

from __future__ import annotations

import pathlib
import threading
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from magcache_framepack.app import SessionJobs
from magcache_framepack.app.jobs import page_update_wait
from magcache_framepack.app.handlers import AppEvents, generate_endpoint

STEPS = 25
#: The page's update rate the app promises: at most 4 a second, plus urgent ones (a new section's video).
PER_SECOND = 4


def test_page_update_wait_rule() -> None:
    """The first and urgent updates go at once; others wait until 0.25 s after the last one shown."""
    assert page_update_wait(10.0, None, urgent=False) == 0.0
    assert page_update_wait(10.0, 10.0, urgent=True) == 0.0
    assert page_update_wait(10.1, 10.0, urgent=False) == pytest.approx(0.15)
    assert page_update_wait(10.25, 10.0, urgent=False) == 0.0
    assert page_update_wait(12.0, 10.0, urgent=False) == 0.0
    assert page_update_wait(10.5, 10.0, urgent=False, interval=1.0) == pytest.approx(0.5)
    # a step every 0.1 s for 2.4 s, shown whenever the rule allows: at 0, 0.3, 0.6 ... 2.4 (every third step)
    shown: list[float] = []
    for k in range(STEPS):
        now = k / 10
        if page_update_wait(now, shown[-1] if shown else None, urgent=False) == 0.0:
            shown.append(now)
    assert shown == [k / 10 for k in range(0, STEPS, 3)]


def paced_runner(pace: float, decode: threading.Event | None, started: list[float]):
    """A runner that posts a 1-section job's events as run_job would: a preview per step, ``pace`` s apart.

    Step k's preview is filled with k, so the test can tell which step a shown preview is.  After the
    last step, while the section decodes, it waits for ``decode`` to be set (at most 30 s), then posts
    the section's video and the end.  ``started`` gets the time it began (the app's imports come before).
    """
    from magcache_framepack.job import JobResult, ProgressUpdate, SectionReport

    def runner(job: Any, image: Any, settings: Any, outputs: str, profiles: str) -> None:
        started.append(time.perf_counter())
        job.events.put(("progress", ProgressUpdate(None, 0, "Start sampling ...", 0, 0, STEPS)))
        for step in range(1, STEPS + 1):
            time.sleep(pace)
            preview = np.full((8, 16, 3), step, np.uint8)
            job.events.put(("progress", ProgressUpdate(preview, 100 * step // STEPS, f"step {step}/{STEPS}",
                                                       0, step, STEPS)))
        if decode is not None:
            decode.wait(timeout=30)
        section = SectionReport(0, 1, list(range(STEPS)), [], 1.0, "fake.mp4", 37, sampling_seconds=0.5)
        job.events.put(("section", section))
        job.events.put(("done", JobResult("done", "Done.", "fake.mp4", [section], 1.0)))

    return runner


def shown_preview(output: Any) -> np.ndarray | None:
    """The preview image an output tuple gives the page: a plain value or an update's value (else None)."""
    preview = output[3]
    if isinstance(preview, dict):
        preview = preview.get("value")
    return preview if isinstance(preview, np.ndarray) else None


@pytest.mark.parametrize("decodes", [False, True])
def test_a_running_job_updates_its_page_a_few_times_a_second(tmp_path: pathlib.Path, decodes: bool) -> None:
    """25 steps in about 0.25 s reach the page as a handful of updates; while the section then decodes, the
    page gets the last step's preview and progress (coalesced updates are shown late, never lost)."""
    decode = threading.Event() if decodes else None
    started: list[float] = []
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(image)
    events = AppEvents.create(None, "framepack", outputs_dir=tmp_path / "out", profiles_dir=tmp_path / "prof",
                              mag_ratios=None, tiny=True, runner=paced_runner(0.01, decode, started))
    generate = generate_endpoint(events)
    outputs = []
    for output in generate(str(image), "a cat", total_second_length=1.0, latent_window_size=9, steps=STEPS,
                           cache="off", session=SessionJobs()):
        outputs.append(output)
        preview = shown_preview(output)
        if decode is not None and preview is not None and preview[0, 0, 0] == STEPS:
            decode.set()          # the last step reached the page: the "decode" ends
    elapsed = time.perf_counter() - started[0]        # the job's time, from its first event to its end
    running, final = outputs[:-1], outputs[-1]
    assert final[1]["status"] == "done" and final[3] is None

    previews = [p for p in map(shown_preview, running) if p is not None]
    # at most one update per quarter second of the job, plus the urgent one the new video makes
    assert 1 <= len(previews) <= 1 + int(elapsed * PER_SECOND) + 1, (len(previews), elapsed)
    assert len(running) <= 1 + 1 + int(elapsed * PER_SECOND) + 1      # "Starting ..." and the same bound
    if decodes:     # what the page shows last while the job runs is its newest step, preview and bar alike
        assert decode.is_set() and int(previews[-1][0, 0, 0]) == STEPS
        assert f"step {STEPS}/{STEPS}" in [o[4] for o in running if isinstance(o[4], str)][-1]
