"""MagCache for FramePack: benchmarks and video quality metrics.

Three subcommands::

    python magcache_bench.py speed   [--size tiny|small|full] [--repeats N] [--setting T,K,R ...] [--json FILE]
    python magcache_bench.py compare REF.mp4 OTHER.mp4 [--json FILE]
    python magcache_bench.py sweep   --image IMG --prompt TEXT [--tiny] [--setting ...] [--out DIR]

``speed`` times FramePack's own sampler (``sample_hunyuan``, UniPC) over one
section with FramePack's packed transformer built at a chosen size with random
weights.  Random weights are enough: the compute of a transformer call does
not depend on weight values, and MagCache's skip plan depends only on the
calibrated ratio table, never on activations.  So the speed-up measured here
is the speed-up a real model gets at the same shape.

``--size full`` is FramePack's real transformer (24 heads x 128, 20 + 40
blocks, ~13B parameters, bf16, about 26 GB of weights) built directly on the
GPU, at the bucket FramePack picks for a square image at ``--resolution``
(640 -> 640x608).  One command on a CUDA machine::

    python magcache_bench.py speed --size full --repeats 3 --json speed_full.json

``compare`` scores one video against a reference (PSNR, SSIM, and LPIPS when
it can run offline).  ``sweep`` generates one uncached video and one per
MagCache setting with the headless pipeline and scores each against the
uncached one.

Decisions worth knowing:

* PSNR of identical frames is infinite (MSE = 0).  We report it as ``inf``;
  the mean over frames is then ``inf`` as well when any frame is identical
  (the honest arithmetic mean).  JSON cannot hold infinity, so JSON writes the
  string ``"inf"`` (``float("inf")`` reads it back); ``null`` is reserved for
  "not measured" (LPIPS when unavailable).
* SSIM is our own: Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03,
  data range 255, computed per RGB channel over the "valid" region (no
  padding) and averaged over channels and pixels.
* ``speed`` reports ``residual_cache_bytes`` as the *peak* bytes the engine
  held in cached residuals during a run (read from
  ``MagCacheState.residual_cache_bytes()`` after every transformer call): the
  engine frees its residuals when a run ends, so "after the run" is always 0
  and is reported separately as ``residual_cache_bytes_after_run``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Shapes for the speed benchmark
# ---------------------------------------------------------------------------

LATENT_WINDOW = 9            # FramePack's latent window: 9 latent frames = 33 video frames
TEXT_PAD = 512               # FramePack pads the LLaMA prompt embedding to 512 tokens
SIGLIP_TOKENS = 729          # SigLIP so400m/14 at 384 px: 27 x 27 image tokens
INIT_STD = 0.02              # random weights: small normal values (no NaN/inf in bf16 over 60 blocks)


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """One transformer + section shape for ``speed``.

    ``text_tokens`` of ``text_pad`` prompt tokens are real (mask True); FramePack
    crops the context to the masked length at batch 1, so only the real ones
    reach the blocks, while the token refiner sees all ``text_pad``.
    """

    name: str
    heads: int
    head_dim: int
    double_layers: int
    single_layers: int
    refiner_layers: int
    text_embed_dim: int
    pooled_dim: int
    image_proj_dim: int
    image_tokens: int
    height: int                # pixels
    width: int
    latent_window: int = LATENT_WINDOW
    text_pad: int = TEXT_PAD
    text_tokens: int = 64
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Split the head dim over (t, y, x) like FramePack's 16/56/56 of 128, keeping every part even."""
        t = self.head_dim // 8
        t += t % 2
        y = (self.head_dim - t) // 2
        y -= y % 2
        return t, y, self.head_dim - t - y

    @property
    def frames(self) -> int:
        """Video frames of one section, the ``frames`` argument of sample_hunyuan."""
        return self.latent_window * 4 - 3

    def describe(self) -> str:
        return (f"{self.heads}x{self.head_dim} heads, {self.double_layers}+{self.single_layers} blocks, "
                f"{self.width}x{self.height} px, {self.latent_window} latent frames, "
                f"text {self.text_tokens}/{self.text_pad} tokens, {self.image_tokens} image tokens, "
                f"{self.dtype} on {self.device}")


SIZES = ("tiny", "small", "full")


def bench_shape(size: str, resolution: int = 640, text_tokens: int | None = None,
                bucket: Callable[[int, int, int], tuple[int, int]] | None = None) -> BenchShape:
    """The shape for ``--size``.

    ``small`` is the engine's CPU shape (4 heads x 32, 4 double + 8 single
    blocks, 128x128 px); ``tiny`` is smaller still, for tests; ``full`` is
    FramePack's real transformer in bf16 on CUDA at the bucket FramePack picks
    for a square input image at ``resolution`` (``bucket(h, w, resolution)``).
    """
    if size == "tiny":
        shape = BenchShape("tiny", heads=2, head_dim=16, double_layers=1, single_layers=1, refiner_layers=1,
                           text_embed_dim=32, pooled_dim=16, image_proj_dim=24, image_tokens=16,
                           height=64, width=64, text_pad=64, text_tokens=16)
    elif size == "small":
        shape = BenchShape("small", heads=4, head_dim=32, double_layers=4, single_layers=8, refiner_layers=2,
                           text_embed_dim=256, pooled_dim=64, image_proj_dim=128, image_tokens=SIGLIP_TOKENS,
                           height=128, width=128, text_tokens=64)
    elif size == "full":
        if bucket is None:
            raise ValueError("size 'full' needs FramePack's bucket function to pick the resolution")
        h, w = bucket(resolution, resolution, resolution)
        shape = BenchShape("full", heads=24, head_dim=128, double_layers=20, single_layers=40, refiner_layers=2,
                           text_embed_dim=4096, pooled_dim=768, image_proj_dim=1152, image_tokens=SIGLIP_TOKENS,
                           height=h, width=w, text_tokens=64, dtype="bfloat16", device="cuda")
    else:
        raise ValueError(f"size {size!r}: choose one of {', '.join(SIZES)}")
    if text_tokens is not None:
        if not 1 <= text_tokens <= shape.text_pad:
            raise ValueError(f"text_tokens = {text_tokens}: must be in 1..{shape.text_pad}")
        shape = dataclasses.replace(shape, text_tokens=text_tokens)
    return shape


