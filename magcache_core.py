"""MagCache for FramePack: the engine.

MagCache skips the transformer's block stack on some denoising steps and reuses
the residual (stack output minus stack input) of the last computed step.  Which
steps are skipped follows from calibrated per-step magnitude ratios alone, so the
whole plan is known before the first tensor is seen: :func:`skip_schedule` is a
pure function, and what the patched transformer does is exactly that plan.

This module knows nothing of Gradio and imports neither FramePack nor diffusers'
pipelines.  It patches one instance of FramePack's
``HunyuanVideoTransformer3DModelPacked`` or of diffusers'
``HunyuanVideoFramepackTransformer3DModel`` with :func:`enable_magcache` and
restores it with :func:`disable_magcache`; what differs between the two lives in
one small adapter per class (the adapters section), everything else (plan, runs,
residuals, calibration) is shared.

It can be taken alone: copied with ``magcache_ratio_library.json`` beside it into
a FramePack fork or a diffusers script, it needs torch and the standard library
at import and nothing else (diffusers is touched only when a diffusers model is
patched).  Without the JSON it plans from the published tables, with one
warning.  Its sections, in order: the plan (pure functions), the ratio tables,
profiles and configuration, run state, the model adapters, and patching one
transformer instance.

Beyond the published reference behaviour it:

* keeps one plan per *denoising step*, shared by both classifier-free-guidance
  branches, with one cached residual per branch (the reference counted every
  transformer call as a step, which corrupts its plan when CFG > 1);
* starts every sampling run (every FramePack section) from a clean state, also
  after a run that died mid-way (:func:`magcache_run` makes this explicit);
* makes a skipped step nearly free: no block runs, and neither does anything
  whose result only the blocks consume (text refiner, image projection, history
  latent embeddings, rotary frequencies);
* reports, per run, which steps were computed and skipped, and in calibration
  mode returns the measured ratios as data and as a JSON profile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import numbers
import os
import pathlib
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, Union

import torch


logger = logging.getLogger(__name__)

# Published 25-step calibrations (MagCache4FramePack).
FRAMEPACK_MAG_RATIOS: tuple[float, ...] = (
    1.0, 1.26562, 1.23438, 1.03125, 1.02344, 1.03906, 1.01562, 1.03906, 1.05469,
    1.02344, 1.03906, 0.99609, 1.03125, 1.02344, 1.01562, 1.02344, 1.00781,
    1.04688, 0.98828, 1.0, 1.00781, 0.98828, 0.94141, 0.94141, 0.78906,
)
FRAMEPACK_F1_MAG_RATIOS: tuple[float, ...] = (
    1.0, 1.25781, 1.08594, 1.02344, 1.00781, 1.02344, 1.00781, 1.02344, 1.05469,
    0.99609, 1.03906, 1.00781, 1.01562, 1.00781, 1.02344, 1.01562, 0.98047,
    1.05469, 0.98047, 0.96875, 1.03125, 0.97266, 0.9375, 0.96484, 0.78516,
)
VARIANT_MAG_RATIOS: dict[str, tuple[float, ...]] = {
    "framepack": FRAMEPACK_MAG_RATIOS,
    "f1": FRAMEPACK_F1_MAG_RATIOS,
}

# name -> (magcache_thresh, magcache_K, retention_ratio)
PRESETS: dict[str, tuple[float, int, float]] = {
    "E010K3R02": (0.10, 3, 0.2),
    "E015K4R02": (0.15, 4, 0.2),
}
DEFAULT_PRESET = "E010K3R02"

# A step is never skipped when its own ratio departs from 1 by more than this:
# the residual is changing too fast for the cached one to stand in for it.
MAX_STEP_RATIO_DEVIATION = 0.06

RESAMPLE_MODES = ("magnitude", "nearest")

# A mean cosine distance 1 - cos lies in [0, 2]; planned_error reads a profile's.
COSINE_DISTANCE_RANGE = (0.0, 2.0)
PROFILE_FORMAT = "magcache-framepack-profile"

# The ratio library: the published tables above stand for 640 px at 25 steps; this
# file (shipped beside this module) holds the other calibrations, each with its source.
LIBRARY_PATH = pathlib.Path(__file__).resolve().with_name("magcache_ratio_library.json")
LIBRARY_FORMAT = "magcache-framepack-ratio-library"
PUBLISHED_RESOLUTION = 640
PUBLISHED_STEPS = 25

PathLike = Union[str, "os.PathLike[str]"]

# Checkpoint names that denote the same weights, mapped to the name profiles compare.
# diffusers loads its HunyuanVideoFramepackTransformer3DModel from the very Hub
# repositories FramePack's demos load its packed model from (lllyasviel/FramePackI2V_HY,
# lllyasviel/FramePack_F1_I2V_HY_20250503: diffusers-format weights that both classes
# read, same parameter names), so the Hub id is the canonical name and needs no entry
# here; a local snapshot of it in the Hub cache (.../models--owner--name/snapshots/<rev>)
# is mapped back to it by canonical_model_id.  Add an entry only for another copy
# of the same weights under another name.
CHECKPOINT_ALIASES: dict[str, str] = {}


# ---------------------------------------------------------------------------
# The plan: pure functions
# ---------------------------------------------------------------------------

def _validated_ratios(mag_ratios: Sequence[float]) -> tuple[float, ...]:
    """Return the ratios as floats, or raise ValueError saying what is accepted."""
    if isinstance(mag_ratios, (str, bytes, os.PathLike, MagCacheProfile)) or not isinstance(mag_ratios, Iterable):
        raise ValueError(
            f"mag_ratios must be a sequence of positive finite numbers, got {type(mag_ratios).__name__}"
        )
    mag_ratios = list(mag_ratios)
    if len(mag_ratios) == 0:
        raise ValueError("mag_ratios is empty: give one positive finite ratio per calibrated step")
    out = []
    for i, r in enumerate(mag_ratios):
        try:
            if isinstance(r, (bool, str, bytes)):
                raise TypeError
            r = float(r)   # numbers, numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise ValueError(f"mag_ratios[{i}] = {r!r} is not a number; "
                             "each ratio must be a positive finite number") from None
        if not math.isfinite(r) or r <= 0.0:
            raise ValueError(f"mag_ratios[{i}] = {r!r}: each ratio must be a positive finite number")
        out.append(r)
    return tuple(out)


def _validated_plan_settings(num_steps: Any, magcache_thresh: Any, magcache_K: Any,
                             retention_ratio: Any, resample: Any) -> tuple[int, float, int, float]:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps = {num_steps!r}: must be an integer >= 1")
    if isinstance(magcache_thresh, bool) or not isinstance(magcache_thresh, numbers.Real) \
            or not math.isfinite(magcache_thresh) or magcache_thresh < 0:
        raise ValueError(
            f"magcache_thresh = {magcache_thresh!r}: must be a finite number >= 0 "
            "(the accumulated error a skip may reach; 0.10 to 0.15 is the published range)"
        )
    k = magcache_K
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(
            f"magcache_K = {magcache_K!r}: must be an integer >= 1 "
            "(the most consecutive steps that may be skipped; 3 or 4 are the published values)"
        )
    if isinstance(retention_ratio, bool) or not isinstance(retention_ratio, numbers.Real) \
            or not math.isfinite(retention_ratio) or not 0.0 <= retention_ratio < 1.0:
        raise ValueError(
            f"retention_ratio = {retention_ratio!r}: must be in [0, 1) "
            "(the fraction of first steps that always run; 0.2 is the published value)"
        )
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample = {resample!r}: must be one of {', '.join(RESAMPLE_MODES)}")
    return int(num_steps), float(magcache_thresh), int(k), float(retention_ratio)


def resample_mag_ratios(mag_ratios: Sequence[float], num_steps: int, mode: str = "magnitude") -> list[float]:
    """Fit a calibrated ratio table to ``num_steps`` steps.

    When ``num_steps`` equals the table length the table is returned as is.

    ``mode="nearest"`` is the reference's stretch: entry ``round(i * (len-1)/(N-1))``
    (round half to even), or the last ratio when N == 1.  It is kept for parity
    only: a ratio is the change of residual magnitude over one step, so repeating
    entries of a 25-step table to fill 50 steps doubles the total change the plan
    believes in (and halving the steps halves it).

    ``mode="magnitude"`` (the default) keeps the cumulative magnitude curve: the
    cumulative log-magnitude of the table is placed on a normalised step axis
    [0, 1], linearly interpolated at the N new step positions and differenced.
    The product of the new ratios therefore equals the product of the old ones,
    and a log-linear magnitude curve is reproduced exactly at any N.
    """
    ratios = _validated_ratios(mag_ratios)
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps = {num_steps!r}: must be an integer >= 1")
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode = {mode!r}: must be one of {', '.join(RESAMPLE_MODES)}")
    n, m = int(num_steps), len(ratios)
    if n == m:
        return list(ratios)
    if mode == "nearest":
        if n == 1:
            return [ratios[-1]]
        scale = (m - 1) / (n - 1)
        return [ratios[round(i * scale)] for i in range(n)]
    if n == 1 or m == 1:
        return [1.0] * n
    # cumulative log-magnitude at the table's steps; ratios[0] is the reference point (1.0)
    cum = [0.0]
    for r in ratios[1:]:
        cum.append(cum[-1] + math.log(r))
    out = [1.0]
    prev = 0.0
    for i in range(1, n):
        x = i * (m - 1) / (n - 1)          # position on the table's step axis
        j = min(int(x), m - 2)
        c = cum[j] + (x - j) * (cum[j + 1] - cum[j])
        out.append(math.exp(c - prev))
        prev = c
    return out


def skip_schedule(mag_ratios: Sequence[float], num_steps: int, magcache_thresh: float,
                  magcache_K: int, retention_ratio: float, resample: str = "magnitude") -> list[bool]:
    """Which of ``num_steps`` denoising steps MagCache skips (True = skipped).

    The rule, per step t with ratios r fitted to ``num_steps``: steps before
    ``int(retention_ratio * num_steps)`` and step 0 always run.  After that the
    accumulated ratio (product of r since the last computed step), the
    accumulated error (sum of |1 - accumulated ratio|) and the count of
    accumulated steps grow; the step is skipped while the error stays within
    ``magcache_thresh``, the count within ``magcache_K`` and the step's own ratio
    within 6% of 1.  A computed step resets the accumulators.
    """
    n, thresh, k, retention = _validated_plan_settings(
        num_steps, magcache_thresh, magcache_K, retention_ratio, resample)
    return _skip_plan(resample_mag_ratios(mag_ratios, n, resample), thresh, k, retention)


def _skip_plan(ratios: Sequence[float], thresh: float, k: int, retention: float) -> list[bool]:
    """:func:`skip_schedule`'s rule on ratios already fitted to the steps and settings already validated."""
    n = len(ratios)
    first_skippable = max(int(retention * n), 1)
    plan: list[bool] = []
    acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
    for t, r in enumerate(ratios):
        skip = False
        if t >= first_skippable:
            acc_ratio *= r
            acc_err += abs(1 - acc_ratio)
            acc_steps += 1
            skip = acc_err <= thresh and acc_steps <= k and abs(1 - r) <= MAX_STEP_RATIO_DEVIATION
            if not skip:
                acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        plan.append(skip)
    return plan


