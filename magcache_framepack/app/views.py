"""What the app's page shows, as pure functions of their inputs: presets, the skip plan, charts, reports.

Nothing here imports gradio, starts a thread or keeps state: every function
turns values into text, HTML, SVG or a dict, so each one is tested without a
server, and the handlers (:mod:`magcache_framepack.app.handlers`) decide what
to show when.
"""

from __future__ import annotations

import dataclasses
import html
import re
import textwrap
from collections.abc import Sequence
from typing import Any

import magcache_core

LIBRARY = "library"              # profile-dropdown value of the ratio library (a table per job)
PUBLISHED = "published"          # the value older clients send for the same thing
CUSTOM_PRESET = "Custom"
CACHE_CHOICES: list[tuple[str, str]] = [("MagCache", "magcache"), ("TeaCache", "teacache"), ("Off", "off")]

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


def message_html(text: str) -> str:
    """The plan panel when it shows a sentence instead of a plan."""
    return f'<div class="mc-plan"><div class="mc-plan-summary">{html.escape(text)}</div></div>'


def plan_message(cache: str, steps: int, calibrate: bool) -> str | None:
    """The plan panel's sentence when no MagCache plan applies to these settings, else None."""
    if cache == "teacache":
        return message_html("TeaCache decides while it runs which steps to skip, so no MagCache plan "
                            "applies; choose MagCache to see one.")
    if cache == "off":
        return message_html(f"Cache off: all {int(steps)} steps run the transformer; no MagCache plan applies.")
    if calibrate:
        return message_html(f"Calibration run: all {int(steps)} steps are computed (nothing skipped) while "
                            "the magnitude ratios are measured.")
    return None


def plan_panel(plan: SkipPlan, source: str, chosen: bool, steps: int, resolution: float | None,
               app_resolution: float) -> str:
    """The plan strip and the line naming its ratio table and why that table (the user's, or the library's).

    ``resolution`` is the job's frame resolution when its image is known, else None: the line then
    names the app's default frames (``app_resolution``).
    """
    frames = (f"your image's {resolution:g} px frames" if resolution else
              f"this app's {app_resolution:g} px frames (before an image is given)")
    why = ("chosen by you" if chosen else
           f"the library's nearest calibration to {frames} and {int(steps)} steps")
    return skip_plan_html(plan) + (f'<div class="mc-table" style="font-size:12px;margin-top:2px">'
                                   f'Ratio table: {html.escape(source)} ({html.escape(why)}).</div>')


def tradeoff_chart(curve: Sequence[tuple[float, float]], current: tuple[float, float],
                   target: float | None = None, width: int = 460, height: int = 170) -> str:
    """The planner's trade-off: for each speedup, the least planned error reaching it; this plan marked.

    ``curve`` is :func:`magcache_core.tradeoff_curve` of the candidates, ``current`` the
    (speedup, planned error) of the plan that runs, ``target`` the asked speedup (a dashed line).
    Planned error is what the plan accepts by the ratio table, a ranking of settings on
    this table, not a measured distance (see the README).
    """
    if not curve:
        return ""
    left, right, top, bottom = 44, 10, 22, 28
    x_hi = max(max(x for x, _ in curve), current[0], target or 1.0) * 1.04
    y_hi = max(max(y for _, y in curve), current[1]) * 1.1 or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + plot_w * (v - 1.0) / max(x_hi - 1.0, 1e-9)

    def py(v: float) -> float:
        return top + plot_h * (1.0 - v / y_hi)

    line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in curve)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
             f'class="mc-tradeoff" style="max-width:{width}px;font:10px sans-serif" role="img" '
             'aria-label="Speedup against planned error">',
             '<text x="4" y="13" font-weight="bold">Speedup against planned error (the planner&#8217;s candidates on '
             'this table)</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9ca3af"/>',
             f'<polyline points="{line}" fill="none" stroke="#6b7280" stroke-width="1.5"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{y_hi:.2g}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
             f'<text x="{left}" y="{top + plot_h + 12}" text-anchor="middle">1x</text>',
             f'<text x="{left + plot_w}" y="{top + plot_h + 12}" text-anchor="end">{x_hi:.1f}x</text>',
             f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" text-anchor="middle">planned speedup '
             '(steps / computed steps)</text>']
    if target is not None:
        parts.append(f'<line x1="{px(target):.1f}" x2="{px(target):.1f}" y1="{top}" y2="{top + plot_h}" '
                     f'stroke="#2563eb" stroke-dasharray="3 3"><title>target {target:g}x</title></line>')
    parts.append(f'<circle class="mc-tradeoff-current" cx="{px(current[0]):.1f}" cy="{py(current[1]):.1f}" r="4" '
                 f'fill="#dc2626"><title>this plan: {current[0]:.2f}x, planned error {current[1]:.3g}</title>'
                 '</circle></svg>')
    return '<div class="mc-tradeoff-chart" style="margin-top:4px">' + "".join(parts) + "</div>"


