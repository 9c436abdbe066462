"""Tests of magcache_generate: argument errors, value layering, and --jobs surviving a bad job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magcache_framepack.jobfiles import JobError, merge_values, normalise_job_line, output_for_line
from magcache_framepack.cli import build_parser, main


def frame_count(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.mark.parametrize("extra, expected", [
    (["--magcache-thresh", "-0.1"], "--magcache-thresh must be a number from 0 to 1"),
    (["--magcache-thresh", "2"], "--magcache-thresh must be a number from 0 to 1"),
    (["--magcache-K", "0"], "--magcache-K must be an integer from 1 to 10"),
    (["--steps", "500"], "--steps must be an integer from 1 to 100"),
    (["--retention-ratio", "1.0"], "--retention-ratio must be a number from 0 to 0.99"),
    (["--seconds", "0"], "--seconds must be a number from 1 to 120"),
    (["--output", "x.avi"], "--output must be an .mp4 path"),
    (["--calibrate", "--cache", "off"], "--calibrate measures with MagCache"),
    (["--mag-ratios", "nope.json"], "--mag-ratios: profile file not found"),
    (["--cfg", "0.5"], "--cfg must be a number from 1 to 32"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 9223372036854775807, got -1"),   # as the app refuses it
])
def test_bad_arguments_are_argparse_errors(image: Path, capsys: pytest.CaptureFixture,
                                           extra: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--image", str(image), "--tiny", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # one line: the refusal itself, not the usage block (and never a traceback)
    assert err.strip().splitlines() == [err.strip()] and expected in err and "Traceback" not in err
    assert err.startswith("magcache_generate.py: error: ") and "--help lists every flag" in err


def test_missing_image_and_unknown_choice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--image", str(tmp_path / "none.png"), "--tiny"])
    assert exc.value.code == 2
    assert "--image: file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tiny"])
    assert "--image is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image", "x.png", "--preset", "E020K5R01"])
    assert "invalid choice" in capsys.readouterr().err


def test_real_models_without_cuda_point_to_tiny(image: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["--image", str(image)])
    assert "--tiny" in capsys.readouterr().err


def test_presets_and_layering() -> None:
    # the two published presets: (thresh, K, retention)
    v = merge_values({"preset": "E015K4R02"})
    assert (v["magcache_thresh"], v["magcache_K"], v["retention_ratio"]) == (0.15, 4, 0.2)
    v = merge_values({"preset": "E010K3R02"})
    assert (v["magcache_thresh"], v["magcache_K"], v["retention_ratio"]) == (0.10, 3, 0.2)
    # explicit flags beat the preset of the same layer
    v = merge_values({"preset": "E015K4R02", "magcache_K": 2})
    assert (v["magcache_thresh"], v["magcache_K"]) == (0.15, 2)
    # a job line beats the command line, and inherits what it leaves open
    v = merge_values({"preset": "E015K4R02", "steps": 12, "prompt": "cli"},
                         {"preset": "E010K3R02", "prompt": "job"})
    assert (v["magcache_thresh"], v["magcache_K"], v["steps"], v["prompt"]) == (0.10, 3, 12, "job")
    v = merge_values({"magcache_thresh": 0.2}, {"seed": 5})
    assert (v["magcache_thresh"], v["seed"], v["magcache_K"]) == (0.2, 5, 3)


def test_job_lines_are_checked() -> None:
    assert normalise_job_line({"magcache_K": "4", "seconds": 2, "tiny": True}) == \
        {"magcache_K": 4, "seconds": 2.0, "tiny": True}
    # the flag spellings work as keys too, as the README promises
    assert normalise_job_line({"magcache-K": 4, "retention-ratio": 0.3, "n-prompt": "x", "mag-ratios": None}) == \
        {"magcache_K": 4, "retention_ratio": 0.3, "n_prompt": "x", "mag_ratios": None}
    for bad in ({"colour": "red"}, {"steps": 2.5}, {"tiny": "maybe"}, {"magcache_thresh": "x"}, ["image"]):
        with pytest.raises(JobError):
            normalise_job_line(bad)
    assert output_for_line("out/v.mp4", 3, from_job=False) == str(Path("out/v-line3.mp4"))
    assert output_for_line("mine.mp4", 3, from_job=True) == "mine.mp4"


def test_one_vocabulary_with_the_earlier_names_as_aliases() -> None:
    import dataclasses

    from magcache_framepack.jobfiles import DEFAULTS, SETTING_KEYS
    from magcache_framepack.settings import LIMITS, JobSettings

    # JobSettings' fields are the job keys, the record's settings keys and (with dashes) the flags
    fields = [f.name for f in dataclasses.fields(JobSettings)]
    assert list(SETTING_KEYS) == fields and set(fields) <= set(DEFAULTS) and set(LIMITS) <= set(fields)
    assert {f.name: f.default for f in dataclasses.fields(JobSettings) if f.name != "prompt"} == \
        {k: DEFAULTS[k] for k in fields if k != "prompt"}
    flags = {a.option_strings[-1] for a in build_parser()._actions if a.option_strings}
    assert {"--" + k.replace("_", "-") for k in fields} <= flags
    # job files written with the earlier names still work
    assert normalise_job_line({"total_second_length": 3, "mp4_crf": 20, "magcache_k": 2}) == \
        {"seconds": 3.0, "crf": 20, "magcache_K": 2}


def test_a_record_with_the_earlier_names_replays(tmp_path: Path) -> None:
    from magcache_framepack.jobfiles import replay_layer
    from magcache_framepack.records import FORMAT

    record = {"format": FORMAT, "prompt": "p", "n_prompt": "", "seed": 4, "variant": "f1", "tiny": True,
              "settings": {"total_second_length": 2.5, "mp4_crf": 18, "steps": 7, "magcache_K": 2}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(record))
    layer = replay_layer(str(path), image_given=True)
    assert (layer["seconds"], layer["crf"], layer["steps"], layer["magcache_K"]) == (2.5, 18, 7, 2)
    assert "total_second_length" not in layer and "mp4_crf" not in layer


@pytest.mark.slow
def test_jobs_file_survives_bad_jobs(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "good.mp4"
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([
        json.dumps({"image": str(tmp_path / "missing.png"), "prompt": "nothing"}),
        "# a comment line, then a blank one",
        "",
        "{not json",
        json.dumps({"image": str(image), "prompt": "a blue box", "output": str(out), "preset": "E015K4R02"}),
        json.dumps({"image": str(image), "magcache_K": 0}),
    ]) + "\n")
    rc = main(["--jobs", str(jobs), "--tiny", "--seconds", "1", "--steps", "6", "--no-progress",
                   "--outputs-dir", str(tmp_path / "outputs")])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "line 1: invalid" in printed and "file not found" in printed
    assert "line 4: invalid" in printed and "not valid JSON" in printed
    assert "line 6: invalid" in printed and "--magcache-K must be an integer from 1 to 10" in printed
    assert "line 5: done" in printed
    # the app's per-section summary for the good job
    assert "Section 1/1: computed" in printed and "Total: computed" in printed
    # 1 s at 30 fps = 1 section of 9 latents; with the start latent 10 latents -> 4*10-3 frames
    assert out.is_file() and frame_count(out) == 4 * (9 + 1) - 3


@pytest.mark.slow
def test_single_job_writes_output_and_calibration_profile(tmp_path: Path, image: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "video.mp4"
    rc = main(["--image", str(image), "--prompt", "calibrate me", "--tiny", "--seconds", "1", "--steps", "5",
                   "--calibrate", "--output", str(out), "--no-progress", "--outputs-dir", str(tmp_path / "o"),
                   "--profiles-dir", str(tmp_path / "profiles")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Calibration profile:" in printed and f"Saved as: {out}" in printed
    profiles = list((tmp_path / "profiles").glob("*.json"))
    assert len(profiles) == 1
    data = json.loads(profiles[0].read_text())
    assert data["variant"] == "framepack" and data["num_steps"] == 5 and len(data["ratios"]) == 5
    assert frame_count(out) == 37


def test_ray_flag_without_ray_names_the_install_command(image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    import sys

    from magcache_framepack import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))    # main() sets it when unset; keep it test-local
    monkeypatch.setitem(sys.modules, "ray", None)          # as if Ray were not installed: `import ray` fails
    monkeypatch.delitem(sys.modules, "magcache_framepack.runners.ray", raising=False)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(image)}) + "\n")
    assert main(["--jobs", str(jobs), "--tiny", "--ray"]) == 2
    assert "pip install -r requirements-ray.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        app.main("framepack", ["--tiny", "--ray"])
    assert "pip install -r requirements-ray.txt" in str(exc.value.code)
    with pytest.raises(SystemExit):
        main(["--image", str(image), "--tiny", "--ray"])     # --ray runs a jobs file
    assert "--ray runs a --jobs file" in capsys.readouterr().err


def test_a_replay_may_not_overwrite_its_own_record(tmp_path: Path, image: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from magcache_framepack.records import FORMAT

    record = tmp_path / "clip.json"
    record.write_text(json.dumps({"format": FORMAT, "prompt": "p", "n_prompt": "", "seed": 4, "variant": "framepack",
                                  "tiny": True, "settings": {"steps": 4}}))
    for output in ("clip.mp4", "clip.json"):
        with pytest.raises(SystemExit) as exc:
            main(["--replay", str(record), "--image", str(image), "--output", str(tmp_path / output)])
        assert exc.value.code == 2
        assert "would overwrite the record being replayed" in capsys.readouterr().err
    assert json.loads(record.read_text())["settings"] == {"steps": 4}
    # a record whose settings are not an object: one line, no traceback
    record.write_text(json.dumps({"format": FORMAT, "prompt": "p", "settings": None}))
    with pytest.raises(SystemExit):
        main(["--replay", str(record), "--image", str(image)])
    err = capsys.readouterr().err
    assert "lacks" in err and "Traceback" not in err


def test_a_calibration_grid_of_resolutions_alone_runs_each_resolution(image: Path) -> None:
    from magcache_framepack.cli import calibration_grid, command_line_layer, planned_runs

    args = build_parser().parse_args(["--image", str(image), "--tiny", "--calibrate", "--resolutions", "64,96",
                                      "--output", "cal.mp4"])
    runs = planned_runs(args, command_line_layer(args), calibration_grid(args), cuda=False)
    assert [(r["resolution"], r["steps"], r["output"]) for r in runs] == \
        [(64, 25, "cal-64px-25steps.mp4"), (96, 25, "cal-96px-25steps.mp4")]


def test_output_paths_that_cannot_be_written_are_refused_before_loading(
        tmp_path: Path, image: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from magcache_framepack import models as models_module

    def no_models(*a: object, **k: object) -> None:
        raise AssertionError("models were loaded for a job whose output cannot be written")

    monkeypatch.setattr(models_module, "load_models", no_models)
    a_file = tmp_path / "some.png"
    a_file.write_bytes(b"not a folder")
    cases = [(["--output", str(a_file / "out.mp4")], f"--output {a_file / 'out.mp4'}: cannot write there: "
                                                     f"{a_file} is a file, not a folder"),
             (["--outputs-dir", str(a_file / "outs")], f"{a_file} is a file, not a folder"),
             (["--calibrate", "--profiles-dir", str(a_file)], f"--profiles-dir {a_file}: cannot write there")]
    if Path("/proc/self").is_dir():          # Linux: a folder nobody can write files in
        cases.append((["--output", "/proc/out.mp4"], "no file can be written in /proc"))
    for extra, expected in cases:
        with pytest.raises(SystemExit) as exc:
            main(["--image", str(image), "--tiny", *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert a_file.read_bytes() == b"not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some.png", "start.png"]      # nothing created
    # a jobs line with such an output is refused with its line number; the file goes on
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(image), "output": str(a_file / "x.mp4")}) + "\n")
    assert main(["--jobs", str(jobs), "--tiny"]) == 1
    assert f"line 1: invalid: --output {a_file / 'x.mp4'}: cannot write there" in capsys.readouterr().out


# --- --target-speedup ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--target-speedup", "2", "--magcache-thresh", "0.1"], "give it without --magcache-thresh"),
    (["--target-speedup", "2", "--magcache-K", "3"], "give it without --magcache-K"),
    (["--target-speedup", "2", "--retention-ratio", "0.2"], "give it without --retention-ratio"),
    (["--target-speedup", "2", "--preset", "E015K4R02"], "give it without --preset"),
    (["--target-speedup", "0.5"], "--target-speedup must be a number from 1 to 10"),
    (["--target-speedup", "9"], "--target-speedup 9: no setting reaches a 9.00x speed-up at 25 steps"),
    (["--target-speedup", "2", "--cache", "off"], "target_speedup = 2.0: plans MagCache's skips"),
    (["--target-speedup", "2", "--calibrate"], "target_speedup = 2.0: plans MagCache's skips"),
])
def test_target_speedup_refusals_are_one_line_before_models_load(
        image: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        extra: list[str], expected: str) -> None:
    from magcache_framepack import models as models_module

    def no_models(*a, **k):
        raise AssertionError("models were loaded for a refused job")

    monkeypatch.setattr(models_module, "load_models", no_models)
    with pytest.raises(SystemExit) as exc:
        main(["--image", str(image), "--tiny", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and expected in err and "Traceback" not in err


def test_an_unreachable_target_names_the_fastest_reachable_speedup(image: Path, capsys: pytest.CaptureFixture) -> None:
    import magcache_core as mc

    from magcache_framepack.job import find_bucket
    from magcache_framepack.jobfiles import load_image

    img = load_image(str(image))
    height, width = find_bucket(img.shape[0], img.shape[1], 128)       # tiny models' bucket resolution
    ratios, _ = mc.library_ratios("framepack", mc.frame_resolution(height, width), 25, "magnitude")
    fastest = max(c.speedup for c in mc.plan_candidates(ratios, 25))
    with pytest.raises(SystemExit):
        main(["--image", str(image), "--tiny", "--target-speedup", "9"])
    assert f"the fastest setting reaches {fastest:.2f}x" in capsys.readouterr().err


def test_target_speedup_in_job_lines_and_layers() -> None:
    assert normalise_job_line({"target-speedup": 2})["target_speedup"] == 2.0
    assert normalise_job_line({"target_speedup": None})["target_speedup"] is None
    with pytest.raises(JobError, match="give it without --magcache-thresh, --magcache-K"):
        normalise_job_line({"target_speedup": 2, "magcache_thresh": 0.1, "magcache_K": 3})
    with pytest.raises(JobError, match="--target-speedup must be a number"):
        normalise_job_line({"target_speedup": "fast"})
    # a later layer's explicit settings replace an earlier layer's target, and the other way round
    assert merge_values({"target_speedup": 2.0}, {"magcache_thresh": 0.2})["target_speedup"] is None
    assert merge_values({"magcache_thresh": 0.2}, {"target_speedup": 2.0})["target_speedup"] == 2.0
    assert merge_values({"target_speedup": 2.0}, {"seed": 3})["target_speedup"] == 2.0


def test_the_record_keeps_the_target_and_the_settings_the_planner_chose(tmp_path: Path, image: Path) -> None:
    import magcache_core as mc

    from magcache_framepack.records import read_record
    from magcache_framepack.sensitivity import framepack_step_weights

    out = tmp_path / "fast.mp4"
    rc = main(["--image", str(image), "--prompt", "x", "--tiny", "--seconds", "1", "--steps", "10",
               "--target-speedup", "1.25", "--output", str(out), "--no-progress", "--outputs-dir",
               str(tmp_path / "o")])
    assert rc == 0
    record = read_record(out.with_suffix(".json"))
    settings, magcache = record["settings"], record["magcache"]
    assert settings["target_speedup"] == 1.25
    frame = record["frame"]
    weights = framepack_step_weights(10, mc.frame_resolution(frame["height"], frame["width"]), 9)
    chosen = mc.plan_for_target(magcache["ratios"], 10, 1.25, step_weights=weights).chosen
    assert magcache["planned_error"] == pytest.approx(chosen.planned_error, abs=1e-12)
    assert (settings["magcache_thresh"], settings["magcache_K"], settings["retention_ratio"]) == \
        (chosen.magcache_thresh, chosen.magcache_K, chosen.retention_ratio)
    assert (magcache["magcache_thresh"], magcache["magcache_K"], magcache["retention_ratio"]) == \
        (chosen.magcache_thresh, chosen.magcache_K, chosen.retention_ratio)
    assert len(magcache["computed_steps"]) == chosen.computed_steps and 10 / chosen.computed_steps >= 1.25
    # replaying the record plans the same again
    from magcache_framepack.cli import command_line_layer, planned_runs

    args = build_parser().parse_args(["--replay", str(out.with_suffix(".json")), "--output",
                                      str(tmp_path / "again.mp4")])
    values = planned_runs(args, command_line_layer(args), [(None, None)], cuda=False)[0]
    assert values["target_speedup"] == 1.25