def _validated_step_table(name: str, values: Sequence[float] | None, low: float | None = None,
                          high: float | None = None) -> tuple[float, ...] | None:
    """A per-step table of finite numbers (or None) as floats, else ValueError saying what is accepted."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of numbers, one per step, or None")
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, (bool, str, bytes)):
                raise TypeError
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] = {v!r} is not a number") from None
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
            span = "a finite number" if low is None else f"a number from {low:g} to {high:g}"
            raise ValueError(f"{name}[{i}] = {v!r}: each entry must be {span}")
        out.append(v)
    return tuple(out)


def _validated_step_weights(step_weights: Sequence[float] | None, num_steps: int) -> tuple[float, ...] | None:
    """The sampler's weight of each step as floats (or None), else ValueError saying what is accepted."""
    weights = _validated_step_table("step_weights", step_weights)
    if weights is not None and len(weights) != num_steps:
        raise ValueError(f"step_weights has {len(weights)} entries for {num_steps} steps: give one per step "
                         "(the sampler's weights at this step count), or None to weigh every step alike")
    return weights


def _fitted_tables(mag_ratios: Sequence[float], num_steps: int, resample: str,
                   cosine_distance: Sequence[float] | None,
                   step_weights: Sequence[float] | None) -> tuple[list[float], list[float], list[float]]:
    """Per step, fitted to ``num_steps``: the magnitude ratio, how far the residual moves over the step (in
    units of the previous residual's size) and the size of the step's weight; what :func:`planned_error` sums.

    A step with ratio r and cosine distance d moves the residual by
    sqrt((1 - r)^2 + 2 r d) of its size (the law of cosines).  The cosine
    distances come with the ratio table (a calibration profile measures both),
    so they are fitted to ``num_steps`` the same way: ``1 - d``, the direction
    a step keeps, is a factor like a ratio (the default resampling keeps its
    product over the whole run); a distance above 1 counts as 1, a right
    angle, for the factor must stay positive.  The step weights belong to the
    sampler at this step count and are taken as they are.
    """
    table = _validated_ratios(mag_ratios)
    ratios = resample_mag_ratios(table, num_steps, resample)
    distances = _validated_step_table("cosine_distance", cosine_distance, *COSINE_DISTANCE_RANGE)
    if distances is None:
        turned = [0.0] * num_steps
    else:
        if len(distances) != len(table):
            raise ValueError(f"cosine_distance has {len(distances)} entries for a table of {len(table)} ratios: "
                             "give one per ratio (a calibration profile's cosine_distance), or None")
        kept = resample_mag_ratios([min(1.0, max(1e-6, 1.0 - d)) for d in distances], num_steps, resample)
        turned = [1.0 - k for k in kept]
    weights = _validated_step_weights(step_weights, num_steps)
    moves = [math.sqrt((1.0 - r) ** 2 + 2.0 * r * d) for r, d in zip(ratios, turned)]
    return ratios, moves, [abs(w) for w in weights] if weights is not None else [1.0] * num_steps


def _schedule_error(skipped: Sequence[bool], ratios: Sequence[float], moves: Sequence[float],
                    weights: Sequence[float]) -> float:
    """:func:`planned_error` of one skip schedule, on tables already fitted to its steps."""
    total, run, drift, size = 0.0, 0.0, 0.0, 1.0
    for t, skip in enumerate(skipped):
        if skip:
            drift += size * moves[t]        # how far the residual may have moved since the computed step
            size *= ratios[t]               # its size now, in units of the computed step's
            run += weights[t] * drift
        else:
            total += run * run
            run, drift, size = 0.0, 0.0, 1.0
    return math.sqrt(total + run * run)


