"""The ``speed`` tool: FramePack's sampler timed over one section, uncached and under each MagCache setting.

``python magcache_bench.py speed [--size tiny|small|full] [--repeats N] [--setting T,K,R ...] [--json FILE]``

It times FramePack's own sampler (``sample_hunyuan``, UniPC) over one section
with FramePack's packed transformer built at a chosen size with random
weights.  Random weights are enough: the compute of a transformer call does
not depend on weight values, and MagCache's skip plan depends only on the
calibrated ratio table, never on activations.  So the speed-up measured here
is the speed-up a real model gets at the same shape.

``--size full`` is FramePack's real transformer (24 heads x 128, 20 + 40
blocks, ~13B parameters, bf16, about 26 GB of weights) built directly on the
GPU, at the bucket FramePack picks for a square image at ``--resolution``
(640 -> 640x608).  One command on a CUDA machine::

    python magcache_bench.py speed --size full --repeats 3 --json speed_full.json

``--model diffusers`` times diffusers' FramePack transformer in its own
pipeline instead; ``--compare-diffusers`` adds diffusers' own MagCache hook at
every cached setting, beside this project's engine.

Decisions worth knowing:

* ``residual_cache_bytes`` is the *peak* bytes the engine held in cached
  residuals during a run (read from ``MagCacheState.residual_cache_bytes()``
  after every transformer call): the engine frees its residuals when a run
  ends, so "after the run" is always 0 and is reported separately as
  ``residual_cache_bytes_after_run``.
* Repeats are interleaved (every setting once per round), so slow drifts of
  the machine hit all settings alike; on a CPU the process CPU time gives a
  second, steadier speed-up where other programs share the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from magcache_framepack.bench.report import (SpeedSetting, UsageError, nonneg_int, positive_int, setting_arg,
                                             speed_settings, write_json)
from magcache_framepack.settings import VARIANT_NAMES

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


def _check_speed_args(repeats: int, warmup: int, model: str, cfg: float, compare_diffusers: bool) -> None:
    """ValueError naming the first argument of :func:`run_speed` it cannot run with."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if model not in MODELS:
        raise ValueError(f"model {model!r}: choose one of {', '.join(MODELS)}")
    if not (math.isfinite(cfg) and cfg >= 1.0):
        raise ValueError(f"cfg = {cfg!r}: must be a number >= 1 (1 = no true CFG)")
    if compare_diffusers and model != "diffusers":
        raise ValueError("--compare-diffusers needs --model diffusers: diffusers' hook knows only its own "
                         "block classes")


class _Run(NamedTuple):
    """One timed run of one setting."""

    seconds: float
    cpu_seconds: float
    calls: list[tuple[float, bool]]        # (call seconds, whether the blocks ran), in call order
    computed: int | float                  # steps computed (per branch)
    peak_bytes: int                        # the engine's residual cache at its largest
    bytes_after: int                       # ... and after the run (the engine frees it: 0)
    max_diff: float                        # largest latent difference from the uncached run


