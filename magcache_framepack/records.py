"""How each video was made: the JSON written beside every MP4 and inside it.

Every MP4 the pipeline writes gets a JSON file with the same stem
(``x.mp4`` -> ``x.json``) and the same JSON as the MP4 container's ``comment``
tag, so a video that travels without its JSON still says how it was made.
The record holds everything needed to make the same video again
(``magcache_generate.py --replay x.json``): prompt, seed, the input image's
name and SHA-256, variant, model, every setting, the ratio table and skip plan
that ran, the per-section report, timings and package versions.

This module is pure bookkeeping: no torch, no models (numpy and PyAV to
compare a replay's frames with the record's).  It is shared by the
pipeline (which writes), the CLI (which replays) and the Ray driver (which
writes what a remote worker produced).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np

FORMAT = "magcache-framepack-video"
VERSION = 1
#: The packages whose versions decide what a job computes.
PACKAGES = ("torch", "diffusers", "transformers", "framepack", "accelerate", "numpy", "av", "pillow",
            "gradio", "ray")

PathLike = Union[str, "os.PathLike[str]"]


def package_versions() -> dict[str, str | None]:
    """Python and the installed versions of :data:`PACKAGES` (None where one is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_record(path: PathLike) -> dict[str, str]:
    """The input image as the record names it: its file name, absolute path and SHA-256 of its bytes."""
    p = pathlib.Path(path)
    return {"name": p.name, "path": str(p.resolve()), "sha256": file_sha256(p)}


def sidecar_path(video: PathLike) -> pathlib.Path:
    """``x.mp4`` -> ``x.json``."""
    return pathlib.Path(video).with_suffix(".json")


def dumps(record: Mapping[str, Any]) -> str:
    """The one serialisation used for the JSON file and the MP4 tag, so the two compare equal as text."""
    return json.dumps(record, indent=2, sort_keys=False, allow_nan=False)


@contextlib.contextmanager
def atomic_target(path: PathLike) -> Iterator[pathlib.Path]:
    """A temporary name beside ``path`` to write to, renamed onto ``path`` when the block ends without error.

    The one way this project writes a file: no reader ever sees half of one,
    and a failed or stopped write leaves nothing behind (the temporary file
    is removed).  The temporary name keeps the suffix, for writers that go by it.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` through :func:`atomic_target`."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return pathlib.Path(path)


def write_once(path: PathLike, data: bytes) -> pathlib.Path:
    """``data`` at ``path`` unless a file is already there: for files named by their content, which a
    second job with the same content then shares instead of copying."""
    path = pathlib.Path(path)
    if not path.is_file():
        write_atomic(path, data)
    return path


def publish_new(staged: PathLike, target: PathLike) -> pathlib.Path:
    """Give the finished file ``staged`` the name ``target``, or ``<stem>-2<suffix>``, ``-3`` ... when that
    is taken, and return the name it got; ``staged`` is gone afterwards.

    A file is never replaced: a hard link claims a free name atomically, so two jobs that finish in
    the same minute both keep their file (a check, then a rename, could let one overwrite the other).
    """
    staged, target = pathlib.Path(staged), pathlib.Path(target)
    candidate, n = target, 1
    try:
        while True:
            try:
                os.link(staged, candidate)
                return candidate
            except FileExistsError:
                n += 1
                candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
    finally:
        staged.unlink(missing_ok=True)


def write_sidecar(video: PathLike, record: Mapping[str, Any]) -> pathlib.Path:
    """Write the record beside ``video``; a temporary name, then a rename, so no reader sees half a file."""
    return write_atomic(sidecar_path(video), (dumps(record) + "\n").encode("utf-8"))


def mp4_comment(video: PathLike) -> str | None:
    """The container's ``comment`` tag of an MP4, or None."""
    import av

    with av.open(str(video)) as container:
        return container.metadata.get("comment")


def check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{where} is not a video record of this project (expected a JSON object with "
                         f"\"format\": \"{FORMAT}\", as written beside each MP4)")
    return record


def read_record(path: PathLike) -> dict[str, Any]:
    """The record of a video: from its JSON, or from an MP4's comment tag (ValueError says what is wrong)."""
    p = pathlib.Path(path)
    try:
        if p.suffix.lower() == ".mp4":
            text = mp4_comment(p)
            if text is None:
                raise ValueError(f"{p} has no comment tag: it was not written by this project "
                                 f"(give its .json, or a video made by magcache_generate or the apps)")
        else:
            text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON ({exc})") from None
    return check_record(record, str(p))


def find_image(record: Mapping[str, Any], record_path: PathLike) -> pathlib.Path:
    """The recorded input image: at its recorded path, else beside the record; its SHA-256 must match."""
    image = record.get("image") or {}
    name, sha = image.get("name"), image.get("sha256")
    if not name:
        raise ValueError("the record names no input image; give --image")
    candidates = [pathlib.Path(image["path"])] if image.get("path") else []
    candidates.append(pathlib.Path(record_path).resolve().parent / name)
    for candidate in candidates:
        if candidate.is_file():
            if sha and file_sha256(candidate) != sha:
                raise ValueError(f"{candidate} is not the recorded input image (its SHA-256 differs from "
                                 f"{sha[:12]}...); give the original with --image")
            return candidate
    raise ValueError(f"the recorded input image {name} is neither at {candidates[0]} nor beside the record; "
                     "give it with --image")


# ---------------------------------------------------------------------------
# Replays: same frames, or how they differ
# ---------------------------------------------------------------------------

def iter_video_frames(video: PathLike) -> Iterator[np.ndarray]:
    """A video's first video stream decoded to uint8 RGB frames (height, width, 3), one at a time."""
    import av

    with av.open(str(video)) as container:
        if not container.streams.video:
            raise ValueError(f"{video} has no video stream")
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def decode_frames(video: PathLike) -> np.ndarray:
    """Every frame of a video, stacked: (time, height, width, 3) uint8 RGB."""
    return np.stack(list(iter_video_frames(video)))


def frame_ranges(indices: Sequence[int]) -> str:
    """Sorted frame numbers as ranges: [0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    parts: list[str] = []
    start = prev = None
    for i in [*sorted(indices), None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(parts)


def compare_frames(recorded: np.ndarray, replayed: np.ndarray) -> str:
    """How two decoded videos differ, in one phrase: which frames, and the largest difference in levels."""
    if recorded.shape != replayed.shape:
        t0, h0, w0 = recorded.shape[:3]
        t1, h1, w1 = replayed.shape[:3]
        return f"other frames: the record's video has {t0} frames of {w0}x{h0}, this one {t1} of {w1}x{h1}"
    diff = np.abs(recorded.astype(np.int16) - replayed.astype(np.int16)).reshape(len(recorded), -1).max(axis=1)
    differ = [int(i) for i in np.flatnonzero(diff)]
    if not differ:
        return "same decoded frames"
    return (f"{len(differ)} of {len(diff)} frames differ (frame {frame_ranges(differ)}), by at most "
            f"{int(diff.max())} of 255 levels, decoded from both files")


def replay_verdict(record: Mapping[str, Any], record_path: PathLike, replayed: Mapping[str, Any],
                   replayed_video: PathLike) -> str:
    """The line a replay ends with: "same frames as the record", or how the frames differ.

    Equal ``frames_sha256`` means the encoder got the same frames, whatever
    the MP4 bytes (another x264 build may write other bytes for them).
    Otherwise both videos are decoded and compared frame by frame: the one
    beside the record (or the MP4 given as the record) and the new one.
    """
    recorded_sha, new_sha = record.get("frames_sha256"), replayed.get("frames_sha256")
    if recorded_sha and recorded_sha == new_sha:
        return f"Replay: same frames as the record (frames_sha256 {recorded_sha[:16]}...)."
    recorded_video = pathlib.Path(record_path).with_suffix(".mp4")
    if not recorded_video.is_file() and recorded_sha is None:
        return (f"Replay: cannot compare the frames: the record predates frames_sha256 and its video is not at "
                f"{recorded_video}.")
    if not recorded_video.is_file():
        return (f"Replay: other frames than the record (frames_sha256 {str(recorded_sha)[:16]}... recorded, "
                f"{str(new_sha)[:16]}... now); the recorded video is not at {recorded_video}, so the frames "
                "cannot be compared one by one.")
    how = compare_frames(decode_frames(recorded_video), decode_frames(replayed_video))
    if recorded_sha is None:
        return f"Replay: {how} as {recorded_video.name} (its record predates frames_sha256)."
    return f"Replay: not the frames of the record: {how}."