def planned_error(mag_ratios: Sequence[float], num_steps: int, magcache_thresh: float,
                  magcache_K: int, retention_ratio: float, resample: str = "magnitude", *,
                  cosine_distance: Sequence[float] | None = None,
                  step_weights: Sequence[float] | None = None) -> float:
    """How far a plan may move the final latent from the uncached run's: a ranking, from tables alone.

    A skipped step t adds the last computed step's residual where it would
    have computed its own.  The tables say how far the residual moves over
    each step: sqrt((1 - r)^2 + 2 r d) of its size, from the step's magnitude
    ratio r and cosine distance d (d = 0 when the table has none, as the
    published ones do not: then only the magnitude's change |1 - r| counts).
    The stand-in is at most the sum of those moves since the computed step
    away (each in units of the computed residual's size, so scaled by the
    ratios' product so far).  Step t's error reaches the final latent scaled
    by ``step_weights[t]``, the sampler's sensitivity to that step's output:
    for FramePack's UniPC it varies over a hundred-fold within 25 steps, so
    where the skips fall matters as much as how many there are (None weighs
    every step alike).  A run of skips reuses one residual, so its errors add
    up; separate runs add as independent errors.  The result is the square
    root of the sum, over runs, of (sum of |w| times the drift)^2; 0.0 for a
    plan that skips nothing.

    Why bounds, with the weights' sizes, and not signed estimates: a magnitude
    that returns to 1 has not brought the residual back, and the tables are
    too coarse to trust cancellations.  A planner that trusted them chose runs
    of eight skips for a 2x target on the published FramePack table, because
    their signed errors happened to cancel; with bounds it chooses K 3.

    The plan itself is still MagCache's rule (:func:`skip_schedule`); this
    only ranks plans, for :func:`plan_for_target`.  How well it ranks them
    as the measured distance does is checked by ``magcache_bench.py plan-check``
    (figures in the README).
    """
    n, thresh, k, retention = _validated_plan_settings(
        num_steps, magcache_thresh, magcache_K, retention_ratio, resample)
    tables = _fitted_tables(mag_ratios, n, resample, cosine_distance, step_weights)
    return _schedule_error(_skip_plan(tables[0], thresh, k, retention), *tables)


# The candidate grid that plan_for_target searches: thresholds 0.01..0.40, K 1..8, four retentions.
TARGET_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 41))
TARGET_KS = tuple(range(1, 9))
TARGET_RETENTIONS = (0.0, 0.1, 0.2, 0.3)


@dataclasses.dataclass(frozen=True)
class PlanCandidate:
    """One (threshold, K, retention) setting, with what its plan computes and the error it accepts."""

    magcache_thresh: float
    magcache_K: int
    retention_ratio: float
    num_steps: int
    computed_steps: int
    planned_error: float

    @property
    def speedup(self) -> float:
        """Steps over computed steps: the planned speed-up of the transformer's work."""
        return self.num_steps / self.computed_steps


class TargetUnreachable(ValueError):
    """No setting of the candidate grid reaches the target speed-up; the message names the best reachable."""


@dataclasses.dataclass(frozen=True)
class TargetPlan:
    """The outcome of :func:`plan_for_target`: the chosen setting and every candidate searched."""

    target_speedup: float
    chosen: PlanCandidate
    candidates: tuple[PlanCandidate, ...]

    def curve(self) -> list[tuple[float, float]]:
        """The trade-off curve to draw: for each planned speed-up, the least planned error reaching it.

        Sorted by speed-up; the error never decreases along it (each point is the
        best setting that is at least that fast).
        """
        return tradeoff_curve(self.candidates)


def plan_candidates(mag_ratios: Sequence[float], num_steps: int, resample: str = "magnitude",
                    thresholds: Sequence[float] = TARGET_THRESHOLDS, ks: Sequence[int] = TARGET_KS,
                    retentions: Sequence[float] = TARGET_RETENTIONS, *,
                    cosine_distance: Sequence[float] | None = None,
                    step_weights: Sequence[float] | None = None) -> list[PlanCandidate]:
    """Every setting of the grid with its planned computed steps and :func:`planned_error` (pure: tables only)."""
    tables = _fitted_tables(mag_ratios, num_steps, resample, cosine_distance, step_weights)  # checks num_steps
    n = len(tables[0])
    errors: dict[tuple[bool, ...], float] = {}      # settings that give one plan share its error
    out = []
    for thresh in thresholds:
        for k in ks:
            for retention in retentions:
                _, *valid = _validated_plan_settings(n, thresh, k, retention, resample)
                skipped = tuple(_skip_plan(tables[0], *valid))
                if skipped not in errors:
                    errors[skipped] = _schedule_error(skipped, *tables)
                out.append(PlanCandidate(float(thresh), int(k), float(retention), int(num_steps),
                                         skipped.count(False), errors[skipped]))
    return out


def tradeoff_curve(candidates: Sequence[PlanCandidate]) -> list[tuple[float, float]]:
    """(speed-up, least planned error among candidates at least that fast), one point per distinct speed-up."""
    speeds = sorted({c.speedup for c in candidates})
    return [(s, min(c.planned_error for c in candidates if c.speedup >= s)) for s in speeds]


def _choice_key(c: PlanCandidate) -> tuple[float, float, float, int, float]:
    # least error; then the faster; then the smallest threshold, K and retention giving that plan
    return (c.planned_error, -c.speedup, c.magcache_thresh, c.magcache_K, c.retention_ratio)


def plan_for_target(mag_ratios: Sequence[float], num_steps: int, target_speedup: float,
                    resample: str = "magnitude", thresholds: Sequence[float] = TARGET_THRESHOLDS,
                    ks: Sequence[int] = TARGET_KS, retentions: Sequence[float] = TARGET_RETENTIONS, *,
                    cosine_distance: Sequence[float] | None = None,
                    step_weights: Sequence[float] | None = None) -> TargetPlan:
    """The setting that reaches ``target_speedup`` (steps / computed steps) with the least planned error.

    Searches the candidate grid (:func:`plan_candidates`); among the candidates
    whose speed-up is at least the target, the least :func:`planned_error` wins
    (ties: the faster, then the smallest threshold, K, retention).  Instant: the
    plan is a pure function of the ratio table, and its error of the tables
    ``cosine_distance`` and ``step_weights`` (see :func:`planned_error`).  Raises
    :class:`TargetUnreachable` naming the best reachable speed-up when none
    reaches the target, and ValueError for a target that is not a number >= 1.
    """
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, numbers.Real) \
            or not math.isfinite(target_speedup) or target_speedup < 1.0:
        raise ValueError(f"target_speedup = {target_speedup!r}: must be a number >= 1 "
                         "(steps over computed steps; 2.0 computes about half the steps)")
    candidates = tuple(plan_candidates(mag_ratios, num_steps, resample, thresholds, ks, retentions,
                                       cosine_distance=cosine_distance, step_weights=step_weights))
    reaching = [c for c in candidates if c.speedup >= target_speedup]
    if not reaching:
        best = max(candidates, key=lambda c: (c.speedup, -c.planned_error))
        raise TargetUnreachable(
            f"no setting reaches a {float(target_speedup):.2f}x speed-up at {num_steps} steps with this ratio "
            f"table: the fastest setting reaches {best.speedup:.2f}x ({best.computed_steps} of {num_steps} steps "
            f"computed, threshold {best.magcache_thresh:g}, K {best.magcache_K}, retention "
            f"{best.retention_ratio:g}); ask for at most that, or use more steps")
    return TargetPlan(float(target_speedup), min(reaching, key=_choice_key), candidates)


# ---------------------------------------------------------------------------
# The ratio library: a calibrated table for each job's resolution and step count
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RatioTable:
    """One calibrated table: what it was measured on, and who measured it (``source``, a short name)."""

    variant: str
    resolution: int
    steps: int
    ratios: tuple[float, ...]
    source: str


