"""How each video was made: the JSON written beside every MP4 and inside it.

Every MP4 the pipeline writes gets a JSON file with the same stem
(``x.mp4`` -> ``x.json``) and the same JSON as the MP4 container's ``comment``
tag, so a video that travels without its JSON still says how it was made.
The record holds everything needed to make the same video again
(``magcache_generate.py --replay x.json``): prompt, seed, the input image's
name and SHA-256, variant, model, every setting, the ratio table and skip plan
that ran, the per-section report, timings and package versions.

This module is pure bookkeeping: no torch, no models.  It is shared by the
pipeline (which writes), the CLI (which replays) and the Ray driver (which
writes what a remote worker produced).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
from collections.abc import Mapping
from typing import Any, Union

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


def write_atomic(path: PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` under a temporary name, then rename: no reader sees half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
