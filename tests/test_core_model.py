"""MagCache on FramePack's real packed transformer and real UniPC sampler (tiny, random weights, CPU).

Expectations come from FramePack's own, unpatched forward: a wrapper counts
calls to place them in (step, CFG branch), takes the plan from the published
rule restated in test_core_plan, and on planned skips replaces the block
stack's output through forward hooks with (stack input + the branch's last
residual).  Nothing of magcache_core's forward is used to build them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import magcache_core as mc
from conftest import build_transformer, make_section, run_section
from test_core_plan import reference_plan


class HookedReference:
    """FramePack's forward with the block stack replaced on skipped steps, via hooks."""

    def __init__(self, model: torch.nn.Module, plan: list[bool], branches: int) -> None:
        self.model, self.plan, self.branches = model, plan, branches
        self.device = torch.device("cpu")
        self.calls = 0
        self.residual: dict[int, torch.Tensor] = {}
        self.residual_tails: list[torch.Tensor] = []   # branch 0, per computed step: output tokens only
        self.out_tokens = 0
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        self.first, self.last = blocks[0], blocks[-1]
        self.handles = [self.first.register_forward_pre_hook(self._grab_input)]
        self.handles += [b.register_forward_hook(self._block_out) for b in blocks]

    @property
    def step(self) -> int:
        return self.calls // self.branches

    @property
    def branch(self) -> int:
        return self.calls % self.branches

    def _skipping(self) -> bool:
        return self.step < len(self.plan) and self.plan[self.step]

    def _grab_input(self, module, args):
        self.stack_in = args[0]

    def _block_out(self, module, args, out):
        if self._skipping():
            hidden = args[0]
            if module is self.first:
                hidden = self.stack_in + self.residual[self.branch]
            return hidden, args[1]
        if module is self.last:
            residual = out[0] - self.stack_in
            self.residual[self.branch] = residual
            if self.branch == 0:
                self.residual_tails.append(residual[:, -self.out_tokens:])
        return out

    def __call__(self, hidden_states, **kwargs):
        _, _, t, h, w = hidden_states.shape
        self.out_tokens = t * (h // 2) * (w // 2)
        out = self.model(hidden_states=hidden_states, **kwargs)
        self.calls += 1
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def expected_latents(model, section, plan, cfg=1.0):
    ref = HookedReference(copy.deepcopy(model), plan, branches=1 if cfg == 1.0 else 2)
    try:
        return run_section(ref, section, cfg=cfg), ref
    finally:
        ref.remove()


class BlockCounter:
    def __init__(self, model: torch.nn.Module, names=("transformer_blocks", "single_transformer_blocks")):
        self.count = 0
        mods = [b for n in names for b in getattr(model, n)]
        self.handles = [m.register_forward_hook(self._hit) for m in mods]
        self.per_call = len(mods)

    def _hit(self, *args):
        self.count += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture()
def model():
    m = build_transformer()
    yield m
    mc.disable_magcache(m)


@pytest.fixture(scope="module")
def baseline(tiny_transformer, section):
    return run_section(tiny_transformer, section)


def never_skipping_config(**kw):
    # every ratio departs from 1 by more than 6%: the rule never skips
    return mc.MagCacheConfig(mag_ratios=[1.0] + [1.2] * 24, magcache_thresh=1.0, magcache_K=5, **kw)


def test_plan_without_skips_is_bitwise_the_unpatched_model(model, section):
    before = run_section(model, section)
    class_forward = type(model).forward
    mc.enable_magcache(model, never_skipping_config())
    assert "forward" in model.__dict__
    with_cache = run_section(model, section)
    mc.disable_magcache(model)
    after = run_section(model, section)
    assert torch.equal(with_cache, before)
    assert torch.equal(after, before)
    assert "forward" not in model.__dict__ and type(model).forward is class_forward
    assert model.forward.__func__ is class_forward


@pytest.mark.parametrize("preset, variant_table", [("E010K3R02", mc.FRAMEPACK_MAG_RATIOS),
                                                   ("E015K4R02", mc.FRAMEPACK_MAG_RATIOS),
                                                   ("E015K4R02", mc.FRAMEPACK_F1_MAG_RATIOS)])
def test_skipping_matches_the_hooked_reference(model, section, preset, variant_table):
    thresh, k, retention = mc.PRESETS[preset]
    plan = reference_plan(variant_table, 25, thresh, k, retention)
    expected, _ = expected_latents(model, section, plan)
    counter = BlockCounter(model)
    state = mc.enable_magcache(model, mc.MagCacheConfig.from_preset(preset, mag_ratios=variant_table))
    got = run_section(model, section)
    counter.remove()
    computed = plan.count(False)
    assert counter.count == computed * counter.per_call
    report = state.last_run
    assert report.status == "complete"
    assert report.skipped == [i for i, s in enumerate(plan) if s]
    assert report.computed == [i for i, s in enumerate(plan) if not s]
    assert torch.equal(got, expected)   # same operations on the same values: bitwise
    # and skipping did change the result: the test could tell a no-op from the real thing
    assert not torch.allclose(got, run_section(build_transformer(), section), atol=1e-4)


def test_cfg_one_plan_per_step_both_branches(model, section):
    plan = reference_plan(mc.FRAMEPACK_MAG_RATIOS, 25, 0.15, 4, 0.2)
    expected, ref = expected_latents(model, section, plan, cfg=3.0)
    assert ref.calls == 50
    counter = BlockCounter(model)
    state = mc.enable_magcache(model, mc.MagCacheConfig.from_preset("E015K4R02"))
    got = run_section(model, section, cfg=3.0)
    counter.remove()
    assert counter.count == 2 * plan.count(False) * counter.per_call
    assert state.last_run.skipped == [i for i, s in enumerate(plan) if s]
    assert torch.equal(got, expected)   # same operations on the same values: bitwise


def test_skipped_steps_run_nothing_the_blocks_would_consume(model, section):
    plan = mc.skip_schedule(mc.FRAMEPACK_MAG_RATIOS, 25, 0.15, 4, 0.2)
    names = ["context_embedder", "image_projection", "rope", "clean_x_embedder.proj",
             "clean_x_embedder.proj_2x", "clean_x_embedder.proj_4x", "x_embedder.proj", "norm_out", "proj_out"]
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(lambda *a, n=name: counts.__setitem__(n, counts[n] + 1)))
    mc.enable_magcache(model, mc.MagCacheConfig.from_preset("E015K4R02"))
    run_section(model, section, cfg=3.0)
    for h in handles:
        h.remove()
    computed = plan.count(False)
    for name in names[:6]:
        per_call = 4 if name == "rope" else 1   # rope: the noisy latents and the three history sets
        assert counts[name] == 2 * computed * per_call, name
    for name in names[6:]:
        assert counts[name] == 2 * 25, name


