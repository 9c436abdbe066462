"""One generation job: FramePack's section loop with MagCache, headless.

This module is what the Gradio app, the CLI and the benchmarks share: one
generation job run section by section on the models :mod:`.models` loads, with
the settings of :mod:`.settings`, written by :mod:`.video`, recorded by
:mod:`.records`, and the report of what MagCache did in every section.

FramePack and FramePack-F1 run through ONE section loop.  What differs between
them is captured by :class:`.models.Variant` (model repository, section
order) and by the history layout (:class:`_InvertedHistory`
for FramePack, which generates the video back to front, and
:class:`_ForwardHistory` for F1, which generates it front to back).

Nothing heavy happens at import time: FramePack's modules, diffusers and
transformers are imported when first needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import logging
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import magcache_core

from magcache_framepack.records import (FORMAT, VERSION, dumps, file_sha256, image_record, package_versions,
                                        publish_new, write_once, write_sidecar)
from magcache_framepack.models import Models, Variant, framepack_modules, get_variant
from magcache_framepack.sensitivity import framepack_step_weights
from magcache_framepack.settings import (FPS, FRAMEPACK_RESOLUTION, JobSettings, bucket_resolution, profile_file_stem,
                                         section_count)
from magcache_framepack.video import frames_sha256, video_frames, write_mp4


logger = logging.getLogger(__name__)


#: Text tokens FramePack keeps for the LLaMA prompt embedding (crop or zero-pad).
PROMPT_TOKENS = 512


#: GB FramePack keeps free on the GPU when it offloads the transformer before VAE decoding.
OFFLOAD_PRESERVED_MEMORY_GB = 8.0


def magcache_config(settings: JobSettings, variant: str | Variant, model: str | None = None,
                    frame_resolution: float | None = None) -> magcache_core.MagCacheConfig:
    """The MagCache settings of a job for ``variant``: the one route from a ratio choice to a plan.

    The ratios are the profile's when one is set, else the library's table
    for ``frame_resolution`` ((height + width) / 2 of the frames; the bucket
    target when not known yet).  A profile calibrated for the other variant,
    or on another model than ``model`` (see :attr:`.models.Models.model_id`), is
    refused with a ValueError.  With ``settings.target_speedup`` the threshold, K
    and retention are the planner's choice on these ratios
    (:func:`magcache_core.plan_for_target`), ranked with FramePack's step weights
    (:mod:`.sensitivity`) and the profile's cosine distances; an unreachable target
    is a ValueError naming the fastest reachable speed-up.
    """
    spec = get_variant(variant)
    resolution = frame_resolution or settings.resolution
    if settings.mag_ratios is not None:
        ratios, source = settings.mag_ratios, f"profile {pathlib.Path(settings.mag_ratios).name}"
    else:
        ratios, source = magcache_core.library_ratios(spec.name, resolution, settings.steps, settings.resample)
    config = magcache_core.MagCacheConfig(
        magcache_thresh=settings.magcache_thresh, magcache_K=settings.magcache_K,
        retention_ratio=settings.retention_ratio, num_steps=settings.steps, mag_ratios=ratios,
        calibrate=settings.calibrate, resample=settings.resample, variant=spec.name, model=model, source=source,
        step_weights=framepack_step_weights(settings.steps, resolution, settings.latent_window_size))
    if settings.target_speedup is not None and not settings.calibrate:
        chosen = magcache_core.plan_for_target(config.mag_ratios, config.num_steps, settings.target_speedup,
                                               config.resample, **config.error_tables()).chosen
        config.magcache_thresh, config.magcache_K, config.retention_ratio = (
            chosen.magcache_thresh, chosen.magcache_K, chosen.retention_ratio)
    return config


def ratio_source(config: magcache_core.MagCacheConfig) -> str:
    """A sentence saying which ratio table a MagCache config plans from, and why."""
    if config.profile is not None:
        p = config.profile
        where = f", {p.resolution} px" if p.resolution else ""
        fitted = "" if p.num_steps == config.num_steps else f", resampled to {config.num_steps} steps"
        return (f"{config.source or 'calibration profile'} (chosen by you): {p.variant}{where}, "
                f"{p.num_steps} steps{fitted}, {p.runs} run(s), model {p.model}")
    return config.source or "a ratio table given in code"


def magcache_summary(config: magcache_core.MagCacheConfig) -> dict[str, Any]:
    """The MagCache part of a video record: settings, the ratio table and the plan that ran."""
    plan = config.schedule()
    return {
        "magcache_thresh": config.magcache_thresh, "magcache_K": config.magcache_K,
        "retention_ratio": config.retention_ratio, "num_steps": config.num_steps,
        "resample": config.resample, "calibrate": config.calibrate,
        "ratio_source": ratio_source(config), "ratios": list(config.mag_ratios),
        "plan": ["skip" if skip else "compute" for skip in plan],
        "computed_steps": [i for i, skip in enumerate(plan) if not skip],
        "planned_error": config.planned_error(),
    }


def bucket_options(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets for ``resolution``: FramePack's 640 table, scaled and snapped to 16 px."""
    base = framepack_modules().bucket_tools.bucket_options[FRAMEPACK_RESOLUTION]
    if resolution == FRAMEPACK_RESOLUTION:
        return list(base)
    scale = resolution / FRAMEPACK_RESOLUTION

    def snap(x: float) -> int:
        return max(16, round(x * scale / 16) * 16)

    return list(dict.fromkeys((snap(h), snap(w)) for h, w in base))


