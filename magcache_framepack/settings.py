"""What a job is: its settings, their limits and the vocabulary of choices.

The lowest layer of the package: no torch, no models, nothing heavy, so the CLI's
``--help``, job files and the apps' sliders can use it before any model loads.
:class:`JobSettings` holds one job with FramePack's UI defaults; :data:`LIMITS`
is the one table of numeric ranges the UI (slider bounds), the API (clamping) and
the CLI (refusal) read.  The names of the engine's presets and resample modes
are restated here because the engine imports torch; a test checks they agree.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import numbers
import os
import pathlib
import tempfile
import types
from collections.abc import Mapping
from typing import Any



#: The two FramePack models: FramePack (inverted anti-drifting) and FramePack-F1 (forward).
VARIANT_NAMES = ("framepack", "f1")
#: The engine's preset names (magcache_core.PRESETS) and resample modes (RESAMPLE_MODES).
PRESET_NAMES = ("E010K3R02", "E015K4R02")
RESAMPLE_MODES = ("magnitude", "nearest")

#: FramePack's output frame rate: its section/frame arithmetic assumes it.
FPS = 30


#: Bucket resolution FramePack was trained at (its only bucket table).
FRAMEPACK_RESOLUTION = 640


#: Tiny models render at most this bucket resolution, so a job stays a CPU job of seconds.
TINY_RESOLUTION = 128


CACHE_MODES = ("magcache", "teacache", "off")


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Limit:
    """The accepted range of one job setting: a number's value, or a text's length in characters.

    Defined once here and read by the UI (slider bounds, a text box's maximum
    length), the API (clamping numbers, refusing long texts) and the CLI
    (refusal with this text), so the three can never disagree.
    """

    low: float
    high: float
    integer: bool = False
    step: float | None = None    # the UI slider's step
    hint: str = ""               # what FramePack or the paper uses, for error messages
    #: whether the apps move a value beyond the range to the nearest accepted one (a magnitude) or
    #: refuse it, as the CLI refuses every one (the seed: it names a noise, and the nearest seed is
    #: another video, not a nearby one)
    movable: bool = True
    optional: bool = False       # None is accepted too (the setting is not asked for)
    text: bool = False           # the range is of a string's length (never clamped: cutting text changes it)

    def accepts(self, value: Any) -> bool:
        if value is None and self.optional:
            return True
        if self.text:
            return isinstance(value, str) and self.low <= len(value) <= self.high
        ok = is_int(value) if self.integer else is_real(value)
        return ok and self.low <= value <= self.high

    def clamp(self, value: float) -> int | float:
        """The nearest accepted value (integers rounded first)."""
        value = round(value) if self.integer else float(value)
        return min(max(value, self.low), self.high)

    def describe(self) -> str:
        if self.text:
            return f"must be a text of at most {int(self.high)} characters" + (f" ({self.hint})" if self.hint else "")
        kind = "an integer" if self.integer else "a number"
        low, high = (f"{int(self.low)}", f"{int(self.high)}") if self.integer else (f"{self.low:g}", f"{self.high:g}")
        return f"must be {kind} from {low} to {high}" + (f" ({self.hint})" if self.hint else "")

    def refusal(self, value: Any) -> str:
        """One line on a refused ``value``: what is accepted, and what came (a text by its length only,
        so a megabyte prompt does not fill the log)."""
        got = f"{len(value)} characters" if self.text and isinstance(value, str) else repr(value)
        return f"{self.describe()}, got {got}"


#: The longest prompt (and negative prompt) a job takes, in characters.  FramePack's LLaMA text
#: encoder reads only the first 256 tokens of a prompt (CLIP's pooled branch 77), and English text
#: averages about 4 characters a token, so some 1,000 characters already fill what is read.  4,000
#: leaves four times that, for long words, other scripts and punctuation, and still keeps a record (and
#: the MP4's comment tag, which holds the prompt) small where an unchecked prompt could be megabytes.
PROMPT_LIMIT = Limit(0, 4000, text=True, hint="FramePack reads the first 256 tokens, about 1,000 characters")


#: Every numeric job setting's range and the prompts' length: the one definition the apps, the API and
#: the CLI use.
LIMITS: Mapping[str, Limit] = types.MappingProxyType({
    "prompt": PROMPT_LIMIT,
    "n_prompt": PROMPT_LIMIT,
    "seed": Limit(0, 2 ** 63 - 1, integer=True, movable=False),
    "seconds": Limit(1, 120, step=0.1, hint="seconds of video"),
    "latent_window_size": Limit(1, 33, integer=True, step=1, hint="FramePack uses 9"),
    "steps": Limit(1, 100, integer=True, step=1, hint="FramePack uses 25"),
    "cfg": Limit(1.0, 32.0, step=0.01, hint="FramePack keeps 1"),
    "gs": Limit(1.0, 32.0, step=0.01, hint="FramePack uses 10"),
    "rs": Limit(0.0, 1.0, step=0.01, hint="FramePack uses 0"),
    "gpu_memory_preservation": Limit(6, 128, step=0.1, hint="GB; FramePack uses 6"),
    "magcache_thresh": Limit(0.0, 1.0, step=0.01, hint="0.10 to 0.15 is the published range"),
    "magcache_K": Limit(1, 10, integer=True, step=1, hint="3 or 4 are the published values"),
    "retention_ratio": Limit(0.0, 0.99, step=0.01, hint="0.2 is the published value"),
    "crf": Limit(0, 51, integer=True, step=1, hint="0 is lossless; FramePack uses 16"),
    "resolution": Limit(64, 2048, integer=True, step=16, hint=f"pixels; FramePack uses {FRAMEPACK_RESOLUTION}"),
    "target_speedup": Limit(1.0, 10.0, step=0.1, optional=True,
                            hint="steps over computed steps; the planner picks threshold, K and retention"),
})


#: Earlier names of settings, still accepted in job files, records and by setting_name(): FramePack's
#: UI and this project's records before the vocabulary was one called the video length
#: total_second_length and the CRF mp4_crf (the app's /generate endpoint keeps those two names).
ALIASES: Mapping[str, str] = types.MappingProxyType(
    {"total_second_length": "seconds", "mp4_crf": "crf", "magcache_k": "magcache_K"})


def setting_name(key: str) -> str:
    """The one name of a setting: dashes as underscores (the CLI's spelling), earlier names mapped."""
    name = str(key).replace("-", "_")
    return ALIASES.get(name, name)


@dataclasses.dataclass
class JobSettings:
    """One generation job, with FramePack's UI defaults.

    ``cache``: "magcache" (this project), "teacache" (FramePack's built-in) or
    "off".  ``mag_ratios`` is the path of a saved calibration profile, or None
    for the ratio library's table for the job's variant, resolution and steps
    (:func:`magcache_core.library_ratios`).  ``resample`` is how a table of
    another step count is fitted ("magnitude" or the reference's "nearest").
    ``calibrate`` runs MagCache in measuring mode (it never skips) and saves a
    profile at the end.
    ``resolution`` is the bucket target; tiny models cap it at TINY_RESOLUTION.
    ``target_speedup`` (None: not asked for) makes the job plan its threshold, K and
    retention from the ratio table (:func:`magcache_core.plan_for_target`): the
    least planned error that computes at most steps / target steps; the record keeps
    both the target and the settings chosen.
    Numeric fields must lie within :data:`LIMITS`.
    """

    prompt: str
    n_prompt: str = ""
    seed: int = 31337
    seconds: float = 5.0
    latent_window_size: int = 9
    steps: int = 25
    cfg: float = 1.0
    gs: float = 10.0
    rs: float = 0.0
    gpu_memory_preservation: float = 6.0
    cache: str = "magcache"
    magcache_thresh: float = 0.10
    magcache_K: int = 3
    retention_ratio: float = 0.2
    mag_ratios: str | None = None
    calibrate: bool = False
    crf: int = 16
    resolution: int = FRAMEPACK_RESOLUTION
    resample: str = "magnitude"
    target_speedup: float | None = None

    def clamped(self) -> "JobSettings":
        """A copy with every numeric field moved into :data:`LIMITS` (what a UI runs when a box is overtyped).

        Values that are not numbers at all, and a seed out of its range (:attr:`Limit.movable`), are
        left for :meth:`validate` to refuse.
        """
        changes = {name: limit.clamp(getattr(self, name)) for name, limit in LIMITS.items()
                   if is_real(getattr(self, name)) and limit.movable}
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and what is accepted (see :data:`LIMITS`).

        Whole floats in integer fields (25.0 from a UI slider) are converted to int.
        """
        def bad(name: str, accepted: str) -> ValueError:
            return ValueError(f"{name} = {getattr(self, name)!r}: {accepted}")

        # UI sliders and JSON hand out 25.0 for 25: take whole floats as the integers they are
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if limit.integer and isinstance(value, float) and value.is_integer():
                setattr(self, name, int(value))

        for name in ("prompt", "n_prompt"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "must be a string")
        for name, limit in LIMITS.items():
            if not limit.accepts(getattr(self, name)):
                raise ValueError(f"{name}: {limit.refusal(getattr(self, name))}") if limit.text else \
                    bad(name, limit.describe())
        if self.cache not in CACHE_MODES:
            raise bad("cache", f"must be one of {', '.join(CACHE_MODES)}")
        if self.resample not in RESAMPLE_MODES:
            raise bad("resample", f"must be one of {', '.join(RESAMPLE_MODES)}")
        if self.mag_ratios is not None:
            if not isinstance(self.mag_ratios, (str, os.PathLike)) or not str(self.mag_ratios):
                raise bad("mag_ratios", "must be the path of a saved MagCache profile (JSON), or None")
            if not pathlib.Path(self.mag_ratios).is_file():
                raise bad("mag_ratios", "no such profile file; give the path of a saved MagCache profile "
                                        "(JSON), or None for the published ratios")
        if not isinstance(self.calibrate, bool):
            raise bad("calibrate", "must be True or False")
        if self.calibrate and self.cache != "magcache":
            raise bad("calibrate", f"calibration measures with MagCache: set cache='magcache' "
                                   f"(it is {self.cache!r})")
        if self.target_speedup is not None and (self.cache != "magcache" or self.calibrate):
            raise bad("target_speedup", "plans MagCache's skips: it needs cache='magcache' and no calibration "
                                        f"(cache is {self.cache!r}, calibrate {self.calibrate})")



def unwritable_folder(folder: str | os.PathLike[str]) -> str | None:
    """Why files cannot be written in ``folder`` (created as needed), or None when they can.

    Checked before any model loads, so a bad output path costs a line, not a job.  Nothing
    is created: the nearest folder that exists must be a folder (not a file) and take a
    file, which is tried with a temporary one that is removed at once.
    """
    path = pathlib.Path(folder).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"no file can be written in {existing} ({exc.strerror or exc})"
    return None


def profile_file_stem(variant: str, resolution: int, steps: int, when: datetime.datetime) -> str:
    """The name (without ``.json``) a new calibration profile gets: ``framepack-128px-25steps-20261201-1951``.

    Short and sortable: what it was made for, then when (a file of the same minute gets ``-2`` added, see
    :func:`magcache_framepack.records.publish_new`).  The app's dropdown shows a label made from the
    profile's contents instead, so older, longer names still load and read the same.
    """
    return f"{variant}-{int(resolution)}px-{int(steps)}steps-{when:%Y%m%d-%H%M}"


def section_count(seconds: float, latent_window_size: int) -> int:
    """Sections FramePack generates: video seconds at 30 fps over 4 frames per latent, rounded, at least 1."""
    return int(max(round(seconds * FPS / (latent_window_size * 4)), 1))


def bucket_resolution(resolution: int, tiny: bool) -> int:
    """The bucket resolution of a job asking for ``resolution`` on tiny (capped) or real models."""
    return min(resolution, TINY_RESOLUTION) if tiny else resolution
