"""The Gradio app behind magcache_demo_gradio.py (FramePack) and magcache_demo_gradio_f1.py (F1).

It keeps the page FramePack users know (image, prompt, quick prompts, Start/End,
settings on the left; video, latent preview and progress on the right) and adds
MagCache: cache choice, presets, the three MagCache knobs, the calibration table
in use, a calibration run, and a live skip plan computed by the same function
the run uses (:func:`magcache_core.skip_schedule`), so the plan shown is the
plan run.

Design notes, because they are easy to undo by accident:

* Importing this module does no work: no argv, no models, no server, no CUDA.
  ``main()`` does all of that.  gradio and magcache_pipeline are imported inside
  the functions that need them, because both pull in huggingface_hub, which
  reads ``HF_HOME`` once, at import; ``main()`` must set it first.
* Every browser session owns its job.  A :class:`SessionJobs` lives in a
  ``gr.State`` (one per session; it deep-copies to a fresh, empty instance), and
  each job is a :class:`Job` with its own worker thread, stop flag and event
  queue.  Nothing that belongs to a job is module-level, so a second tab never
  sees the first tab's frames and its End button cannot stop the first tab's job.
* One GPU, one job: the generate event has ``concurrency_limit=1`` (later Starts
  wait in Gradio's queue), and a lock created per app guards ``run_job`` in case
  a job's worker outlives its generator.
* Gradio 5 and 6 both work: no Blocks(css/theme) (moved to launch() in 6), no
  per-component options that 6 removed, ``api_name=False`` for UI-only events.

The client API, two endpoints::

    from gradio_client import Client, handle_file
    video, report, summary, preview, progress = Client(url).predict(
        input_image=handle_file("in.png"), prompt="...", api_name="/generate",
        steps=25, magcache_thresh=0.10, ...)            # every input but input_image is optional
    client.predict(api_name="/end")   # End: stops the job this Client started (True if one ran)

Inputs (defaults as in the UI): input_image, prompt, n_prompt, seed,
total_second_length, latent_window_size, steps, cfg, gs, rs,
gpu_memory_preservation, cache ("magcache" | "teacache" | "off"),
magcache_thresh, magcache_K, retention_ratio, mag_ratios ("library", the
default, or the file name of a profile in the profiles folder; "published" is
read as "library"), calibrate, mp4_crf, resample ("magnitude" | "nearest").
Numbers are moved into ``LIMITS`` before the job runs (Gradio 6
refuses an API value beyond a slider's range itself), and the report's
``settings`` and ``plan`` say what ran.
Outputs, in :data:`GENERATE_OUTPUTS` order: the final MP4 (a path with
gradio_client 2.x, ``{"video": path, "subtitles": None}`` with 1.x;
:func:`video_path_from_output` takes either), the job report (a dict, see
:func:`job_report`: status "done" | "stopped" | "error", message, per-section
computed/skipped step indices and seconds, total seconds, saved profile), the
summary (Markdown), the preview (None at the end) and the progress HTML ("" at
the end).  A job that fails (no image, an unreadable image file, bad settings,
refused profile, CUDA out of memory) does not raise: its report says "error"
and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import ipaddress
import logging
import math
import os
import pathlib
import queue
import re
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import magcache_core

if TYPE_CHECKING:  # imported for annotations only; see the module docstring
    import gradio as gr
    import numpy as np

logger = logging.getLogger(__name__)

APP_DIR = pathlib.Path(__file__).resolve().parents[2]    # the checkout the package sits in, beside the demos

LIBRARY = "library"              # profile-dropdown value of the ratio library (a table per job)
PUBLISHED = "published"          # the value older clients send for the same thing
CUSTOM_PRESET = "Custom"
CACHE_CHOICES: list[tuple[str, str]] = [("MagCache", "magcache"), ("TeaCache", "teacache"), ("Off", "off")]
CACHE_LABELS = {value: label for label, value in CACHE_CHOICES}

# What `Client.predict(..., api_name="/generate")` returns, in this order.
GENERATE_OUTPUTS = ("video", "report", "summary", "preview", "progress")

QUICK_PROMPTS = (
    "The person turns toward the camera and smiles, hair moving softly in a light breeze.",
    "Someone waves at the viewer, then laughs and claps twice.",
    "A slow, calm camera push-in while the subject breathes and blinks.",
)

HELP = {
    "thresh": "Error budget before a step must be computed. Higher = faster; lower = closer to the uncached video.",
    "K": "Most steps in a row that may be skipped. Higher = faster; lower = closer to the uncached video.",
    "retention": "Fraction of the first steps that always run exactly (they set the layout of the video). "
                 "Lower = faster; higher = closer to the uncached video.",
    "cfg": "Real CFG. Above 1 the transformer runs twice per step (with and without the prompt), so a job "
           "takes about twice as long; the MagCache plan applies to both branches. FramePack keeps it at 1.",
}


# ---------------------------------------------------------------------------
# Pure helpers: presets, skip plan, profiles, charts, reports
# ---------------------------------------------------------------------------

def preset_values(name: str) -> tuple[float, int, float]:
    """(magcache_thresh, magcache_K, retention_ratio) of a named preset."""
    if name not in magcache_core.PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(magcache_core.PRESETS)}")
    return magcache_core.PRESETS[name]


def preset_for(magcache_thresh: float, magcache_K: float, retention_ratio: float) -> str:
    """The preset these slider values are, or ``"Custom"``."""
    for name, (thresh, k, retention) in magcache_core.PRESETS.items():
        if (abs(float(magcache_thresh) - thresh) < 1e-6 and int(round(float(magcache_K))) == k
                and abs(float(retention_ratio) - retention) < 1e-6):
            return name
    return CUSTOM_PRESET


@dataclasses.dataclass(frozen=True)
class SkipPlan:
    """One section's plan: ``skipped[t]`` is True when step t reuses the cached residual."""

    skipped: tuple[bool, ...]
    branches: int = 1    # transformer passes per computed step: 2 when real CFG > 1

    @property
    def steps(self) -> int:
        return len(self.skipped)

    @property
    def computed(self) -> int:
        return self.skipped.count(False)

    @property
    def passes(self) -> int:
        return self.computed * self.branches

    @property
    def total_passes(self) -> int:
        return self.steps * self.branches

    @property
    def speedup(self) -> float:
        # A skipped step costs almost nothing next to a transformer pass; "about" says so.
        return self.steps / self.computed if self.computed else float("inf")

    def text(self) -> str:
        return (f"{self.passes} of {self.total_passes} transformer passes, "
                f"about {self.speedup:.2f}x faster")


