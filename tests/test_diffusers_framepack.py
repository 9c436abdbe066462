"""MagCache on diffusers' FramePack pipeline (tiny, random weights, CPU).

The pipeline is diffusers' own ``HunyuanVideoFramepackPipeline`` with its own
sampling loop, built from tiny components (Llama and CLIP text encoders, SigLIP
image encoder, HunyuanVideo VAE, word-level tokenizers) and a tiny
``HunyuanVideoFramepackTransformer3DModel`` holding the tiny FramePack
transformer's weights.  A call samples two sections of 25 steps.

Expectations never use magcache_core's forward: the plan is the published rule
restated in test_core_plan, and the expected latents come from the unpatched
pipeline with hooks that keep the block stack's residual on computed steps and
replace the stack's output on skipped ones (as test_core_model does for
FramePack's sampler), placing each call in (section, step, branch) by counting.

diffusers 0.33.1 (FramePack's pins) has no such pipeline: the module skips there.
"""

from __future__ import annotations

import pytest
import torch

import magcache_core as mc
from magcache_framepack.models import (Models, TINY_MODEL_ID, build_tiny_diffusers_pipeline, build_tiny_models,
                                       diffusers_framepack_classes)
from conftest import make_section, run_section
from test_core_model import HookedReference
from test_core_plan import reference_plan

try:
    diffusers_framepack_classes()
except ImportError as exc:
    pytest.skip(f"{exc}; these tests run in the current-release set", allow_module_level=True)