def build_transformer(model_cls: type, shape: BenchShape, device: torch.device, dtype: torch.dtype,
                      seed: int = 0) -> torch.nn.Module:
    """FramePack's packed transformer at ``shape`` with small random weights, built on ``device``.

    Built on the meta device, cast, then materialised on the target device, so a
    full-size model (~13B parameters) never exists in float32 or on the host.
    Every matrix gets N(0, 0.02), biases 0, norm scales 1: finite, and no layer
    is left zero-initialised (FramePack zero-inits some output layers, which
    would make blocks inert).
    """
    with torch.device("meta"):
        model = model_cls(
            num_attention_heads=shape.heads, attention_head_dim=shape.head_dim, num_layers=shape.double_layers,
            num_single_layers=shape.single_layers, num_refiner_layers=shape.refiner_layers,
            text_embed_dim=shape.text_embed_dim, pooled_projection_dim=shape.pooled_dim,
            rope_axes_dim=shape.rope_axes, has_image_proj=True, image_proj_dim=shape.image_proj_dim,
            has_clean_x_embedder=True)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, INIT_STD, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for b in model.buffers():
            b.zero_()
    model.high_quality_fp32_output_for_inference = True   # as FramePack's demos set it
    return model.eval().requires_grad_(False)


def section_inputs(shape: BenchShape, device: torch.device, dtype: torch.dtype, variant: str = "framepack",
                   seed: int = 1) -> dict[str, Any]:
    """The conditioning FramePack hands sample_hunyuan for one section, with random values.

    Clean latents follow FramePack's layout: 2 frames at 1x (start + newest
    history), 2 at 2x, 16 at 4x.  ``variant`` picks the index layout: FramePack
    (inverted order; here its last section, no padding) or F1 (forward order).
    """
    g = torch.Generator().manual_seed(seed)
    h, w = shape.height // 8, shape.width // 8

    def rnd(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    window = shape.latent_window
    if variant == "f1":
        idx = torch.arange(0, 1 + 16 + 2 + 1 + window).unsqueeze(0)
        start, idx_4x, idx_2x, idx_1x, latent_idx = idx.split([1, 16, 2, 1, window], dim=1)
        clean_idx = torch.cat([start, idx_1x], dim=1)
    else:
        idx = torch.arange(0, 1 + window + 1 + 2 + 16).unsqueeze(0)
        pre, latent_idx, post, idx_2x, idx_4x = idx.split([1, window, 1, 2, 16], dim=1)
        clean_idx = torch.cat([pre, post], dim=1)
    mask = torch.zeros(1, shape.text_pad, dtype=torch.bool, device=device)
    mask[:, :shape.text_tokens] = True
    text = torch.zeros(1, shape.text_pad, shape.text_embed_dim, device=device, dtype=dtype)
    text[:, :shape.text_tokens] = rnd(1, shape.text_tokens, shape.text_embed_dim)
    pooled = rnd(1, shape.pooled_dim)
    return dict(
        prompt_embeds=text, prompt_embeds_mask=mask, prompt_poolers=pooled,
        # cfg 1 (FramePack's default) never calls the negative branch; FramePack passes zeros then too
        negative_prompt_embeds=torch.zeros_like(text), negative_prompt_embeds_mask=mask.clone(),
        negative_prompt_poolers=torch.zeros_like(pooled),
        image_embeddings=rnd(1, shape.image_tokens, shape.image_proj_dim),
        latent_indices=latent_idx.to(device),
        clean_latents=rnd(1, 16, 2, h, w), clean_latent_indices=clean_idx.to(device),
        clean_latents_2x=rnd(1, 16, 2, h, w), clean_latent_2x_indices=idx_2x.to(device),
        clean_latents_4x=rnd(1, 16, 16, h, w), clean_latent_4x_indices=idx_4x.to(device),
    )


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

ENGINES = ("magcache", "diffusers")


@dataclasses.dataclass(frozen=True)
class SpeedSetting:
    """One row of the speed table: ``params`` None means MagCache off (the model's own forward).

    ``engine`` "magcache" is this project's engine; "diffusers" is diffusers' own
    MagCache hook (``transformer.enable_cache(diffusers.MagCacheConfig(...))``)
    with the same thresh/K/retention and ratios, for ``--compare-diffusers``.
    """

    name: str
    params: tuple[float, int, float] | None = None
    engine: str = "magcache"


def parse_setting(text: str) -> tuple[float, int, float]:
    """``"thresh,K,retention"`` -> (float, int, float), or ValueError saying what is accepted."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"setting {text!r}: expected thresh,K,retention, e.g. 0.12,3,0.2")
    try:
        thresh, k_text, retention = float(parts[0]), parts[1], float(parts[2])
    except ValueError:
        raise ValueError(f"setting {text!r}: thresh and retention must be numbers, e.g. 0.12,3,0.2") from None
    try:
        k = int(k_text)
    except ValueError:
        raise ValueError(f"setting {text!r}: K must be an integer >= 1, e.g. 0.12,3,0.2") from None
    if not math.isfinite(thresh) or thresh < 0:
        raise ValueError(f"setting {text!r}: thresh must be a finite number >= 0")
    if k < 1:
        raise ValueError(f"setting {text!r}: K must be an integer >= 1")
    if not 0.0 <= retention < 1.0:
        raise ValueError(f"setting {text!r}: retention must be in [0, 1)")
    return thresh, k, retention


def setting_name(params: tuple[float, int, float]) -> str:
    return f"custom:{params[0]:g},{params[1]},{params[2]:g}"


def speed_settings(presets: dict[str, tuple[float, int, float]],
                   custom: Sequence[tuple[float, int, float]] = (),
                   compare_diffusers: bool = False) -> list[SpeedSetting]:
    """Uncached first, then every preset, then each custom setting (duplicates dropped).

    ``compare_diffusers`` repeats every cached setting with diffusers' own hook, named ``diffusers:<name>``.
    """
    out = [SpeedSetting("off")] + [SpeedSetting(name, tuple(p)) for name, p in presets.items()]
    for params in custom:
        s = SpeedSetting(setting_name(params), params)
        if s.name not in {o.name for o in out}:
            out.append(s)
    if compare_diffusers:
        out += [SpeedSetting(f"diffusers:{s.name}", s.params, "diffusers") for s in out if s.params is not None]
    return out


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

class CallTimer:
    """Times every transformer call and notes whether its block stack ran.

    Forward hooks live on the module, not on ``forward``, so they see the call
    whether or not MagCache has replaced the instance's forward.  Whether the
    blocks ran is read off the first block's first norm (``norm1``), which runs
    only when the block computes, also where a hook replaced the block's forward
    (diffusers' own MagCache).  On CUDA each boundary synchronises, so a call's
    time is its real device time.
    """

    def __init__(self, transformer: torch.nn.Module, device: torch.device,
                 state_bytes: Callable[[], int] | None = None) -> None:
        self.device = device
        self.calls: list[tuple[float, bool]] = []
        self.peak_bytes = 0
        self.state_bytes = state_bytes
        self._start = 0.0
        self._blocks_ran = False
        first_block = (list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks))[0]
        probe = getattr(first_block, "norm1", first_block)
        self._handles = [
            transformer.register_forward_pre_hook(self._pre),
            transformer.register_forward_hook(self._post),
            probe.register_forward_pre_hook(self._block),
        ]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._sync()
        self._blocks_ran = False
        self._start = time.perf_counter()

    def _block(self, module: torch.nn.Module, args: Any) -> None:
        self._blocks_ran = True

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._sync()
        self.calls.append((time.perf_counter() - self._start, self._blocks_ran))
        if self.state_bytes is not None:
            self.peak_bytes = max(self.peak_bytes, self.state_bytes())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def _sampler_bars_hidden(hide: bool) -> Iterator[None]:
    """FramePack's sampler always draws a tqdm bar; a benchmark with dozens of runs hides them."""
    if not hide:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def device_name(device: torch.device) -> str:
    """'cpu (<model name>)' from /proc/cpuinfo, or the CUDA device's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    model = model or platform.processor() or platform.machine()
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def speed_rows(timings: dict[str, list[float]], call_times: dict[str, tuple[list[float], list[float]]],
               computed: dict[str, int], total_steps: int, settings: Sequence[SpeedSetting],
               extra: dict[str, dict[str, Any]] | None = None, common: dict[str, Any] | None = None
               ) -> list[dict[str, Any]]:
    """Turn raw timings into the report rows (pure: testable without running anything).

    ``call_times[name]`` = (computed-call seconds, skipped-call seconds).
    measured_speedup = median(off) / median(setting); skipped_step_cost =
    median skipped call / median computed call of the same setting.
    """
    base = statistics.median(timings["off"])
    rows = []
    for s in settings:
        med = statistics.median(timings[s.name])
        comp_calls, skip_calls = call_times[s.name]
        comp_med = statistics.median(comp_calls) if comp_calls else None
        skip_med = statistics.median(skip_calls) if skip_calls else None
        row: dict[str, Any] = {
            "setting": s.name,
            "magcache_thresh": s.params[0] if s.params else None,
            "magcache_K": s.params[1] if s.params else None,
            "retention_ratio": s.params[2] if s.params else None,
            "total_steps": total_steps,
            "computed_steps": computed[s.name],
            "skipped_steps": total_steps - computed[s.name],
            "ideal_speedup": total_steps / computed[s.name],
            "measured_speedup": base / med,
            "seconds": med,
            "seconds_runs": list(timings[s.name]),
            "computed_call_seconds": comp_med,
            "skipped_call_seconds": skip_med,
            "skipped_step_cost": (skip_med / comp_med) if (skip_med is not None and comp_med) else None,
        }
        row["efficiency"] = row["measured_speedup"] / row["ideal_speedup"]
        row.update((extra or {}).get(s.name, {}))
        row.update(common or {})
        rows.append(row)
    return rows


MODELS = ("framepack", "diffusers")


@dataclasses.dataclass
class _Sampler:
    """One section through a model's own sampling loop: ``sample()`` returns its latents."""

    transformer: torch.nn.Module
    sample: Callable[[], torch.Tensor]
    source: str | None = None


def _framepack_sampler(shape: BenchShape, dev: torch.device, dtype: torch.dtype, variant: str, seed: int,
                       steps: int, cfg: float) -> _Sampler:
    """FramePack's packed transformer, sampled by FramePack's ``sample_hunyuan`` (UniPC)."""
    from magcache_framepack.models import framepack_modules

    fp = framepack_modules()
    transformer = build_transformer(fp.models.HunyuanVideoTransformer3DModelPacked, shape, dev, dtype, seed)
    inputs = section_inputs(shape, dev, dtype, variant, seed + 1)

    def sample() -> torch.Tensor:
        return fp.sampler.sample_hunyuan(
            transformer=transformer, sampler="unipc", width=shape.width, height=shape.height,
            frames=shape.frames, real_guidance_scale=cfg, distilled_guidance_scale=10.0,
            guidance_rescale=0.0, num_inference_steps=steps,
            generator=torch.Generator("cpu").manual_seed(seed + 2), device=dev, dtype=dtype, **inputs)
    return _Sampler(transformer, sample, getattr(fp, "source", None))


def _diffusers_sampler(shape: BenchShape, dev: torch.device, dtype: torch.dtype, variant: str, seed: int,
                       steps: int, cfg: float) -> _Sampler:
    """diffusers' transformer at the same shape, sampled by ``HunyuanVideoFramepackPipeline`` itself.

    One section (``num_frames`` = one latent window), with the same text
    conditioning as FramePack's run passed as embeddings, so the text encoders
    do not run; the pipeline's own image encoding (the tiny VAE, and a one-layer
    SigLIP giving ``image_tokens`` tokens) and its loop (flow-matching Euler)
    do, and ``output_type="latent"`` skips decoding.
    """
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from magcache_framepack.models import build_tiny_models, diffusers_framepack_classes

    pipeline_class, model_class = diffusers_framepack_classes()
    transformer = build_transformer(model_class, shape, dev, dtype, seed)
    side = math.isqrt(shape.image_tokens)
    if side * side != shape.image_tokens:
        raise ValueError(f"image_tokens = {shape.image_tokens}: the SigLIP stand-in needs a square number")
    tiny = build_tiny_models("framepack")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_encoder = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=shape.image_proj_dim, intermediate_size=2 * shape.image_proj_dim, num_hidden_layers=1,
            num_attention_heads=2, image_size=2 * side, patch_size=2, num_channels=3))
    feature_extractor = transformers.SiglipImageProcessor(size={"height": 2 * side, "width": 2 * side})
    pipe = pipeline_class(
        text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, transformer=transformer, vae=tiny.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), text_encoder_2=tiny.text_encoder_2,
        tokenizer_2=tiny.tokenizer_2, image_encoder=image_encoder.eval(), feature_extractor=feature_extractor)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    inputs = section_inputs(shape, dev, dtype, variant, seed + 1)
    g = torch.Generator().manual_seed(seed + 3)
    image = torch.rand(1, 3, shape.height, shape.width, generator=g)

    def sample() -> torch.Tensor:
        out = pipe(image=image, prompt_embeds=inputs["prompt_embeds"],
                   pooled_prompt_embeds=inputs["prompt_poolers"], prompt_attention_mask=inputs["prompt_embeds_mask"],
                   negative_prompt_embeds=inputs["negative_prompt_embeds"],
                   negative_pooled_prompt_embeds=inputs["negative_prompt_poolers"],
                   negative_prompt_attention_mask=inputs["negative_prompt_embeds_mask"],
                   height=shape.height, width=shape.width, num_frames=shape.frames,
                   latent_window_size=shape.latent_window, num_inference_steps=steps, true_cfg_scale=cfg,
                   guidance_scale=10.0, generator=torch.Generator("cpu").manual_seed(seed + 2),
                   output_type="latent")
        return out.frames[-1]
    return _Sampler(transformer, sample, "diffusers")


