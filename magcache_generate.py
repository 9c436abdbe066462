"""MagCache for FramePack: generate videos from the command line (no UI).

One job::

    python magcache_generate.py --image cat.png --prompt "The cat dances" --seconds 5 \
        --preset E015K4R02 --output cat.mp4

Many jobs, one JSON object per line; keys are the long flag names, with
underscores or dashes (``magcache_thresh`` or ``magcache-thresh``, ``magcache_K``,
``retention_ratio`` ...), and whatever a line leaves out comes from the command
line::

    python magcache_generate.py --jobs jobs.jsonl --tiny --steps 25
    # jobs.jsonl
    {"image": "a.png", "prompt": "a dog runs", "output": "a.mp4"}
    {"image": "b.png", "prompt": "a bird flies", "preset": "E010K3R02", "seed": 7}

A job that fails (bad values, unreadable image, generation error) is reported
with its line number and the next one runs; the exit code is 1 if any job
failed, 2 for bad command-line arguments, 0 otherwise.

``--resume`` skips the jobs whose output MP4 and its JSON are already there.
The same jobs on Ray workers, one per GPU, on this machine or a cluster
(``pip install -r requirements-ray.txt``; see ``magcache_ray``)::

    python magcache_generate.py --jobs jobs.jsonl --ray --output clips/clip.mp4
    python magcache_generate.py --jobs jobs.jsonl --ray auto --max-retries 2 --resume

Every video gets a JSON record beside it (``cat.mp4`` -> ``cat.json``, also in
the MP4's ``comment`` tag).  The same video again, any flag overriding the
recorded value::

    python magcache_generate.py --replay cat.json --output again.mp4
    python magcache_generate.py --replay cat.json --seed 7 --output other.mp4

Everything that generates comes from ``magcache_pipeline`` (the same code the
Gradio apps run), so a CLI video equals an app video for the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import numpy as np

logger = logging.getLogger(__name__)

VARIANT_NAMES = ("framepack", "f1")
CACHE_MODES = ("magcache", "teacache", "off")
PRESET_NAMES = ("E010K3R02", "E015K4R02")     # magcache_core.PRESETS; repeated so --help needs no torch
RESAMPLE_MODES = ("magnitude", "nearest")     # magcache_core.RESAMPLE_MODES, likewise

# Defaults of a job when neither the command line nor the job line gives a value
# (FramePack's UI defaults, as magcache_pipeline.JobSettings has them).
DEFAULTS: dict[str, Any] = {
    "image": None, "prompt": "", "n_prompt": "", "variant": "framepack", "seconds": 5.0, "steps": 25,
    "seed": 31337, "cfg": 1.0, "gs": 10.0, "rs": 0.0, "cache": "magcache", "preset": None,
    "magcache_thresh": 0.10, "magcache_K": 3, "retention_ratio": 0.2, "mag_ratios": None,
    "calibrate": False, "tiny": False, "output": None, "outputs_dir": "outputs",
    "profiles_dir": "magcache_profiles", "crf": 16, "latent_window_size": 9, "resolution": 640,
    "gpu_memory_preservation": 6.0, "resample": "magnitude",
}
PRESET_KEYS = ("magcache_thresh", "magcache_K", "retention_ratio")
FLAG = {k: "--" + k.replace("_", "-") for k in DEFAULTS}
#: Job keys whose JobSettings field has another name; every other setting key is the field's name.
SETTING_NAMES = {"seconds": "total_second_length", "crf": "mp4_crf"}
#: The job keys that are JobSettings fields (what a video record's "settings" can give back).
SETTING_KEYS = ("prompt", "n_prompt", "seed", "seconds", "steps", "cfg", "gs", "rs", "cache", "magcache_thresh",
                "magcache_K", "retention_ratio", "mag_ratios", "calibrate", "crf", "latent_window_size",
                "resolution", "gpu_memory_preservation", "resample")


class JobError(ValueError):
    """A job's values are not acceptable; the message says which and what is accepted."""


# ---------------------------------------------------------------------------
# Values: parsing, layering, checking (pure)
# ---------------------------------------------------------------------------

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
    "calibrate": _to_bool, "tiny": _to_bool,
}


