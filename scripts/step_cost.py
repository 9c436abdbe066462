"""What a denoising step costs in the app and in the CLI: tiny models, 1 section of 25 steps, over loopback.

The app runs as a user starts it (``magcache_demo_gradio.py --tiny``, its own
process, on 127.0.0.1), driven by gradio_client from this process, which also
runs the CLI's job function (:func:`magcache_framepack.runners.local.run_one`,
progress bars and all) on tiny models of its own.  The two are interleaved, run
for run, so load from elsewhere on the machine falls on both alike.  Each run's
time is the job's own sampling time (``sampling_seconds`` of its section, in
the JSON record beside its video).  The cache settings vary the computed steps
from 25 (cache off) down to the fewest MagCache's rule computes on the tiny
frames.  One JSON line per run goes to stdout::

    .venv/bin/python scripts/step_cost.py --repeats 3 > runs.jsonl

With ``PYTHONPATH`` at another checkout it times that checkout's code (app and
CLI alike), so two versions can be run back to back, in turns, on one machine.
On a machine other work keeps busy, ``OMP_NUM_THREADS=1`` keeps torch's threads
from waiting on each other's core, which would swamp what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

# (label, settings): 25, 17, 13 and 10 of 25 steps computed on the tiny 96x128 frames (10 is the fewest
# MagCache's rule computes there: K is at most 10, and the ratios' 0.06 bound stops longer runs)
CONFIGS = (
    ("off", {"cache": "off"}),
    ("mag-17", {"cache": "magcache", "magcache_thresh": 0.05, "magcache_K": 1, "retention_ratio": 0.0}),
    ("mag-13", {"cache": "magcache", "magcache_thresh": 0.15, "magcache_K": 3, "retention_ratio": 0.0}),
    ("mag-10", {"cache": "magcache", "magcache_thresh": 1.0, "magcache_K": 10, "retention_ratio": 0.0}),
)
JOB = {"total_second_length": 1.0, "latent_window_size": 9, "steps": 25, "seed": 31337}    # 1 section


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_timing(video: str) -> dict:
    """The job's own sampling time and computed steps, from the JSON record beside its video."""
    record = json.loads(pathlib.Path(video).with_suffix(".json").read_text(encoding="utf-8"))
    section = record["sections"][0]
    return {"sampling": section["sampling_seconds"], "computed": len(section["computed_steps"])}


def app_run(client, image: pathlib.Path, settings: dict) -> dict:
    from gradio_client import handle_file

    _, report, *_ = client.predict(input_image=handle_file(str(image)), prompt="a cat walks",
                                   api_name="/generate", **JOB, **settings)
    assert report["status"] == "done", report["message"]
    return record_timing(report["video"])


def cli_run(models, root: pathlib.Path, image: pathlib.Path, settings: dict) -> dict:
    from magcache_framepack.jobfiles import DEFAULTS
    from magcache_framepack.runners.local import run_one

    values = dict(DEFAULTS, image=str(image), prompt="a cat walks", tiny=True, outputs_dir=str(root / "cli"),
                  profiles_dir=str(root / "prof"), seconds=JOB["total_second_length"],
                  latent_window_size=JOB["latent_window_size"], steps=JOB["steps"], seed=JOB["seed"], **settings)
    with contextlib.redirect_stderr(io.StringIO()):     # the CLI's bars, drawn as the CLI draws them
        result, _ = run_one(values, {("framepack", True): models}, True, lambda: False)
    assert result.status == "done", result.message
    return record_timing(result.video_path)


def serve(root: pathlib.Path) -> tuple[subprocess.Popen, str]:
    """The tiny app as a user starts it (``magcache_demo_gradio.py --tiny``), in its own process on loopback."""
    port = free_port()
    tree = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(tree)))
    launcher = pathlib.Path(env["PYTHONPATH"].split(os.pathsep)[0]) / "magcache_demo_gradio.py"
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(launcher), "--tiny", "--port", str(port),
                                 "--outputs", str(root / "app"), "--profiles", str(root / "prof")],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}/"
        if proc.poll() is not None:
            raise SystemExit(f"the app did not start: see {root / 'server.log'}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not answer within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="", help="a name for the code under test, copied into each line")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    from gradio_client import Client
    from PIL import Image

    from magcache_framepack.models import load_models

    root = pathlib.Path(tempfile.mkdtemp(prefix="step_cost_"))
    image = root / "input.png"
    Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)).save(image)
    server, url = serve(root)
    try:
        models = load_models("framepack", tiny=True)
        client = Client(url, verbose=False)
        app_run(client, image, CONFIGS[0][1])          # warm-up: first-call costs on both paths
        cli_run(models, root, image, CONFIGS[0][1])
        for repeat in range(args.repeats):
            for name, settings in CONFIGS:
                for where in ("app", "cli"):
                    out = (app_run(client, image, settings) if where == "app"
                           else cli_run(models, root, image, settings))
                    print(json.dumps({"label": args.label, "where": where, "config": name, "repeat": repeat,
                                      "time": time.time(), **out}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
