"""The page: the Gradio Blocks layout of the app, and which handler each component's events call.

It keeps the page FramePack users know (image, prompt, quick prompts,
Start/End, settings on the left; video, latent preview and progress on the
right) and adds MagCache's controls.  :func:`build_ui` puts the parts together:
the left column (inputs and buttons, the MagCache group, the job's settings),
the right column (results), then the events of the plan and profile controls
and those of Start and End.  What a handler does is in
:mod:`magcache_framepack.app.handlers`; this module only places and wires.

Gradio 5 and 6 both work: no Blocks(css/theme) (moved to launch() in 6), no
per-component options that 6 removed, ``api_name=False`` for UI-only events.
gradio is imported inside the functions (see :mod:`magcache_framepack.app`).
"""

from __future__ import annotations

import os
import types
from typing import TYPE_CHECKING, Any

import magcache_core

from magcache_framepack.app.profiles import FITS_MARK, profile_selection, ratios_chart_html
from magcache_framepack.app.requests import CLAMPED_NAMES, checked_image, raw_when_refused, refusals_in_one_line
from magcache_framepack.app.jobs import Runner, SessionJobs
from magcache_framepack.app.handlers import AppEvents, generate_endpoint
from magcache_framepack.app.grid import GridEvents, grid_endpoint
from magcache_framepack.app.rerun import RerunEvents
from magcache_framepack.app.views import (CACHE_CHOICES, CUSTOM_PRESET, HELP, QUICK_PROMPTS, preset_values,
                                          profile_status_html)
from magcache_framepack.settings import LIMITS

if TYPE_CHECKING:  # imported for annotations only; see the package docstring
    import gradio as gr

#: Gradio's ``delete_cache`` for the app, (every, older than) in seconds: each hour the files Gradio made
#: (uploads, previews, copies of videos it served) that are over 6 hours old are deleted, so its cache
#: holds about 6 hours of jobs however long the app runs (without it, about 9 files a job pile up until
#: the app stops).  A page left open longer than that shows its old video no more; the videos, their
#: records and the inputs stay in the outputs folder.
DELETE_CACHE = (3600, 6 * 3600)

#: Keyword arguments that keep a UI-only event out of the client API (Gradio 5 and 6).
HIDDEN_API: dict[str, Any] = {"api_name": False}


def bounds(name: str) -> dict[str, Any]:
    """A slider's minimum, maximum and step: the pipeline's limits, the same the API and CLI use."""
    limit = LIMITS[name]
    return {"minimum": limit.low, "maximum": limit.high, "step": limit.step}


def build_ui(models: Any, variant: str, *, outputs_dir: str | os.PathLike[str] = "outputs",
             profiles_dir: str | os.PathLike[str] = "magcache_profiles",
             mag_ratios: str | os.PathLike[str] | None = None, tiny: bool | None = None,
             runner: Runner | None = None,
             delete_cache: tuple[int, int] | None = DELETE_CACHE) -> gr.Blocks:
    """Build the app for loaded ``models``; the caller launches it (see :func:`~magcache_framepack.app.launch`).

    ``mag_ratios`` preselects a saved profile (ValueError if it is refused).
    ``runner(job, image, settings, outputs_dir, profiles_dir)`` runs a job in its
    thread with :func:`~magcache_framepack.app.jobs.run_job_thread`'s
    contract; None runs it on ``models`` in this process (one job at a time),
    :class:`magcache_framepack.runners.ray.AppRunner` on Ray workers
    (``runner.concurrency`` jobs at once).  ``delete_cache``: how often Gradio cleans its cache and
    of what age (:data:`DELETE_CACHE`; the soak test makes it seconds).
    """
    import gradio as gr

    from magcache_framepack.models import VARIANTS

    spec = VARIANTS[variant]
    tiny = bool(getattr(models, "tiny", False)) if tiny is None else tiny
    events = AppEvents.create(models, variant, outputs_dir=outputs_dir, profiles_dir=profiles_dir,
                              mag_ratios=mag_ratios, tiny=tiny, runner=runner)
    with gr.Blocks(title=f"{spec.title} + MagCache", analytics_enabled=False, delete_cache=delete_cache) as demo:
        page = types.SimpleNamespace(session=gr.State(SessionJobs()))
        gr.Markdown(f"# {spec.title} with MagCache")
        if tiny:
            gr.Markdown(
                "**Tiny test mode:** every model here has tiny *random* weights, nothing was downloaded, "
                "and the video is noise. Use it to try the app and its cache settings without a GPU; "
                "run without `--tiny` on an NVIDIA GPU for real videos.", elem_id="tiny-banner")
        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column():
                    left_column(page, events)
                with gr.Column():
                    right_column(page, events, spec.forward_sections)
                    compare_panel(page)
        with gr.Tab("Cache grid", elem_id="tab-grid"):
            grid_tab(page)
        plan_and_profile_events(page, events)
        start_and_end_events(page, events, demo)
        rerun_events(page, events)
        grid_events(page, events)
    demo.queue()
    return refusals_in_one_line(demo)