def profile_status_html(note: str = "", left_out: str = "") -> str:
    """The line under the profile dropdown: ``note`` (the selected profile in full, or why it was
    refused; ``**bold**`` allowed) and ``left_out`` (how many files were left out, and why)."""
    parts = [html.escape(part, quote=False) for part in (note, left_out) if part]
    if not parts:
        return ""
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", "<br>".join(parts))
    return f'<div class="mc-profile-status" style="padding:4px 12px;font-size:13px">{text}</div>'


def ratios_chart_svg(series: Sequence[tuple[str, Sequence[float], str]], title: str,
                     width: int = 460, height: int = 220, x_label: str = "step",
                     reference: float | None = 1.0) -> str:
    """A small inline SVG line chart of magnitude ratios per step (no plotting library needed).

    ``x_label`` names the x axis; a dashed line marks ``reference`` (ratio 1.0) when it is in range.
    """
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
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 2}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    if reference is not None and lo < reference < hi:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(reference):.1f}" y2="{y(reference):.1f}" '
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


def ratios_in_use_chart(variant: str, ratios: Sequence[float], source: str) -> str:
    """Chart of the ratio table in use, next to the published one of ``variant``."""
    published = list(magcache_core.VARIANT_MAG_RATIOS[variant])
    series = [(f"published ({variant}, 25 steps)", published, "#9ca3af"), ("in use", list(ratios), "#dc2626")]
    return ratios_chart_svg(series, f"Ratios in use: {source}")


def calibration_chart(variant: str, ratios: Sequence[float], saved_as: str) -> str:
    """Chart of the ratios a calibration run just measured, next to the published ones."""
    return ratios_chart_svg(
        [(f"published ({variant})", list(magcache_core.VARIANT_MAG_RATIOS[variant]), "#9ca3af"),
         ("this calibration", list(ratios), "#dc2626")],
        f"Calibrated ratios saved as {saved_as}")


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


def progress_html(percent: float, label: str) -> str:
    """The progress bar under the video: ``label`` above a bar ``percent`` full."""
    percent = max(0.0, min(100.0, float(percent)))
    return (
        '<div class="mc-progress">'
        f'<div style="font-size:13px;margin-bottom:3px">{html.escape(label)}</div>'
        '<div style="background:#e5e7eb;border-radius:4px;height:10px;overflow:hidden">'
        f'<div style="background:#2563eb;height:100%;width:{percent:.1f}%"></div></div></div>')


def section_dict(section: Any) -> dict[str, Any]:
    """One section of the job report (a SectionReport as plain JSON values)."""
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


def summary_markdown(lines: Sequence[str]) -> str:
    """The job summary: the first line (status) in bold, then one bullet per section and the totals."""
    if not lines:
        return ""
    head, *rest = lines
    body = "".join(f"\n- {html.escape(line, quote=False)}" for line in rest)
    return f"**{html.escape(head, quote=False)}**\n{body}"


# ---------------------------------------------------------------------------
# Compare with no cache
# ---------------------------------------------------------------------------

def cache_label(value: str) -> str:
    """A cache's name as the Cache choice shows it ("magcache" -> "MagCache")."""
    return {v: label for label, v in CACHE_CHOICES}.get(value, value)


#: Where the PSNR chart draws a frame identical in both videos (its PSNR is infinite).
PSNR_CHART_CAP = 60.0


def psnr_for_chart(values: Sequence[float | str]) -> list[float]:
    """Per-frame PSNR as drawn: "inf" (identical frames) and anything above the cap at :data:`PSNR_CHART_CAP`."""
    return [min(float(v), PSNR_CHART_CAP) for v in values]


def comparison_charts(comparison: dict[str, Any]) -> str:
    """Per-frame PSNR and SSIM of the cached video against the uncached one, as two small charts."""
    cache = cache_label(comparison["cache"])
    psnr = ratios_chart_svg([(f"{cache} vs Off", psnr_for_chart(comparison["psnr"]["per_frame"]), "#2563eb")],
                            f"PSNR per frame (dB; identical frames drawn at {PSNR_CHART_CAP:.0f})",
                            x_label="frame", reference=None)
    ssim = ratios_chart_svg([(f"{cache} vs Off", comparison["ssim"]["per_frame"], "#dc2626")],
                            "SSIM per frame (1 = identical)", x_label="frame", reference=None)
    return f'<div class="mc-compare-charts" style="display:flex;flex-wrap:wrap;gap:8px">{psnr}{ssim}</div>'