STEPS = 25
SECTIONS = 2
IMAGE = torch.linspace(0, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiny_models() -> Models:
    return build_tiny_models("framepack")


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {torch.float32: build_tiny_diffusers_pipeline(tiny_models),
            torch.bfloat16: build_tiny_diffusers_pipeline(tiny_models, dtype=torch.bfloat16)}


@pytest.fixture()
def pipe(pipes):
    yield pipes[torch.float32]
    mc.disable_magcache(pipes[torch.float32].transformer)


def generate(pipe, cfg: float = 1.0, callback=None, seed: int = 0) -> torch.Tensor:
    """One pipeline call (two sections), as a user makes it; the whole history latent comes back."""
    extra = {"negative_prompt": "blurry dark", "true_cfg_scale": cfg} if cfg != 1.0 else {}
    out = pipe(image=IMAGE, prompt="a cat walks in the city", height=32, width=32, num_frames=17,
               latent_window_size=3, num_inference_steps=STEPS, guidance_scale=10.0,
               generator=torch.Generator().manual_seed(seed), output_type="latent",
               callback_on_step_end=callback, **extra)
    assert len(out.frames) == SECTIONS
    return out.frames[-1]


def never_skipping_config(**kw) -> mc.MagCacheConfig:
    # every ratio departs from 1 by more than 6%: the rule never skips
    return mc.MagCacheConfig(mag_ratios=[1.0] + [1.2] * 24, magcache_thresh=1.0, magcache_K=5, **kw)


def branches(cfg: float) -> int:
    return 1 if cfg == 1.0 else 2


class PipelineReference(HookedReference):
    """The hooked reference of test_core_model, placed by counting the pipeline's transformer calls."""

    def __init__(self, model: torch.nn.Module, plan: list[bool], branches: int) -> None:
        super().__init__(model, plan, branches)
        self.handles += [model.register_forward_pre_hook(self._call_in, with_kwargs=True),
                         model.register_forward_hook(self._call_out)]

    @property
    def step(self) -> int:
        return self.calls % (len(self.plan) * self.branches) // self.branches

    def _call_in(self, module, args, kwargs):
        _, _, t, h, w = kwargs["hidden_states"].shape
        self.out_tokens = t * (h // 2) * (w // 2)
        if self.step == 0 and self.branch == 0:
            self.residual = {}      # a new section: nothing carried over

    def _call_out(self, *args):
        self.calls += 1


class CallLog:
    """Which transformer calls ran the first block: call number -> (section, step, branch)."""

    def __init__(self, model: torch.nn.Module, branches: int) -> None:
        self.calls, self.branches, self.ran = 0, branches, []
        self.handles = [model.register_forward_hook(self._call_out),
                        model.transformer_blocks[0].register_forward_pre_hook(self._block)]

    def _block(self, *args):
        c, per_section = self.calls, STEPS * self.branches
        self.ran.append((c // per_section, c % per_section // self.branches, c % self.branches))

    def _call_out(self, *args):
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def planned_calls(plan: list[bool], n_branches: int) -> list[tuple[int, int, int]]:
    return [(s, t, b) for s in range(SECTIONS) for t in range(STEPS) if not plan[t] for b in range(n_branches)]


def test_noisy_latents_are_the_last_tokens_and_both_classes_read_the_same_weights(tiny_models, pipe):
    """The token order the skipped step relies on, read off diffusers' model; and FramePack's model agrees."""
    model, packed = pipe.transformer, tiny_models.transformer
    g = torch.Generator().manual_seed(3)
    rnd = lambda *shape: torch.randn(*shape, generator=g)   # noqa: E731
    hidden = rnd(1, 16, 3, 4, 4)
    indices = torch.arange(0, 1 + 0 + 3 + 1 + 2 + 16)
    _, _, latent_idx, post, idx_2x, idx_4x = indices.split([1, 0, 3, 1, 2, 16])
    kw = dict(timestep=torch.tensor([900.0]), encoder_hidden_states=rnd(1, 6, 32),
              encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool), pooled_projections=rnd(1, 32),
              guidance=torch.tensor([10000.0]))
    history = dict(clean=rnd(1, 16, 2, 4, 4), x2=rnd(1, 16, 2, 4, 4), x4=rnd(1, 16, 16, 4, 4))
    image = rnd(1, 5, 32)
    seen = {}
    handle = model.transformer_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(stack_in=a[0]))
    out = model(hidden_states=hidden, image_embeds=image, indices_latents=latent_idx,
                latents_clean=history["clean"], indices_latents_clean=torch.cat([indices[:1], post]),
                latents_history_2x=history["x2"], indices_latents_history_2x=idx_2x,
                latents_history_4x=history["x4"], indices_latents_history_4x=idx_4x, return_dict=False, **kw)[0]
    handle.remove()
    tokens = 3 * 2 * 2
    assert seen["stack_in"].shape[1] > tokens   # history tokens are in the sequence too ...
    assert torch.equal(seen["stack_in"][:, -tokens:], model.x_embedder(hidden))   # ... in front of the noisy latents
    packed_out = packed(hidden_states=hidden, image_embeddings=image, latent_indices=latent_idx[None],
                        clean_latents=history["clean"], clean_latent_indices=torch.cat([indices[:1], post])[None],
                        clean_latents_2x=history["x2"], clean_latent_2x_indices=idx_2x[None],
                        clean_latents_4x=history["x4"], clean_latent_4x_indices=idx_4x[None],
                        return_dict=False, **kw)[0]
    assert torch.allclose(out, packed_out, atol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_plan_without_skips_is_bitwise_the_unpatched_pipeline(pipe, cfg):
    model = pipe.transformer
    before = generate(pipe, cfg)
    with mc.magcache(model, never_skipping_config()) as state:
        with_cache = generate(pipe, cfg)
    after = generate(pipe, cfg)
    assert torch.equal(with_cache, before)
    assert torch.equal(after, before)
    assert [r.computed_count for r in state.runs] == [STEPS] * SECTIONS
    assert "forward" not in model.__dict__
    assert not any(b._forward_hooks or b._forward_pre_hooks
                   for b in list(model.transformer_blocks) + list(model.single_transformer_blocks))


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_skipping_runs_the_planned_steps_and_matches_the_hooked_reference(pipe, cfg):
    model = pipe.transformer
    plan = reference_plan(mc.FRAMEPACK_MAG_RATIOS, STEPS, 0.15, 4, 0.2)
    assert any(plan)
    ref = PipelineReference(model, plan, branches(cfg))
    try:
        expected = generate(pipe, cfg)
    finally:
        ref.remove()
    assert ref.calls == SECTIONS * STEPS * branches(cfg)

    config = mc.MagCacheConfig.from_preset("E015K4R02", num_steps=STEPS, variant="framepack")
    log = CallLog(model, branches(cfg))
    with mc.magcache(model, config) as state:
        with mc.magcache_run(model) as report:
            got = generate(pipe, cfg)
    log.remove()
    assert log.ran == planned_calls(plan, branches(cfg))
    assert state.runs[0] is report and len(state.runs) == SECTIONS   # one run per section
    for run in state.runs:
        assert run.status == "complete"
        assert run.skipped == [i for i, s in enumerate(plan) if s]
    assert torch.equal(got, expected)   # same operations on the same values: bitwise
    assert not torch.allclose(got, generate(pipe, cfg), atol=1e-4)   # and skipping did change the result


def test_skipped_steps_run_only_what_the_output_needs(pipe):
    model = pipe.transformer
    plan = mc.skip_schedule(mc.FRAMEPACK_MAG_RATIOS, STEPS, 0.15, 4, 0.2)
    names = ["context_embedder", "image_projection", "clean_x_embedder", "transformer_blocks.0",
             "x_embedder", "time_text_embed", "norm_out", "proj_out"]
    counts = dict.fromkeys(names, 0)
    handles = [model.get_submodule(n).register_forward_hook(lambda *a, n=n: counts.__setitem__(n, counts[n] + 1))
               for n in names]
    with mc.magcache(model, mc.MagCacheConfig.from_preset("E015K4R02")):
        generate(pipe, cfg=3.0)
    for h in handles:
        h.remove()
    calls = SECTIONS * 2 * STEPS
    computed = SECTIONS * 2 * plan.count(False)
    assert {n: counts[n] for n in names} == {**dict.fromkeys(names[:4], computed), **dict.fromkeys(names[4:], calls)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float32_latents_and_model_dtype_both_count_steps_right(pipes, dtype):
    """The pipeline casts float32 latents per call: with a bf16 model each CFG branch gets a new tensor."""
    pipe = pipes[dtype]
    model = pipe.transformer
    assert model.dtype == dtype
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"]), with_kwargs=True)
    plan = mc.skip_schedule(mc.FRAMEPACK_MAG_RATIOS, STEPS, 0.15, 4, 0.2)
    log = CallLog(model, 2)
    try:
        with mc.magcache(model, mc.MagCacheConfig.from_preset("E015K4R02")) as state:
            generate(pipe, cfg=3.0)
    finally:
        handle.remove()
        log.remove()
    assert (seen[0] is seen[1]) == (dtype == torch.float32)   # the guess the engine no longer makes
    assert log.ran == planned_calls(plan, 2)
    assert [r.skipped for r in state.runs] == [[i for i, s in enumerate(plan) if s]] * SECTIONS
    assert [r.status for r in state.runs] == ["complete"] * SECTIONS


class Stop(Exception):
    pass


def stop_at(section: int, step: int):
    calls = []

    def callback(pipe, i, t, kwargs):
        calls.append(i)
        if len(calls) == section * STEPS + step + 1:
            raise Stop
        return {}
    return callback


def interrupt_at(section: int, step: int):
    """diffusers' own way: set the pipeline's interrupt flag; the loop then skips every later step."""
    calls = []

    def callback(pipe, i, t, kwargs):
        calls.append(i)
        if len(calls) == section * STEPS + step + 1:
            pipe._interrupt = True
        return {}
    return callback


@pytest.mark.parametrize("scoped", [False, True])
def test_interrupted_call_then_full_call_equals_clean_call(pipe, scoped):
    model = pipe.transformer
    config = mc.MagCacheConfig.from_preset("E015K4R02")
    with mc.magcache(model, config):
        clean = generate(pipe, cfg=3.0)

    def call(**kw):
        if not scoped:
            return generate(pipe, cfg=3.0, **kw)
        with mc.magcache_run(model):
            return generate(pipe, cfg=3.0, **kw)

    with mc.magcache(model, config) as state:
        with pytest.raises(Stop):
            call(callback=stop_at(1, 12))
        assert torch.equal(call(), clean)
        call(callback=interrupt_at(0, 6))
        assert torch.equal(call(), clean)
    statuses = [r.status for r in state.runs]
    assert statuses == ["complete", "interrupted", "complete", "complete", "interrupted", "complete", "complete"]


def test_calibration_profiles_cross_between_the_two_classes(tiny_models, pipe, tmp_path):
    """Same checkpoint, either class: a profile from one is accepted for the other."""
    model, packed = pipe.transformer, tiny_models.transformer
    # what from_pretrained records: diffusers' model from the Hub id, FramePack's from a Hub-cache snapshot path
    model.register_to_config(_name_or_path="lllyasviel/FramePackI2V_HY")
    packed.register_to_config(_name_or_path="/hf/hub/models--lllyasviel--FramePackI2V_HY/snapshots/0123abc")
    try:
        assert mc.checkpoint_id(model) == mc.checkpoint_id(packed) == "lllyasviel/FramePackI2V_HY"

        with mc.magcache(model, mc.MagCacheConfig(calibrate=True)) as state:
            generate(pipe, cfg=3.0)
        assert len(state.calibration_runs()) == SECTIONS
        from_diffusers = state.calibration_profile("framepack", model=mc.checkpoint_id(model))
        path = from_diffusers.save(tmp_path / "diffusers.json")
        config = mc.MagCacheConfig(mag_ratios=path, variant="framepack", model=mc.checkpoint_id(packed))
        assert list(config.mag_ratios) == from_diffusers.ratios

        section = make_section(packed)
        with mc.magcache(packed, mc.MagCacheConfig(calibrate=True)) as state:
            run_section(packed, section, cfg=3.0)
        from_framepack = state.calibration_profile("framepack", model=mc.checkpoint_id(packed))
        config = mc.MagCacheConfig(mag_ratios=from_framepack, variant="framepack", model=mc.checkpoint_id(model))
        assert list(config.mag_ratios) == from_framepack.ratios

        for profile in (from_diffusers, from_framepack):
            assert profile.model == "lllyasviel/FramePackI2V_HY"
            with pytest.raises(ValueError, match="calibrated on"):
                mc.MagCacheConfig(mag_ratios=profile, model=TINY_MODEL_ID)
    finally:
        model.register_to_config(_name_or_path=None)
        packed.register_to_config(_name_or_path=None)


def test_calibration_ratios_equal_independent_norms(pipe):
    model = pipe.transformer
    ref = PipelineReference(model, [False] * STEPS, branches=1)
    try:
        generate(pipe)
    finally:
        ref.remove()
    tails = ref.residual_tails
    with mc.magcache(model, mc.MagCacheConfig(calibrate=True)) as state:
        generate(pipe)
    assert len(tails) == SECTIONS * STEPS
    for s, report in enumerate(state.runs):
        assert report.ratios[0] == 1.0
        for t in range(1, STEPS):
            cur, prev = tails[s * STEPS + t].double(), tails[s * STEPS + t - 1].double()
            ratio = (cur.norm(dim=-1) / prev.norm(dim=-1)).mean().item()
            assert report.ratios[t] == pytest.approx(ratio, rel=1e-5)


def test_speed_bench_times_the_diffusers_pipeline(tmp_path, capsys):
    import json

    import diffusers

    from magcache_framepack.bench import main

    compare = hasattr(diffusers, "MagCacheConfig")
    out = tmp_path / "speed.json"
    args = ["speed", "--size", "tiny", "--model", "diffusers", "--cfg", "3", "--repeats", "1", "--warmup", "0",
            "--json", str(out)] + (["--compare-diffusers"] if compare else [])
    assert main(args) == 0
    table = capsys.readouterr().out
    rows = {r["setting"]: r for r in json.loads(out.read_text())}
    off = rows["off"]
    assert (off["model"], off["cfg"], off["computed_per_branch"], off["max_latent_diff"]) == ("diffusers", 3.0,
                                                                                             [25, 25], 0.0)
    for name, params in mc.PRESETS.items():
        computed = mc.skip_schedule(mc.FRAMEPACK_MAG_RATIOS, 25, *params).count(False)
        row = rows[name]
        assert row["computed_steps"] == computed and row["computed_per_branch"] == [computed, computed]
        assert row["ideal_speedup"] == pytest.approx(25 / computed)
        assert row["skipped_step_cost"] is not None and 0 < row["max_latent_diff"] < 1
        if compare:
            hook = rows[f"diffusers:{name}"]
            assert hook["engine"] == "diffusers" and len(hook["computed_per_branch"]) == 2
            assert hook["computed_steps"] == sum(hook["computed_per_branch"]) / 2
    assert ("diffusers hook" in table) == compare