def skip_plan(mag_ratios: Sequence[float], steps: int, magcache_thresh: float, magcache_K: int,
              retention_ratio: float, cfg: float = 1.0, resample: str = "magnitude") -> SkipPlan:
    """The plan a MagCache job with these settings runs in every section.

    Only :func:`magcache_core.skip_schedule` decides; this adds the CFG branch count.
    """
    plan = magcache_core.skip_schedule(mag_ratios, int(steps), float(magcache_thresh),
                                       int(round(float(magcache_K))), float(retention_ratio), resample)
    return SkipPlan(tuple(plan), branches=2 if float(cfg) > 1.0 else 1)


def skip_plan_text(mag_ratios: Sequence[float], steps: int, magcache_thresh: float, magcache_K: int,
                   retention_ratio: float, cfg: float = 1.0) -> str:
    """``"N of M transformer passes, about X.XXx faster"`` for one section."""
    return skip_plan(mag_ratios, steps, magcache_thresh, magcache_K, retention_ratio, cfg).text()


def skip_plan_html(plan: SkipPlan) -> str:
    """A strip with one cell per step (computed: dark, skipped: light) and the pass count."""
    cells = []
    for t, skipped in enumerate(plan.skipped):
        what = "skipped: reuses the cached residual" if skipped else "computed"
        style = ("background:#e5e7eb;color:#6b7280;border:1px dashed #9ca3af;" if skipped
                 else "background:#2563eb;color:#fff;border:1px solid #1d4ed8;")
        cells.append(
            f'<div class="mc-step {"mc-skip" if skipped else "mc-run"}" title="step {t}: {what}" '
            f'style="{style}min-width:1.7em;padding:2px 0;text-align:center;font:11px/1.4 monospace;'
            f'border-radius:3px">{t}</div>')
    branches = (" (real CFG &gt; 1: two passes per step; the plan applies to both)"
                if plan.branches > 1 else "")
    return (
        '<div class="mc-plan">'
        '<div style="display:flex;flex-wrap:wrap;gap:2px;margin-bottom:4px">' + "".join(cells) + "</div>"
        f'<div class="mc-plan-summary"><b>{html.escape(plan.text())}</b> per section{branches}.</div>'
        '<div style="font-size:12px;opacity:.8"><span style="color:#2563eb">&#9632;</span> computed '
        '&nbsp;<span style="color:#9ca3af">&#9633;</span> skipped (cached residual reused); '
        'numbers are step indices, as in the job report.</div>'
        "</div>")


def _message_html(text: str) -> str:
    return f'<div class="mc-plan"><div class="mc-plan-summary">{html.escape(text)}</div></div>'


_PROFILE_NAME = re.compile(r"^[\w][\w.\-]*\.json$")


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
        """(usable profiles, {reason: count} of the files left out)."""
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
            if prof.variant != self.variant:
                reason = f"calibrated for {prof.variant}"
            elif self.model is not None and prof.model is not None and prof.model != self.model:
                reason = f"measured on {prof.model}"
            else:
                usable.append((path, prof))
                continue
            left[reason] = left.get(reason, 0) + 1
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

        first = [(self._label(path, prof, True), self.choice_for(path))
                 for path, prof in usable if steps is not None and fits(prof)]
        rest = [(self._label(path, prof, False), self.choice_for(path))
                for path, prof in usable if not (steps is not None and fits(prof))]
        return first + [(self._library_label(), LIBRARY)] + rest

    def _library_label(self) -> str:
        return f"Ratio library ({self.variant}: the table for each job's resolution and steps)"

    @staticmethod
    def _label(path: pathlib.Path, prof: magcache_core.MagCacheProfile, for_this_job: bool) -> str:
        where = f"{prof.resolution} px, " if prof.resolution else ""
        made = "made for this job: " if for_this_job else ""
        return f"{path.name} ({made}{where}{prof.num_steps} steps, {prof.created})"

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
        if choice.endswith(")") and " (" in choice:
            for path, prof in self._scan()[0]:
                if choice in (self._label(path, prof, True), self._label(path, prof, False)):
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

    def table(self, choice: str | None, steps: int, resample: str = "magnitude",
              resolution: float | None = None) -> tuple[list[float], str]:
        """(ratios, where they come from) that a job of ``steps`` plans from with this choice.

        ``resolution``: the job's frame resolution ((height + width) / 2), else this app's.
        """
        profile = self.load(choice)
        if profile is None:
            return magcache_core.library_ratios(self.variant, resolution or self.resolution, int(steps), resample)
        return list(profile.ratios), f"your profile {self.choice_for(self.path_for(choice))}"


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


def profile_status_html(catalog: ProfileCatalog, note: str = "") -> str:
    """The line under the profile dropdown: ``note`` (the selected profile in full, or why it was
    refused; ``**bold**`` allowed) and how many files were left out, and why."""
    parts = [html.escape(part, quote=False) for part in (note, catalog.left_out()) if part]
    if not parts:
        return ""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", "<br>".join(parts))
    return f'<div class="mc-profile-status" style="padding:4px 12px;font-size:13px">{text}</div>'


def plan_panel_html(catalog: ProfileCatalog, cache: str, steps: float, magcache_thresh: float,
                    magcache_K: float, retention_ratio: float, profile_choice: str | None,
                    calibrate: bool, cfg: float = 1.0, resample: str = "magnitude",
                    resolution: float | None = None) -> str:
    """The live skip-plan panel for the current settings, and the table it comes from (never raises).

    ``resolution`` is the job's frame resolution, (height + width) / 2 of the bucket its image gets
    (:func:`image_frame_resolution`); None before an image is known: the app's default frames.
    """
    if cache == "teacache":
        return _message_html("TeaCache decides while it runs which steps to skip, so no MagCache plan "
                             "applies; choose MagCache to see one.")
    if cache == "off":
        return _message_html(f"Cache off: all {int(steps)} steps run the transformer; no MagCache plan applies.")
    if calibrate:
        return _message_html(f"Calibration run: all {int(steps)} steps are computed (nothing skipped) while "
                             "the magnitude ratios are measured.")
    try:
        ratios, source = catalog.table(profile_choice, int(steps), resample, resolution)
        plan = skip_plan(ratios, int(steps), magcache_thresh, magcache_K, retention_ratio, cfg, resample)
    except ValueError as exc:
        return _message_html(f"No plan: {exc}")
    frames = (f"your image's {resolution:g} px frames" if resolution else
              f"this app's {catalog.resolution:g} px frames (before an image is given)")
    why = ("chosen by you" if catalog.path_for(profile_choice) is not None else
           f"the library's nearest calibration to {frames} and {int(steps)} steps")
    return skip_plan_html(plan) + (f'<div class="mc-table" style="font-size:12px;margin-top:2px">'
                                   f'Ratio table: {html.escape(source)} ({html.escape(why)}).</div>')