class _SettingRunner:
    """Runs the section under one setting at a time: switches the cache on, times the sampler, switches it off.

    The first uncached run's latents are kept as the reference every later run
    is measured against (``max_diff``).
    """

    def __init__(self, sampler: _Sampler, dev: torch.device, configs: dict[str, Any], hook_configs: dict[str, Any],
                 branches: int, show_sampler_bars: bool) -> None:
        self.sampler = sampler
        self.transformer = sampler.transformer
        self.dev = dev
        self.configs = configs                  # this engine's MagCacheConfig per setting name
        self.hook_configs = hook_configs        # diffusers' MagCacheConfig per setting name
        self.branches = branches                # transformer calls per step: 2 with true CFG
        self.show_sampler_bars = show_sampler_bars
        self.reference: list[torch.Tensor] = []   # the uncached latents

    def _sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def run(self, s: SpeedSetting) -> _Run:
        """One section under ``s``, timed; the cache is off again afterwards whatever happened."""
        import magcache_core as core

        transformer = self.transformer
        state = core.enable_magcache(transformer, self.configs[s.name]) if s.name in self.configs else None
        if s.name in self.hook_configs:
            transformer.enable_cache(self.hook_configs[s.name])
        timer = CallTimer(transformer, self.dev, state.residual_cache_bytes if state is not None else None)
        try:
            with core.magcache_run(transformer) as report, _sampler_bars_hidden(not self.show_sampler_bars):
                self._sync()
                t0, c0 = time.perf_counter(), time.process_time()
                latents = self.sampler.sample()
                self._sync()
                seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            after = state.residual_cache_bytes() if state is not None else 0
        finally:
            timer.remove()
            if state is not None:
                core.disable_magcache(transformer)
            if s.name in self.hook_configs:
                transformer.disable_cache()
        if not torch.isfinite(latents).all():
            logger.warning("setting %s produced non-finite latents (random weights too large?)", s.name)
        if s.params is None and not self.reference:
            self.reference.append(latents)
        diff = (latents.float() - self.reference[0].float()).abs().max().item() if self.reference else math.nan
        computed = self._computed(s, report, [r for _, r in timer.calls])
        return _Run(seconds, cpu_seconds, timer.calls, computed, timer.peak_bytes, after, diff)

    def _computed(self, s: SpeedSetting, report: Any, ran: list[bool]) -> int | float:
        """Steps computed: the engine's report, checked against the blocks that ran; else counted from them."""
        if report is not None:
            step_ran = ran[::self.branches]
            if any(ran) and sorted(i for i, r in enumerate(step_ran) if r) != sorted(report.computed):
                logger.warning("setting %s: the engine reports computed steps %s but the blocks ran at steps %s",
                               s.name, report.computed, [i for i, r in enumerate(step_ran) if r])
            return report.computed_count
        computed = sum(ran) / self.branches
        return int(computed) if float(computed).is_integer() else computed


class _Tally:
    """What the timed rounds gather per setting, in the shape :func:`speed_rows` takes."""

    def __init__(self, settings: Sequence[SpeedSetting], branches: int) -> None:
        self.settings = settings
        self.branches = branches
        self.timings: dict[str, list[float]] = {s.name: [] for s in settings}
        self.cpu_timings: dict[str, list[float]] = {s.name: [] for s in settings}
        self.calls: dict[str, tuple[list[float], list[float]]] = {s.name: ([], []) for s in settings}
        self.computed: dict[str, int] = {}
        self.extra: dict[str, dict[str, Any]] = {
            s.name: {"residual_cache_bytes": 0, "max_latent_diff": 0.0, "engine": s.engine if s.params else None}
            for s in settings}

    def add(self, s: SpeedSetting, run: _Run) -> None:
        self.timings[s.name].append(run.seconds)
        self.cpu_timings[s.name].append(run.cpu_seconds)
        for t, ran in run.calls:
            self.calls[s.name][0 if ran else 1].append(t)
        if self.computed.setdefault(s.name, run.computed) != run.computed:
            logger.warning("setting %s computed %s steps, earlier %s", s.name, run.computed, self.computed[s.name])
        e = self.extra[s.name]
        e["residual_cache_bytes"] = max(e["residual_cache_bytes"], run.peak_bytes)
        e["residual_cache_bytes_after_run"] = run.bytes_after
        e["max_latent_diff"] = max(e["max_latent_diff"], run.max_diff)
        e["computed_per_branch"] = [sum(ran for _, ran in run.calls[b::self.branches])
                                    for b in range(self.branches)]

    def add_cpu_time_speedups(self) -> None:
        """Speed-ups from process CPU time (CPU runs only).

        Process CPU time barely moves when other programs share the machine, wall
        time does: on a busy CPU this is the steadier estimate of the same speed-up.
        """
        cpu_base = statistics.median(self.cpu_timings["off"])
        for s in self.settings:
            self.extra[s.name]["cpu_seconds"] = statistics.median(self.cpu_timings[s.name])
            self.extra[s.name]["measured_speedup_cpu_time"] = cpu_base / self.extra[s.name]["cpu_seconds"]


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

    _check_speed_args(repeats, warmup, model, cfg, compare_diffusers)
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
    branches = 1 if cfg == 1.0 else 2
    ratios = core.VARIANT_MAG_RATIOS[variant]
    settings = speed_settings(core.PRESETS, custom, compare_diffusers)
    configs = {s.name: core.MagCacheConfig(magcache_thresh=s.params[0], magcache_K=s.params[1],
                                           retention_ratio=s.params[2], num_steps=steps, mag_ratios=ratios,
                                           variant=variant)
               for s in settings if s.params is not None and s.engine == "magcache"}
    hook_configs = {s.name: diffusers_magcache_config(s.params, steps, ratios)
                    for s in settings if s.params is not None and s.engine == "diffusers"}
    runner = _SettingRunner(sampler, dev, configs, hook_configs, branches, show_sampler_bars)

    load_before = _load_average()
    for r in range(warmup):
        for s in settings:
            runner.run(s)
            logger.info("warm-up %d/%d: %s", r + 1, warmup, s.name)
    tally = _Tally(settings, branches)
    for r in range(repeats):
        for s in settings:
            run = runner.run(s)
            tally.add(s, run)
            logger.info("round %d/%d: %-22s %.3fs (%s/%d steps computed)",
                        r + 1, repeats, s.name, run.seconds, run.computed, steps)
    for name in hook_configs:
        tally.extra[name]["residual_cache_bytes"] = None   # diffusers' hook keeps its own state: not measured here
    if dev.type == "cpu":
        tally.add_cpu_time_speedups()
    common = {
        "size": shape.name, "shape": shape.describe(), "variant": variant, "model": model, "cfg": cfg,
        "device": device_name(dev), "dtype": shape.dtype, "torch": torch.__version__,
        "repeats": repeats, "warmup": warmup, "framepack_source": sampler.source,
        "load_average": [load_before, _load_average()],
    }
    return speed_rows(tally.timings, tally.calls, tally.computed, steps, settings, tally.extra, common)


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

