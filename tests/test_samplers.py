"""The vectorised samplers against the diffusers schedulers they replace (fp32, CPU).

Rows at different steps of different step counts share every update, as they
do in the engine; each sample's trajectory must match its own diffusers
scheduler stepped alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from worker import samplers
from world.sd_components import sd_noise_scheduler

SHAPE = (1, 4, 6, 5)


def sd_config() -> dict[str, Any]:
    return dict(sd_noise_scheduler().config)


def zero_snr_v_config() -> dict[str, Any]:
    """The built-in model's kind: v-prediction, zero terminal SNR, trailing spacing."""
    scheduler = sd_noise_scheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return dict(scheduler.config)


def fake_model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet: depends on the input and the timestep, row by row."""
    return 0.6 * torch.tanh(x_in) + 0.3 * torch.cos(x_in * 3.0) * (t.view(-1, 1, 1, 1) / 1000.0)


def reference(name: str, config: dict[str, Any], steps: int, seed: int) -> list[torch.Tensor]:
    """diffusers stepping one sample alone, as the stock pipeline does; every latent along the way."""
    scheduler = samplers.make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = randn_tensor(SHAPE, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    out = [x]
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        m = fake_model(x_in, torch.tensor([float(t)]))
        x = scheduler.step(m, t, x, generator=generator, return_dict=False)[0]
        out.append(x)
    return out


def batched(name: str, config: dict[str, Any], plans: list[tuple[int, int, int]]) -> list[list[torch.Tensor]]:
    """Every sample (steps, seed, start iteration) through `samplers.update` in shared batches."""
    tables, xs, hist, noise, trajectories = [], [], [], [], []
    for steps, seed, _ in plans:
        sched = samplers.schedule(name, config, steps)
        generator = torch.Generator().manual_seed(seed)
        x = randn_tensor(SHAPE, generator=generator, dtype=torch.float32) * sched.init_noise_sigma
        # Euler a draws its noise after the initial latents, one draw per step, from the same stream.
        noise.append([randn_tensor(SHAPE, generator=generator, dtype=torch.float32) for _ in range(sched.steps)]
                     if sched.stochastic else None)
        tables.append(torch.from_numpy(sched.coefficients).float())
        xs.append(x)
        hist.append(torch.zeros(SHAPE))
        trajectories.append([x])
    step = [0] * len(plans)
    iteration = 0
    while any(step[i] < len(tables[i]) for i in range(len(plans))):
        rows = [i for i, (_, _, start) in enumerate(plans) if start <= iteration and step[i] < len(tables[i])]
        iteration += 1
        if not rows:
            continue
        coef = torch.stack([tables[i][step[i]] for i in rows])
        x = torch.cat([xs[i] for i in rows])
        m = fake_model(x * coef[:, samplers.C_IN].view(-1, 1, 1, 1), coef[:, samplers.T])
        eta = torch.cat([noise[i][step[i]] if noise[i] is not None else torch.zeros(SHAPE) for i in rows])
        x_next, x0 = samplers.update(x, m, torch.cat([hist[i] for i in rows]), eta, coef)
        for j, i in enumerate(rows):
            xs[i], hist[i] = x_next[j : j + 1], x0[j : j + 1]
            trajectories[i].append(xs[i])
            step[i] += 1
    return trajectories


@pytest.mark.parametrize("config_name", ["sd_epsilon", "zero_snr_v"])
@pytest.mark.parametrize("name", sorted(samplers.SCHEDULERS))
def test_vectorised_sampler_matches_diffusers_sample_by_sample(name: str, config_name: str) -> None:
    """Guards against the vectorised update drifting from the scheduler it replaces: every
    latent of every sample, batched with rows at other steps and step counts, must equal
    diffusers stepping that sample alone, to 1e-5 relative to the latent's scale."""
    config = sd_config() if config_name == "sd_epsilon" else zero_snr_v_config()
    # Short and long schedules (DPM-Solver++ lowers its order at the end below 15 steps),
    # started at different iterations so rows are at different steps in every batch.
    plans = [(6, 1, 0), (25, 2, 0), (11, 3, 2), (16, 4, 5)]
    got = batched(name, config, plans)
    for (steps, seed, _), trajectory in zip(plans, got):
        expected = reference(name, config, steps, seed)
        assert len(trajectory) == len(expected) == steps + 1
        for k, (a, b) in enumerate(zip(trajectory, expected)):
            scale = max(1.0, float(b.abs().max()))
            err = float((a - b).abs().max()) / scale
            assert err <= 1e-5, f"{name} {config_name}: {steps} steps, latent {k}: relative error {err:.2e}"


def test_the_table_has_one_row_per_step_and_finite_inputs() -> None:
    """Guards against schedules whose step count or UNet inputs differ from diffusers'."""
    for name in samplers.SCHEDULERS:
        sched = samplers.schedule(name, sd_config(), 20)
        ref = samplers.make_scheduler(name, sd_config())
        ref.set_timesteps(20)
        assert sched.steps == len(ref.timesteps) == 20
        assert np.allclose(sched.coefficients[:, samplers.T], ref.timesteps.double().numpy())
        assert sched.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma))


def test_unsupported_configurations_are_refused_with_a_reason() -> None:
    """Guards against silently sampling a config the vectorised update does not implement."""
    with pytest.raises(samplers.UnsupportedSchedule, match="thresholding"):
        samplers.schedule("ddim", dict(sd_noise_scheduler(thresholding=True).config), 10)
    with pytest.raises(samplers.UnsupportedSchedule, match="unknown scheduler"):
        samplers.schedule("lms", sd_config(), 10)
    with pytest.raises(samplers.UnsupportedSchedule, match="steps=2000"):
        samplers.schedule("ddim", sd_config(), 2000)