def diffusers_magcache_config(params: tuple[float, int, float], steps: int, ratios: Sequence[float]) -> Any:
    """diffusers' own ``MagCacheConfig`` with this thresh/K/retention and ratio table.

    ImportError when the installed diffusers has none (it came in 0.36).
    """
    import diffusers

    config_class = getattr(diffusers, "MagCacheConfig", None)
    if config_class is None:
        raise ImportError(f"diffusers {diffusers.__version__} has no MagCacheConfig (it came in 0.36)")
    return config_class(threshold=params[0], max_skip_steps=params[1], retention_ratio=params[2],
                        num_inference_steps=steps, mag_ratios=list(ratios))


def run_speed(size: str = "tiny", steps: int = 25, repeats: int = 3, warmup: int = 1,
              custom: Sequence[tuple[float, int, float]] = (), variant: str = "framepack",
              resolution: int = 640, text_tokens: int | None = None, device: str | None = None,
              seed: int = 0, show_sampler_bars: bool = False, model: str = "framepack", cfg: float = 1.0,
              compare_diffusers: bool = False) -> list[dict[str, Any]]:
    """Time one section uncached and under each MagCache setting.

    ``model`` "framepack" runs FramePack's packed transformer through FramePack's
    ``sample_hunyuan``; "diffusers" runs diffusers' ``HunyuanVideoFramepackTransformer3DModel``
    through ``HunyuanVideoFramepackPipeline``.  ``cfg`` > 1 is true CFG (two
    transformer calls a step).  ``compare_diffusers`` (diffusers' model only)
    adds each cached setting under diffusers' own MagCache hook.

    Repeats are interleaved (every setting once per round) so slow drifts of
    the machine (thermal, other load) hit all settings alike; the warm-up
    rounds run every setting untimed first.  Returns one row per setting.
    """
    import magcache_core as core
    from magcache_framepack.job import find_bucket

    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if model not in MODELS:
        raise ValueError(f"model {model!r}: choose one of {', '.join(MODELS)}")
    if not (math.isfinite(cfg) and cfg >= 1.0):
        raise ValueError(f"cfg = {cfg!r}: must be a number >= 1 (1 = no true CFG)")
    if compare_diffusers and model != "diffusers":
        raise ValueError("--compare-diffusers needs --model diffusers: diffusers' hook knows only its own "
                         "block classes")
    shape = bench_shape(size, resolution, text_tokens, bucket=find_bucket)
    dev = torch.device(device or shape.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--size {size} runs on CUDA but no CUDA device is available; "
                           "use --size small (CPU) or --device cpu")
    dtype = getattr(torch, shape.dtype)
    logger.info("speed: %s model, %s (%s), cfg %g, %d steps, %d repeat(s) after %d warm-up round(s)",
                model, shape.name, shape.describe(), cfg, steps, repeats, warmup)
    sampler = (_diffusers_sampler if model == "diffusers" else _framepack_sampler)(
        shape, dev, dtype, variant, seed, steps, cfg)
    transformer = sampler.transformer
    branches = 1 if cfg == 1.0 else 2
    ratios = core.VARIANT_MAG_RATIOS[variant]
    settings = speed_settings(core.PRESETS, custom, compare_diffusers)
    configs = {s.name: core.MagCacheConfig(magcache_thresh=s.params[0], magcache_K=s.params[1],
                                           retention_ratio=s.params[2], num_steps=steps, mag_ratios=ratios,
                                           variant=variant)
               for s in settings if s.params is not None and s.engine == "magcache"}
    hook_configs = {s.name: diffusers_magcache_config(s.params, steps, ratios)
                    for s in settings if s.params is not None and s.engine == "diffusers"}
    reference: list[torch.Tensor] = []   # the uncached latents

    def one_run(s: SpeedSetting) -> tuple[float, float, list[tuple[float, bool]], int, int, int, float]:
        """-> (seconds, CPU seconds, [(call seconds, blocks ran)], computed, peak bytes, bytes after, max diff)."""
        state = core.enable_magcache(transformer, configs[s.name]) if s.name in configs else None
        if s.name in hook_configs:
            transformer.enable_cache(hook_configs[s.name])
        timer = CallTimer(transformer, dev, state.residual_cache_bytes if state is not None else None)
        try:
            with core.magcache_run(transformer) as report, _sampler_bars_hidden(not show_sampler_bars):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                latents = sampler.sample()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            after = state.residual_cache_bytes() if state is not None else 0
        finally:
            timer.remove()
            if state is not None:
                core.disable_magcache(transformer)
            if s.name in hook_configs:
                transformer.disable_cache()
        if not torch.isfinite(latents).all():
            logger.warning("setting %s produced non-finite latents (random weights too large?)", s.name)
        if s.params is None and not reference:
            reference.append(latents)
        diff = (latents.float() - reference[0].float()).abs().max().item() if reference else math.nan
        ran = [r for _, r in timer.calls]
        if report is not None:
            step_ran = ran[::branches]
            if any(ran) and sorted(i for i, r in enumerate(step_ran) if r) != sorted(report.computed):
                logger.warning("setting %s: the engine reports computed steps %s but the blocks ran at steps %s",
                               s.name, report.computed, [i for i, r in enumerate(step_ran) if r])
            computed = report.computed_count
        else:
            computed = sum(ran) / branches
            computed = int(computed) if float(computed).is_integer() else computed
        return seconds, cpu_seconds, timer.calls, computed, timer.peak_bytes, after, diff

    load_before = _load_average()
    for r in range(warmup):
        for s in settings:
            one_run(s)
            logger.info("warm-up %d/%d: %s", r + 1, warmup, s.name)
    timings: dict[str, list[float]] = {s.name: [] for s in settings}
    cpu_timings: dict[str, list[float]] = {s.name: [] for s in settings}
    calls: dict[str, tuple[list[float], list[float]]] = {s.name: ([], []) for s in settings}
    computed: dict[str, int] = {}
    extra: dict[str, dict[str, Any]] = {s.name: {"residual_cache_bytes": 0, "max_latent_diff": 0.0,
                                                 "engine": s.engine if s.params else None} for s in settings}
    for r in range(repeats):
        for s in settings:
            seconds, cpu_seconds, run_calls, n_computed, peak, after, diff = one_run(s)
            timings[s.name].append(seconds)
            cpu_timings[s.name].append(cpu_seconds)
            for t, ran in run_calls:
                calls[s.name][0 if ran else 1].append(t)
            if computed.setdefault(s.name, n_computed) != n_computed:
                logger.warning("setting %s computed %s steps, earlier %s", s.name, n_computed, computed[s.name])
            e = extra[s.name]
            e["residual_cache_bytes"] = max(e["residual_cache_bytes"], peak)
            e["residual_cache_bytes_after_run"] = after
            e["max_latent_diff"] = max(e["max_latent_diff"], diff)
            e["computed_per_branch"] = [sum(ran for _, ran in run_calls[b::branches]) for b in range(branches)]
            logger.info("round %d/%d: %-22s %.3fs (%s/%d steps computed)",
                        r + 1, repeats, s.name, seconds, n_computed, steps)
    for name in hook_configs:
        extra[name]["residual_cache_bytes"] = None   # diffusers' hook keeps its own state: not measured here
    if dev.type == "cpu":
        # Process CPU time barely moves when other programs share the machine, wall time does:
        # on a busy CPU this is the steadier estimate of the same speed-up.
        cpu_base = statistics.median(cpu_timings["off"])
        for s in settings:
            extra[s.name]["cpu_seconds"] = statistics.median(cpu_timings[s.name])
            extra[s.name]["measured_speedup_cpu_time"] = cpu_base / extra[s.name]["cpu_seconds"]
    common = {
        "size": shape.name, "shape": shape.describe(), "variant": variant, "model": model, "cfg": cfg,
        "device": device_name(dev), "dtype": shape.dtype, "torch": torch.__version__,
        "repeats": repeats, "warmup": warmup, "framepack_source": sampler.source,
        "load_average": [load_before, _load_average()],
    }
    return speed_rows(timings, calls, computed, steps, settings, extra, common)


