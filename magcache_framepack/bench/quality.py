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
* SSIM is our own: Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03,
  data range 255, computed per RGB channel over the "valid" region (no
  padding) and averaged over channels and pixels.
* LPIPS runs only offline: without the ``lpips`` package or torchvision's
  AlexNet weights already in the torch hub cache it is skipped with a note,
  never downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from magcache_framepack.bench.report import UsageError, fmt_db, write_json
from magcache_framepack.records import iter_video_frames

logger = logging.getLogger(__name__)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(ref: np.ndarray, other: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; ``inf`` for identical frames."""
    if ref.shape != other.shape:
        raise ValueError(f"PSNR needs frames of one shape, got {ref.shape} and {other.shape}")
    mse = float(np.mean((ref.astype(np.float64) - other.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian; SSIM's 2-D window is its outer product (separable)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _gaussian_blur_valid(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian over the last two axes of (..., H, W), "valid" region only.

    Sliding windows + a matrix-vector product: several times faster on a CPU
    than torch's depthwise conv in float64, and exact to rounding.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    g = gaussian_window()
    x = sliding_window_view(x, SSIM_WINDOW, axis=-2) @ g
    return sliding_window_view(x, SSIM_WINDOW, axis=-1) @ g


def ssim(ref: np.ndarray, other: np.ndarray, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004), Gaussian-weighted, mean over channels and valid pixels.

    Local means, variances and covariance come from a separable 11x11 Gaussian
    (sigma 1.5) without padding, so border pixels never see invented values.
    Accepts HxW or HxWxC frames.
    """
    if ref.shape != other.shape:
        raise ValueError(f"SSIM needs frames of one shape, got {ref.shape} and {other.shape}")
    if ref.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or HxWxC frame, got shape {ref.shape}")
    if min(ref.shape[0], ref.shape[1]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {ref.shape[:2]}")
    x = np.asarray(ref, dtype=np.float64)
    y = np.asarray(other, dtype=np.float64)
    if x.ndim == 3:                       # channels first, so the blur runs over (H, W)
        x, y = np.moveaxis(x, -1, 0), np.moveaxis(y, -1, 0)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mx, my = _gaussian_blur_valid(x), _gaussian_blur_valid(y)
    vx = _gaussian_blur_valid(x * x) - mx * mx
    vy = _gaussian_blur_valid(y * y) - my * my
    cxy = _gaussian_blur_valid(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(smap.mean())


class VideoMismatch(ValueError):
    """Two videos that cannot be compared frame by frame."""


def lpips_scorer(device: str = "cpu") -> tuple[Callable[[np.ndarray, np.ndarray], float] | None, str]:
    """An LPIPS (AlexNet) scorer if it can run offline, else (None, why not).

    LPIPS needs the ``lpips`` package and torchvision's pretrained AlexNet,
    which torchvision downloads on first use.  We look for the weights in the
    torch hub cache first and never trigger a download.
    """
    import importlib.util

    if importlib.util.find_spec("lpips") is None:
        return None, "LPIPS skipped: the lpips package is not installed (pip install lpips)"
    try:
        from torchvision.models import AlexNet_Weights
    except ImportError as exc:
        return None, f"LPIPS skipped: torchvision is unavailable ({exc})"
    url = AlexNet_Weights.IMAGENET1K_V1.url
    cached = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not cached.is_file():
        return None, (f"LPIPS skipped: torchvision's pretrained AlexNet weights are not in the local cache "
                      f"({cached}); they must be downloaded once from {url}")
    try:
        import lpips

        with contextlib.redirect_stdout(io.StringIO()):
            net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except (OSError, RuntimeError, ValueError, ImportError) as exc:
        return None, f"LPIPS skipped: could not load the LPIPS network ({exc})"

    def score(ref: np.ndarray, other: np.ndarray) -> float:
        def prep(f: np.ndarray) -> torch.Tensor:
            return (torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None].float() / 127.5 - 1).to(device)
        with torch.no_grad():
            return float(net(prep(ref), prep(other)).mean())

    return score, "LPIPS: AlexNet (lpips package)"


def _summary(values: list[float], worst: str) -> dict[str, float]:
    return {"mean": float(np.mean(values)) if values else math.nan,
            worst: (min(values) if worst == "min" else max(values)) if values else math.nan}


def compare_videos(ref_path: str | os.PathLike, other_path: str | os.PathLike,
                   use_lpips: bool = True) -> dict[str, Any]:
    """Frame-by-frame PSNR / SSIM (/ LPIPS) of ``other`` against ``ref``.

    Frames are streamed in lockstep (memory stays at two frames).  Different
    frame sizes or counts raise :class:`VideoMismatch` naming both.
    """
    scorer, lpips_note = lpips_scorer() if use_lpips else (None, "LPIPS not requested")
    logger.info(lpips_note)
    psnrs: list[float] = []
    ssims: list[float] = []
    lpipss: list[float] = []
    n_ref = n_other = 0
    for a, b in itertools.zip_longest(iter_video_frames(ref_path), iter_video_frames(other_path)):
        n_ref += a is not None
        n_other += b is not None
        if a is None or b is None:
            continue
        if a.shape != b.shape:
            raise VideoMismatch(f"frame sizes differ: {ref_path} is {a.shape[1]}x{a.shape[0]}, "
                                f"{other_path} is {b.shape[1]}x{b.shape[0]}; compare videos of one size")
        psnrs.append(psnr(a, b))
        ssims.append(ssim(a, b))
        if scorer is not None:
            lpipss.append(scorer(a, b))
    if n_ref != n_other:
        raise VideoMismatch(f"frame counts differ: {ref_path} has {n_ref} frames, {other_path} has {n_other}; "
                            "compare videos of one length")
    if n_ref == 0:
        raise VideoMismatch(f"{ref_path} and {other_path} hold no video frames")
    return {
        "reference": str(ref_path), "other": str(other_path), "frames": n_ref,
        "psnr": _summary(psnrs, "min"), "ssim": _summary(ssims, "min"),
        "lpips": _summary(lpipss, "max") if scorer is not None else None,
        "lpips_note": lpips_note,
        "per_frame": {"psnr": psnrs, "ssim": ssims, "lpips": lpipss if scorer is not None else None},
    }


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
