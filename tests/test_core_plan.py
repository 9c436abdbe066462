"""The skip plan, ratio resampling, configuration and profiles: pure functions, no model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import magcache_core as mc


# --- an independent restatement of the published rule -------------------------------------------

def reference_resample(table, n, mode):
    table = np.asarray(table, dtype=np.float64)
    m = len(table)
    if n == m:
        return table
    if mode == "nearest":
        if n == 1:
            return table[-1:]
        return table[np.round(np.arange(n) * ((m - 1) / (n - 1))).astype(int)]
    if n == 1:
        return np.ones(1)
    cum = np.concatenate([[0.0], np.cumsum(np.log(table[1:]))])
    c = np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, m), cum)
    return np.concatenate([[1.0], np.exp(np.diff(c))])


def reference_plan(table, n, thresh, k, retention, mode="magnitude"):
    r = reference_resample(table, n, mode)
    skipped = []
    acc = {"ratio": 1.0, "err": 0.0, "steps": 0}
    for t in range(n):
        if t == 0:
            acc = {"ratio": 1.0, "err": 0.0, "steps": 0}
        if t >= int(retention * n) and t >= 1:
            acc["ratio"] = acc["ratio"] * float(r[t])
            acc["err"] = acc["err"] + abs(1 - acc["ratio"])
            acc["steps"] += 1
            if acc["err"] <= thresh and acc["steps"] <= k and abs(1 - float(r[t])) <= 0.06:
                skipped.append(True)
                continue
            acc = {"ratio": 1.0, "err": 0.0, "steps": 0}
        skipped.append(False)
    return skipped


def edge_thresholds(table):
    """Thresholds equal to errors the rule actually accumulates: `<=` must admit them exactly."""
    out = set()
    for start in range(1, len(table)):
        ratio, err = 1.0, 0.0
        for t in range(start, min(start + 5, len(table))):
            ratio *= table[t]
            err += abs(1 - ratio)
            out.add(err)
    return sorted(x for x in out if x <= 1.0)


TABLES = {"framepack": mc.FRAMEPACK_MAG_RATIOS, "f1": mc.FRAMEPACK_F1_MAG_RATIOS}


@pytest.mark.parametrize("variant", sorted(TABLES))
def test_plan_matches_rule_on_published_tables(variant):
    table = TABLES[variant]
    thresholds = sorted(set(np.round(np.linspace(0.0, 1.0, 201), 6).tolist()) | set(edge_thresholds(table)))
    checked = 0
    for thresh in thresholds:
        for k in range(1, 7):
            for retention in (0.0, 0.04, 0.1, 0.2, 0.29, 0.5, 0.96):
                got = mc.skip_schedule(table, 25, thresh, k, retention)
                assert got == reference_plan(table, 25, thresh, k, retention), (thresh, k, retention)
                checked += 1
    assert checked > 8000


@pytest.mark.parametrize("n", [1, 2, 3, 7, 13, 24, 26, 49, 51, 100])
@pytest.mark.parametrize("mode", ["nearest", "magnitude"])
def test_plan_matches_rule_on_resampled_tables(n, mode):
    for thresh in (0.0, 0.02, 0.06, 0.1, 0.15, 0.3, 1.0):
        for k in range(1, 6):
            for retention in (0.0, 0.2, 0.29):
                got = mc.skip_schedule(mc.FRAMEPACK_MAG_RATIOS, n, thresh, k, retention, resample=mode)
                assert got == reference_plan(mc.FRAMEPACK_MAG_RATIOS, n, thresh, k, retention, mode)


def test_published_step_counts():
    # E015K4R02 computes 11 of 25 steps on FramePack and 10 on F1: the published 2.25x / 2.45x.
    assert mc.skip_schedule(mc.FRAMEPACK_MAG_RATIOS, 25, 0.15, 4, 0.2).count(False) == 11
    assert mc.skip_schedule(mc.FRAMEPACK_F1_MAG_RATIOS, 25, 0.15, 4, 0.2).count(False) == 10
    assert mc.MagCacheConfig.from_preset("E015K4R02").schedule().count(False) == 11


def test_retention_truncates_like_int():
    ratios = [1.0] * 100
    plan = mc.skip_schedule(ratios, 100, 1.0, 100, 0.29)
    assert int(0.29 * 100) == 28
    assert plan.index(True) == 28


def test_first_step_always_computed_and_zero_thresh_still_skips_exact_ones():
    assert mc.skip_schedule([1.0] * 10, 10, 0.0, 1, 0.0) == [False] + [True, False] * 4 + [True]


# --- resampling ------------------------------------------------------------------------------------

def magnitudes_to_ratios(mags):
    return [1.0] + [mags[i] / mags[i - 1] for i in range(1, len(mags))]


def test_nearest_is_the_reference_stretch():
    table = list(mc.FRAMEPACK_MAG_RATIOS)
    assert mc.resample_mag_ratios(table, 25, "nearest") == table
    assert mc.resample_mag_ratios(table, 1, "nearest") == [table[-1]]
    got = mc.resample_mag_ratios(table, 50, "nearest")
    # index round(i * 24 / 49), half to even
    assert got == [table[round(i * (24 / 49))] for i in range(50)]
    assert got[:4] == [table[0], table[0], table[1], table[1]]


def test_magnitude_resampling_is_exact_on_a_log_linear_curve():
    a = -0.8
    table = magnitudes_to_ratios([math.exp(a * j / 24) for j in range(25)])
    for n in (5, 13, 24, 26, 50, 97):
        got = mc.resample_mag_ratios(table, n)
        assert got[0] == 1.0
        assert got[1:] == pytest.approx([math.exp(a / (n - 1))] * (n - 1), rel=1e-12)


def test_magnitude_resampling_keeps_the_curve_of_a_smooth_magnitude():
    f = lambda s: math.sin(3 * s) + 0.5 * s * s   # log-magnitude over normalised time
    table = magnitudes_to_ratios([math.exp(f(j / 24)) for j in range(25)])
    # 49 steps put a new step on every old one: the cumulative curve is hit exactly there
    fine = mc.resample_mag_ratios(table, 49)
    for j in range(1, 25):
        assert fine[2 * j - 1] * fine[2 * j] == pytest.approx(table[j], rel=1e-12)
    # any N: each new ratio is the curve's change over its step, up to the table's resolution
    for n in (9, 13, 40, 50):
        got = mc.resample_mag_ratios(table, n)
        for i in range(1, n):
            truth = f(i / (n - 1)) - f((i - 1) / (n - 1))
            assert math.log(got[i]) == pytest.approx(truth, abs=5e-3)
        assert math.prod(got) == pytest.approx(math.prod(table), rel=1e-12)


def test_nearest_stretch_distorts_the_total_change_magnitude_does_not():
    table = mc.FRAMEPACK_MAG_RATIOS
    total = math.prod(table)
    assert math.prod(mc.resample_mag_ratios(table, 50, "magnitude")) == pytest.approx(total, rel=1e-12)
    assert abs(math.log(math.prod(mc.resample_mag_ratios(table, 50, "nearest"))) - math.log(total)) > 0.1


def test_equal_length_table_used_as_is():
    assert mc.resample_mag_ratios(mc.FRAMEPACK_F1_MAG_RATIOS, 25) == list(mc.FRAMEPACK_F1_MAG_RATIOS)


# --- configuration and profiles ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    ({"magcache_thresh": -0.1}, "magcache_thresh = -0.1: must be a finite number >= 0"),
    ({"magcache_thresh": float("nan")}, "magcache_thresh = nan"),
    ({"magcache_thresh": float("inf")}, "finite"),
    ({"magcache_K": 0}, "magcache_K = 0: must be an integer >= 1"),
    ({"magcache_K": 2.5}, "magcache_K = 2.5: must be an integer >= 1"),
    ({"magcache_K": True}, "magcache_K = True"),
    ({"retention_ratio": 1.0}, "retention_ratio = 1.0: must be in [0, 1)"),
    ({"retention_ratio": -0.01}, "must be in [0, 1)"),
    ({"num_steps": 0}, "num_steps = 0: must be an integer >= 1"),
    ({"mag_ratios": []}, "mag_ratios is empty"),
    ({"mag_ratios": [1.0, float("nan")]}, "mag_ratios[1] = nan: each ratio must be a positive finite number"),
    ({"mag_ratios": [1.0, 0.0]}, "mag_ratios[1] = 0.0"),
    ({"mag_ratios": [1.0, -1.0]}, "positive finite"),
    ({"mag_ratios": [1.0, "x"]}, "is not a number"),
    ({"resample": "linear"}, "resample = 'linear': must be one of magnitude, nearest"),
    ({"variant": "sdxl"}, "variant = 'sdxl'"),
])
def test_bad_config_says_what_is_wrong(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        mc.MagCacheConfig(**kwargs)
    assert fragment in str(err.value)


def test_integral_float_k_is_accepted():
    assert mc.MagCacheConfig(magcache_K=4.0).magcache_K == 4


def test_unknown_preset():
    with pytest.raises(ValueError, match="choose one of E010K3R02, E015K4R02"):
        mc.MagCacheConfig.from_preset("fast")


def test_profile_round_trip(tmp_path):
    profile = mc.MagCacheProfile(variant="f1", num_steps=3, resolution=640, ratios=[1.0, 1.1, 0.9],
                                 ratio_std=[0.0, 0.01, 0.02], cosine_distance=[0.0, 0.1, 0.2], runs=4)
    path = profile.save(tmp_path / "p" / "f1.json")
    data = json.loads(path.read_text())
    assert data["variant"] == "f1" and data["num_steps"] == 3 and data["resolution"] == 640
    assert data["ratios"] == [1.0, 1.1, 0.9] and "created" in data
    loaded = mc.MagCacheProfile.load(path)
    assert loaded == profile
    config = mc.MagCacheConfig(mag_ratios=str(path), num_steps=3, variant="f1")
    assert config.mag_ratios == (1.0, 1.1, 0.9) and config.profile == profile
    assert mc.MagCacheConfig(mag_ratios=loaded, num_steps=3).mag_ratios == (1.0, 1.1, 0.9)


def test_profile_of_another_variant_is_refused(tmp_path):
    path = mc.MagCacheProfile(variant="f1", num_steps=2, ratios=[1.0, 1.0]).save(tmp_path / "f1.json")
    with pytest.raises(ValueError, match="calibrated for 'f1', not 'framepack'"):
        mc.MagCacheConfig(mag_ratios=path, variant="framepack")


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ('{"variant": "f1"}', "is not a MagCache profile"),
    (json.dumps({"format": mc.PROFILE_FORMAT, "variant": "f1"}), "lacks num_steps, ratios"),
    (json.dumps({"format": mc.PROFILE_FORMAT, "variant": "f1", "num_steps": 3, "ratios": [1.0, 1.0]}),
     "num_steps = 3 but it holds 2 ratios"),
    (json.dumps({"format": mc.PROFILE_FORMAT, "variant": "f1", "num_steps": 2, "ratios": [1.0, -2]}),
     "positive finite"),
])
def test_bad_profiles_are_refused_clearly(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.json") as err:
        mc.MagCacheProfile.load(path)
    assert fragment in str(err.value)


def test_missing_profile_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read MagCache profile"):
        mc.MagCacheConfig(mag_ratios=tmp_path / "nope.json")


def test_calibrate_plan_skips_nothing():
    assert mc.MagCacheConfig(calibrate=True, magcache_thresh=1.0).schedule() == [False] * 25


def test_numpy_and_tensor_tables_are_accepted():
    import torch
    table = np.array(mc.FRAMEPACK_MAG_RATIOS)
    expected = mc.skip_schedule(mc.FRAMEPACK_MAG_RATIOS, 25, 0.15, 4, 0.2)
    assert mc.skip_schedule(table, 25, 0.15, 4, 0.2) == expected
    assert mc.skip_schedule(torch.tensor(table), 25, 0.15, 4, 0.2) == expected
    assert mc.MagCacheConfig(mag_ratios=table).mag_ratios == mc.FRAMEPACK_MAG_RATIOS


def test_profile_of_another_model_is_refused(tmp_path):
    path = mc.MagCacheProfile(variant="framepack", num_steps=2, ratios=[1.0, 1.1], model="tiny-random").save(
        tmp_path / "tiny.json")
    with pytest.raises(ValueError, match="calibrated on 'tiny-random', not 'lllyasviel/FramePackI2V_HY'"):
        mc.MagCacheConfig(mag_ratios=path, num_steps=2, model="lllyasviel/FramePackI2V_HY")
    assert mc.MagCacheConfig(mag_ratios=path, num_steps=2, model="tiny-random").profile.model == "tiny-random"
    assert mc.MagCacheConfig(mag_ratios=path, num_steps=2).mag_ratios == (1.0, 1.1)   # no model given: no check


@pytest.mark.parametrize("fields, fragment", [
    ({"num_steps": True, "ratios": [1.0]}, "num_steps = True"),
    ({"ratio_std": [0.0]}, "ratio_std must be a list of 2 numbers"),
    ({"cosine_distance": "x"}, "cosine_distance must be a list of 2 numbers"),
    ({"runs": 0}, "runs = 0: must be an integer >= 1"),
    ({"resolution": "640"}, "resolution = '640'"),
    ({"model": 3}, "model = 3"),
])
def test_profile_fields_are_checked(fields, fragment):
    with pytest.raises(ValueError) as err:
        mc.MagCacheProfile(**{"variant": "f1", "num_steps": 2, "ratios": [1.0, 1.0], **fields})
    assert fragment in str(err.value)


# --- the target-speed-up planner against a brute force over its grid --------------------------------

def reference_planned_error(table, n, thresh, k, retention, mode="magnitude", cosine=None, weights=None):
    """The planned error restated: split the plan into runs of skips after each computed step c.  Over step i the
    residual moves by sqrt((1-r_i)^2 + 2 r_i d_i) of its size (law of cosines), which is prod(r_{c+1..i-1}) of
    r_c's; a skip at t is off by at most the sum of those moves from c+1 to t (triangle inequality); a run adds
    its skips' bounds times |w|, runs add in squares."""
    plan = reference_plan(table, n, thresh, k, retention, mode)
    r = reference_resample(table, n, mode)
    d = 1.0 - reference_resample([1.0 - x for x in cosine], n, mode) if cosine is not None else np.zeros(n)
    w = np.ones(n) if weights is None else np.abs(np.asarray(weights, dtype=np.float64))
    runs = []
    for t, skip in enumerate(plan):
        if skip:
            runs[-1].append(t)
        else:
            runs.append([])
    squares = []
    for run in runs:
        move = [np.prod(r[run[0]:i]) * math.sqrt((1 - r[i]) ** 2 + 2 * r[i] * d[i]) for i in run]
        squares.append(sum(w[t] * sum(move[:j + 1]) for j, t in enumerate(run)) ** 2)
    return math.sqrt(sum(squares))


