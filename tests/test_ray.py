"""Jobs on Ray workers (magcache_framepack.runners.ray): same videos as one process, nothing lost, the shared app.

Everything runs on a local Ray started here, limited to this machine's 2 CPUs
and bound to loopback; no other host is contacted.  Workers are tiny CPU workers
with one torch thread each.

Test hook (the only one): a worker whose job's prompt equals the environment
variable ``MAGCACHE_RAY_TEST_CRASH_PROMPT`` exits its process at once, as a
killed or crashed worker does (CRASH_PROMPT_ENV).  It is set here
before Ray starts, so the workers inherit it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import signal
import tempfile
import threading
import time
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")

from magcache_framepack.cli import main
from magcache_framepack.runners.ray import (ActorFactory, AppRunner, Batch, BatchJob, CRASH_PROMPT_ENV, Slot,
                                            plan_jobs, start_local, worker_count)

pytestmark = pytest.mark.slow

CRASH_PROMPT = "this job kills its worker"
JOB_FLAGS = ["--tiny", "--seconds", "1", "--steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def local_ray() -> Any:
    old = os.environ.get(CRASH_PROMPT_ENV)
    os.environ[CRASH_PROMPT_ENV] = CRASH_PROMPT      # inherited by the workers Ray starts
    start_local(num_cpus=2, num_gpus=0, logging_level=logging.WARNING)     # as --ray starts it: loopback only
    try:
        yield ray
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop(CRASH_PROMPT_ENV, None)
        else:
            os.environ[CRASH_PROMPT_ENV] = old


def make_image(path: pathlib.Path, seed: int) -> pathlib.Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((72, 96, 3)) * 255).astype(np.uint8)).save(path)
    return path


def frames(path: pathlib.Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def comment(path: pathlib.Path) -> str:
    import av

    with av.open(str(path)) as c:
        return c.metadata["comment"]


def write_jobs(path: pathlib.Path, lines: list[dict[str, Any]]) -> pathlib.Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def four_jobs(tmp_path_factory: pytest.TempPathFactory, local_ray: Any) -> dict[str, Any]:
    """One jobs file (two images, four seeds) run once by one process and once on 2 Ray workers."""
    root = tmp_path_factory.mktemp("four")
    images = [make_image(root / f"in{i}.png", i) for i in range(2)]
    jobs = write_jobs(root / "jobs.jsonl", [
        {"image": str(images[i % 2]), "prompt": f"clip {i}", "seed": 100 + i} for i in range(4)])
    single = main(["--jobs", str(jobs), *JOB_FLAGS, "--output", str(root / "single" / "v.mp4"),
                       "--outputs-dir", str(root / "single-outputs")])
    workers_temp = pathlib.Path(ray.get(ray.remote(tempfile.gettempdir).remote()))
    temp_before = set(workers_temp.glob("magcache-ray-*"))
    started = time.perf_counter()
    on_ray = main(["--jobs", str(jobs), *JOB_FLAGS, "--ray", "--workers", "2",
                       "--output", str(root / "ray" / "v.mp4"), "--outputs-dir", str(root / "ray-outputs")])
    return {"root": root, "jobs": jobs, "images": images, "rc": (single, on_ray),
            "ray_seconds": time.perf_counter() - started,
            "temp_left": set(workers_temp.glob("magcache-ray-*")) - temp_before}


def test_four_jobs_on_two_workers_equal_the_single_process_run(four_jobs: dict[str, Any]) -> None:
    root = four_jobs["root"]
    assert four_jobs["rc"] == (0, 0)
    # only the final files, under the single-process names; nothing half-written, nothing else
    assert sorted(p.name for p in (root / "ray").iterdir()) == \
        sorted(f"v-line{n}.{ext}" for n in range(1, 5) for ext in ("json", "mp4"))
    assert not (root / "ray-outputs").exists()        # the workers' intermediate files stayed with them
    assert not four_jobs["temp_left"]       # ... and went with each job (ray.kill runs no cleanup)
    for n in range(1, 5):
        ray_mp4, one_mp4 = root / "ray" / f"v-line{n}.mp4", root / "single" / f"v-line{n}.mp4"
        assert np.array_equal(frames(ray_mp4), frames(one_mp4)), f"line {n}: frames differ"
        text = ray_mp4.with_suffix(".json").read_text()
        assert json.loads(comment(ray_mp4)) == json.loads(text)        # the JSON and the MP4 tag agree
        record, reference = json.loads(text), json.loads(one_mp4.with_suffix(".json").read_text())
        image = four_jobs["images"][(n - 1) % 2]
        assert (record["prompt"], record["seed"]) == (f"clip {n - 1}", 100 + n - 1)
        assert record["image"] == {"name": image.name, "path": str(image.resolve()),
                                   "sha256": hashlib.sha256(image.read_bytes()).hexdigest()}
        for key in ("settings", "magcache", "frame", "variant", "model", "tiny", "image"):
            assert record[key] == reference[key], key
    # different seeds make different videos (the equality above is not trivially true)
    assert not np.array_equal(frames(root / "ray" / "v-line1.mp4"), frames(root / "ray" / "v-line3.mp4"))


def test_resume_runs_only_the_missing_jobs(four_jobs: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    root = four_jobs["root"]
    out = root / "ray"
    (out / "v-line2.mp4").unlink()
    (out / "v-line4.json").unlink()          # half a job's files is a job not done
    kept = {n: (out / f"v-line{n}.mp4").stat().st_mtime_ns for n in (1, 3)}
    capsys.readouterr()
    rc = main(["--jobs", str(four_jobs["jobs"]), *JOB_FLAGS, "--ray", "--resume",
                   "--output", str(out / "v.mp4"), "--outputs-dir", str(root / "ray-outputs")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count(": done on worker") == 2
    assert "line 2: done on worker" in printed and "line 4: done on worker" in printed
    assert "line 1: skipped" in printed and "line 3: skipped" in printed
    assert {n: (out / f"v-line{n}.mp4").stat().st_mtime_ns for n in (1, 3)} == kept
    for n in (2, 4):
        assert np.array_equal(frames(out / f"v-line{n}.mp4"), frames(root / "single" / f"v-line{n}.mp4"))
        assert (out / f"v-line{n}.json").is_file()


def test_killed_worker_retries_and_a_job_that_always_kills_its_worker_fails(
        tmp_path: pathlib.Path, local_ray: Any) -> None:
    image = make_image(tmp_path / "in.png", 7)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"image": str(image), "prompt": "long job, killed once", "seconds": 2},   # 2 sections
        {"image": str(image), "prompt": CRASH_PROMPT},
        {"image": str(image), "prompt": "plain"},
        {"image": str(image), "prompt": "plain too", "seed": 5, "calibrate": True},    # a profile comes back
    ])
    cli = {"tiny": True, "steps": 4, "seconds": 1, "output": str(tmp_path / "out" / "v.mp4"),
           "outputs_dir": str(tmp_path / "outputs"), "profiles_dir": str(tmp_path / "profiles")}
    planned, known = plan_jobs(str(jobs), cli, tiny_workers=True, resume=False)
    assert known == [] and [j.line for j in planned] == [1, 2, 3, 4]
    killed: list[int] = []

    def kill_line_1_once(job: BatchJob, slot: Slot) -> None:
        if job.line == 1 and not killed:
            killed.append(slot.pid)
            threading.Timer(1.0, os.kill, args=(slot.pid, signal.SIGKILL)).start()     # mid-job

    batch = Batch(planned, ActorFactory("framepack", tiny=True, threads=1), workers=2,
                               max_retries=2, on_dispatch=kill_line_1_once)
    outcomes = {o.line: o for o in batch.run()}
    assert killed
    assert outcomes[1].status == "done" and outcomes[1].attempts == 2, outcomes[1]
    assert outcomes[2].status == "error" and outcomes[2].attempts == 3
    assert "failed 3 time(s)" in outcomes[2].message and "--max-retries 2" in outcomes[2].message
    assert "died" in outcomes[2].message.lower() or "ActorDiedError" in outcomes[2].message
    assert outcomes[3].status == outcomes[4].status == "done"
    for line in (1, 3, 4):
        mp4 = tmp_path / "out" / f"v-line{line}.mp4"
        assert mp4.is_file() and mp4.with_suffix(".json").is_file()
    assert not (tmp_path / "out" / "v-line2.mp4").exists()
    assert len(frames(tmp_path / "out" / "v-line1.mp4")) == 4 * (2 * 9 + 1) - 3     # both sections
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []
    profiles = list((tmp_path / "profiles").glob("*.json"))         # written on the driver's disk
    assert len(profiles) == 1 and json.loads(profiles[0].read_text())["num_steps"] == 4


def test_app_runner_two_sessions_at_once_and_end_stops_only_its_own(tmp_path: pathlib.Path,
                                                                   local_ray: Any) -> None:
    from magcache_framepack.app import GENERATE_OUTPUTS, Job, build_ui, launch
    from magcache_framepack.settings import JobSettings, section_count
    from gradio_client import Client, handle_file

    runner = AppRunner("framepack", tiny=True, workers=2)
    demo = None
    try:
        # End, through the runner: two jobs at once, the first told to stop after its first step
        jobs = [Job(), Job()]
        image = (np.random.default_rng(3).random((64, 80, 3)) * 255).astype(np.uint8)
        settings = [JobSettings(prompt="stop me", seed=1, seconds=3, steps=6),
                    JobSettings(prompt="finish me", seed=2, seconds=1, steps=4)]
        threads = [threading.Thread(target=runner, args=(job, image, s, str(tmp_path / "o"), str(tmp_path / "p")))
                   for job, s in zip(jobs, settings)]
        for t in threads:
            t.start()
        events: list[list[tuple[str, Any]]] = [[], []]

        def drain(i: int) -> Any:
            while True:
                kind, payload = jobs[i].events.get(timeout=120)
                events[i].append((kind, payload))
                if kind == "progress" and i == 0 and payload.step >= 1:
                    jobs[0].stop.set()
                if kind == "done":
                    return payload

        results = [None, None]
        readers = [threading.Thread(target=lambda i=i: results.__setitem__(i, drain(i))) for i in range(2)]
        for t in readers:
            t.start()
        for t in readers + threads:
            t.join(timeout=180)
        stopped, finished = results
        assert stopped.status == "stopped", stopped.message
        assert finished.status == "done", finished.message
        assert any(k == "progress" and p.preview is not None for k, p in events[1])     # live previews came back
        assert pathlib.Path(finished.video_path).parent == tmp_path / "o"
        record = json.loads(pathlib.Path(finished.video_path).with_suffix(".json").read_text())
        assert record["prompt"] == "finish me" and json.loads(comment(pathlib.Path(finished.video_path))) == record
        assert pathlib.Path(record["image"]["path"]).is_file()           # the input the record names is here

        # two gradio_client sessions at once each get their own video, on the two workers at the same time
        outputs = tmp_path / "outputs"
        demo = build_ui(None, "framepack", outputs_dir=outputs, profiles_dir=tmp_path / "profiles",
                                     tiny=True, runner=runner)
        launch(demo, server_port=_free_port(), outputs_dir=outputs, prevent_thread_lock=True,
                            quiet=True)
        image_file = make_image(tmp_path / "in.png", 11)
        got: dict[str, Any] = {}
        runner.history.clear()

        def session(prompt: str, seed: int) -> None:
            client = Client(demo.local_url, verbose=False)
            result = client.predict(input_image=handle_file(str(image_file)), prompt=prompt, seed=seed,
                                    total_second_length=1, steps=4, api_name="/generate")
            got[prompt] = dict(zip(GENERATE_OUTPUTS, result, strict=True))

        clients = [threading.Thread(target=session, args=(f"session {i}", i)) for i in range(2)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=180)
        assert set(got) == {"session 0", "session 1"}
        videos = set()
        for prompt, out in got.items():
            assert out["report"]["status"] == "done", out["report"]["message"]
            video = pathlib.Path(out["report"]["video"])
            assert video.parent == outputs.resolve() or video.parent == outputs
            assert json.loads(video.with_suffix(".json").read_text())["prompt"] == prompt
            videos.add(video)
        assert len(videos) == 2
        (w0, s0, e0), (w1, s1, e1) = sorted(runner.history)[:2]
        assert w0 != w1 and s0 < e1 and s1 < e0, runner.history        # both ran at once, on different workers

        # End through the app: /end from one client stops its job on its worker; the other client's job,
        # running at the same time on the other worker, completes
        long_client, short_client = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
        long_job = long_client.submit(input_image=handle_file(str(image_file)), prompt="long", seed=3,
                                      total_second_length=60, steps=6, api_name="/generate")
        deadline = time.monotonic() + 120
        while len(long_job.outputs()) < 2:          # running on its worker: beyond the "Starting ..." update
            assert time.monotonic() < deadline, "the long job never reported progress"
            time.sleep(0.1)
        short = short_client.predict(input_image=handle_file(str(image_file)), prompt="short", seed=4,
                                     total_second_length=1, steps=4, api_name="/generate")
        assert dict(zip(GENERATE_OUTPUTS, short, strict=True))["report"]["status"] == "done"
        assert not long_job.done()                  # the short job finished while the long one still ran
        assert long_client.predict(api_name="/end") is True
        stopped = dict(zip(GENERATE_OUTPUTS, long_job.result(timeout=120), strict=True))["report"]
        assert stopped["status"] == "stopped", stopped["message"]
        assert len(stopped["sections"]) < section_count(60, JobSettings(prompt="").latent_window_size)
    finally:
        if demo is not None:
            demo.close()
        runner.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_models_need_gpus_in_the_cluster(local_ray: Any) -> None:
    assert worker_count(tiny=True, workers=None) == 2
    assert worker_count(tiny=True, workers=3) == 3
    with pytest.raises(RuntimeError, match="no GPU.*--tiny"):
        worker_count(tiny=False, workers=None)      # this local Ray has num_gpus=0