def find_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The bucket closest in aspect ratio to an image, as FramePack picks it (FramePack's own at 640)."""
    if resolution == FRAMEPACK_RESOLUTION:
        bucket_tools = framepack_modules().bucket_tools
        return tuple(bucket_tools.find_nearest_bucket(height, width, resolution=resolution))
    best, best_metric = None, float("inf")
    for bucket_h, bucket_w in bucket_options(resolution):
        metric = abs(height * bucket_w - width * bucket_h)
        if metric <= best_metric:        # ties go to the later bucket, as in FramePack
            best, best_metric = (bucket_h, bucket_w), metric
    assert best is not None
    return best


def job_resolution(models: Models, settings: JobSettings) -> int:
    """The bucket resolution a job really uses: tiny models are capped at TINY_RESOLUTION."""
    return bucket_resolution(settings.resolution, models.tiny)


def prepare_input_image(image: Any) -> np.ndarray:
    """Check the input image and return it as HxWx3 uint8.

    RGBA is accepted and its alpha dropped (Gradio and PIL hand out RGBA for PNGs
    with transparency; FramePack conditions on RGB only).  Anything else raises a
    ValueError that says what is accepted.
    """
    accepted = "an RGB image as a numpy array of shape (height, width, 3) and dtype uint8 (RGBA is also accepted)"
    if image is None:
        raise ValueError(f"No input image: give {accepted}.")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"Input image is a {type(image).__name__}; expected {accepted}.")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"Input image has shape {tuple(image.shape)}; expected {accepted}.")
    if image.dtype != np.uint8:
        raise ValueError(f"Input image has dtype {image.dtype}; expected {accepted}.")
    if image.shape[0] < 16 or image.shape[1] < 16:
        raise ValueError(f"Input image is {image.shape[1]}x{image.shape[0]} pixels; it must be at least 16x16.")
    return np.ascontiguousarray(image[:, :, :3])


def vae_encode(image: torch.Tensor, vae: Any, seed: int) -> torch.Tensor:
    """The start latent: a sample of the VAE posterior drawn from a generator seeded by the job.

    FramePack's own ``vae_encode`` draws this sample from torch's global RNG,
    which torch seeds from OS entropy in every new process
    (``torch.initial_seed()`` differs between two runs of the same command) and
    which anything else in the process may have advanced.  So the same job gave
    another video in another process, or after another job.  A CPU generator
    seeded from the job's seed makes the sample, and so the video, a function
    of the settings alone: the same on every worker, thread count and device.
    """
    posterior = vae.encode(image.to(device=vae.device, dtype=vae.dtype)).latent_dist
    sample = posterior.sample(generator=torch.Generator("cpu").manual_seed(seed))
    return sample * vae.config.scaling_factor


@dataclasses.dataclass(frozen=True)
class InputFile:
    """A job's input image as a PNG in the outputs folder, named by its pixels: one file per distinct image.

    ``input-<first 16 hex digits of the SHA-256 of the pixels>.png``: a second job on the same image
    shares the file instead of adding a copy.  ``data`` is the PNG to write when none is there yet.
    """

    path: pathlib.Path
    data: bytes

    def write(self) -> None:
        write_once(self.path, self.data)

    def record(self) -> dict[str, str]:
        """The entry the video's record names it by (the file already there, if an earlier job wrote it)."""
        sha = file_sha256(self.path) if self.path.is_file() else hashlib.sha256(self.data).hexdigest()
        return {"name": self.path.name, "path": str(self.path.resolve()), "sha256": sha}


def input_file(outputs_dir: str | os.PathLike, image: np.ndarray) -> InputFile:
    """Where ``image`` (HxWx3 uint8) is kept in ``outputs_dir``, and its PNG (nothing is written here)."""
    from PIL import Image

    pixels = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()[:16]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return InputFile(pathlib.Path(outputs_dir) / f"input-{digest}.png", buffer.getvalue())


