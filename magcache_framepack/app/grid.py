"""The Grid tab: one job's settings, the cache varied over threshold x K (x retention), each cell scored.

The grid runs on the page's image, prompt, seed and settings: first the
uncached reference, then every cell (:mod:`magcache_framepack.grid`), through
the app's runner seam, so with ``--ray`` the cells run on the Ray workers,
as many at once as there are workers.  After each cell the table, the
scatter of speedup against PSNR and SSIM, and the cells' videos grow.  End
stops the whole grid (every cell shares the grid's stop flag); the cells
finished before it stay, and the exports hold them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from magcache_framepack.app.requests import into_range, typed_settings
from magcache_framepack.app.jobs import Job, SessionJobs, take_events
from magcache_framepack.app.handlers import AppEvents
from magcache_framepack.app.views import grid_scatter, grid_status, grid_table
from magcache_framepack.grid import (GridCell, GridRow, cell_settings, failed_row, grid_cells, parse_values,
                                     rows_csv, rows_json, scored_row)
from magcache_framepack.records import write_atomic
from magcache_framepack.settings import JobSettings

logger = logging.getLogger(__name__)

#: What ``/grid`` returns, in this order.
GRID_OUTPUTS = ("status", "table", "scatter", "videos", "csv", "json")


class GridEvents:
    """The Grid tab's Run (and the ``/grid`` endpoint), on top of one app's :class:`AppEvents`."""

    def __init__(self, events: AppEvents) -> None:
        self.events = events

    def _start(self, grid: Job, image: Any, settings: JobSettings) -> Job:
        """One cell's job, on the app's runner, stopped with the grid (it shares the grid's stop flag)."""
        job = Job()
        job.stop = grid.stop
        e = self.events
        job.thread = threading.Thread(target=e.runner, name="magcache-grid-cell", daemon=True,
                                      args=(job, image, settings, e.outputs_dir, e.profiles_dir))
        job.thread.start()
        return job

    @staticmethod
    def _wait_any(running: dict[Any, Job]) -> tuple[Any, Any]:
        """(key, result) of the first of ``running`` to post its result (polls each job's queue)."""
        while True:
            for key, job in running.items():
                for kind, payload in take_events(job.events, timeout=0.05):
                    if kind == "done":
                        return key, payload

    def _views(self, rows: list[GridRow], total: int, note: str, files: tuple[Any, Any] = (None, None)
               ) -> tuple[Any, ...]:
        videos = [(r.video, r.setting) for r in rows if r.video]
        return (grid_status(rows, total, note), grid_table(rows), grid_scatter(rows), videos, *files)

    def run(self, input_image: Any, prompt: Any, n_prompt: Any, seed: Any, total_second_length: Any,
            latent_window_size: Any, steps: Any, cfg: Any, gs: Any, rs: Any, gpu_memory_preservation: Any,
            mag_ratios: Any, mp4_crf: Any, resample: Any, thresholds: Any, ks: Any, retentions: Any,
            session: SessionJobs | None) -> Iterator[tuple[Any, ...]]:
        """Check the inputs (a refused one says why, in one line), then run the grid and show it as it grows."""
        import gradio as gr

        try:
            cells = grid_cells(parse_values(thresholds, "magcache_thresh"), parse_values(ks, "magcache_K"),
                               parse_values(retentions, "retention_ratio"))
            e = self.events
            d = e.defaults
            settings, _ = into_range(typed_settings(
                prompt, n_prompt, seed, total_second_length, latent_window_size, steps, cfg, gs, rs,
                gpu_memory_preservation, "magcache", d.magcache_thresh, d.magcache_K, d.retention_ratio, False,
                mp4_crf, resample, e.catalog.path_for(mag_ratios)))
            image = e.checked_image(input_image, settings, mag_ratios)
        except (TypeError, ValueError, OverflowError) as exc:
            message = f"Cannot start the grid: {exc}"
            logger.info("%s", message)
            gr.Warning(message)
            yield self._views([], 0, message)
            return
        session = session if session is not None else SessionJobs()
        grid = session.begin()
        if grid is None:
            yield self._views([], len(cells), "Stopped before it started (End was pressed).")
            return
        try:
            yield from self._run(grid, cells, settings, image)
        finally:
            grid.stop.set()           # the page went away, or the grid ended: no cell keeps running
            session.finish(grid, None)

    def _run(self, grid: Job, cells: list[GridCell], base: JobSettings, image: Any) -> Iterator[tuple[Any, ...]]:
        from magcache_framepack.comparison import compare_runs

        started = time.perf_counter()
        yield self._views([], len(cells), "Running the uncached reference ...")
        reference = self._reference(grid, base, image)
        if reference.status != "done":
            yield self._views([], len(cells), f"The uncached reference did not finish: {reference.message}")
            return
        rows: dict[GridCell, GridRow] = {}
        todo = list(cells)
        running: dict[GridCell, Job] = {}
        while todo or running:
            while todo and len(running) < self.events.concurrency and not grid.stop.is_set():
                cell = todo.pop(0)
                running[cell] = self._start(grid, image, cell_settings(base, cell))
            if not running:
                break                                   # End: the cells not started are left out
            cell, result = self._wait_any(running)
            del running[cell]
            if result is None or result.status != "done" or not result.video_path:
                rows[cell] = failed_row(cell, getattr(result, "status", "error"), getattr(result, "message", ""))
            else:
                rows[cell] = scored_row(cell, compare_runs(result.video_path, reference.video_path))
            ordered = [rows[c] for c in cells if c in rows]
            yield self._views(ordered, len(cells), f"{len(ordered)} of {len(cells)} cells ...")
        ordered = [rows[c] for c in cells if c in rows]
        note = (f"Stopped: {len(ordered)} of {len(cells)} cells ran." if grid.stop.is_set() and len(ordered) < len(cells)
                else f"Done: {len(cells)} cells and the reference in {time.perf_counter() - started:.1f} s.")
        yield self._views(ordered, len(cells), note, self._export(ordered, reference, base))

    def _reference(self, grid: Job, base: JobSettings, image: Any) -> Any:
        job = self._start(grid, image, cell_settings(base, None))
        return self._wait_any({None: job})[1]

    def _export(self, rows: list[GridRow], reference: Any, base: JobSettings) -> tuple[str, str]:
        """The grid as CSV and JSON files in the outputs folder (named by the time, sortable)."""
        stem = pathlib.Path(self.events.outputs_dir) / f"grid_{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
        ref = {"video": reference.video_path, "seconds": reference.seconds,
               "settings": dataclasses.asdict(cell_settings(base, None))}
        csv_path = write_atomic(stem.with_suffix(".csv"), rows_csv(rows).encode("utf-8"))
        json_path = write_atomic(stem.with_suffix(".json"), rows_json(rows, ref).encode("utf-8"))
        return str(csv_path), str(json_path)


def grid_endpoint(events: GridEvents) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """The /grid function: the Start inputs that matter to a grid, then the three lists of values."""
    d = events.events.defaults

    def grid(input_image, prompt, n_prompt=d.n_prompt, seed=d.seed, total_second_length=d.seconds,
             latent_window_size=d.latent_window_size, steps=d.steps, cfg=d.cfg, gs=d.gs, rs=d.rs,
             gpu_memory_preservation=d.gpu_memory_preservation, mag_ratios=events.events.initial_profile,
             mp4_crf=d.crf, resample=d.resample, thresholds="0.06, 0.1, 0.15", ks="2, 3, 4", retentions="0.2",
             session=None):
        yield from events.run(input_image, prompt, n_prompt, seed, total_second_length, latent_window_size, steps,
                              cfg, gs, rs, gpu_memory_preservation, mag_ratios, mp4_crf, resample, thresholds, ks,
                              retentions, session)

    return grid