# ---------------------------------------------------------------------------
# The two columns
# ---------------------------------------------------------------------------

def left_column(page: types.SimpleNamespace, events: AppEvents) -> None:
    """Image, prompt and buttons, the MagCache group, then the job's other settings."""
    import gradio as gr

    inputs_and_buttons(page)
    with gr.Group():
        magcache_controls(page, events)
    settings_controls(page, events.defaults)


def inputs_and_buttons(page: types.SimpleNamespace) -> None:
    """The image, its frames' resolution (hidden), the prompt, the quick prompts, Start and End."""
    import gradio as gr

    # a file path (image_mode=None: the upload itself, not a re-encoded copy): the job reads it
    # with read_image, and the video's record names the user's file
    page.input_image = checked_image(gr.Image(sources=["upload"], type="filepath", image_mode=None,
                                              label="Image", height=320, elem_id="input-image"))
    # (height + width) / 2 of the frames the uploaded image will get: picks the library's table
    page.frame_resolution = gr.Number(value=None, visible=False, elem_id="frame-resolution")
    page.prompt = gr.Textbox(label="Prompt", value="", elem_id="prompt", max_length=int(LIMITS["prompt"].high))
    page.quick = gr.Dataset(samples=[[p] for p in QUICK_PROMPTS], label="Quick List",
                            samples_per_page=1000, components=[page.prompt])
    with gr.Row():
        page.start_button = gr.Button(value="Start Generation", variant="primary", elem_id="start")
        page.end_button = gr.Button(value="End Generation", interactive=False, elem_id="end")
    with gr.Row():
        # explore with the cache, then finish exact: the last finished job again, the cache Off
        page.compare_button = gr.Button(value="Compare with no cache", size="sm", elem_id="compare")
        page.render_button = gr.Button(value="Render without cache", size="sm", elem_id="render-uncached")


