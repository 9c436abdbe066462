"""Every command in the README's shell code blocks works when pasted, in tiny mode with small values.

The README's fenced blocks are parsed (bash, sh, shell, console or unmarked;
a block in any other language must be listed in ``OTHER_BLOCKS`` with why it
holds no commands).  Each command line (continuations joined, comments and
``$`` prompts dropped) is matched against ``NOT_RUN`` (why it cannot run on a
CPU machine inside a test), then ``RUNNABLE`` (it runs here).  A command that
matches neither fails the test, so a new README command cannot slip by
untested; a rule that matches no command fails too, so the tables stay the
README's.

A runnable command is rewritten by ``tiny_argv`` (``python`` -> this venv's
interpreter, the launcher -> its path in the repository, ``--tiny`` added,
seconds, steps, resolutions and repeats made small) and runs in its own
process in a temporary folder holding the files the README assumes the
reader has (``INPUTS``), in README order, since later commands read what
earlier ones wrote (``--replay dance.json``, ``magcache_profiles/*.json``);
it must exit 0 (``RUNNER`` says how the processes start).  The apps are
started as plain subprocesses on free loopback ports, must serve their page,
and are stopped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_setup_scripts import fetch, free_port, stop_group

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
OTHER_BLOCKS = {
    "text": "program output or a diagram, not commands",
    "python": "Python for a running app (gradio_client) or a real model's objects, not shell commands",
}
COMMAND_TIMEOUT_S = 300
SERVER_START_TIMEOUT_S = 180

#: README commands that cannot run in a test on a CPU machine, and why. Matched in order, before RUNNABLE.
NOT_RUN: list[tuple[str, str]] = [
    (r"^\./start\.sh\b", ("builds .venv (minutes, GBs of wheels); tests/test_setup_scripts.py starts it "
                          "on the tests' own venv")),
    (r"^\./test\.sh\b", "runs this test suite itself"),
    (r"^pip install\b", "installs packages into the reader's venv"),
    (r"^ray start\b", "starts a Ray node daemon that outlives the command, one per machine of a cluster"),
    (r"--ray (auto|\S+:\d+)\b", "joins a running Ray cluster (the `ray start` commands)"),
]
#: README commands that run here: the pattern and what they are ("cli" runs to its end, "app" serves a page).
RUNNABLE: list[tuple[str, str]] = [
    (r"^python magcache_generate\.py\b", "cli"),
    (r"^python magcache_bench\.py (speed|compare|sweep|ratios)\b", "cli"),
    (r"^python magcache_demo_gradio(_f1)?\.py\b", "app"),
]

#: What the tiny commands print that the README promises (README command -> text in its output).
EXPECTED_OUTPUT = {
    "python magcache_generate.py --replay dance.json --output again.mp4": "Replay: same frames as the record",
    "python magcache_generate.py --replay dance.json --seed 7 --output other.mp4":
        "Replay: not the frames of the record",
    "python magcache_generate.py --replay dance.mp4 --output again.mp4": "Replay: same frames as the record",
}

# -- reading the README -----------------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the opening fence, lines) of each fenced block."""
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)\s*$", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1).lower(), number, []
        elif fence:
            blocks.append((lang, start, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, f"README.md: the code block opened at line {start} is never closed"
    return blocks


def commands(lines: list[str]) -> list[str]:
    """The commands of a shell block: continuations joined, `$ ` prompts and comments dropped, one space apart."""
    found, pending = [], ""
    for line in lines:
        line = re.sub(r"^\s*\$ ", "", line) if not pending else line
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            found.append(shlex.join(words))
    assert not pending, f"a command ends in a line continuation: {pending!r}"
    return found


def readme_commands() -> list[tuple[int, str]]:
    """(block line, command) of every shell command in README.md; fails on a block of an unlisted language."""
    found = []
    for lang, start, lines in code_blocks(README.read_text()):
        if lang in SHELL_BLOCKS:
            found += [(start, c) for c in commands(lines)]
        else:
            assert lang in OTHER_BLOCKS, (f"README.md line {start}: a ```{lang} block; list its language in "
                                          "SHELL_BLOCKS (its commands are then run) or OTHER_BLOCKS (with why not)")
    return found


def classify(command: str) -> tuple[str, str]:
    """("not run", reason) or ("cli" | "app", pattern); ("unknown", "") when no rule matches."""
    for pattern, reason in NOT_RUN:
        if re.search(pattern, command):
            return "not run", reason
    for pattern, kind in RUNNABLE:
        if re.search(pattern, command):
            return kind, pattern
    return "unknown", ""


# -- the tiny rewrite --------------------------------------------------------------------------------

#: Flags whose values are made small, per tool: a comma list keeps at most as many entries as the small
#: value has (--steps 25,50 -> 2,3; a calibration grid stays a grid, of 2 tiny jobs instead of 6).
SMALL = {
    "magcache_generate.py": {"--seconds": "1", "--steps": "2,3", "--resolutions": "64"},
    "speed": {"--size": "tiny", "--steps": "2", "--repeats": "1", "--warmup": "0"},
    "sweep": {"--seconds": "1", "--steps": "2", "--repeats": "1"},
}
#: Flags added where the command lacks them (per tool, except to a --replay; and to any command with --ray).
ADDED: dict[str, dict[str, str | None]] = {
    "magcache_generate.py": {"--seconds": "1", "--steps": "2", "--resolution": "64"},
    "speed": {"--steps": "2", "--repeats": "1", "--warmup": "0"},
    "sweep": {"--steps": "2", "--repeats": "1", "--no-warmup": None},
    "--ray": {"--workers": "1"},          # a local Ray: one CPU worker, not two
}


def small(value: str, replacement: str) -> str:
    """The replacement's first n entries for a list of n values (25,50 -> 2,3; 384,512,640 -> 64)."""
    return ",".join(replacement.split(",")[:value.count(",") + 1])


def tiny_argv(command: str) -> list[str]:
    """The README command as it runs here: this venv's python, the repository's launcher, tiny and small.

    Globs stay as written: the runner expands them when the command runs, as the shell would.
    """
    words = shlex.split(command)
    assert words[0] == "python", command
    script = words[1]
    tool = words[2] if script == "magcache_bench.py" else script
    args = words[2:]
    for i, word in enumerate(args[:-1]):
        if word in SMALL.get(tool, {}):
            args[i + 1] = small(args[i + 1], SMALL[tool][word])
    if script.startswith("magcache_demo_gradio") or (script == "magcache_generate.py") or tool == "sweep":
        args += [] if "--tiny" in args else ["--tiny"]
    added = {**(ADDED.get(tool, {}) if "--replay" not in args else {}), **(ADDED["--ray"] if "--ray" in args else {})}
    for flag, value in added.items():
        if flag not in args and not (flag == "--resolution" and "--resolutions" in args):
            args += [flag] if value is None else [flag, value]
    return [sys.executable, str(ROOT / script), *args]


# -- the files the README assumes ------------------------------------------------------------------


def write_jobs(path: Path) -> None:
    lines = [{"image": "in.png", "prompt": "a red box", "seconds": 1, "steps": 2, "resolution": 64},
             {"image": "in.png", "prompt": "a blue box", "seconds": 1, "steps": 2, "resolution": 64, "seed": 7}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_video(path: Path, shift: int) -> None:
    """Eight 64x64 frames of a moving gradient, written with PyAV directly."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for t in range(8):
            x = np.zeros((64, 64, 3), np.uint8)
            x[..., 1] = (np.arange(64)[None, :] * 4 + 8 * t + shift) % 256
            out.mux(stream.encode(av.VideoFrame.from_ndarray(x, format="rgb24")))
        out.mux(stream.encode())


#: Files the README's commands read without making them (the reader's own), and how the test makes each
#: (from the path to write and conftest's small start image).
INPUTS: dict[str, Callable[[Path, Path], object]] = {
    "in.png": lambda path, image: shutil.copy(image, path),
    "jobs.jsonl": lambda path, image: write_jobs(path),
    "uncached.mp4": lambda path, image: write_video(path, 0),
    "magcache.mp4": lambda path, image: write_video(path, 3),
}


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", MPLBACKEND="Agg")


# -- the tests -----------------------------------------------------------------------------------


@dataclass
class Classified:
    run: list[tuple[int, str, str]]         # (block line, command, "cli" | "app")
    not_run: list[tuple[int, str, str]]     # (block line, command, reason)


def classified() -> Classified:
    run, not_run, unknown = [], [], []
    for line, command in readme_commands():
        kind, why = classify(command)
        if kind == "unknown":
            unknown.append(f"README.md block at line {line}: {command}")
        elif kind == "not run":
            not_run.append((line, command, why))
        else:
            run.append((line, command, kind))
    assert not unknown, ("README commands that match no rule of tests/test_readme_commands.py (add a RUNNABLE "
                         "rule, or a NOT_RUN rule with the reason):\n" + "\n".join(unknown))
    return Classified(run, not_run)


def test_readme_commands_are_all_classified() -> None:
    """Every README command has a rule, every rule a command, and the venv line sits under the two commands."""
    found = classified()
    commands_seen = [c for _, c, _ in found.run + found.not_run]
    for pattern, _ in NOT_RUN + RUNNABLE:
        assert any(re.search(pattern, c) for c in commands_seen), f"stale rule, no README command matches {pattern}"
    assert set(EXPECTED_OUTPUT) <= set(commands_seen), set(EXPECTED_OUTPUT) - set(commands_seen)
    assert {"./start.sh --tiny", "./test.sh"} <= set(commands_seen)
    text = README.read_text()
    after_two = text.split("./test.sh ", 1)[1].split("```", 1)[1].strip().split("\n\n", 1)[0]
    assert "source .venv/bin/activate" in after_two and ".venv/bin/python" in after_two, after_two


def test_rewrite_is_tiny_and_small() -> None:
    """The rewrite on known commands, against argv lists written out by hand."""
    py, gen, bench = sys.executable, str(ROOT / "magcache_generate.py"), str(ROOT / "magcache_bench.py")
    cases = {
        'python magcache_generate.py --image in.png --prompt "a b" --variant f1 --seconds 5 --output d.mp4':
            [py, gen, "--image", "in.png", "--prompt", "a b", "--variant", "f1", "--seconds", "1", "--output", "d.mp4",
             "--tiny", "--steps", "2", "--resolution", "64"],
        "python magcache_generate.py --calibrate --image in.png --resolutions 384,512,640 --steps 25,50":
            [py, gen, "--calibrate", "--image", "in.png", "--resolutions", "64", "--steps", "2,3", "--tiny",
             "--seconds", "1"],
        "python magcache_generate.py --replay d.json --seed 7 --output o.mp4":
            [py, gen, "--replay", "d.json", "--seed", "7", "--output", "o.mp4", "--tiny"],
        "python magcache_bench.py ratios magcache_profiles/*.json --steps 25,50":
            [py, bench, "ratios", "magcache_profiles/*.json", "--steps", "25,50"],
        "python magcache_bench.py speed --size full --repeats 3":
            [py, bench, "speed", "--size", "tiny", "--repeats", "1", "--steps", "2", "--warmup", "0"],
        "python magcache_bench.py sweep --image in.png --seconds 5 --out sweep/":
            [py, bench, "sweep", "--image", "in.png", "--seconds", "1", "--out", "sweep/", "--tiny", "--steps", "2",
             "--repeats", "1", "--no-warmup"],
        "python magcache_generate.py --jobs j.jsonl --ray --output c.mp4":
            [py, gen, "--jobs", "j.jsonl", "--ray", "--output", "c.mp4", "--tiny", "--seconds", "1", "--steps", "2",
             "--resolution", "64", "--workers", "1"],
        "python magcache_demo_gradio_f1.py": [py, str(ROOT / "magcache_demo_gradio_f1.py"), "--tiny"],
    }
    for command, argv in cases.items():
        assert tiny_argv(command) == argv, command


def test_command_parsing() -> None:
    lines = ["$ python a.py --x 1 \\", "    --y 'two words'   # a comment", "# only a comment", "",
             "python b.py '#not a comment'"]
    assert commands(lines) == ["python a.py --x 1 --y 'two words'", "python b.py '#not a comment'"]
    text = "x\n```bash\nls\n```\n```\npwd\n```\n```python\nprint(1)\n```\n"
    assert code_blocks(text) == [("bash", 2, ["ls"]), ("", 5, ["pwd"]), ("python", 8, ["print(1)"])]


#: Runs README commands one after another, each in its own process forked from one interpreter that has
#: imported torch, transformers and diffusers once (6-7 s of CPU a command on a 2-core VM, more than half of
#: a tiny job's cost). Nothing of this project and nothing of FramePack is imported before the fork: each
#: command imports the project's code itself, runs the launcher as ``__main__`` with its own argv, and ends
#: through a normal interpreter exit (atexit handlers, Ray's shutdown among them, run). argv[1]: a JSON list
#: of {"argv", "log", "timeout"}; prints one JSON line per command: exit code, wall and CPU seconds.
RUNNER = r"""
import glob, json, os, runpy, sys, time
for name in ("torch", "transformers", "diffusers", "av", "PIL.Image", "matplotlib.pyplot"):
    __import__(name)
import transformers, diffusers
transformers.LlamaModel, transformers.CLIPTextModel, transformers.SiglipVisionModel, diffusers.AutoencoderKLHunyuanVideo
for job in json.loads(sys.argv[1]):
    sys.stdout.flush(); sys.stderr.flush()
    t0, pid = time.monotonic(), os.fork()
    if pid == 0:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        # the shell's glob expansion, when the command runs (after the commands before it wrote their files)
        words = [a for w in job["argv"][2:] for a in (sorted(glob.glob(w)) or [w] if glob.has_magic(w) else [w])]
        sys.argv, sys.path[0] = [job["argv"][1], *words], os.path.dirname(job["argv"][1])
        runpy.run_path(job["argv"][1], run_name="__main__")
        sys.exit(0)
    while (done := os.wait4(pid, os.WNOHANG))[0] == 0 and time.monotonic() - t0 < job["timeout"]:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        done = os.wait4(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(done[1]), "wall": time.monotonic() - t0,
                      "cpu": done[2].ru_utime + done[2].ru_stime}), flush=True)
"""


def run_all(commands_: list[str], cwd: Path) -> list[str]:
    """Runs the README commands in tiny mode, in order, in ``cwd``; what went wrong with each that failed."""
    jobs = [{"argv": tiny_argv(c), "log": str(cwd / f"command-{i}.log"), "timeout": COMMAND_TIMEOUT_S}
            for i, c in enumerate(commands_)]
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S * len(jobs) + 60, check=False)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(jobs), f"the runner stopped (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return [f for command, job, result in zip(commands_, jobs, results) if (f := verdict(command, job, result))]


def verdict(command: str, job: dict, result: dict) -> str | None:
    """None if the command did what the README says, else what went wrong."""
    ray_missing = "--ray" in job["argv"] and importlib.util.find_spec("ray") is None
    expect_code = 2 if ray_missing else 0      # "--ray without it says so and exits"
    out = Path(job["log"]).read_text()
    print(f"{result['wall']:6.1f} s wall {result['cpu']:6.1f} s CPU  exit {result['code']}  "
          f"{shlex.join(job['argv'][1:])[:200]}")
    head = f"{command}\n  ran as: {shlex.join(job['argv'])}\n"
    if result["code"] != expect_code:
        return f"{head}  exit {result['code']}, expected {expect_code}:\n{out[-3000:]}"
    if ray_missing and len(out.strip().splitlines()) != 1:
        return f"{head}  a refusal of more than one line:\n{out}"
    if command in EXPECTED_OUTPUT and EXPECTED_OUTPUT[command] not in out:
        return f"{head}  output lacks {EXPECTED_OUTPUT[command]!r}:\n{out[-3000:]}"
    return None


@pytest.mark.slow
def test_readme_cli_commands_run_in_tiny_mode(tmp_path: Path, image: Path) -> None:
    """Each runnable README command, in README order, in one folder, exits as the README says."""
    for name, make in INPUTS.items():
        make(tmp_path / name, image)
    failures = run_all([c for _, c, kind in classified().run if kind == "cli"], tmp_path)
    assert not failures, "README commands that fail in tiny mode:\n\n" + "\n\n".join(failures)


def start_app(command: str, cwd: Path) -> tuple[subprocess.Popen, int, Path]:
    """Starts a README app command in tiny mode on a free loopback port, in its own process group."""
    port = free_port()
    log = cwd / f"app-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(tiny_argv(command) + ["--port", str(port)], cwd=cwd, env=env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port, log


def page_of(proc: subprocess.Popen, port: int, deadline: float) -> str | None:
    """The app's page once it answers; None if the app ended or the deadline passed first."""
    page = None
    while page is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        page = fetch(f"http://127.0.0.1:{port}/")
    return page


@pytest.mark.slow
def test_readme_app_commands_serve_in_tiny_mode(tmp_path: Path) -> None:
    """Each README app command, made tiny, serves its page on loopback (started together; the same
    command twice, once with --tiny and once without, starts once)."""
    apps = {shlex.join(tiny_argv(c)): c for _, c, kind in reversed(classified().run) if kind == "app"}
    assert len(apps) == 2, apps          # the FramePack and the F1 app
    t0 = time.monotonic()
    started = {command: start_app(command, tmp_path) for command in apps.values()}
    failures = []
    try:
        for command, (proc, port, log) in started.items():
            page = page_of(proc, port, t0 + SERVER_START_TIMEOUT_S)
            print(f"{time.monotonic() - t0:6.1f} s  page {'served' if page else 'missing'}  {command}")
            title = "FramePack-F1 + MagCache" if "_f1" in command else "FramePack + MagCache"
            if page is None or title not in page:
                failures.append(f"{command}\n  ran as: {shlex.join(proc.args)}\n  no page with {title!r} on "
                                f"127.0.0.1:{port} (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
    finally:
        for proc, _, _ in started.values():
            stop_group(proc)
    assert not failures, "README app commands that do not serve in tiny mode:\n\n" + "\n\n".join(failures)
