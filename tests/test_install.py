"""``pip install .`` gives a working install: the wheel built from this checkout, installed into a
fresh venv, runs its console script and finds the engine's ratio JSON beside the engine.

Why each step is done the way it is:

* The wheel is built into ``tmp_path`` with ``pip wheel --no-deps``, so the checkout gets no
  ``build/``, ``dist/`` or ``*.egg-info`` (the test checks that).  When hatchling, the build
  backend, is importable in the test venv, the build runs there (``--no-build-isolation``, no
  network); otherwise pip fetches hatchling into an isolated build environment, as a user's
  ``pip install .`` does (pip's cache keeps the download for the next run).
* The fresh venv must see the test venv's packages (torch, diffusers, ...), or the console
  script could not even import; installing them again would take minutes.  ``venv
  --system-site-packages`` does not help: it exposes the base interpreter's site-packages, not
  another venv's.  So the fresh venv gets a ``.pth`` file whose ``import site;
  site.addsitedir(...)`` line adds the test venv's site-packages *after* its own, with the
  ``.pth`` files there processed too.  What the wheel installed therefore wins over anything
  in the test venv, and the checkout is on no path at all: the commands run from ``tmp_path``
  with ``PYTHONPATH`` unset.
* The wheel is installed with ``--no-deps`` (the dependencies are the test venv's) and
  ``--ignore-installed``, so pip never uninstalls anything from the test venv even if it holds
  an (editable) install of this project.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ("magcache-generate", "magcache-bench", "magcache-demo", "magcache-demo-f1")

PROBE = textwrap.dedent("""
    import json, logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import magcache_core, magcache_framepack, magcache_framepack.runners
    print(json.dumps({"core": magcache_core.__file__, "package": magcache_framepack.__file__,
                      "runners": magcache_framepack.runners.__file__,
                      "tables": len(magcache_core.ratio_library())}))
""")


def clean_env(venv: pathlib.Path | None = None) -> dict[str, str]:
    """This process's environment without PYTHONPATH/PYTHONHOME, so nothing points back at the
    checkout; with ``venv``, that venv's bin/ comes first on PATH as if it were activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_PROGRESS_BAR"] = "off"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(cmd: list[str], cwd: pathlib.Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` and fail the test with its output's end when it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def build_artifacts() -> set[str]:
    """What a build may leave at the checkout's root: build/, dist/, *.egg-info, wheels."""
    return {p.name for p in ROOT.iterdir()
            if p.name in ("build", "dist") or p.name.endswith((".egg-info", ".whl"))}


def build_wheel(out: pathlib.Path) -> pathlib.Path:
    """Build this checkout's wheel into ``out`` and return it (see the module docstring for how)."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(ROOT)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.insert(4, "--no-build-isolation")
    # this process's own environment: hatchling was looked for in it
    run(cmd, cwd=out, env={**os.environ, "PIP_PROGRESS_BAR": "off"}, timeout=300)
    wheels = list(out.glob("magcache_framepack-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {[w.name for w in out.iterdir()]}"
    return wheels[0]


def make_venv(venv: pathlib.Path) -> pathlib.Path:
    """A venv without pip of its own that sees the test venv's packages after its own; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = pathlib.Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           cwd=venv, env=clean_env(), timeout=60).stdout.strip())
    theirs = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (own / "_test_venv_packages.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in theirs), encoding="utf-8")
    return python


@pytest.mark.slow
def test_pip_install_gives_console_scripts_and_the_engine_with_its_json(tmp_path: pathlib.Path) -> None:
    before = build_artifacts()
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    wheel = build_wheel(wheel_dir)
    assert build_artifacts() == before, "building the wheel left files in the checkout"

    venv = tmp_path / "venv"
    python = make_venv(venv)
    run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", str(wheel)],
        cwd=tmp_path, env=clean_env(venv), timeout=120)
    for name in SCRIPTS:
        assert (venv / "bin" / name).is_file(), f"console script {name} not installed"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = clean_env(venv)
    script = shutil.which("magcache-generate", path=env["PATH"])
    assert script is not None and pathlib.Path(script).parent == venv / "bin"
    usage = run([script, "--help"], cwd=outside, env=env, timeout=120).stdout
    # (the parser names itself magcache_generate.py, the launcher's name)
    assert usage.startswith("usage: ") and "--outputs-dir" in usage, usage[:500]

    probe = run([str(python), "-c", PROBE], cwd=outside, env=env, timeout=120)
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    core = pathlib.Path(report["core"])
    for key in ("core", "package", "runners"):
        path = pathlib.Path(report[key]).resolve()
        assert path.is_relative_to(venv.resolve()) and not path.is_relative_to(ROOT), f"{key} imported from {path}"
    assert core.with_name("magcache_ratio_library.json").is_file()
    # Two published tables; more only when the JSON beside the engine was read.
    assert report["tables"] > 2, report
    assert "ratio library" not in probe.stderr and "WARNING" not in probe.stderr, probe.stderr[-3000:]
