"""Jobs and sessions: each job has its own worker thread, stop flag and event queue; each session its jobs.

A :class:`Job` runs through the runner seam
(``runner(job, image, settings, outputs_dir, profiles_dir)``), in this process
(:func:`local_runner`) or on Ray workers; each browser session owns its
:class:`SessionJobs` (in a ``gr.State``).  :class:`JobStream` turns a job's
events into what its page shows, no more often than :func:`page_update_wait`
allows.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any


from magcache_framepack.app.views import (
    progress_html, format_duration, eta_seconds)
from magcache_framepack.settings import JobSettings

logger = logging.getLogger(__name__)

#: ``runner(job, image, settings, outputs_dir, profiles_dir)``: runs one job in its thread (see :func:`run_job_thread`).
Runner = Callable[["Job", Any, JobSettings, str, str], None]


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """What a job was started with: enough to run it again (Compare, Render without cache)."""

    settings: JobSettings
    image: Any                  # the decoded image (HxWx3 uint8) the job read
    profile_choice: str | None  # the calibration table chosen in the dropdown


class Job:
    """One generation: its worker thread, stop flag and event queue belong to it alone.

    ``request`` is all the job was started with (Compare and Render without cache run it again).
    """

    def __init__(self) -> None:
        self.request: JobRequest | None = None
        self.stop = threading.Event()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread: threading.Thread | None = None


class SessionJobs:
    """What one browser session knows about its own job (kept in a gr.State).

    Gradio deep-copies a State's initial value for every new session; this copy
    is a fresh, empty instance, so sessions share nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: Job | None = None
        self.stop_before_start = False
        self.unshown_result: Any | None = None
        self.last_done: tuple[JobRequest, Any] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> "SessionJobs":
        return SessionJobs()

    def arm(self) -> None:
        """Start was clicked: forget any stale End."""
        with self._lock:
            self.stop_before_start = False

    def begin(self) -> Job | None:
        """A new job for this session, or None when End came while it waited in the queue."""
        with self._lock:
            if self.stop_before_start:
                self.stop_before_start = False
                return None
            self.current = Job()
            return self.current

    def request_stop(self) -> bool:
        """End: stop this session's running job; True if there was one."""
        with self._lock:
            if self.current is not None:
                self.current.stop.set()
                return True
            self.stop_before_start = True
            return False

    def stop_running(self) -> bool:
        """The API's End: stop this session's running job, if any; True if there was one.

        Unlike :meth:`request_stop` it leaves nothing armed for a later job: an API
        client has no Start click that would clear it, so a stray call would
        otherwise stop its next job. A job still waiting in Gradio's queue is the
        client's to cancel (``Job.cancel()`` in gradio_client).
        """
        with self._lock:
            if self.current is None:
                return False
            self.current.stop.set()
            return True

    def finish(self, job: Job, result: Any | None) -> None:
        """The job ended: it is no longer this session's current one; keep its result for the page.

        A job that finished (status "done") is also kept with its request as :attr:`last_done`:
        the one Compare and Render without cache run again.
        """
        with self._lock:
            if self.current is job:
                self.current = None
            self.unshown_result = result
            if result is not None and result.status == "done" and job.request is not None:
                self.last_done = (job.request, result)

    def take_result(self) -> Any | None:
        """The last job's result, once (the page shows it after the job's events end)."""
        with self._lock:
            result, self.unshown_result = self.unshown_result, None
            return result


def run_job_thread(job: Job, gpu_lock: threading.Lock, models: Any, image: Any, settings: Any,
                   outputs_dir: str, profiles_dir: str) -> None:
    """Worker thread body: wait for the GPU, run the job, always post a final ("done", JobResult)."""
    from magcache_framepack.job import JobResult, run_job

    started = time.perf_counter()
    result = None
    try:
        if not gpu_lock.acquire(blocking=False):
            job.events.put(("waiting", None))
            while not gpu_lock.acquire(timeout=0.25):
                if job.stop.is_set():
                    result = JobResult(
                        status="stopped", message="Stopped before it started (End was pressed).",
                        video_path=None, sections=[], seconds=time.perf_counter() - started,
                        profile_path=None, calibration=None)
                    return
        try:
            result = run_job(
                models, image, settings, outputs_dir=outputs_dir,
                on_progress=lambda update: job.events.put(("progress", update)),
                on_section=lambda section: job.events.put(("section", section)),
                should_stop=job.stop.is_set, profiles_dir=profiles_dir)
        finally:
            gpu_lock.release()
    except Exception as exc:  # noqa: BLE001 - a worker must report every failure, or the page waits forever
        logger.exception("job failed unexpectedly")
        result = JobResult(
            status="error", message=f"Unexpected error: {type(exc).__name__}: {exc}", video_path=None,
            sections=[], seconds=time.perf_counter() - started, profile_path=None, calibration=None)
    finally:
        job.events.put(("done", result))


