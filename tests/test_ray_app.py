"""The app on Ray workers runs a job again when its worker dies, up to --max-retries, and says so (issue 15, item 12).

The local Ray, the crash hook and the images are tests/test_ray.py's (see its docstring).
"""

from __future__ import annotations

import os
import pathlib
import signal
import threading
from typing import Any

import numpy as np
import pytest

import test_ray
from magcache_framepack.app import Job
from magcache_framepack.runners.ray import AppRunner
from magcache_framepack.settings import JobSettings
from test_ray import CRASH_PROMPT

local_ray = test_ray.local_ray          # the fixture: one local Ray per module, as test_ray.py starts it

pytestmark = pytest.mark.slow


def run(runner: AppRunner, settings: JobSettings, tmp_path: pathlib.Path, kill_pid: int | None = None) \
        -> tuple[Any, list[tuple[str, Any]]]:
    """One job through the app's runner seam: (its JobResult, its events); ``kill_pid`` dies at its first step."""
    job = Job()
    image = (np.random.default_rng(5).random((64, 80, 3)) * 255).astype(np.uint8)
    thread = threading.Thread(target=runner, args=(job, image, settings, str(tmp_path / "o"), str(tmp_path / "p")))
    thread.start()
    events = []
    while True:
        kind, payload = job.events.get(timeout=180)
        events.append((kind, payload))
        if kind == "progress" and payload.step >= 1 and kill_pid is not None:
            os.kill(kill_pid, signal.SIGKILL)       # mid-job, as a crashed or killed worker
            kill_pid = None
        if kind == "done":
            thread.join(timeout=60)
            return payload, events


def test_the_app_runs_a_job_again_when_its_worker_dies(tmp_path: pathlib.Path, local_ray: Any) -> None:
    runner = AppRunner("framepack", tiny=True, workers=1, max_retries=1)
    try:
        pid = runner.idle.queue[0].pid
        result, events = run(runner, JobSettings(prompt="killed once", seconds=1, steps=4), tmp_path, kill_pid=pid)
        assert result.status == "done", result.message
        assert "It ran again after its Ray worker was lost 1 time(s)" in result.message
        retries = [payload for kind, payload in events if kind == "retry"]
        assert len(retries) == 1 and "running it again on a fresh worker (retry 1 of 1)" in retries[0]
        assert pathlib.Path(result.video_path).is_file()
        assert runner.idle.queue[0].pid != pid              # a fresh worker took the dead one's place

        # a job that kills every worker it runs on: tried 1 + --max-retries times, then the reason
        result, events = run(runner, JobSettings(prompt=CRASH_PROMPT, seconds=1, steps=4), tmp_path)
        assert result.status == "error"
        assert "Failed 2 time(s), its Ray worker lost each time (--max-retries 1)" in result.message
        assert [kind for kind, _ in events].count("retry") == 1
    finally:
        runner.close()
