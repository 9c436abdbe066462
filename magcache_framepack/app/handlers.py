"""What the app does when something happens: :class:`AppEvents`, the handlers the page's components are wired to.

One instance per built app holds what its handlers share (the profile
catalog, the runner, the folders, the defaults); :mod:`magcache_framepack.app.layout`
does the wiring.  The pieces they use live below: the tables and the plan panel
(:mod:`.profiles`), what a client sent (:mod:`.requests`), jobs and sessions
(:mod:`.jobs`).

gradio and the job module are imported inside the functions that need them
(see :mod:`magcache_framepack.app`): importing this module does no work.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import magcache_core

from magcache_framepack.app.views import (
    CUSTOM_PRESET, LIBRARY, job_report, message_html, preset_for,
    preset_values, progress_html, calibration_chart, summary_markdown)
from magcache_framepack.app.jobs import JobRequest, JobStream, Runner, SessionJobs, StepClock, local_runner, page_update_wait, take_events
from magcache_framepack.app.profiles import ProfileCatalog, plan_config, plan_panel_html, profile_selection, profile_status_update, ratios_chart_html, table_source
from magcache_framepack.app.requests import CLAMPED_NAMES, UnreadableImage, image_frame_resolution, into_range, typed_settings, with_moves
from magcache_framepack.settings import LIMITS, JobSettings, section_count

logger = logging.getLogger(__name__)

#: The API's End replies no sooner than this.  gradio_client 1.x (the one Gradio 5 pins) files a call's
#: id only after the server has answered the call's POST; a reply that arrives before that, on the stream
#: a running job keeps open, kills the Client's message thread, and with it every call of that Client
#: (gradio_client 2 files the id under a lock).  End's reply is otherwise instant, so a Client held up
#: for a moment on a busy machine lost its End and its job's results.
END_REPLY_SECONDS = 0.5


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
    @staticmethod
    def int_setting(name: str, value: Any) -> int:
        """An integer slider's raw value as a job runs it: clamped into ``LIMITS[name]``; the job's default
        when not a number."""
        try:
            return int(LIMITS[name].clamp(float(value)))
        except (TypeError, ValueError, OverflowError):
            return getattr(JobSettings, name)

    @classmethod
    def steps_of(cls, value: Any) -> int:
        """A step count as a job runs it."""
        return cls.int_setting("steps", value)

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
             target: Any = None, window: Any = None) -> str:
        """The plan panel for the values as a job would run them (typed values clamped into the limits).

        ``resolution``: the frame resolution of the uploaded image's bucket (None before one is given);
        ``target``: the target speedup box (empty: none); ``window``: the latent window (the sampler's
        step weights depend on it).
        """
        try:
            steps, thresh, k, retention, cfg = (LIMITS[name].clamp(float(value)) for name, value in (
                ("steps", steps), ("magcache_thresh", thresh), ("magcache_K", k),
                ("retention_ratio", retention), ("cfg", cfg)))
        except (TypeError, ValueError, OverflowError):
            return message_html("No plan: a MagCache setting is not a number.")
        return plan_panel_html(self.catalog, cache, steps, thresh, k, retention, profile, calibrate, cfg, resample,
                               self.resolution_of(resolution), self.target_of(target), self.window_of(window))

    @classmethod
    def window_of(cls, value: Any) -> int:
        """The latent window as a job runs it (FramePack's 9 when not a number)."""
        return cls.int_setting("latent_window_size", value)

    @staticmethod
    def target_of(value: Any) -> float | None:
        """The target speedup box as a job runs it: None when empty, 0 or not a number, else clamped to its limits."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return float(LIMITS["target_speedup"].clamp(value)) if math.isfinite(value) and value != 0 else None

    def apply_target(self, target: Any, steps: Any, profile: str | None, resample: str,
                     resolution: Any, window: Any = None) -> tuple[Any, Any, Any, Any]:
        """A target speedup typed: the planner's threshold, K and retention into the sliders, and the preset.

        Nothing changes when the box is empty, or no setting reaches the target (the plan panel says why).
        """
        import gradio as gr

        target = self.target_of(target)
        unchanged = (gr.update(),) * 4
        if target is None:
            return unchanged
        settings = JobSettings(prompt="", steps=self.steps_of(steps), resample=str(resample), target_speedup=target,
                               latent_window_size=self.window_of(window))
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
            video, report, *rest = self.refused(f"Cannot start: {exc}", settings, mag_ratios)
            yield (video, with_moves(report, moved), *rest)
            return
        if moved:
            logger.info("job values moved into range: %s", ", ".join(
                f"{name} {change['given']!r} -> {change['used']!r}" for name, change in moved.items()))
        for outputs in self.stream_job(session if session is not None else SessionJobs(), settings,
                                       image, mag_ratios):
            video, report, *rest = outputs
            yield (video, with_moves(report, moved), *rest)

    def refused(self, message: str, settings: JobSettings | None = None,
                profile_choice: str | None = None) -> tuple[Any, ...]:
        """A job refused before it ran: one log line, a warning on the page, and the five /generate outputs
        with an "error" report that says why (the shape every job button's endpoint returns)."""
        import gradio as gr

        logger.info("%s", message)
        gr.Warning(message)
        return (None, job_report(None, [], status="error", message=message, settings=settings,
                                 variant=self.variant, profile_choice=profile_choice),
                summary_markdown([f"error: {message}"]), None, "")

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
        time.sleep(END_REPLY_SECONDS)
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
