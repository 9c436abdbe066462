"""The quality metrics (magcache_framepack.metrics) on two decoded videos: torchmetrics called directly, numpy.

The clips are content-like (a moving gradient and a square, as a video has
structure), written with the project's own MP4 writer at an ordinary CRF and
decoded again, so the figures are those the bench and the app show for real files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from magcache_framepack import metrics
from magcache_framepack.records import decode_frames
from magcache_framepack.video import write_mp4


def clip(shift: int, frames: int = 6, h: int = 48, w: int = 64) -> np.ndarray:
    """A moving gradient with a bright square; ``shift`` moves the square (the second clip differs a little)."""
    out = np.zeros((frames, h, w, 3), np.uint8)
    x = np.linspace(0, 255, w)
    for t in range(frames):
        out[t, :, :, 0] = ((x + 8 * t) % 256).astype(np.uint8)[None, :]
        out[t, :, :, 1] = np.linspace(30, 200, h).astype(np.uint8)[:, None]
        top, left = 10 + t, 12 + 2 * t + shift
        out[t, top:top + 16, left:left + 16, 2] = 230
    return out


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("videos")
    a, b = folder / "ref.mp4", folder / "other.mp4"
    write_mp4(clip(0), a, crf=16)
    write_mp4(clip(2), b, crf=16)
    return a, b, decode_frames(a), decode_frames(b)


def test_frame_metrics_equal_torchmetrics_and_numpy_on_decoded_videos(two_videos) -> None:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    _, _, fa, fb = two_videos
    assert fa.shape == fb.shape and fa.shape[0] == 6 and not np.array_equal(fa, fb)
    got = metrics.frame_metrics(fa, fb)
    assert len(got["psnr"]) == len(got["ssim"]) == 6

    # the library called directly, frame by frame, with the settings the module states
    for i in range(6):
        ta = torch.from_numpy(fa[i]).permute(2, 0, 1)[None].double() / 255
        tb = torch.from_numpy(fb[i]).permute(2, 0, 1)[None].double() / 255
        assert got["psnr"][i] == pytest.approx(float(peak_signal_noise_ratio(tb, ta, data_range=1.0)), abs=1e-9)
        direct = structural_similarity_index_measure(tb.float(), ta.float(), gaussian_kernel=True, sigma=1.5,
                                                     kernel_size=11, data_range=1.0, k1=0.01, k2=0.03)
        assert got["ssim"][i] == pytest.approx(float(direct), abs=1e-6)
        # PSNR, independently: 10 log10(255^2 / MSE) over all pixels and channels
        mse = float(np.mean((fa[i].astype(np.float64) - fb[i].astype(np.float64)) ** 2))
        assert got["psnr"][i] == pytest.approx(10 * math.log10(255.0 ** 2 / mse), abs=1e-5)   # float32 log10 inside
    assert all(0 < s < 1 for s in got["ssim"])


def test_compare_videos_figures_are_frame_metrics_of_the_decoded_files(two_videos) -> None:
    a, b, fa, fb = two_videos
    result = metrics.compare_videos(a, b, use_lpips=False)
    expected = metrics.frame_metrics(fa, fb)
    assert result["frames"] == 6
    assert result["per_frame"]["psnr"] == pytest.approx(expected["psnr"], abs=1e-9)
    assert result["per_frame"]["ssim"] == pytest.approx(expected["ssim"], abs=1e-6)
    assert result["psnr"]["min"] == pytest.approx(min(expected["psnr"]), abs=1e-9)
    assert result["ssim"]["mean"] == pytest.approx(float(np.mean(expected["ssim"])), abs=1e-6)
    assert result["lpips"] is None and result["per_frame"]["lpips"] is None


def test_compare_videos_batches_longer_videos_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More frames than one batch: the per-frame lists keep the frames' order across batches."""
    monkeypatch.setattr(metrics, "BATCH", 4)
    fa = np.concatenate([clip(0), clip(0)])
    fb = np.concatenate([clip(0), clip(3)])        # the first 6 frames equal, the last 6 not
    write_mp4(fa, tmp_path / "a.mp4", crf=0)
    write_mp4(fb, tmp_path / "b.mp4", crf=0)
    result = metrics.compare_videos(tmp_path / "a.mp4", tmp_path / "b.mp4", use_lpips=False)
    assert result["frames"] == 12
    expected = metrics.frame_metrics(decode_frames(tmp_path / "a.mp4"), decode_frames(tmp_path / "b.mp4"))
    assert result["per_frame"]["psnr"] == pytest.approx(expected["psnr"], abs=1e-9)
    assert result["per_frame"]["psnr"][:6] == [math.inf] * 6 and all(math.isfinite(p) for p in expected["psnr"][6:])


def test_lpips_without_weights_on_disk_is_one_line_and_downloads_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_videos) -> None:
    pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    scorer, note = metrics.lpips_scorer()
    assert scorer is None
    assert note.startswith("LPIPS unavailable") and "\n" not in note and "nothing was downloaded" in note
    assert str(tmp_path / "hub") in note
    a, b, _, _ = two_videos
    result = metrics.compare_videos(a, b, use_lpips=True)
    assert result["lpips"] is None and result["lpips_note"] == note
    assert not (tmp_path / "hub").exists()        # nothing was written to the cache either