def _times(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.2f}x"


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """The comparison in words: both times, the measured speedups next to the planned one, the distances."""
    c, u, speed = comparison["cached"], comparison["uncached"], comparison["speedup"]
    cache = cache_label(comparison["cache"])
    psnr, ssim = comparison["psnr"], comparison["ssim"]
    mean_db = psnr["mean_finite"] if isinstance(psnr["mean_finite"], str) else f"{psnr['mean_finite']:.2f}"
    min_db = psnr["min"] if isinstance(psnr["min"], str) else f"{psnr['min']:.2f}"
    planned = ("no plan (TeaCache decides as it runs)" if speed["planned"] is None
               else f"planned {_times(speed['planned'])}")
    lines = [
        f"**{cache} against no cache**, {comparison['frames']} frames",
        f"- time: {c['seconds']:.1f} s with the cache, {u['seconds']:.1f} s without: {_times(speed['wall'])} "
        f"measured ({planned})",
        f"- sampling: {c['sampling_seconds']:.1f} s against {u['sampling_seconds']:.1f} s: "
        f"{_times(speed['sampling'])}; computed {c['computed_steps']} of {c['total_steps']} steps",
        f"- PSNR: mean {mean_db} dB over frames that differ ({psnr['identical_frames']} identical), "
        f"worst {min_db} dB",
        f"- SSIM: mean {ssim['mean']:.4f}, worst {ssim['min']:.4f}",
        (f"- LPIPS: mean {comparison['lpips']['mean']:.4f}, worst {comparison['lpips']['max']:.4f}"
         if comparison.get("lpips") else f"- {comparison.get('lpips_note') or 'LPIPS: not measured'}"),
        "",
        "Both measure how far the cache moved the video from the one the same job makes without it, "
        "not how good either video looks: watch both.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The settings grid
# ---------------------------------------------------------------------------

#: The grid table's columns: (header, GridRow field).
GRID_COLUMNS = (("setting", "setting"), ("status", "status"), ("computed", "computed_steps"),
                ("planned x", "planned_speedup"), ("measured x", "wall_speedup"),
                ("sampling x", "sampling_speedup"), ("PSNR mean dB", "psnr_mean"), ("PSNR min dB", "psnr_min"),
                ("SSIM mean", "ssim_mean"), ("SSIM min", "ssim_min"))


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "inf" if value == float("inf") else round(value, 3 if abs(value) >= 1 else 4)
    return "" if value is None else value


def grid_table(rows: Sequence[Any]) -> dict[str, Any]:
    """The grid's table as a Dataframe value: one row per cell that ran (a failed one says why)."""
    data = []
    for row in rows:
        values = [_cell(getattr(row, field)) for _, field in GRID_COLUMNS]
        if row.status != "done":
            values[1] = f"{row.status}: {row.message}"
        data.append(values)
    return {"headers": [header for header, _ in GRID_COLUMNS], "data": data}


def grid_status(rows: Sequence[Any], total: int, note: str) -> str:
    """The line above the grid: where it is, or why it stopped."""
    return f"**Grid:** {html.escape(note, quote=False)}" if note else ""


def _scatter_svg(points: Sequence[tuple[float, float, str]], title: str, y_label: str,
                 width: int = 320, height: int = 240) -> str:
    """A small SVG scatter: x = measured speedup, y = the distance, each point labelled with its cell."""
    if not points:
        return ""
    left, right, top, bottom = 46, 12, 22, 30
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(1.0, min(xs)), max(xs) * 1.05 + 0.05
    y_pad = max((max(ys) - min(ys)) * 0.1, 0.01)
    y_lo, y_hi = min(ys) - y_pad, max(ys) + y_pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + plot_w * (v - x_lo) / (x_hi - x_lo)

    def py(v: float) -> float:
        return top + plot_h * (y_hi - v) / (y_hi - y_lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
             f'style="max-width:{width}px;font:10px sans-serif" role="img" aria-label="{html.escape(title)}">',
             f'<text x="4" y="13" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#9ca3af"/>',
             f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle">measured speedup (x)</text>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{y_hi:.3g}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{y_lo:.3g}</text>',
             f'<text x="{left}" y="{top + plot_h + 12}" text-anchor="middle">{x_lo:.2g}</text>',
             f'<text x="{left + plot_w}" y="{top + plot_h + 12}" text-anchor="end">{x_hi:.2g}</text>',
             f'<text x="10" y="{top + plot_h / 2:.1f}" transform="rotate(-90 10 {top + plot_h / 2:.1f})" '
             f'text-anchor="middle">{html.escape(y_label)}</text>']
    for x, y, label in points:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="#2563eb">'
                     f'<title>{html.escape(label)}: {x:.2f}x, {y:.4g}</title></circle>'
                     f'<text x="{px(x) + 5:.1f}" y="{py(y) - 4:.1f}" font-size="9">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def grid_scatter(rows: Sequence[Any]) -> str:
    """Speedup against PSNR and against SSIM to the uncached video, one point per finished cell.

    A cell whose frames all equal the reference (infinite PSNR) is drawn at :data:`PSNR_CHART_CAP`.
    """
    done = [r for r in rows if r.status == "done" and r.wall_speedup is not None]
    psnr = [(r.wall_speedup, min(r.psnr_mean, PSNR_CHART_CAP), r.setting) for r in done if r.psnr_mean is not None]
    ssim = [(r.wall_speedup, r.ssim_mean, r.setting) for r in done if r.ssim_mean is not None]
    charts = (_scatter_svg(psnr, "Speedup against PSNR to no cache", "PSNR mean (dB)")
              + _scatter_svg(ssim, "Speedup against SSIM to no cache", "SSIM mean"))
    return f'<div class="mc-grid-scatter" style="display:flex;flex-wrap:wrap;gap:8px">{charts}</div>' if charts else ""