#: The image files a job reads (what Pillow decodes), for error messages.
IMAGE_FORMATS = "PNG, JPEG, WebP, BMP, TIFF or GIF"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as HxWx3 uint8, checked as :func:`prepare_input_image` checks arrays.

    Anything Pillow cannot decode (a text file renamed .png, a truncated file)
    raises a ValueError that names the file and the formats that work.
    """
    from PIL import Image, UnidentifiedImageError

    name = pathlib.Path(path).name
    try:
        with Image.open(path) as im:
            im.load()
            array = np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ValueError(f"{name} is not a readable image: use a {IMAGE_FORMATS} file") from None
    return prepare_input_image(array)


@dataclasses.dataclass
class SectionReport:
    """One finished section.

    ``index`` counts sections in generation order from 0 (for FramePack that is
    from the END of the video backwards).  ``seconds`` is the section's whole
    wall time (sampling, VAE decode, MP4); ``sampling_seconds`` the sampler only,
    which is what a cache speeds up.  ``frames`` is the length of the partial
    video written at ``video_path``.
    """

    index: int
    total: int
    computed_steps: list[int]
    skipped_steps: list[int]
    seconds: float
    video_path: str
    frames: int
    sampling_seconds: float = 0.0

    def summary(self) -> str:
        steps = len(self.computed_steps) + len(self.skipped_steps)
        skipped = f" {self.skipped_steps}" if self.skipped_steps else ""
        return (f"Section {self.index + 1}/{self.total}: computed {len(self.computed_steps)}/{steps} steps, "
                f"skipped {len(self.skipped_steps)}{skipped}; {self.seconds:.1f} s "
                f"(sampling {self.sampling_seconds:.1f} s); {self.frames} frames")


@dataclasses.dataclass
class JobResult:
    """How a job ended.

    ``status``: "done", "stopped" (by should_stop; the partial videos stay) or
    "error" (``message`` says why).  ``video_path`` is the longest video written.
    """

    status: str
    message: str
    video_path: str | None = None
    sections: list[SectionReport] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    profile_path: str | None = None
    calibration: magcache_core.MagCacheProfile | None = None
    job_id: str | None = None
    record: dict[str, Any] | None = None     # how the last video was made (its JSON beside it)

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the UI, the console and the CLI: one per section, then totals."""
        lines = [f"{self.status}: {self.message}"]
        lines += [s.summary() for s in self.sections]
        if self.sections:
            computed = sum(len(s.computed_steps) for s in self.sections)
            skipped = sum(len(s.skipped_steps) for s in self.sections)
            total = computed + skipped
            share = 100.0 * skipped / total if total else 0.0
            sampling = sum(s.sampling_seconds for s in self.sections)
            lines.append(f"Total: computed {computed}/{total} steps, skipped {skipped} ({share:.0f}%); "
                         f"{self.seconds:.1f} s (sampling {sampling:.1f} s)")
        if self.video_path:
            lines.append(f"Video: {self.video_path}")
        if self.profile_path:
            lines.append(f"Calibration profile: {self.profile_path}")
        return lines


@dataclasses.dataclass
class ProgressUpdate:
    """A progress event: a stage change (step 0) or one finished sampling step.

    ``percent`` is the progress of the current section's sampling, as FramePack's
    progress bar shows it; ``section`` is the 0-based section in generation
    order.  ``preview`` is FramePack's cheap latent-to-RGB preview (HxWx3 uint8,
    the section's frames side by side), only on sampling steps.
    """

    preview: np.ndarray | None
    percent: int
    desc: str
    section: int
    step: int
    steps: int
    time: float = dataclasses.field(default_factory=time.perf_counter)   # when it happened (perf_counter)


class JobStopped(Exception):
    """Raised inside the sampler's step callback when should_stop() says so, to abort mid-section."""