def magcache_controls(page: types.SimpleNamespace, events: AppEvents) -> None:
    """Cache choice, preset, the three MagCache knobs, the live plan, the calibration table and Calibrate."""
    import gradio as gr

    d_thresh, d_k, d_retention = preset_values(magcache_core.DEFAULT_PRESET)
    defaults, catalog = events.defaults, events.catalog
    page.cache = gr.Radio(choices=CACHE_CHOICES, value="magcache", label="Cache",
                          info="MagCache skips transformer passes by a plan fixed in advance; "
                               "TeaCache is FramePack's own cache; Off computes every step.",
                          elem_id="cache")
    page.preset = gr.Radio(choices=[*magcache_core.PRESETS, CUSTOM_PRESET],
                           value=magcache_core.DEFAULT_PRESET, label="MagCache preset",
                           info="E = error threshold, K = max skips in a row, R = retention.",
                           elem_id="preset")
    page.magcache_thresh = gr.Slider(label="MagCache threshold", value=d_thresh, info=HELP["thresh"],
                                     elem_id="magcache-thresh", **bounds("magcache_thresh"))
    page.magcache_K = gr.Slider(label="MagCache K", value=d_k, info=HELP["K"], elem_id="magcache-k",
                                **bounds("magcache_K"))
    # retention stays below 1 (1 would mean "compute every step": use Cache Off)
    page.retention_ratio = gr.Slider(label="Retention ratio", value=d_retention, info=HELP["retention"],
                                     elem_id="retention", **bounds("retention_ratio"))
    page.target_speedup = gr.Number(
        label="Target speedup (optional)", value=None, elem_id="target-speedup",
        info="Empty or 0: the threshold, K and retention above decide. A number such as 2: the planner picks the "
             "setting that computes at most steps / 2 steps with the least planned error, and sets them above.")
    page.plan_view = gr.HTML(
        events.plan("magcache", defaults.steps, d_thresh, d_k, d_retention, events.initial_profile, False,
                    defaults.cfg),
        label="Skip plan", elem_id="skip-plan")
    page.profile = gr.Dropdown(choices=catalog.choices(defaults.steps), value=events.initial_profile,
                               label="Calibration table (magnitude ratios)", allow_custom_value=True,
                               info="The ratio library (a calibrated table for the job's resolution "
                                    "and steps), or a profile saved by a calibration run "
                                    f"({FITS_MARK.strip()}: made for this job's resolution and steps).",
                               elem_id="profile")
    initial_note = profile_selection(catalog, events.initial_profile)[1]      # names a preselected profile in full
    status = profile_status_html(initial_note, catalog.left_out())
    page.profile_status = gr.HTML(status, visible=bool(status), elem_id="profile-status")
    page.calibrate = gr.Checkbox(value=False, label="Calibrate (measure this model's ratios)",
                                 info="Runs every step (nothing skipped), then saves the averaged "
                                      "ratios as a profile you can select above.",
                                 elem_id="calibrate")


def settings_controls(page: types.SimpleNamespace, defaults: Any) -> None:
    """FramePack's own settings (seed, length, steps, CFG, memory, MP4), and the resampling choice."""
    import gradio as gr

    page.n_prompt = gr.Textbox(label="Negative Prompt", value=defaults.n_prompt, visible=False,
                               max_length=int(LIMITS["n_prompt"].high))
    page.seed = gr.Number(label="Seed", value=defaults.seed, precision=0, elem_id="seed")
    page.seconds = gr.Slider(label="Total Video Length (Seconds)", value=defaults.seconds, elem_id="total-length",
                             **bounds("seconds"))
    page.latent_window_size = gr.Slider(label="Latent Window Size", value=defaults.latent_window_size,
                                        visible=False, **bounds("latent_window_size"))
    page.steps = gr.Slider(label="Steps", value=defaults.steps,
                           info="FramePack's default is 25; the skip plan follows this value.",
                           elem_id="steps", **bounds("steps"))
    page.cfg = gr.Slider(label="CFG Scale", value=defaults.cfg, info=HELP["cfg"], elem_id="cfg", **bounds("cfg"))
    page.gs = gr.Slider(label="Distilled CFG Scale", value=defaults.gs,
                        info="FramePack's default is 10; changing it is rarely useful.", **bounds("gs"))
    page.rs = gr.Slider(label="CFG Re-Scale", value=defaults.rs, visible=False, **bounds("rs"))
    page.gpu_memory_preservation = gr.Slider(
        label="GPU Inference Preserved Memory (GB) (larger means slower)",
        value=defaults.gpu_memory_preservation,
        info="Raise it if you run out of GPU memory; jobs get slower.",
        **bounds("gpu_memory_preservation"))
    page.crf = gr.Slider(label="MP4 Compression", value=defaults.crf,
                         info="Lower is better quality; 0 is lossless. Try 16 if a video comes out black.",
                         **bounds("crf"))
    with gr.Accordion("Advanced", open=False):
        page.resample = gr.Radio(
            choices=[("Magnitude (keeps the table's total change)", "magnitude"),
                     ("Nearest (the MagCache reference's stretch)", "nearest")],
            value=defaults.resample, label="Fit a ratio table to another step count",
            info="Used when the table in use was calibrated for another number of steps.",
            elem_id="resample")


