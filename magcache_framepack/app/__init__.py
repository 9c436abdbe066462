"""The Gradio app behind magcache_demo_gradio.py (FramePack) and magcache_demo_gradio_f1.py (F1).

It keeps the page FramePack users know (image, prompt, quick prompts, Start/End,
settings on the left; video, latent preview and progress on the right) and adds
MagCache: cache choice, presets, the three MagCache knobs, the calibration table
in use, a calibration run, and a live skip plan made by the function the job
plans with (:func:`magcache_framepack.job.magcache_config`, then its
``schedule()``) on the same table, so the plan shown is the plan run.

Inside the app, imports only go down (``tests/test_layout.py`` checks it):

1. :mod:`~magcache_framepack.app.views`: what the page shows, as pure functions
   of their inputs (presets, the plan strip, charts, reports, ETA); no gradio,
   no threads, no state.
2. :mod:`~magcache_framepack.app.profiles`: the calibration tables one app
   offers, and the plan panel and ratio chart computed from them.
3. :mod:`~magcache_framepack.app.requests`: what a client sent, made into a
   job's values (typed, moved into range) or refused in one line.
4. :mod:`~magcache_framepack.app.jobs`: jobs and sessions, the runner seam, and
   what a running job's page shows when.
5. :mod:`~magcache_framepack.app.handlers`: the handlers of one app
   (:class:`~magcache_framepack.app.handlers.AppEvents`).
6. :mod:`~magcache_framepack.app.rerun` and :mod:`~magcache_framepack.app.grid`:
   the last finished job again with the cache Off (Compare, Render without
   cache), and the cache's settings grid.
7. :mod:`~magcache_framepack.app.layout`: the Blocks page (:func:`build_ui`),
   which places the components and wires them to the handlers.
8. :mod:`~magcache_framepack.app.serve`: the command line, :func:`launch` and
   :func:`main`.

This module is only the face: it names what other code imports.

Design notes, because they are easy to undo by accident:

* Importing the app does no work: no argv, no models, no server, no CUDA.
  ``main()`` does all of that.  gradio and the job and models modules are
  imported inside the functions that need them, because gradio, and what
  loading the models brings in, pull in huggingface_hub, which reads
  ``HF_HOME`` once, at import; ``main()`` must set it first.
* Every browser session owns its job.  A :class:`SessionJobs` lives in a
  ``gr.State`` (one per session; it deep-copies to a fresh, empty instance), and
  each job is a :class:`Job` with its own worker thread, stop flag and event
  queue.  Nothing that belongs to a job is module-level, so a second tab never
  sees the first tab's frames and its End button cannot stop the first tab's job.
* One GPU, one job: the generate event's concurrency limit is the runner's
  (1 in this process, the worker count on Ray; later Starts wait in Gradio's
  queue), and a lock created per app guards ``run_job`` in case a job's worker
  outlives its generator.
* Gradio 5 and 6 both work: no Blocks(css/theme) (moved to launch() in 6), no
  per-component options that 6 removed, ``api_name=False`` for UI-only events.

The client API, four endpoints::

    from gradio_client import Client, handle_file
    client = Client(url)
    video, report, summary, preview, progress = client.predict(
        input_image=handle_file("in.png"), prompt="...", api_name="/generate",
        steps=25, magcache_thresh=0.10, ...)            # every input but input_image is optional
    client.predict(api_name="/end")   # End: stops the job this Client started (True if one ran)
    # this Client's last finished job again, the cache Off: the five outputs above, then for
    # /compare also both videos, the comparison in words, its charts and as a dict
    *job, cached, uncached, words, charts, comparison = client.predict(api_name="/compare")
    video, report, summary, preview, progress = client.predict(api_name="/render_without_cache")

Inputs (defaults as in the UI): input_image, prompt, n_prompt, seed,
total_second_length, latent_window_size, steps, cfg, gs, rs,
gpu_memory_preservation, cache ("magcache" | "teacache" | "off"),
magcache_thresh, magcache_K, retention_ratio, mag_ratios ("library", the
default, or the file name of a profile in the profiles folder; "published" is
read as "library"), calibrate, mp4_crf, resample ("magnitude" | "nearest").
Numbers are moved into ``LIMITS`` before the job runs (Gradio 6
refuses an API value beyond a slider's range itself), and the report's
``settings`` and ``plan`` say what ran; a prompt or n_prompt longer than
``LIMITS["prompt"]`` (4,000 characters) is refused.
Outputs, in :data:`GENERATE_OUTPUTS` order: the final MP4 (a path with
gradio_client 2.x, ``{"video": path, "subtitles": None}`` with 1.x), the job report (a dict, see
:func:`~magcache_framepack.app.views.job_report`: status "done" | "stopped" |
"error", message, per-section computed/skipped step indices and seconds, total
seconds, saved profile), the summary (Markdown), the preview (None at the end)
and the progress HTML ("" at the end).  A job that fails (no image, an
unreadable image file, bad settings, refused profile, CUDA out of memory) does
not raise: its report says "error" and why.
"""

from magcache_framepack.app.profiles import ProfileCatalog, plan_panel_html, profile_selection
from magcache_framepack.app.requests import image_frame_resolution
from magcache_framepack.app.jobs import Job, SessionJobs, StepClock, run_job_thread
from magcache_framepack.app.layout import build_ui
from magcache_framepack.app.serve import APP_DIR, build_parser, launch, main, main_f1, main_framepack
from magcache_framepack.app.views import (CUSTOM_PRESET, GENERATE_OUTPUTS, LIBRARY, QUICK_PROMPTS, eta_seconds,
                                          format_duration, preset_for, preset_values)

__all__ = [
    "APP_DIR", "CUSTOM_PRESET", "GENERATE_OUTPUTS", "LIBRARY", "QUICK_PROMPTS", "Job", "ProfileCatalog",
    "SessionJobs", "StepClock", "build_parser", "build_ui", "eta_seconds", "format_duration",
    "image_frame_resolution", "launch", "main", "main_f1", "main_framepack", "plan_panel_html", "preset_for",
    "preset_values", "profile_selection", "run_job_thread",
]
