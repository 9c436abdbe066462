"""Tests of the job (magcache_framepack.job and its settings) with tiny random-weight models on the CPU.

Every expectation is computed here independently of the pipeline: FramePack's
section and frame arithmetic is restated as a simulation of its decode/blend
loop, MagCache's plan comes from magcache_core.skip_schedule, and whether the
transformer's block stack really ran is observed with our own forward hook.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"   # before anything can import huggingface_hub

import pathlib
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import pytest
import torch

import magcache_core
from magcache_framepack.settings import JobSettings, section_count
from magcache_framepack.job import ProgressUpdate, SectionReport, find_bucket, prepare_input_image, run_job
from magcache_framepack.video import video_frames, write_mp4
from magcache_framepack import job as job_module, models as models_module
from magcache_framepack.models import Models, VARIANTS, build_tiny_models, framepack_modules, load_models
from conftest import library_plan_ratios

RES = 64          # tiny bucket resolution: keeps a 2-second job to a few CPU seconds
WINDOW = 9


# ---------------------------------------------------------------------------
# Independent restatements
# ---------------------------------------------------------------------------

def simulate_framepack(seconds: float, window: int, forward: bool) -> list[tuple[int, int]]:
    """(latent frames so far, pixel frames so far) after each section, by replaying FramePack's bookkeeping.

    Sections: seconds at 30 fps over 4 frames per latent, rounded, at least one.
    The causal VAE decodes L latents to 4L-3 frames; a new stretch is blended
    over 4*window-3 frames of the video so far.
    """
    sections = max(round(seconds * 30 / (window * 4)), 1)
    overlap = 4 * window - 3
    out: list[tuple[int, int]] = []
    pixels = None
    if forward:                                 # F1: image latent first, then sections in order
        latents = 1
        for _ in range(sections):
            latents += window
            pixels = 4 * latents - 3 if pixels is None else pixels + (4 * 2 * window - 3) - overlap
            out.append((latents, pixels))
        return out
    paddings = list(range(sections))[::-1] if sections <= 4 else [3] + [2] * (sections - 3) + [1, 0]
    latents = 0
    for padding in paddings:                    # FramePack: back to front, image latent added last
        new = window + (1 if padding == 0 else 0)
        latents += new
        fresh = 2 * window + (1 if padding == 0 else 0)
        pixels = 4 * latents - 3 if pixels is None else pixels + (4 * fresh - 3) - overlap
        out.append((latents, pixels))
    return out


def decode_mp4(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, width, height) of an MP4, by decoding every frame with PyAV."""
    with av.open(str(path)) as container:
        frames = [f for f in container.decode(video=0)]
    return len(frames), frames[0].width, frames[0].height


def skipped_by_plan(ratios: Any, steps: int, thresh: float = 0.10, k: int = 3, retention: float = 0.2) -> list[int]:
    return [i for i, s in enumerate(magcache_core.skip_schedule(ratios, steps, thresh, k, retention)) if s]


def test_image(h: int = 72, w: int = 120, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256] + [np.full_like(xx, 255)] * (channels - 3), -1)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


test_image.__test__ = False   # a helper, not a test


class BlockCalls:
    """Counts calls of the transformer's first block: one per computed step when CFG is off."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.count = 0
        self.handle = transformer.transformer_blocks[0].register_forward_pre_hook(self._hook)

    def _hook(self, *args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------



@pytest.fixture(scope="module")
def tiny() -> Iterator[dict[str, Models]]:
    """Both variants' tiny models, built while every network connection is refused."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tiny models must not touch the network")

    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(socket.socket, "connect", refuse)
        mpatch.setattr(socket, "create_connection", refuse)
        models = {name: load_models(name, tiny=True) for name in VARIANTS}
    yield models


# ---------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("forward", [False, True])
def test_frame_arithmetic_matches_framepack_loop(forward: bool) -> None:
    for window in (1, 5, 9, 16, 33):
        for seconds in (0.1, 1, 1.2, 2, 5, 7.5, 10, 33, 60, 120):
            sim = simulate_framepack(seconds, window, forward)
            assert section_count(seconds, window) == len(sim)
    # FramePack's UI defaults: 5 s, window 9 -> 4 sections, 145 frames
    assert section_count(5, 9) == len(simulate_framepack(5, 9, forward)) == 4
    assert simulate_framepack(5, 9, forward)[-1][1] == 145