def normalise_job_line(obj: Any) -> dict[str, Any]:
    """Check one parsed JSON job line: an object whose keys are known flag names; values converted."""
    if not isinstance(obj, dict):
        raise JobError(f"a job line must be a JSON object like {{\"image\": \"a.png\", \"prompt\": \"...\"}}, "
                       f"got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = str(key).replace("-", "_")      # "magcache-thresh" as on the command line, or "magcache_thresh"
        name = "magcache_K" if name == "magcache_k" else name
        if name not in DEFAULTS:
            raise JobError(f"unknown key {key!r}; accepted keys (dashes or underscores): {', '.join(DEFAULTS)}")
        out[name] = CONVERTERS.get(name, _to_str)(name, value)
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
        values.update(layer_values(layer))
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
    from magcache_pipeline import LIMITS

    for key in SETTING_KEYS:
        limit = LIMITS.get(SETTING_NAMES.get(key, key))
        if limit is not None and not limit.accepts(values[key]):
            raise JobError(f"{FLAG[key]} {limit.describe()}, got {values[key]!r}")
    if values["calibrate"] and values["cache"] != "magcache":
        raise JobError(f"--calibrate measures with MagCache: it needs --cache magcache (not {values['cache']})")
    output = values["output"]
    if output is not None and pathlib.Path(output).suffix.lower() != ".mp4":
        raise JobError(f"--output must be an .mp4 path, got {output}")
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


def job_settings(values: dict[str, Any]) -> Any:
    """The pipeline's JobSettings for these values, validated by the pipeline itself."""
    import magcache_pipeline

    settings = magcache_pipeline.JobSettings(**{SETTING_NAMES.get(k, k): values[k] for k in SETTING_KEYS})
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
    import magcache_pipeline

    try:
        return magcache_pipeline.read_image(path)
    except ValueError as exc:
        raise JobError(f"--image: {exc}") from None


def replay_layer(path: str, image_given: bool) -> dict[str, Any]:
    """The values a video record (its .json, or the .mp4 itself) was made with, as a layer of job values."""
    import magcache_metadata

    try:
        record = magcache_metadata.read_record(path)
        settings = record["settings"]
        layer = {k: settings[SETTING_NAMES.get(k, k)] for k in SETTING_KEYS if SETTING_NAMES.get(k, k) in settings}
        layer.update(prompt=record["prompt"], n_prompt=record["n_prompt"], seed=record["seed"],
                     variant=record["variant"], tiny=bool(record.get("tiny")))
        if not image_given:
            layer["image"] = str(magcache_metadata.find_image(record, path))
    except (KeyError, TypeError) as exc:
        raise JobError(f"--replay: {path} lacks {exc} (a record written by this project has it)") from None
    except ValueError as exc:
        raise JobError(f"--replay: {exc}") from None
    return layer


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

class _HideSamplerBars(io.TextIOBase):
    """stderr that drops the tqdm bar FramePack's sampler always draws (ours show the same steps)."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target

    def write(self, text: str) -> int:
        if "%|" not in text and "it/s]" not in text and "s/it]" not in text:
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        self.target.flush()


class _Progress:
    """tqdm bars for sections and for the steps of the current section."""

    def __init__(self, sections: int, steps: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.enabled = enabled
        self.steps = steps
        self.section = 0
        self.sections_bar = tqdm(total=sections, desc="sections", unit="section", position=0,
                                 disable=not enabled, file=sys.stderr, leave=True)
        self.steps_bar = tqdm(total=steps, desc="section 1 steps", unit="step", position=1,
                              disable=not enabled, file=sys.stderr, leave=False)

    def on_progress(self, update: Any) -> None:
        if update.step <= 0:
            self.sections_bar.set_postfix_str(update.desc.rstrip(" ."), refresh=True)
            return
        if update.section != self.section:
            self.section = update.section
            self.steps_bar.reset(total=self.steps)
            self.steps_bar.set_description(f"section {update.section + 1} steps")
        delta = update.step - self.steps_bar.n
        if delta > 0:
            self.steps_bar.update(delta)

    def on_section(self, report: Any) -> None:
        self.sections_bar.set_postfix_str(f"section {report.index + 1} written", refresh=False)
        self.sections_bar.update(1)

    def close(self) -> None:
        self.steps_bar.close()
        self.sections_bar.close()


class _StopOnInterrupt:
    """First Ctrl-C asks the running job to stop (it keeps its partial video); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing at the next step (Ctrl-C again to abort)")

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopOnInterrupt"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, self._previous)


@dataclasses.dataclass
class JobOutcome:
    line: int | None
    status: str                 # done | skipped (--resume) | stopped | error | invalid
    message: str
    video: str | None = None


#: Outcomes that do not make the exit code 1.
OK_STATUSES = ("done", "skipped")


def run_one(values: dict[str, Any], models_cache: dict[tuple[str, bool], Any], progress: bool,
            stop: Callable[[], bool]) -> tuple[Any, str | None]:
    """Generate one video; returns (JobResult, final video path)."""
    import magcache_pipeline
    import magcache_models
    from tqdm.contrib.logging import logging_redirect_tqdm

    settings = job_settings(values)
    image = load_image(values["image"])
    key = (values["variant"], values["tiny"])
    if key not in models_cache:
        logger.info("loading %s models%s", values["variant"], " (tiny)" if values["tiny"] else "")
        models_cache[key] = magcache_models.load_models(values["variant"], tiny=values["tiny"])
    bars = _Progress(magcache_pipeline.section_count(settings.total_second_length, settings.latent_window_size),
                     settings.steps, enabled=progress)
    try:
        with logging_redirect_tqdm(), contextlib.redirect_stderr(_HideSamplerBars(sys.stderr)):
            result = magcache_pipeline.run_job(models_cache[key], image, settings, outputs_dir=values["outputs_dir"],
                                               on_progress=bars.on_progress, on_section=bars.on_section,
                                               should_stop=stop, profiles_dir=values["profiles_dir"],
                                               image_path=values["image"])
    finally:
        bars.close()
    video = result.video_path
    if video and values["output"]:
        video = str(copy_video(video, values["output"]))
    return result, video


def replay_verdict(record_path: str, video: str) -> str:
    """The line a --replay ends with: the new video's frames against the record's (see magcache_metadata)."""
    import magcache_metadata

    replayed = magcache_metadata.read_record(magcache_metadata.sidecar_path(video))
    return magcache_metadata.replay_verdict(magcache_metadata.read_record(record_path), record_path, replayed, video)


def copy_video(video: str | os.PathLike, output: str | os.PathLike) -> pathlib.Path:
    """Copy an MP4 and its JSON record to ``output`` (and ``output`` with .json): each appears only whole."""
    import magcache_metadata

    out = pathlib.Path(output)
    for src, dst in ((magcache_metadata.sidecar_path(video), magcache_metadata.sidecar_path(out)), (video, out)):
        if pathlib.Path(src).is_file():
            with magcache_metadata.atomic_target(dst) as tmp:
                shutil.copyfile(src, tmp)
    return out


def print_result(result: Any, video: str | None, out: TextIO) -> None:
    for line in result.summary_lines():
        print(line, file=out)
    if video and video != result.video_path:
        print(f"Saved as: {video}", file=out)


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
    import magcache_metadata

    output = values["output"]
    if output is None:
        return False     # the pipeline names the video by its job id: nothing to look for
    return os.path.isfile(output) and magcache_metadata.sidecar_path(output).is_file()


def iter_job_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; lines starting with # are comments."""
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            text = text.strip()
            if text and not text.startswith("#"):
                yield number, text


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magcache_generate.py", description=__doc__.split("\n\n")[0],
                                epilog="Keys of a --jobs line: " + ", ".join(DEFAULTS),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every default is None: a value counts only where it was given, so a preset and
    # --jobs lines can fill in what the command line leaves open (see DEFAULTS).
    p.add_argument("--image", help="start image (PNG, JPEG, ...)")
    p.add_argument("--prompt", help="what happens in the video")
    p.add_argument("--n-prompt", help="negative prompt (used only with --cfg > 1)")
    p.add_argument("--variant", choices=VARIANT_NAMES, help="framepack (default) or f1")
    p.add_argument("--seconds", type=float, help="video length in seconds (default 5)")
    p.add_argument("--steps", type=_int_list, help="sampling steps per section (default 25); with --calibrate "
                                                  "a list (25,50) calibrates each")
    p.add_argument("--seed", type=int, help="random seed (default 31337)")
    p.add_argument("--cfg", type=float, help="real guidance scale (default 1: no negative branch)")
    p.add_argument("--gs", type=float, help="distilled guidance scale (default 10)")
    p.add_argument("--rs", type=float, help="CFG re-scale (default 0)")
    p.add_argument("--cache", choices=CACHE_MODES, help="magcache (default), teacache (FramePack's) or off")
    p.add_argument("--preset", choices=PRESET_NAMES,
                   help="MagCache preset: E010K3R02 = 0.10,3,0.2 (default values), E015K4R02 = 0.15,4,0.2; "
                        "explicit --magcache-* flags override it")
    p.add_argument("--magcache-thresh", type=float, help="accumulated-error threshold, >= 0 (default 0.10)")
    p.add_argument("--magcache-K", type=int, help="most consecutive skipped steps, 1..steps (default 3)")
    p.add_argument("--retention-ratio", type=float, help="share of first steps always computed, [0, 1) "
                                                         "(default 0.2)")
    p.add_argument("--mag-ratios", metavar="FILE", help="a calibration profile (JSON) instead of the ratio "
                                                        "library's table for the job")
    p.add_argument("--resample", choices=RESAMPLE_MODES,
                   help="how a ratio table of another step count is fitted: magnitude (default) or nearest "
                        "(the MagCache reference's stretch)")
    p.add_argument("--resolutions", type=_int_list, metavar="R1,R2,...",
                   help="with --calibrate: calibrate each of these bucket resolutions (times each --steps value)")
    p.add_argument("--calibrate", action="store_true", default=None,
                   help="measure this model's ratios (skips nothing) and write a profile to --profiles-dir")
    p.add_argument("--tiny", action="store_true", default=None,
                   help="tiny random-weight models on the CPU (tests/demos: the video is noise)")
    p.add_argument("--output", metavar="MP4", help="copy the final video here (with --jobs: a template, "
                                                   "x.mp4 -> x-lineN.mp4, unless the line sets output)")
    p.add_argument("--outputs-dir", help="where the pipeline writes videos (default outputs)")
    p.add_argument("--profiles-dir", help="where --calibrate writes profiles (default magcache_profiles)")
    p.add_argument("--crf", type=int, help="H.264 CRF of the MP4, 0 (lossless) to 51 (default 16)")
    p.add_argument("--latent-window-size", type=int, help="latents per section (default 9)")
    p.add_argument("--resolution", type=int, help="bucket resolution in pixels (default 640; tiny models "
                                                  "cap it at 128)")
    p.add_argument("--gpu-memory-preservation", type=float, help="GB kept free on the GPU (default 6)")
    p.add_argument("--jobs", metavar="FILE", help="run one job per line of FILE (JSON objects)")
    p.add_argument("--resume", action="store_true",
                   help="with --jobs: skip the jobs whose output MP4 and its JSON are already there")
    ray = p.add_argument_group("Ray (pip install -r requirements-ray.txt)")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="with --jobs: run the jobs on Ray workers, one per GPU; without ADDRESS a local Ray on "
                          "this machine, else an existing cluster ('auto' or host:port)")
    ray.add_argument("--workers", type=int, metavar="N",
                     help="number of Ray workers (default: one per GPU of the cluster; with --tiny 2 CPU workers)")
    ray.add_argument("--max-retries", type=int, default=2, metavar="N",
                     help="runs of a job again on another worker after its worker died (default 2)")
    p.add_argument("--replay", metavar="RECORD", help="make a video again from its JSON record (or its MP4); "
                                                      "flags given here override the recorded values")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _int_list(text: str) -> list[int]:
    """argparse type of "25" or "25,50": a list of integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma-separated list of integers, "
                                         f"got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def command_line_layer(args: argparse.Namespace) -> dict[str, Any]:
    layer = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    if "steps" in layer:
        layer["steps"] = layer["steps"][0]       # a list only matters for a calibration grid
    return layer


def calibration_grid(args: argparse.Namespace) -> list[tuple[int | None, int | None]]:
    """(resolution, steps) pairs of a --calibrate grid; [(None, None)] for an ordinary run."""
    steps = args.steps or [None]
    resolutions = args.resolutions or [None]
    if len(steps) == 1 and len(resolutions) == 1 and args.resolutions is None:
        return [(None, None)]
    if not args.calibrate:
        raise JobError("several --steps values or --resolutions make a calibration grid: add --calibrate")
    if args.jobs is not None or args.replay is not None:
        raise JobError("a calibration grid (--resolutions, several --steps) runs alone, without --jobs or --replay")
    return [(r, n) for r in resolutions for n in steps]


def grid_output(output: str | None, resolution: int, steps: int) -> str | None:
    """In a calibration grid a --output is a template: ``x.mp4`` -> ``x-384px-25steps.mp4``."""
    if output is None:
        return None
    p = pathlib.Path(output)
    return str(p.with_name(f"{p.stem}-{resolution}px-{steps}steps{p.suffix}"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse errors exit with 2 as usual)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    cuda = torch.cuda.is_available()
    cli = command_line_layer(args)
    layers = [cli]
    try:
        grid = calibration_grid(args)
        if args.replay is not None:
            if args.jobs is not None:
                raise JobError("--replay and --jobs do not go together: replay one record at a time")
            layers = [replay_layer(args.replay, image_given="image" in cli), cli]
        base = merge_values(*layers)
    except JobError as exc:
        parser.error(str(exc))
    models_cache: dict[tuple[str, bool], Any] = {}
    stop = _StopOnInterrupt()

    if args.ray is not None and args.jobs is None:
        parser.error("--ray runs a --jobs file: give --jobs FILE")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.max_retries < 0:
        parser.error(f"--max-retries must be 0 or more, got {args.max_retries}")
    if args.jobs is None:
        runs = []
        for resolution, steps in grid:
            values = dict(base)
            if steps is not None:
                values.update(resolution=resolution or base["resolution"], steps=steps)
                values["output"] = grid_output(values["output"], values["resolution"], steps)
            try:
                check_values(values, cuda)
                job_settings(values)
            except JobError as exc:
                parser.error(str(exc))
            runs.append(values)
        failed = 0
        with stop.installed():
            for values in runs:
                if stop.requested:
                    break
                if len(runs) > 1:
                    print(f"== calibration at {values['resolution']} px, {values['steps']} steps ==", flush=True)
                try:
                    result, video = run_one(values, models_cache, not args.no_progress, stop)
                except JobError as exc:
                    parser.error(str(exc))
                print_result(result, video, sys.stdout)
                failed += result.status != "done"
                if args.replay is not None and result.status == "done" and video:
                    print(replay_verdict(args.replay, video), flush=True)
        return 1 if failed or stop.requested else 0

    if not os.path.isfile(args.jobs):
        parser.error(f"--jobs: file not found: {args.jobs}")
    if args.ray is not None:
        return run_on_ray(args, cli)
    outcomes: list[JobOutcome] = []
    with stop.installed():
        for number, text in iter_job_lines(args.jobs):
            if stop.requested:
                outcomes.append(JobOutcome(number, "stopped", "not started: stop requested"))
                continue
            try:
                values = job_values(number, text, cli, cuda)
                if args.resume and already_done(values):
                    outcomes.append(JobOutcome(number, "skipped", "already done (--resume)", values["output"]))
                    continue
                print(f"== job at line {number}: {values['image']} ==", flush=True)
                result, video = run_one(values, models_cache, not args.no_progress, stop)
            except JobError as exc:
                outcomes.append(JobOutcome(number, "invalid", str(exc)))
            except Exception as exc:   # whatever one job hits, the next one runs (Ctrl-C is no Exception: it stops)
                logger.exception("job at line %d failed", number)
                outcomes.append(JobOutcome(number, "error", f"{type(exc).__name__}: {exc}"))
            else:
                print_result(result, video, sys.stdout)
                outcomes.append(JobOutcome(number, result.status, result.message, video))
            if outcomes[-1].status == "invalid":
                logger.error("job at line %d refused: %s", number, outcomes[-1].message)
    return report_outcomes(outcomes, args.jobs, sys.stdout)


def run_on_ray(args: argparse.Namespace, cli: dict[str, Any]) -> int:
    """--jobs FILE --ray [ADDRESS]: the same jobs on a pool of Ray workers (see magcache_ray)."""
    try:
        import magcache_ray
        magcache_ray.require_ray()
    except ImportError as exc:
        print(f"magcache_generate.py: --ray: {exc}", file=sys.stderr)
        return 2
    return magcache_ray.main_jobs(args, cli)


def report_outcomes(outcomes: Sequence[JobOutcome], jobs_path: str, out: TextIO) -> int:
    """The closing table of a --jobs run; returns the exit code (1 if any job neither ran nor was skipped)."""
    if not outcomes:
        print(f"{jobs_path}: no jobs (one JSON object per line)", file=sys.stderr)
        return 1
    print(f"\n{len(outcomes)} job(s) from {jobs_path}:", file=out)
    for o in outcomes:
        where = f"line {o.line}"
        print(f"  {where}: {o.status}" + (f" -> {o.video}" if o.video else "")
              + ("" if o.status in OK_STATUSES else f": {o.message}"), file=out)
    failed = [o for o in outcomes if o.status not in OK_STATUSES]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} job(s) failed", file=sys.stderr)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
