"""Video quality metrics from a maintained library: PSNR, SSIM (and LPIPS when it can run offline).

PSNR and SSIM are torchmetrics' functional ones, called on batches of frames
(torch-based and batched like our frames; the same library has LPIPS).  One
setting for all callers, the bench's ``compare`` and ``sweep`` and the app:

* frames are RGB uint8 (N, H, W, 3), scaled to 0..1 and scored with
  ``data_range=1.0``: PSNR in float64, SSIM in float32 (torch's float64
  convolution on a CPU is ~50x slower; in float32 on the 0..1 scale SSIM is
  within ~2e-5 of float64, where on the 0..255 scale flat areas lose 4e-4);
* SSIM: Gaussian window, sigma 1.5 (torchmetrics derives the 11x11 size from
  it), K1 = 0.01, K2 = 0.03, one window at every pixel (torchmetrics mirrors
  the image at its border), averaged over pixels and channels;
* PSNR of identical frames is infinite (MSE = 0) and reported as ``inf``;
  the mean over frames is then ``inf`` as well (the honest arithmetic mean).
* LPIPS (AlexNet, torchmetrics) runs only when torchvision's pretrained AlexNet
  weights are already in the torch hub cache; otherwise one line says it is
  unavailable and nothing is downloaded.

What these numbers mean for a cached video: distance to the uncached video of
the same job, frame by frame, not quality in itself (see the README).
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from magcache_framepack.records import iter_video_frames

#: The scale frames are scored on: 8-bit RGB divided by 255.
DATA_RANGE = 1.0
#: SSIM's Gaussian window: sigma (the 11x11 size follows from it) and the stability constants.
SSIM_SIGMA = 1.5
SSIM_KERNEL = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: Frames scored per torchmetrics call: bounds memory for long videos (SSIM keeps ~10 float64 copies).
BATCH = 8


def _as_batch(frames: Any) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) frames (uint8 array or tensor) as float64 (N, 3, H, W) on 0..1."""
    x = torch.as_tensor(np.asarray(frames))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB frames of shape (N, H, W, 3), got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).to(torch.float64) / 255.0


def frame_metrics(frames_a: Any, frames_b: Any) -> dict[str, list[float]]:
    """Per-frame PSNR (dB) and SSIM of ``frames_b`` against ``frames_a``: torchmetrics, one setting.

    Both are RGB uint8 of one shape, (N, H, W, 3).  Returns
    ``{"psnr": [...], "ssim": [...]}`` with one float per frame.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = _as_batch(frames_a), _as_batch(frames_b)
    if a.shape != b.shape:
        raise ValueError(f"frame metrics need frames of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < SSIM_KERNEL:
        raise ValueError(f"SSIM needs frames at least {SSIM_KERNEL}x{SSIM_KERNEL} pixels, got {tuple(a.shape[-2:])}")
    psnr = peak_signal_noise_ratio(b, a, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(b.float(), a.float(), gaussian_kernel=True, sigma=SSIM_SIGMA,
                                               kernel_size=SSIM_KERNEL, data_range=DATA_RANGE,
                                               k1=SSIM_K1, k2=SSIM_K2, reduction="none")
    return {"psnr": [float(v) for v in psnr], "ssim": [float(v) for v in ssim]}


def alexnet_weights_file() -> pathlib.Path | None:
    """Where torchvision keeps its pretrained AlexNet in the torch hub cache (None without torchvision)."""
    try:
        from torchvision.models import AlexNet_Weights
    except ImportError:
        return None
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)


def lpips_scorer() -> tuple[Callable[[Any, Any], list[float]] | None, str]:
    """A per-frame LPIPS (AlexNet, torchmetrics) scorer if its weights are on disk, else (None, one line why).

    The backbone's file is looked for first; the network is built only when it
    is there, so nothing is ever downloaded.
    """
    cached = alexnet_weights_file()
    if cached is None:
        return None, "LPIPS unavailable: torchvision is not installed"
    if not cached.is_file():
        return None, (f"LPIPS unavailable: torchvision's pretrained AlexNet is not in the torch hub cache "
                      f"({cached}); nothing was downloaded")
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()
    except (OSError, RuntimeError, ValueError, ImportError) as exc:
        return None, f"LPIPS unavailable: could not load the network ({exc})"

    def score(frames_a: Any, frames_b: Any) -> list[float]:
        a, b = _as_batch(frames_a).float(), _as_batch(frames_b).float()
        out = []
        with torch.no_grad():
            for i in range(a.shape[0]):       # the metric averages a batch: one frame at a time
                metric.reset()
                out.append(float(metric(b[i:i + 1], a[i:i + 1])))
        return out

    return score, "LPIPS: AlexNet (torchmetrics)"


class VideoMismatch(ValueError):
    """Two videos that cannot be compared frame by frame."""


def _summary(values: list[float], worst: str) -> dict[str, float]:
    return {"mean": float(np.mean(values)) if values else math.nan,
            worst: (min(values) if worst == "min" else max(values)) if values else math.nan}


def _batches(ref_path: str | os.PathLike, other_path: str | os.PathLike) -> Any:
    """Lockstep batches of (ref frames, other frames); VideoMismatch for other sizes or counts."""
    n_ref = n_other = 0
    batch: list[tuple[np.ndarray, np.ndarray]] = []
    for a, b in itertools.zip_longest(iter_video_frames(ref_path), iter_video_frames(other_path)):
        n_ref += a is not None
        n_other += b is not None
        if a is None or b is None:
            continue
        if a.shape != b.shape:
            raise VideoMismatch(f"frame sizes differ: {ref_path} is {a.shape[1]}x{a.shape[0]}, "
                                f"{other_path} is {b.shape[1]}x{b.shape[0]}; compare videos of one size")
        batch.append((a, b))
        if len(batch) == BATCH:
            yield np.stack([p[0] for p in batch]), np.stack([p[1] for p in batch])
            batch = []
    if n_ref != n_other:
        raise VideoMismatch(f"frame counts differ: {ref_path} has {n_ref} frames, {other_path} has {n_other}; "
                            "compare videos of one length")
    if n_ref == 0:
        raise VideoMismatch(f"{ref_path} and {other_path} hold no video frames")
    if batch:
        yield np.stack([p[0] for p in batch]), np.stack([p[1] for p in batch])


def compare_videos(ref_path: str | os.PathLike, other_path: str | os.PathLike,
                   use_lpips: bool = True) -> dict[str, Any]:
    """Frame-by-frame PSNR / SSIM (/ LPIPS) of ``other`` against ``ref``, decoded from the two files.

    Frames are streamed in lockstep, :data:`BATCH` at a time.  Different frame
    sizes or counts raise :class:`VideoMismatch` naming both.
    """
    scorer, lpips_note = lpips_scorer() if use_lpips else (None, "LPIPS not requested")
    per: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    for a, b in _batches(ref_path, other_path):
        m = frame_metrics(a, b)
        per["psnr"] += m["psnr"]
        per["ssim"] += m["ssim"]
        if scorer is not None:
            per["lpips"] += scorer(a, b)
    return {
        "reference": str(ref_path), "other": str(other_path), "frames": len(per["psnr"]),
        "psnr": _summary(per["psnr"], "min"), "ssim": _summary(per["ssim"], "min"),
        "lpips": _summary(per["lpips"], "max") if scorer is not None else None,
        "lpips_note": lpips_note,
        "per_frame": {"psnr": per["psnr"], "ssim": per["ssim"],
                      "lpips": per["lpips"] if scorer is not None else None},
    }