def test_framepack_modules_and_buckets() -> None:
    fp = framepack_modules()
    assert fp is framepack_modules()                 # imported once
    assert fp.source in ("checkout", "package")
    assert hasattr(fp.sampler, "sample_hunyuan") and hasattr(fp.models, "HunyuanVideoTransformer3DModelPacked")
    if not torch.cuda.is_available():
        assert fp.memory is None
    for h, w in [(480, 832), (1000, 1000), (300, 1200), (1200, 300)]:
        assert find_bucket(h, w, 640) == fp.bucket_tools.find_nearest_bucket(h, w, resolution=640)
        bh, bw = find_bucket(h, w, 128)
        assert bh % 16 == 0 and bw % 16 == 0 and bh * bw <= 160 * 160
        assert (bh > bw) == (h > w) or h == w


def test_variants_differ_only_where_they_should() -> None:
    fp, f1 = VARIANTS["framepack"], VARIANTS["f1"]
    assert fp.transformer_repo == "lllyasviel/FramePackI2V_HY"
    assert f1.transformer_repo == "lllyasviel/FramePack_F1_I2V_HY_20250503"
    assert (fp.forward_sections, f1.forward_sections) == (False, True)
    with pytest.raises(ValueError, match="framepack"):
        load_models("hunyuan", tiny=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="only without CUDA")
def test_real_models_without_cuda_point_to_tiny() -> None:
    with pytest.raises(RuntimeError, match="--tiny"):
        load_models("framepack")


def test_settings_validation_messages() -> None:
    JobSettings(prompt="x").validate()
    cases = {
        "steps": dict(steps=0), "cache": dict(cache="fast"), "latent_window_size": dict(latent_window_size=2.5),
        "seconds": dict(seconds=0), "crf": dict(crf=60),
        "mag_ratios": dict(mag_ratios="/nonexistent/profile.json"), "calibrate": dict(calibrate=True, cache="off"),
        "magcache_K": dict(magcache_K=0), "resolution": dict(resolution=8),
    }
    for field, kwargs in cases.items():
        with pytest.raises(ValueError, match=field):
            JobSettings(prompt="x", **kwargs).validate()


def test_write_mp4_odd_size(tmp_path: pathlib.Path) -> None:
    gray = torch.full((1, 3, 5, 33, 17), 0.2)           # odd height and width
    path = write_mp4(video_frames(gray), tmp_path / "v.mp4", fps=30, crf=0)
    assert decode_mp4(path) == (5, 18, 34)
    with av.open(path) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert abs(frame.mean() - (0.2 * 127.5 + 127.5)) < 3
    assert not list(tmp_path.glob(".*"))                # no temporary file left


def test_input_image_checks() -> None:
    assert prepare_input_image(test_image(channels=4)).shape == (72, 120, 3)
    for bad, needle in [(None, "No input image"), (test_image()[:, :, 0], "shape"),
                        (test_image().astype(np.float32), "dtype"), ([[1, 2, 3]], "list")]:
        with pytest.raises(ValueError, match=needle):
            prepare_input_image(bad)


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------

def test_tiny_models_are_the_real_classes(tiny: dict[str, Models]) -> None:
    import transformers
    from diffusers import AutoencoderKLHunyuanVideo
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    m = tiny["f1"]
    assert isinstance(m.text_encoder, transformers.LlamaModel)
    assert isinstance(m.text_encoder_2, transformers.CLIPTextModel)
    assert isinstance(m.image_encoder, transformers.SiglipVisionModel)
    assert isinstance(m.vae, AutoencoderKLHunyuanVideo)
    assert isinstance(m.transformer, framepack_modules().models.HunyuanVideoTransformer3DModelPacked)
    assert m.transformer.image_projection is not None and m.transformer.clean_x_embedder is not None
    assert m.tiny and m.device == torch.device("cpu") and m.transformer.dtype == torch.float32
    # FramePack drops the template's first crop_start tokens: the prompt must survive the crop
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(m.tokenizer(prefix).input_ids) >= DEFAULT_PROMPT_TEMPLATE["crop_start"]
    # same seed, same weights
    again = load_models("f1", tiny=True)
    assert all(torch.equal(a, b) for a, b in zip(m.transformer.parameters(), again.transformer.parameters()))