def _load_average() -> float | None:
    """1-minute load average (None where the OS has none): a busy machine explains noisy timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"   # unreachable


def format_speed_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of speed rows, with the machine and shape above it."""
    if not rows:
        return "(no rows)"
    head = rows[0]
    lines = [f"model: {head.get('model', 'framepack')}, cfg {head.get('cfg', 1.0):g}; "
             f"device: {head['device']}; torch {head['torch']}; size {head['size']}: {head['shape']}; "
             f"median of {head['repeats']} interleaved repeat(s) after {head['warmup']} warm-up round(s)"
             + (f"; 1-min load average {head['load_average'][0]} -> {head['load_average'][1]}"
                if head.get("load_average") and head["load_average"][0] is not None else ""), "",
             "| setting | steps | computed | ideal speedup | measured speedup | % of ideal | median s "
             "| skipped/computed step cost | residual cache | CPU-time speedup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cost = "-" if r["skipped_step_cost"] is None else f"{100 * r['skipped_step_cost']:.2f}%"
        cpu = r.get("measured_speedup_cpu_time")
        lines.append(
            f"| {r['setting']} | {r['total_steps']} | {r['computed_steps']} | {r['ideal_speedup']:.2f}x "
            f"| {r['measured_speedup']:.2f}x | {100 * r['efficiency']:.1f}% | {r['seconds']:.3f} "
            f"| {cost} | {format_bytes(r['residual_cache_bytes'])} | {'-' if cpu is None else f'{cpu:.2f}x'} |")
    return "\n".join(lines)


def format_engine_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of this engine against diffusers' own MagCache hook, for every CFG scale measured.

    The CPU-time columns (CPU only) are the steadier estimate where other programs share the machine.
    """
    lines = ["| CFG | setting | engine | computed steps per branch | ideal speedup | measured speedup | % of ideal "
             "| CPU-time speedup | % of ideal (CPU time) | skipped/computed step cost | max latent diff vs off |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("engine") is None:
            continue
        cost = "-" if r["skipped_step_cost"] is None else f"{100 * r['skipped_step_cost']:.2f}%"
        per_branch = " / ".join(str(c) for c in r.get("computed_per_branch", []))
        name = r["setting"].split(":", 1)[1] if r["setting"].startswith("diffusers:") else r["setting"]
        cpu = r.get("measured_speedup_cpu_time")
        cpu_cols = "- | -" if cpu is None else f"{cpu:.2f}x | {100 * cpu / r['ideal_speedup']:.1f}%"
        lines.append(
            f"| {r['cfg']:g} | {name} | {'diffusers hook' if r['engine'] == 'diffusers' else 'this engine'} "
            f"| {per_branch} of {r['total_steps']} | {r['ideal_speedup']:.2f}x | {r['measured_speedup']:.2f}x "
            f"| {100 * r['efficiency']:.1f}% | {cpu_cols} | {cost} | {r['max_latent_diff']:.3g} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Quality metrics
# ---------------------------------------------------------------------------

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


def iter_video_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Decode a video's first video stream to HxWx3 RGB uint8 frames, one at a time."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def video_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, height, width) of a video, by decoding it (container frame counts are not reliable)."""
    n, h, w = 0, 0, 0
    for frame in iter_video_frames(path):
        n += 1
        h, w = frame.shape[:2]
    return n, h, w


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


def json_safe(value: Any) -> Any:
    """Infinities -> "inf"/"-inf", NaN -> None, recursively: JSON has no such numbers."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)


def fmt_db(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}"


def format_compare(result: dict[str, Any]) -> str:
    lp = result["lpips"]
    lines = [f"frames: {result['frames']}",
             f"PSNR (dB): mean {fmt_db(result['psnr']['mean'])}, min {fmt_db(result['psnr']['min'])}",
             f"SSIM:      mean {result['ssim']['mean']:.4f}, min {result['ssim']['min']:.4f}",
             (f"LPIPS:     mean {lp['mean']:.4f}, max {lp['max']:.4f}" if lp else result["lpips_note"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------

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
        res = run_job(models, img, JobSettings(prompt=prompt, seed=seed, total_second_length=seconds,
                                                                 steps=1, cache="off", mp4_crf=crf),
                               outputs_dir=str(out / "videos" / "warmup"))
        if res.status != "done":
            logger.warning("sweep: warm-up job %s: %s", res.status, res.message)
    runs: dict[str, list[Any]] = {s.name: [] for s in settings}
    for rnd in range(repeats):
        shift = rnd % len(settings)
        for s in list(settings[shift:]) + list(settings[:shift]):
            job = JobSettings(prompt=prompt, seed=seed, total_second_length=seconds, steps=steps,
                                       mp4_crf=crf, cache="off" if s.params is None else "magcache")
            if s.params is not None:
                job.magcache_thresh, job.magcache_K, job.retention_ratio = s.params
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


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def library_plan_rows(resolutions: Sequence[int] = (256, 512, 640), steps: Sequence[int] = (25, 50),
                      variants: Sequence[str] = ("framepack", "f1")) -> list[dict[str, Any]]:
    """Computed steps per preset: the library's table for each (resolution, steps) vs the published one stretched.

    "Stretched" is what a planner without the library does: the published
    640-px 25-step table fitted to the step count ("nearest" is the MagCache
    reference's stretch, "magnitude" this project's default fit).
    """
    import magcache_core as core

    rows = []
    for variant, res, n in itertools.product(variants, resolutions, steps):
        ratios, source = core.library_ratios(variant, res, n)
        row: dict[str, Any] = {"variant": variant, "resolution": res, "steps": n, "source": source}
        for preset, params in core.PRESETS.items():
            row[preset] = core.skip_schedule(ratios, n, *params).count(False)
            for mode in core.RESAMPLE_MODES:
                row[f"{preset} published ({mode})"] = core.skip_schedule(
                    core.VARIANT_MAG_RATIOS[variant], n, *params, resample=mode).count(False)
        rows.append(row)
    return rows


def library_plan_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: computed steps of each preset from the library vs the published table stretched."""
    import magcache_core as core

    head = ["variant", "px", "steps", "library table"]
    for preset in core.PRESETS:
        head += [f"{preset} library", f"{preset} published (magnitude / nearest)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["resolution"]), str(r["steps"]), r["source"]]
        for preset in core.PRESETS:
            cells += [str(r[preset]), f"{r[f'{preset} published (magnitude)']} / {r[f'{preset} published (nearest)']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_chart(path: str | os.PathLike, steps: Sequence[int] = (25,), profiles: Sequence[str] = ()) -> pathlib.Path:
    """The library's curves (one line per resolution and step count), one panel per variant, as a PNG.

    The x axis is the position in sampling (step / (steps - 1)), so tables of
    different step counts share it.  Profiles given are drawn dashed on their
    variant's panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import magcache_core as core

    variants = list(core.VARIANT_MAG_RATIOS)
    tables = [t for t in core.ratio_library() if t.steps in steps]
    if not tables:
        raise ValueError(f"the library has no table of {', '.join(map(str, steps))} steps: it holds "
                         f"{', '.join(map(str, sorted({t.steps for t in core.ratio_library()})))}")
    loaded = [(pathlib.Path(p).name, core.MagCacheProfile.load(p)) for p in profiles]
    resolutions = sorted({t.resolution for t in tables})
    cmap = plt.get_cmap("viridis")
    styles = {n: s for n, s in zip(sorted(steps), ("-", ":", "-."))}
    fig, axes = plt.subplots(1, len(variants), figsize=(6.0 * len(variants), 4.6), dpi=100, sharey=True)
    for ax, variant in zip(axes, variants):
        for t in (t for t in tables if t.variant == variant):
            colour = cmap(resolutions.index(t.resolution) / max(1, len(resolutions) - 1))
            xs = [i / max(1, t.steps - 1) for i in range(t.steps)]
            ax.plot(xs, t.ratios, styles.get(t.steps, "-"), color=colour, linewidth=1.2,
                    label=f"{t.resolution} px, {t.steps} steps" + (" (published)" if "published" in t.source else ""))
        for name, prof in loaded:
            if prof.variant == variant:
                xs = [i / max(1, prof.num_steps - 1) for i in range(prof.num_steps)]
                ax.plot(xs, prof.ratios, "--", color="black", linewidth=1.0,
                        label=f"{name} ({prof.resolution or '?'} px, {prof.num_steps} steps)")
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_title(f"{variant}: magnitude ratio per step", fontsize=10)
        ax.set_xlabel("position in sampling (step / (steps - 1))")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("ratio ||r_t|| / ||r_t-1||")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _setting_arg(text: str) -> tuple[float, int, float]:
    try:
        return parse_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with an error that says so."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be >= {minimum}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _cfg_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"{text!r}: a CFG scale is a number >= 1 (1 = no true CFG)")
    return value


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be a number > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magcache_bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("speed", help="time one FramePack section: uncached vs MagCache settings")
    sp.add_argument("--size", choices=SIZES, default="small",
                    help="tiny (tests), small (the CPU shape), full (FramePack's real shape, bf16, CUDA)")
    sp.add_argument("--steps", type=_positive_int, default=25)
    sp.add_argument("--repeats", type=_positive_int, default=5, help="timed rounds (median is reported)")
    sp.add_argument("--warmup", type=_nonneg_int, default=1, help="untimed rounds first")
    sp.add_argument("--setting", type=_setting_arg, action="append", default=[], metavar="THRESH,K,RETENTION",
                    help="an extra MagCache setting, e.g. 0.12,3,0.2 (repeatable)")
    sp.add_argument("--variant", choices=("framepack", "f1"), default="framepack",
                    help="whose published ratios (and clean-latent layout) to use")
    sp.add_argument("--resolution", type=_positive_int, default=640,
                    help="full size only: FramePack's bucket resolution (square input image)")
    sp.add_argument("--text-tokens", type=_positive_int, default=None,
                    help="real prompt tokens of the 512 padded ones (default 64; tiny 16 of 64)")
    sp.add_argument("--device", default=None, help="override the size's device (cpu, cuda, cuda:1)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=_positive_int, default=None,
                    help="CPU threads for torch (default: torch's choice); 1 is steadier on a busy machine")
    sp.add_argument("--show-sampler-bars", action="store_true", help="let FramePack's sampler draw its tqdm bars")
    sp.add_argument("--model", choices=MODELS, default="framepack",
                    help="framepack: FramePack's packed model and sampler; diffusers: diffusers' "
                         "HunyuanVideoFramepackTransformer3DModel in its HunyuanVideoFramepackPipeline")
    sp.add_argument("--cfg", type=_cfg_arg, action="append", default=[], metavar="SCALE",
                    help="true CFG scale, 1 = none (repeatable; default 1, or 1 and 3 with --compare-diffusers)")
    sp.add_argument("--compare-diffusers", action="store_true",
                    help="with --model diffusers: add diffusers' own MagCache hook at every cached setting")
    sp.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")

    cp = sub.add_parser("compare", help="PSNR / SSIM / LPIPS of one video against a reference")
    cp.add_argument("reference", help="the reference video (e.g. the uncached one)")
    cp.add_argument("other", help="the video to score")
    cp.add_argument("--no-lpips", action="store_true", help="skip LPIPS even if available")
    cp.add_argument("--json", metavar="FILE", help="write the scores as JSON")

    wp = sub.add_parser("sweep", help="generate uncached + one video per setting, report speed and quality")
    wp.add_argument("--image", required=True)
    wp.add_argument("--prompt", default="")
    wp.add_argument("--seed", type=int, default=31337)
    wp.add_argument("--tiny", action="store_true", help="tiny random-weight models (CPU, seconds; quality meaningless)")
    wp.add_argument("--variant", choices=("framepack", "f1"), default="framepack")
    wp.add_argument("--seconds", type=_positive_float, default=1.0, help="video length in seconds")
    wp.add_argument("--steps", type=_positive_int, default=25)
    wp.add_argument("--setting", type=_setting_arg, action="append", default=[], metavar="THRESH,K,RETENTION",
                    help="a MagCache setting besides the presets (repeatable)")
    wp.add_argument("--no-presets", action="store_true", help="only the --setting ones (and uncached)")
    wp.add_argument("--crf", type=_nonneg_int, default=0,
                    help="H.264 CRF of the generated videos (0 = lossless, so scores measure MagCache only)")
    wp.add_argument("--no-lpips", action="store_true")
    wp.add_argument("--no-warmup", action="store_true", help="skip the untimed one-step warm-up job")
    wp.add_argument("--repeats", type=_positive_int, default=3,
                    help="timed rounds, every setting once per round, interleaved (medians are reported)")
    wp.add_argument("--out", default="outputs/sweep", help="folder for sweep.md, sweep.png, sweep.json, videos/")

    rp = sub.add_parser("ratios", help="draw the ratio library's curves (and profiles) and print its plan table")
    rp.add_argument("profiles", nargs="*", metavar="PROFILE", help="calibration profiles (JSON) to draw too")
    rp.add_argument("--steps", type=_int_list, default=[25], help="which step counts' tables to draw (25,50,75)")
    rp.add_argument("--out", default="outputs/ratios.png", help="the PNG to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the exit code (2 for refused input, as argparse does)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command == "speed":
        if args.threads:
            torch.set_num_threads(args.threads)
        cfgs = args.cfg or ([1.0, 3.0] if args.compare_diffusers else [1.0])
        rows = []
        try:
            for cfg in cfgs:
                cfg_rows = run_speed(size=args.size, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                                     custom=args.setting, variant=args.variant, resolution=args.resolution,
                                     text_tokens=args.text_tokens, device=args.device, seed=args.seed,
                                     show_sampler_bars=args.show_sampler_bars, model=args.model, cfg=cfg,
                                     compare_diffusers=args.compare_diffusers)
                print(format_speed_table(cfg_rows) + "\n")
                rows += cfg_rows
        except (ValueError, ImportError) as exc:
            parser.error(str(exc))
        except RuntimeError as exc:
            if "CUDA" not in str(exc):
                raise
            parser.error(str(exc))
        if args.compare_diffusers:
            print(format_engine_comparison(rows))
        if args.json:
            write_json(args.json, rows)
        return 0
    if args.command == "compare":
        import av

        for p in (args.reference, args.other):
            if not os.path.isfile(p):
                parser.error(f"video file not found: {p}")
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
    if args.command == "ratios":
        try:
            path = ratio_chart(args.out, steps=args.steps, profiles=args.profiles)
        except ValueError as exc:
            parser.error(str(exc))
        print(library_plan_table(library_plan_rows()))
        print(f"\nwrote {path}")
        return 0
    # sweep
    if not os.path.isfile(args.image):
        parser.error(f"--image: file not found: {args.image}")
    import magcache_core as core

    presets = {} if args.no_presets else core.PRESETS
    settings = speed_settings(presets, args.setting)
    if len(settings) == 1:
        parser.error("nothing to compare: give --setting or drop --no-presets")
    if args.tiny:
        logger.warning(TINY_NOTE)
    rows, md = run_sweep(args.image, args.prompt, settings, args.out, tiny=args.tiny, variant=args.variant,
                         seconds=args.seconds, steps=args.steps, seed=args.seed, crf=args.crf,
                         use_lpips=not args.no_lpips, warmup=not args.no_warmup, repeats=args.repeats)
    print(md)
    print(f"\nwrote {pathlib.Path(args.out) / 'sweep.md'} and {pathlib.Path(args.out) / 'sweep.png'}")
    return 0 if all(r.status == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
