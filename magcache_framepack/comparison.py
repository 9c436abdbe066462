"""A cached video against the same job run without the cache: what the cache cost, and what it saved.

The app's Compare runs a finished job again with the cache Off (same image,
seed and settings) and hands both videos here.  Because a job is
reproducible (same settings, same frames), the uncached run is the exact
reference the cached one approximates, so the per-frame distance between the
two is the cache's error and nothing else.

What the figures mean, and what they do not: PSNR and SSIM between cached and
uncached frames measure how far the cache moved the video from the one it
would have made without it.  They do not measure whether either video is
good: a high PSNR says "the same video, faster", a low one says "another
video", which may still look fine (a slightly different motion) or may be
blurred.  Watch both side by side before trusting the number alone.

Both records then name each other (``"compare"``), so either file says which
video it was compared with and how it came out.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

from magcache_framepack.metrics import compare_videos
from magcache_framepack.records import PathLike, read_record, sidecar_path, write_sidecar


@dataclasses.dataclass(frozen=True)
class RunTimes:
    """One of the two runs: its video, wall time, sampling time and steps (from its record)."""

    video: str
    seconds: float
    sampling_seconds: float
    computed_steps: int
    total_steps: int

    @classmethod
    def from_record(cls, video: PathLike, record: Mapping[str, Any]) -> RunTimes:
        sections = record.get("sections") or []
        computed = sum(len(s.get("computed_steps") or []) for s in sections)
        skipped = sum(len(s.get("skipped_steps") or []) for s in sections)
        timings = record.get("timings") or {}
        return cls(video=str(video), seconds=float(timings.get("seconds", math.nan)),
                   sampling_seconds=float(timings.get("sampling_seconds", math.nan)),
                   computed_steps=computed, total_steps=computed + skipped)


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when it is not a finite, positive figure."""
    if not (denominator > 0 and math.isfinite(numerator) and math.isfinite(denominator)):
        return None
    return numerator / denominator


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A cached run against its uncached twin: per-frame PSNR (dB) and SSIM, times and speedups.

    ``planned_speedup`` is steps / computed steps of the cached run's plan
    (MagCache knows its plan before the run; TeaCache decides as it goes, so it
    has none).  The measured speedups are the uncached run's time over the
    cached run's: wall time (loading, decoding and writing included) and
    sampling time (the part the cache accelerates).
    """

    cached: RunTimes
    uncached: RunTimes
    cache: str
    planned_speedup: float | None
    psnr: list[float]
    ssim: list[float]
    lpips: list[float] | None = None     # only when LPIPS's weights are on disk (see lpips_note)
    lpips_note: str = ""

    @property
    def wall_speedup(self) -> float | None:
        return ratio(self.uncached.seconds, self.cached.seconds)

    @property
    def sampling_speedup(self) -> float | None:
        return ratio(self.uncached.sampling_seconds, self.cached.sampling_seconds)

    @property
    def psnr_mean_finite(self) -> float:
        """Mean PSNR over the frames that differ (identical frames are infinite); inf when none differs."""
        finite = [v for v in self.psnr if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.inf

    @property
    def psnr_min(self) -> float | None:
        return min(self.psnr) if self.psnr else None

    @property
    def ssim_mean(self) -> float | None:
        return sum(self.ssim) / len(self.ssim) if self.ssim else None

    @property
    def ssim_min(self) -> float | None:
        return min(self.ssim) if self.ssim else None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (infinite PSNR, for identical frames, as the string "inf")."""
        def db(values: list[float]) -> list[float | str]:
            return ["inf" if math.isinf(v) else round(v, 4) for v in values]

        mean_finite = self.psnr_mean_finite
        return {
            "cache": self.cache,
            "cached": dataclasses.asdict(self.cached),
            "uncached": dataclasses.asdict(self.uncached),
            "speedup": {"planned": self.planned_speedup, "wall": self.wall_speedup,
                        "sampling": self.sampling_speedup},
            "frames": len(self.psnr),
            "psnr": {"mean_finite": "inf" if math.isinf(mean_finite) else mean_finite,
                     "min": db([self.psnr_min])[0] if self.psnr else None,
                     "identical_frames": sum(math.isinf(v) for v in self.psnr), "per_frame": db(self.psnr)},
            "ssim": {"mean": self.ssim_mean, "min": self.ssim_min, "per_frame": [round(v, 6) for v in self.ssim]},
            "lpips": None if not self.lpips else {
                "mean": sum(self.lpips) / len(self.lpips), "max": max(self.lpips),
                "per_frame": [round(v, 6) for v in self.lpips]},
            "lpips_note": self.lpips_note,
        }


def planned_speedup(record: Mapping[str, Any]) -> float | None:
    """Steps over computed steps of the MagCache plan the record says ran (None without one)."""
    plan = (record.get("magcache") or {}).get("plan")
    if not plan:
        return None
    computed = sum(1 for step in plan if step != "skip")
    return len(plan) / computed if computed else None


def compare_runs(cached_video: PathLike, uncached_video: PathLike) -> Comparison:
    """Score ``cached_video`` against ``uncached_video`` (both with their records beside them).

    PSNR and SSIM come from :mod:`magcache_framepack.metrics` (torchmetrics), LPIPS too when
    its weights are already on disk (else ``lpips_note`` says why not; nothing is downloaded).
    Raises ValueError (from :func:`~magcache_framepack.metrics.compare_videos`) when the two
    cannot be compared frame by frame.
    """
    cached_record = read_record(sidecar_path(cached_video))
    uncached_record = read_record(sidecar_path(uncached_video))
    scores = compare_videos(uncached_video, cached_video)
    return Comparison(
        cached=RunTimes.from_record(cached_video, cached_record),
        uncached=RunTimes.from_record(uncached_video, uncached_record),
        cache=str((cached_record.get("settings") or {}).get("cache")),
        planned_speedup=planned_speedup(cached_record),
        psnr=[float(v) for v in scores["per_frame"]["psnr"]],
        ssim=[float(v) for v in scores["per_frame"]["ssim"]],
        lpips=scores["per_frame"]["lpips"], lpips_note=scores["lpips_note"])


def link_records(comparison: Comparison) -> None:
    """Write into each video's record which video it was compared with, and the result.

    Only the JSON beside each MP4 changes (atomically); the copy in the MP4's
    comment tag stays as the job wrote it.
    """
    summary = comparison.as_dict()
    brief = {"speedup": summary["speedup"], "psnr_mean_finite": summary["psnr"]["mean_finite"],
             "psnr_min": summary["psnr"]["min"], "ssim_mean": summary["ssim"]["mean"],
             "ssim_min": summary["ssim"]["min"]}
    for video, other, role in ((comparison.cached.video, comparison.uncached.video, "uncached reference"),
                               (comparison.uncached.video, comparison.cached.video, "cached version")):
        record = read_record(sidecar_path(video))
        record["compare"] = {"with": pathlib.Path(other).name, "which": role, **brief}
        write_sidecar(video, record)