def brute_force_target(table, n, target, grid, mode="magnitude", cosine=None, weights=None):
    """Every grid setting, its speed-up and error; the best of those that reach the target, else None."""
    rows = []
    for thresh in grid[0]:
        for k in grid[1]:
            for retention in grid[2]:
                computed = reference_plan(table, n, thresh, k, retention, mode).count(False)
                rows.append((reference_planned_error(table, n, thresh, k, retention, mode, cosine, weights),
                             -(n / computed), thresh, k, retention, computed))
    reaching = sorted(row for row in rows if -row[1] >= target)
    return (reaching[0] if reaching else None), rows


DEFAULT_GRID = (mc.TARGET_THRESHOLDS, mc.TARGET_KS, mc.TARGET_RETENTIONS)


def error_model(kind, n):
    """No extra tables, or a calibration's cosine distances (25 entries) with step weights of mixed sign for n steps."""
    if kind == "ratios only":
        return None, None
    rng = np.random.default_rng(n)
    cosine = [0.0] + [float(x) for x in rng.uniform(0.0, 0.3, 24)]
    weights = [float(x) for x in rng.uniform(-0.6, 0.2, n)]
    return cosine, weights


@pytest.mark.parametrize("kind", ["ratios only", "cosine distances and step weights"])
@pytest.mark.parametrize("variant", sorted(TABLES))
@pytest.mark.parametrize("n,target", [(25, 1.0), (25, 1.5), (25, 2.0), (25, 2.5), (50, 2.0), (50, 3.0), (10, 1.25)])
def test_target_planner_equals_a_brute_force_over_its_grid(variant, n, target, kind):
    cosine, weights = error_model(kind, n)
    best, rows = brute_force_target(TABLES[variant], n, target, DEFAULT_GRID, cosine=cosine, weights=weights)
    assert best is not None
    plan = mc.plan_for_target(TABLES[variant], n, target, cosine_distance=cosine, step_weights=weights)
    c = plan.chosen
    assert (c.magcache_thresh, c.magcache_K, c.retention_ratio, c.computed_steps) == best[2:]
    assert c.planned_error == pytest.approx(best[0], abs=1e-12) and c.speedup >= target
    assert c.planned_error == pytest.approx(
        mc.planned_error(TABLES[variant], n, c.magcache_thresh, c.magcache_K, c.retention_ratio,
                         cosine_distance=cosine, step_weights=weights), abs=1e-12)
    # the chosen setting's plan is the one the schedule runs
    assert mc.skip_schedule(TABLES[variant], n, c.magcache_thresh, c.magcache_K, c.retention_ratio).count(False) \
        == c.computed_steps
    # every candidate, and the curve: per speed-up, the least error of the candidates at least that fast
    assert len(plan.candidates) == len(rows)
    got = sorted((x.planned_error, -x.speedup, x.magcache_thresh, x.magcache_K, x.retention_ratio,
                  x.computed_steps) for x in plan.candidates)
    assert [g[2:] for g in got] == [r[2:] for r in sorted(rows)]
    speeds = sorted({-r[1] for r in rows})
    expected_curve = [(s, min(r[0] for r in rows if -r[1] >= s)) for s in speeds]
    assert [p[0] for p in plan.curve()] == pytest.approx([e[0] for e in expected_curve])
    assert [p[1] for p in plan.curve()] == pytest.approx([e[1] for e in expected_curve], abs=1e-12)