def ratios_chart_svg(series: Sequence[tuple[str, Sequence[float], str]], title: str,
                     width: int = 460, height: int = 220) -> str:
    """A small inline SVG line chart of magnitude ratios per step (no plotting library needed)."""
    series = [(name, [float(v) for v in values], color) for name, values, color in series if values]
    if not series:
        return ""
    title_lines = textwrap.wrap(title, width=max(20, (width - 20) // 6)) or [""]   # ~6 px per character
    # the title, then one legend line per series, then the plot: nothing drawn over the curves
    legend_top = 14 + 14 * len(title_lines)
    left, right, top, bottom = 44, 10, legend_top + 14 * len(series) + 2, 30
    height += top - 26          # the plot keeps its height however long the title and legend
    lo = min(min(v) for _, v, _ in series)
    hi = max(max(v) for _, v, _ in series)
    pad = max((hi - lo) * 0.08, 0.01)
    lo, hi = lo - pad, hi + pad
    n_max = max(len(v) for _, v, _ in series)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(step: float) -> float:
        return left + (plot_w * step / (n_max - 1) if n_max > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (hi - v) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
             f'style="max-width:{width}px;font:11px sans-serif" role="img" aria-label="{html.escape(title)}">',
             *(f'<text x="4" y="{14 + 14 * i}" font-weight="bold">{html.escape(line)}</text>'
               for i, line in enumerate(title_lines)),
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9ca3af"/>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i in range(0, n_max, 5 if n_max > 12 else 1):
        parts.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle">step</text>')
    if lo < 1.0 < hi:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(1.0):.1f}" y2="{y(1.0):.1f}" '
                     'stroke="#6b7280" stroke-dasharray="3 3"/>')
    for k, (name, values, color) in enumerate(series):
        # a table of another length is stretched over the same step axis (0 .. last step)
        scale = (n_max - 1) / (len(values) - 1) if len(values) > 1 else 0.0
        pts = " ".join(f"{x(i * scale):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        lx = left + 8
        ly = legend_top + 10 + 14 * k
        parts.append(f'<line x1="{lx}" x2="{lx + 16}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{lx + 20}" y="{ly}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def ratios_chart_html(catalog: ProfileCatalog, profile_choice: str | None, steps: int = 25,
                      resample: str = "magnitude", resolution: float | None = None) -> str:
    """Chart of the ratio table in use, next to the published one."""
    published = list(magcache_core.VARIANT_MAG_RATIOS[catalog.variant])
    try:
        ratios, source = catalog.table(profile_choice, steps, resample, resolution)
    except ValueError:
        ratios, source = catalog.table(LIBRARY, steps, resample, resolution)
    series = [(f"published ({catalog.variant}, 25 steps)", published, "#9ca3af"),
              ("in use", ratios, "#dc2626")]
    return ratios_chart_svg(series, f"Ratios in use: {source}")


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eta_seconds(skipped: Sequence[bool], sections_total: int, section: int, steps_done: int,
                seconds_per_computed_step: float, seconds_per_section_overhead: float) -> float:
    """Seconds left in a job whose plan is known.

    A skipped step costs next to nothing, so only the computed steps still to
    come count: those after ``steps_done`` in the current section and every
    computed step of the sections after it, each at the measured seconds per
    computed step, plus the measured per-section overhead (decode, MP4) for the
    current and every later section.
    """
    per_section = sum(1 for s in skipped if not s)
    left_here = sum(1 for s in skipped[steps_done:] if not s)
    later = max(0, sections_total - section - 1)
    return ((left_here + later * per_section) * seconds_per_computed_step
            + (later + 1) * seconds_per_section_overhead)


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


def progress_html(percent: float, label: str) -> str:
    percent = max(0.0, min(100.0, float(percent)))
    return (
        '<div class="mc-progress">'
        f'<div style="font-size:13px;margin-bottom:3px">{html.escape(label)}</div>'
        '<div style="background:#e5e7eb;border-radius:4px;height:10px;overflow:hidden">'
        f'<div style="background:#2563eb;height:100%;width:{percent:.1f}%"></div></div></div>')


def section_dict(section: Any) -> dict[str, Any]:
    return {
        "index": section.index,
        "total": section.total,
        "computed_steps": list(section.computed_steps),
        "skipped_steps": list(section.skipped_steps),
        "seconds": round(float(section.seconds), 3),
        "frames": section.frames,
        "video": section.video_path,
    }


def job_report(result: Any | None, sections: Sequence[Any], *, status: str, message: str,
               settings: Any | None, variant: str, profile_choice: str | None,
               plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The machine-readable job report shown in the UI and returned to API clients.

    ``sections[i]["skipped_steps"]`` are the step indices (from 0) that MagCache
    skipped in the i-th section generated; ``status`` is "running", "done",
    "stopped" or "error" and ``message`` says why.  ``settings`` are the values
    the job ran with (after clamping into the limits) and ``plan`` the skip plan
    and ratio table it planned from.
    """
    fields = ("cache", "steps", "magcache_thresh", "magcache_K", "retention_ratio", "calibrate", "resample")
    report: dict[str, Any] = {
        "status": status,
        "message": message,
        "variant": variant,
        "video": None,
        "seconds": None,
        **{name: getattr(settings, name, None) for name in fields},
        "mag_ratios": profile_choice or LIBRARY,
        "settings": dataclasses.asdict(settings) if settings is not None else None,
        "plan": plan,
        "sections": [section_dict(s) for s in sections],
        "profile": None,
        "summary": [],
    }
    if result is not None:
        report.update(video=result.video_path, seconds=round(float(result.seconds), 3),
                      profile=result.profile_path, summary=list(result.summary_lines()))
    return report


def video_path_from_output(value: Any) -> str | None:
    """The file path in a video output as gradio_client returns it.

    gradio_client 1.x (Gradio 5) returns ``{"video": path, "subtitles": None}``;
    2.x (Gradio 6) returns the path itself.
    """
    if isinstance(value, dict):
        value = value.get("video")
        if isinstance(value, dict):   # a FileData dict
            value = value.get("path")
    return str(value) if value else None


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


# ---------------------------------------------------------------------------
# Jobs and sessions
# ---------------------------------------------------------------------------

class Job:
    """One generation: its worker thread, stop flag and event queue belong to it alone.

    ``image_path`` is the uploaded file the image was read from (the video's record names it).
    """

    def __init__(self) -> None:
        self.image_path: str | None = None
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
        with self._lock:
            if self.current is job:
                self.current = None
            self.unshown_result = result

    def take_result(self) -> Any | None:
        with self._lock:
            result, self.unshown_result = self.unshown_result, None
            return result


def _run_job_thread(job: Job, gpu_lock: threading.Lock, models: Any, image: np.ndarray, settings: Any,
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
                should_stop=job.stop.is_set, profiles_dir=profiles_dir, image_path=job.image_path)
        finally:
            gpu_lock.release()
    except Exception as exc:  # noqa: BLE001 - a worker must report every failure, or the page waits forever
        logger.exception("job failed unexpectedly")
        result = JobResult(
            status="error", message=f"Unexpected error: {type(exc).__name__}: {exc}", video_path=None,
            sections=[], seconds=time.perf_counter() - started, profile_path=None, calibration=None)
    finally:
        job.events.put(("done", result))


# ---------------------------------------------------------------------------
# The UI
# ---------------------------------------------------------------------------

def _hidden_api() -> dict[str, Any]:
    """Keyword arguments that keep a UI-only event out of the client API (Gradio 5 and 6)."""
    return {"api_name": False}


def build_ui(models: Any, variant: str, *, outputs_dir: str | os.PathLike[str] = "outputs",
             profiles_dir: str | os.PathLike[str] = "magcache_profiles",
             mag_ratios: str | os.PathLike[str] | None = None, tiny: bool | None = None,
             runner: Any | None = None) -> gr.Blocks:
    """Build the app for loaded ``models``; the caller launches it (see :func:`launch`).

    ``mag_ratios`` preselects a saved profile (ValueError if it is refused).
    ``runner(job, image, settings, outputs_dir, profiles_dir)`` runs a job in its
    thread with :func:`_run_job_thread`'s contract; None runs it on ``models`` in
    this process (one job at a time), ``magcache_ray.AppRunner`` on Ray workers
    (``runner.concurrency`` jobs at once).
    """
    import gradio as gr

    from magcache_framepack.settings import JobSettings, LIMITS, bucket_resolution, section_count
    from magcache_framepack.job import find_bucket, read_image
    from magcache_framepack.models import VARIANTS, model_id

    spec = VARIANTS[variant]
    tiny = bool(getattr(models, "tiny", False)) if tiny is None else tiny
    outputs_dir = str(pathlib.Path(outputs_dir).resolve())
    profiles_dir = str(pathlib.Path(profiles_dir).resolve())
    defaults = JobSettings(prompt="")
    # a job's frames are a bucket of this resolution; the page plans with (height + width) / 2 of the
    # uploaded image's bucket, as the job does, and with this resolution before an image is given
    bucket_res = bucket_resolution(defaults.resolution, tiny)
    catalog = ProfileCatalog(variant, profiles_dir, extra=mag_ratios,
                             model=model_id(variant, tiny), resolution=bucket_res)
    initial_profile = LIBRARY
    if mag_ratios:
        initial_profile = catalog.choice_for(mag_ratios)
        catalog.load(initial_profile)           # refuse a bad --mag-ratios file now, not mid-job
    initial_note = profile_selection(catalog, initial_profile)[1]      # names a preselected profile in full
    gpu_lock = threading.Lock()
    if runner is None:
        def runner(job: Job, image: Any, settings: Any, outputs: str, profiles: str) -> None:
            _run_job_thread(job, gpu_lock, models, image, settings, outputs, profiles)
    concurrency = int(getattr(runner, "concurrency", 1))
    d_thresh, d_k, d_retention = preset_values(magcache_core.DEFAULT_PRESET)
    limits = LIMITS

    def bounds(name: str) -> dict[str, Any]:
        """A slider's minimum, maximum and step: the pipeline's limits, the same the API and CLI use."""
        limit = limits[name]
        return {"minimum": limit.low, "maximum": limit.high, "step": limit.step}

    def plan(cache, steps, thresh, k, retention, profile, calibrate, cfg, resample="magnitude", resolution=None):
        """The plan panel for the values as a job would run them (typed values clamped into the limits).

        ``resolution``: the frame resolution of the uploaded image's bucket (None before one is given).
        """
        try:
            steps, thresh, k, retention, cfg = (limits[name].clamp(float(value)) for name, value in (
                ("steps", steps), ("magcache_thresh", thresh), ("magcache_K", k),
                ("retention_ratio", retention), ("cfg", cfg)))
        except (TypeError, ValueError, OverflowError):
            return _message_html("No plan: a MagCache setting is not a number.")
        return plan_panel_html(catalog, cache, steps, thresh, k, retention, profile, calibrate, cfg, resample,
                               _resolution(resolution))

    def _steps(value: Any) -> int:
        """A step count as a job runs it (raw slider value clamped; the default if not a number)."""
        try:
            return int(limits["steps"].clamp(float(value)))
        except (TypeError, ValueError, OverflowError):
            return defaults.steps

    def _resolution(value: Any) -> float | None:
        """A frame resolution from the hidden number (raw: None, "" or a number)."""
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if value > 0 else None

    with gr.Blocks(title=f"{spec.title} + MagCache", analytics_enabled=False) as demo:
        session = gr.State(SessionJobs())
        gr.Markdown(f"# {spec.title} with MagCache")
        if tiny:
            gr.Markdown(
                "**Tiny test mode:** every model here has tiny *random* weights, nothing was downloaded, "
                "and the video is noise. Use it to try the app and its cache settings without a GPU; "
                "run without `--tiny` on an NVIDIA GPU for real videos.", elem_id="tiny-banner")
        with gr.Row():
            with gr.Column():
                # a file path (image_mode=None: the upload itself, not a re-encoded copy): the job reads it
                # with read_image, and the video's record names the user's file
                input_image = checked_image(gr.Image(sources=["upload"], type="filepath", image_mode=None,
                                                     label="Image", height=320, elem_id="input-image"))
                # (height + width) / 2 of the frames the uploaded image will get: picks the library's table
                frame_resolution = gr.Number(value=None, visible=False, elem_id="frame-resolution")
                prompt = gr.Textbox(label="Prompt", value="", elem_id="prompt")
                quick = gr.Dataset(samples=[[p] for p in QUICK_PROMPTS], label="Quick List",
                                   samples_per_page=1000, components=[prompt])
                with gr.Row():
                    start_button = gr.Button(value="Start Generation", variant="primary", elem_id="start")
                    end_button = gr.Button(value="End Generation", interactive=False, elem_id="end")

                with gr.Group():
                    cache = gr.Radio(choices=CACHE_CHOICES, value="magcache", label="Cache",
                                     info="MagCache skips transformer passes by a plan fixed in advance; "
                                          "TeaCache is FramePack's own cache; Off computes every step.",
                                     elem_id="cache")
                    preset = gr.Radio(choices=[*magcache_core.PRESETS, CUSTOM_PRESET],
                                      value=magcache_core.DEFAULT_PRESET, label="MagCache preset",
                                      info="E = error threshold, K = max skips in a row, R = retention.",
                                      elem_id="preset")
                    magcache_thresh = gr.Slider(label="MagCache threshold", value=d_thresh, info=HELP["thresh"],
                                                elem_id="magcache-thresh", **bounds("magcache_thresh"))
                    magcache_K = gr.Slider(label="MagCache K", value=d_k, info=HELP["K"], elem_id="magcache-k",
                                           **bounds("magcache_K"))
                    # retention stays below 1 (1 would mean "compute every step": use Cache Off)
                    retention_ratio = gr.Slider(label="Retention ratio", value=d_retention, info=HELP["retention"],
                                                elem_id="retention", **bounds("retention_ratio"))
                    plan_view = gr.HTML(
                        plan("magcache", defaults.steps, d_thresh, d_k, d_retention, initial_profile, False,
                             defaults.cfg),
                        label="Skip plan", elem_id="skip-plan")
                    profile = gr.Dropdown(choices=catalog.choices(defaults.steps), value=initial_profile,
                                          label="Calibration table (magnitude ratios)", allow_custom_value=True,
                                          info="The ratio library (a calibrated table for the job's resolution "
                                               "and steps), or a profile saved by a calibration run.",
                                          elem_id="profile")
                    profile_status = gr.HTML(profile_status_html(catalog, initial_note), elem_id="profile-status")
                    calibrate = gr.Checkbox(value=False, label="Calibrate (measure this model's ratios)",
                                            info="Runs every step (nothing skipped), then saves the averaged "
                                                 "ratios as a profile you can select above.",
                                            elem_id="calibrate")

                n_prompt = gr.Textbox(label="Negative Prompt", value=defaults.n_prompt, visible=False)
                seed = gr.Number(label="Seed", value=defaults.seed, precision=0, elem_id="seed")
                total_second_length = gr.Slider(label="Total Video Length (Seconds)",
                                                value=defaults.total_second_length, elem_id="total-length",
                                                **bounds("total_second_length"))
                latent_window_size = gr.Slider(label="Latent Window Size", value=defaults.latent_window_size,
                                               visible=False, **bounds("latent_window_size"))
                steps = gr.Slider(label="Steps", value=defaults.steps,
                                  info="FramePack's default is 25; the skip plan follows this value.",
                                  elem_id="steps", **bounds("steps"))
                cfg = gr.Slider(label="CFG Scale", value=defaults.cfg, info=HELP["cfg"], elem_id="cfg",
                                **bounds("cfg"))
                gs = gr.Slider(label="Distilled CFG Scale", value=defaults.gs,
                               info="FramePack's default is 10; changing it is rarely useful.", **bounds("gs"))
                rs = gr.Slider(label="CFG Re-Scale", value=defaults.rs, visible=False, **bounds("rs"))
                gpu_memory_preservation = gr.Slider(
                    label="GPU Inference Preserved Memory (GB) (larger means slower)",
                    value=defaults.gpu_memory_preservation,
                    info="Raise it if you run out of GPU memory; jobs get slower.",
                    **bounds("gpu_memory_preservation"))
                mp4_crf = gr.Slider(label="MP4 Compression", value=defaults.mp4_crf,
                                    info="Lower is better quality; 0 is lossless. Try 16 if a video "
                                         "comes out black.", **bounds("mp4_crf"))
                with gr.Accordion("Advanced", open=False):
                    resample = gr.Radio(
                        choices=[("Magnitude (keeps the table's total change)", "magnitude"),
                                 ("Nearest (the MagCache reference's stretch)", "nearest")],
                        value=defaults.resample, label="Fit a ratio table to another step count",
                        info="Used when the table in use was calibrated for another number of steps.",
                        elem_id="resample")

            with gr.Column():
                preview = gr.Image(label="Next Latents", height=200, visible=False, elem_id="preview")
                result_video = gr.Video(label="Finished Frames", autoplay=True, loop=True, height=512,
                                        elem_id="result-video")
                if spec.forward_sections:
                    gr.Markdown("F1 generates forward: the video grows from your image onward, one section "
                                "at a time.")
                else:
                    gr.Markdown("FramePack samples the sections backwards: the end of the video is made first "
                                "and your image's moment comes last, so early previews show late actions.")
                progress = gr.HTML("", elem_id="progress")
                summary = gr.Markdown("", elem_id="job-summary")
                with gr.Accordion("Job report (JSON)", open=False):
                    report = gr.JSON(label="Job report", elem_id="job-report")
                ratios_chart = gr.HTML(ratios_chart_html(catalog, initial_profile), elem_id="ratios-chart")

        # -- small UI events (not part of the client API) --------------------------------------
        quick.click(lambda sample: sample[0], inputs=[quick], outputs=prompt, show_progress="hidden",
                    queue=False, **_hidden_api())

        plan_inputs = [cache, steps, magcache_thresh, magcache_K, retention_ratio, profile, calibrate, cfg, resample,
                       frame_resolution]
        for control in plan_inputs:
            # raw values (preprocess=False): a number typed beyond a slider's range plans as it will run
            control.change(plan, inputs=plan_inputs, outputs=plan_view, show_progress="hidden", queue=False,
                           trigger_mode="always_last", preprocess=False, **_hidden_api())

        def apply_preset(name):
            if name == CUSTOM_PRESET:
                return gr.update(), gr.update(), gr.update()
            thresh, k, retention = preset_values(name)
            return thresh, k, retention

        preset.input(apply_preset, inputs=preset, outputs=[magcache_thresh, magcache_K, retention_ratio],
                     show_progress="hidden", queue=False, **_hidden_api())

        def typed_preset(thresh, k, retention):
            """The preset the values name, as a job would run them (a typed 1 is retention 0.99)."""
            try:
                values = [limits[name].clamp(float(value)) for name, value in (
                    ("magcache_thresh", thresh), ("magcache_K", k), ("retention_ratio", retention))]
            except (TypeError, ValueError, OverflowError):
                return CUSTOM_PRESET
            return preset_for(*values)

        for slider in (magcache_thresh, magcache_K, retention_ratio):
            # raw values (preprocess=False): Gradio would refuse a number typed beyond the slider with an error
            slider.input(typed_preset, inputs=[magcache_thresh, magcache_K, retention_ratio], outputs=preset,
                         preprocess=False, show_progress="hidden", queue=False, **_hidden_api())

        def chart_for(choice, steps_value, mode, resolution):
            return ratios_chart_html(catalog, choice, _steps(steps_value), mode, _resolution(resolution))

        def select_profile(choice, steps_value, mode, resolution):
            value, note, _, warning = profile_selection(catalog, choice)
            if warning:
                logger.info("%s", warning)     # shown once, in the status line under the dropdown
            return value, profile_status_html(catalog, note), chart_for(value, steps_value, mode, resolution)

        chart_inputs = [profile, steps, resample, frame_resolution]
        profile.input(select_profile, inputs=chart_inputs, outputs=[profile, profile_status, ratios_chart],
                      preprocess=False, show_progress="hidden", concurrency_limit=None, **_hidden_api())
        for control in (steps, resample, frame_resolution):
            control.change(chart_for, inputs=chart_inputs, outputs=ratios_chart, preprocess=False,
                           show_progress="hidden", queue=False, trigger_mode="always_last", **_hidden_api())

        # a new upload: the frames' resolution, which picks the table the job plans from (the plan panel
        # and chart follow it); an upload that is not an image arrives as UnreadableImage: no resolution
        input_image.change(lambda path: image_frame_resolution(path, bucket_res), inputs=input_image,
                           outputs=frame_resolution, show_progress="hidden", queue=False, **_hidden_api())

        def profiles_for(steps_value, resolution):
            """The dropdown's entries for this job: profiles made for its frames and steps first."""
            return gr.update(choices=catalog.choices(_steps(steps_value), _resolution(resolution)))

        for control in (steps, frame_resolution):
            # raw values (preprocess=False): a steps value typed beyond the slider is not an error here
            control.change(profiles_for, inputs=[steps, frame_resolution], outputs=profile, preprocess=False,
                           show_progress="hidden", queue=False, trigger_mode="always_last", **_hidden_api())

        # -- the job -------------------------------------------------------------------------------
        def generate(input_image, prompt, n_prompt=defaults.n_prompt, seed=defaults.seed,
                     total_second_length=defaults.total_second_length,
                     latent_window_size=defaults.latent_window_size, steps=defaults.steps, cfg=defaults.cfg,
                     gs=defaults.gs, rs=defaults.rs, gpu_memory_preservation=defaults.gpu_memory_preservation,
                     cache="magcache", magcache_thresh=d_thresh, magcache_K=d_k, retention_ratio=d_retention,
                     mag_ratios=initial_profile, calibrate=False, mp4_crf=defaults.mp4_crf,
                     resample=defaults.resample, session=None):
            settings = None
            try:
                profile_path = catalog.path_for(mag_ratios)
                # what a UI or API client typed is moved into the limits: the job, the page and the
                # report then all show the values that really ran
                settings = JobSettings(
                    prompt=str(prompt or ""), n_prompt=str(n_prompt or ""), seed=int(float(seed)),
                    total_second_length=float(total_second_length),
                    latent_window_size=float(latent_window_size), steps=float(steps), cfg=float(cfg),
                    gs=float(gs), rs=float(rs), gpu_memory_preservation=float(gpu_memory_preservation),
                    cache=str(cache), magcache_thresh=float(magcache_thresh),
                    magcache_K=float(magcache_K), retention_ratio=float(retention_ratio),
                    mag_ratios=str(profile_path) if profile_path else None, calibrate=bool(calibrate),
                    mp4_crf=float(mp4_crf), resample=str(resample)).clamped()
                if isinstance(input_image, UnreadableImage):
                    raise ValueError(input_image.message)
                if input_image is None:
                    raise ValueError("No input image: upload a picture, then press Start.")
                image = read_image(input_image)    # says so if the file is not an image
                settings.validate()
                if profile_path is not None:
                    catalog.load(mag_ratios)        # refuses another variant's profile with a clear message
            except (TypeError, ValueError, OverflowError) as exc:
                message = f"Cannot start: {exc}"
                logger.info("%s", message)
                gr.Warning(message)
                yield (None, job_report(None, [], status="error", message=message, settings=settings,
                                        variant=variant, profile_choice=mag_ratios),
                       _summary_markdown([f"error: {message}"]), None, "")
                return
            yield from _stream_job(session if session is not None else SessionJobs(), settings,
                                   image, str(input_image), mag_ratios)

        def job_plan(settings, profile_choice, resolution) -> dict[str, Any]:
            """The plan this job runs in every section, and the table it comes from (as the page shows it)."""
            if settings.cache != "magcache" or settings.calibrate:
                return {"skipped": [False] * settings.steps, "ratio_source": None,
                        "computed_steps": list(range(settings.steps))}
            ratios, source = catalog.table(profile_choice, settings.steps, settings.resample, resolution)
            skipped = magcache_core.skip_schedule(ratios, settings.steps, settings.magcache_thresh,
                                                  settings.magcache_K, settings.retention_ratio, settings.resample)
            return {"skipped": skipped, "ratio_source": source,
                    "computed_steps": [t for t, s in enumerate(skipped) if not s]}

        def _stream_job(sess: SessionJobs, settings, image, image_path, profile_choice) -> Iterator[tuple]:
            def report_now(status, message, result=None):
                return job_report(result, sections, status=status, message=message, settings=settings,
                                  variant=variant, profile_choice=profile_choice, plan=plan_info)

            height, width = find_bucket(image.shape[0], image.shape[1], bucket_res)
            plan_info = job_plan(settings, profile_choice, magcache_core.frame_resolution(height, width))
            clock = StepClock(plan_info["skipped"], section_count(
                settings.total_second_length, settings.latent_window_size), time.perf_counter())

            sections: list[Any] = []
            job = sess.begin()
            if job is None:
                message = "Stopped before it started (End was pressed)."
                yield None, report_now("stopped", message), _summary_markdown([f"stopped: {message}"]), None, ""
                return
            job.image_path = image_path
            job.thread = threading.Thread(
                target=runner, name="magcache-job", daemon=True,
                args=(job, image, settings, outputs_dir, profiles_dir))
            job.thread.start()
            result = None
            video = None
            lines: list[str] = []
            try:
                yield (gr.update(), report_now("running", "Starting ..."), "", gr.update(),
                       progress_html(0, "Starting ..."))
                while result is None:
                    try:
                        events = [job.events.get(timeout=1.0)]
                    except queue.Empty:
                        continue
                    while True:  # take whatever else is already waiting: show only the newest preview
                        try:
                            events.append(job.events.get_nowait())
                        except queue.Empty:
                            break
                    latest = None
                    bar = gr.update()
                    for kind, payload in events:
                        if kind == "waiting":
                            bar = progress_html(0, "Waiting for the GPU: another job is running ...")
                        elif kind == "progress":
                            latest = payload
                            if payload.step >= 1:
                                clock.step(payload)
                        elif kind == "section":
                            clock.section(payload)
                            sections.append(payload)
                            video = payload.video_path or video
                            lines.append(payload.summary())
                        elif kind == "done":
                            result = payload
                    if result is not None:
                        break
                    shown = gr.update()
                    if latest is not None:
                        label = latest.desc
                        if latest.step >= 1:
                            label += f" ({clock.label(latest, time.perf_counter())})"
                        bar = progress_html(latest.percent, label)
                        if latest.preview is not None:
                            shown = gr.update(visible=True, value=latest.preview)
                    yield (video if video else gr.update(), report_now("running", "Running ..."),
                           _summary_markdown(["Running ...", *lines]), shown, bar)
            finally:
                if job.thread.is_alive():   # the page went away mid-job: free the GPU for others
                    job.stop.set()
                sess.finish(job, result)
            sections[:] = list(result.sections) or sections
            ran = (result.record or {}).get("magcache") or {}
            if "plan" in ran:       # the report says what ran, from the video's own record
                if ran["computed_steps"] != plan_info["computed_steps"]:
                    logger.warning("the job ran another plan than the page showed: computed %s, shown %s",
                                   ran["computed_steps"], plan_info["computed_steps"])
                plan_info = {"skipped": [step == "skip" for step in ran["plan"]],
                             "ratio_source": ran["ratio_source"], "computed_steps": ran["computed_steps"]}
            if result.status == "error":
                gr.Warning(result.message)
            elif result.status == "stopped":
                gr.Info(result.message)
            yield (result.video_path or video, report_now(result.status, result.message, result),
                   _summary_markdown(result.summary_lines()), None, "")

        def arm(sess):
            sess.arm()
            return gr.update(interactive=False), gr.update(interactive=True)

        clamped_names = ("seed", "total_second_length", "steps", "cfg", "gs", "mp4_crf", "magcache_thresh",
                         "magcache_K", "retention_ratio", "gpu_memory_preservation")

        def clamp_at_start(*values):
            """Start pressed: move every typed value into its limits and show what the job will run.

            The same rule as the job itself (:meth:`JobSettings.clamped`), so the sliders, the preset
            and the plan show the values the job then receives.
            """
            *numbers, cache_value, profile_value, calibrate_value, resample_value, resolution = values
            typed = {}
            for name, value in zip(clamped_names, numbers):
                try:
                    number = float(value)
                except (TypeError, ValueError, OverflowError):
                    continue                     # not a number: the job refuses it with a message
                if math.isfinite(number):
                    typed[name] = number
            clamped = JobSettings(prompt="", **typed).clamped()
            out = [getattr(clamped, name) if name in typed else gr.update() for name in clamped_names]
            if len(typed) < len(clamped_names):
                return (*out, gr.update(), gr.update())
            return (*out, preset_for(clamped.magcache_thresh, clamped.magcache_K, clamped.retention_ratio),
                    plan(cache_value, clamped.steps, clamped.magcache_thresh, clamped.magcache_K,
                         clamped.retention_ratio, profile_value, bool(calibrate_value), clamped.cfg,
                         resample_value, resolution))

        def after_job(sess, current_profile, steps_value, resolution):
            result = sess.take_result()
            chart = gr.update()
            value = current_profile
            if result is not None and result.profile_path:
                value = catalog.choice_for(result.profile_path)      # the new profile, selected
                chart = ratios_chart_svg(
                    [(f"published ({variant})", list(magcache_core.VARIANT_MAG_RATIOS[variant]), "#9ca3af"),
                     ("this calibration", list(result.calibration.ratios) if result.calibration else [],
                      "#dc2626")],
                    f"Calibrated ratios saved as {value}")
            # the line under the dropdown names the selected profile in full (the dropdown may clip it)
            value, note, _, _ = profile_selection(catalog, value)
            return (gr.update(interactive=True), gr.update(interactive=False),
                    gr.update(choices=catalog.choices(_steps(steps_value), _resolution(resolution)), value=value),
                    chart, gr.update(visible=False),
                    profile_status_html(catalog, note))

        def stop(sess):
            sess.request_stop()

        def end_api(sess) -> bool:
            stopped = sess.stop_running()
            logger.info("End through the API: %s", "the running job stops" if stopped else "no job was running")
            return stopped

        job_inputs = [input_image, prompt, n_prompt, seed, total_second_length, latent_window_size, steps, cfg,
                      gs, rs, gpu_memory_preservation, cache, magcache_thresh, magcache_K, retention_ratio,
                      profile, calibrate, mp4_crf, resample, session]
        clamped_controls = [seed, total_second_length, steps, cfg, gs, mp4_crf, magcache_thresh, magcache_K,
                            retention_ratio, gpu_memory_preservation]
        (start_button
         # raw values (preprocess=False): Gradio 6 would refuse a typed 500 before we could clamp it
         .click(clamp_at_start, inputs=[*clamped_controls, cache, profile, calibrate, resample, frame_resolution],
                outputs=[*clamped_controls, preset, plan_view], preprocess=False, queue=False, **_hidden_api())
         .then(arm, inputs=session, outputs=[start_button, end_button], queue=False, **_hidden_api())
         .then(generate, inputs=job_inputs, outputs=[result_video, report, summary, preview, progress],
               api_name="generate", concurrency_limit=concurrency, concurrency_id="gpu", show_progress="minimal")
         .then(after_job, inputs=[session, profile, steps, frame_resolution],
               outputs=[start_button, end_button, profile, ratios_chart, preview, profile_status],
               queue=False, **_hidden_api()))
        end_button.click(stop, inputs=session, outputs=None, queue=False, **_hidden_api())
        # the same End for API clients: `client.predict(api_name="/end")` from the Client that started the job
        # (its session); the hidden button only gives the endpoint a place in the page
        end_api_button = gr.Button(visible=False)
        end_api_button.click(end_api, inputs=session, outputs=gr.Checkbox(visible=False), queue=False,
                             api_name="end")
        # every new page lists the profiles folder as it is now (profiles saved or copied in since start)
        demo.load(lambda: (gr.update(choices=catalog.choices(defaults.steps)),
                           profile_status_html(catalog, profile_selection(catalog, initial_profile)[1])),
                  inputs=None, outputs=[profile, profile_status], queue=False, **_hidden_api())

    demo.queue()
    return demo


def _summary_markdown(lines: Sequence[str]) -> str:
    """The job summary: the first line (status) in bold, then one bullet per section and the totals."""
    if not lines:
        return ""
    head, *rest = lines
    body = "".join(f"\n- {html.escape(line, quote=False)}" for line in rest)
    return f"**{html.escape(head, quote=False)}**\n{body}"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def build_parser(variant: str) -> argparse.ArgumentParser:
    title = {"framepack": "FramePack", "f1": "FramePack-F1"}.get(variant, variant)
    parser = argparse.ArgumentParser(
        description=f"{title} with MagCache: the FramePack web app plus MagCache's cache controls.")
    parser.add_argument("--share", action="store_true",
                        help="also publish the app through a public Gradio share link")
    parser.add_argument("--server", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 = every "
                             "network interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--inbrowser", action="store_true", help="open the app in the default browser")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random-weight models on the CPU: no GPU, no download, the video is noise")
    parser.add_argument("--mag-ratios", metavar="FILE", default=None,
                        help="preselect this saved calibration profile (JSON) instead of the published ratios")
    parser.add_argument("--outputs", metavar="DIR", default="outputs",
                        help="folder for videos (default ./outputs)")
    parser.add_argument("--profiles", metavar="DIR", default="magcache_profiles",
                        help="folder of calibration profiles (default ./magcache_profiles)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", default=None,
                        help="run the jobs on a pool of Ray workers, one per GPU (several sessions at once); "
                             "without ADDRESS a local Ray, else a cluster ('auto' or host:port). "
                             "Needs: pip install -r requirements-ray.txt")
    parser.add_argument("--workers", type=int, metavar="N", default=None,
                        help="with --ray: number of workers (default one per GPU; with --tiny 2 CPU workers)")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(demo: gr.Blocks, *, server_name: str = "127.0.0.1", server_port: int | None = None,
           share: bool = False, inbrowser: bool = False, outputs_dir: str | os.PathLike[str] = "outputs",
           prevent_thread_lock: bool = False, quiet: bool = False) -> Any:
    """Start the server (shared by main() and the tests); only ``outputs_dir`` is served as files."""
    if share or not _is_loopback(server_name):
        logger.warning("The app is reachable beyond this machine (%s): anyone who can open it can run jobs "
                       "on this GPU and read every video (and input image) in the outputs folder.",
                       "public share link" if share else f"listening on {server_name}")
    os.makedirs(outputs_dir, exist_ok=True)
    return demo.launch(server_name=server_name, server_port=server_port, share=share, inbrowser=inbrowser,
                       allowed_paths=[str(pathlib.Path(outputs_dir).resolve())],
                       prevent_thread_lock=prevent_thread_lock, quiet=quiet, ssr_mode=False)


def main(variant: str, argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``, load the models of ``variant`` ("framepack" or "f1") and serve the app."""
    parser = build_parser(variant)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Like FramePack: models download next to the app unless the user chose a Hugging Face home.
    os.environ.setdefault("HF_HOME", str(APP_DIR / "hf_download"))

    from magcache_framepack.models import load_models, model_id
    import torch

    if args.mag_ratios:
        try:
            catalog = ProfileCatalog(variant, args.profiles, extra=args.mag_ratios,
                                     model=model_id(variant, args.tiny))
            catalog.load(catalog.choice_for(args.mag_ratios))
        except ValueError as exc:
            parser.error(f"--mag-ratios {args.mag_ratios}: {exc}")

    if not args.tiny and not torch.cuda.is_available() and args.ray is None:
        sys.exit(f"{parser.prog}: no CUDA GPU found. FramePack needs an NVIDIA GPU with CUDA. "
                 "To try the app without one, add --tiny (tiny random models on the CPU; the video is noise).")

    models = runner = None
    if args.ray is not None:
        runner = _ray_runner(parser, args, variant)
    else:
        logger.info("Loading %s models%s ...", variant, " (tiny, random weights)" if args.tiny else "")
        try:
            models = load_models(variant, tiny=args.tiny)
        except (RuntimeError, OSError) as exc:
            sys.exit(f"{parser.prog}: could not load the {variant} models: {exc}")
    demo = build_ui(models, variant, outputs_dir=args.outputs, profiles_dir=args.profiles,
                    mag_ratios=args.mag_ratios, tiny=args.tiny, runner=runner)
    launch(demo, server_name=args.server, server_port=args.port, share=args.share, inbrowser=args.inbrowser,
           outputs_dir=args.outputs)


def _ray_runner(parser: argparse.ArgumentParser, args: argparse.Namespace, variant: str) -> Any:
    """--ray: the pool of Ray workers the app's jobs run on (the models load there, not here)."""
    try:
        from magcache_framepack.runners.ray import require_ray, start_app_runner
        require_ray()
    except ImportError as exc:
        sys.exit(f"{parser.prog}: --ray: {exc}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        return start_app_runner(args.ray, variant, args.tiny, args.workers)
    except (RuntimeError, ConnectionError) as exc:
        sys.exit(f"{parser.prog}: --ray: {exc}")
