"""magcache_core.py can be taken alone: copied into another project, with or without its ratio JSON.

Each check runs in a fresh Python process from an empty folder holding only the
copied file(s), so nothing of this checkout can be imported by accident.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import magcache_core

ROOT = pathlib.Path(__file__).resolve().parent.parent

PROBE = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    before = set(sys.modules)
    import magcache_core as core
    imported = sorted(set(sys.modules) - before)
    ratios, source = core.library_ratios("framepack", 256, 50)
    core.library_ratios("f1", 384, 25)              # a second lookup: the warning is not repeated
    print(json.dumps({"file": core.__file__, "ratios": ratios, "source": source,
                      "diffusers": any(m == "diffusers" or m.startswith("diffusers.") for m in imported),
                      "ours": [m for m in imported if m.startswith("magcache") and m != "magcache_core"]}))
""")


def run_alone(folder: pathlib.Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_the_engine_alone_with_its_json(tmp_path: pathlib.Path) -> None:
    shutil.copy(ROOT / "magcache_core.py", tmp_path)
    shutil.copy(ROOT / "magcache_ratio_library.json", tmp_path)
    report, stderr = run_alone(tmp_path)
    assert pathlib.Path(report["file"]).parent == tmp_path
    assert report["ours"] == [] and not report["diffusers"]
    # the library's 256 px, 50-step FramePack table, read here from the JSON itself
    data = json.loads((ROOT / "magcache_ratio_library.json").read_text())
    table = next(t for t in data["tables"] if (t["variant"], t["resolution"], t["steps"]) == ("framepack", 256, 50))
    assert report["ratios"] == table["ratios"]
    assert "WARNING" not in stderr


def test_the_engine_alone_without_its_json_plans_from_the_published_tables(tmp_path: pathlib.Path) -> None:
    shutil.copy(ROOT / "magcache_core.py", tmp_path)
    report, stderr = run_alone(tmp_path)
    published = magcache_core.resample_mag_ratios(magcache_core.FRAMEPACK_MAG_RATIOS, 50)
    assert report["ratios"] == published
    assert report["source"].startswith("published MagCache table")
    warnings = [line for line in stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "magcache_ratio_library.json" in warnings[0], stderr


def test_calibration_runs_average_into_a_profile_by_hand() -> None:
    runs = [magcache_core.RunReport(index=i, num_steps=3, calibrate=True, status="complete",
                                    ratios=r, ratio_std=[0.0, 0.1, 0.2], cosine_distance=[0.0, c, c])
            for i, (r, c) in enumerate([([1.0, 0.9, 1.1], 0.02), ([1.0, 0.95, 1.2], 0.04)])]
    profile = magcache_core.MagCacheProfile.average(runs, "framepack", resolution=128, model="m")
    assert profile.ratios == [1.0, 0.925, 1.15]
    assert profile.ratio_std == [0.0, 0.1, 0.2] and profile.cosine_distance == [0.0, 0.03, 0.03]
    assert (profile.runs, profile.num_steps, profile.resolution, profile.model) == (2, 3, 128, "m")


RUN_ON_A_TINY_FRAMEPACK = textwrap.dedent("""
    import json, sys
    import torch
    from tiny_framepack import build_transformer, make_section, run_section   # the tests' conftest, copied
    import magcache_core as mc

    torch.set_num_threads(1)
    model = build_transformer()
    section = make_section(model)
    reference = run_section(model, section, steps=8)
    ratios, _ = mc.library_ratios("framepack", 64, 8)
    out = {}
    for name, config in (("skipping", mc.MagCacheConfig.from_preset("E015K4R02", num_steps=8, mag_ratios=ratios)),
                         ("computing", mc.MagCacheConfig(num_steps=8, mag_ratios=ratios, calibrate=True))):
        with mc.magcache(model, config), mc.magcache_run(model) as report:
            latents = run_section(model, section, steps=8)
        out[name] = {"skipped": report.skipped, "plan": [i for i, s in enumerate(config.schedule()) if s],
                     "bitwise": bool(torch.equal(latents, reference)),
                     "close": bool(torch.allclose(latents, reference, atol=0.5))}
    out["restored"] = bool(torch.equal(run_section(model, section, steps=8), reference))
    out["ours"] = sorted(m for m in sys.modules if m.startswith("magcache") and m != "magcache_core")
    print(json.dumps(out))
""")


def test_the_engine_alone_runs_magcache_on_a_tiny_framepack_transformer(tmp_path: pathlib.Path) -> None:
    """Copied alone with its JSON, the engine patches FramePack's real packed transformer: the planned
    steps are skipped, a run that skips nothing is bitwise FramePack's, and disabling restores it."""
    shutil.copy(ROOT / "magcache_core.py", tmp_path)
    shutil.copy(ROOT / "magcache_ratio_library.json", tmp_path)
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tiny_framepack.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RUN_ON_A_TINY_FRAMEPACK], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["skipping"]["skipped"] == out["skipping"]["plan"] and out["skipping"]["skipped"]
    assert not out["skipping"]["bitwise"] and out["skipping"]["close"]
    assert out["computing"]["skipped"] == [] and out["computing"]["bitwise"]
    assert out["restored"] and out["ours"] == []