def right_column(page: types.SimpleNamespace, events: AppEvents, forward_sections: bool) -> None:
    """The latent preview, the video, how the variant orders its sections, progress, summary, report, chart."""
    import gradio as gr

    page.preview = gr.Image(label="Next Latents", height=200, visible=False, elem_id="preview")
    page.result_video = gr.Video(label="Finished Frames", autoplay=True, loop=True, height=512,
                                 elem_id="result-video")
    if forward_sections:
        gr.Markdown("F1 generates forward: the video grows from your image onward, one section "
                    "at a time.")
    else:
        gr.Markdown("FramePack samples the sections backwards: the end of the video is made first "
                    "and your image's moment comes last, so early previews show late actions.")
    page.progress = gr.HTML("", elem_id="progress")
    page.summary = gr.Markdown("", elem_id="job-summary")
    with gr.Accordion("Job report (JSON)", open=False):
        page.report = gr.JSON(label="Job report", elem_id="job-report")
    page.ratios_chart = gr.HTML(ratios_chart_html(events.catalog, events.initial_profile), elem_id="ratios-chart")


def compare_panel(page: types.SimpleNamespace) -> None:
    """Hidden until a comparison ran: both videos side by side, the figures, per-frame charts, the JSON."""
    import gradio as gr

    with gr.Column(visible=False, elem_id="compare-panel") as page.compare_panel:
        with gr.Row():
            page.cached_video = gr.Video(label="With the cache", autoplay=True, loop=True, height=256,
                                         elem_id="compare-cached")
            page.uncached_video = gr.Video(label="Without the cache", autoplay=True, loop=True, height=256,
                                           elem_id="compare-uncached")
        page.comparison_summary = gr.Markdown("", elem_id="compare-summary")
        page.comparison_charts = gr.HTML("", elem_id="compare-charts")
        with gr.Accordion("Comparison (JSON)", open=False):
            page.comparison = gr.JSON(label="Comparison", elem_id="compare-json")


def grid_tab(page: types.SimpleNamespace) -> None:
    """The settings grid: which values to try, Run and Stop, then the table, scatter, videos and exports."""
    import gradio as gr

    gr.Markdown("Runs the Generate tab's job (image, prompt, seed and settings) once without the cache, "
                "then once per combination of the values below, and scores each against the uncached "
                "video. Values are separated by commas.")
    with gr.Row():
        page.grid_thresholds = gr.Textbox(label="MagCache thresholds", value="0.06, 0.1, 0.15",
                                          elem_id="grid-thresholds")
        page.grid_ks = gr.Textbox(label="MagCache K values", value="2, 3, 4", elem_id="grid-ks")
        page.grid_retentions = gr.Textbox(label="Retention ratios (optional)", value="0.2",
                                          elem_id="grid-retentions")
    with gr.Row():
        page.grid_button = gr.Button(value="Run grid", variant="primary", elem_id="grid-run")
        page.grid_stop = gr.Button(value="Stop grid", elem_id="grid-stop")
    page.grid_status = gr.Markdown("", elem_id="grid-status")
    page.grid_table = gr.Dataframe(label="Cells", interactive=False, elem_id="grid-table")
    page.grid_scatter = gr.HTML("", elem_id="grid-scatter")
    page.grid_videos = gr.Gallery(label="Each cell's video", columns=4, height=300, elem_id="grid-videos")
    with gr.Row():
        page.grid_csv = gr.File(label="Grid as CSV", elem_id="grid-csv")
        page.grid_json = gr.File(label="Grid as JSON", elem_id="grid-json")


# ---------------------------------------------------------------------------
# The events
# ---------------------------------------------------------------------------

