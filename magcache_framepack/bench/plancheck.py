"""The ``plan-check`` tool: does "planned error" rank settings as the measured distance to the uncached run does?

``python magcache_bench.py plan-check [--size tiny|small] [--steps 25] [--seed 0] [--json FILE]``

The target planner (:func:`magcache_core.plan_for_target`) picks, among the
settings fast enough, the one with the least *planned* error
(:func:`magcache_core.planned_error`, from the ratio table, the profile's
cosine distances and FramePack's step weights).  That is worth something only
if it ranks settings the way their real damage does.  This tool checks it on a
random-weight model on the CPU:

1. calibrate the model's own ratios and cosine distances (a MagCache
   calibration run of the section: published ratios describe the real model,
   not random weights);
2. take the planner's own candidates (thresholds 0.01-0.40, K 1-8, four
   retentions: the settings it chooses among), sample the section uncached,
   then once per distinct plan among them;
3. measure each final latent's mean squared distance to the uncached one, and
   report Spearman's rank correlation between planned error and that distance,
   over the candidates and over their distinct plans; and, as the baseline a
   ranking must beat, the same for the number of skipped steps.

Decisions: the rank correlation is computed here (average ranks for ties,
then Pearson's r of the ranks) so the bench needs no scipy; settings that give
the same plan are run once (their latents are equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import magcache_core
from magcache_framepack.bench.report import UsageError, write_json
from magcache_framepack.bench.speed import SIZES, _framepack_sampler, _sampler_bars_hidden, bench_shape
from magcache_framepack.sensitivity import framepack_step_weights


def ranks(values: Sequence[float]) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean of their positions."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    out = np.empty(len(x))
    out[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        out[tied] = out[tied].mean()
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (nan when either side is constant)."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclasses.dataclass
class CheckRow:
    magcache_thresh: float
    magcache_K: int
    retention_ratio: float
    computed_steps: int
    planned_error: float
    latent_mse: float


def run_plan_check(size: str = "tiny", steps: int = 25, seed: int = 0,
                   grid: tuple[Sequence[float], Sequence[int], Sequence[float]] = (
                       magcache_core.TARGET_THRESHOLDS, magcache_core.TARGET_KS, magcache_core.TARGET_RETENTIONS)
                   ) -> dict[str, Any]:
    """Calibrate, sample uncached and per distinct plan of the grid, and rank-correlate planned error with distance."""
    shape = bench_shape(size)
    sampler = _framepack_sampler(shape, torch.device("cpu"), torch.float32, "framepack", seed, steps, 1.0)
    model = sampler.transformer
    weights = framepack_step_weights(steps, magcache_core.frame_resolution(shape.height, shape.width),
                                     shape.latent_window)
    with _sampler_bars_hidden(True):
        state = magcache_core.enable_magcache(model, magcache_core.MagCacheConfig(calibrate=True, num_steps=steps))
        reference = sampler.sample().double()       # a calibration run skips nothing: it is the uncached run
        profile = state.calibration_profile("framepack")
        magcache_core.disable_magcache(model)
        candidates = magcache_core.plan_candidates(profile.ratios, steps, "magnitude", *grid,
                                                   cosine_distance=profile.cosine_distance, step_weights=weights)
        rows: list[CheckRow] = []
        measured: dict[tuple[bool, ...], float] = {}
        for c in candidates:
            plan = tuple(magcache_core.skip_schedule(profile.ratios, steps, c.magcache_thresh, c.magcache_K,
                                                     c.retention_ratio))
            if plan not in measured:
                magcache_core.enable_magcache(model, magcache_core.MagCacheConfig(
                    magcache_thresh=c.magcache_thresh, magcache_K=c.magcache_K, retention_ratio=c.retention_ratio,
                    num_steps=steps, mag_ratios=profile))
                try:
                    measured[plan] = float(((sampler.sample().double() - reference) ** 2).mean())
                finally:
                    magcache_core.disable_magcache(model)
            rows.append(CheckRow(c.magcache_thresh, c.magcache_K, c.retention_ratio, c.computed_steps,
                                 c.planned_error, measured[plan]))
    distinct = distinct_rows(rows)
    return {
        "size": size, "steps": steps, "seed": seed, "ratios": list(profile.ratios),
        "cosine_distance": list(profile.cosine_distance or []), "step_weights": list(weights or []),
        "rows": rows, "distinct_plans": len(measured),
        "spearman": spearman([r.planned_error for r in rows], [r.latent_mse for r in rows]),
        "spearman_distinct": spearman([r.planned_error for r in distinct], [r.latent_mse for r in distinct]),
        "spearman_skips": spearman([-r.computed_steps for r in rows], [r.latent_mse for r in rows]),
        "spearman_skips_distinct": spearman([-r.computed_steps for r in distinct], [r.latent_mse for r in distinct]),
    }


def distinct_rows(rows: Sequence[CheckRow]) -> list[CheckRow]:
    """One row per distinct plan, its first (smallest) setting: settings that give one plan are one measurement."""
    first: dict[tuple[int, float, float], CheckRow] = {}
    for r in rows:
        first.setdefault((r.computed_steps, r.planned_error, r.latent_mse), r)
    return list(first.values())


def format_plan_check(result: dict[str, Any]) -> str:
    lines = [f"{len(result['rows'])} settings ({result['distinct_plans']} distinct plans), {result['size']} "
             f"random-weight model, {result['steps']} steps, seed {result['seed']}, ratios calibrated on it",
             "| thresh | K | retention | computed | planned error | final-latent MSE |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.magcache_thresh:g} | {r.magcache_K} | {r.retention_ratio:g} | {r.computed_steps} "
              f"| {r.planned_error:.4g} | {r.latent_mse:.3e} |" for r in distinct_rows(result["rows"])]
    lines.append(f"Spearman (planned error vs final-latent MSE): {result['spearman']:.3f} over the settings, "
                 f"{result['spearman_distinct']:.3f} over the distinct plans")
    lines.append(f"Baseline (skipped steps vs final-latent MSE): {result['spearman_skips']:.3f} over the settings, "
                 f"{result['spearman_skips_distinct']:.3f} over the distinct plans")
    return "\n".join(lines)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``plan-check``: its flags, and :func:`run` as what it does."""
    pc = subparsers.add_parser("plan-check", help="rank correlation of planned error with measured latent distance "
                                                  "(random-weight model, its own calibration)")
    pc.add_argument("--size", choices=SIZES[:2], default="tiny", help="model shape (default tiny)")
    pc.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    pc.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default 0)")
    pc.add_argument("--json", metavar="FILE", help="write the rows and the correlations as JSON")
    pc.set_defaults(run=run)
    return pc


def run(args: argparse.Namespace) -> int:
    if not 2 <= args.steps <= 100:
        raise UsageError(f"--steps must be an integer from 2 to 100, got {args.steps}")
    result = run_plan_check(args.size, args.steps, args.seed)
    print(format_plan_check(result))
    if args.json:
        write_json(args.json, {**result, "rows": [dataclasses.asdict(r) for r in result["rows"]]})
    sys.stdout.flush()
    return 0
