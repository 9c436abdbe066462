"""Job values: the names a job's settings go by, and how a job file or a command line becomes a job.

One JSON object per line of a job file; its keys are the CLI's long flag names
with underscores or dashes.  Values are layered (defaults, the command line, the
job line, a replayed record), checked with the ranges of :data:`.settings.LIMITS`
and turned into :class:`.settings.JobSettings`.  All pure but the checks that
read files (the image, a profile); nothing here loads a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from magcache_framepack.settings import (CACHE_MODES, LIMITS, PRESET_NAMES, RESAMPLE_MODES, VARIANT_NAMES,
                                       JobSettings, setting_name, unwritable_folder)


# Defaults of a job when neither the command line nor the job line gives a value
# (FramePack's UI defaults, as JobSettings has them).
DEFAULTS: dict[str, Any] = {
    "image": None, "variant": "framepack", "preset": None, "tiny": False, "output": None,
    "outputs_dir": "outputs", "profiles_dir": "magcache_profiles",
    "prompt": "",
    **{f.name: f.default for f in dataclasses.fields(JobSettings) if f.default is not dataclasses.MISSING},
}


PRESET_KEYS = ("magcache_thresh", "magcache_K", "retention_ratio")


FLAG = {k: "--" + k.replace("_", "-") for k in DEFAULTS}


#: The job keys that are JobSettings fields (what a video record's "settings" can give back).
SETTING_KEYS = tuple(f.name for f in dataclasses.fields(JobSettings))


def int_list(text: str) -> list[int]:
    """argparse type of "25" or "25,50": a list of integers (ranges are checked with the job's values)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma-separated list of integers, "
                                         f"got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


class JobError(ValueError):
    """A job's values are not acceptable; the message says which and what is accepted."""


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise JobError(f"{FLAG[key]} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise JobError(f"{FLAG[key]} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise JobError(f"{FLAG[key]} must be a finite number, got {value!r}")
    return out


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise JobError(f"{FLAG[key]} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise JobError(f"{FLAG[key]} must be an integer, got {value!r}")
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise JobError(f"{FLAG[key]} must be an integer, got {value!r}") from None


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise JobError(f"{FLAG[key]} must be true or false, got {value!r}")


def _to_optional_float(key: str, value: Any) -> float | None:
    return None if value is None else _to_float(key, value)


def _to_str(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise JobError(f"{FLAG[key]} must be a string, got {value!r}")
    return value


CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "seconds": _to_float, "cfg": _to_float, "gs": _to_float, "rs": _to_float, "magcache_thresh": _to_float,
    "retention_ratio": _to_float, "gpu_memory_preservation": _to_float, "steps": _to_int, "seed": _to_int,
    "magcache_K": _to_int, "crf": _to_int, "latent_window_size": _to_int, "resolution": _to_int,
    "calibrate": _to_bool, "tiny": _to_bool, "target_speedup": _to_optional_float,
}


#: What --target-speedup chooses itself, so a job (command line or job line) gives one or the other.
TARGET_EXCLUDES = (*PRESET_KEYS, "preset")


def target_conflict(layer: dict[str, Any]) -> str | None:
    """The refusal line when one layer gives --target-speedup and settings it would choose, else None."""
    if layer.get("target_speedup") is None:
        return None
    given = [FLAG[k] for k in TARGET_EXCLUDES if layer.get(k) is not None]
    if not given:
        return None
    return (f"--target-speedup chooses the threshold, K and retention itself: give it without "
            f"{', '.join(given)} (or drop --target-speedup to set them)")


def normalise_job_line(obj: Any) -> dict[str, Any]:
    """Check one parsed JSON job line: an object whose keys are known flag names; values converted."""
    if not isinstance(obj, dict):
        raise JobError(f"a job line must be a JSON object like {{\"image\": \"a.png\", \"prompt\": \"...\"}}, "
                       f"got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = setting_name(key)      # "magcache-thresh" as on the command line, "magcache_thresh", earlier names
        if name not in DEFAULTS:
            raise JobError(f"unknown key {key!r}; accepted keys (dashes or underscores): {', '.join(DEFAULTS)}")
        out[name] = CONVERTERS.get(name, _to_str)(name, value)
    conflict = target_conflict(out)
    if conflict is not None:
        raise JobError(conflict)
    return out


def layer_values(layer: dict[str, Any]) -> dict[str, Any]:
    """One layer (command line or job line) with its preset expanded; its own explicit values win."""
    out = {k: v for k, v in layer.items() if v is not None}
    preset = layer.get("preset")
    if preset is not None:
        if preset not in PRESET_NAMES:
            raise JobError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESET_NAMES)}")
        import magcache_core

        for key, value in zip(PRESET_KEYS, magcache_core.PRESETS[preset]):
            out.setdefault(key, value)
    return out


def merge_values(*layers: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then each layer in order (later wins): command line, then a job line."""
    values = dict(DEFAULTS)
    for layer in layers:
        given = layer_values(layer)
        if "target_speedup" not in given and any(k in given for k in PRESET_KEYS):
            values["target_speedup"] = None     # a later layer's explicit settings replace an earlier target
        values.update(given)
    return values


def check_values(values: dict[str, Any], cuda_available: bool) -> None:
    """Refuse values a job cannot run with, saying what is accepted (JobError).

    Cheap checks only (files exist, ranges): anything deeper is left to
    ``JobSettings.validate`` so the rules live in one place.
    """
    image = values["image"]
    if not image:
        raise JobError("--image is required: the start image of the video (PNG, JPEG, ...)")
    if not os.path.isfile(image):
        raise JobError(f"--image: file not found: {image}")
    if values["variant"] not in VARIANT_NAMES:
        raise JobError(f"--variant {values['variant']!r}: choose one of {', '.join(VARIANT_NAMES)}")
    if values["cache"] not in CACHE_MODES:
        raise JobError(f"--cache {values['cache']!r}: choose one of {', '.join(CACHE_MODES)}")
    if values["resample"] not in RESAMPLE_MODES:
        raise JobError(f"--resample {values['resample']!r}: choose one of {', '.join(RESAMPLE_MODES)}")

    for key in SETTING_KEYS:
        limit = LIMITS.get(key)
        if limit is not None and not limit.accepts(values[key]):
            raise JobError(f"{FLAG[key]} {limit.refusal(values[key])}")
    if values["calibrate"] and values["cache"] != "magcache":
        raise JobError(f"--calibrate measures with MagCache: it needs --cache magcache (not {values['cache']})")
    output = values["output"]
    if output is not None and pathlib.Path(output).suffix.lower() != ".mp4":
        raise JobError(f"--output must be an .mp4 path, got {output}")
    folders = [(FLAG["outputs_dir"], values["outputs_dir"])]
    if output is not None:
        folders.append((FLAG["output"], pathlib.Path(output).parent))
    if values["calibrate"]:
        folders.append((FLAG["profiles_dir"], values["profiles_dir"]))
    for flag, folder in folders:
        problem = unwritable_folder(folder)
        if problem is not None:
            shown = output if flag == FLAG["output"] else folder
            raise JobError(f"{flag} {shown}: cannot write there: {problem}")
    if not values["tiny"] and not cuda_available:
        raise JobError("the real FramePack models need a CUDA GPU and none is available; "
                       "use --tiny for a CPU run with tiny random-weight models")
    load_image(image)     # readable and large enough, before any model is loaded
    if values["mag_ratios"] is not None:
        import magcache_core

        if not os.path.isfile(values["mag_ratios"]):
            raise JobError(f"--mag-ratios: profile file not found: {values['mag_ratios']}")
        try:
            profile = magcache_core.MagCacheProfile.load(values["mag_ratios"])
        except ValueError as exc:
            raise JobError(f"--mag-ratios: {exc}") from None
        if profile.variant != values["variant"]:
            raise JobError(f"--mag-ratios: the profile was calibrated for {profile.variant!r}, "
                           f"not --variant {values['variant']}")
    check_target(values)


def check_target(values: dict[str, Any]) -> None:
    """--target-speedup: planned now, on the job's own ratio table, so an unreachable target costs one line.

    The table depends on the image's bucket (the frame resolution), so the bucket is
    found here as the job will find it; no model loads.
    """
    target = values.get("target_speedup")
    if target is None:
        return
    import magcache_core

    from magcache_framepack.job import find_bucket, magcache_config
    from magcache_framepack.settings import bucket_resolution

    settings = job_settings(values)
    image = load_image(values["image"])
    height, width = find_bucket(image.shape[0], image.shape[1], bucket_resolution(values["resolution"],
                                                                                  bool(values["tiny"])))
    try:
        magcache_config(settings, values["variant"], None, magcache_core.frame_resolution(height, width))
    except ValueError as exc:
        raise JobError(f"--target-speedup {target:g}: {exc}") from None


def job_settings(values: dict[str, Any]) -> JobSettings:
    """The JobSettings of these values, validated by JobSettings itself (the one set of rules)."""
    settings = JobSettings(**{k: values[k] for k in SETTING_KEYS})
    try:
        settings.validate()
    except ValueError as exc:
        raise JobError(str(exc)) from None
    return settings


def output_for_line(output: str | None, line: int, from_job: bool) -> str | None:
    """In --jobs mode a command-line --output is a template: ``x.mp4`` -> ``x-line3.mp4`` per job."""
    if output is None or from_job:
        return output
    p = pathlib.Path(output)
    return str(p.with_name(f"{p.stem}-line{line}{p.suffix}"))


def load_image(path: str) -> np.ndarray:
    """The image as RGB uint8, or JobError saying why not (unreadable, too small)."""
    from magcache_framepack.job import read_image

    try:
        return read_image(path)
    except ValueError as exc:
        raise JobError(f"--image: {exc}") from None


def replay_layer(path: str, image_given: bool) -> dict[str, Any]:
    """The values a video record (its .json, or the .mp4 itself) was made with, as a layer of job values."""
    from magcache_framepack.records import find_image, read_record

    try:
        record = read_record(path)
        if not isinstance(record.get("settings"), dict):
            raise TypeError("'settings' (an object of the job's settings)")
        settings = {setting_name(k): v for k, v in record["settings"].items()}     # a record may use earlier names
        layer = {k: settings[k] for k in SETTING_KEYS if k in settings}
        layer.update(prompt=record["prompt"], n_prompt=record["n_prompt"], seed=record["seed"],
                     variant=record["variant"], tiny=bool(record.get("tiny")))
        if not image_given:
            layer["image"] = str(find_image(record, path))
    except (KeyError, TypeError) as exc:
        raise JobError(f"--replay: {path} lacks {exc} (a record written by this project has it)") from None
    except ValueError as exc:
        raise JobError(f"--replay: {exc}") from None
    return layer


@dataclasses.dataclass
class JobOutcome:
    line: int | None
    status: str                 # done | skipped (--resume) | stopped | error | invalid
    message: str
    video: str | None = None


#: Outcomes that do not make the exit code 1.
OK_STATUSES = ("done", "skipped")


def job_values(number: int, text: str, cli: dict[str, Any], cuda_available: bool) -> dict[str, Any]:
    """The checked values of the job at line ``number`` of a --jobs file (JobError says what is wrong).

    The command line fills what the line leaves open, and a command-line
    --output becomes that line's ``x-lineN.mp4``.
    """
    try:
        line = normalise_job_line(json.loads(text))
    except json.JSONDecodeError as exc:
        raise JobError(f"not valid JSON: {exc}") from None
    values = merge_values(cli, line)
    values["output"] = output_for_line(values["output"], number, "output" in line)
    check_values(values, cuda_available)
    return values


def already_done(values: dict[str, Any]) -> bool:
    """--resume: the job's output MP4 and its JSON record are both there (each appears only whole)."""
    from magcache_framepack.records import sidecar_path

    output = values["output"]
    if output is None:
        return False     # the pipeline names the video by its job id: nothing to look for
    return os.path.isfile(output) and sidecar_path(output).is_file()


def iter_job_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; lines starting with # are comments."""
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            text = text.strip()
            if text and not text.startswith("#"):
                yield number, text