def test_residual_kept_only_for_output_tokens(model, section):
    state = mc.enable_magcache(model, mc.MagCacheConfig.from_preset("E015K4R02"))
    sizes = []
    run_section(model, section, cfg=3.0, callback=lambda d: sizes.append(state.residual_cache_bytes()))
    out_tokens = 9 * (section.height // 16) * (section.width // 16)
    per_branch = out_tokens * model.inner_dim * 4
    assert max(sizes) == 2 * per_branch
    assert sizes[-1] == 0   # nothing left to skip: nothing held


def test_interrupted_run_then_full_run_equals_clean_run(model, section):
    config = mc.MagCacheConfig.from_preset("E015K4R02")
    mc.enable_magcache(model, config)
    clean = run_section(model, section)

    def stop_at(k):
        def callback(d):
            if d["i"] == k:
                raise KeyboardInterrupt("User ends the task.")
        return callback

    state = mc.enable_magcache(model, config)
    with pytest.raises(KeyboardInterrupt):
        run_section(model, section, callback=stop_at(12))
    assert state.runs[-1].status == "running"
    again = run_section(model, section)
    assert torch.equal(again, clean)
    assert [r.status for r in state.runs] == ["interrupted", "complete"]

    # explicit run scopes: even a run stopped after its very first step leaves nothing behind
    for k in (0, 6):
        with pytest.raises(KeyboardInterrupt):
            with mc.magcache_run(model) as report:
                run_section(model, section, callback=stop_at(k))
        assert report.status == "interrupted"
        with mc.magcache_run(model) as report:
            again = run_section(model, section)
        assert report.status == "complete" and report.computed_count == 11
        assert torch.equal(again, clean)


def test_many_runs_in_a_row_each_follow_the_plan(model, section):
    state = mc.enable_magcache(model, mc.MagCacheConfig.from_preset("E010K3R02", num_steps=13))
    plan = reference_plan(mc.resample_mag_ratios(mc.FRAMEPACK_MAG_RATIOS, 13), 13, 0.10, 3, 0.2)
    outs = [run_section(model, section, steps=13) for _ in range(3)]
    assert len(state.runs) == 3
    for report in state.runs:
        assert report.skipped == [i for i, s in enumerate(plan) if s]
    assert torch.equal(outs[0], outs[2])


def test_only_this_instance_is_patched(model, section):
    other = build_transformer()
    before = run_section(other, section)
    mc.enable_magcache(model, mc.MagCacheConfig.from_preset("E015K4R02"))
    assert "forward" not in other.__dict__ and mc.get_magcache_state(other) is None
    assert torch.equal(run_section(other, section), before)


def test_enable_twice_replaces_settings_and_disable_restores_original(model, section):
    first = mc.enable_magcache(model, mc.MagCacheConfig.from_preset("E010K3R02"))
    run_section(model, section)
    second = mc.enable_magcache(model, mc.MagCacheConfig.from_preset("E015K4R02"))
    assert mc.get_magcache_state(model) is second and second.runs == []
    run_section(model, section)
    assert second.last_run.computed_count == 11 and len(first.runs) == 1
    mc.disable_magcache(model)
    assert "forward" not in model.__dict__ and mc.get_magcache_state(model) is None
    mc.disable_magcache(model)   # harmless when not enabled


def test_context_manager_restores_on_error(model):
    with pytest.raises(RuntimeError, match="boom"):
        with mc.magcache(model, mc.MagCacheConfig()):
            assert mc.get_magcache_state(model) is not None
            raise RuntimeError("boom")
    assert mc.get_magcache_state(model) is None and "forward" not in model.__dict__


def test_an_existing_instance_forward_is_put_back(model):
    wrapped = model.forward
    model.forward = wrapped  # e.g. an accelerate hook installs an instance-level forward
    mc.enable_magcache(model, mc.MagCacheConfig())
    mc.enable_magcache(model, mc.MagCacheConfig())
    mc.disable_magcache(model)
    assert model.__dict__["forward"] is wrapped


def test_enable_refuses_other_models():
    with pytest.raises(TypeError, match="missing: process_input_hidden_states"):
        mc.enable_magcache(torch.nn.Linear(2, 2), mc.MagCacheConfig())
    with pytest.raises(TypeError, match="MagCacheConfig"):
        mc.enable_magcache(build_transformer(), {"magcache_thresh": 0.1})


def test_calibration_equals_independent_norms(model, section):
    expected_run, ref = expected_latents(model, section, [False] * 25, cfg=3.0)
    tails = ref.residual_tails
    assert len(tails) == 25
    state = mc.enable_magcache(model, mc.MagCacheConfig(calibrate=True, magcache_thresh=1.0, magcache_K=5))
    got = run_section(model, section, cfg=3.0)
    assert torch.equal(got, run_section(build_transformer(), section, cfg=3.0))  # nothing skipped
    report = state.last_run
    assert report.skipped == [] and len(report.ratios) == 25 and report.ratios[0] == 1.0
    for t in range(1, 25):
        cur, prev = tails[t].double(), tails[t - 1].double()
        ratio = cur.norm(dim=-1) / prev.norm(dim=-1)
        cos = (cur * prev).sum(-1) / (cur.norm(dim=-1) * prev.norm(dim=-1))
        assert report.ratios[t] == pytest.approx(ratio.mean().item(), rel=1e-5)
        assert report.ratio_std[t] == pytest.approx(ratio.std().item(), rel=1e-4, abs=1e-7)
        assert report.cosine_distance[t] == pytest.approx((1 - cos).mean().item(), rel=1e-3, abs=1e-6)

    # a second run (section): the profile averages both
    second_section = make_section(model, seed=5)
    run_section(model, second_section, cfg=3.0)
    runs = state.calibration_runs()
    assert len(runs) == 2
    profile = state.calibration_profile("framepack", resolution=64)
    assert profile.runs == 2 and profile.num_steps == 25
    for t in range(25):
        assert profile.ratios[t] == pytest.approx((runs[0].ratios[t] + runs[1].ratios[t]) / 2, abs=1e-5)
    assert all(math.isfinite(r) and r > 0 for r in profile.ratios)


def test_calibration_keeps_only_the_previous_residual(model, section):
    state = mc.enable_magcache(model, mc.MagCacheConfig(calibrate=True))
    sizes = []
    run_section(model, section, cfg=3.0, callback=lambda d: sizes.append(state.residual_cache_bytes()))
    out_tokens = 9 * (section.height // 16) * (section.width // 16)
    # one float32 copy of the conditional branch's last residual; nothing kept for reuse
    assert set(sizes) == {out_tokens * model.inner_dim * 4}


def test_calibration_profile_needs_a_finished_run(model):
    state = mc.enable_magcache(model, mc.MagCacheConfig(calibrate=True))
    with pytest.raises(ValueError, match="no complete calibration run"):
        state.calibration_profile("framepack")


class NoRead(torch.Tensor):
    """A tensor that fails when its value is read on the host: what a GPU sync would be."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("a tensor value was read: that is a device sync per call")

    item = tolist = __float__ = __int__ = __bool__ = __index__ = _refuse


def test_steps_branches_and_runs_from_object_identity_and_schedule_views_only():
    state = mc.MagCacheState(mc.MagCacheConfig(num_steps=3), None)

    def place(timestep, key):
        return state.begin_call(timestep, key)

    # FramePack's wrapper: a fresh timestep per step for both branches, one guidance tensor per run
    for _ in range(2):
        guidance = torch.tensor([10000.0]).as_subclass(NoRead)
        got = []
        for sigma in (1.0, 0.5):           # stopped after two of three steps: the next key starts a run
            t = torch.tensor([sigma * 1000]).as_subclass(NoRead)
            got += [place(t, guidance), place(t, guidance)]
        assert got == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.status for r in state.runs] == ["interrupted", "running"]

    # diffusers' pipeline: t.expand(batch) of each entry of scheduler.timesteps, one guidance per call
    state = mc.MagCacheState(mc.MagCacheConfig(num_steps=3), None)
    guidance = torch.tensor([10000.0]).as_subclass(NoRead)
    got = []
    for section in range(2):
        schedule = torch.linspace(1000, 0, 4)[:3].as_subclass(NoRead)
        for i, t in enumerate(schedule):
            if section == 1 and i == 2:
                break
            timestep = t.expand(1)
            got += [place(timestep, guidance), place(timestep, guidance)]
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.status for r in state.runs] == ["complete", "running"]
    # a timestep computed per step is no schedule view; a schedule entry is, at its index
    assert mc._schedule_position(torch.tensor([900.0])) is None
    assert mc._schedule_position(torch.tensor([900.0, 900.0])) is None
    assert mc._schedule_position(schedule[2].expand(2))[1] == 2