def plan_and_profile_events(page: types.SimpleNamespace, events: AppEvents) -> None:
    """UI-only events (not in the client API): quick prompts, the live plan, presets, profiles and chart."""
    import gradio as gr

    p = page
    p.quick.click(lambda sample: sample[0], inputs=[p.quick], outputs=p.prompt, show_progress="hidden",
                  queue=False, **HIDDEN_API)

    plan_inputs = [p.cache, p.steps, p.magcache_thresh, p.magcache_K, p.retention_ratio, p.profile, p.calibrate,
                   p.cfg, p.resample, p.frame_resolution, p.target_speedup, p.latent_window_size]
    # one listener for every input of the plan, so "always_last" orders them all: when a job's end changes
    # two at once (the new profile, Calibrate unticked), the plan last drawn is computed from both, never
    # an earlier answer that arrived late; raw values (preprocess=False): a number typed beyond a slider's
    # range plans as it will run
    gr.on([control.change for control in plan_inputs], events.plan, inputs=plan_inputs, outputs=p.plan_view,
          show_progress="hidden", queue=False, trigger_mode="always_last", preprocess=False, **HIDDEN_API)

    knobs = [p.magcache_thresh, p.magcache_K, p.retention_ratio]
    p.preset.input(events.apply_preset, inputs=p.preset, outputs=knobs, show_progress="hidden", queue=False,
                   **HIDDEN_API)
    for slider in knobs:
        # raw values (preprocess=False): Gradio would refuse a number typed beyond the slider with an error
        slider.input(events.typed_preset, inputs=knobs, outputs=p.preset, preprocess=False,
                     show_progress="hidden", queue=False, **HIDDEN_API)
    # a target speedup sets the three knobs (again when the table it plans on changes); setting a knob
    # or a preset by hand clears the target
    target_inputs = [p.target_speedup, p.steps, p.profile, p.resample, p.frame_resolution, p.latent_window_size]
    gr.on([p.target_speedup.input, *(control.change for control in target_inputs[1:])], events.apply_target,
          inputs=target_inputs, outputs=[*knobs, p.preset], preprocess=False, show_progress="hidden", queue=False,
          trigger_mode="always_last", **HIDDEN_API)
    for control in (*knobs, p.preset):
        control.input(lambda: None, outputs=p.target_speedup, show_progress="hidden", queue=False, **HIDDEN_API)

    chart_inputs = [p.profile, p.steps, p.resample, p.frame_resolution]
    p.profile.input(events.select_profile, inputs=chart_inputs, outputs=[p.profile, p.profile_status, p.ratios_chart],
                    preprocess=False, show_progress="hidden", concurrency_limit=None, **HIDDEN_API)
    for control in (p.steps, p.resample, p.frame_resolution):
        control.change(events.chart_for, inputs=chart_inputs, outputs=p.ratios_chart, preprocess=False,
                       show_progress="hidden", queue=False, trigger_mode="always_last", **HIDDEN_API)

    # a new upload: the frames' resolution, which picks the table the job plans from (the plan panel
    # and chart follow it); an upload that is not an image arrives as UnreadableImage: no resolution
    p.input_image.change(events.frame_resolution_of, inputs=p.input_image, outputs=p.frame_resolution,
                         show_progress="hidden", queue=False, **HIDDEN_API)
    for control in (p.steps, p.frame_resolution):
        # raw values (preprocess=False): a steps value typed beyond the slider is not an error here
        control.change(events.profiles_for, inputs=[p.steps, p.frame_resolution], outputs=p.profile,
                       preprocess=False, show_progress="hidden", queue=False, trigger_mode="always_last",
                       **HIDDEN_API)


def start_and_end_events(page: types.SimpleNamespace, events: AppEvents, demo: gr.Blocks) -> None:
    """Start (clamp the typed values, then the /generate job as :func:`job_chain` runs one), End, /end, load."""
    import gradio as gr

    p = page
    job_inputs = [p.input_image, p.prompt, p.n_prompt, p.seed, p.seconds, p.latent_window_size,
                  p.steps, p.cfg, p.gs, p.rs, p.gpu_memory_preservation, p.cache, p.magcache_thresh, p.magcache_K,
                  p.retention_ratio, p.profile, p.calibrate, p.crf, p.resample, p.target_speedup, p.session]
    clamped_controls = [getattr(p, name) for name in CLAMPED_NAMES]
    for control in (p.seed, p.seconds, p.latent_window_size, p.steps, p.cfg, p.gs, p.rs, p.gpu_memory_preservation,
                    p.cache, p.magcache_thresh, p.magcache_K, p.retention_ratio, p.calibrate, p.crf, p.resample,
                    p.target_speedup):
        raw_when_refused(control)     # the job moves a number into range, or refuses a value, in one line
    # raw values (preprocess=False): Gradio 6 would refuse a typed 500 before we could clamp it
    clamped = p.start_button.click(
        events.clamp_at_start, inputs=[*clamped_controls, p.cache, p.profile, p.calibrate, p.resample,
                                       p.frame_resolution, p.target_speedup],
        outputs=[*clamped_controls, p.preset, p.plan_view], preprocess=False, queue=False, **HIDDEN_API)
    job_chain(p, events, clamped.then, generate_endpoint(events), job_inputs,
              [p.result_video, p.report, p.summary, p.preview, p.progress], "generate")
    p.end_button.click(events.stop, inputs=p.session, outputs=None, queue=False, **HIDDEN_API)
    # the same End for API clients: `client.predict(api_name="/end")` from the Client that started the job
    # (its session); the hidden button only gives the endpoint a place in the page
    end_api_button = gr.Button(visible=False)
    end_api_button.click(events.end_api, inputs=p.session, outputs=gr.Checkbox(visible=False), queue=False,
                         api_name="end")
    # every new page lists the profiles folder as it is now (profiles saved or copied in since start)
    demo.load(events.load_page, inputs=None, outputs=[p.profile, p.profile_status], queue=False, **HIDDEN_API)


