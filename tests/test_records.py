"""Every video says how it was made, and the same record makes the same video, in any process.

The records are checked against values computed here independently (the file's
SHA-256 with hashlib, the plan with skip_schedule, the MP4's tag read with PyAV),
and the replay runs in a fresh Python process with another thread count, hash
seed and global torch seed, decoding both MP4s and comparing every pixel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import magcache_core
from magcache_framepack.cli import main
from magcache_framepack.records import FORMAT, frame_ranges, replay_verdict
from magcache_framepack.settings import JobSettings, LIMITS
from magcache_framepack.video import frames_sha256, write_mp4
from magcache_framepack import models as models_module
from magcache_framepack.models import TINY_MODEL_ID
from conftest import library_plan_ratios, stream_bytes

ROOT = Path(__file__).resolve().parent.parent


def frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_limits_are_one_table_and_clamp_into_it() -> None:
    s = JobSettings(prompt="x", steps=500, retention_ratio=1.0, magcache_thresh=2.5, magcache_K=0.4,
                       seed=-3, crf=99.6, seconds=0.2)
    c = s.clamped()
    assert (c.steps, c.retention_ratio, c.magcache_thresh, c.magcache_K, c.crf,
            c.seconds) == (100, 0.99, 1.0, 1, 51, 1)
    assert c.seed == -3        # a seed is not moved (the nearest seed is another video): it is refused
    with pytest.raises(ValueError, match="seed = -3: must be an integer from 0 to 9223372036854775807"):
        c.validate()
    c.seed = 3
    c.validate()                                    # a clamped job is a valid job
    for name, limit in LIMITS.items():
        if limit.text:          # a length: the prompts' own test is in test_app_disk.py
            continue
        assert limit.accepts(limit.low) and limit.accepts(limit.high)
        above = limit.high + (1 if limit.integer else 0.5)
        with pytest.raises(ValueError, match=name):
            bad = JobSettings(prompt="x", **{name: above})
            bad.validate()


def test_bad_image_files_are_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    def no_models(*a, **k):
        raise AssertionError("models were loaded for a job whose image is bad")

    monkeypatch.setattr(models_module, "load_models", no_models)
    fake = tmp_path / "photo.png"
    fake.write_text("this is text, not a PNG")
    with pytest.raises(SystemExit) as exc:
        main(["--image", str(fake), "--tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "photo.png is not a readable image" in err and "PNG, JPEG" in err and "Traceback" not in err
    tiny = tmp_path / "dot.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny)
    with pytest.raises(SystemExit):
        main(["--image", str(tiny), "--tiny"])
    assert "1x1 pixels; it must be at least 16x16" in capsys.readouterr().err


@pytest.mark.slow
def test_record_beside_and_inside_the_video_and_replay_in_another_process(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "clip.mp4"
    argv = ["--image", str(image), "--prompt", "a red box turns", "--tiny", "--seconds", "1", "--steps", "8",
            "--seed", "123", "--preset", "E015K4R02", "--output", str(out), "--no-progress",
            "--outputs-dir", str(tmp_path / "outputs")]
    assert main(argv) == 0
    sidecar = out.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    # the MP4's own comment tag holds the same record
    import av
    with av.open(str(out)) as c:
        assert json.loads(c.metadata["comment"]) == record
    assert record["format"] == FORMAT
    assert (record["prompt"], record["seed"], record["variant"], record["model"]) == \
        ("a red box turns", 123, "framepack", TINY_MODEL_ID)
    assert record["image"]["name"] == "start.png"
    assert record["image"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    settings = record["settings"]
    assert (settings["steps"], settings["magcache_thresh"], settings["magcache_K"], settings["retention_ratio"],
            settings["cfg"], settings["gs"], settings["crf"], settings["cache"]) == \
        (8, 0.15, 4, 0.2, 1.0, 10.0, 16, "magcache")
    height, width = frames(out).shape[1:3]
    ratios = library_plan_ratios("framepack", height, width, 8)
    expected_plan = magcache_core.skip_schedule(ratios, 8, 0.15, 4, 0.2)
    mc = record["magcache"]
    assert mc["plan"] == ["skip" if s else "compute" for s in expected_plan]
    assert mc["ratios"] == ratios
    assert mc["ratio_source"] == "FramePack-Studio, 128 px, 25 steps, resampled to 8 steps"
    assert (record["frame"]["width"], record["frame"]["height"]) == (width, height)
    assert [s["computed_steps"] for s in record["sections"]] == \
        [[i for i, s in enumerate(expected_plan) if not s]] * record["sections_total"]
    assert record["frame"]["frames"] == len(frames(out))
    assert record["packages"]["torch"] and record["timings"]["seconds"] > 0

    # the same video from the record alone, in a fresh process that differs in every way that used to matter
    env = dict(os.environ, PYTHONHASHSEED="7", OMP_NUM_THREADS="2")
    code = ("import sys, torch; torch.manual_seed(99); torch.rand(5); torch.set_num_threads(2); "
            "from magcache_framepack.cli import main; sys.exit(main(sys.argv[1:]))")
    again = tmp_path / "again.mp4"
    other = tmp_path / "seed7.mp4"
    last_lines = {}
    for target, extra in ((again, []), (other, ["--seed", "7"])):
        proc = subprocess.run([sys.executable, "-c", code, "--replay", str(sidecar), "--output", str(target),
                               "--no-progress", "--outputs-dir", str(tmp_path / "replays"), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        last_lines[target] = proc.stdout.strip().splitlines()[-1]
        # no console noise from FramePack's import or diffusers' casts (#15): only our own lines
        for noise in ("is not installed!", "native sdp backends", "should be kept in float32"):
            assert noise not in proc.stdout + proc.stderr, noise
    # same frames handed to the encoder, the same decoded pixels and the same video stream bytes
    assert re.fullmatch("[0-9a-f]{64}", record["frames_sha256"])
    assert json.loads(again.with_suffix(".json").read_text())["frames_sha256"] == record["frames_sha256"]
    assert np.array_equal(frames(again), frames(out))
    assert stream_bytes(again) == stream_bytes(out)
    assert last_lines[again] == f"Replay: same frames as the record (frames_sha256 {record['frames_sha256'][:16]}...)."
    # another seed: other frames, and the line says which and by how much, as decoding both files here finds
    assert json.loads(other.with_suffix(".json").read_text())["frames_sha256"] != record["frames_sha256"]
    diff = np.abs(frames(other).astype(int) - frames(out).astype(int)).reshape(len(frames(out)), -1).max(axis=1)
    assert diff.any()
    assert last_lines[other].startswith("Replay: not the frames of the record: ")
    assert f"{np.count_nonzero(diff)} of {len(diff)} frames differ" in last_lines[other]
    assert f"by at most {diff.max()} of 255 levels" in last_lines[other]
    replayed = json.loads(again.with_suffix(".json").read_text())
    assert replayed["settings"] == record["settings"] and replayed["image"] == record["image"]
    assert json.loads(other.with_suffix(".json").read_text())["seed"] == 7


def test_replay_errors_say_what_is_wrong(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture) -> None:
    not_record = tmp_path / "x.json"
    not_record.write_text('{"hello": 1}')
    with pytest.raises(SystemExit):
        main(["--replay", str(not_record)])
    assert "is not a video record of this project" in capsys.readouterr().err
    record = {"format": FORMAT, "prompt": "p", "n_prompt": "", "seed": 1, "variant": "framepack",
              "tiny": True, "settings": {"steps": 4},
              "image": {"name": "start.png", "path": str(image), "sha256": "0" * 64}}
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        main(["--replay", str(rec)])
    assert "is not the recorded input image" in capsys.readouterr().err


def test_replay_verdict_without_the_recorded_video_or_digest(tmp_path: Path) -> None:
    clip = np.zeros((6, 16, 16, 3), np.uint8)
    clip[:, 4:12, 4:12] = 200
    changed = clip.copy()
    changed[2, 4:12, 4:12] = 150       # frames 2 and 5 differ, by about 50 levels before encoding
    changed[5, 4:12, 4:12] = 150
    old, new = tmp_path / "old.mp4", tmp_path / "new.mp4"
    write_mp4(clip, old, crf=0)
    write_mp4(changed, new, crf=0)
    record = {"format": FORMAT, "frames_sha256": frames_sha256(clip)}
    replayed = {"frames_sha256": frames_sha256(changed)}
    # the record's own video beside it: decoded and compared frame by frame
    diff = np.abs(frames(old).astype(int) - frames(new).astype(int)).reshape(6, -1).max(axis=1)
    assert list(np.flatnonzero(diff)) == [2, 5]
    line = replay_verdict(record, old.with_suffix(".json"), replayed, new)
    assert line == (f"Replay: not the frames of the record: 2 of 6 frames differ (frame 2, 5), by at most "
                    f"{diff.max()} of 255 levels, decoded from both files.")
    # no video beside the record: the digests alone, and the line says the frames cannot be compared
    line = replay_verdict(record, tmp_path / "gone.json", replayed, new)
    assert line.startswith("Replay: other frames than the record") and str(tmp_path / "gone.mp4") in line
    # a record from before frames_sha256: the decoded frames decide
    line = replay_verdict({}, old, {"frames_sha256": frames_sha256(clip)}, old)
    assert line == "Replay: same decoded frames as old.mp4 (its record predates frames_sha256)."


def test_frame_ranges() -> None:
    assert frame_ranges([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8"
    assert frame_ranges([3]) == "3"
    assert frame_ranges([]) == ""
