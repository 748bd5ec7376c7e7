"""The vectorised samplers against the diffusers schedulers they replace (fp32, CPU).

Rows at different steps of different step counts share every update, as they
do in the engine; each sample's trajectory must match its own diffusers
scheduler stepped alone.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_ancestral
from diffusers.utils.torch_utils import randn_tensor

from worker import samplers
from worker.generation import img2img_start
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


def reference(name: str, config: dict[str, Any], steps: int, seed: int,
              dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """diffusers stepping one sample alone, as the stock pipeline does; every latent along the way.
    In float64 the arithmetic is exact enough to show the float32 run's own rounding; the
    initial latents and Euler a's noise are the float32 run's draws, widened."""
    scheduler = samplers.make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = (randn_tensor(SHAPE, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma).to(dtype)
    out = [x]
    with mock.patch.object(euler_ancestral, "randn_tensor", _float32_draws):
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            m = fake_model(x_in, torch.tensor([float(t)], dtype=dtype))
            x = scheduler.step(m, t, x, generator=generator, return_dict=False)[0]
            out.append(x)
    return out


def _float32_draws(shape: Any, *, dtype: torch.dtype, **kwargs: Any) -> torch.Tensor:
    """randn_tensor drawing float32 whatever the dtype asked, then widened: the same stream
    of numbers for a float64 run as for the float32 one."""
    return randn_tensor(shape, dtype=torch.float32, **kwargs).to(dtype)


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
    diffusers stepping that sample alone, to 1e-5 relative to the latent's scale, beyond the
    rounding diffusers' own float32 run shows against a float64 one."""
    config = sd_config() if config_name == "sd_epsilon" else zero_snr_v_config()
    # Short and long schedules (DPM-Solver++ lowers its order at the end below 15 steps),
    # started at different iterations so rows are at different steps in every batch.
    plans = [(6, 1, 0), (25, 2, 0), (11, 3, 2), (16, 4, 5)]
    got = batched(name, config, plans)
    for (steps, seed, _), trajectory in zip(plans, got):
        expected = reference(name, config, steps, seed)
        exact = reference(name, config, steps, seed, torch.float64)
        assert len(trajectory) == len(expected) == steps + 1
        for k, (a, b, c) in enumerate(zip(trajectory, expected, exact)):
            scale = max(1.0, float(b.abs().max()))
            err = float((a - b).abs().max()) / scale
            # diffusers' own float32 rounding of this latent: a step that cancels large terms
            # (zero terminal SNR's first, from sigma ~4096) rounds off more than 1e-5 of its
            # result, in diffusers as here, and the two roundings need not agree.
            own = float((b.double() - c).abs().max()) / scale
            assert err <= 1e-5 + 2 * own, (
                f"{name} {config_name}: {steps} steps, latent {k}: relative error {err:.2e} "
                f"(diffusers' own float32 rounding: {own:.2e})"
            )


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
    # Epsilon prediction at zero terminal SNR: DDIM's clean-latent estimate divides by
    # sqrt(alpha_bar) = 0 at the first step; it was sampled into a non-finite image.
    eps_zero_snr = dict(sd_noise_scheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing").config)
    with pytest.raises(samplers.UnsupportedSchedule, match="degenerate"):
        samplers.schedule("ddim", eps_zero_snr, 10)


@pytest.mark.parametrize("config_name", ["sd_epsilon", "zero_snr_v"])
@pytest.mark.parametrize("name", sorted(samplers.SCHEDULERS))
def test_a_schedule_started_part_way_matches_diffusers_img2img(name: str, config_name: str) -> None:
    """Guards against img2img starting from the wrong state or with a multistep solver that
    remembers steps it never took: from step `start`, the first state (the picture's latent
    noised as `add_noise` does) and every step after it must match diffusers stepping a
    scheduler whose begin index is `start`, as its img2img pipeline does; to 1e-5 relative,
    beyond the rounding diffusers' own float32 run shows against a float64 one (as in
    test_vectorised_sampler_matches_diffusers_sample_by_sample)."""
    config = sd_config() if config_name == "sd_epsilon" else zero_snr_v_config()
    steps = 20
    for strength in (0.3, 0.75, 1.0):  # 1.0 once started from pure noise, the picture dropped
        start = img2img_start(steps, strength)
        x0 = torch.linspace(-1, 1, int(np.prod(SHAPE))).view(SHAPE)
        expected = img2img_reference(name, config, steps, start, x0)
        exact = img2img_reference(name, config, steps, start, x0, torch.float64)
        assert exact[-1].dtype == torch.float64
        # ours
        sched = samplers.schedule(name, config, steps, start)
        table = torch.from_numpy(sched.coefficients).float()
        gen = torch.Generator().manual_seed(9)
        noise = randn_tensor(SHAPE, generator=gen, dtype=torch.float32)
        x = sched.start_a * x0 + sched.start_b * noise
        got, hist = [x], torch.zeros(SHAPE)
        for k in range(start, steps):
            coef = table[k : k + 1]
            m = fake_model(x * coef[:, samplers.C_IN].view(-1, 1, 1, 1), coef[:, samplers.T])
            eta = randn_tensor(SHAPE, generator=gen, dtype=torch.float32) if sched.stochastic else None
            x, hist = samplers.update(x, m, hist, eta, coef)
            got.append(x)
        assert len(got) == len(expected) == steps - start + 1
        for k, (a, b, c) in enumerate(zip(got, expected, exact)):
            scale = max(1.0, float(b.abs().max()))
            err = float((a - b).abs().max()) / scale
            own = float((b.double() - c).abs().max()) / scale
            assert err <= 1e-5 + 2 * own, (f"{name} {config_name} strength {strength}: latent {k}: relative error "
                                           f"{err:.2e} (diffusers' own float32 rounding: {own:.2e})")


def img2img_reference(name: str, config: dict[str, Any], steps: int, start: int, x0: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """diffusers from step `start`, as StableDiffusionImg2ImgPipeline drives it: the picture's
    latent noised by add_noise, then every step. A float64 run widens the float32 run's draws
    and latents; a scheduler that computes its step in float32 whatever it is given keeps that
    rounding, which only makes the allowance for diffusers' own rounding smaller."""
    ref = samplers.make_scheduler(name, config)
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):  # DDIM indexes by timestep and has none
        ref.set_begin_index(start)
    gen = torch.Generator().manual_seed(9)
    noise = randn_tensor(SHAPE, generator=gen, dtype=torch.float32).to(dtype)
    x = ref.add_noise(x0.to(dtype), noise, ref.timesteps[start : start + 1])
    expected = [x]
    with mock.patch.object(euler_ancestral, "randn_tensor", _float32_draws):
        for t in ref.timesteps[start:]:
            m = fake_model(ref.scale_model_input(x, t), torch.tensor([float(t)], dtype=dtype))
            x = ref.step(m, t, x, generator=gen, return_dict=False)[0]
            expected.append(x)
    return expected


def test_the_known_region_follows_add_noise() -> None:
    """Guards against inpainting re-imposing the kept region at the wrong noise level: the
    state after step k that KA and KB make must be diffusers' add_noise at the next
    timestep, and the clean latent itself after the last step."""
    for name in samplers.SCHEDULERS:
        sched = samplers.schedule(name, sd_config(), 12)
        ref = samplers.make_scheduler(name, sd_config())
        ref.set_timesteps(12)
        x0, noise = torch.full(SHAPE, 0.5), torch.full(SHAPE, -1.0)
        for k in range(11):
            if hasattr(ref, "set_begin_index"):
                ref.set_begin_index(k + 1)
            expected = ref.add_noise(x0, noise, ref.timesteps[k + 1 : k + 2])
            got = sched.coefficients[k, samplers.KA] * 0.5 - sched.coefficients[k, samplers.KB]
            assert abs(float(expected.flatten()[0]) - got) < 1e-5, (name, k)
        assert (sched.coefficients[11, samplers.KA], sched.coefficients[11, samplers.KB]) == (1.0, 0.0)