def job_chain(page: types.SimpleNamespace, events: AppEvents, then: Any, action: Any, inputs: list[Any],
              outputs: list[Any], api_name: str) -> None:
    """What every button that runs a job does, after ``then`` (an event's ``.then`` or a button's ``.click``).

    Arm the session (Start off, End on, the other job buttons off), run ``action``
    as the named endpoint ``api_name`` in the GPU's queue, then restore the page as
    after any job (a profile it saved selected, the buttons back on).
    """
    p = page
    others = [p.compare_button, p.render_button, p.grid_button]
    (then(events.arm, inputs=p.session, outputs=[p.start_button, p.end_button], queue=False, **HIDDEN_API)
     .then(job_buttons(False), outputs=others, queue=False, **HIDDEN_API)
     .then(action, inputs=inputs, outputs=outputs, api_name=api_name, concurrency_limit=events.concurrency,
           concurrency_id="gpu", show_progress="minimal")
     .then(events.after_job, inputs=[p.session, p.profile, p.steps, p.frame_resolution],
           outputs=[p.start_button, p.end_button, p.profile, p.ratios_chart, p.preview, p.profile_status,
                    p.calibrate],
           queue=False, **HIDDEN_API)
     .then(job_buttons(True), outputs=others, queue=False, **HIDDEN_API))


def job_buttons(interactive: bool) -> Any:
    """A handler that turns Compare, Render without cache and Run grid on or off (off while a job runs)."""
    import gradio as gr

    return lambda: (gr.update(interactive=interactive),) * 3


def rerun_events(page: types.SimpleNamespace, events: AppEvents) -> None:
    """Compare with no cache (/compare) and Render without cache (/render_without_cache): the last
    finished job with the cache Off, run as any job is (:func:`job_chain`)."""
    p = page
    rerun = RerunEvents(events)
    job_outputs = [p.result_video, p.report, p.summary, p.preview, p.progress]
    compare_outputs = [p.compare_panel, p.cached_video, p.uncached_video, p.comparison_summary,
                       p.comparison_charts, p.comparison]
    job_chain(p, events, p.compare_button.click, rerun.compare, [p.session], job_outputs + compare_outputs,
              "compare")
    job_chain(p, events, p.render_button.click, rerun.render_without_cache, [p.session], job_outputs,
              "render_without_cache")


def grid_events(page: types.SimpleNamespace, events: AppEvents) -> None:
    """Run grid (/grid) on the Generate tab's job (:func:`job_chain`); Stop grid is End for this session."""
    p = page
    inputs = [p.input_image, p.prompt, p.n_prompt, p.seed, p.seconds, p.latent_window_size, p.steps, p.cfg, p.gs,
              p.rs, p.gpu_memory_preservation, p.profile, p.crf, p.resample, p.grid_thresholds, p.grid_ks,
              p.grid_retentions, p.session]
    job_chain(p, events, p.grid_button.click, grid_endpoint(GridEvents(events)), inputs,
              [p.grid_status, p.grid_table, p.grid_scatter, p.grid_videos, p.grid_csv, p.grid_json], "grid")
    p.grid_stop.click(events.stop, inputs=p.session, outputs=None, queue=False, **HIDDEN_API)
