"""What several bench tools share: the settings their tables have a row for, and how results are written.

``speed`` and ``sweep`` both compare uncached against the presets and
``THRESH,K,RETENTION`` settings, read from the command line the same way;
``speed``, ``compare`` and ``sweep`` write JSON and decibels the same way.
Keeping these here lets the tools stay out of each other's modules.

JSON cannot hold infinity (an identical frame's PSNR), so :func:`json_safe`
writes the string ``"inf"`` (``float("inf")`` reads it back); ``null`` is
reserved for "not measured" (LPIPS when unavailable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from magcache_framepack.records import write_atomic

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Input a tool refuses: the command line reports it as argparse does (usage, the message, exit code 2)."""


# ---------------------------------------------------------------------------
# Settings: the rows of the speed and sweep tables
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SpeedSetting:
    """One row of the speed table: ``params`` None means MagCache off (the model's own forward).

    ``engine`` "magcache" is this project's engine; "diffusers" is diffusers' own
    MagCache hook (``transformer.enable_cache(diffusers.MagCacheConfig(...))``)
    with the same thresh/K/retention and ratios, for ``--compare-diffusers``.
    """

    name: str
    params: tuple[float, int, float] | None = None
    engine: str = "magcache"


def parse_setting(text: str) -> tuple[float, int, float]:
    """``"thresh,K,retention"`` -> (float, int, float), or ValueError saying what is accepted."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"setting {text!r}: expected thresh,K,retention, e.g. 0.12,3,0.2")
    try:
        thresh, k_text, retention = float(parts[0]), parts[1], float(parts[2])
    except ValueError:
        raise ValueError(f"setting {text!r}: thresh and retention must be numbers, e.g. 0.12,3,0.2") from None
    try:
        k = int(k_text)
    except ValueError:
        raise ValueError(f"setting {text!r}: K must be an integer >= 1, e.g. 0.12,3,0.2") from None
    if not math.isfinite(thresh) or thresh < 0:
        raise ValueError(f"setting {text!r}: thresh must be a finite number >= 0")
    if k < 1:
        raise ValueError(f"setting {text!r}: K must be an integer >= 1")
    if not 0.0 <= retention < 1.0:
        raise ValueError(f"setting {text!r}: retention must be in [0, 1)")
    return thresh, k, retention


def setting_label(params: tuple[float, int, float]) -> str:
    """The row name of a custom setting, so repeating a preset's numbers is visibly a custom row."""
    return f"custom:{params[0]:g},{params[1]},{params[2]:g}"


def speed_settings(presets: dict[str, tuple[float, int, float]],
                   custom: Sequence[tuple[float, int, float]] = (),
                   compare_diffusers: bool = False) -> list[SpeedSetting]:
    """Uncached first, then every preset, then each custom setting (duplicates dropped).

    ``compare_diffusers`` repeats every cached setting with diffusers' own hook, named ``diffusers:<name>``.
    """
    out = [SpeedSetting("off")] + [SpeedSetting(name, tuple(p)) for name, p in presets.items()]
    for params in custom:
        s = SpeedSetting(setting_label(params), params)
        if s.name not in {o.name for o in out}:
            out.append(s)
    if compare_diffusers:
        out += [SpeedSetting(f"diffusers:{s.name}", s.params, "diffusers") for s in out if s.params is not None]
    return out


# ---------------------------------------------------------------------------
# Command-line value types
# ---------------------------------------------------------------------------

def setting_arg(text: str) -> tuple[float, int, float]:
    """An argparse type for ``--setting THRESH,K,RETENTION``: :func:`parse_setting`'s message on refusal."""
    try:
        return parse_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with an error that says so."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be >= {minimum}")
        return v
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


# ---------------------------------------------------------------------------
# Writing results
# ---------------------------------------------------------------------------

def json_safe(value: Any) -> Any:
    """Infinities -> "inf"/"-inf", NaN -> None, recursively: JSON has no such numbers."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON through :func:`json_safe`, whole or not at all (records.write_atomic)."""
    write_atomic(path, (json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    logger.info("wrote %s", path)


def fmt_db(x: float | None) -> str:
    """Decibels for a table: two decimals, ``inf`` for identical frames, ``-`` for not measured."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2f}"