@functools.cache
def ratio_library() -> tuple[RatioTable, ...]:
    """Every table :func:`library_ratios` picks from: the published ones, then the library file's.

    A file table for a (variant, resolution, steps) that a published table
    already stands for is left out, so the published numbers win there.
    """
    tables = [RatioTable(v, PUBLISHED_RESOLUTION, PUBLISHED_STEPS, r, "published MagCache table")
              for v, r in VARIANT_MAG_RATIOS.items()]
    try:
        data = json.loads(LIBRARY_PATH.read_text(encoding="utf-8"))
    except OSError as exc:
        logger.warning("MagCache: the ratio library %s cannot be read beside %s (%s): every job plans from "
                       "the published %d px, %d-step tables. Copy the JSON beside this file for tables "
                       "measured at other resolutions and step counts.", LIBRARY_PATH.name,
                       pathlib.Path(__file__).name, exc.strerror or exc, PUBLISHED_RESOLUTION, PUBLISHED_STEPS)
        return tuple(tables)
    if not isinstance(data, dict) or data.get("format") != LIBRARY_FORMAT:
        raise ValueError(f"{LIBRARY_PATH} is not a ratio library (\"format\": \"{LIBRARY_FORMAT}\" expected)")
    names = {key: src["sentence"] for key, src in data["sources"].items()}
    taken = {(t.variant, t.resolution, t.steps) for t in tables}
    for row in data["tables"]:
        table = RatioTable(row["variant"], int(row["resolution"]), int(row["steps"]),
                           _validated_ratios(row["ratios"]), names[row["source"]])
        if len(table.ratios) != table.steps:
            raise ValueError(f"{LIBRARY_PATH}: the {table.variant} {table.resolution} px table holds "
                             f"{len(table.ratios)} ratios for {table.steps} steps")
        if (table.variant, table.resolution, table.steps) not in taken:
            tables.append(table)
    return tuple(tables)


def _nearest(options: Iterable[float], target: float) -> float:
    """The option nearest to ``target``; a tie goes to the larger one."""
    return min(options, key=lambda o: (abs(o - target), -o))


def pick_ratio_table(variant: str, resolution: float, num_steps: int) -> RatioTable:
    """The library table for a job: nearest calibrated resolution, then the same (or nearest) step count.

    ``resolution`` is (height + width) / 2 of the job's frames.  Ties go to the
    larger resolution and the larger step count.
    """
    if variant not in VARIANT_MAG_RATIOS:
        raise ValueError(f"variant = {variant!r}: must be one of {', '.join(VARIANT_MAG_RATIOS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Real) \
            or not math.isfinite(resolution) or resolution <= 0:
        raise ValueError(f"resolution = {resolution!r}: must be a positive number of pixels, "
                         "(height + width) / 2 of the frames")
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps = {num_steps!r}: must be an integer >= 1")
    tables = [t for t in ratio_library() if t.variant == variant]
    res = _nearest({t.resolution for t in tables}, resolution)
    at_res = [t for t in tables if t.resolution == res]
    steps = _nearest({t.steps for t in at_res}, num_steps)
    return next(t for t in at_res if t.steps == steps)


def library_ratios(variant: str, resolution: float, num_steps: int,
                   mode: str = "magnitude") -> tuple[list[float], str]:
    """``(ratios, source)``: ``num_steps`` ratios for a job, and a sentence saying where they come from.

    The table is :func:`pick_ratio_table`'s; when its step count differs from
    ``num_steps`` it is resampled with :func:`resample_mag_ratios` in ``mode``.
    """
    table = pick_ratio_table(variant, resolution, num_steps)
    ratios = resample_mag_ratios(table.ratios, num_steps, mode)
    source = f"{table.source}, {table.resolution} px, {table.steps} steps"
    if table.steps != num_steps:
        source += f", resampled to {num_steps} steps" + ("" if mode == "magnitude" else f" ({mode})")
    return ratios, source


def frame_resolution(height: int, width: int) -> float:
    """The resolution key of the library: (height + width) / 2 of the frames."""
    return (height + width) / 2


# ---------------------------------------------------------------------------
# Profiles and configuration
# ---------------------------------------------------------------------------

def canonical_model_id(name: str | None) -> str | None:
    """The name under which a checkpoint is compared: Hub id, from a Hub cache path too, aliases resolved."""
    if not name:
        return None
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)", name)
    if match:
        name = f"{match.group(1)}/{match.group(2)}"
    return CHECKPOINT_ALIASES.get(name, name)


def checkpoint_id(transformer: torch.nn.Module, default: str | None = None) -> str | None:
    """The checkpoint a loaded transformer came from (its ``from_pretrained`` name), canonical; else ``default``.

    The same for FramePack's packed model and for diffusers' model loaded from
    the same repository, so a profile calibrated on one is accepted for the other.
    """
    config = getattr(transformer, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    return canonical_model_id(name) or default


@dataclasses.dataclass
class MagCacheProfile:
    """Calibrated ratios saved as JSON, to be reused by later jobs."""

    variant: str
    num_steps: int
    ratios: list[float]
    resolution: int | None = None
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))
    ratio_std: list[float] | None = None
    cosine_distance: list[float] | None = None
    runs: int = 1
    model: str | None = None     # the checkpoint it was measured on; random-weight tiny models differ

    def __post_init__(self) -> None:
        if not isinstance(self.variant, str) or not self.variant:
            raise ValueError(f"profile variant = {self.variant!r}: must be a non-empty name such as "
                             f"{', '.join(VARIANT_MAG_RATIOS)}")
        self.ratios = list(_validated_ratios(self.ratios))
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) \
                or self.num_steps != len(self.ratios):
            raise ValueError(f"profile num_steps = {self.num_steps!r} but it holds {len(self.ratios)} ratios; "
                             "they must agree")
        for name, (low, high) in (("ratio_std", (None, None)), ("cosine_distance", COSINE_DISTANCE_RANGE)):
            values = getattr(self, name)
            if values is not None and (not isinstance(values, list) or len(values) != len(self.ratios)):
                raise ValueError(f"profile {name} must be a list of {len(self.ratios)} numbers, one per step")
            if values is not None:
                # the planner reads cosine_distance: a bad entry is refused here, before any sampling
                _validated_step_table(f"profile {name}", values, low, high)
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise ValueError(f"profile runs = {self.runs!r}: must be an integer >= 1")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)):
            raise ValueError(f"profile resolution = {self.resolution!r}: must be an integer or null")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"profile model = {self.model!r}: must be a string or null")

    def check(self, variant: str | None = None, model: str | None = None) -> None:
        """Refuse a profile measured on another variant or another model (ValueError says which)."""
        if variant is not None and self.variant != variant:
            raise ValueError(f"this profile was calibrated for {self.variant!r}, not {variant!r}: "
                             f"calibrate {variant!r} or use its published ratios")
        if model is not None and self.model is not None and \
                canonical_model_id(self.model) != canonical_model_id(model):
            raise ValueError(f"this profile was calibrated on {self.model!r}, not {model!r}: "
                             "its ratios describe another model; calibrate this one or use the published ratios")

    @classmethod
    def average(cls, runs: Sequence[RunReport], variant: str, resolution: int | None = None,
                model: str | None = None) -> "MagCacheProfile":
        """One profile from calibration runs (sections) of one step count: each per-step figure averaged.

        Sections of one job see other latents but the same model and schedule,
        so their ratio curves agree closely; the mean of several is steadier
        than any one of them.
        """
        if not runs:
            raise ValueError("no complete calibration run to average: enable MagCache with "
                             "MagCacheConfig(calibrate=True) and let at least one sampling run finish")
        if len({r.num_steps for r in runs}) > 1 or any(r.ratios is None or len(r.ratios) != r.num_steps
                                                        for r in runs):
            raise ValueError("calibration runs of different step counts, or incomplete ones, cannot be "
                             "averaged: calibrate again with one num_steps")

        def mean(rows: list[list[float]]) -> list[float]:
            return [round(sum(col) / len(col), 5) for col in zip(*rows)]

        profile = cls(variant=variant, num_steps=runs[0].num_steps, resolution=resolution,
                      ratios=mean([r.ratios or [] for r in runs]),
                      ratio_std=mean([r.ratio_std or [] for r in runs]),
                      cosine_distance=mean([r.cosine_distance or [] for r in runs]),
                      runs=len(runs), model=model)
        logger.info("MagCache calibration over %d run(s): ratios %s", len(runs), profile.ratios)
        return profile

    def to_json(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "version": 1, **dataclasses.asdict(self)}

    def save(self, path: PathLike) -> pathlib.Path:
        """Write the profile as JSON under a temporary name, then rename: never half a profile."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("MagCache profile saved: %s", path)
        return path

    @classmethod
    def load(cls, path: PathLike) -> "MagCacheProfile":
        path = pathlib.Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read MagCache profile {path}: {exc.strerror or exc}") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a MagCache profile: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{path} is not a MagCache profile (expected a JSON object with "
                             f"\"format\": \"{PROFILE_FORMAT}\")")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = {"variant", "num_steps", "ratios"} - data.keys()
        if missing:
            raise ValueError(f"MagCache profile {path} lacks {', '.join(sorted(missing))}")
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"MagCache profile {path} is invalid: {exc}") from exc


@dataclasses.dataclass
class MagCacheConfig:
    """Settings of one MagCache run, validated on construction.

    ``mag_ratios`` takes a ratio table, a :class:`MagCacheProfile` or the path of
    a saved profile.  When ``variant`` (or ``model``) is given, a profile
    calibrated for another variant (or model) is refused: FramePack and F1, and
    random-weight test models, have different magnitude curves.
    """

    magcache_thresh: float = PRESETS[DEFAULT_PRESET][0]
    magcache_K: int = PRESETS[DEFAULT_PRESET][1]
    retention_ratio: float = PRESETS[DEFAULT_PRESET][2]
    num_steps: int = 25
    mag_ratios: Any = FRAMEPACK_MAG_RATIOS
    calibrate: bool = False
    resample: str = "magnitude"
    variant: str | None = None
    model: str | None = None             # when set, a profile measured on another model is refused
    source: str | None = None            # a sentence naming where mag_ratios come from (reports, records)
    step_weights: Sequence[float] | None = None   # the sampler's weight of each step (planned_error), or None
    profile: MagCacheProfile | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.num_steps, self.magcache_thresh, self.magcache_K, self.retention_ratio = _validated_plan_settings(
            self.num_steps, self.magcache_thresh, self.magcache_K, self.retention_ratio, self.resample)
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate = {self.calibrate!r}: must be True or False")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"model = {self.model!r}: must be a checkpoint name (str) or None")
        if self.source is not None and not isinstance(self.source, str):
            raise ValueError(f"source = {self.source!r}: must be a sentence (str) or None")
        if self.variant is not None and self.variant not in VARIANT_MAG_RATIOS:
            raise ValueError(f"variant = {self.variant!r}: must be one of {', '.join(VARIANT_MAG_RATIOS)} or None")
        ratios = self.mag_ratios
        if isinstance(ratios, (str, os.PathLike)):
            ratios = MagCacheProfile.load(ratios)
        if isinstance(ratios, MagCacheProfile):
            ratios.check(self.variant, self.model)
            self.profile = ratios
            ratios = ratios.ratios
        self.mag_ratios = _validated_ratios(ratios)
        self.step_weights = _validated_step_weights(self.step_weights, self.num_steps)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MagCacheConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        thresh, k, retention = PRESETS[name]
        return cls(**{"magcache_thresh": thresh, "magcache_K": k, "retention_ratio": retention, **overrides})

    def schedule(self) -> list[bool]:
        """The plan this config runs: all False in calibration mode."""
        if self.calibrate:
            return [False] * self.num_steps
        return skip_schedule(self.mag_ratios, self.num_steps, self.magcache_thresh,
                             self.magcache_K, self.retention_ratio, self.resample)

    def error_tables(self) -> dict[str, Any]:
        """What :func:`planned_error` knows of this config beyond its ratios, as its keyword arguments:
        the profile's cosine distances (None for a bare table) and the step weights."""
        return {"cosine_distance": self.profile.cosine_distance if self.profile is not None else None,
                "step_weights": self.step_weights}

    def planned_error(self) -> float:
        """:func:`planned_error` of the plan this config runs (0.0 in calibration mode: nothing is skipped)."""
        if self.calibrate:
            return 0.0
        return planned_error(self.mag_ratios, self.num_steps, self.magcache_thresh, self.magcache_K,
                             self.retention_ratio, self.resample, **self.error_tables())


