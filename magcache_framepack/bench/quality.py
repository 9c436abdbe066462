"""The ``compare`` tool and the video quality metrics: PSNR, SSIM and LPIPS of one video against a reference.

``python magcache_bench.py compare REF.mp4 OTHER.mp4 [--json FILE]`` scores
frame by frame; ``sweep`` scores each MagCache video against the uncached one
with the same :func:`compare_videos`.

Decisions worth knowing:

* PSNR of identical frames is infinite (MSE = 0).  We report it as ``inf``;
  the mean over frames is then ``inf`` as well when any frame is identical
  (the honest arithmetic mean).  JSON cannot hold infinity, so JSON writes the
  string ``"inf"`` (``float("inf")`` reads it back); ``null`` is reserved for
  "not measured" (LPIPS when unavailable).
* The metrics themselves are :mod:`magcache_framepack.metrics`' (torchmetrics:
  PSNR, SSIM with a Gaussian 11x11 window, sigma 1.5, frames on 0..1; LPIPS
  only when its AlexNet weights are already on disk, never downloaded), the
  same the app uses.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from magcache_framepack.bench.report import UsageError, fmt_db, write_json
from magcache_framepack.metrics import VideoMismatch, compare_videos

logger = logging.getLogger(__name__)

__all__ = ["VideoMismatch", "compare_videos", "format_compare", "add_parser", "run"]


def format_compare(result: dict[str, Any]) -> str:
    """The printed summary of :func:`compare_videos`: means and worst frames."""
    lp = result["lpips"]
    lines = [f"frames: {result['frames']}",
             f"PSNR (dB): mean {fmt_db(result['psnr']['mean'])}, min {fmt_db(result['psnr']['min'])}",
             f"SSIM:      mean {result['ssim']['mean']:.4f}, min {result['ssim']['min']:.4f}",
             (f"LPIPS:     mean {lp['mean']:.4f}, max {lp['max']:.4f}" if lp else result["lpips_note"])]
    return "\n".join(lines)



# ---------------------------------------------------------------------------
# The compare subcommand
# ---------------------------------------------------------------------------

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``compare REFERENCE OTHER``: its flags, and :func:`run` as what it does."""
    cp = subparsers.add_parser("compare", help="PSNR / SSIM / LPIPS of one video against a reference")
    cp.add_argument("reference", help="the reference video (e.g. the uncached one)")
    cp.add_argument("other", help="the video to score")
    cp.add_argument("--no-lpips", action="store_true", help="skip LPIPS even if available")
    cp.add_argument("--json", metavar="FILE", help="write the scores as JSON")
    cp.set_defaults(run=run)
    return cp


def run(args: argparse.Namespace) -> int:
    """Score, print, write JSON.  Videos that cannot be compared exit 2 with one line saying why, no traceback."""
    import av

    for p in (args.reference, args.other):
        if not os.path.isfile(p):
            raise UsageError(f"video file not found: {p}")
    try:
        result = compare_videos(args.reference, args.other, use_lpips=not args.no_lpips)
        logger.info(result["lpips_note"])
    except VideoMismatch as exc:
        print(f"magcache_bench.py compare: refused: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, av.error.FFmpegError) as exc:   # unreadable or not a video
        print(f"magcache_bench.py compare: cannot decode: {exc}", file=sys.stderr)
        return 2
    print(format_compare(result))
    if args.json:
        write_json(args.json, {k: result[k] for k in ("frames", "psnr", "ssim", "lpips", "lpips_note",
                                                      "reference", "other", "per_frame")})
    return 0
