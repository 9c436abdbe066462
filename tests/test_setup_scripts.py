"""The README's two commands: ./start.sh starts the app, ./test.sh refuses bad arguments clearly.

The app test reuses the venv these tests run in (``MAGCACHE_VENV``), so it
builds nothing: it starts ``./start.sh --tiny`` on a free loopback port, waits
(bounded) until the page answers, checks it is the app, and ends the whole
process group.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180          # tiny models on a busy 2-core machine load in well under a minute
VENV = pathlib.Path(sys.prefix)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", **extra)
    env.pop("REBUILD", None)
    return env


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *args], cwd=ROOT, env=script_env(**env), capture_output=True, text=True,
                          timeout=120)


def fetch(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL what is left after a bounded wait."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_start_script_serves_the_tiny_app(tmp_path: pathlib.Path) -> None:
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the tests do not run in a venv ({VENV}/bin/python missing): nothing to reuse")
    port = free_port()
    log = tmp_path / "start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "start.sh", "--tiny", "--port", str(port), "--outputs",
                                 str(tmp_path / "outputs"), "--profiles", str(tmp_path / "profiles")],
                                cwd=ROOT, env=script_env(MAGCACHE_VENV=str(VENV)), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        page = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            page = fetch(f"http://127.0.0.1:{port}/")
            if page is not None:
                break
            time.sleep(0.5)
        text = log.read_text()
        assert page is not None, f"no answer on 127.0.0.1:{port} (exit code {proc.poll()}); log:\n{text[-3000:]}"
        assert "FramePack + MagCache" in page          # the page title the app sets
        assert "magcache_demo_gradio.py --tiny --port" in text      # start.sh says what it starts
        assert f"using {VENV} as it is" in text                     # and built no venv
        assert f"http://127.0.0.1:{port}" in text and "reachable beyond this machine" not in text   # loopback only
    finally:
        stop_group(proc)
    assert proc.poll() is not None
    assert not group_alive(proc.pid), "processes of start.sh survived the test"


def test_start_script_picks_the_f1_app_and_passes_flags_on() -> None:
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"the tests do not run in a venv ({VENV}/bin/python missing)")
    res = run_script("start.sh", "--f1", "--help-app", MAGCACHE_VENV=str(VENV))
    assert res.returncode == 0, res.stderr
    assert "usage: magcache_demo_gradio_f1.py" in res.stdout and "--tiny" in res.stdout


def test_start_script_refuses_a_venv_without_python(tmp_path: pathlib.Path) -> None:
    res = run_script("start.sh", "--tiny", MAGCACHE_VENV=str(tmp_path))
    assert res.returncode != 0
    assert "MAGCACHE_VENV" in res.stderr and "bin/python" in res.stderr


@pytest.mark.parametrize("args, needle", [
    (["--deps", "nightly"], "unknown --deps value 'nightly'"),
    (["--deps=nightly"], "unknown --deps value 'nightly'"),
    (["--deps"], "--deps needs a value"),
])
def test_test_script_names_the_accepted_deps_sets(args: list[str], needle: str) -> None:
    res = run_script("test.sh", *args)
    assert res.returncode == 2
    assert needle in res.stderr
    assert "latest" in res.stderr and "pins" in res.stderr
    assert "pytest" not in res.stdout                # refused before any setup or test run


def test_scripts_document_their_usage() -> None:
    for script, words in (("start.sh", ["--f1", "--tiny", "MAGCACHE_VENV"]),
                          ("test.sh", ["--deps latest|pins", "--setup-only"])):
        res = run_script(script, "--help")
        assert res.returncode == 0 and all(w in res.stdout for w in words), (script, res.stdout)


def test_venv_stamp_changes_exactly_when_an_input_changes(tmp_path: pathlib.Path) -> None:
    """The reuse rule: same requirement files, pins and Python -> same stamp; any change -> another."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup_lib.sh").write_text((ROOT / "scripts" / "setup_lib.sh").read_text())
    (tmp_path / "req.txt").write_text("numpy\n")
    (tmp_path / "pins.txt").write_text("numpy==1.26.2\n")

    def stamp(*args: str) -> str:
        res = subprocess.run(["bash", "-c", 'source scripts/setup_lib.sh && pick_python && venv_stamp "$@"', "_", *args],
                             cwd=tmp_path, env=script_env(PYTHON=sys.executable), capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    first = stamp("test-latest", "-r", "req.txt")
    assert len(first) == 64 and stamp("test-latest", "-r", "req.txt") == first
    assert stamp("test-pins", "-r", "req.txt") != first                        # another set
    assert stamp("test-latest", "-r", "req.txt", "-c", "pins.txt") != first   # a constraint file more
    (tmp_path / "req.txt").write_text("numpy\nray\n")
    assert stamp("test-latest", "-r", "req.txt") != first                      # the file's content changed


def test_a_venv_build_that_cannot_fit_is_refused_in_one_line(tmp_path: pathlib.Path) -> None:
    """check_disk compares the free space (as shutil sees it) with VENV_MIN_FREE_GB, before pip starts."""
    free_gb = shutil.disk_usage(tmp_path).free / 1024 ** 3

    def check(min_free_gb: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/setup_lib.sh" && check_disk "$1"', "_",
                               str(tmp_path / "venvs")], env=script_env(VENV_MIN_FREE_GB=str(min_free_gb)),
                              capture_output=True, text=True, timeout=60)

    too_much = check(int(free_gb) + 2)
    assert too_much.returncode == 1
    lines = too_much.stdout.strip().splitlines()
    assert len(lines) == 1 and "MB free under" in lines[0] and f"about {int(free_gb) + 2} GB" in lines[0], lines
    assert check(max(int(free_gb) - 2, 0)).returncode == 0