# ---------------------------------------------------------------------------
# Run state
# ---------------------------------------------------------------------------

def _schedule_position(timestep: Any) -> tuple[int, int] | None:
    """(schedule storage address, step index) when ``timestep`` is one entry of a schedule tensor, else None.

    diffusers' pipelines iterate ``scheduler.timesteps`` and pass ``t.expand(batch)``:
    every element of that view is the same schedule entry (all strides 0) and its
    storage offset is the step index.  Only tensor metadata is read.  A timestep
    computed per step (FramePack's wrapper) owns its storage and gives None.
    """
    if not isinstance(timestep, torch.Tensor) or any(timestep.stride()) and timestep.numel() > 1:
        return None
    storage = timestep.untyped_storage()
    if storage.nbytes() <= timestep.element_size():
        return None
    return storage.data_ptr(), timestep.storage_offset()


@dataclasses.dataclass
class RunReport:
    """What one sampling run (one FramePack section) did, filled in as it goes."""

    index: int
    num_steps: int
    calibrate: bool = False
    computed: list[int] = dataclasses.field(default_factory=list)
    skipped: list[int] = dataclasses.field(default_factory=list)
    status: str = "running"           # running | complete | interrupted
    seconds: float = 0.0
    ratios: list[float] | None = None            # calibration: mean ||r_t|| / ||r_{t-1}|| per step
    ratio_std: list[float] | None = None         # calibration: its std over tokens
    cosine_distance: list[float] | None = None   # calibration: mean 1 - cos(r_t, r_{t-1})

    @property
    def computed_count(self) -> int:
        return len(self.computed)

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        return (f"run {self.index}: {self.status}, computed {self.computed_count} of "
                f"{self.computed_count + self.skipped_count} steps, skipped {self.skipped}, {self.seconds:.2f}s")


@dataclasses.dataclass
class _Run:
    """Internal state of the run in progress."""

    report: RunReport
    started: float
    step: int = -1
    branch: int = 0
    last_timestep: torch.Tensor | None = None   # identity marks a second CFG branch of the same step
    run_key: torch.Tensor | None = None         # the caller's per-run tensor (guidance); held, so never reused
    schedule: tuple[int, int] | None = None     # (schedule storage, index) when the timestep is a schedule view
    residuals: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    calib_prev: torch.Tensor | None = None      # residual of the previous computed step, branch 0


