"""Shared fixtures: tiny random-weight instances of FramePack's real transformer and sampler.

FramePack's code comes from the ``framepack`` package on the index (its
``diffusers_helper`` lives under ``framepack.diffusers_helper``).  Everything
here runs on the CPU in float32, so a 25-step section takes well under a second.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The models here are tiny: one thread is much faster than two fighting over a busy 2-core machine.
torch.set_num_threads(1)

WINDOW = 9            # FramePack's latent window: 9 latent frames = 33 video frames per section


def packed_transformer_class():
    from framepack.diffusers_helper.models.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked
    return HunyuanVideoTransformer3DModelPacked


def sample_hunyuan(*args: Any, **kwargs: Any):
    from framepack.diffusers_helper.pipelines.k_diffusion_hunyuan import sample_hunyuan as real
    return real(*args, **kwargs)


def build_transformer(heads: int = 2, head_dim: int = 16, layers: int = 2, single_layers: int = 2,
                      refiner_layers: int = 1, text_dim: int = 32, seed: int = 0) -> torch.nn.Module:
    """A tiny packed transformer with random weights, image projection and clean-x embedder installed."""
    torch.manual_seed(seed)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    model = packed_transformer_class()(
        num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=refiner_layers, text_embed_dim=text_dim,
        pooled_projection_dim=16, rope_axes_dim=rope, has_image_proj=True, image_proj_dim=24,
        has_clean_x_embedder=True)
    # Random init leaves the zero-initialised gates of a fresh model inert; give every weight a value.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


@dataclasses.dataclass
class Section:
    """The inputs FramePack gives ``sample_hunyuan`` for one section (inverted order, middle section)."""

    kwargs: dict[str, Any]
    width: int
    height: int
    text_len: int


def make_section(transformer: torch.nn.Module, width: int = 64, height: int = 64, text_len: int = 12,
                 text_pad: int = 32, seed: int = 1, padding: int = 1) -> Section:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    h, w = height // 8, width // 8

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    mask = torch.zeros(1, text_pad, dtype=torch.bool)
    mask[:, :text_len] = True
    indices = torch.arange(0, 1 + padding + WINDOW + 1 + 2 + 16).unsqueeze(0)
    pre, _, latent_idx, post, idx_2x, idx_4x = indices.split([1, padding, WINDOW, 1, 2, 16], dim=1)
    kwargs = dict(
        prompt_embeds=rnd(1, text_pad, cfg.text_embed_dim), prompt_embeds_mask=mask,
        prompt_poolers=rnd(1, cfg.pooled_projection_dim),
        negative_prompt_embeds=rnd(1, text_pad, cfg.text_embed_dim), negative_prompt_embeds_mask=mask.clone(),
        negative_prompt_poolers=rnd(1, cfg.pooled_projection_dim),
        image_embeddings=rnd(1, 7, cfg.image_proj_dim),
        latent_indices=latent_idx,
        clean_latents=rnd(1, 16, 2, h, w), clean_latent_indices=torch.cat([pre, post], dim=1),
        clean_latents_2x=rnd(1, 16, 2, h, w), clean_latent_2x_indices=idx_2x,
        clean_latents_4x=rnd(1, 16, 16, h, w), clean_latent_4x_indices=idx_4x,
    )
    return Section(kwargs=kwargs, width=width, height=height, text_len=text_len)


def run_section(transformer: Any, section: Section, steps: int = 25, cfg: float = 1.0, seed: int = 7,
                callback: Callable | None = None) -> torch.Tensor:
    """One real FramePack sampling run (UniPC) on the CPU in float32."""
    return sample_hunyuan(
        transformer=transformer, sampler="unipc", width=section.width, height=section.height,
        frames=WINDOW * 4 - 3, real_guidance_scale=cfg, distilled_guidance_scale=10.0, guidance_rescale=0.0,
        num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
        device=torch.device("cpu"), dtype=torch.float32, callback=callback, **section.kwargs)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A small start image file (PNG) with some structure, for CLI jobs."""
    import numpy as np
    from PIL import Image

    x = np.zeros((72, 96, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, 96, dtype=np.uint8)[None, :]
    x[20:50, 30:70, 2] = 220
    path = tmp_path / "start.png"
    Image.fromarray(x).save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def temp_files_in_this_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """This process's temp dir is the run's pytest folder, which pytest rotates (it keeps three runs).

    gradio_client 1.x (with Gradio 5) leaves an empty folder in the temp dir for every file a
    Client downloads; Gradio's own cache lands there too.  Every tmp_path stays under it, so the
    files the apps serve are still inside the temp dir, as Gradio requires.  Processes the tests
    start (apps, Ray workers) keep the system's temp dir.
    """
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.getbasetemp())
    try:
        yield
    finally:
        tempfile.tempdir = old


@pytest.fixture(scope="session")
def tiny_transformer() -> torch.nn.Module:
    return build_transformer()


@pytest.fixture(scope="session")
def section(tiny_transformer: torch.nn.Module) -> Section:
    return make_section(tiny_transformer)


# -- the ratio library's choice rule, restated independently of magcache_core ----------------------

LIBRARY_FILE = Path(__file__).resolve().parent.parent / "magcache_ratio_library.json"


def library_choice(variant: str, resolution: float, steps: int) -> tuple[int, int, list[float]]:
    """(resolution, steps, ratios) of the table the library must pick, straight from the data.

    The rule as issue 10 states it: the published 25-step tables stand for 640 px
    at 25 steps, the file's tables fill every other (resolution, steps); the
    nearest calibrated resolution wins (a tie goes to the larger), then the same
    step count, else the nearest (a tie goes to the larger).
    """
    import json

    from magcache_core import FRAMEPACK_F1_MAG_RATIOS, FRAMEPACK_MAG_RATIOS

    tables = {(640, 25): list({"framepack": FRAMEPACK_MAG_RATIOS, "f1": FRAMEPACK_F1_MAG_RATIOS}[variant])}
    for row in json.loads(LIBRARY_FILE.read_text())["tables"]:
        if row["variant"] == variant:
            tables.setdefault((row["resolution"], row["steps"]), row["ratios"])
    best_res = None
    for res in sorted({r for r, _ in tables}):
        if best_res is None or abs(res - resolution) <= abs(best_res - resolution):
            best_res = res                    # ascending order: on a tie the larger replaces the smaller
    best_steps = None
    for n in sorted(n for r, n in tables if r == best_res):
        if best_steps is None or abs(n - steps) <= abs(best_steps - steps):
            best_steps = n
    return best_res, best_steps, tables[(best_res, best_steps)]


def library_plan_ratios(variant: str, height: int, width: int, steps: int, mode: str = "magnitude") -> list[float]:
    """The ratios a job of these frames plans from: the chosen table, fitted to ``steps``."""
    from magcache_core import resample_mag_ratios

    _, _, ratios = library_choice(variant, (height + width) / 2, steps)
    return resample_mag_ratios(ratios, steps, mode)


def stream_bytes(path: Path) -> bytes:
    """An MP4's video stream packets, in order: what "the same video bytes" compares (the container's
    comment tag holds the record, with its run's timings, so the whole file differs between runs)."""
    import av

    with av.open(str(path)) as c:
        return b"".join(bytes(p) for p in c.demux(video=0))