class StepClock:
    """Measures seconds per computed step and per-section overhead from a job's progress events."""

    def __init__(self, skipped: Sequence[bool], sections_total: int, started: float) -> None:
        self.skipped = list(skipped)
        self.sections_total = sections_total
        self.started = started
        self.last: float | None = None
        self.computed_seconds = 0.0
        self.computed_steps = 0
        self.overheads: list[float] = []

    def step(self, update: Any) -> None:
        """A sampling step finished (``update.step`` >= 1): time it if it ran the transformer."""
        if self.last is not None and update.step >= 2 and not self.skipped[update.step - 1]:
            self.computed_seconds += update.time - self.last
            self.computed_steps += 1
        self.last = update.time

    def section(self, report: Any) -> None:
        """A section finished: what it took beyond sampling (decode, MP4) is per-section overhead."""
        self.overheads.append(max(0.0, report.seconds - report.sampling_seconds))
        self.last = None

    def label(self, update: Any, now: float) -> str:
        """``"elapsed 0:42, about 1:10 left"`` (no ETA until a computed step has been timed)."""
        text = f"elapsed {format_duration(now - self.started)}"
        if self.computed_steps:
            overhead = sum(self.overheads) / len(self.overheads) if self.overheads else 0.0
            eta = eta_seconds(self.skipped, self.sections_total, update.section, update.step,
                              self.computed_seconds / self.computed_steps, overhead)
            text += f", about {format_duration(eta)} left"
        return text


def local_runner(models: Any) -> Runner:
    """The runner seam's default: jobs on ``models`` in this process, one at a time.

    The lock is created per app: it guards ``run_job`` in case a job's worker
    outlives its generator (the page went away), so two jobs never share the GPU.
    """
    gpu_lock = threading.Lock()

    def runner(job: Job, image: Any, settings: JobSettings, outputs: str, profiles: str) -> None:
        run_job_thread(job, gpu_lock, models, image, settings, outputs, profiles)

    return runner


def take_events(events: queue.Queue[tuple[str, Any]], timeout: float = 1.0) -> list[tuple[str, Any]]:
    """The events a job posted: wait up to ``timeout`` for one, then take whatever else is already waiting.

    Taking the backlog at once lets the page show only the newest preview instead of replaying old ones.
    """
    try:
        batch = [events.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            batch.append(events.get_nowait())
        except queue.Empty:
            return batch


#: The least time between two updates of a running job's page (preview, progress bar, report): 4 a second.
PAGE_UPDATE_SECONDS = 0.25


def page_update_wait(now: float, last_shown: float | None, urgent: bool,
                     interval: float = PAGE_UPDATE_SECONDS) -> float:
    """Seconds until a running job's page may get its newest state (0.0: now).

    Why: each update the job's generator yields is work for the server beside
    the sampler, on the same cores: Gradio rebuilds the components given a
    ``gr.update``, encodes the preview to an image file, serializes the report
    and streams it all (about 10 to 15 ms of CPU per update on a 2-core VM, and
    the sampler's threads wait for the cores and the GIL meanwhile).  One update
    per step made a tiny job's steps about 30 ms dearer in the app than in the
    CLI.  A person takes in a few updates a second, so the page gets the newest
    state at most once per ``interval`` seconds: its first update and urgent
    ones (a new section's video, waiting for the GPU) at once, the rest
    coalesced, none lost (the newest waits until it is due).
    """
    if urgent or last_shown is None:
        return 0.0
    return max(0.0, last_shown + interval - now)


class JobStream:
    """What the page knows of one running job: its sections, summary lines, newest video and final result.

    Events are applied as they come; what the page has not been shown yet (the
    newest preview and progress bar, and whether something urgent came) waits in
    ``preview``, ``bar`` and ``urgent`` until :meth:`shown`.
    """

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.sections: list[Any] = []
        self.lines: list[str] = []
        self.video: str | None = None
        self.result: Any | None = None
        self.preview: Any | None = None      # the newest preview not yet shown
        self.bar: str | None = None          # the newest progress bar not yet shown
        self.urgent = False                  # a new video or a wait for the GPU: show it now
        self.unshown = False                 # something came since the page was last updated

    def take(self, events: list[tuple[str, Any]]) -> None:
        """Apply a batch of events; the newest preview and progress bar wait for the page."""
        latest = None
        for kind, payload in events:
            if kind == "waiting":
                self.bar = progress_html(0, "Waiting for the GPU: another job is running ...")
                self.urgent = True
            elif kind == "progress":
                latest = payload
                if payload.step >= 1:
                    self.clock.step(payload)
            elif kind == "section":
                self.clock.section(payload)
                self.sections.append(payload)
                self.video = payload.video_path or self.video
                self.lines.append(payload.summary())
                self.urgent = True
            elif kind == "done":
                self.result = payload
            elif kind == "retry":       # the job runs again from its start (a lost Ray worker): say so
                self.sections.clear()
                self.lines = [payload]
                self.video = None
                self.clock.last = None
                self.bar = progress_html(0, payload)
                self.urgent = True
        if latest is not None:
            label = latest.desc
            if latest.step >= 1:
                label += f" ({self.clock.label(latest, time.perf_counter())})"
            self.bar = progress_html(latest.percent, label)
            if latest.preview is not None:
                self.preview = latest.preview
        self.unshown = self.unshown or bool(events)

    def shown(self) -> None:
        """The page was just given the newest state: nothing waits for it now."""
        self.preview = self.bar = None
        self.urgent = self.unshown = False
