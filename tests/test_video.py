"""The MP4 writer: the same frames give the same video stream bytes in every process.

Which CPUs this can catch the fault on: x86-64 CPUs with AVX-512 as x264 uses it
(F, CD, BW, DQ and VL all present: Intel Skylake-SP and later Xeons, Ice Lake to
Rocket Lake desktops and laptops, AMD Zen 4 and later). There, x264's AVX-512
code reads heap memory it never wrote, so the bytes of the same clip depend on
what the process held before. The test dirties the heap of each fresh process
with a different byte before encoding, as a long job does, and runs a control
that encodes with plain PyAV (x264 left to pick its own instruction set): on
such a CPU the control gives different streams (asserted, so the test shows it
can see the fault), and write_mp4 must give one. On CPUs without AVX-512 x264
never runs that code: the control is not asserted, and the equality must still
hold. The clip is content-like (moving gradients and a moving disc): uniform
noise encodes the same every time and would hide the fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from magcache_framepack.video import (X264_THREADS, cpu_features, frames_sha256, video_frames, write_mp4,
                                      x264_asm_cap, x264_options)
from conftest import stream_bytes

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Run in a fresh process: import everything, make the clip, fill and free many heap blocks with
# one byte (sizes under glibc's mmap threshold, so they are reused, not returned to the kernel),
# then encode the clip.
ENCODE_IN_FRESH_PROCESS = r"""
import ctypes, sys
import av, numpy as np, torch
from magcache_framepack import video
fill, threads, writer, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)

t, h, w = 37, 112, 144
y, x = np.mgrid[0:h, 0:w].astype(np.float32)
frames = []
for i in range(t):
    f = np.stack([127 + 120 * np.sin((x + 3 * i) / 11.0), 127 + 120 * np.cos((y - 2 * i) / 9.0),
                  127 + 120 * np.sin((x + y + 5 * i) / 17.0)], -1)
    f[((x - (10 + 2 * i) % w) ** 2 + (y - (20 + i) % h) ** 2) < 120] = (250, 30, 30)
    frames.append(f.clip(0, 255).astype(np.uint8))
frames = np.stack(frames)

# Everything is imported: now leave the heap as a long job does, with freed blocks holding `fill`.
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
sizes = [1024 + (i * 7919) % (120 * 1024) for i in range(600)]
blocks = [libc.malloc(n) for n in sizes]
for p, n in zip(blocks, sizes):
    ctypes.memset(p, fill, n)
for p in blocks:
    libc.free(p)

if writer == "write_mp4":
    video.write_mp4(frames, out, crf=16)
else:                       # the control: plain PyAV, x264 picks its own instruction set
    with av.open(out, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=30, options={"crf": "16"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
"""


def encode_in_fresh_process(tmp_path: pathlib.Path, fill: int, threads: int, writer: str) -> bytes:
    out = tmp_path / f"{writer}-{fill}-{threads}.mp4"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONHASHSEED=str(fill))
    proc = subprocess.run([sys.executable, "-c", ENCODE_IN_FRESH_PROCESS, str(fill), str(threads), writer, str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return stream_bytes(out)


def has_avx512() -> bool:
    """AVX-512 as the kernel reports it, read here independently of the writer's own detection."""
    try:
        return "avx512f" in pathlib.Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dirties the heap through glibc's malloc")
def test_same_frames_give_the_same_stream_in_fresh_processes_whatever_the_heap_held(tmp_path: pathlib.Path) -> None:
    runs = [(0, 1), (255, 2), (90, 3)]
    written = [encode_in_fresh_process(tmp_path, fill, threads, "write_mp4") for fill, threads in runs]
    assert all(len(s) > 10_000 for s in written)
    digests = [hashlib.sha256(s).hexdigest()[:16] for s in written]
    assert digests[1] == digests[0] and digests[2] == digests[0], \
        f"write_mp4 gave other video stream bytes for the same frames in other processes: {digests}"
    # the thread count x264 ran with is the fixed one, whatever the machine (x264 writes it into the stream)
    assert f"threads={X264_THREADS} ".encode() in written[0]
    control = [encode_in_fresh_process(tmp_path, fill, 1, "pyav") for fill, _ in runs]
    if has_avx512():
        assert len(set(control)) > 1, "the control encoded one stream: this CPU does not show the fault"


def test_x264_is_capped_at_avx2_only_where_the_cpu_has_avx512() -> None:
    assert x264_asm_cap({"AVX512F": True, "AVX2": True, "AVX": True}) == "AVX2"
    assert x264_asm_cap({"AVX512F": False, "AVX2": True}) is None
    assert x264_asm_cap({"AVX2": True, "AVX": True}) is None         # x264 chooses on its own
    assert x264_asm_cap({"NEON": True, "ASIMD": True}) is None      # Arm: no x86 cap
    assert x264_asm_cap({}) is None                                  # unknown CPU: never force anything
    assert x264_options(16, {"AVX512F": True}) == {"crf": "16", "x264-params": "asm=AVX2"}
    assert x264_options(0, {"AVX2": True}) == {"crf": "0"}


@pytest.mark.skipif(not pathlib.Path("/proc/cpuinfo").is_file(), reason="needs Linux's /proc/cpuinfo")
def test_cpu_features_agree_with_the_kernel() -> None:
    flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    features = cpu_features()
    for name in ("avx2", "avx512f"):
        assert bool(features.get(name.upper())) == (name in flags), name


def test_video_frames_and_their_sha256_by_hand(tmp_path: pathlib.Path) -> None:
    # two videos of 2 frames, 3x5 (odd height), each pixel value known
    values = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])
    x = values[torch.arange(2 * 3 * 2 * 3 * 5) % 5].reshape(2, 3, 2, 3, 5)
    levels = np.array([0, 64, 128, 159, 255], np.uint8)     # round(v * 127.5 + 127.5); 127.5 rounds to even
    xs = levels[(np.arange(2 * 3 * 2 * 3 * 5) % 5)].reshape(2, 3, 2, 3, 5)
    # each frame: the two videos side by side (3x10), then the odd height's last row repeated (4x10)
    expected = np.stack([np.concatenate([xs[0, :, t], xs[1, :, t]], axis=2).transpose(1, 2, 0) for t in range(2)])
    expected = np.concatenate([expected, expected[:, -1:]], axis=1)
    assert expected.shape == (2, 4, 10, 3)
    video = video_frames(x)
    assert np.array_equal(video, expected)
    assert frames_sha256(video) == hashlib.sha256(expected.tobytes()).hexdigest()
    # write_mp4 takes exactly these frames; a lossless encode of a flat clip decodes to them
    flat = np.full((3, 16, 16, 3), 128, np.uint8)
    path = write_mp4(flat, tmp_path / "flat.mp4", crf=0, comment=json.dumps({"k": 1}))
    with av.open(path) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        assert json.loads(c.metadata["comment"]) == {"k": 1}
    assert np.array_equal(decoded, flat)
    assert [p.name for p in tmp_path.iterdir()] == ["flat.mp4"]     # no temporary file left


def test_write_mp4_refuses_what_it_cannot_encode(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.zeros((2, 16, 16, 3), np.float32), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="even sides"):
        write_mp4(np.zeros((2, 15, 16, 3), np.uint8), tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="crf"):
        write_mp4(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "a.mp4", crf=52)
    assert not list(tmp_path.iterdir())