class MagCacheState:
    """Everything MagCache keeps on one transformer instance."""

    def __init__(self, config: MagCacheConfig, original_forward: Any | None,
                 adapter: ModelAdapter | None = None) -> None:
        self.config = config
        self.adapter = adapter   # what is particular to the patched model's class
        self.plan = config.schedule()
        self.runs: list[RunReport] = []
        self._run: _Run | None = None
        self._explicit = False   # inside magcache_run(): run boundaries come from the caller
        self._original_forward = original_forward   # an instance-level forward that existed before us
        self._warned: set[str] = set()

    @property
    def original_forward(self) -> Any | None:
        """The instance-level forward the model had before MagCache (e.g. an offload hook's), or None."""
        return self._original_forward

    @property
    def last_run(self) -> RunReport | None:
        return self.runs[-1] if self.runs else None

    def residual_cache_bytes(self) -> int:
        """Bytes held right now: cached residuals (all CFG branches) and, calibrating, the previous one."""
        if self._run is None:
            return 0
        held = list(self._run.residuals.values())
        if self._run.calib_prev is not None:
            held.append(self._run.calib_prev)
        return sum(t.numel() * t.element_size() for t in held)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    # -- run boundaries ---------------------------------------------------

    def start_run(self) -> RunReport:
        """Close the run in progress (if any) and start a clean one."""
        self.end_run(interrupted=True)
        report = RunReport(index=len(self.runs), num_steps=self.config.num_steps, calibrate=self.config.calibrate)
        if self.config.calibrate:
            report.ratios, report.ratio_std, report.cosine_distance = [], [], []
        self.runs.append(report)
        self._run = _Run(report=report, started=time.perf_counter())
        return report

    def end_run(self, interrupted: bool = False) -> None:
        """Finish the run in progress and free its residuals."""
        run = self._run
        if run is None:
            return
        self._run = None
        report = run.report
        if report.status == "running":
            done = run.step + 1 >= report.num_steps
            report.status = "complete" if done and not interrupted else "interrupted"
            self._log_report(report)

    def _log_report(self, report: RunReport) -> None:
        logger.info("MagCache %s", report.summary())

    # -- per call ---------------------------------------------------------

    def begin_call(self, timestep: torch.Tensor, run_key: torch.Tensor | None = None) -> tuple[int, int]:
        """Place this transformer call in (step, CFG branch), starting a run if needed.

        Both callers create one timestep tensor per step and pass that very
        object to both CFG branches (FramePack's wrapper: ``(sigma * 1000).to(dtype)``;
        diffusers' pipeline: ``t.expand(batch)``), whatever the dtypes of
        latents and model.  So a call that receives the timestep object of the
        previous call is the next branch of the same step, and any other call is
        a new step.  The previous timestep is held, so its id cannot be reused.

        A new step starts a new run (steps from 0, no residuals) when

        * ``run_key`` is another object than the run's: the caller creates it once
          per run (FramePack's ``sample_hunyuan`` builds its guidance tensor per
          section, diffusers' pipeline per call), or
        * the timestep is a view into a schedule tensor (diffusers iterates
          ``scheduler.timesteps``; its storage offset is the step index) and that
          schedule changed or its index did not go forward: the next section, or
        * outside :func:`magcache_run`, the run has done all its steps.

        None of this reads a value from the device: no GPU sync per call.
        """
        run = self._run
        if run is not None and run.step >= 0 and timestep is run.last_timestep:
            run.branch += 1
            return run.step, run.branch
        schedule = _schedule_position(timestep)
        if run is None or (run.step >= 0 and self._run_ended(run, run_key, schedule)):
            if run is not None:
                self.end_run(interrupted=run.step + 1 < run.report.num_steps)
            run = self._start_for_call()
        run.last_timestep, run.schedule = timestep, schedule
        if run.run_key is None:
            run.run_key = run_key
        run.step += 1
        run.branch = 0
        if run.step >= run.report.num_steps:
            self._warn_once("steps", "MagCache: the sampler ran more steps than num_steps=%d; extra steps are "
                            "computed. Set MagCacheConfig.num_steps to the sampler's step count.",
                            run.report.num_steps)
        return run.step, run.branch

    def _run_ended(self, run: _Run, run_key: torch.Tensor | None,
                   schedule: tuple[int, int] | None) -> bool:
        """Does a new step with these signals belong to a new run?  (See :meth:`begin_call`.)"""
        if run_key is not None and run.run_key is not None and run_key is not run.run_key:
            return True
        if schedule is not None and run.schedule is not None:
            return schedule[0] != run.schedule[0] or schedule[1] <= run.schedule[1]
        return not self._explicit and run.step + 1 >= run.report.num_steps

    def _start_for_call(self) -> _Run:
        self.start_run()
        assert self._run is not None
        return self._run

    def should_skip(self, step: int, branch: int, tokens: int) -> torch.Tensor | None:
        """The cached residual to reuse at this step and branch, or None to compute."""
        run = self._run
        assert run is not None
        if step >= len(self.plan) or not self.plan[step]:
            return None
        residual = run.residuals.get(branch)
        if residual is None or residual.shape[1] != tokens:
            self._warn_once("noresidual", "MagCache: step %d is planned as skipped but branch %d has no "
                            "matching cached residual; computing it", step, branch)
            return None
        return residual

    def record(self, step: int, branch: int, skipped: bool) -> None:
        run = self._run
        assert run is not None
        if branch == 0:
            (run.report.skipped if skipped else run.report.computed).append(step)
        run.report.seconds = time.perf_counter() - run.started
        if branch == 0 and step == run.report.num_steps - 1 and not self._explicit:
            run.report.status = "complete"
            self._log_report(run.report)

    def store_residual(self, step: int, branch: int, residual: torch.Tensor) -> None:
        run = self._run
        assert run is not None
        if self.config.calibrate:
            if branch == 0:
                self._calibrate(run, residual)
            return   # calibration never skips: nothing to keep for reuse
        if any(self.plan[step + 1:]):
            run.residuals[branch] = residual
        else:
            run.residuals.pop(branch, None)   # nothing left to skip in this run: hold no memory

    def _calibrate(self, run: _Run, residual: torch.Tensor) -> None:
        report = run.report
        assert report.ratios is not None and report.ratio_std is not None and report.cosine_distance is not None
        cur = residual.float()
        prev = run.calib_prev
        if prev is None:
            report.ratios.append(1.0)
            report.ratio_std.append(0.0)
            report.cosine_distance.append(0.0)
        else:
            per_token = cur.norm(dim=-1) / prev.norm(dim=-1)
            cos = torch.nn.functional.cosine_similarity(cur, prev, dim=-1)
            report.ratios.append(per_token.mean().item())
            report.ratio_std.append(per_token.std().item() if per_token.numel() > 1 else 0.0)
            report.cosine_distance.append((1 - cos).mean().item())
        run.calib_prev = cur
        logger.debug("MagCache calibration step %d: ratio %.5f", len(report.ratios) - 1, report.ratios[-1])

    # -- calibration results ----------------------------------------------

    def calibration_runs(self) -> list[RunReport]:
        return [r for r in self.runs if r.calibrate and r.status == "complete" and r.ratios
                and len(r.ratios) == r.num_steps]

    def calibration_profile(self, variant: str, resolution: int | None = None,
                            model: str | None = None) -> MagCacheProfile:
        """The complete calibration runs (sections) of this state averaged into a profile."""
        return MagCacheProfile.average(self.calibration_runs(), variant, resolution, model)


# ---------------------------------------------------------------------------
# Model adapters: what differs between the transformer classes MagCache patches
# ---------------------------------------------------------------------------
#
# The plan, the run/branch bookkeeping, the residuals and calibration above are
# the same for every model.  What a model class does differently lives here, one
# small class per model class:
#
# * FramePackAdapter for FramePack's own HunyuanVideoTransformer3DModelPacked
#   (lllyasviel's diffusers_helper).  Its forward is restated operation by
#   operation so that a computed step is bitwise FramePack's, and a skipped step
#   runs only the noisy-latent patch embedding, the time embedding and the
#   output head.
# * DiffusersFramePackAdapter for diffusers' HunyuanVideoFramepackTransformer3DModel
#   (0.34 and later), the same checkpoints converted.  A computed step runs the
#   model's own forward untouched (bitwise equal on any diffusers version) and
#   two hooks on the first and last block read the block stack's input and
#   output; only the skipped step is written here.
#
# Both models put the noisy-latent tokens last in the packed sequence (history
# tokens are concatenated in front of them) and return exactly those tokens, so
# the cached residual is the last frames * (height / p) * (width / p) tokens of
# (stack output - stack input).  An adapter is chosen by the model's class name
# (anywhere in its MRO), or failing that by the attributes it has; nothing of
# FramePack or of diffusers is imported (diffusers' output class only when a
# diffusers model, which has loaded it already, returns a dict).

def _output_tokens(hidden_states: torch.Tensor, config: Any) -> tuple[int, int, int, int]:
    """(tokens, frames, height, width) after patching: the noisy-latent tokens a forward returns."""
    _, _, num_frames, height, width = hidden_states.shape
    p, p_t = config["patch_size"], config["patch_size_t"]
    t, h, w = num_frames // p_t, height // p, width // p
    return t * h * w, t, h, w


def _unpatchify(x: torch.Tensor, config: Any, t: int, h: int, w: int) -> torch.Tensor:
    """(b, t*h*w, c*pt*p*p) tokens back to a (b, c, t*pt, h*p, w*p) latent."""
    p, p_t = config["patch_size"], config["patch_size_t"]
    x = x.reshape(x.shape[0], t, h, w, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape[0], -1, t * p_t, h * p, w * p)


