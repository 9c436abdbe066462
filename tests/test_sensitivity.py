"""FramePack's step weights: the sampled latent's derivative by each step's velocity, through sample_hunyuan itself."""

from __future__ import annotations

import pytest
import torch

from magcache_framepack.models import framepack_modules
from magcache_framepack.sensitivity import framepack_sigmas, framepack_step_weights


class FakeTransformer(torch.nn.Module):
    """Velocity 0 everywhere, except ``bump`` at call ``at``; records the timesteps it is called with."""

    def __init__(self, at: int | None = None, bump: float = 1.0) -> None:
        super().__init__()
        self.at, self.bump, self.timesteps = at, bump, []

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, **_: object) -> tuple[torch.Tensor]:
        velocity = torch.zeros_like(hidden_states, dtype=torch.float32)
        if len(self.timesteps) == self.at:
            velocity += self.bump
        self.timesteps.append(float(timestep[0]))
        return (velocity,)


def sample(transformer: FakeTransformer, steps: int, size: int, window: int) -> torch.Tensor:
    """FramePack's sample_hunyuan, as the job calls it (default shift), on a fake transformer."""
    text = torch.zeros(1, 4, 8)
    return framepack_modules().sampler.sample_hunyuan(
        transformer=transformer, sampler="unipc", width=size, height=size, frames=window * 4 - 3,
        real_guidance_scale=1.0, distilled_guidance_scale=10.0, guidance_rescale=0.0, num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0), prompt_embeds=text,
        prompt_embeds_mask=torch.ones(1, 4, dtype=torch.bool), prompt_poolers=torch.zeros(1, 8),
        negative_prompt_embeds=text, negative_prompt_embeds_mask=torch.ones(1, 4, dtype=torch.bool),
        negative_prompt_poolers=torch.zeros(1, 8), dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("steps,size,window", [(9, 64, 9), (6, 640, 3), (1, 128, 9)])
def test_step_weights_are_the_sampled_latents_response_to_each_steps_velocity(steps, size, window):
    base_transformer = FakeTransformer()
    base = sample(base_transformer, steps, size, window)
    # the sigmas sample_hunyuan samples on are the ones the weights are computed on
    sigmas = framepack_sigmas(steps, size, window)
    assert base_transformer.timesteps == pytest.approx([float(s) * 1000 for s in sigmas[:-1]], rel=1e-6)
    weights = framepack_step_weights(steps, size, window)
    assert weights is not None and len(weights) == steps
    for t in range(steps):
        bumped = sample(FakeTransformer(at=t, bump=0.5), steps, size, window)
        response = (bumped - base) / 0.5           # the sampler is linear in the velocity: the same everywhere
        assert response.min().item() == pytest.approx(response.max().item(), abs=1e-5)
        assert weights[t] == pytest.approx(response.mean().item(), abs=2e-5)


def test_the_last_steps_weigh_most_at_framepacks_640_px():
    weights = [abs(w) for w in framepack_step_weights(25, 640, 9)]
    assert max(weights[:17]) < 0.05 < max(weights[19:])
    assert framepack_step_weights(25, 640, 9) is framepack_step_weights(25, 640, 9)     # computed once


def test_with_framepacks_weights_a_2x_target_keeps_runs_of_skips_short():
    """Signed errors that cancel by luck once made the planner pick eight skips in a row for 2x; bounds do not."""
    import magcache_core as mc

    chosen = mc.plan_for_target(mc.FRAMEPACK_MAG_RATIOS, 25, 2.0,
                                step_weights=framepack_step_weights(25, 640, 9)).chosen
    plan = "".join("x" if s else "." for s in mc.skip_schedule(
        mc.FRAMEPACK_MAG_RATIOS, 25, chosen.magcache_thresh, chosen.magcache_K, chosen.retention_ratio))
    assert chosen.speedup >= 2.0 and max(len(run) for run in plan.split(".")) <= 4, plan