@pytest.mark.parametrize("variant", ["framepack", "f1"])
def test_magcache_job(tiny: dict[str, Models], tmp_path: pathlib.Path, variant: str) -> None:
    models = tiny[variant]
    settings = JobSettings(prompt="The girl dances gracefully", seconds=2, resolution=RES,
                              seed=7)
    reports: list[SectionReport] = []
    updates: list[ProgressUpdate] = []
    calls = BlockCalls(models.transformer)
    try:
        result = run_job(models, test_image(), settings, outputs_dir=tmp_path, on_section=reports.append,
                            on_progress=updates.append)
    finally:
        calls.close()
    assert result.status == "done", result.message
    assert magcache_core.get_magcache_state(models.transformer) is None       # disabled after the job

    sim = simulate_framepack(2, WINDOW, forward=(variant == "f1"))
    assert len(result.sections) == len(sim) == 2 and reports == result.sections
    frame = result.record["frame"]
    plan = skipped_by_plan(library_plan_ratios(variant, frame["height"], frame["width"], 25), 25)
    assert plan, "the library's plan skips steps"
    assert result.record["magcache"]["ratio_source"].startswith("FramePack-Studio, 128 px, 25 steps")
    for report, (latents, frames) in zip(result.sections, sim):
        assert report.skipped_steps == plan
        assert report.computed_steps == [i for i in range(25) if i not in plan]
        assert pathlib.Path(report.video_path).name == f"{result.job_id}_{latents}.mp4"
        n, width, height = decode_mp4(report.video_path)                     # every partial video stays
        assert (n, report.frames) == (frames, frames)
        assert report.seconds >= report.sampling_seconds > 0
    # the block stack really ran only on computed steps
    assert calls.count == sum(len(r.computed_steps) for r in result.sections)

    frames, width, height = decode_mp4(result.video_path)
    assert frames == 4 * (2 * WINDOW + 1) - 3 == 73
    assert width % 16 == 0 and height % 16 == 0 and width > height              # the 120x72 image's bucket
    # the input is kept once, by its pixels, and the record names that file (see test_app_disk.py)
    assert [p.name for p in tmp_path.glob("*.png")] == [result.record["image"]["name"]]

    steps = [u for u in updates if u.preview is not None]
    assert len(steps) == 2 * 25 and steps[-1].percent == 100 and steps[0].percent == 4
    assert steps[0].preview.dtype == np.uint8 and steps[0].preview.shape == (height // 8, WINDOW * width // 8, 3)
    lines = result.summary_lines()
    assert len(lines) >= 4 and "Section 2/2" in lines[2] and lines[3].startswith(f"Total: computed {2 * (25 - len(plan))}/50")


def test_stop_mid_section_keeps_first_video(tiny: dict[str, Models], tmp_path: pathlib.Path) -> None:
    models = tiny["framepack"]
    steps = 10
    seen: list[ProgressUpdate] = []
    calls = BlockCalls(models.transformer)
    calls_at_first_section: list[int] = []
    try:
        result = run_job(
            models, test_image(), JobSettings(prompt="a cat", seconds=2, steps=steps, resolution=RES),
            outputs_dir=tmp_path, on_progress=seen.append,
            on_section=lambda r: calls_at_first_section.append(calls.count),
            should_stop=lambda: any(u.section == 1 and u.step >= 3 for u in seen))
    finally:
        calls.close()
    assert result.status == "stopped" and "Stopped" in result.message
    assert len(result.sections) == 1
    first = result.sections[0].video_path
    assert result.video_path == first and pathlib.Path(first).is_file()
    assert decode_mp4(first)[0] == simulate_framepack(2, WINDOW, forward=False)[0][1]
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == [pathlib.Path(first).name]
    # aborted inside the second section's sampler, not before or after it
    assert 0 < calls.count - calls_at_first_section[0] < steps
    assert magcache_core.get_magcache_state(models.transformer) is None


def test_bad_input_then_good_job(tiny: dict[str, Models], tmp_path: pathlib.Path) -> None:
    models = tiny["f1"]
    settings = JobSettings(prompt="a dog runs", seconds=1, steps=6, resolution=RES, cache="off")
    for image, needle in [(None, "No input image"), (test_image()[:, :, 0], "shape"),
                          (test_image().astype(np.float64) / 255, "dtype")]:
        result = run_job(models, image, settings, outputs_dir=tmp_path)
        assert result.status == "error" and needle in result.message and result.video_path is None
    bad_settings = run_job(models, test_image(), JobSettings(prompt="x", steps=0), outputs_dir=tmp_path)
    assert bad_settings.status == "error" and "steps" in bad_settings.message
    with models.busy:                                                     # another job holds the models
        busy = run_job(models, test_image(), settings, outputs_dir=tmp_path)
    assert busy.status == "error" and "Another job" in busy.message
    assert not list(tmp_path.glob("*.mp4"))

    # RGBA is accepted (alpha dropped); without a cache every step runs
    result = run_job(models, test_image(channels=4), settings, outputs_dir=tmp_path)
    assert result.status == "done", result.message
    assert [(r.computed_steps, r.skipped_steps) for r in result.sections] == [(list(range(6)), [])]
    assert decode_mp4(result.video_path)[0] == simulate_framepack(1, WINDOW, False)[-1][1] == 4 * (WINDOW + 1) - 3


def test_calibration_profile_roundtrip(tiny: dict[str, Models], tmp_path: pathlib.Path) -> None:
    models = tiny["framepack"]
    steps = 12
    profiles = tmp_path / "profiles"
    calib = run_job(models, test_image(), JobSettings(prompt="a bird flies", seconds=1,
                                                            steps=steps, resolution=RES, calibrate=True),
                       outputs_dir=tmp_path, profiles_dir=profiles)
    assert calib.status == "done", calib.message
    assert calib.sections[0].skipped_steps == []                        # calibration never skips
    path = pathlib.Path(calib.profile_path)
    assert path.parent == profiles and "framepack" in path.name and f"{steps}steps" in path.name
    profile = magcache_core.MagCacheProfile.load(path)
    frame = calib.record["frame"]
    n_frames, width, height = decode_mp4(calib.video_path)
    assert (frame["width"], frame["height"]) == (width, height)
    # the library's key: (height + width) / 2 of the frames
    assert (profile.variant, profile.num_steps, profile.resolution) == ("framepack", steps, (width + height) // 2)
    assert profile.model == "tiny-random"                               # never mistaken for a real calibration
    assert profile.ratios == calib.calibration.ratios and len(profile.ratios) == steps
    assert any(abs(r - 1.0) > 1e-4 for r in profile.ratios[1:])        # measured, not a placeholder

    thresh, k = 0.3, 4
    expected = skipped_by_plan(profile.ratios, steps, thresh, k)
    library = skipped_by_plan(library_plan_ratios("framepack", height, width, steps), steps, thresh, k)
    assert expected and expected != library, "the test needs a plan that tells the profile apart"
    reuse = run_job(models, test_image(), JobSettings(prompt="a bird flies", seconds=1,
                                                            steps=steps, resolution=RES, magcache_thresh=thresh,
                                                            magcache_K=k, mag_ratios=str(path)),
                       outputs_dir=tmp_path)
    assert reuse.status == "done", reuse.message
    assert reuse.sections[0].skipped_steps == expected

    # a FramePack profile is refused for F1, before any work
    wrong = run_job(tiny["f1"], test_image(), JobSettings(prompt="x", mag_ratios=str(path), resolution=RES),
                       outputs_dir=tmp_path / "f1")
    assert wrong.status == "error" and "calibrated for 'framepack'" in wrong.message and not wrong.sections

    # a profile measured on the real model is refused by tiny models (and the other way round)
    real = dataclasses.replace(profile, model="lllyasviel/FramePackI2V_HY").save(tmp_path / "real.json")
    refused = run_job(models, test_image(), JobSettings(prompt="x", mag_ratios=str(real), resolution=RES),
                         outputs_dir=tmp_path / "real")
    assert refused.status == "error" and "calibrated on 'lllyasviel/FramePackI2V_HY'" in refused.message


# ---------------------------------------------------------------------------
# FramePack checkout detection and the real-model (low-VRAM) path, without a GPU
# ---------------------------------------------------------------------------

def test_checkout_diffusers_helper_wins(tmp_path: pathlib.Path) -> None:
    """Run from inside a FramePack checkout, its top-level diffusers_helper is the code used."""
    pkg = tmp_path / "diffusers_helper"
    for sub in ("", "pipelines", "models"):
        (pkg / sub).mkdir(exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    for name in ("hunyuan", "utils", "clip_vision", "bucket_tools", "memory", "pipelines/k_diffusion_hunyuan",
                 "models/hunyuan_video_packed"):
        (pkg / f"{name}.py").write_text("MARK = 'checkout'\n")
    code = ("from magcache_framepack.models import framepack_modules; fp = framepack_modules(); "
            "print(fp.source, fp.hunyuan.MARK, fp.models.MARK, fp.memory is None)")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["checkout", "checkout", "checkout", "True"]


class FakeMemory:
    """Stands in for diffusers_helper.memory (which needs CUDA) and records what the pipeline asks of it."""

    def __init__(self, free_gb: float) -> None:
        self.free_gb = free_gb
        self.calls: list[tuple] = []
        self.gpu = torch.device("cpu")
        memory = self

        class DynamicSwapInstaller:
            @staticmethod
            def install_model(model: torch.nn.Module, **kwargs: Any) -> None:
                memory.calls.append(("dynamic_swap", type(model).__name__))

        self.DynamicSwapInstaller = DynamicSwapInstaller

    def get_cuda_free_memory_gb(self, device: Any = None) -> float:
        return self.free_gb

    def unload_complete_models(self, *models: Any) -> None:
        self.calls.append(("unload", len(models)))

    def fake_diffusers_current_device(self, model: Any, target_device: Any) -> None:
        self.calls.append(("fake_device", type(model).__name__))

    def load_model_as_complete(self, model: Any, target_device: Any, unload: bool = True) -> None:
        self.calls.append(("load", type(model).__name__))

    def move_model_to_device_with_memory_preservation(self, model: Any, target_device: Any,
                                                      preserved_memory_gb: float = 0) -> None:
        self.calls.append(("move", type(model).__name__, preserved_memory_gb))

    def offload_model_from_device_for_memory_preservation(self, model: Any, target_device: Any,
                                                          preserved_memory_gb: float = 0) -> None:
        self.calls.append(("offload", type(model).__name__, preserved_memory_gb))


@pytest.fixture()
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMemory]:
    memory = FakeMemory(free_gb=20.0)
    fp = framepack_modules()
    with_memory = types.SimpleNamespace(**{**vars(fp), "memory": memory})
    for module in (job_module, models_module):      # each looks FramePack's modules up by itself
        monkeypatch.setattr(module, "framepack_modules", lambda: with_memory)
    yield memory


@pytest.mark.parametrize("free_gb", [20.0, 80.0])
def test_real_loading_follows_framepack(tiny: dict[str, Models], fake_cuda: FakeMemory,
                                        monkeypatch: pytest.MonkeyPatch, free_gb: float) -> None:
    """Repos, dtypes and VRAM handling of FramePack's demo, with from_pretrained handing out fresh tiny models."""
    import diffusers
    import transformers

    fake_cuda.free_gb = free_gb
    fresh = build_tiny_models("f1")
    loaded: dict[str, tuple] = {}

    def fake_from_pretrained(name: str, model: Any) -> Any:
        def load(repo: str, subfolder: str | None = None, **kwargs: Any) -> Any:
            dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
            loaded[name] = (repo, subfolder, dtype)
            return model
        return load

    fp = framepack_modules()
    for owner, attr, model in [
            (transformers.LlamaModel, "text_encoder", fresh.text_encoder),
            (transformers.CLIPTextModel, "text_encoder_2", fresh.text_encoder_2),
            (getattr(transformers, "LlamaTokenizerFast", None) or transformers.LlamaTokenizer, "tokenizer",
             fresh.tokenizer),
            (transformers.CLIPTokenizer, "tokenizer_2", fresh.tokenizer_2),
            (diffusers.AutoencoderKLHunyuanVideo, "vae", fresh.vae),
            (transformers.SiglipImageProcessor, "feature_extractor", fresh.feature_extractor),
            (transformers.SiglipVisionModel, "image_encoder", fresh.image_encoder),
            (fp.models.HunyuanVideoTransformer3DModelPacked, "transformer", fresh.transformer)]:
        monkeypatch.setattr(owner, "from_pretrained", fake_from_pretrained(attr, model))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    fresh.transformer.high_quality_fp32_output_for_inference = False
    models = load_models("f1")
    hy = "hunyuanvideo-community/HunyuanVideo"
    assert loaded["text_encoder"] == (hy, "text_encoder", torch.float16)
    assert loaded["text_encoder_2"] == (hy, "text_encoder_2", torch.float16)
    assert loaded["tokenizer"][:2] == (hy, "tokenizer") and loaded["tokenizer_2"][:2] == (hy, "tokenizer_2")
    assert loaded["vae"] == (hy, "vae", torch.float16)
    assert loaded["feature_extractor"][:2] == ("lllyasviel/flux_redux_bfl", "feature_extractor")
    assert loaded["image_encoder"] == ("lllyasviel/flux_redux_bfl", "image_encoder", torch.float16)
    assert loaded["transformer"] == ("lllyasviel/FramePack_F1_I2V_HY_20250503", None, torch.bfloat16)
    assert models.transformer.dtype == torch.bfloat16 and models.vae.dtype == torch.float16
    assert models.text_encoder.dtype == torch.float16 and models.image_encoder.dtype == torch.float16
    assert models.transformer.high_quality_fp32_output_for_inference is True
    assert not models.tiny and models.dtype == torch.bfloat16
    low = free_gb <= 60
    assert models.high_vram is not low
    assert models.vae.use_tiling is low and models.vae.use_slicing is low
    swapped = [c[1] for c in fake_cuda.calls if c[0] == "dynamic_swap"]
    assert swapped == (["HunyuanVideoTransformer3DModelPacked", "LlamaModel"] if low else [])


def test_low_vram_job_moves_models_like_framepack(tiny: dict[str, Models], fake_cuda: FakeMemory,
                                                  tmp_path: pathlib.Path) -> None:
    models = dataclasses.replace(tiny["framepack"], high_vram=False)
    settings = JobSettings(prompt="a horse", n_prompt="blurry", cfg=2.0, seconds=2, steps=3,
                              resolution=RES, gpu_memory_preservation=7.5)
    result = run_job(models, test_image(), settings, outputs_dir=tmp_path)
    assert result.status == "done", result.message
    assert [r.skipped_steps for r in result.sections] == [[], []]        # 3 steps: nothing to skip, CFG or not
    per_section = [("unload", 0), ("move", "HunyuanVideoTransformer3DModelPacked", 7.5),
                   ("offload", "HunyuanVideoTransformer3DModelPacked", 8.0), ("load", "AutoencoderKLHunyuanVideo"),
                   ("unload", 0)]
    assert fake_cuda.calls == [
        ("unload", 5),                                                    # start clean
        ("fake_device", "LlamaModel"), ("load", "CLIPTextModel"),         # text encoding
        ("load", "AutoencoderKLHunyuanVideo"),                            # VAE encoding
        ("load", "SiglipVisionModel"),                                    # CLIP vision
        *per_section, *per_section,
        ("unload", 5),                                                    # end clean
    ]


def test_teacache_job_reports_the_steps_that_ran(tiny: dict[str, Models], tmp_path: pathlib.Path) -> None:
    models = tiny["f1"]
    steps = 10
    calls = BlockCalls(models.transformer)
    try:
        result = run_job(models, test_image(), JobSettings(prompt="rain", seconds=1, steps=steps,
                                                                 resolution=RES, cache="teacache"),
                            outputs_dir=tmp_path)
    finally:
        calls.close()
    assert result.status == "done", result.message
    (report,) = result.sections
    assert sorted(report.computed_steps + report.skipped_steps) == list(range(steps))
    assert calls.count == len(report.computed_steps)
    assert {0, steps - 1} <= set(report.computed_steps)                 # TeaCache always runs first and last
    assert models.transformer.enable_teacache is False                  # switched off again after the job
