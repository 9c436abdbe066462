"""The package's layers: imports only go down, none go in a circle, and the lowest layer needs no torch.

Read from the source with ast (every import statement, also those inside
functions), so a lazy import that climbs a layer is caught as well.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "magcache_framepack"

#: The layers the package docstring states, lowest first.
LAYERS = {
    "settings": 1, "models": 2, "video": 3, "records": 3, "metrics": 3, "sensitivity": 3, "job": 3, "comparison": 3,
    "grid": 3,
    "jobfiles": 4,
    "runners.local": 5, "runners.ray": 5, "cli": 6,
    "bench.report": 6, "bench.speed": 6, "bench.quality": 6, "bench.sweep": 6, "bench.ratios": 6,
    "bench.ray_pool": 6, "bench.plancheck": 6,
    # the app is a subpackage, all of it layer 6 (its face, app/__init__.py, is not walked: it only re-exports)
    "app.views": 6, "app.profiles": 6, "app.requests": 6, "app.jobs": 6, "app.handlers": 6, "app.rerun": 6,
    "app.grid": 6, "app.layout": 6, "app.serve": 6,
}

#: Within the bench, the one import a tool makes of another tool (the shared ``bench.report`` aside).
BENCH_TOOL_IMPORTS = {("bench.sweep", "bench.quality"),     # a sweep scores its videos with compare's metrics
                      ("bench.plancheck", "bench.speed")}     # plan-check samples speed's model and section


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports_of(path: pathlib.Path) -> set[str]:
    """The package modules a file imports (as "job", "runners.ray", ...)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("magcache_framepack"):
            base = node.module.removeprefix("magcache_framepack").lstrip(".")
            for alias in node.names:
                found.add(base if base else alias.name)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("magcache_framepack.") for a in node.names
                      if a.name.startswith("magcache_framepack.")}
    return {m for m in found if m}


def graph() -> dict[str, set[str]]:
    """Every module's imports; a package's faces (``__init__``, ``__main__``) only wire its modules."""
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py")}


def test_every_module_has_a_layer_and_imports_only_down() -> None:
    edges = graph()
    assert set(edges) == set(LAYERS), "a module without a layer: add it to the package docstring and LAYERS"
    upward = [(m, d) for m, deps in edges.items() for d in deps if LAYERS[d] > LAYERS[m]]
    assert upward == []


#: The app's modules, lowest first: inside the app, imports go down this list only.
APP_ORDER = ("app.views", "app.profiles", "app.requests", "app.jobs", "app.handlers", "app.rerun", "app.grid",
             "app.layout", "app.serve")
APP = PACKAGE / "app"


def test_the_app_imports_only_down_inside() -> None:
    edges = graph()
    assert {m for m in edges if m.startswith("app.")} == set(APP_ORDER)
    rank = {m: i for i, m in enumerate(APP_ORDER)}
    upward = [(m, d) for m in APP_ORDER for d in edges[m] if d in rank and rank[d] >= rank[m]]
    assert upward == []
    # the face only re-exports: every module it imports is one of the app's own
    face = imports_of(APP / "__init__.py")
    assert face <= set(APP_ORDER), face


def test_the_app_views_are_pure() -> None:
    """views imports no gradio and no threading, at module level or inside a function."""
    tree = ast.parse((APP / "views.py").read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"gradio", "threading", "queue"}, names


def test_no_function_over_100_lines() -> None:
    """Every function of the package, the engine and the launchers fits in a sitting (100 lines at most)."""
    files = [*sorted(PACKAGE.rglob("*.py")), *sorted(ROOT.glob("magcache_*.py"))]
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == [], "split these along a seam you can name: " + "; ".join(long)


def test_no_import_circle() -> None:
    edges = graph()
    seen: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if seen.get(m) == 1:
            raise AssertionError(f"import circle: {' -> '.join(path + [m])}")
        if seen.get(m) == 2:
            return
        seen[m] = 1
        for d in sorted(edges[m]):
            visit(d, path + [m])
        seen[m] = 2

    for m in sorted(edges):
        visit(m, [])


def test_bench_tools_share_code_only_through_the_report_module() -> None:
    edges = graph()
    crossing = {(m, d) for m, deps in edges.items() if m.startswith("bench.")
                for d in deps if d.startswith("bench.") and d != "bench.report"}
    assert crossing == BENCH_TOOL_IMPORTS


def test_the_engine_imports_nothing_of_the_package() -> None:
    tree = ast.parse((ROOT / "magcache_core.py").read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [n for n in names if n.startswith("magcache")]


def test_settings_and_job_files_need_no_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; "       # importing torch now fails
            "import magcache_framepack, magcache_framepack.settings as s, magcache_framepack.jobfiles as j; "
            "s.JobSettings(prompt='x').validate(); print(sorted(s.LIMITS)[0], j.DEFAULTS['steps'])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["cfg", "25"]


def test_the_settings_vocabulary_matches_the_engine() -> None:
    import magcache_core
    from magcache_framepack import settings

    assert settings.PRESET_NAMES == tuple(magcache_core.PRESETS)
    assert settings.RESAMPLE_MODES == tuple(magcache_core.RESAMPLE_MODES)
    assert settings.VARIANT_NAMES == tuple(magcache_core.VARIANT_MAG_RATIOS)


def test_the_top_level_scripts_are_thin() -> None:
    for name in ("magcache_demo_gradio.py", "magcache_demo_gradio_f1.py", "magcache_generate.py",
                 "magcache_bench.py"):
        code = [line for line in (ROOT / name).read_text().splitlines() if line.strip()]
        assert len(code) <= 15, f"{name} holds {len(code)} lines: its code belongs in the package"
