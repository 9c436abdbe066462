"""The command line: generate videos without a UI (``magcache_generate.py``).

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
(``pip install -r requirements-ray.txt``; see :mod:`.runners.ray`)::

    python magcache_generate.py --jobs jobs.jsonl --ray --output clips/clip.mp4
    python magcache_generate.py --jobs jobs.jsonl --ray auto --max-retries 2 --resume

Every video gets a JSON record beside it (``cat.mp4`` -> ``cat.json``, also in
the MP4's ``comment`` tag).  The same video again, any flag overriding the
recorded value::

    python magcache_generate.py --replay cat.json --output again.mp4
    python magcache_generate.py --replay cat.json --seed 7 --output other.mp4

Everything that generates comes from :mod:`.job` (the same code the Gradio apps
run), so a CLI video equals an app video for the same settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from magcache_framepack.settings import CACHE_MODES, PRESET_NAMES, RESAMPLE_MODES, VARIANT_NAMES
from magcache_framepack.jobfiles import (DEFAULTS, JobError, JobOutcome, OK_STATUSES, already_done, check_values,
                                         int_list, iter_job_lines, job_settings, job_values, merge_values,
                                         replay_layer, target_conflict)
from magcache_framepack.runners.local import StopOnInterrupt, run_one

logger = logging.getLogger(__name__)


def replay_line(recorded: dict[str, Any], record_path: str, video: str) -> str:
    """The line a --replay ends with: the new video's frames against the record's, read before the job ran.

    The job has finished and its files are written, so a record or video that cannot be
    read or decoded here ends the replay with a line saying so, not a traceback.
    """
    from magcache_framepack.records import read_record, replay_verdict, sidecar_path

    try:
        return replay_verdict(recorded, record_path, read_record(sidecar_path(video)), video)
    except Exception as exc:      # noqa: BLE001 - PyAV's decode errors have no common base we can name
        logger.debug("replay comparison failed", exc_info=True)
        return f"Replay: cannot compare the frames: {exc}"


def print_result(result: Any, video: str | None, out: TextIO) -> None:
    for line in result.summary_lines():
        print(line, file=out)
    if video and video != result.video_path:
        print(f"Saved as: {video}", file=out)


def program_name() -> str:
    """How the user started the CLI, for usage and error lines: the launcher, the console script or -m."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name in ("magcache_generate.py", "magcache-generate"):
        return name
    return "python -m magcache_framepack.cli" if name == "cli.py" else "magcache_generate.py"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a refusal is the one line that says what is wrong, not the usage block above it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=program_name(), description=__doc__.split("\n\n")[0],
                                epilog="Keys of a --jobs line: " + ", ".join(DEFAULTS),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every default is None: a value counts only where it was given, so a preset and
    # --jobs lines can fill in what the command line leaves open (see DEFAULTS).
    p.add_argument("--image", help="start image (PNG, JPEG, ...)")
    p.add_argument("--prompt", help="what happens in the video")
    p.add_argument("--n-prompt", help="negative prompt (used only with --cfg > 1)")
    p.add_argument("--variant", choices=VARIANT_NAMES, help="framepack (default) or f1")
    p.add_argument("--seconds", type=float, help="video length in seconds (default 5)")
    p.add_argument("--steps", type=int_list, help="sampling steps per section (default 25); with --calibrate "
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
    p.add_argument("--target-speedup", type=float, metavar="X",
                   help="plan for this speed-up (steps / computed steps, 1 to 10): the threshold, K and retention "
                        "with the least planned error that reach it; not with --magcache-*/--retention-ratio/"
                        "--preset")
    p.add_argument("--mag-ratios", metavar="FILE", help="a calibration profile (JSON) instead of the ratio "
                                                        "library's table for the job")
    p.add_argument("--resample", choices=RESAMPLE_MODES,
                   help="how a ratio table of another step count is fitted: magnitude (default) or nearest "
                        "(the MagCache reference's stretch)")
    p.add_argument("--resolutions", type=int_list, metavar="R1,R2,...",
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
    if args.ray is not None and args.jobs is None:
        parser.error("--ray runs a --jobs file: give --jobs FILE")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.max_retries < 0:
        parser.error(f"--max-retries must be 0 or more, got {args.max_retries}")
    import torch

    cuda = torch.cuda.is_available()
    cli = command_line_layer(args)
    conflict = target_conflict(cli)
    if conflict is not None:
        parser.error(conflict)
    try:
        grid = calibration_grid(args)       # refuses a grid beside --jobs or --replay
        runs = planned_runs(args, cli, grid, cuda) if args.jobs is None else []
    except JobError as exc:
        parser.error(str(exc))
    if args.jobs is None:
        return run_command_line_jobs(args, runs, parser)
    if args.replay is not None:
        parser.error("--replay and --jobs do not go together: replay one record at a time")
    if not os.path.isfile(args.jobs):
        parser.error(f"--jobs: file not found: {args.jobs}")
    if args.ray is not None:
        return run_on_ray(args, cli)
    return run_jobs_file(args, cli, cuda)


def planned_runs(args: argparse.Namespace, cli: dict[str, Any], grid: list[tuple[int | None, int | None]],
                 cuda: bool) -> list[dict[str, Any]]:
    """The checked values of each job the command line asks for: one, or one per calibration grid point.

    Everything is checked here, before any model loads (JobError says what is wrong).
    """
    layers = [cli]
    if args.replay is not None:
        layers = [replay_layer(args.replay, image_given="image" in cli), cli]
        record = pathlib.Path(args.replay).resolve()
        kept = {record.with_suffix(".json"), record.with_suffix(".mp4")}
        output = cli.get("output")
        if output is not None and {pathlib.Path(output).resolve().with_suffix(s) for s in (".json", ".mp4")} & kept:
            raise JobError(f"--output {output} would overwrite the record being replayed ({args.replay}) and "
                           "the replay could not be compared with it: give another --output")
    base = merge_values(*layers)
    runs = []
    for resolution, steps in grid:
        values = dict(base)
        if resolution is not None or steps is not None:
            values.update(resolution=resolution or base["resolution"], steps=steps or base["steps"])
            values["output"] = grid_output(values["output"], values["resolution"], values["steps"])
        check_values(values, cuda)
        job_settings(values)
        runs.append(values)
    return runs


def run_command_line_jobs(args: argparse.Namespace, runs: list[dict[str, Any]],
                          parser: argparse.ArgumentParser) -> int:
    """Run the command line's job(s) in this process; 1 if any did not finish, or a stop was asked for."""
    from magcache_framepack.records import read_record

    recorded = read_record(args.replay) if args.replay is not None else None     # before the job writes anything
    models_cache: dict[tuple[str, bool], Any] = {}
    stop = StopOnInterrupt()
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
            if recorded is not None and result.status == "done" and video:
                print(replay_line(recorded, args.replay, video), flush=True)
    return 1 if failed or stop.requested else 0


def run_jobs_file(args: argparse.Namespace, cli: dict[str, Any], cuda: bool) -> int:
    """``--jobs FILE`` in this process: each line a job; a bad or failing line is reported and the next runs."""
    models_cache: dict[tuple[str, bool], Any] = {}
    stop = StopOnInterrupt()
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
                logger.error("job at line %d refused: %s", number, exc)
            except Exception as exc:   # whatever one job hits, the next one runs (Ctrl-C is no Exception: it stops)
                logger.exception("job at line %d failed", number)
                outcomes.append(JobOutcome(number, "error", f"{type(exc).__name__}: {exc}"))
            else:
                print_result(result, video, sys.stdout)
                outcomes.append(JobOutcome(number, result.status, result.message, video))
    return report_outcomes(outcomes, args.jobs, sys.stdout)


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




def run_on_ray(args: argparse.Namespace, cli: dict[str, Any]) -> int:
    """``--jobs FILE --ray [ADDRESS]``: the same jobs on a pool of Ray workers; returns the exit code."""
    try:
        from magcache_framepack.runners.ray import require_ray
        require_ray()
    except ImportError as exc:
        print(f"{program_name()}: --ray: {exc}", file=sys.stderr)
        return 2
    import ray
    from tqdm import tqdm

    from magcache_framepack.runners.ray import ActorFactory, Batch, BatchOutcome, connect, plan_jobs, worker_count

    base = merge_values(cli)
    tiny = bool(base["tiny"])
    jobs, known = plan_jobs(args.jobs, cli, tiny, args.resume)
    outcomes: list[Any] = list(known)
    if jobs:
        stop = StopOnInterrupt()
        try:
            started = connect(args.ray, verbose=args.verbose)
        except (RuntimeError, ConnectionError) as exc:
            print(f"{program_name()}: --ray {args.ray}: cannot start or join Ray: {exc}", file=sys.stderr)
            return 2
        try:
            try:
                workers = worker_count(tiny, args.workers)
            except RuntimeError as exc:
                print(f"{program_name()}: --ray: {exc}", file=sys.stderr)
                return 2
            print(f"{len(jobs)} job(s) on {min(workers, len(jobs))} Ray worker(s)"
                  + (" (tiny, CPU)" if tiny else " (one GPU each)"), flush=True)
            bar = tqdm(total=len(jobs), desc="jobs", unit="job", disable=args.no_progress, file=sys.stderr)

            def on_outcome(o: BatchOutcome) -> None:
                where = f" on worker {o.worker} in {o.wall_seconds:.1f} s" if o.worker is not None else ""
                tqdm.write(f"line {o.line}: {o.status}{where}"
                           + (f" (attempt {o.attempts})" if o.attempts > 1 else "")
                           + (f" -> {o.video}" if o.video else f": {o.message}"), file=sys.stdout)
                bar.update(1)

            factory = ActorFactory(base["variant"], tiny, threads=1)
            batch = Batch(jobs, factory, workers, args.max_retries, should_stop=stop, on_outcome=on_outcome)
            with stop.installed():
                try:
                    batch.run()
                except KeyboardInterrupt:    # the second Ctrl-C: drop what runs; only whole files were written
                    finished = {o.line for o in batch.outcomes}
                    batch.outcomes += [BatchOutcome(j.line, "stopped", "aborted (Ctrl-C twice): nothing written")
                                       for j in jobs if j.line not in finished]
            done = batch.outcomes
            bar.close()
        finally:
            if started:
                ray.shutdown()
        outcomes += [JobOutcome(o.line, o.status, o.message, o.video) for o in done]
        ran = [o for o in done if o.status == "done"]
        if ran:
            overhead = sum(o.overhead_seconds for o in ran) / len(ran)
            print(f"dispatch overhead: {overhead:.3f} s per job on average (wall time per job minus its run_job "
                  "time)")
    outcomes.sort(key=lambda o: o.line)
    return report_outcomes(outcomes, args.jobs, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
