"""The MP4 writer: frames in, the same bytes out on every run.

Every video the package writes (each section's, the apps', the tools') goes
through :func:`write_mp4`, and every record names its frames with
:func:`frames_sha256`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import pathlib
from collections.abc import Mapping

import numpy as np
import torch

from magcache_framepack.records import atomic_target
from magcache_framepack.settings import FPS, is_int


#: x264 frame threads, fixed: the stream records its thread count and the count changes
#: x264's decisions, so a count taken from the machine (x264's default) would make each
#: machine write its own bytes.  4 encoded 90 frames of 640x544 1.3x faster than 1 thread
#: on a 2-core machine (README, "Same job, same video").
X264_THREADS = 4


def _grid_columns(batch: int) -> int:
    """Videos per row when a batch is tiled into one frame: the largest of 6..2 dividing it."""
    return next((c for c in (6, 5, 4, 3, 2) if batch % c == 0), batch)


def video_frames(frames_bcthw: torch.Tensor) -> np.ndarray:
    """The uint8 RGB frames, (time, height, width, 3), that :func:`write_mp4` hands the encoder.

    ``frames_bcthw`` is (batch, channel, time, height, width) in [-1, 1], as
    FramePack's VAE decodes it.  A batch is tiled into a grid.  yuv420p needs
    even sides, so an odd height or width gets its last row/column repeated.
    These are the frames the record's ``frames_sha256`` names.
    """
    if frames_bcthw.ndim != 5 or frames_bcthw.shape[1] != 3:
        raise ValueError(f"frames must be (batch, 3, time, height, width), got {tuple(frames_bcthw.shape)}")
    b, _, t, h, w = frames_bcthw.shape
    cols = _grid_columns(b)
    x = (frames_bcthw.detach().float().clamp(-1.0, 1.0) * 127.5 + 127.5).round().to(torch.uint8).cpu()
    x = x.reshape(b // cols, cols, 3, t, h, w).permute(3, 0, 4, 1, 5, 2).reshape(t, (b // cols) * h, cols * w, 3)
    pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
    if pad_h or pad_w:
        x = torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (0, pad_w, 0, pad_h), mode="replicate")
        x = x.to(torch.uint8).permute(0, 2, 3, 1)
    return x.contiguous().numpy()


@functools.cache
def cpu_features() -> dict[str, bool]:
    """This CPU's instruction-set extensions as numpy's runtime dispatch detected them.

    numpy checks both the CPU and the operating system's support (AVX-512
    needs the OS to save its registers), on every OS numpy runs on.  Where
    numpy's table cannot be read, Linux's ``/proc/cpuinfo`` flags stand in;
    elsewhere the answer is empty, which :func:`x264_asm_cap` reads as "no
    AVX-512" and so leaves x264's own choice.
    """
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            features = importlib.import_module(module).__cpu_features__
        except (ImportError, AttributeError):
            continue
        return {str(k): bool(v) for k, v in features.items()}
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {flag.upper(): True for flag in flags}


def x264_asm_cap(features: Mapping[str, bool]) -> str | None:
    """The x264 ``asm`` setting for a CPU with these features: "AVX2" where it has AVX-512, else None.

    x264's AVX-512 code reads memory it never wrote, so on a CPU with AVX-512
    the same frames encode to other bytes depending on what the process's
    heap held before (measured in the README).  Capping x264 at AVX2 removes
    that, and gives the same stream as the SSE4.2, AVX and AVX2 levels.  The cap
    is only ever set where AVX-512 is present, and every such CPU has AVX2,
    so x264 is never told to use an instruction set the CPU lacks; elsewhere
    x264 detects the CPU itself (None).
    """
    return "AVX2" if features.get("AVX512F") else None


def x264_options(crf: int, features: Mapping[str, bool]) -> dict[str, str]:
    """The libx264 options :func:`write_mp4` encodes with: the CRF, and the AVX-512 cap where it applies."""
    options = {"crf": str(int(crf))}
    cap = x264_asm_cap(features)
    if cap is not None:
        options["x264-params"] = f"asm={cap}"
    return options


def _check_video(video: np.ndarray) -> None:
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3:
        raise ValueError(f"frames must be a uint8 array (time, height, width, 3), got "
                         f"{getattr(video, 'dtype', type(video).__name__)} {tuple(getattr(video, 'shape', ()))}")


def frames_sha256(video: np.ndarray) -> str:
    """SHA-256 of uint8 frames' bytes in (time, height, width, RGB) order: "same frames" apart from "same MP4"."""
    _check_video(video)
    return hashlib.sha256(np.ascontiguousarray(video).tobytes()).hexdigest()


def write_mp4(video: np.ndarray, path: str | os.PathLike, fps: int = FPS, crf: int = 16,
              comment: str | None = None) -> str:
    """Write uint8 RGB frames (time, height, width, 3; see :func:`video_frames`) as an H.264 MP4 with PyAV.

    The same frames and settings give the same video stream bytes in every
    process and at any torch thread count, on every x86-64 CPU with SSE4.2 or
    newer, for one PyAV build: x264 runs with a fixed thread count and, where
    the CPU has AVX-512, capped at AVX2 (:func:`x264_asm_cap` says why).  The file is
    written under a temporary name and renamed, so a reader never sees a
    half-written video.  ``comment`` goes into the container's ``comment``
    tag (the job's JSON record).
    """
    import av

    _check_video(video)
    if not is_int(crf) or not 0 <= crf <= 51:
        raise ValueError(f"crf = {crf!r}: must be an integer from 0 to 51")
    if video.shape[1] % 2 or video.shape[2] % 2:
        raise ValueError(f"yuv420p needs even sides, got {video.shape[2]}x{video.shape[1]} (see video_frames)")

    with atomic_target(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        if comment is not None:
            container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=int(fps), options=x264_options(crf, cpu_features()))
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_type = "FRAME"
        stream.codec_context.thread_count = X264_THREADS
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return str(path)