def test_target_planner_on_a_small_custom_grid_and_resampled_table():
    grid = ((0.05, 0.1, 0.2), (2, 4), (0.1, 0.25))
    for target in (1.2, 1.8, 2.2):
        best, _ = brute_force_target(mc.FRAMEPACK_MAG_RATIOS, 40, target, grid, mode="nearest")
        plan = mc.plan_for_target(mc.FRAMEPACK_MAG_RATIOS, 40, target, resample="nearest", thresholds=grid[0],
                                  ks=grid[1], retentions=grid[2])
        if best is None:
            continue
        c = plan.chosen
        assert (c.magcache_thresh, c.magcache_K, c.retention_ratio, c.computed_steps) == best[2:]


def test_unreachable_target_says_so_with_the_fastest_reachable_speedup():
    best, rows = brute_force_target(mc.FRAMEPACK_MAG_RATIOS, 25, 6.0, DEFAULT_GRID)
    assert best is None
    fastest = max(-r[1] for r in rows)
    with pytest.raises(mc.TargetUnreachable) as exc:
        mc.plan_for_target(mc.FRAMEPACK_MAG_RATIOS, 25, 6.0)
    msg = str(exc.value)
    assert "\n" not in msg and "6.00x" in msg and f"the fastest setting reaches {fastest:.2f}x" in msg
    # just at the fastest reachable speed-up it is reachable again
    assert mc.plan_for_target(mc.FRAMEPACK_MAG_RATIOS, 25, fastest).chosen.speedup == pytest.approx(fastest)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("bad", [0.5, -1, float("nan"), float("inf"), "2", True, None])