def _model_output(x: torch.Tensor, return_dict: bool) -> Any:
    if return_dict:
        from diffusers.models.modeling_outputs import Transformer2DModelOutput  # loaded with the model already
        return Transformer2DModelOutput(sample=x)
    return (x,)


class RunState(Protocol):
    """What an adapter may call on the run state (:class:`MagCacheState` is the one implementation).

    Per transformer call an adapter's forward does, in this order:
    ``begin_call`` once (it places the call in a step and CFG branch), then
    ``should_skip``; on a skipped step it adds the returned residual and calls
    ``record(skipped=True)``; on a computed step it runs the blocks, hands the
    residual of the noisy-latent tokens to ``store_residual`` and calls
    ``record(skipped=False)``.  ``original_forward`` is the instance-level
    forward the model had before MagCache (an offload hook's), or None.
    """

    @property
    def original_forward(self) -> Any | None: ...

    def begin_call(self, timestep: torch.Tensor, run_key: torch.Tensor | None = None) -> tuple[int, int]: ...

    def should_skip(self, step: int, branch: int, tokens: int) -> torch.Tensor | None: ...

    def record(self, step: int, branch: int, skipped: bool) -> None: ...

    def store_residual(self, step: int, branch: int, residual: torch.Tensor) -> None: ...


