"""How much each denoising step's output moves FramePack's final latent: the planner's step weights.

The target planner ranks plans by :func:`magcache_core.planned_error`: how
far each skipped step's stand-in residual is from the one it would compute.
What that costs in the video depends on how much the sampler lets that step's
output reach the result, and for FramePack that is far from even.  FramePack
samples with a flow-matching UniPC of order 3 whose result is the last step's
x0-prediction; at 25 steps on 640-px frames the weight of a step's output in it
is under 0.025 over the first 16 steps and up to 0.59 over the last five, with
mixed signs.  While this was built, on a random-weight model, the damage of
skipping one single step followed the square of that step's weight (all 24
skippable steps, six seeds), and ranking plans with the weights and the
calibrated cosine distances is what lifted ``plan-check`` over 0.8 (README,
"Target speed-up").

The weights are the sampler's exact sensitivity to each step's model output
when that output does not depend on the latent (the model's own Jacobian, which
the tables cannot know, is left out).  They are computed by running FramePack's
own ``sample_unipc`` on a stand-in model, so they follow the user's FramePack
version: the sampler is linear in the model's outputs, so one run with one lane
per step (lane t gets a unit velocity at step t and nothing elsewhere, from a
zero latent) gives every step's weight at once.

The sigma schedule is FramePack's: ``sample_hunyuan`` shifts it by the latent
sequence length, which depends on the frame area and the latent window.  The
square of the frame resolution stands for the area, so the page (which knows the
resolution before the image) and the job plan with the same weights; at
FramePack's 640-px buckets the shift is at its cap either way.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from magcache_framepack.models import framepack_modules

logger = logging.getLogger(__name__)


def framepack_sigmas(steps: int, frame_resolution: float, latent_window_size: int) -> torch.Tensor:
    """The ``steps + 1`` sigmas ``sample_hunyuan`` samples a section on (its default shift, as the job runs it)."""
    fp = framepack_modules()
    side = int(round(frame_resolution)) // 8                 # latent pixels per side
    latent_frames = latent_window_size                        # (frames + 3) // 4 with frames = 4 * window - 3
    seq_length = latent_frames * side * side // 4
    mu = fp.sampler.calculate_flux_mu(seq_length, exp_max=7.0)
    return fp.sampler.get_flux_sigmas_from_mu(steps, mu)


@functools.lru_cache(maxsize=64)
def framepack_step_weights(steps: int, frame_resolution: float,
                           latent_window_size: int) -> tuple[float, ...] | None:
    """Per step, the derivative of FramePack's sampled latent by that step's velocity (see the module docstring).

    A pure function of its arguments (cached): a 25-step schedule takes a few
    milliseconds.  None, with a warning, when this FramePack's sampler does not
    call the model once per step: the planner then weighs every step alike.
    """
    if steps < 1:
        raise ValueError(f"steps = {steps}: must be >= 1")
    fp = framepack_modules()
    sigmas = framepack_sigmas(steps, frame_resolution, latent_window_size)
    calls = 0

    def stand_in(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        # the sampler's model returns the x0-prediction x - sigma * v; lane t's v is 1 at step t only
        nonlocal calls
        velocity = torch.zeros_like(x)
        if calls < steps:
            velocity[calls] = 1.0
        calls += 1
        return x - velocity * sigma[:, None]

    lanes = torch.zeros(steps, 1)
    out = fp.sampler.sample_unipc(stand_in, lanes, sigmas, extra_args={}, disable=True)
    if calls != steps:
        logger.warning("FramePack's sampler called the model %d times for %d steps: its step weights are "
                       "unknown, so the target planner weighs every step alike", calls, steps)
        return None
    return tuple(float(w) for w in out[:, 0])
