"""What the app does when something happens: profiles, plans, jobs and sessions, and every event handler.

Three things live here.  The calibration tables one app offers
(:class:`ProfileCatalog`) and the plan panel computed from them.  The job
machinery: each job is a :class:`Job` with its own worker thread, stop flag and
event queue, each browser session owns its :class:`SessionJobs`, and the
runner seam (``runner(job, image, settings, outputs_dir, profiles_dir)``) runs a
job in its thread, in this process (:func:`local_runner`) or on Ray workers.
And :class:`AppEvents`, the handlers the page's components are wired to
(:mod:`magcache_framepack.app.layout` does the wiring).

gradio and the job module are imported inside the functions that need them
(see :mod:`magcache_framepack.app`): importing this module does no work.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import pathlib
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import magcache_core

from magcache_framepack.app.views import (
    CUSTOM_PRESET, LIBRARY, PUBLISHED, job_report, message_html, plan_message, plan_panel, preset_for,
    preset_values, profile_status_html, progress_html, ratios_in_use_chart, calibration_chart, SkipPlan,
    summary_markdown, format_duration, eta_seconds, tradeoff_chart)
from magcache_framepack.settings import LIMITS, JobSettings, section_count, setting_name

logger = logging.getLogger(__name__)

#: ``runner(job, image, settings, outputs_dir, profiles_dir)``: runs one job in its thread (see :func:`run_job_thread`).
Runner = Callable[["Job", Any, JobSettings, str, str], None]


# ---------------------------------------------------------------------------
# Calibration tables and the plan panel
# ---------------------------------------------------------------------------

_PROFILE_NAME = re.compile(r"^[\w][\w.\-]*\.json$")

#: What starts the label of a profile made for the job's frames and steps (listed first; the dropdown's
#: info line says what the mark means).
FITS_MARK = "★ "


def profile_label(profile: magcache_core.MagCacheProfile) -> str:
    """A profile as the dropdown shows it: "FramePack · 128 px · 25 steps · 12-01 19:51".

    Variant, frame resolution (when the profile records it), steps and when it was calibrated: what
    tells two profiles apart, short enough for the dropdown (the file name is in the line under it).
    """
    from magcache_framepack.models import get_variant

    try:
        made = datetime.datetime.fromisoformat(profile.created).strftime("%m-%d %H:%M")
    except (TypeError, ValueError):
        made = str(profile.created)
    parts = [get_variant(profile.variant).title,
             *([f"{profile.resolution} px"] if profile.resolution else []), f"{profile.num_steps} steps", made]
    return " · ".join(parts)


class ProfileCatalog:
    """The calibration tables one app offers.

    The ratio library (a calibrated table for each job's resolution and step
    count, see :func:`magcache_core.library_ratios`), every usable ``*.json`` in
    the profiles folder and the file given with ``--mag-ratios``.  Usable means
    calibrated for this app's variant and model; the others are left out and
    counted (:meth:`left_out`).  A profile is named by its file name (in the
    folder) or its full path (the ``--mag-ratios`` file only); any other name is
    refused, so a client cannot make the server read arbitrary files.
    ``resolution`` is the frames' (height + width) / 2 a job of this app gets,
    which picks the library's table.
    """

    def __init__(self, variant: str, profiles_dir: str | os.PathLike[str],
                 extra: str | os.PathLike[str] | None = None, model: str | None = None,
                 resolution: float = 640) -> None:
        if variant not in magcache_core.VARIANT_MAG_RATIOS:
            raise ValueError(f"variant {variant!r}: must be one of {', '.join(magcache_core.VARIANT_MAG_RATIOS)}")
        self.variant = variant
        self.profiles_dir = pathlib.Path(profiles_dir).resolve()
        self.extra = pathlib.Path(extra).resolve() if extra else None
        self.model = model   # refuse profiles measured on another model (tiny random vs real weights)
        self.resolution = resolution

    def choice_for(self, path: str | os.PathLike[str]) -> str:
        """The dropdown value naming this profile file."""
        path = pathlib.Path(path).resolve()
        if path.parent == self.profiles_dir:
            return path.name
        return str(path)

    def _scan(self) -> tuple[list[tuple[pathlib.Path, magcache_core.MagCacheProfile]], dict[str, int]]:
        """(usable profiles, {reason: count} of the files left out).

        Usable is what the engine accepts (:meth:`magcache_core.MagCacheProfile.check`, which
        compares canonical model names), so the list offers exactly the profiles a job would run:
        one calibrated on the same checkpoint under another name (a Hub-cache path, diffusers'
        class of it) is offered, not left out.
        """
        paths = sorted(self.profiles_dir.glob("*.json")) if self.profiles_dir.is_dir() else []
        if self.extra is not None and self.extra not in paths:
            paths.append(self.extra)
        usable: list[tuple[pathlib.Path, magcache_core.MagCacheProfile]] = []
        left: dict[str, int] = {}
        for path in paths:
            try:
                prof = magcache_core.MagCacheProfile.load(path)
            except ValueError:
                left["not a readable profile"] = left.get("not a readable profile", 0) + 1
                continue
            try:
                prof.check(self.variant, self.model)
            except ValueError:
                # the count says which of the two checks refused it
                reason = (f"calibrated for {prof.variant}" if prof.variant != self.variant
                          else f"measured on {prof.model}")
                left[reason] = left.get(reason, 0) + 1
                continue
            usable.append((path, prof))
        return usable, left

    def choices(self, steps: int | None = None, resolution: float | None = None) -> list[tuple[str, str]]:
        """Dropdown entries: profiles made for a job like this one (resolution, steps) first, then the library.

        ``resolution`` is the job's frame resolution when its image is known (else this app's).
        """
        usable, _ = self._scan()
        resolution = resolution or self.resolution

        def fits(prof: magcache_core.MagCacheProfile) -> bool:
            near = magcache_core.pick_ratio_table(self.variant, resolution, prof.num_steps).resolution
            return prof.num_steps == steps and prof.resolution is not None and \
                magcache_core.pick_ratio_table(self.variant, prof.resolution, prof.num_steps).resolution == near

        labels = self._labels(usable)
        first = [(FITS_MARK + labels[path], self.choice_for(path))
                 for path, prof in usable if steps is not None and fits(prof)]
        rest = [(labels[path], self.choice_for(path))
                for path, prof in usable if not (steps is not None and fits(prof))]
        return first + [(self._library_label(), LIBRARY)] + rest

    def _library_label(self) -> str:
        """Short, like the profiles' labels: the dropdown's info line says what the library is."""
        from magcache_framepack.models import get_variant

        return f"Ratio library · {get_variant(self.variant).title}"

    @staticmethod
    def _labels(usable: Sequence[tuple[pathlib.Path, magcache_core.MagCacheProfile]]) -> dict[pathlib.Path, str]:
        """Each usable profile's dropdown label: :func:`profile_label`, with the file name added where two
        would read the same (so a label still names one file; the line under the dropdown names it too)."""
        labels = {path: profile_label(prof) for path, prof in usable}
        counts: dict[str, int] = {}
        for label in labels.values():
            counts[label] = counts.get(label, 0) + 1
        return {path: label if counts[label] == 1 else f"{label} · {path.name}" for path, label in labels.items()}

    def value_for(self, choice: str | None) -> str | None:
        """The dropdown value for ``choice``, which may be an entry's label instead of its value.

        Gradio 5's dropdown (custom values allowed, for a profile saved while the
        page is open) sends the text in its box, the label, when it loses focus
        after being opened: that names the same entry.  Anything else is returned
        as it is, for :meth:`path_for` to accept or refuse.
        """
        if choice is None:
            return None
        choice = str(choice)
        if choice == self._library_label():
            return LIBRARY
        if " · " in choice:
            for path, label in self._labels(self._scan()[0]).items():
                if choice in (label, FITS_MARK + label):
                    return self.choice_for(path)
        return choice

    def left_out(self) -> str:
        """A line saying how many files in the profiles folder are not offered, and why ("" if none)."""
        _, left = self._scan()
        if not left:
            return ""
        total = sum(left.values())
        why = "; ".join(f"{n} {reason}" for reason, n in sorted(left.items()))
        return f"{total} file(s) in {self.profiles_dir.name}/ left out, not usable by this app: {why}."

    def path_for(self, choice: str | None) -> pathlib.Path | None:
        """The file behind a dropdown value (or an entry's label); None for the ratio library."""
        choice = self.value_for(choice)
        if choice in (None, "", LIBRARY, PUBLISHED):
            return None
        choice = str(choice)
        if self.extra is not None and choice in (str(self.extra), self.extra.name):
            return self.extra
        if _PROFILE_NAME.match(choice):
            path = self.profiles_dir / choice
            if path.is_file():
                return path
        raise ValueError(f"unknown calibration profile {choice!r}: choose {LIBRARY!r} or a profile "
                         f"file in {self.profiles_dir}")

    def load(self, choice: str | None) -> magcache_core.MagCacheProfile | None:
        """The profile behind a dropdown value (None: the library); ValueError saying why one is refused."""
        path = self.path_for(choice)
        if path is None:
            return None
        profile = magcache_core.MagCacheProfile.load(path)
        try:
            profile.check(self.variant, self.model)
        except ValueError as exc:
            raise ValueError(f"{path.name}: {exc}") from None
        return profile



def profile_status_update(note: str, left_out: str) -> Any:
    """The line under the profile dropdown as a component update: hidden when it has nothing to say, so
    no empty band sits under the dropdown (Gradio draws an HTML block's frame even when it is empty)."""
    import gradio as gr

    html_text = profile_status_html(note, left_out)
    return gr.update(value=html_text, visible=bool(html_text))


def plan_config(catalog: ProfileCatalog, settings: JobSettings, profile_choice: str | None,
                resolution: float | None = None) -> magcache_core.MagCacheConfig:
    """The MagCache config a job of ``settings`` runs with this table choice: the page plans from it too.

    It is :func:`magcache_framepack.job.magcache_config`, the function the job
    itself plans with, on the same table (the chosen profile's file, else the
    library's table for the frames), so the plan the page shows is the plan that
    runs.  ``resolution``: the job's frame resolution; None before an image is
    known (this app's default frames).  A refused profile raises ValueError.
    """
    from magcache_framepack.job import magcache_config

    path = catalog.path_for(profile_choice)
    if path is not None:
        catalog.load(profile_choice)      # refuses as a Start would, naming the file
    settings = dataclasses.replace(settings, mag_ratios=str(path) if path is not None else None)
    return magcache_config(settings, catalog.variant, catalog.model, resolution or catalog.resolution)


def table_source(catalog: ProfileCatalog, profile_choice: str | None, config: magcache_core.MagCacheConfig) -> str:
    """Where the page says a plan's ratios come from: the user's profile, or the library's sentence."""
    if config.profile is None:
        return config.source or ""
    return f"your profile {catalog.choice_for(catalog.path_for(profile_choice))}"


def profile_selection(catalog: ProfileCatalog, choice: str | None) -> tuple[str, str, str, str | None]:
    """What selecting a calibration table shows: (dropdown value, status text, chart, warning or None).

    A refused profile (unreadable, or calibrated for the other variant) puts the
    dropdown back on the ratio library and says why, once.
    """
    try:
        prof = catalog.load(choice)
    except ValueError as exc:
        return (LIBRARY, f"**Refused:** {exc}. Using the ratio library.",
                ratios_chart_html(catalog, LIBRARY), f"Calibration profile refused: {exc}")
    choice = catalog.value_for(choice)
    note = ("" if prof is None else
            f"Using profile {choice}: {prof.num_steps} steps, {prof.runs} run(s), created {prof.created}.")
    return str(choice or LIBRARY), note, ratios_chart_html(catalog, choice), None


def plan_panel_html(catalog: ProfileCatalog, cache: str, steps: float, magcache_thresh: float,
                    magcache_K: float, retention_ratio: float, profile_choice: str | None,
                    calibrate: bool, cfg: float = 1.0, resample: str = "magnitude",
                    resolution: float | None = None, target_speedup: float | None = None) -> str:
    """The live skip-plan panel for the current settings, and the table it comes from (never raises).

    ``resolution`` is the job's frame resolution, (height + width) / 2 of the bucket its image gets
    (:func:`image_frame_resolution`); None before an image is known: the app's default frames.
    With ``target_speedup`` the plan is the planner's choice for it, as the job's; under the plan,
    the trade-off of the planner's candidates on this table, with the plan that runs marked.
    """
    message = plan_message(cache, int(steps), calibrate)
    if message is not None:
        return message
    try:
        settings = JobSettings(prompt="", steps=int(steps), magcache_thresh=float(magcache_thresh),
                               magcache_K=int(round(float(magcache_K))), retention_ratio=float(retention_ratio),
                               cfg=float(cfg), resample=str(resample), target_speedup=target_speedup)
        config = plan_config(catalog, settings, profile_choice, resolution)
    except ValueError as exc:
        return message_html(f"No plan: {exc}")
    plan = SkipPlan(tuple(config.schedule()), branches=2 if float(cfg) > 1.0 else 1)
    return (plan_panel(plan, table_source(catalog, profile_choice, config), config.profile is not None, int(steps),
                       resolution, catalog.resolution)
            + tradeoff_html(config, target_speedup))


def tradeoff_html(config: magcache_core.MagCacheConfig, target_speedup: float | None) -> str:
    """The planner's trade-off on this config's table (speedup against planned error), this plan marked."""
    candidates = magcache_core.plan_candidates(config.mag_ratios, config.num_steps, config.resample)
    current = (config.num_steps / max(1, config.schedule().count(False)),
               magcache_core.planned_error(config.mag_ratios, config.num_steps, config.magcache_thresh,
                                           config.magcache_K, config.retention_ratio, config.resample))
    return tradeoff_chart(magcache_core.tradeoff_curve(candidates), current, target_speedup)


def ratios_chart_html(catalog: ProfileCatalog, profile_choice: str | None, steps: int = 25,
                      resample: str = "magnitude", resolution: float | None = None) -> str:
    """Chart of the ratio table in use (the library's when the choice is refused), next to the published one."""
    settings = JobSettings(prompt="", steps=int(steps), resample=resample)
    try:
        config = plan_config(catalog, settings, profile_choice, resolution)
    except ValueError:
        profile_choice = LIBRARY
        config = plan_config(catalog, settings, LIBRARY, resolution)
    return ratios_in_use_chart(catalog.variant, config.mag_ratios, table_source(catalog, profile_choice, config))


# ---------------------------------------------------------------------------
# Images, jobs and sessions
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UnreadableImage:
    """What the image input hands the job when the uploaded file is not an image it can decode."""

    name: str

    @property
    def message(self) -> str:
        from magcache_framepack.job import IMAGE_FORMATS

        return f"{self.name} is not a readable image: use a {IMAGE_FORMATS} file."


def image_frame_resolution(path: Any, bucket_resolution: int) -> float | None:
    """(height + width) / 2 of the frames a job of this image file gets (its bucket), or None if unreadable.

    Reads only the image header; the library picks its ratio table by this value, so the page
    plans as the job will.
    """
    from PIL import Image, UnidentifiedImageError

    from magcache_framepack.job import find_bucket

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return None
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return magcache_core.frame_resolution(*find_bucket(height, width, bucket_resolution))


def checked_image(component: Any) -> Any:
    """Make this image input hand the job an :class:`UnreadableImage` when an upload cannot be decoded.

    Gradio decodes an upload before the event function runs; a text file named
    .png then fails inside Gradio with an opaque error and a traceback.  This
    wraps the one instance's ``preprocess`` (a subclass would make Gradio 5
    write a stub file beside this module) so the job can say what is wrong.
    """
    from PIL import Image, UnidentifiedImageError

    decode = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            name = getattr(payload, "orig_name", None) or pathlib.Path(str(getattr(payload, "path", "") or
                                                                           "the upload")).name
            logger.debug("upload %s is not a readable image", name)     # the job says so, once
            return UnreadableImage(name)

    component.preprocess = preprocess
    return component


def raw_when_refused(component: Any) -> Any:
    """Make this input hand the job the value a client sent when Gradio's own check refuses it.

    Gradio 6's sliders refuse a number beyond their range (Gradio 5's pass it on), and its
    numbers and radios refuse a value of the wrong type, before the event function runs: the
    client gets Gradio's message, or none, and the server log a traceback.  The job's rule is
    the page's (:func:`into_range` moves numbers into range; anything else is refused with a
    message naming the input), so this one instance's ``preprocess`` passes such a value on
    for :meth:`AppEvents.run` to move or refuse, in one line.
    """
    check = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return check(payload)
        except Exception:  # noqa: BLE001 - Gradio's Error, or TypeError for a wrong type: the job says why
            return payload

    component.preprocess = preprocess
    return component


def refusals_in_one_line(demo: Any) -> Any:
    """Make Gradio's refusals of an event's inputs one log line and a message for the client.

    Before any event function runs, Gradio checks that a file input is a file the client
    uploaded, in the shape of its file data: a path such as /etc/passwd, or a bare string, is
    refused there with a traceback in the server log, and (not being a ``gradio.Error``) the
    client is told nothing (``{"error": null}``).  This wraps the one app's ``preprocess_data``,
    the step both Gradio 5 and 6 run those checks in, so such a refusal becomes
    ``gradio.Error(reason, print_exception=False)`` and one INFO line.  Other exceptions (not
    about the request) keep their traceback.
    """
    import gradio as gr

    check = demo.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await check(block_fn, inputs, *args, **kwargs)
        except (gr.Error, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:   # malformed data
            reason = input_refusal(exc)
            logger.info("Refused a request to /%s: %s", getattr(block_fn, "api_name", None) or "?", reason)
            raise gr.Error(reason, print_exception=False) from None

    demo.preprocess_data = preprocess_data
    return demo


def input_refusal(exc: BaseException) -> str:
    """One line saying why Gradio refused a request's inputs (see :func:`refusals_in_one_line`)."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and hasattr(exc, "title"):       # pydantic: the value is not Gradio's file data
        first = (errors() or [{}])[0]
        return (f"{exc.title}: {first.get('msg', 'not valid')}, got {first.get('input')!r:.200}; "
                "send a file as an upload (gradio_client: handle_file(path))")
    text = str(getattr(exc, "message", None) or exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, ValueError) or hasattr(exc, "message"):     # a ValueError or gradio.Error says why itself
        return line
    return f"the request's inputs are malformed ({type(exc).__name__}: {line})"


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


#: What the target speedup box holds when no target is asked for: empty (None, "") or 0 (what an
#: empty number box sends from a browser).
NO_TARGET = (None, "", 0)


def typed_settings(prompt: Any, n_prompt: Any, seed: Any, total_second_length: Any, latent_window_size: Any,
                   steps: Any, cfg: Any, gs: Any, rs: Any, gpu_memory_preservation: Any, cache: Any,
                   magcache_thresh: Any, magcache_K: Any, retention_ratio: Any, calibrate: Any, mp4_crf: Any,
                   resample: Any, profile_path: pathlib.Path | None, target_speedup: Any = None) -> JobSettings:
    """The settings a UI or API client typed, as numbers, before they are moved into the limits.

    :func:`into_range` then moves them as the page's Start does, so the job, the page and the
    report all show the values that really ran.  A value that is not a number, or a Calibrate
    that is not true or false, raises ValueError (TypeError) naming the input and what it accepts.
    The page and the /generate endpoint keep FramePack's names for two inputs,
    ``total_second_length`` and ``mp4_crf``, so API clients keep working; this is
    the one place they become JobSettings' ``seconds`` and ``crf``.  ``target_speedup`` (empty or
    0: none) plans the threshold, K and retention of a MagCache job; with another cache, or a
    calibration, it does not apply and is dropped (the page's plan panel says which plan runs).
    """
    if not isinstance(calibrate, bool):
        raise TypeError(f"calibrate = {calibrate!r}: must be true or false")
    sent = {"seed": seed, "total_second_length": total_second_length, "latent_window_size": latent_window_size,
            "steps": steps, "cfg": cfg, "gs": gs, "rs": rs, "gpu_memory_preservation": gpu_memory_preservation,
            "magcache_thresh": magcache_thresh, "magcache_K": magcache_K, "retention_ratio": retention_ratio,
            "mp4_crf": mp4_crf}
    numbers = {setting_name(shown): typed_number(setting_name(shown), value, shown) for shown, value in sent.items()}
    if target_speedup not in NO_TARGET and str(cache) == "magcache" and not calibrate:
        numbers["target_speedup"] = typed_number("target_speedup", target_speedup, "target_speedup")
    return JobSettings(prompt=str(prompt or ""), n_prompt=str(n_prompt or ""), cache=str(cache),
                       mag_ratios=str(profile_path) if profile_path else None, calibrate=calibrate,
                       resample=str(resample), **numbers)


def typed_number(name: str, value: Any, shown: str) -> int | float:
    """The number a client sent for the setting ``name`` (its input is called ``shown``), not yet in range.

    Integers stay exact (a seed near 2**63 survives); a number in a string is read as one; anything
    else raises ValueError saying what the input accepts (:data:`LIMITS`).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    try:
        number = float(value) if isinstance(value, (float, str)) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{shown} = {value!r}: {LIMITS[name].describe()}")
    return number


def into_range(typed: JobSettings) -> tuple[JobSettings, dict[str, dict[str, Any]]]:
    """``typed`` moved into :data:`LIMITS` as the page's Start moves it, and what moved.

    The second item is ``{setting: {"given": value sent, "used": value run}}`` for each value
    that changed (JobSettings' names, as in the report's settings); the report carries it so
    an API client sees what its job ran with.
    """
    settings = typed.clamped()
    moved = {name: {"given": getattr(typed, name), "used": getattr(settings, name)} for name in LIMITS
             if getattr(typed, name) != getattr(settings, name)}
    return settings, moved


def with_moves(report: Any, moved: dict[str, dict[str, Any]]) -> Any:
    """The job report with ``moved_into_range`` (see :func:`into_range`); a page update passes unchanged."""
    if not isinstance(report, dict) or "__type__" in report:
        return report
    return {**report, "moved_into_range": moved}


#: The number boxes Start moves into their limits, in the order :meth:`AppEvents.clamp_at_start` takes them.
CLAMPED_NAMES = ("seed", "seconds", "steps", "cfg", "gs", "crf", "magcache_thresh",
                 "magcache_K", "retention_ratio", "gpu_memory_preservation")


# ---------------------------------------------------------------------------
# The event handlers of one app
# ---------------------------------------------------------------------------

class AppEvents:
    """The handlers one built app's components are wired to, and what they share.

    One instance per :func:`~magcache_framepack.app.layout.build_ui`: the
    profile catalog, the runner, the folders and the defaults.  Nothing here
    belongs to a browser session; each session's job lives in its
    :class:`SessionJobs`, passed in from a ``gr.State``.  Handlers that read
    raw values (``preprocess=False``) clamp them as a job would, so a number
    typed beyond a slider plans and shows as it will run.
    """

    def __init__(self, variant: str, catalog: ProfileCatalog, runner: Runner, *, outputs_dir: str,
                 profiles_dir: str, bucket_resolution: int, initial_profile: str) -> None:
        self.variant = variant
        self.catalog = catalog
        self.runner = runner
        self.concurrency = int(getattr(runner, "concurrency", 1))
        self.outputs_dir = outputs_dir
        self.profiles_dir = profiles_dir
        self.bucket_resolution = bucket_resolution
        self.initial_profile = initial_profile
        self.defaults = JobSettings(prompt="")

    @classmethod
    def create(cls, models: Any, variant: str, *, outputs_dir: str | os.PathLike[str],
               profiles_dir: str | os.PathLike[str], mag_ratios: str | os.PathLike[str] | None,
               tiny: bool, runner: Runner | None) -> AppEvents:
        """The handlers of an app on ``models`` (or on ``runner``); ValueError if ``mag_ratios`` is refused."""
        from magcache_framepack.models import model_id
        from magcache_framepack.settings import bucket_resolution

        outputs_dir = str(pathlib.Path(outputs_dir).resolve())
        profiles_dir = str(pathlib.Path(profiles_dir).resolve())
        # a job's frames are a bucket of this resolution; the page plans with (height + width) / 2 of the
        # uploaded image's bucket, as the job does, and with this resolution before an image is given
        bucket_res = bucket_resolution(JobSettings(prompt="").resolution, tiny)
        catalog = ProfileCatalog(variant, profiles_dir, extra=mag_ratios, model=model_id(variant, tiny),
                                 resolution=bucket_res)
        initial_profile = LIBRARY
        if mag_ratios:
            initial_profile = catalog.choice_for(mag_ratios)
            catalog.load(initial_profile)           # refuse a bad --mag-ratios file now, not mid-job
        return cls(variant, catalog, runner if runner is not None else local_runner(models),
                   outputs_dir=outputs_dir, profiles_dir=profiles_dir, bucket_resolution=bucket_res,
                   initial_profile=initial_profile)

    # -- values as a job runs them ---------------------------------------------------------------
    def steps_of(self, value: Any) -> int:
        """A step count as a job runs it (raw slider value clamped; the default if not a number)."""
        try:
            return int(LIMITS["steps"].clamp(float(value)))
        except (TypeError, ValueError, OverflowError):
            return self.defaults.steps

    @staticmethod
    def resolution_of(value: Any) -> float | None:
        """A frame resolution from the hidden number (raw: None, "" or a number)."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if value > 0 else None

    # -- the plan panel, presets, profiles and chart ---------------------------------------------
    def plan(self, cache: str, steps: Any, thresh: Any, k: Any, retention: Any, profile: str | None,
             calibrate: bool, cfg: Any, resample: str = "magnitude", resolution: Any = None,
             target: Any = None) -> str:
        """The plan panel for the values as a job would run them (typed values clamped into the limits).

        ``resolution``: the frame resolution of the uploaded image's bucket (None before one is given);
        ``target``: the target speedup box (empty: none).
        """
        try:
            steps, thresh, k, retention, cfg = (LIMITS[name].clamp(float(value)) for name, value in (
                ("steps", steps), ("magcache_thresh", thresh), ("magcache_K", k),
                ("retention_ratio", retention), ("cfg", cfg)))
        except (TypeError, ValueError, OverflowError):
            return message_html("No plan: a MagCache setting is not a number.")
        return plan_panel_html(self.catalog, cache, steps, thresh, k, retention, profile, calibrate, cfg, resample,
                               self.resolution_of(resolution), self.target_of(target))

    @staticmethod
    def target_of(value: Any) -> float | None:
        """The target speedup box as a job runs it: None when empty, 0 or not a number, else clamped to its limits."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return float(LIMITS["target_speedup"].clamp(value)) if math.isfinite(value) and value != 0 else None

    def apply_target(self, target: Any, steps: Any, profile: str | None, resample: str,
                     resolution: Any) -> tuple[Any, Any, Any, Any]:
        """A target speedup typed: the planner's threshold, K and retention into the sliders, and the preset.

        Nothing changes when the box is empty, or no setting reaches the target (the plan panel says why).
        """
        import gradio as gr

        target = self.target_of(target)
        unchanged = (gr.update(),) * 4
        if target is None:
            return unchanged
        settings = JobSettings(prompt="", steps=self.steps_of(steps), resample=str(resample), target_speedup=target)
        try:
            config = plan_config(self.catalog, settings, profile, self.resolution_of(resolution))
        except ValueError:
            return unchanged
        return (config.magcache_thresh, config.magcache_K, config.retention_ratio,
                preset_for(config.magcache_thresh, config.magcache_K, config.retention_ratio))

    @staticmethod
    def apply_preset(name: str) -> tuple[Any, Any, Any]:
        """A preset chosen: its three values into the sliders ("Custom" leaves them as they are)."""
        import gradio as gr

        if name == CUSTOM_PRESET:
            return gr.update(), gr.update(), gr.update()
        return preset_values(name)

    @staticmethod
    def typed_preset(thresh: Any, k: Any, retention: Any) -> str:
        """The preset the values name, as a job would run them (a typed 1 is retention 0.99)."""
        try:
            values = [LIMITS[name].clamp(float(value)) for name, value in (
                ("magcache_thresh", thresh), ("magcache_K", k), ("retention_ratio", retention))]
        except (TypeError, ValueError, OverflowError):
            return CUSTOM_PRESET
        return preset_for(*values)

    def chart_for(self, choice: str | None, steps_value: Any, mode: str, resolution: Any) -> str:
        """The ratio chart for the table a job of these steps and frames would plan from."""
        return ratios_chart_html(self.catalog, choice, self.steps_of(steps_value), mode,
                                 self.resolution_of(resolution))

    def select_profile(self, choice: str | None, steps_value: Any, mode: str, resolution: Any) -> tuple[str, str, str]:
        """A table chosen in the dropdown: (dropdown value, the line under it, chart); a refused one says why."""
        value, note, _, warning = profile_selection(self.catalog, choice)
        if warning:
            logger.info("%s", warning)     # shown once, in the status line under the dropdown
        return (value, profile_status_update(note, self.catalog.left_out()),
                self.chart_for(value, steps_value, mode, resolution))

    def frame_resolution_of(self, path: Any) -> float | None:
        """A new upload: the resolution of the frames its job gets, which picks the library's table."""
        return image_frame_resolution(path, self.bucket_resolution)

    def profiles_for(self, steps_value: Any, resolution: Any) -> Any:
        """The dropdown's entries for this job: profiles made for its frames and steps first."""
        import gradio as gr

        return gr.update(choices=self.catalog.choices(self.steps_of(steps_value), self.resolution_of(resolution)))

    def load_page(self) -> tuple[Any, str]:
        """A new page: the profiles folder as it is now (profiles saved or copied in since start)."""
        import gradio as gr

        note = profile_selection(self.catalog, self.initial_profile)[1]
        return (gr.update(choices=self.catalog.choices(self.defaults.steps)),
                profile_status_update(note, self.catalog.left_out()))

    # -- Start, the job, End -------------------------------------------------------------------------
    @staticmethod
    def arm(sess: SessionJobs) -> tuple[Any, Any]:
        """Start clicked: forget a stale End, disable Start and enable End."""
        import gradio as gr

        sess.arm()
        return gr.update(interactive=False), gr.update(interactive=True)

    def clamp_at_start(self, *values: Any) -> tuple[Any, ...]:
        """Start pressed: move every typed value into its limits and show what the job will run.

        The same rule as the job itself (:meth:`JobSettings.clamped`), so the sliders, the preset
        and the plan show the values the job then receives.  ``values``: the :data:`CLAMPED_NAMES`
        boxes, then cache, profile, calibrate, resample, frame resolution and target speedup.
        """
        import gradio as gr

        *numbers, cache_value, profile_value, calibrate_value, resample_value, resolution, target = values
        typed = {}
        for name, value in zip(CLAMPED_NAMES, numbers):
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError):
                continue                     # not a number: the job refuses it with a message
            if math.isfinite(number):
                typed[name] = number
        clamped = JobSettings(prompt="", **typed).clamped()
        out = [getattr(clamped, name) if name in typed else gr.update() for name in CLAMPED_NAMES]
        if len(typed) < len(CLAMPED_NAMES):
            return (*out, gr.update(), gr.update())
        return (*out, preset_for(clamped.magcache_thresh, clamped.magcache_K, clamped.retention_ratio),
                self.plan(cache_value, clamped.steps, clamped.magcache_thresh, clamped.magcache_K,
                          clamped.retention_ratio, profile_value, bool(calibrate_value), clamped.cfg,
                          resample_value, resolution, target))

    def run(self, input_image: Any, prompt: Any, n_prompt: Any, seed: Any, total_second_length: Any,
            latent_window_size: Any, steps: Any, cfg: Any, gs: Any, rs: Any, gpu_memory_preservation: Any,
            cache: Any, magcache_thresh: Any, magcache_K: Any, retention_ratio: Any, mag_ratios: Any,
            calibrate: Any, mp4_crf: Any, resample: Any, target_speedup: Any,
            session: SessionJobs | None) -> Iterator[tuple[Any, ...]]:
        """The /generate endpoint's body: check the inputs, then stream the job (a refused one says why)."""
        import gradio as gr

        settings = None
        moved: dict[str, dict[str, Any]] = {}
        try:
            profile_path = self.catalog.path_for(mag_ratios)
            settings, moved = into_range(typed_settings(
                prompt, n_prompt, seed, total_second_length, latent_window_size, steps, cfg, gs, rs,
                gpu_memory_preservation, cache, magcache_thresh, magcache_K, retention_ratio, calibrate, mp4_crf,
                resample, profile_path, target_speedup))
            image = self.checked_image(input_image, settings, mag_ratios)
        except (TypeError, ValueError, OverflowError) as exc:
            message = f"Cannot start: {exc}"
            logger.info("%s", message)
            gr.Warning(message)
            yield (None, with_moves(job_report(None, [], status="error", message=message, settings=settings,
                                               variant=self.variant, profile_choice=mag_ratios), moved),
                   summary_markdown([f"error: {message}"]), None, "")
            return
        if moved:
            logger.info("job values moved into range: %s", ", ".join(
                f"{name} {change['given']!r} -> {change['used']!r}" for name, change in moved.items()))
        for outputs in self.stream_job(session if session is not None else SessionJobs(), settings,
                                       image, mag_ratios):
            video, report, *rest = outputs
            yield (video, with_moves(report, moved), *rest)

    def checked_image(self, input_image: Any, settings: JobSettings, mag_ratios: str | None) -> Any:
        """The job's image, once the image, the settings and the chosen profile are known to be usable.

        Raises ValueError saying what is wrong: no image, a file that is not one, a setting
        out of range, a profile of another variant or model, a target speedup no setting reaches.
        """
        from magcache_framepack.job import find_bucket, read_image

        if isinstance(input_image, UnreadableImage):
            raise ValueError(input_image.message)
        if input_image is None:
            raise ValueError("No input image: upload a picture, then press Start.")
        image = read_image(input_image)    # says so if the file is not an image
        settings.validate()
        if settings.mag_ratios is not None:
            self.catalog.load(mag_ratios)        # refuses another variant's profile with a clear message
        if settings.target_speedup is not None:  # an unreachable target: the best reachable, before the job
            height, width = find_bucket(image.shape[0], image.shape[1], self.bucket_resolution)
            plan_config(self.catalog, settings, mag_ratios, magcache_core.frame_resolution(height, width))
        return image

    def job_plan(self, settings: JobSettings, profile_choice: str | None, resolution: float) -> dict[str, Any]:
        """The plan this job runs in every section, and the table it comes from (as the page shows it).

        :func:`plan_config` is the job's own route to its plan, so this is the plan the job runs; the
        report replaces it with the plan the video's record says ran once the job ends.
        """
        if settings.cache != "magcache" or settings.calibrate:
            return {"skipped": [False] * settings.steps, "ratio_source": None,
                    "computed_steps": list(range(settings.steps))}
        config = plan_config(self.catalog, settings, profile_choice, resolution)
        skipped = config.schedule()
        return {"skipped": skipped, "ratio_source": table_source(self.catalog, profile_choice, config),
                "computed_steps": [t for t, s in enumerate(skipped) if not s]}

    def stream_job(self, sess: SessionJobs, settings: JobSettings, image: Any,
                   profile_choice: str | None) -> Iterator[tuple[Any, ...]]:
        """Run the job in its thread and yield the page's outputs as its events arrive, then its end.

        The job keeps its input in the outputs folder (once per distinct image): the upload lives in
        Gradio's cache, which is cleaned as the app runs, so the video's record names the kept copy.
        """
        import gradio as gr

        from magcache_framepack.job import find_bucket

        height, width = find_bucket(image.shape[0], image.shape[1], self.bucket_resolution)
        plan_info = self.job_plan(settings, profile_choice, magcache_core.frame_resolution(height, width))
        stream = JobStream(StepClock(plan_info["skipped"], section_count(
            settings.seconds, settings.latent_window_size), time.perf_counter()))

        def report_now(status: str, message: str, result: Any = None) -> dict[str, Any]:
            return job_report(result, stream.sections, status=status, message=message, settings=settings,
                              variant=self.variant, profile_choice=profile_choice, plan=plan_info)

        job = sess.begin()
        if job is None:
            message = "Stopped before it started (End was pressed)."
            yield None, report_now("stopped", message), summary_markdown([f"stopped: {message}"]), None, ""
            return
        job.request = JobRequest(settings, image, profile_choice)
        job.thread = threading.Thread(target=self.runner, name="magcache-job", daemon=True,
                                      args=(job, image, settings, self.outputs_dir, self.profiles_dir))
        job.thread.start()
        try:
            yield (gr.update(), report_now("running", "Starting ..."), "", gr.update(),
                   progress_html(0, "Starting ..."))
            shown_at = time.perf_counter()
            while stream.result is None:
                wait = page_update_wait(time.perf_counter(), shown_at, stream.urgent) if stream.unshown else 1.0
                if wait > 0:
                    stream.take(take_events(job.events, timeout=wait))
                    continue
                preview = gr.update() if stream.preview is None else gr.update(visible=True, value=stream.preview)
                yield (stream.video if stream.video else gr.update(), report_now("running", "Running ..."),
                       summary_markdown(["Running ...", *stream.lines]), preview,
                       stream.bar if stream.bar else gr.update())
                stream.shown()
                shown_at = time.perf_counter()
        finally:
            if job.thread.is_alive():   # the page went away mid-job: free the GPU for others
                job.stop.set()
            sess.finish(job, stream.result)
        result = stream.result
        stream.sections[:] = list(result.sections) or stream.sections
        ran = (result.record or {}).get("magcache") or {}
        if "plan" in ran:       # the report says what ran, from the video's own record
            plan_info = {"skipped": [step == "skip" for step in ran["plan"]],
                         "ratio_source": ran["ratio_source"], "computed_steps": ran["computed_steps"]}
        if result.status == "error":
            gr.Warning(result.message)
        elif result.status == "stopped":
            gr.Info(result.message)
        yield (result.video_path or stream.video, report_now(result.status, result.message, result),
               summary_markdown(result.summary_lines()), None, "")

    def after_job(self, sess: SessionJobs, current_profile: str | None, steps_value: Any,
                  resolution: Any) -> tuple[Any, ...]:
        """The job ended: Start back on, End off, and a profile it saved selected and charted.

        After a calibration the Calibrate box is unticked: the next Start runs with the
        new profile (the plan panel follows the box), instead of calibrating again.
        """
        import gradio as gr

        result = sess.take_result()
        chart = calibrate = gr.update()
        value = current_profile
        if result is not None and result.profile_path:
            value = self.catalog.choice_for(result.profile_path)      # the new profile, selected
            chart = calibration_chart(self.variant, list(result.calibration.ratios) if result.calibration else [],
                                      value)
            calibrate = gr.update(value=False)
        # the line under the dropdown names the selected profile's file (the dropdown shows its label)
        value, note, _, _ = profile_selection(self.catalog, value)
        choices = self.catalog.choices(self.steps_of(steps_value), self.resolution_of(resolution))
        return (gr.update(interactive=True), gr.update(interactive=False), gr.update(choices=choices, value=value),
                chart, gr.update(visible=False), profile_status_update(note, self.catalog.left_out()), calibrate)

    @staticmethod
    def stop(sess: SessionJobs) -> None:
        """The End button: stop this session's job, or the one it queued next."""
        sess.request_stop()

    @staticmethod
    def end_api(sess: SessionJobs) -> bool:
        # No docstring: Gradio would publish it as the /end endpoint's description, which stays as it was.
        # The API's End stops only the running job of the Client's session (True if one ran).
        stopped = sess.stop_running()
        logger.info("End through the API: %s", "the running job stops" if stopped else "no job was running")
        return stopped


def generate_endpoint(events: AppEvents) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """The /generate function: its parameter names and defaults are the client API, spelled out once here.

    A generator function (Gradio streams only those), with no docstring and no
    annotations, as the client API has always been described.
    """
    d = events.defaults
    d_thresh, d_k, d_retention = preset_values(magcache_core.DEFAULT_PRESET)

    def generate(input_image, prompt, n_prompt=d.n_prompt, seed=d.seed,
                 total_second_length=d.seconds,
                 latent_window_size=d.latent_window_size, steps=d.steps, cfg=d.cfg,
                 gs=d.gs, rs=d.rs, gpu_memory_preservation=d.gpu_memory_preservation,
                 cache="magcache", magcache_thresh=d_thresh, magcache_K=d_k, retention_ratio=d_retention,
                 mag_ratios=events.initial_profile, calibrate=False, mp4_crf=d.crf,
                 resample=d.resample, target_speedup=None, session=None):
        yield from events.run(input_image, prompt, n_prompt, seed, total_second_length, latent_window_size, steps,
                              cfg, gs, rs, gpu_memory_preservation, cache, magcache_thresh, magcache_K,
                              retention_ratio, mag_ratios, calibrate, mp4_crf, resample, target_speedup, session)

    return generate