class ModelAdapter:
    """What MagCache needs to know of one transformer class.

    ``forward(model, state, ...)`` replaces the instance's forward while MagCache
    is enabled; ``install``/``uninstall`` add and remove whatever else the
    adapter needs on the instance (hooks).  An adapter talks to the run state
    only through :class:`RunState`.
    """

    class_name: str = ""
    title: str = ""
    required_attrs: tuple[str, ...] = ()

    @classmethod
    def missing(cls, model: torch.nn.Module) -> list[str]:
        return [a for a in cls.required_attrs if not hasattr(model, a)]

    def install(self, model: torch.nn.Module, state: RunState) -> None:
        """Nothing to add by default."""

    def uninstall(self) -> None:
        """Nothing to remove by default."""

    def forward(self, model: Any, state: RunState, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# FramePack's packed transformer
# ---------------------------------------------------------------------------

def _framepack_attention_mask(model: torch.nn.Module, encoder_attention_mask: torch.Tensor,
                              img_seq_len: int, txt_seq_len: int) -> tuple:
    """FramePack's var-len attention arguments for batch > 1, from the model's own module."""
    for cls in type(model).__mro__:
        if "process_input_hidden_states" in cls.__dict__:
            get_cu_seqlens = getattr(sys.modules[cls.__module__], "get_cu_seqlens")
            cu = get_cu_seqlens(encoder_attention_mask, img_seq_len)
            return cu, cu, img_seq_len + txt_seq_len, img_seq_len + txt_seq_len
    raise TypeError("cannot find FramePack's get_cu_seqlens for batch > 1")


class FramePackAdapter(ModelAdapter):
    """FramePack's ``HunyuanVideoTransformer3DModelPacked``: its forward restated with MagCache."""

    class_name = "HunyuanVideoTransformer3DModelPacked"
    title = "FramePack's HunyuanVideoTransformer3DModelPacked"
    required_attrs = ("process_input_hidden_states", "x_embedder", "time_text_embed", "context_embedder",
                      "transformer_blocks", "single_transformer_blocks", "norm_out", "proj_out",
                      "gradient_checkpointing_method", "config")

    def forward(self, model: Any, state: RunState, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                pooled_projections: torch.Tensor, guidance: torch.Tensor,
                latent_indices: torch.Tensor | None = None,
                clean_latents: torch.Tensor | None = None, clean_latent_indices: torch.Tensor | None = None,
                clean_latents_2x: torch.Tensor | None = None,
                clean_latent_2x_indices: torch.Tensor | None = None,
                clean_latents_4x: torch.Tensor | None = None,
                clean_latent_4x_indices: torch.Tensor | None = None,
                image_embeddings: torch.Tensor | None = None,
                attention_kwargs: dict | None = None, return_dict: bool = True) -> Any:
        """Drop-in forward of the packed transformer with MagCache.

        A computed step runs the same operations in the same order as FramePack's
        forward (so its output is bitwise the same) and keeps the stack residual
        of the output tokens.  A skipped step embeds only the noisy latents, adds
        the cached residual and runs the output head: nothing else.
        """
        run_ckpt = model.gradient_checkpointing_method
        batch_size = hidden_states.shape[0]
        out_tokens, t_out, h_out, w_out = _output_tokens(hidden_states, model.config)

        step, branch = state.begin_call(timestep, guidance)
        residual = state.should_skip(step, branch, out_tokens)

        if residual is not None:
            x = run_ckpt(model.x_embedder.proj, hidden_states).flatten(2).transpose(1, 2)
            temb = run_ckpt(model.time_text_embed, timestep, guidance, pooled_projections)
            x = x + residual
            x = run_ckpt(model.norm_out, x, temb)
            state.record(step, branch, skipped=True)
        else:
            x, rope_freqs = model.process_input_hidden_states(
                hidden_states, latent_indices, clean_latents, clean_latent_indices,
                clean_latents_2x, clean_latent_2x_indices, clean_latents_4x, clean_latent_4x_indices)
            temb = run_ckpt(model.time_text_embed, timestep, guidance, pooled_projections)
            context = run_ckpt(model.context_embedder, encoder_hidden_states, timestep, encoder_attention_mask)
            context_mask = encoder_attention_mask
            if model.image_projection is not None:
                if image_embeddings is None:
                    raise ValueError("this transformer has an image projection: pass image_embeddings")
                extra = run_ckpt(model.image_projection, image_embeddings)
                extra_mask = torch.ones((batch_size, extra.shape[1]), dtype=context_mask.dtype,
                                        device=context_mask.device)
                context = torch.cat([extra, context], dim=1)   # image tokens first: the mask crops from the end
                context_mask = torch.cat([extra_mask, context_mask], dim=1)
            with torch.no_grad():
                if batch_size == 1:
                    context = context[:, :context_mask.sum().item()]
                    attention_mask = (None, None, None, None)
                else:
                    attention_mask = _framepack_attention_mask(model, context_mask, x.shape[1], context.shape[1])

            stack_in = x[:, -out_tokens:]     # a view: the blocks never write into their input
            for block in model.transformer_blocks:
                x, context = run_ckpt(block, x, context, temb, attention_mask, rope_freqs)
            for block in model.single_transformer_blocks:
                x, context = run_ckpt(block, x, context, temb, attention_mask, rope_freqs)
            state.store_residual(step, branch, x[:, -out_tokens:] - stack_in)
            x = run_ckpt(model.norm_out, x, temb)
            x = x[:, -out_tokens:, :]
            state.record(step, branch, skipped=False)

        if getattr(model, "high_quality_fp32_output_for_inference", False):
            x = x.to(dtype=torch.float32)
            if model.proj_out.weight.dtype != torch.float32:
                model.proj_out.to(dtype=torch.float32)
        x = run_ckpt(model.proj_out, x)
        return _model_output(_unpatchify(x, model.config, t_out, h_out, w_out), return_dict)


# ---------------------------------------------------------------------------
# diffusers' HunyuanVideoFramepackTransformer3DModel
# ---------------------------------------------------------------------------

class DiffusersFramePackAdapter(ModelAdapter):
    """diffusers' ``HunyuanVideoFramepackTransformer3DModel``: own forward on computed steps, hooks read the stack.

    A forward pre-hook on the first block keeps a view of the stack input's
    output tokens; a forward hook on the last block hands (output - input) of
    those tokens to the state.  The hooks act only while this adapter's forward
    runs a computed step, so they cost nothing otherwise and are removed on
    disable.
    """

    class_name = "HunyuanVideoFramepackTransformer3DModel"
    title = "diffusers' HunyuanVideoFramepackTransformer3DModel"
    required_attrs = ("_pack_history_states", "x_embedder", "time_text_embed", "transformer_blocks",
                      "single_transformer_blocks", "norm_out", "proj_out", "config")

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._state: RunState | None = None
        self._capture: tuple[int, int, int] | None = None   # (step, branch, output tokens) while computing
        self._stack_in: torch.Tensor | None = None

    def install(self, model: torch.nn.Module, state: RunState) -> None:
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        if not blocks:
            raise TypeError("this transformer has no blocks: nothing for MagCache to skip")
        self._state = state
        self._handles = [blocks[0].register_forward_pre_hook(self._stack_input, with_kwargs=True),
                         blocks[-1].register_forward_hook(self._stack_output)]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._capture = self._stack_in = None

    def _stack_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capture is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._stack_in = hidden[:, -self._capture[2]:]   # a view: the blocks never write into their input

    def _stack_output(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._capture is None or self._stack_in is None:
            return
        step, branch, tokens = self._capture
        assert self._state is not None
        self._state.store_residual(step, branch, output[0][:, -tokens:] - self._stack_in)
        self._stack_in = None

    def forward(self, model: Any, state: RunState, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor,
                pooled_projections: torch.Tensor, image_embeds: torch.Tensor, indices_latents: torch.Tensor,
                guidance: torch.Tensor | None = None, *args: Any,
                attention_kwargs: dict | None = None, return_dict: bool = True, **kwargs: Any) -> Any:
        """Computed step: the model's own forward.  Skipped step: embed, add the residual, output head."""
        out_tokens, t_out, h_out, w_out = _output_tokens(hidden_states, model.config)
        step, branch = state.begin_call(timestep, guidance)
        residual = state.should_skip(step, branch, out_tokens)

        if residual is None:
            original = state.original_forward or type(model).forward.__get__(model)
            self._capture, self._stack_in = (step, branch, out_tokens), None
            try:
                out = original(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                               pooled_projections, image_embeds, indices_latents, guidance, *args,
                               attention_kwargs=attention_kwargs, return_dict=return_dict, **kwargs)
            finally:
                self._capture = self._stack_in = None
            state.record(step, branch, skipped=False)
            return out

        with _lora_scale(model, attention_kwargs):
            x = model.x_embedder(hidden_states)          # the noisy latents' tokens: the last of the sequence
            temb = model.time_text_embed(timestep, pooled_projections, guidance)
            if isinstance(temb, tuple):                  # (temb, token_replace_emb) in diffusers >= 0.33
                temb = temb[0]
            x = model.norm_out(x + residual, temb)
            x = model.proj_out(x)
        state.record(step, branch, skipped=True)
        return _model_output(_unpatchify(x, model.config, t_out, h_out, w_out), return_dict)


class _lora_scale:
    """The LoRA scale diffusers' forward applies from ``attention_kwargs["scale"]``, for the skipped step too."""

    def __init__(self, model: torch.nn.Module, attention_kwargs: dict | None) -> None:
        self.model = model
        self.scale = 1.0 if not attention_kwargs else attention_kwargs.get("scale", 1.0)
        self.active = False

    def __enter__(self) -> None:
        if self.scale != 1.0:
            from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers
            if USE_PEFT_BACKEND:
                scale_lora_layers(self.model, self.scale)
                self.active = True

    def __exit__(self, *exc: object) -> None:
        if self.active:
            from diffusers.utils import unscale_lora_layers
            unscale_lora_layers(self.model, self.scale)


ADAPTERS: tuple[type[ModelAdapter], ...] = (FramePackAdapter, DiffusersFramePackAdapter)


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """A fresh adapter for this model: by class name first, then by the attributes it has.

    TypeError says what each known class would need when none fits.
    """
    names = {cls.__name__ for cls in type(model).__mro__}
    for adapter in ADAPTERS:
        if adapter.class_name in names and not adapter.missing(model):
            return adapter()
    for adapter in ADAPTERS:
        if not adapter.missing(model):
            return adapter()
    wanted = " nor ".join(f"{a.title} (missing: {', '.join(a.missing(model))})" for a in ADAPTERS)
    raise TypeError(f"{type(model).__name__} does not look like {wanted}")


# ---------------------------------------------------------------------------
# Patching one transformer instance
# ---------------------------------------------------------------------------

_STATE_ATTR = "_magcache_state"


def get_magcache_state(transformer: torch.nn.Module) -> MagCacheState | None:
    return transformer.__dict__.get(_STATE_ATTR)


def enable_magcache(transformer: torch.nn.Module, config: MagCacheConfig) -> MagCacheState:
    """Patch this transformer instance (never its class) to run MagCache.

    Works on FramePack's ``HunyuanVideoTransformer3DModelPacked`` and on
    diffusers' ``HunyuanVideoFramepackTransformer3DModel``: what differs between
    them is in the adapter :func:`adapter_for` picks.
    Enabling an already enabled instance replaces its settings and state.
    """
    if not isinstance(config, MagCacheConfig):
        raise TypeError(f"config must be a MagCacheConfig, got {type(config).__name__}")
    adapter = adapter_for(transformer)
    old = get_magcache_state(transformer)
    if old is not None:
        old.end_run(interrupted=True)
        if old.adapter is not None:
            old.adapter.uninstall()
        original = old._original_forward
    else:
        original = transformer.__dict__.get("forward")
    if getattr(transformer, "enable_teacache", False):
        logger.warning("MagCache replaces FramePack's TeaCache on this transformer while enabled")
    state = MagCacheState(config, original, adapter)
    adapter.install(transformer, state)
    transformer.__dict__[_STATE_ATTR] = state
    transformer.__dict__["forward"] = _magcache_forward.__get__(transformer)
    plan = state.plan
    logger.info("MagCache enabled: thresh=%s K=%s retention=%s steps=%d%s -> %d of %d steps computed",
                config.magcache_thresh, config.magcache_K, config.retention_ratio, config.num_steps,
                " (calibration)" if config.calibrate else "", plan.count(False), len(plan))
    return state


def disable_magcache(transformer: torch.nn.Module) -> None:
    """Restore the transformer's forward exactly as it was before enable."""
    state = transformer.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return
    state.end_run(interrupted=True)
    if state.adapter is not None:
        state.adapter.uninstall()
    if state._original_forward is not None:
        transformer.__dict__["forward"] = state._original_forward
    else:
        transformer.__dict__.pop("forward", None)


@contextlib.contextmanager
def magcache(transformer: torch.nn.Module, config: MagCacheConfig) -> Iterator[MagCacheState]:
    """``with magcache(transformer, config):`` enable, then disable whatever happens."""
    state = enable_magcache(transformer, config)
    try:
        yield state
    finally:
        disable_magcache(transformer)


@contextlib.contextmanager
def magcache_run(transformer: torch.nn.Module) -> Iterator[RunReport | None]:
    """Scope one sampling call: clean state in, reports closed out.

    Inside it, steps are counted from 0 no matter how the previous run ended,
    and no timestep is read back from the device.  Yields the live
    :class:`RunReport` of its first run, or None when MagCache is not enabled on
    ``transformer``.  A call that samples several sections (diffusers' FramePack
    pipeline) still makes one run per section, told apart by the caller's
    signals (see :meth:`MagCacheState.begin_call`): they follow the first in
    ``state.runs``, and every run begun in the scope is closed when it ends.
    """
    state = get_magcache_state(transformer)
    if state is None:
        yield None
        return
    report = state.start_run()
    state._explicit = True
    ok = False
    try:
        yield report
        ok = True
    finally:
        state._explicit = False
        if state._run is not None and state._run.report.index >= report.index:
            state.end_run(interrupted=not ok)


def _magcache_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The patched instance's forward: its adapter's, with this instance's state."""
    state: MagCacheState = self.__dict__[_STATE_ATTR]
    assert state.adapter is not None
    return state.adapter.forward(self, state, *args, **kwargs)
