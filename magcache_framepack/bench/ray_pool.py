"""The ``ray`` tool: what the Ray worker pool costs and gains, in tiny CPU mode.

``python magcache_bench.py ray --jobs 8 --workers 1 2 --cpus 2``

The same tiny jobs file runs on 1, 2, ... workers (one torch thread each) of a
local Ray; the table gives the wall time of the jobs against one worker, the
workers' start-up, and the driver's dispatch overhead per job.  Tiny models
keep the jobs short, so the overhead is visible next to the work.

Ray is optional: the pool (:mod:`magcache_framepack.runners.ray`) and Ray are
imported only when this tool runs, and without Ray it says what to install.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from magcache_framepack.bench.report import UsageError


def bench(jobs: int, worker_counts: Sequence[int], seconds: float, steps: int,
          cpus: int | None) -> list[dict[str, Any]]:
    """The same tiny jobs file on 1, 2, ... workers (one torch thread each) on a local Ray; one row per count.

    ``jobs_seconds`` runs from the first job handed out to the last file written (worker start-up and model
    loading are ``startup_seconds``); ``overhead`` is per job: driver wall time minus the worker's run_job time.
    """
    import numpy as np
    import ray
    from PIL import Image

    from magcache_framepack.runners.ray import ActorFactory, Batch, BatchJob, Slot, plan_jobs, start_local

    started_here = False
    if not ray.is_initialized():
        start_local(num_cpus=cpus, logging_level=logging.WARNING)
        started_here = True
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="magcache-ray-bench-") as tmp:
            root = pathlib.Path(tmp)
            rng = np.random.default_rng(0)
            Image.fromarray((rng.random((72, 96, 3)) * 255).astype(np.uint8)).save(root / "in.png")
            lines = [{"image": str(root / "in.png"), "prompt": f"bench {i}", "seed": i} for i in range(jobs)]
            (root / "jobs.jsonl").write_text("".join(json_line(line) for line in lines))
            for count in worker_counts:
                cli = {"tiny": True, "seconds": seconds, "steps": steps, "output": str(root / f"w{count}" / "v.mp4")}
                planned, known = plan_jobs(str(root / "jobs.jsonl"), cli, tiny_workers=True, resume=False)
                assert not known, known
                marks: dict[str, float] = {"begin": time.perf_counter()}

                def on_dispatch(job: BatchJob, slot: Slot) -> None:
                    marks.setdefault("first", time.perf_counter())

                batch = Batch(planned, ActorFactory("framepack", tiny=True, threads=1), count, max_retries=0,
                              on_dispatch=on_dispatch)
                outcomes = batch.run()
                end = time.perf_counter()
                if any(o.status != "done" for o in outcomes):
                    raise RuntimeError(f"bench jobs failed: {[o.message for o in outcomes if o.status != 'done']}")
                overheads = [o.overhead_seconds for o in outcomes]
                rows.append({"workers": count, "jobs": jobs, "jobs_seconds": end - marks["first"],
                             "startup_seconds": marks["first"] - marks["begin"],
                             "run_seconds_mean": sum(o.run_seconds for o in outcomes) / len(outcomes),
                             "overhead_mean": sum(overheads) / len(overheads), "overhead_max": max(overheads)})
                print(json_line(rows[-1]), end="", flush=True)
    finally:
        if started_here:
            ray.shutdown()
    return rows


def json_line(obj: Any) -> str:
    """One JSON object on one line: the rows stream out as they are measured, readable by a JSON-lines tool."""
    import json

    return json.dumps(obj) + "\n"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``ray``: its flags (those of the former ``python -m magcache_framepack.runners.ray bench``)."""
    b = subparsers.add_parser("ray", help="measure the Ray pool in tiny CPU mode: the same jobs on 1, 2, ... workers")
    b.add_argument("--jobs", type=int, default=8)
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    b.add_argument("--seconds", type=float, default=1.0)
    b.add_argument("--steps", type=int, default=8)
    b.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    # the pool logs every job at INFO; its table is this tool's output
    b.set_defaults(run=run, log_level=logging.WARNING)
    return b


def run(args: argparse.Namespace) -> int:
    """One JSON line per worker count as it is measured, then the table."""
    import platform

    from magcache_framepack.runners.ray import LocalRayRefused, require_ray

    try:
        require_ray()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    try:
        rows = bench(args.jobs, args.workers, args.seconds, args.steps, args.cpus)
    except LocalRayRefused as exc:
        raise UsageError(str(exc)) from None
    base = rows[0]["jobs_seconds"]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.jobs} tiny jobs "
          f"({args.seconds:g} s, {args.steps} steps), 1 torch thread per worker\n")
    print("| workers | wall time of the jobs | vs 1 worker | worker start-up | run_job per job | "
          "dispatch overhead per job (mean / max) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['jobs_seconds']:.1f} s | {r['jobs_seconds'] / base:.2f}x | "
              f"{r['startup_seconds']:.1f} s | {r['run_seconds_mean']:.2f} s | "
              f"{r['overhead_mean']:.3f} s / {r['overhead_max']:.3f} s |")
    return 0