def test_bad_target_is_refused(bad):
    with pytest.raises(ValueError, match="target_speedup"):
        mc.plan_for_target(mc.FRAMEPACK_MAG_RATIOS, 25, bad)


def test_planned_error_is_zero_without_skips_and_grows_with_the_threshold():
    assert mc.planned_error(mc.FRAMEPACK_MAG_RATIOS, 25, 0.0, 1, 0.99) == 0.0
    errors = [mc.planned_error(mc.FRAMEPACK_MAG_RATIOS, 25, t, 4, 0.2) for t in (0.02, 0.06, 0.1, 0.2)]
    assert errors == sorted(errors) and errors[-1] > 0


def test_planned_error_by_hand_on_a_four_step_table():
    table, weights = (1.0, 1.03, 0.95, 1.05), (1.0, 2.0, -1.0, 0.5)
    # threshold 0.1, K 3: errors 0.03, 0.0515, 0.078925 stay within it, so steps 1-3 are one run of skips
    assert mc.skip_schedule(table, 4, 0.1, 3, 0.0) == [False, True, True, True]
    # magnitude only: the residual moves 0.03, then 0.05 of its size 1.03, then 0.05 of its size 0.9785;
    # the stand-in is off by at most the moves so far: 0.03, 0.0815, 0.130425 (where |1 - A| would say
    # 0.03, 0.0215, 0.027425: a size that returns does not bring the residual back)
    drift = (0.03, 0.03 + 1.03 * 0.05, 0.03 + 1.03 * 0.05 + 1.03 * 0.95 * 0.05)
    assert mc.planned_error(table, 4, 0.1, 3, 0.0) == pytest.approx(sum(drift), abs=1e-12)
    assert mc.planned_error(table, 4, 0.1, 3, 0.0) == pytest.approx(0.241925, abs=1e-12)
    # the weights count with their size: the tables are too coarse to trust a cancellation
    assert mc.planned_error(table, 4, 0.1, 3, 0.0, step_weights=weights) == pytest.approx(
        2.0 * drift[0] + 1.0 * drift[1] + 0.5 * drift[2], abs=1e-12)
    # a step that turns the residual by cosine distance 0.1 moves it sqrt(0.03^2 + 2 * 1.03 * 0.1) of its size
    cosine = (0.0, 0.1, 0.0, 0.0)
    turned = math.sqrt(0.03 ** 2 + 2 * 1.03 * 0.1)
    drift = (turned, turned + 1.03 * 0.05, turned + 1.03 * 0.05 + 1.03 * 0.95 * 0.05)
    assert mc.planned_error(table, 4, 0.1, 3, 0.0, cosine_distance=cosine, step_weights=weights) == pytest.approx(
        2.0 * drift[0] + 1.0 * drift[1] + 0.5 * drift[2], abs=1e-12)
    # K 1 splits the run: the errors no longer share a residual, so they add in squares
    assert mc.skip_schedule(table, 4, 0.1, 1, 0.0) == [False, True, False, True]
    assert mc.planned_error(table, 4, 0.1, 1, 0.0, step_weights=weights) == pytest.approx(
        math.hypot(2.0 * 0.03, 0.5 * 0.05), abs=1e-12)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"step_weights": [1.0] * 24}, "step_weights has 24 entries for 25 steps"),
    ({"step_weights": [1.0] * 24 + [float("nan")]}, "step_weights[24] = nan"),
    ({"cosine_distance": [0.1] * 10}, "cosine_distance has 10 entries for a table of 25 ratios"),
    ({"cosine_distance": [0.1] * 24 + [2.5]}, "cosine_distance[24] = 2.5: each entry must be a number from 0 to 2"),
    ({"step_weights": "1.0"}, "step_weights must be a sequence of numbers"),
])
def test_bad_error_tables_say_what_is_wrong(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        mc.planned_error(mc.FRAMEPACK_MAG_RATIOS, 25, 0.1, 3, 0.2, **kwargs)
    assert fragment in str(err.value)


def test_a_config_plans_its_error_with_its_profiles_cosine_distances(tmp_path):
    cosine = [0.0] + [0.05] * 24
    profile = mc.MagCacheProfile(variant="framepack", num_steps=25, ratios=list(mc.FRAMEPACK_MAG_RATIOS),
                                 cosine_distance=cosine)
    weights = [0.1] * 25
    config = mc.MagCacheConfig(mag_ratios=profile.save(tmp_path / "p.json"), step_weights=weights)
    assert config.planned_error() == pytest.approx(reference_planned_error(
        mc.FRAMEPACK_MAG_RATIOS, 25, config.magcache_thresh, config.magcache_K, config.retention_ratio,
        cosine=cosine, weights=weights), abs=1e-12) and config.planned_error() > 0
    bare = mc.MagCacheConfig()
    assert bare.error_tables() == {"cosine_distance": None, "step_weights": None}
    assert mc.MagCacheConfig(calibrate=True).planned_error() == 0.0
    with pytest.raises(ValueError, match="step_weights has 3 entries for 25 steps"):
        mc.MagCacheConfig(step_weights=[1.0, 2.0, 3.0])
    # a profile whose cosine distances the planner cannot use is refused on load, before any sampling
    (tmp_path / "bad.json").write_text(json.dumps({**profile.to_json(), "cosine_distance": [-0.5] * 25}))
    with pytest.raises(ValueError, match=r"cosine_distance\[0\] = -0.5: each entry must be a number from 0 to 2"):
        mc.MagCacheConfig(mag_ratios=tmp_path / "bad.json")
