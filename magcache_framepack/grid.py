"""A settings grid for the cache: MagCache's threshold x K (x retention), each cell scored against no cache.

One image, one seed, one job's settings; the grid varies only the cache.
Its first run is the uncached reference (the same job with the cache Off);
every cell is the same job with one (threshold, K, retention) and is scored
against that reference (:mod:`magcache_framepack.comparison`): wall and
sampling speedups, the planned one, and PSNR / SSIM to the uncached frames.
Because jobs are reproducible, a cell's video is the one a single run with
the same settings gives.

Used by the app's Grid tab and by ``magcache_bench.py sweep``; the parts are
pure (the cells, each cell's settings, a row from a comparison, the exports)
so both front ends run them their own way (Ray workers, interleaved repeats).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

from magcache_framepack.comparison import Comparison
from magcache_framepack.settings import LIMITS, JobSettings

#: The most cells one grid may have: each one is a whole job.
MAX_CELLS = 36


@dataclasses.dataclass(frozen=True)
class GridCell:
    """One MagCache setting of a grid."""

    thresh: float
    k: int
    retention: float

    @property
    def name(self) -> str:
        return f"E{self.thresh:g} K{self.k} R{self.retention:g}"


def parse_values(text: str, name: str) -> list[float]:
    """``"0.06, 0.1 0.15"`` -> the values, each checked against ``LIMITS[name]`` (ValueError says which, why).

    Commas or spaces separate; a value repeated counts once; order is kept.
    """
    limit = LIMITS[name]
    values: list[float] = []
    for word in str(text or "").replace(",", " ").split():
        try:
            value = float(word)
        except ValueError:
            raise ValueError(f"{name}: {word!r} is not a number; give numbers separated by commas") from None
        if limit.integer and value.is_integer():
            value = int(value)
        if not limit.accepts(value):
            raise ValueError(f"{name} {word}: {limit.describe()}")
        if value not in values:
            values.append(value)
    return values


def grid_cells(thresholds: Sequence[float], ks: Sequence[int], retentions: Sequence[float]) -> list[GridCell]:
    """Every combination, threshold slowest, retention fastest (ValueError if none, or more than MAX_CELLS)."""
    if not thresholds or not ks or not retentions:
        raise ValueError("a grid needs at least one threshold, one K and one retention")
    cells = [GridCell(float(t), int(k), float(r)) for t, k, r in itertools.product(thresholds, ks, retentions)]
    if len(cells) > MAX_CELLS:
        raise ValueError(f"{len(cells)} cells: a grid has at most {MAX_CELLS} (each cell is a whole job); "
                         "give fewer values")
    return cells


def cell_settings(base: JobSettings, cell: GridCell | None) -> JobSettings:
    """The job of one cell: ``base`` with this MagCache setting, or with the cache Off for the reference."""
    if cell is None:
        return dataclasses.replace(base, cache="off", calibrate=False, target_speedup=None)
    return dataclasses.replace(base, cache="magcache", calibrate=False, target_speedup=None,
                               magcache_thresh=cell.thresh, magcache_K=cell.k, retention_ratio=cell.retention)


@dataclasses.dataclass(frozen=True)
class GridRow:
    """One cell's outcome: status, video, times and the distance to the uncached video."""

    setting: str
    thresh: float
    k: int
    retention: float
    status: str
    message: str = ""
    video: str | None = None
    seconds: float | None = None
    sampling_seconds: float | None = None
    computed_steps: int | None = None
    total_steps: int | None = None
    planned_speedup: float | None = None
    wall_speedup: float | None = None
    sampling_speedup: float | None = None
    psnr_mean: float | None = None      # over frames that differ (identical frames are infinite)
    psnr_min: float | None = None
    ssim_mean: float | None = None
    ssim_min: float | None = None


def failed_row(cell: GridCell, status: str, message: str) -> GridRow:
    """A cell that did not make a video (stopped, or an error): the row says so and why."""
    return GridRow(cell.name, cell.thresh, cell.k, cell.retention, status=status, message=message)


def scored_row(cell: GridCell, comparison: Comparison) -> GridRow:
    """A cell's row from its comparison against the uncached reference."""
    c = comparison.cached
    return GridRow(
        cell.name, cell.thresh, cell.k, cell.retention, status="done", video=c.video, seconds=c.seconds,
        sampling_seconds=c.sampling_seconds, computed_steps=c.computed_steps, total_steps=c.total_steps,
        planned_speedup=comparison.planned_speedup, wall_speedup=comparison.wall_speedup,
        sampling_speedup=comparison.sampling_speedup, psnr_mean=comparison.psnr_mean_finite,
        psnr_min=comparison.psnr_min, ssim_mean=comparison.ssim_mean, ssim_min=comparison.ssim_min)


COLUMNS = tuple(f.name for f in dataclasses.fields(GridRow))


def _plain(value: Any) -> Any:
    """A JSON/CSV value: infinite PSNR (identical frames) as "inf", floats rounded for reading."""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else round(value, 6)
    return value


def rows_csv(rows: Sequence[GridRow]) -> str:
    """The grid as CSV, one row per cell, the columns of :class:`GridRow`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else _plain(v) for v in dataclasses.astuple(row)])
    return out.getvalue()


def rows_json(rows: Sequence[GridRow], reference: dict[str, Any]) -> str:
    """The grid as JSON: the reference run (video, seconds, settings) and every cell's row."""
    return json.dumps({"reference": reference,
                       "cells": [{k: _plain(v) for k, v in dataclasses.asdict(r).items()} for r in rows]},
                      indent=2, allow_nan=False)