class _History:
    """Latent and pixel history of a job, and the conditioning each section gets from it.

    Subclasses fix the layout: where new latents go, which history latents feed
    the 1x/2x/4x clean-latent inputs (with which RoPE frame indices), and which
    end of the pixel video a new section is blended onto.
    """

    def __init__(self, start_latent: torch.Tensor, window: int, sections: int) -> None:
        self.start_latent = start_latent.float().cpu()
        self.window = window
        self.sections = sections
        self.pixels: torch.Tensor | None = None
        self.total_latents = 0          # latents of the video so far (names the partial MP4s)

    def positions(self) -> list[int]:
        """One value per section, in generation order, saying where the section goes in the video.

        FramePack: its latent padding, the blank latents between the input image
        and the section (sections count down to the start).  F1: the section's index.
        """
        raise NotImplementedError

    def conditioning(self, position: int) -> dict[str, torch.Tensor]:
        """The history keyword arguments of ``sample_hunyuan`` for a section."""
        raise NotImplementedError

    def add(self, generated: torch.Tensor, position: int) -> None:
        """Put a section's new latents into the history."""
        raise NotImplementedError

    def decode(self, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Decode what the last section changed and blend it into the pixel history."""
        raise NotImplementedError

    def _overlap(self) -> int:
        # pixel frames shared by a newly decoded stretch and the video so far: one window's worth
        return self.window * 4 - 3


class _InvertedHistory(_History):
    """FramePack: sections are generated from the end of the video back to the start.

    Every section is anchored on the input image (frame index 0) and on the
    latents generated so far, which lie AFTER it in time; a gap of
    ``padding * window`` blank frame indices stands for the part not generated
    yet.  The last section generated is the video's start and gets the input
    image's latent prepended.
    """

    def __init__(self, start_latent: torch.Tensor, window: int, sections: int) -> None:
        super().__init__(start_latent, window, sections)
        _, c, _, h, w = start_latent.shape
        self.latents = torch.zeros((1, c, 1 + 2 + 16, h, w), dtype=torch.float32)
        self._last_position: int | None = None

    def positions(self) -> list[int]:
        """Each section's padding (blank windows before it); 0 marks the video's first section.

        Beyond 4 sections FramePack repeats padding 2 in the middle instead of
        counting down, which it found to look better than larger gaps.
        """
        if self.sections > 4:
            return [3] + [2] * (self.sections - 3) + [1, 0]
        return list(reversed(range(self.sections)))

    def conditioning(self, position: int) -> dict[str, torch.Tensor]:
        blank = position * self.window
        sizes = [1, blank, self.window, 1, 2, 16]
        start_idx, _, latent_idx, after_idx, idx_2x, idx_4x = \
            torch.arange(sum(sizes)).unsqueeze(0).split(sizes, dim=1)
        after, clean_2x, clean_4x = self.latents[:, :, :19].split([1, 2, 16], dim=2)
        return dict(
            latent_indices=latent_idx,
            clean_latents=torch.cat([self.start_latent, after], dim=2),
            clean_latent_indices=torch.cat([start_idx, after_idx], dim=1),
            clean_latents_2x=clean_2x, clean_latent_2x_indices=idx_2x,
            clean_latents_4x=clean_4x, clean_latent_4x_indices=idx_4x,
        )

    def add(self, generated: torch.Tensor, position: int) -> None:
        generated = generated.float().cpu()
        if position == 0:
            generated = torch.cat([self.start_latent, generated], dim=2)
        self.total_latents += generated.shape[2]
        self.latents = torch.cat([generated, self.latents], dim=2)
        self._last_position = position

    def decode(self, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        real = self.latents[:, :, :self.total_latents]
        if self.pixels is None:
            self.pixels = decode(real)
        else:
            # the new window plus the one after it, so the blend has real neighbours on both sides
            fresh = self.window * 2 + (1 if self._last_position == 0 else 0)
            self.pixels = framepack_modules().utils.soft_append_bcthw(
                decode(real[:, :, :fresh]), self.pixels, self._overlap())
        return self.pixels


class _ForwardHistory(_History):
    """FramePack-F1: sections are generated in playback order.

    The history starts with 19 zero latents and the input image's latent; each
    section is conditioned on the input image, the latest latent (1x), the two
    before it (2x) and the sixteen before those (4x), all BEFORE it in time.
    """

    def __init__(self, start_latent: torch.Tensor, window: int, sections: int) -> None:
        super().__init__(start_latent, window, sections)
        _, c, _, h, w = start_latent.shape
        self.latents = torch.cat([torch.zeros((1, c, 16 + 2 + 1, h, w), dtype=torch.float32),
                                  self.start_latent], dim=2)
        self.total_latents = 1

    def positions(self) -> list[int]:
        return list(range(self.sections))

    def conditioning(self, position: int) -> dict[str, torch.Tensor]:
        sizes = [1, 16, 2, 1, self.window]
        start_idx, idx_4x, idx_2x, idx_1x, latent_idx = torch.arange(sum(sizes)).unsqueeze(0).split(sizes, dim=1)
        clean_4x, clean_2x, clean_1x = self.latents[:, :, -19:].split([16, 2, 1], dim=2)
        return dict(
            latent_indices=latent_idx,
            clean_latents=torch.cat([self.start_latent, clean_1x], dim=2),
            clean_latent_indices=torch.cat([start_idx, idx_1x], dim=1),
            clean_latents_2x=clean_2x, clean_latent_2x_indices=idx_2x,
            clean_latents_4x=clean_4x, clean_latent_4x_indices=idx_4x,
        )

    def add(self, generated: torch.Tensor, position: int) -> None:
        generated = generated.float().cpu()
        self.total_latents += generated.shape[2]
        self.latents = torch.cat([self.latents, generated], dim=2)

    def decode(self, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        real = self.latents[:, :, -self.total_latents:]
        if self.pixels is None:
            self.pixels = decode(real)
        else:
            fresh = self.window * 2
            self.pixels = framepack_modules().utils.soft_append_bcthw(
                self.pixels, decode(real[:, :, -fresh:]), self._overlap())
        return self.pixels


def _make_history(variant: Variant, start_latent: torch.Tensor, window: int,
                  sections: int) -> _History:
    cls = _ForwardHistory if variant.forward_sections else _InvertedHistory
    return cls(start_latent, window, sections)


class _Placement:
    """Moves models between CPU and GPU around each stage, as FramePack does in low-VRAM mode.

    In high-VRAM mode (tiny CPU models are built as high-VRAM) everything stays
    where it is and every method is a no-op.
    """

    def __init__(self, models: Models) -> None:
        self.models = models
        self.memory = None if models.high_vram else framepack_modules().memory

    def _all(self) -> tuple:
        m = self.models
        return (m.text_encoder, m.text_encoder_2, m.image_encoder, m.vae, m.transformer)

    def reset(self) -> None:
        if self.memory is not None:
            self.memory.unload_complete_models(*self._all())

    def text_encoders(self) -> None:
        if self.memory is not None:
            # the LLaMA encoder is DynamicSwap-streamed: only make it report the GPU as its device
            self.memory.fake_diffusers_current_device(self.models.text_encoder, self.memory.gpu)
            self.memory.load_model_as_complete(self.models.text_encoder_2, target_device=self.memory.gpu)

    def vae(self) -> None:
        if self.memory is not None:
            self.memory.load_model_as_complete(self.models.vae, target_device=self.memory.gpu)

    def image_encoder(self) -> None:
        if self.memory is not None:
            self.memory.load_model_as_complete(self.models.image_encoder, target_device=self.memory.gpu)

    def transformer(self, preserved_gb: float) -> None:
        if self.memory is not None:
            self.memory.unload_complete_models()
            self.memory.move_model_to_device_with_memory_preservation(
                self.models.transformer, target_device=self.memory.gpu, preserved_memory_gb=preserved_gb)

    def vae_after_sampling(self) -> None:
        if self.memory is not None:
            self.memory.offload_model_from_device_for_memory_preservation(
                self.models.transformer, target_device=self.memory.gpu,
                preserved_memory_gb=OFFLOAD_PRESERVED_MEMORY_GB)
            self.memory.load_model_as_complete(self.models.vae, target_device=self.memory.gpu)

    def release(self) -> None:
        if self.memory is not None:
            self.memory.unload_complete_models()


class _StepObserver:
    """Which sampling steps really ran the transformer's block stack.

    Used for the caches MagCache does not report on (FramePack's TeaCache, or no
    cache): a pre-hook on the first double-stream block marks a step computed.
    """

    def __init__(self, transformer: Any) -> None:
        self.ran = False
        self.computed: list[int] = []
        self.skipped: list[int] = []
        blocks = getattr(transformer, "transformer_blocks", None)
        self._block = blocks[0] if blocks is not None and len(blocks) else None
        self._handle = None

    def __enter__(self) -> _StepObserver:
        if self._block is not None:
            self._handle = self._block.register_forward_pre_hook(self._mark)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _mark(self, *args: Any) -> None:
        self.ran = True

    def step_done(self, step: int) -> None:
        (self.computed if self.ran or self._block is None else self.skipped).append(step)
        self.ran = False


class _Refused(Exception):
    """The job was refused before any work: bad settings, image or profile (the message says which)."""


class _JobRun:
    """One run_job call: its settings, callbacks and what has been produced so far."""

    def __init__(self, models: Models, settings: JobSettings, outputs_dir: str | os.PathLike,
                 profiles_dir: str | os.PathLike, on_progress: Callable[[ProgressUpdate], None] | None,
                 on_section: Callable[[SectionReport], None] | None,
                 should_stop: Callable[[], bool] | None, image_path: str | os.PathLike | None = None,
                 image_info: dict[str, str] | None = None) -> None:
        self.models = models
        self.image_path = image_path
        self.image_info = image_info
        self.image: dict[str, str] | None = None        # the input image as the record names it
        self.input_file: InputFile | None = None         # the input kept in the outputs folder, if the job keeps it
        self.record: dict[str, Any] | None = None
        self.created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.started = time.perf_counter()
        self.config: magcache_core.MagCacheConfig | None = None
        self.frame_size: tuple[int, int] | None = None  # (width, height) of the bucket
        self.settings = settings
        self.outputs_dir = pathlib.Path(outputs_dir)
        self.profiles_dir = pathlib.Path(profiles_dir)
        self.on_progress = on_progress
        self.on_section = on_section
        self.should_stop = should_stop
        self.placement = _Placement(models)
        self.sections: list[SectionReport] = []
        self.total_sections = 0
        self.video_path: str | None = None
        self.job_id: str | None = None
        self.stage = "setup"
        self.history: _History | None = None

    # -- callbacks -------------------------------------------------------------

    def progress(self, desc: str, percent: int = 0, section: int = 0, step: int = 0,
                 preview: np.ndarray | None = None) -> None:
        if step == 0:
            self.stage = desc.rstrip(" .").lower()
        if self.on_progress is not None:
            self.on_progress(ProgressUpdate(preview=preview, percent=percent, desc=desc, section=section,
                                            step=step, steps=self.settings.steps))

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise JobStopped("stopped by request")

    # -- the job ---------------------------------------------------------------

    def prepare(self, input_image: Any) -> tuple[np.ndarray, magcache_core.MagCacheConfig | None]:
        """The checked image and the MagCache config of this job, or _Refused saying what is wrong."""
        try:
            self.settings.validate()
            image = prepare_input_image(input_image)
            height, width = find_bucket(image.shape[0], image.shape[1], job_resolution(self.models, self.settings))
            self.frame_size = (width, height)
            config = None
            if self.settings.cache == "magcache":
                # reads a profile, if any, and refuses one of another variant or model
                config = magcache_config(self.settings, self.models.variant, self.models.model_id,
                                         magcache_core.frame_resolution(height, width))
                if self.settings.target_speedup is not None:    # the record's settings are the ones that ran
                    self.settings = dataclasses.replace(
                        self.settings, magcache_thresh=config.magcache_thresh, magcache_K=config.magcache_K,
                        retention_ratio=config.retention_ratio)
        except ValueError as exc:
            raise _Refused(str(exc)) from exc
        self.config = config
        return image, config

    def take_models(self, taken: contextlib.ExitStack) -> None:
        """The models' lock, held until ``taken`` closes; _Refused when another job or caller holds them."""
        if not self.models.busy.acquire(blocking=False):
            raise _Refused("Another job is running on these models; wait for it to finish or stop it.")
        taken.callback(self.models.busy.release)
        if magcache_core.get_magcache_state(self.models.transformer) is not None:
            raise _Refused("MagCache is already enabled on this transformer by someone else; "
                           "disable it before running a job")

    def enable_cache(self, taken: contextlib.ExitStack,
                     config: magcache_core.MagCacheConfig | None) -> magcache_core.MagCacheState | None:
        """MagCache on the transformer until ``taken`` closes (with FramePack's own cache off beneath it)."""
        if config is None:
            return None
        transformer = self.models.transformer
        transformer.initialize_teacache(enable_teacache=False)
        state = magcache_core.enable_magcache(transformer, config)
        taken.callback(magcache_core.disable_magcache, transformer)
        return state

    def leave_models_as_found(self) -> None:
        """FramePack's cache off again and every model back where the job found it."""
        if self.settings.cache == "teacache":
            self.models.transformer.initialize_teacache(enable_teacache=False)
        self.placement.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, input_image: Any) -> JobResult:
        self.started = time.perf_counter()
        profile: magcache_core.MagCacheProfile | None = None
        profile_path: str | None = None
        try:
            image, config = self.prepare(input_image)
            # What is taken is given back in reverse order, whatever happens: MagCache off, the
            # models as found, then the models' lock.  A refused job never touches the models.
            with contextlib.ExitStack() as taken:
                self.take_models(taken)
                self.progress("Starting ...")
                taken.callback(self.leave_models_as_found)
                self.placement.reset()
                state = self.enable_cache(taken, config)
                with torch.no_grad():
                    self.generate(image)
                if state is not None and state.config.calibrate:
                    profile, profile_path = self.save_profile(state)
            last = self.sections[-1]
            status = "done"
            message = (f"Generated {last.frames} frames ({last.frames / FPS:.2f} s at {FPS} fps) in "
                       f"{len(self.sections)} section(s).")
        except JobStopped:
            status = "stopped"
            message = f"Stopped by request after {len(self.sections)} of {self.total_sections} section(s)"
            message += f"; partial video kept: {self.video_path}." if self.video_path else "; no video yet."
        except _Refused as exc:
            status, message = "error", str(exc)
            logger.warning("Job refused: %s", exc)
        except torch.cuda.OutOfMemoryError:
            status = "error"
            message = (f"CUDA out of memory during {self.stage}. Raise the GPU memory to preserve "
                       f"(now {self.settings.gpu_memory_preservation} GB), or shorten the video, or close other "
                       "programs using the GPU.")
            logger.error("%s", message)
        except Exception as exc:  # a UI/CLI job must end with a status, never take the worker down
            status = "error"
            message = f"Unexpected error during {self.stage}: {type(exc).__name__}: {exc}"
            logger.exception("Job failed")
        result = JobResult(status=status, message=message, video_path=self.video_path, sections=self.sections,
                           seconds=time.perf_counter() - self.started, profile_path=profile_path,
                           calibration=profile, job_id=self.job_id, record=self.record)
        self._log_total(result)
        return result

    def generate(self, image: np.ndarray) -> None:
        fp = framepack_modules()
        m, s = self.models, self.settings
        dtype = m.dtype
        self.total_sections = section_count(s.seconds, s.latent_window_size)
        self.job_id = fp.utils.generate_timestamp()
        self.outputs_dir.mkdir(parents=True, exist_ok=True)

        self.progress("Text encoding ...")
        self.placement.text_encoders()
        llama_vec, clip_pooler = fp.hunyuan.encode_prompt_conds(
            s.prompt, m.text_encoder, m.text_encoder_2, m.tokenizer, m.tokenizer_2)
        if s.cfg == 1:
            # without real CFG the negative branch is never evaluated: zeros stand in for it
            llama_vec_n, clip_pooler_n = torch.zeros_like(llama_vec), torch.zeros_like(clip_pooler)
        else:
            llama_vec_n, clip_pooler_n = fp.hunyuan.encode_prompt_conds(
                s.n_prompt, m.text_encoder, m.text_encoder_2, m.tokenizer, m.tokenizer_2)
        llama_vec, llama_mask = fp.utils.crop_or_pad_yield_mask(llama_vec, length=PROMPT_TOKENS)
        llama_vec_n, llama_mask_n = fp.utils.crop_or_pad_yield_mask(llama_vec_n, length=PROMPT_TOKENS)

        self.progress("Image processing ...")
        assert self.frame_size is not None
        width, height = self.frame_size
        image_np = fp.utils.resize_and_center_crop(image, target_width=width, target_height=height)
        if self.image_info is not None:      # the job read a copy (a Ray worker's): name the original
            self.image = dict(self.image_info)
        elif self.image_path is not None:
            self.image = image_record(self.image_path)
        else:   # keep the exact input, so the record can make the video again: written with the first video
            self.input_file = input_file(self.outputs_dir, image)
            self.image = self.input_file.record()
        image_pt = (torch.from_numpy(image_np).float() / 127.5 - 1).permute(2, 0, 1)[None, :, None]

        self.progress("VAE encoding ...")
        self.placement.vae()
        start_latent = vae_encode(image_pt, m.vae, s.seed)

        self.progress("CLIP Vision encoding ...")
        self.placement.image_encoder()
        image_embeddings = fp.clip_vision.hf_clip_vision_encode(
            image_np, m.feature_extractor, m.image_encoder).last_hidden_state

        text = dict(prompt_embeds=llama_vec.to(dtype), prompt_embeds_mask=llama_mask,
                    prompt_poolers=clip_pooler.to(dtype), negative_prompt_embeds=llama_vec_n.to(dtype),
                    negative_prompt_embeds_mask=llama_mask_n, negative_prompt_poolers=clip_pooler_n.to(dtype),
                    image_embeddings=image_embeddings.to(dtype))

        self.progress("Start sampling ...")
        generator = torch.Generator("cpu").manual_seed(s.seed)
        self.history = _make_history(m.variant, start_latent, s.latent_window_size, self.total_sections)
        logger.info("Job %s: %s, %d section(s) of %d latents at %dx%d, %d steps, cache=%s%s",
                    self.job_id, m.variant.title, self.total_sections, s.latent_window_size, width, height,
                    s.steps, s.cache, " (calibration)" if s.calibrate else "")
        for index, position in enumerate(self.history.positions()):
            self.check_stop()
            self.run_section(index, position, width, height, generator, text)

    def run_section(self, index: int, position: int, width: int, height: int, generator: torch.Generator,
                    text: dict[str, torch.Tensor]) -> None:
        fp = framepack_modules()
        m, s = self.models, self.settings
        history = self.history
        assert history is not None
        transformer = m.transformer
        started = time.perf_counter()

        self.placement.transformer(s.gpu_memory_preservation)
        if s.cache == "teacache":
            transformer.initialize_teacache(enable_teacache=True, num_steps=s.steps)
        elif s.cache == "off":
            transformer.initialize_teacache(enable_teacache=False)

        with magcache_core.magcache_run(transformer) as run, _StepObserver(transformer) as observer:
            def on_step(d: dict[str, Any]) -> None:
                observer.step_done(int(d["i"]))
                preview = fp.hunyuan.vae_decode_fake(d["denoised"])
                preview = (preview * 255.0).detach().cpu().numpy().clip(0, 255).astype(np.uint8)
                b, c, t, h, w = preview.shape
                # (b, c, t, h, w) -> one image: batch stacked vertically, frames side by side
                preview = preview.transpose(0, 3, 2, 4, 1).reshape(b * h, t * w, c)
                self.check_stop()
                step = int(d["i"]) + 1
                frames_so_far = max(0, history.total_latents * 4 - 3)
                self.progress(
                    f"Section {index + 1}/{self.total_sections}, step {step}/{s.steps}. Frames so far: "
                    f"{frames_so_far} ({frames_so_far / FPS:.2f} s at {FPS} fps); extending the video ...",
                    percent=int(100.0 * step / s.steps), section=index, step=step, preview=preview)

            self.stage = f"sampling section {index + 1}"
            sample_started = time.perf_counter()
            generated = fp.sampler.sample_hunyuan(
                transformer=transformer, sampler="unipc", width=width, height=height,
                frames=s.latent_window_size * 4 - 3, real_guidance_scale=s.cfg, distilled_guidance_scale=s.gs,
                guidance_rescale=s.rs, num_inference_steps=s.steps, generator=generator,
                device=m.device, dtype=m.dtype, callback=on_step,
                **text, **history.conditioning(position))
            sampling_seconds = time.perf_counter() - sample_started
        if run is not None:
            computed, skipped = list(run.computed), list(run.skipped)
        else:
            computed, skipped = observer.computed, observer.skipped

        history.add(generated, position)
        self.stage = f"decoding section {index + 1}"
        self.placement.vae_after_sampling()
        pixels = history.decode(lambda latents: fp.hunyuan.vae_decode(latents, m.vae).cpu())
        self.placement.release()
        self.stage = f"writing section {index + 1}"
        path = str(self.outputs_dir / f"{self.job_id}_{history.total_latents}.mp4")
        report = SectionReport(index=index, total=self.total_sections, computed_steps=computed,
                               skipped_steps=skipped, seconds=time.perf_counter() - started, video_path=path,
                               frames=int(pixels.shape[2]), sampling_seconds=sampling_seconds)
        video = video_frames(pixels)
        if self.input_file is not None:      # the input goes with the first video, so a job stopped
            self.input_file.write()          # before it leaves nothing behind
        record = self.video_record(self.sections + [report], frames_sha256(video))
        write_mp4(video, path, fps=FPS, crf=s.crf, comment=dumps(record))
        write_sidecar(path, record)
        self.video_path, self.record = path, record
        self.sections.append(report)
        logger.info("%s -> %s", report.summary(), path)
        if self.on_section is not None:
            self.on_section(report)
        self.progress(f"Section {index + 1}/{self.total_sections} done: {report.frames} frames "
                      f"({report.frames / FPS:.2f} s).", percent=100, section=index, step=s.steps)

    def video_record(self, sections: list[SectionReport], frames_digest: str) -> dict[str, Any]:
        """How the video of these sections was made: the JSON beside its MP4 and in its comment tag.

        ``frames_digest`` is :func:`frames_sha256` of the frames handed to the
        encoder, so a replay can tell "same frames" from "same MP4 bytes".
        """
        m, s = self.models, self.settings
        settings = dataclasses.asdict(s)
        for key in ("prompt", "n_prompt", "seed"):
            settings.pop(key)
        width, height = self.frame_size or (None, None)
        return {
            "format": FORMAT, "version": VERSION,
            "job_id": self.job_id, "created": self.created,
            "prompt": s.prompt, "n_prompt": s.n_prompt, "seed": s.seed,
            "image": self.image,
            "variant": m.variant.name, "model": m.model_id, "tiny": m.tiny,
            "settings": settings,
            "frame": {"width": width, "height": height, "fps": FPS,
                      "frames": sections[-1].frames if sections else 0},
            "frames_sha256": frames_digest,
            "magcache": None if self.config is None else magcache_summary(self.config),
            "sections_total": self.total_sections,
            "sections": [dataclasses.asdict(r) | {"video_path": pathlib.Path(r.video_path).name}
                         for r in sections],
            "timings": {"seconds": round(time.perf_counter() - self.started, 3),
                        "sampling_seconds": round(sum(r.sampling_seconds for r in sections), 3)},
            "packages": package_versions(),
        }

    def save_profile(self, state: magcache_core.MagCacheState) -> tuple[magcache_core.MagCacheProfile, str]:
        """Average this job's calibration runs into a profile and save it under profiles_dir."""
        s = self.settings
        assert self.frame_size is not None
        resolution = round(magcache_core.frame_resolution(self.frame_size[1], self.frame_size[0]))
        profile = state.calibration_profile(self.models.variant.name, resolution, model=self.models.model_id)
        stem = profile_file_stem(self.models.variant.name, resolution, s.steps, datetime.datetime.now())
        staged = profile.save(self.profiles_dir / f".{stem}.{self.job_id}.staged")
        path = publish_new(staged, self.profiles_dir / f"{stem}.json")
        logger.info("Calibration profile: %s", path)
        return profile, str(path)

    def _log_total(self, result: JobResult) -> None:
        computed = sum(len(r.computed_steps) for r in result.sections)
        skipped = sum(len(r.skipped_steps) for r in result.sections)
        logger.info("Job %s %s: %d/%d section(s), computed %d steps, skipped %d, %.2f s total. %s",
                    result.job_id or "-", result.status, len(result.sections), self.total_sections,
                    computed, skipped, result.seconds, result.message)


