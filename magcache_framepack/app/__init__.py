"""The Gradio app behind magcache_demo_gradio.py and magcache_demo_gradio_f1.py (being split into modules)."""

from magcache_framepack.app.handlers import (  # noqa: F401 - the names other code imports from here
    APP_DIR, CUSTOM_PRESET, GENERATE_OUTPUTS, QUICK_PROMPTS, Job, ProfileCatalog, SessionJobs, StepClock,
    _run_job_thread, build_parser, build_ui, eta_seconds, format_duration, image_frame_resolution, launch, main,
    plan_panel_html, preset_for, preset_values, profile_selection, skip_plan_text, video_path_from_output)
