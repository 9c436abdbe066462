"""The section-history layout run_job hands to FramePack's sample_hunyuan, for both variants.

Every ``sample_hunyuan`` call of a tiny multi-section job is recorded (its keyword
arguments and the latents it returned).  The expected conditioning of each section
is then rebuilt here, independently of the pipeline, by replaying the history
bookkeeping of FramePack's demo workers on the recorded generated latents:

* FramePack (demo_gradio.py) generates back to front.  Paddings count down from
  ``sections - 1`` to 0, except that beyond 4 sections they are
  ``[3, 2, ..., 2, 1, 0]``.  The RoPE frame axis of a section is: the input image
  (frame 0), ``padding * window`` blank frames, the window being generated, then
  the latest history latent (1x), two more (2x) and sixteen more (4x).  The
  history starts as 19 zero latents; each section's latents (with the input
  image's latent in front on the last one, padding 0) go in FRONT of it.
* FramePack-F1 (demo_gradio_f1.py) generates front to back.  The frame axis is:
  input image (0), sixteen 4x frames, two 2x frames, one 1x frame, then the window.
  The history starts as 19 zero latents followed by the input image's latent; the
  last 19 history latents feed 4x/2x/1x, and each section's latents are appended.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"   # before anything can import huggingface_hub

import pathlib
from typing import Any

import numpy as np
import pytest
import torch

from magcache_framepack.settings import JobSettings, section_count
from magcache_framepack.job import run_job
from magcache_framepack.models import framepack_modules, get_variant, load_models

RES = 64          # bucket for the 120x72 image: 80x48 pixels, 10x6 latents; a section costs milliseconds
WINDOW = 4        # latents per section (FramePack uses 9)
SECONDS = 3.3     # 3.3 s * 30 fps / (4 frames * 4 latents) = 6.19 -> 6 sections
SECTIONS = 6      # > 4: exercises FramePack's [3, 2, 2, 2, 1, 0] paddings; 24 latents > 19 history slots
STEPS = 2
TENSOR_KEYS = ("clean_latents", "clean_latents_2x", "clean_latents_4x")
INDEX_KEYS = ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices", "clean_latent_4x_indices")


# ---------------------------------------------------------------------------
# Independent restatement of FramePack's demo workers
# ---------------------------------------------------------------------------

def demo_section_count(seconds: float, window: int) -> int:
    return int(max(round(seconds * 30 / (window * 4)), 1))


def demo_paddings(sections: int) -> list[int]:
    """Blank windows before each section, in FramePack's (inverted) generation order."""
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return [sections - 1 - i for i in range(sections)]