def run_job(models: Models, input_image: np.ndarray, settings: JobSettings,
            outputs_dir: str | os.PathLike = "outputs",
            on_progress: Callable[[ProgressUpdate], None] | None = None,
            on_section: Callable[[SectionReport], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            profiles_dir: str | os.PathLike = "magcache_profiles",
            image_path: str | os.PathLike | None = None,
            image_info: dict[str, str] | None = None) -> JobResult:
    """Generate one video, section by section, and say how it went.

    After every section the video so far is written to
    ``outputs_dir/<job id>_<latent frames>.mp4`` (as FramePack does) and
    ``on_section`` gets its report.  ``should_stop`` is polled before each
    section and after each sampling step; when it returns True the job stops
    mid-section and returns status "stopped", keeping the partial videos.

    Expected failures (no or malformed image, bad settings, an unreadable
    profile, CUDA out of memory, a stop) never raise: they come back as
    ``JobResult(status="error" | "stopped", message=...)``.  Unexpected errors
    are logged with their traceback and reported the same way, so a UI worker
    always gets a result.  MagCache is enabled on the transformer for the job
    only and always disabled again.  One job at a time per Models.

    Beside every MP4 goes a JSON record of how it was made (the same JSON is
    the MP4's ``comment`` tag; see :mod:`.records`).  ``image_path``
    names the file ``input_image`` was read from, for that record; without
    it the input is kept in ``outputs_dir`` as ``input-<pixels' hash>.png``
    (one file per distinct image, see :class:`InputFile`), written with the
    first video, so a job stopped before one leaves nothing behind.
    ``image_info`` (``image_record`` of the original) is
    what the record names instead, when the file read is a copy elsewhere
    (a Ray worker's), so the record is the one a local run would write.
    """
    job = _JobRun(models, settings, outputs_dir, profiles_dir, on_progress, on_section, should_stop, image_path,
               image_info)
    return job.run(input_image)
