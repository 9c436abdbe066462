"""MagCache for FramePack on Ray: many videos on many GPUs, nothing lost.

Two users of one worker pool:

* ``magcache_generate.py --jobs FILE --ray [ADDRESS]`` (:func:`magcache_framepack.cli.run_on_ray`): one
  worker actor per GPU (``--tiny``: ``--workers N`` CPU actors, default 2) loads
  the models once and runs jobs one after another; the driver hands each job to
  whichever worker is free, and writes each MP4 and its JSON record on its own
  disk under the names the single-process ``--jobs`` mode uses.  The bytes come
  back through Ray, so no shared file system is needed.
* ``magcache_demo_gradio.py --ray [ADDRESS]`` (:class:`AppRunner`): the app's job
  thread sends the job to a free worker and streams its progress, previews and
  section videos back to the page; End is forwarded to that worker only.

Failures: a job whose worker dies (process killed, node lost, CUDA out of
memory) runs again on a fresh worker, at most ``--max-retries`` more times,
then it is reported failed with the reason while the other jobs go on.  A job
that fails by itself (bad settings, a refused profile, an error inside the
pipeline) is reported at once and not retried: it would fail the same way.
Files appear only whole (temporary name, then rename).

``magcache_bench.py ray`` (:mod:`magcache_framepack.bench.ray_pool`) measures
what the pool costs and gains.

This module is imported only when ``--ray`` (or that benchmark) is used; it
imports ``ray`` at the top but works (to say what to install) without it:
:func:`require_ray`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pathlib
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

try:
    import ray
    from ray.exceptions import (NodeDiedError, ObjectLostError, OwnerDiedError, RayActorError, RayTaskError,
                                WorkerCrashedError)
except ImportError:       # optional dependency: require_ray() says how to install it
    ray = None

from magcache_framepack.records import image_record, publish_new, sidecar_path, write_atomic




logger = logging.getLogger(__name__)


INSTALL = "pip install -r requirements-ray.txt"


#: Errors that mean "the worker (or its node) is gone", not "the job failed": the job runs again elsewhere.
WORKER_LOST = () if ray is None else (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError,
                                      OwnerDiedError)


#: The start of run_job's message for CUDA out of memory: the worker is replaced and the job runs again.
OOM_MESSAGE = "CUDA out of memory"


#: Test hook, documented in tests/test_ray.py: a worker whose job has this prompt kills its own process.
CRASH_PROMPT_ENV = "MAGCACHE_RAY_TEST_CRASH_PROMPT"


#: How often the app's job thread asks its worker for progress, in seconds.
POLL_SECONDS = 0.2


def require_ray() -> None:
    if ray is None:
        raise ImportError(f"Ray is not installed. Install it with: {INSTALL}")


class JobWorker:
    """One Ray actor: loads the models once, runs jobs one after another, each in a temp folder of its own.

    Methods other than :meth:`run` (``poll``, ``stop``, ``ready``) answer while a
    job runs: the actor is created with ``max_concurrency`` > 1.
    """

    def __init__(self, index: int, variant: str, tiny: bool, threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.index = index
        self.models: dict[tuple[str, bool], Any] = {}
        self._lock = threading.Lock()
        self._token: str | None = None
        self._stop = False
        self._stream = False
        self._events: list[tuple[Any, ...]] = []
        started = time.perf_counter()
        self._models(variant, tiny)
        self.load_seconds = time.perf_counter() - started

    def _models(self, variant: str, tiny: bool) -> Any:
        from magcache_framepack.models import load_models

        key = (variant, tiny)
        if key not in self.models:
            if not tiny:     # one set of real models per GPU: drop the other variant's first
                self.models = {k: v for k, v in self.models.items() if k[1]}
            self.models[key] = load_models(variant, tiny=tiny)
        return self.models[key]

    def ready(self) -> dict[str, Any]:
        import torch

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "gpus": list(ray.get_gpu_ids()),
                "load_seconds": self.load_seconds, "threads": torch.get_num_threads()}

    def stop(self, token: str) -> bool:
        """End the job ``token`` at its next step; a stale token (a finished job's) does nothing."""
        with self._lock:
            if self._token == token:
                self._stop = True
                return True
            return False

    def poll(self, token: str) -> list[tuple[Any, ...]]:
        """The events of job ``token`` since the last poll: ("progress", update), ("section", report, files)."""
        with self._lock:
            if self._token != token:
                return []
            events, self._events = self._events, []
            return events

    def _post(self, event: tuple[Any, ...]) -> None:
        with self._lock:
            if not self._stream:
                return
            if event[0] == "progress" and self._events and self._events[-1][0] == "progress":
                self._events[-1] = event      # only the newest preview travels
            else:
                self._events.append(event)

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run one job (see :func:`make_task`); returns the JobResult and the files it made, as bytes."""
        from magcache_framepack.jobfiles import job_settings
        from magcache_framepack.job import read_image, run_job

        values = dict(task["values"])
        if os.environ.get(CRASH_PROMPT_ENV) and values["prompt"] == os.environ[CRASH_PROMPT_ENV]:
            os._exit(3)       # test hook: this worker dies as a killed or crashed one would
        # per job, removed when it ends: an actor is ended by ray.kill, which runs no cleanup of its own
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"magcache-ray-{self.index}-"))
        with self._lock:
            self._token, self._stop, self._stream, self._events = task["token"], False, task["stream"], []
        try:
            image_path = work / task["image_name"]
            image_path.write_bytes(task["image"])
            if task.get("profile") is not None:
                values["mag_ratios"] = str(_local_copy(values["mag_ratios"], task["profile"], work))
            settings = job_settings(values)
            image = read_image(image_path)
            load_started = time.perf_counter()
            models = self._models(values["variant"], values["tiny"])
            load_seconds = time.perf_counter() - load_started
            outputs = work / "outputs"

            def on_section(report: Any) -> None:
                if self._stream:
                    self._post(("section", report, _video_files(report.video_path)))

            started = time.perf_counter()
            result = run_job(
                models, image, settings, outputs_dir=outputs, profiles_dir=work / "profiles",
                on_progress=lambda update: self._post(("progress", update)), on_section=on_section,
                should_stop=lambda: self._stop, image_path=image_path, image_info=task["image_info"])
            run_seconds = time.perf_counter() - started
            files = _video_files(result.video_path) if result.video_path else {}
            profile = None
            if result.profile_path:
                profile = (pathlib.Path(result.profile_path).name, pathlib.Path(result.profile_path).read_bytes())
            return {"result": result, "files": files, "profile": profile, "run_seconds": run_seconds,
                    "load_seconds": load_seconds, "worker": self.index, "pid": os.getpid()}
        finally:
            with self._lock:
                self._token, self._stream = None, False
            shutil.rmtree(work, ignore_errors=True)


def _video_files(video: str) -> dict[str, bytes]:
    """An MP4 and its JSON record, by file name (the JSON first: the order the driver writes them)."""
    sidecar = sidecar_path(video)
    return {sidecar.name: sidecar.read_bytes(), pathlib.Path(video).name: pathlib.Path(video).read_bytes()}


def _local_copy(path: str, data: bytes, work: pathlib.Path) -> pathlib.Path:
    """The driver's file at ``path`` if this worker sees the same bytes there (same machine, or a shared
    folder at the same path), else a copy in ``work`` (the video's record then names the copy)."""
    p = pathlib.Path(path)
    try:
        if p.is_file() and p.read_bytes() == data:
            return p
    except OSError:
        pass
    copy = work / p.name
    copy.write_bytes(data)
    return copy


def make_task(values: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    """What travels to a worker for one job: its values, the image's bytes and record entry, a profile's bytes."""
    image = pathlib.Path(values["image"])
    task = {"token": uuid.uuid4().hex, "values": dict(values), "stream": stream, "image_name": image.name,
            "image": image.read_bytes(), "image_info": image_record(image), "profile": None}
    if values.get("mag_ratios"):      # the path stays as given: the record names it as a local run's does
        task["profile"] = pathlib.Path(values["mag_ratios"]).read_bytes()
    return task


#: The one address a local Ray (``--ray`` without an address, the bench, the tests) listens on.
LOOPBACK = "127.0.0.1"


class LocalRayRefused(RuntimeError):
    """A local Ray would listen beyond loopback without Ray's token authentication: it is not (or no longer) up."""


def local_ray_refusal(address: str, token_auth: bool) -> str | None:
    """Why a local Ray whose node address is ``address`` must not run; None when it may.

    On loopback nothing outside this machine can reach it.  Any other address is
    reachable from the network, and a Ray port runs whatever code it is sent, so
    that is allowed only behind Ray's token authentication.
    """
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if ip is not None and ip.is_loopback:
        return None
    if token_auth:
        return None
    return (f"not starting a local Ray: it would listen on {address}, beyond loopback, without Ray's token "
            "authentication (that needs RAY_AUTH_MODE=token and a Ray that has it)")


def _token_auth_on(before_start: bool = False) -> bool:
    """Whether Ray's token authentication is on in this process (False for a Ray that has none).

    ``before_start``: whether it will be on for the Ray about to start, by RAY_AUTH_MODE.
    """
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return False
    if before_start:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return bool(is_token_auth_enabled())


@contextlib.contextmanager
def _loopback_node_address() -> Any:
    """While a local Ray starts, let it keep 127.0.0.1 as its node address; yields whether that was possible.

    Why: every Ray component binds to the node address (GCS, raylet, object manager,
    each worker, the driver's own port, the runtime-env agent), but on Linux
    ``ray.init(_node_ip_address="127.0.0.1")`` swaps loopback for the machine's
    own address (services.resolve_ip_for_localhost), unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is off.  The switch is off only for the
    start, and put back after; joining a cluster never passes here.
    """
    try:
        from ray._private import ray_constants
    except ImportError:
        ray_constants = None
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield False
        return
    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield True
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


def start_local(num_cpus: int | None = None, num_gpus: int | None = None, verbose: bool = False,
                logging_level: int = logging.INFO) -> str:
    """Start Ray on this machine, every port on loopback; returns the node address it listens on.

    Where this Ray cannot be held to loopback, it runs only with Ray's token
    authentication (RAY_AUTH_MODE=token is set here when it is unset), else
    :class:`LocalRayRefused` says why, before Ray starts or right after.
    """
    require_ray()
    with _loopback_node_address() as pinned:
        if not pinned:
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            refusal = local_ray_refusal("the machine's own address", _token_auth_on(before_start=True))
            if refusal:
                raise LocalRayRefused(refusal)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                 log_to_driver=verbose, logging_level=logging_level)
    address = ray.util.get_node_ip_address()
    auth = _token_auth_on()
    refusal = local_ray_refusal(address, auth)
    if refusal:
        ray.shutdown()
        raise LocalRayRefused(refusal)
    if local_ray_refusal(address, token_auth=False):
        logger.warning("Local Ray listens on %s, beyond loopback, behind Ray's token authentication", address)
    else:
        logger.info("Local Ray: every port on %s (token authentication %s)", address, "on" if auth else "off")
    return address


def connect(address: str, verbose: bool = False) -> bool:
    """Ray up: an existing session is used as is; "local" starts one on this machine; else join ``address``.

    Returns True when this call started or joined Ray (so the caller shuts it down).
    """
    require_ray()
    if ray.is_initialized():
        return False
    if address == "local":
        start_local(verbose=verbose)
    else:
        ray.init(address=address, log_to_driver=verbose)
    return True


def worker_count(tiny: bool, workers: int | None) -> int:
    """How many workers to start: ``workers`` (default 2) CPU workers when tiny, else one per GPU of the cluster."""
    if tiny:
        return workers or 2
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise RuntimeError("the Ray cluster has no GPU; the real models need one per worker "
                           "(use --tiny for CPU workers with tiny random models)")
    return min(workers or gpus, gpus)


@dataclasses.dataclass
class Slot:
    """One worker actor of the pool and what the driver knows of it."""

    index: int
    actor: Any
    ready_ref: Any
    pid: int | None = None


class ActorFactory:
    """Starts worker actors: one GPU each, or (tiny) one CPU and ``threads`` torch threads each."""

    def __init__(self, variant: str, tiny: bool, threads: int | None = 1) -> None:
        self.variant, self.tiny, self.threads = variant, tiny, threads
        resources = {"num_cpus": 1, "num_gpus": 0} if tiny else {"num_cpus": 1, "num_gpus": 1}
        self.remote = ray.remote(JobWorker).options(max_concurrency=4, **resources)

    def start(self, index: int) -> Slot:
        actor = self.remote.remote(index, self.variant, self.tiny, self.threads if self.tiny else None)
        return Slot(index=index, actor=actor, ready_ref=actor.ready.remote())

    def replace(self, slot: Slot) -> Slot:
        ray.kill(slot.actor, no_restart=True)
        return self.start(slot.index)


def describe_loss(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"


@dataclasses.dataclass
class BatchJob:
    line: int
    values: dict[str, Any]
    losses: list[str] = dataclasses.field(default_factory=list)    # why each earlier attempt's worker was lost
    submitted: float = 0.0


@dataclasses.dataclass
class BatchOutcome:
    """How one job ended, with where and how long (the CLI's JobOutcome plus Ray's figures)."""

    line: int
    status: str
    message: str
    video: str | None = None
    attempts: int = 0
    worker: int | None = None
    wall_seconds: float = 0.0       # driver: handed to a worker -> files written
    run_seconds: float = 0.0        # worker: inside run_job

    @property
    def overhead_seconds(self) -> float:
        """Time the job spent outside the pipeline: transfer, scheduling, driver writes."""
        return self.wall_seconds - self.run_seconds


def output_path(values: dict[str, Any], video_name: str) -> pathlib.Path:
    """Where the driver writes a job's video: its --output (x-lineN.mp4), else outputs_dir/<the pipeline's name>."""
    return pathlib.Path(values["output"]) if values["output"] else pathlib.Path(values["outputs_dir"]) / video_name


def write_result_files(files: dict[str, bytes], video_name: str, target: pathlib.Path) -> None:
    """The worker's MP4 and JSON under ``target`` (and its .json), each whole: JSON first, the MP4 last."""
    sidecar = sidecar_path(video_name).name
    write_atomic(sidecar_path(target), files[sidecar])
    write_atomic(target, files[video_name])


class Batch:
    """The driver loop: a free worker gets the next job; lost workers are replaced and their job requeued."""

    def __init__(self, jobs: Sequence[BatchJob], factory: ActorFactory, workers: int, max_retries: int,
                 should_stop: Callable[[], bool] = lambda: False,
                 on_dispatch: Callable[[BatchJob, Slot], None] | None = None,
                 on_outcome: Callable[[BatchOutcome], None] | None = None) -> None:
        self.pending = collections.deque(jobs)
        self.factory = factory
        self.workers = max(1, min(workers, len(jobs)))
        self.max_retries = max_retries
        self.should_stop = should_stop
        self.on_dispatch = on_dispatch
        self.on_outcome = on_outcome
        self.outcomes: list[BatchOutcome] = []
        self.start_failures = 0

    def finish(self, outcome: BatchOutcome) -> None:
        self.outcomes.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def run(self) -> list[BatchOutcome]:
        starting: dict[Any, Slot] = {}
        running: dict[Any, tuple[Slot, BatchJob, str]] = {}
        idle: list[Slot] = []
        stopping = False
        try:
            for index in range(self.workers):
                slot = self.factory.start(index)
                starting[slot.ready_ref] = slot
            while self.pending or running:
                if self.should_stop() and not stopping:
                    stopping = True
                    for slot, job, token in running.values():
                        slot.actor.stop.remote(token)
                    while self.pending:
                        job = self.pending.popleft()
                        self.finish(BatchOutcome(job.line, "stopped", "not started: stop requested",
                                                 attempts=len(job.losses)))
                while idle and self.pending and not stopping:
                    slot, job = idle.pop(0), self.pending.popleft()
                    task = make_task(job.values)
                    job.submitted = time.perf_counter()
                    running[slot.actor.run.remote(task)] = (slot, job, task["token"])
                    if self.on_dispatch is not None:
                        self.on_dispatch(job, slot)
                if not running and not starting:
                    while self.pending:     # no worker could be started: say so for every job left
                        job = self.pending.popleft()
                        self.finish(BatchOutcome(job.line, "error", "no Ray worker could be started "
                                                 f"({self.start_failures} tries); see the log"))
                    break
                done, _ = ray.wait([*starting, *running], num_returns=1, timeout=0.5)
                for ref in done:
                    if ref in starting:
                        self._started(starting.pop(ref), starting, idle)
                    else:
                        slot, job, _token = running.pop(ref)
                        self._returned(ref, slot, job, starting, idle)
        finally:
            for slot in [*starting.values(), *[s for s, _, _ in running.values()], *idle]:
                ray.kill(slot.actor, no_restart=True)
        return self.outcomes

    def _started(self, slot: Slot, starting: dict[Any, Slot], idle: list[Slot]) -> None:
        try:
            info = ray.get(slot.ready_ref)
        except WORKER_LOST + (RayTaskError,) as exc:
            self.start_failures += 1
            logger.error("Ray worker %d did not start: %s", slot.index, describe_loss(exc))
            if self.start_failures <= 2 * self.workers:
                new = self.factory.replace(slot)
                starting[new.ready_ref] = new
            return
        slot.pid = info["pid"]
        logger.info("Ray worker %d ready: pid %s on %s, GPUs %s, models loaded in %.1f s", slot.index, info["pid"],
                    info["node"], info["gpus"] or "none", info["load_seconds"])
        idle.append(slot)

    def _returned(self, ref: Any, slot: Slot, job: BatchJob, starting: dict[Any, Slot], idle: list[Slot]) -> None:
        try:
            out = ray.get(ref)
        except WORKER_LOST as exc:
            self._lost(job, slot, describe_loss(exc), starting)
            return
        except RayTaskError as exc:   # the job raised (its values): the worker itself is fine
            idle.append(slot)
            self.finish(BatchOutcome(job.line, "error", describe_loss(exc.cause or exc),
                                     attempts=len(job.losses) + 1, worker=slot.index))
            return
        result = out["result"]
        if result.status == "error" and result.message.startswith(OOM_MESSAGE):
            self._lost(job, slot, result.message, starting)      # a fresh worker, and the job again
            return
        idle.append(slot)
        outcome = BatchOutcome(job.line, result.status, result.message, attempts=len(job.losses) + 1,
                               worker=slot.index, run_seconds=out["run_seconds"])
        if result.status == "done":
            video_name = pathlib.Path(result.video_path).name
            target = output_path(job.values, video_name)
            write_result_files(out["files"], video_name, target)
            outcome.video = str(target)
            if out["profile"] is not None:
                save_profile(pathlib.Path(job.values["profiles_dir"]), *out["profile"])
        elif result.status == "stopped":
            outcome.message += " Nothing was written (a stopped job runs again with --resume)."
        outcome.wall_seconds = time.perf_counter() - job.submitted
        self.finish(outcome)

    def _lost(self, job: BatchJob, slot: Slot, reason: str, starting: dict[Any, Slot]) -> None:
        job.losses.append(reason)
        logger.warning("job at line %d: its worker %d was lost (%s)", job.line, slot.index, reason)
        new = self.factory.replace(slot)
        starting[new.ready_ref] = new
        if len(job.losses) <= self.max_retries and not self.should_stop():
            self.pending.appendleft(job)
        else:
            self.finish(BatchOutcome(job.line, "error", f"failed {len(job.losses)} time(s), its worker lost each "
                                     f"time (--max-retries {self.max_retries}); last: {reason}",
                                     attempts=len(job.losses), worker=slot.index))


def plan_jobs(path: str, cli: dict[str, Any], tiny_workers: bool, resume: bool) -> tuple[list[BatchJob], list[Any]]:
    """The jobs file as jobs to run, and the outcomes already known (refused lines, --resume skips)."""
    from magcache_framepack.jobfiles import JobError, JobOutcome, already_done, iter_job_lines, job_values

    jobs: list[BatchJob] = []
    known: list[Any] = []
    for number, text in iter_job_lines(path):
        try:
            # the driver needs no GPU: the workers do, and the pool checks for them
            values = job_values(number, text, cli, cuda_available=True)
            if tiny_workers and not values["tiny"]:
                raise JobError("this job needs the real models, and the workers are --tiny CPU workers; "
                                   "run without --tiny on GPUs, or set \"tiny\": true")
        except JobError as exc:
            logger.error("job at line %d refused: %s", number, exc)
            known.append(JobOutcome(number, "invalid", str(exc)))
            continue
        if resume and already_done(values):
            known.append(JobOutcome(number, "skipped", "already done (--resume)", values["output"]))
            continue
        jobs.append(BatchJob(number, values))
    return jobs, known


class AppRunner:
    """``runner(job, image, settings, outputs_dir, profiles_dir)`` for the app's build_ui, on Ray workers.

    Keeps the in-process job thread's contract: events ("waiting", None),
    ("progress", ProgressUpdate), ("section", SectionReport) and always a final
    ("done", JobResult) on ``job.events``; ``job.stop`` ends the job on its worker.
    ``concurrency`` jobs run at once (one per worker); the app queues the rest.
    A job whose worker dies runs again on a fresh one, at most ``max_retries`` more times (the
    CLI's rule, :class:`Batch`); a ("retry", text) event tells the page, and the result's
    message says that it ran again.
    """

    def __init__(self, variant: str, tiny: bool, workers: int, threads: int | None = 1, max_retries: int = 1) -> None:
        self.variant, self.tiny = variant, tiny
        self.max_retries = max_retries
        self.factory = ActorFactory(variant, tiny, threads=threads)
        self.concurrency = workers
        self.idle: queue.Queue[Slot] = queue.Queue()
        #: (worker index, start, end) of each job run, perf_counter seconds
        self.history: list[tuple[int, float, float]] = []
        slots = [self.factory.start(i) for i in range(workers)]
        for slot in slots:
            slot.pid = ray.get(slot.ready_ref)["pid"]
            self.idle.put(slot)

    def close(self) -> None:
        while True:
            try:
                ray.kill(self.idle.get_nowait().actor, no_restart=True)
            except queue.Empty:
                return

    def _take(self, job: Any) -> Slot | None:
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            job.events.put(("waiting", None))
        while not job.stop.is_set():
            try:
                return self.idle.get(timeout=0.25)
            except queue.Empty:
                continue
        return None

    def __call__(self, job: Any, image: Any, settings: Any, outputs_dir: str, profiles_dir: str) -> None:
        from magcache_framepack.job import JobResult

        started = time.perf_counter()
        result = None
        slot = None
        try:
            slot = self._take(job)
            if slot is None:
                result = JobResult(status="stopped", message="Stopped before it started "
                                                     "(End was pressed).", seconds=time.perf_counter() - started)
                return
            result, slot = self._run(slot, job, image, settings, pathlib.Path(outputs_dir), pathlib.Path(profiles_dir))
        except Exception as exc:  # noqa: BLE001 - the page waits for a final event, whatever happened
            logger.exception("Ray job failed unexpectedly")
            result = JobResult(status="error", message=f"Unexpected error: {type(exc).__name__}: "
                                                 f"{exc}", seconds=time.perf_counter() - started)
        finally:
            if slot is not None:
                self.idle.put(slot)
            job.events.put(("done", result))

    def _run(self, slot: Slot, job: Any, image: Any, settings: Any, outputs: pathlib.Path,
             profiles: pathlib.Path) -> tuple[Any, Slot]:
        from magcache_framepack.job import JobResult, input_file, prepare_input_image

        # the input kept in the app's outputs folder, once per distinct image and only with a video (as an
        # in-process job keeps it): the record names that file, the worker gets its bytes
        try:
            kept = input_file(outputs, prepare_input_image(image))
        except ValueError as exc:
            return JobResult(status="error", message=str(exc)), slot
        values = dataclasses.asdict(settings)
        losses: list[str] = []
        while True:
            task = self._task(kept, values)
            started = time.perf_counter()
            try:
                out = self._attempt(slot, job, task, outputs, kept)
                result = out["result"]
                if not (result.status == "error" and result.message.startswith(OOM_MESSAGE)):
                    break
                reason = result.message          # CUDA out of memory: a fresh worker, as the CLI does
            except WORKER_LOST as exc:
                reason = describe_loss(exc)
            except RayTaskError as exc:    # the job raised on the worker (its values); the worker is fine
                return JobResult(status="error", message=describe_loss(exc.cause or exc)), slot
            losses.append(reason)
            logger.error("the Ray worker %d running a job was lost: %s; replacing it", slot.index, reason)
            slot = self.factory.replace(slot)
            slot.pid = ray.get(slot.ready_ref)["pid"]
            if len(losses) > self.max_retries or job.stop.is_set():
                return JobResult(status="error", message=lost_message(losses, self.max_retries)), slot
            job.events.put(("retry", (f"The Ray worker running this job was lost ({reason}); running it again "
                                      f"on a fresh worker (retry {len(losses)} of {self.max_retries}).")))
        self.history.append((slot.index, started, time.perf_counter()))
        if losses:
            result.message += (f" It ran again after its Ray worker was lost {len(losses)} time(s) "
                               f"(last: {losses[-1]}).")
        for section in result.sections:
            section.video_path = str(outputs / pathlib.Path(section.video_path).name)
        if out["files"]:
            kept.write()
            result.video_path = str(_write_files(out["files"], outputs))
        elif result.video_path:
            result.video_path = str(outputs / pathlib.Path(result.video_path).name)
        if out["profile"] is not None:
            result.profile_path = str(save_profile(profiles, *out["profile"]))
        return result, slot

    def _task(self, kept: Any, values: dict[str, Any]) -> dict[str, Any]:
        """One try's task: the settings, and the kept input image's bytes (the record names the kept file)."""
        with tempfile.TemporaryDirectory() as staging:
            image_file = pathlib.Path(staging) / kept.path.name
            image_file.write_bytes(kept.data)
            task = make_task({**values, "image": str(image_file), "variant": self.variant, "tiny": self.tiny},
                             stream=True)
        task["image_info"] = kept.record()
        return task

    @staticmethod
    def _attempt(slot: Slot, job: Any, task: dict[str, Any], outputs: pathlib.Path, kept: Any) -> dict[str, Any]:
        """Run ``task`` on ``slot``'s worker, forwarding its events to the page; what the worker returned.

        ``kept`` (the input image kept in ``outputs``) is written with the first video that arrives.

        Raises what ``ray.get`` raises: a lost worker (WORKER_LOST) or the job's own error (RayTaskError).
        """
        ref = slot.actor.run.remote(task)
        stop_sent = False

        def forward(events: list[tuple[Any, ...]]) -> None:
            for event in events:
                if event[0] == "section":
                    _, report, files = event
                    kept.write()
                    report.video_path = str(_write_files(files, outputs))
                    job.events.put(("section", report))
                else:
                    job.events.put(event)

        while not ray.wait([ref], timeout=POLL_SECONDS)[0]:
            if job.stop.is_set() and not stop_sent:
                slot.actor.stop.remote(task["token"])
                stop_sent = True
            forward(ray.get(slot.actor.poll.remote(task["token"])))
        forward(ray.get(slot.actor.poll.remote(task["token"])))
        return ray.get(ref)


def lost_message(losses: Sequence[str], max_retries: int) -> str:
    """Why a job failed when its worker was lost on every try (as the CLI's line says it)."""
    return (f"Failed {len(losses)} time(s), its Ray worker lost each time (--max-retries {max_retries}); "
            f"last: {losses[-1]}. The worker has been replaced: press Start to try again.")


def save_profile(folder: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    """A profile a worker made, saved in ``folder`` under its name, or with ``-2`` ... added when another
    job's profile of the same minute has it (workers name them apart from each other)."""
    staged = write_atomic(folder / f".{name}.{uuid.uuid4().hex}.staged", data)
    return publish_new(staged, folder / name)


def _write_files(files: dict[str, bytes], folder: pathlib.Path) -> pathlib.Path:
    """Write an MP4 and its JSON (as _video_files gives them) into ``folder``; returns the MP4's path."""
    video = next(name for name in files if name.endswith(".mp4"))
    write_result_files(files, video, folder / video)
    return folder / video


def start_app_runner(address: str, variant: str, tiny: bool, workers: int | None,
                     max_retries: int = 1) -> AppRunner:
    """Ray up, and the app's worker pool: one worker per GPU (tiny: ``workers`` CPU workers, default 2).

    A job whose worker dies runs again up to ``max_retries`` more times (the app's --max-retries).
    """
    connect(address)
    count = worker_count(tiny, workers)
    logger.info("Starting %d Ray worker(s) for the app%s ...", count, " (tiny, CPU)" if tiny else "")
    return AppRunner(variant, tiny, count, max_retries=max_retries)