def _frames(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


def inverted_indices(padding: int, window: int) -> dict[str, list[int]]:
    """Frame positions: [image][padding*window blanks][window][1x][2x 2x][4x * 16]."""
    gen_start = 1 + padding * window
    after = gen_start + window
    return dict(latent_indices=_frames(gen_start, window),
                clean_latent_indices=[0, after],
                clean_latent_2x_indices=_frames(after + 1, 2),
                clean_latent_4x_indices=_frames(after + 3, 16))


def forward_indices(window: int) -> dict[str, list[int]]:
    """Frame positions: [image][4x * 16][2x 2x][1x][window]."""
    return dict(clean_latent_indices=[0, 19],
                clean_latent_4x_indices=_frames(1, 16),
                clean_latent_2x_indices=_frames(17, 2),
                latent_indices=_frames(20, window))


def inverted_clean_latents(start: torch.Tensor, generated: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """What each section is conditioned on, replaying FramePack's history (newest latents in front)."""
    paddings = demo_paddings(len(generated))
    b, c, _, h, w = start.shape
    history = torch.zeros((b, c, 19, h, w), dtype=torch.float32)
    out = []
    for padding, new in zip(paddings, generated):
        out.append(dict(clean_latents=torch.cat([start, history[:, :, 0:1]], dim=2),
                        clean_latents_2x=history[:, :, 1:3],
                        clean_latents_4x=history[:, :, 3:19]))
        new = new.to(torch.float32)
        if padding == 0:
            new = torch.cat([start, new], dim=2)
        history = torch.cat([new, history], dim=2)
    return out


def forward_clean_latents(start: torch.Tensor, generated: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """What each section is conditioned on, replaying F1's history (newest latents at the end)."""
    b, c, _, h, w = start.shape
    history = torch.cat([torch.zeros((b, c, 19, h, w), dtype=torch.float32), start], dim=2)
    out = []
    for new in generated:
        n = history.shape[2]
        out.append(dict(clean_latents=torch.cat([start, history[:, :, n - 1:n]], dim=2),
                        clean_latents_2x=history[:, :, n - 3:n - 1],
                        clean_latents_4x=history[:, :, n - 19:n - 3]))
        history = torch.cat([history, new.to(torch.float32)], dim=2)
    return out


def check_layout(variant: str, calls: list[dict[str, Any]], window: int, sections: int) -> None:
    """Assert that every recorded sample_hunyuan call got FramePack's demo layout."""
    forward = get_variant(variant).forward_sections
    assert len(calls) == sections
    start = calls[0]["kwargs"]["clean_latents"][:, :, :1]
    assert start.shape[:3] == (1, 16, 1) and start.abs().sum() > 0
    generated = [call["result"] for call in calls]
    for new in generated:
        assert new.shape == (1, 16, window, *start.shape[3:])
    if forward:
        expected_tensors = forward_clean_latents(start, generated)
        expected_indices = [forward_indices(window)] * sections
    else:
        expected_tensors = inverted_clean_latents(start, generated)
        expected_indices = [inverted_indices(p, window) for p in demo_paddings(sections)]

    for section, (call, tensors, indices) in enumerate(zip(calls, expected_tensors, expected_indices)):
        kwargs = call["kwargs"]
        where = f"{variant} section {section}"
        assert kwargs["frames"] == window * 4 - 3, where
        for key in INDEX_KEYS:
            got = kwargs[key]
            assert got.dtype == torch.long and got.shape == (1, len(indices[key])), f"{where} {key}"
            assert got[0].tolist() == indices[key], f"{where} {key}"
        for key in TENSOR_KEYS:
            got = kwargs[key]
            assert got.dtype == torch.float32, f"{where} {key}"
            assert got.shape == tensors[key].shape, f"{where} {key}: {tuple(got.shape)}"
            assert torch.equal(got, tensors[key]), f"{where} {key} differs from FramePack's history layout"


# ---------------------------------------------------------------------------
# The recorded job
# ---------------------------------------------------------------------------

def image(h: int = 72, w: int = 120) -> np.ndarray:
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx * 3 + yy) % 256], -1)
    return np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)


def record_job(variant: str, outputs: pathlib.Path) -> list[dict[str, Any]]:
    """Run a tiny job and return every sample_hunyuan call: cloned kwargs and the latents it returned."""
    sampler = framepack_modules().sampler
    real = sampler.sample_hunyuan
    calls: list[dict[str, Any]] = []

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        assert not args, "run_job passes sample_hunyuan keyword arguments only"
        saved = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        result = real(*args, **kwargs)
        calls.append(dict(kwargs=saved, result=result.detach().clone()))
        return result

    models = load_models(variant, tiny=True)
    settings = JobSettings(prompt="a cat walks", seconds=SECONDS, latent_window_size=WINDOW,
                              steps=STEPS, resolution=RES, seed=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler, "sample_hunyuan", recording)
        result = run_job(models, image(), settings, outputs_dir=outputs)
    assert result.status == "done", result.message
    assert len(result.sections) == SECTIONS
    return calls


@pytest.fixture(scope="module", params=["framepack", "f1"])
def recorded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    variant = request.param
    return variant, record_job(variant, tmp_path_factory.mktemp(variant))


def test_job_has_enough_sections() -> None:
    assert demo_section_count(SECONDS, WINDOW) == SECTIONS == section_count(SECONDS, WINDOW)
    assert demo_paddings(SECTIONS) == [3, 2, 2, 2, 1, 0]
    assert demo_paddings(4) == [3, 2, 1, 0]


def test_sample_hunyuan_gets_framepack_layout(recorded: tuple[str, list]) -> None:
    variant, calls = recorded
    check_layout(variant, calls, WINDOW, SECTIONS)
    # the history really rolls over: by the last section (5 * 4 = 20 generated latents before it)
    # none of the 19 history slots still holds an initial zero latent, in either variant
    last = calls[-1]["kwargs"]
    slots = torch.cat([last["clean_latents"][:, :, 1:], last["clean_latents_2x"], last["clean_latents_4x"]], dim=2)
    assert all(slots[:, :, i].abs().sum() > 0 for i in range(19))
