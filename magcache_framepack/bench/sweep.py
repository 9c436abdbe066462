"""The ``sweep`` tool: one video uncached and one per MagCache setting, scored for speed and quality.

``python magcache_bench.py sweep --image IMG --prompt TEXT [--tiny] [--setting ...] [--out DIR]``

It runs the headless pipeline (:func:`magcache_framepack.job.run_job`) with the
real models (``--tiny``: random-weight ones, for the mechanics only) and
scores each cached video against the uncached one with ``compare``'s metrics.

Decisions worth knowing:

* Speed-ups are medians over interleaved repeats (every setting once per
  round, the order rotated each round), reported for the whole job and for the
  sampler alone; a speed-up above the ideal one (total / computed steps) is
  flagged as timing noise, since a skipped step is never free.
* Videos are written lossless (CRF 0) by default, so the scores measure
  MagCache, not the video encoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from magcache_framepack.bench.quality import compare_videos
from magcache_framepack.bench.report import (SpeedSetting, UsageError, fmt_db, nonneg_int, positive_int,
                                             setting_arg, speed_settings, write_json)
from magcache_framepack.grid import GridCell, cell_settings
from magcache_framepack.settings import VARIANT_NAMES

logger = logging.getLogger(__name__)

TINY_NOTE = ("NOTE: --tiny uses random-weight models: the videos are noise and the quality numbers "
             "below are meaningless; only the mechanics (and relative timing) are exercised.")


@dataclasses.dataclass
class SweepRow:
    setting: str
    seconds: float                 # median over the repeats of the whole job: encoders, sampling, VAE, MP4
    sampling_seconds: float        # median of the sampler only: the part a cache speeds up
    speedup: float                 # uncached median job seconds / this setting's median job seconds
    sampling_speedup: float        # the same for the sampler seconds
    computed_steps: int
    total_steps: int
    video: str | None
    status: str
    ideal_speedup: float = 1.0     # total steps / computed steps: what skipping alone can give
    pct_of_ideal: float = math.nan  # 100 * sampling_speedup / ideal_speedup
    repeats: int = 1
    seconds_runs: list[float] = dataclasses.field(default_factory=list)           # one per repeat
    sampling_seconds_runs: list[float] = dataclasses.field(default_factory=list)
    psnr_mean: float | None = None
    psnr_min: float | None = None
    ssim_mean: float | None = None
    ssim_min: float | None = None
    lpips_mean: float | None = None
    message: str = ""

    def above_ideal(self, speedup: float) -> bool:
        """A skipped step is never free, so a speed-up above the ideal one is timing noise."""
        return math.isfinite(speedup) and speedup > self.ideal_speedup


def _speedup_cell(row: SweepRow, speedup: float) -> str:
    return f"{speedup:.2f}x" + (" (noise: above ideal)" if row.above_ideal(speedup) else "")


def sweep_table(rows: Sequence[SweepRow], header: str = "") -> str:
    """Markdown table of a sweep (pure); seconds are medians over the repeats."""
    out = [header, ""] if header else []
    out += ["| setting | median s | speedup | median sampling s | sampling speedup | ideal speedup | % of ideal "
            "| computed steps | PSNR mean (dB) | PSNR min (dB) | SSIM mean | SSIM min | LPIPS mean |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f4(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    for r in rows:
        if r.status != "done":
            out.append(f"| {r.setting} | - | - | - | - | - | - | - | {r.status}: {r.message} | | | | |")
            continue
        out.append(f"| {r.setting} | {r.seconds:.2f} | {_speedup_cell(r, r.speedup)} | {r.sampling_seconds:.2f} "
                   f"| {_speedup_cell(r, r.sampling_speedup)} | {r.ideal_speedup:.2f}x | {r.pct_of_ideal:.1f}% "
                   f"| {r.computed_steps}/{r.total_steps} "
                   f"| {fmt_db(r.psnr_mean)} | {fmt_db(r.psnr_min)} | {f4(r.ssim_mean)} | {f4(r.ssim_min)} "
                   f"| {f4(r.lpips_mean)} |")
    if any(r.status == "done" and (r.above_ideal(r.speedup) or r.above_ideal(r.sampling_speedup)) for r in rows):
        out += ["", "A speed-up above the ideal one (total / computed steps) cannot come from the cache: a "
                    "skipped step still costs a little. It is timing noise (a busy machine, a warm-up effect); "
                    "rerun with more --repeats."]
    return "\n".join(out)


CHART_SIZE = (6.4, 4.4)
CHART_TITLE_CHARS = 70          # at fontsize 9, about what the chart's width holds


def sweep_figure(rows: Sequence[SweepRow], title: str) -> Any:
    """Speed-up vs PSNR scatter as a matplotlib Figure (Agg: no display needed); the title is wrapped to fit."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    pts = [r for r in rows if r.status == "done" and r.psnr_mean is not None]
    finite = [r.psnr_mean for r in pts if math.isfinite(r.psnr_mean)]
    cap = (max(finite) + 5.0) if finite else 60.0      # identical videos (inf dB) are drawn at the top
    fig = Figure(figsize=CHART_SIZE, dpi=100)
    ax = fig.subplots()
    for r in pts:
        y = r.psnr_mean if math.isfinite(r.psnr_mean) else cap
        label = r.setting + ("" if math.isfinite(r.psnr_mean) else " (inf dB)")
        if r.above_ideal(r.speedup):
            label += " (noise)"
        ax.scatter([r.speedup], [y])
        ax.annotate(label, (r.speedup, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("speed-up vs uncached (median job seconds)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    lines = [wrapped for part in title.split("\n") for wrapped in textwrap.wrap(part, CHART_TITLE_CHARS) or [""]]
    ax.set_title("\n".join(lines), fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def sweep_chart(rows: Sequence[SweepRow], path: str | os.PathLike, title: str) -> pathlib.Path:
    """Write :func:`sweep_figure` as a PNG."""
    path = pathlib.Path(path)
    sweep_figure(rows, title).savefig(path)
    return path


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def run_sweep(image: str, prompt: str, settings: Sequence[SpeedSetting], out_dir: str | os.PathLike,
              tiny: bool = False, variant: str = "framepack", seconds: float = 1.0, steps: int = 25,
              seed: int = 31337, crf: int = 0, use_lpips: bool = True, warmup: bool = True, repeats: int = 3
              ) -> tuple[list[SweepRow], str]:
    """Generate the uncached video and one per setting, ``repeats`` times, and score each against the uncached one.

    The repeats are interleaved (every setting once per round, the order rotated
    each round) so a slow spell of the machine hits all settings alike; the
    table reports medians.  ``crf`` defaults to 0 (lossless H.264) so that the
    scores measure MagCache, not the video encoder.  ``warmup`` first runs an
    untimed one-step job, so one-off costs (lazy imports, kernel selection,
    allocator growth) do not land on the first timed job.  The videos of the
    first round are kept and scored (the seed is fixed, so every round makes
    the same video); later rounds' files are deleted.  Returns (rows, markdown).
    """
    import shutil

    from magcache_framepack.settings import JobSettings
    from magcache_framepack.job import run_job
    from magcache_framepack.models import load_models
    from PIL import Image

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    uncached = next((s.name for s in settings if s.params is None), None)
    if uncached is None:
        raise ValueError("a sweep needs the uncached setting (params None) to compare against")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img = np.array(Image.open(image).convert("RGB"))
    models = load_models(variant, tiny=tiny)
    if warmup:
        logger.info("sweep: warm-up job (1 step, untimed)")
        res = run_job(models, img, JobSettings(prompt=prompt, seed=seed, seconds=seconds, steps=1, cache="off",
                                               crf=crf),
                      outputs_dir=str(out / "videos" / "warmup"))
        if res.status != "done":
            logger.warning("sweep: warm-up job %s: %s", res.status, res.message)
    runs: dict[str, list[Any]] = {s.name: [] for s in settings}
    base = JobSettings(prompt=prompt, seed=seed, seconds=seconds, steps=steps, crf=crf)
    for rnd in range(repeats):
        shift = rnd % len(settings)
        for s in list(settings[shift:]) + list(settings[:shift]):
            # the app's Cache grid runs the same jobs: the uncached reference and one per setting
            job = cell_settings(base, None if s.params is None else GridCell(*s.params))
            videos = out / "videos" / _safe(s.name)
            if rnd:
                videos = videos / f"repeat{rnd + 1}"
            logger.info("sweep: round %d/%d: generating %s", rnd + 1, repeats, s.name)
            res = run_job(models, img, job, outputs_dir=str(videos))
            logger.info("sweep: %s -> %s in %.2fs", s.name, res.status, res.seconds)
            runs[s.name].append(res)
            if rnd:
                shutil.rmtree(videos, ignore_errors=True)
    rows = [_sweep_row(s.name, runs[s.name]) for s in settings]
    ref_row = next(r for r in rows if r.setting == uncached)
    ref = runs[uncached][0]
    for row, s in zip(rows, settings):
        row.speedup = _ratio(ref_row.seconds, row.seconds)
        row.sampling_speedup = _ratio(ref_row.sampling_seconds, row.sampling_seconds)
        row.pct_of_ideal = 100.0 * row.sampling_speedup / row.ideal_speedup
        res = runs[s.name][0]
        if row.status == "done" and ref_row.status == "done" and s.params is not None:
            m = compare_videos(ref.video_path, res.video_path, use_lpips=use_lpips)
            row.psnr_mean, row.psnr_min = m["psnr"]["mean"], m["psnr"]["min"]
            row.ssim_mean, row.ssim_min = m["ssim"]["mean"], m["ssim"]["min"]
            row.lpips_mean = m["lpips"]["mean"] if m["lpips"] else None
    header = (f"MagCache sweep: {variant}, {seconds:g} s video, {steps} steps, seed {seed}, "
              f"{'tiny random-weight models' if tiny else 'real models'}, CRF {crf}, median of {repeats} "
              f"interleaved run{'s' if repeats > 1 else ''}; quality vs the uncached video")
    md = sweep_table(rows, header)
    if tiny:
        md = TINY_NOTE + "\n\n" + md
    (out / "sweep.md").write_text(md + "\n", encoding="utf-8")
    sweep_chart(rows, out / "sweep.png", header if not tiny else header + "\n(tiny: numbers meaningless)")
    write_json(out / "sweep.json", [dataclasses.asdict(r) for r in rows])
    return rows, md


def _sweep_row(name: str, results: Sequence[Any]) -> SweepRow:
    """One setting's row from its repeats (speed-ups are filled in against the uncached row afterwards)."""
    first = results[0]
    failed = next((r for r in results if r.status != "done"), None)
    done = [r for r in results if r.status == "done"]
    computed = sum(len(sec.computed_steps) for sec in first.sections)
    total = sum(len(sec.computed_steps) + len(sec.skipped_steps) for sec in first.sections)
    job_runs = [r.seconds for r in done]
    sampling_runs = [sum(sec.sampling_seconds for sec in r.sections) for r in done]
    return SweepRow(setting=name, seconds=_median(job_runs), sampling_seconds=_median(sampling_runs),
                    speedup=math.nan, sampling_speedup=math.nan, computed_steps=computed, total_steps=total,
                    video=first.video_path, status=failed.status if failed else "done",
                    message=failed.message if failed else first.message,
                    ideal_speedup=_ratio(total, computed), repeats=len(results),
                    seconds_runs=job_runs, sampling_seconds_runs=sampling_runs)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be a number > 0")
    return v



# ---------------------------------------------------------------------------
# The sweep subcommand
# ---------------------------------------------------------------------------

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``sweep``: its flags, and :func:`run` as what it does."""
    wp = subparsers.add_parser("sweep", help="generate uncached + one video per setting, report speed and quality")
    wp.add_argument("--image", required=True)
    wp.add_argument("--prompt", default="")
    wp.add_argument("--seed", type=int, default=31337)
    wp.add_argument("--tiny", action="store_true", help="tiny random-weight models (CPU, seconds; quality meaningless)")
    wp.add_argument("--variant", choices=VARIANT_NAMES, default="framepack")
    wp.add_argument("--seconds", type=_positive_float, default=1.0, help="video length in seconds")
    wp.add_argument("--steps", type=positive_int, default=25)
    wp.add_argument("--setting", type=setting_arg, action="append", default=[], metavar="THRESH,K,RETENTION",
                    help="a MagCache setting besides the presets (repeatable)")
    wp.add_argument("--no-presets", action="store_true", help="only the --setting ones (and uncached)")
    wp.add_argument("--crf", type=nonneg_int, default=0,
                    help="H.264 CRF of the generated videos (0 = lossless, so scores measure MagCache only)")
    wp.add_argument("--no-lpips", action="store_true")
    wp.add_argument("--no-warmup", action="store_true", help="skip the untimed one-step warm-up job")
    wp.add_argument("--repeats", type=positive_int, default=3,
                    help="timed rounds, every setting once per round, interleaved (medians are reported)")
    wp.add_argument("--out", default="outputs/sweep", help="folder for sweep.md, sweep.png, sweep.json, videos/")
    wp.set_defaults(run=run)
    return wp


def run(args: argparse.Namespace) -> int:
    """Sweep, print the table; exit 1 when any job failed (the table says which and why)."""
    from magcache_framepack.job import read_image

    try:
        read_image(args.image)      # readable and large enough, before any model loads
    except ValueError as exc:
        raise UsageError(f"--image: {exc}") from None
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("the real FramePack models need a CUDA GPU and none is available; "
                             "add --tiny for tiny random-weight models on the CPU")
    import magcache_core as core

    presets = {} if args.no_presets else core.PRESETS
    settings = speed_settings(presets, args.setting)
    if len(settings) == 1:
        raise UsageError("nothing to compare: give --setting or drop --no-presets")
    if args.tiny:
        logger.warning(TINY_NOTE)
    rows, md = run_sweep(args.image, args.prompt, settings, args.out, tiny=args.tiny, variant=args.variant,
                         seconds=args.seconds, steps=args.steps, seed=args.seed, crf=args.crf,
                         use_lpips=not args.no_lpips, warmup=not args.no_warmup, repeats=args.repeats)
    print(md)
    print(f"\nwrote {pathlib.Path(args.out) / 'sweep.md'} and {pathlib.Path(args.out) / 'sweep.png'}")
    return 0 if all(r.status == "done" for r in rows) else 1