def _cfg_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"{text!r}: a CFG scale is a number >= 1 (1 = no true CFG)")
    return value



# ---------------------------------------------------------------------------
# The speed subcommand
# ---------------------------------------------------------------------------

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``speed``: its flags, and :func:`run` as what it does."""
    sp = subparsers.add_parser("speed", help="time one FramePack section: uncached vs MagCache settings")
    sp.add_argument("--size", choices=SIZES, default="small",
                    help="tiny (tests), small (the CPU shape), full (FramePack's real shape, bf16, CUDA)")
    sp.add_argument("--steps", type=positive_int, default=25)
    sp.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (median is reported)")
    sp.add_argument("--warmup", type=nonneg_int, default=1, help="untimed rounds first")
    sp.add_argument("--setting", type=setting_arg, action="append", default=[], metavar="THRESH,K,RETENTION",
                    help="an extra MagCache setting, e.g. 0.12,3,0.2 (repeatable)")
    sp.add_argument("--variant", choices=VARIANT_NAMES, default="framepack",
                    help="whose published ratios (and clean-latent layout) to use")
    sp.add_argument("--resolution", type=positive_int, default=640,
                    help="full size only: FramePack's bucket resolution (square input image)")
    sp.add_argument("--text-tokens", type=positive_int, default=None,
                    help="real prompt tokens of the 512 padded ones (default 64; tiny 16 of 64)")
    sp.add_argument("--device", default=None, help="override the size's device (cpu, cuda, cuda:1)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=positive_int, default=None,
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
    sp.set_defaults(run=run)
    return sp


def run(args: argparse.Namespace) -> int:
    """One table per CFG scale, then the engine comparison; settings or a machine it cannot run are refused."""
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
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:
        if "CUDA" not in str(exc):
            raise
        raise UsageError(str(exc)) from None
    if args.compare_diffusers:
        print(format_engine_comparison(rows))
    if args.json:
        write_json(args.json, rows)
    return 0
