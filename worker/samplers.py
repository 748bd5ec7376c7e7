"""Samplers vectorised over rows: one scheduler update for many samples, each at its own step.

Every sampler the service offers (DDIM, Euler, Euler a, DPM-Solver++ 2M) is, at
each step, a linear map of the current latent `x`, the model's output `m`, the
previous step's clean-latent estimate `x0_prev` and (Euler a only) fresh noise:

    x0     = clamp(a * x + b * m, lo, hi)        the model's estimate of the clean latent
    x_next = c * x + q * (x - x0) + d * x0 + e * x0_prev + f * m + g * noise

(the q term is the Euler family's "x + (x - x0) / sigma * dt", kept in that
shape because rewriting it as c * x + d * x0 loses precision to cancellation
when sigma is large, as at zero terminal SNR)

The coefficients depend only on the schedule, so `schedule()` computes them once
per job on the host, in float64, from the diffusers scheduler's own timesteps,
sigmas and alphas, and `update()` applies them to a batch of rows that may all
be at different steps of different schedules. A step is then a handful of
elementwise tensor ops with no host synchronisation and no per-sample Python.
Each sampler is tested sample by sample against the diffusers scheduler it
replaces (tests/test_samplers.py).

Unsupported scheduler configurations (dynamic thresholding, SDE variants, other
solver orders) are refused with a message rather than sampled differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


# Sampler names clients may ask for -> the diffusers class and the overrides
# applied on top of the model's own scheduler config.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}

# Columns of a coefficient row.
T, C_IN, A, B, LO, HI, C, Q, D, E, F, G, PREVIEW, KA, KB = range(15)
NUM_COEFFICIENTS = 15


class UnsupportedSchedule(ValueError):
    """The scheduler config or step count cannot be sampled by the vectorised update."""


@dataclass(frozen=True)
class Schedule:
    """One job's sampling schedule: a coefficient row per step (see module doc).

    Column T is the timestep fed to the UNet, C_IN the scale of its input,
    PREVIEW the factor that brings the latent after the step back to unit
    variance for previews (Euler-family latents carry sigma-scaled noise).
    KA and KB give the state after the step that a known clean latent x0 and
    its starting noise make, KA * x0 + KB * noise: inpainting re-imposes it
    outside the mask, as diffusers' pipeline does with `add_noise`.

    `start` > 0 starts part-way (img2img): the rows before it are unused and the
    multistep solver starts at first order there. `start_a`, `start_b` make an
    img2img job's first state from the picture's latent and the seed's noise
    (at `start` = 0 too: full strength keeps the picture's share of the first step).
    """

    name: str
    steps: int
    coefficients: np.ndarray  # (steps, NUM_COEFFICIENTS) float64
    init_noise_sigma: float
    stochastic: bool  # draws fresh noise at every step (its generator's stream, after the initial latents)
    start: int = 0
    start_a: float = 0.0
    start_b: float = 1.0


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """The diffusers scheduler `name` on the model's config (what the stock pipeline would use)."""
    if name not in SCHEDULERS:
        raise UnsupportedSchedule(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def schedule(name: str, config: dict[str, Any], steps: int, start: int = 0) -> Schedule:
    """The coefficient table of `steps` steps of sampler `name` on a model's scheduler
    config, sampled from step `start` on (see Schedule)."""
    # Cached by value: a worker sees few distinct (sampler, steps, start) triples.
    return _schedule(name, json.dumps(config, sort_keys=True, default=str), steps, start)


@lru_cache(maxsize=256)
def _schedule(name: str, config_json: str, steps: int, start: int = 0) -> Schedule:
    scheduler = make_scheduler(name, json.loads(config_json))
    if getattr(scheduler.config, "thresholding", False):
        raise UnsupportedSchedule(f"{name}: dynamic thresholding is not supported")
    prediction = scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise UnsupportedSchedule(f"{name}: prediction_type {prediction!r} is not supported")
    try:
        scheduler.set_timesteps(steps, device="cpu")
    except ValueError as exc:  # e.g. DDIM with more steps than training timesteps
        raise UnsupportedSchedule(f"steps={steps} with scheduler {name}: {exc}") from exc
    builder = {"ddim": _ddim, "euler": _euler, "euler_a": _euler, "dpmpp_2m": _dpmpp_2m}[name]
    if not 0 <= start < steps:
        raise UnsupportedSchedule(f"start {start} is outside the {steps} steps")
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            table = builder(scheduler, prediction, ancestral=name == "euler_a", start=start)
            state = _state(scheduler, name)
    except (IndexError, ZeroDivisionError, ValueError) as exc:  # diffusers' own step would fail the same way
        raise UnsupportedSchedule(f"steps={steps} with scheduler {name} cannot be sampled on this model: {exc}") from exc
    table[:, KA], table[:, KB] = state[1:, 0], state[1:, 1]
    table[:start] = 0.0
    # NaN or an infinite factor would poison the image (repeated timesteps when steps exceed
    # the model's training steps; DDIM's epsilon estimate at zero terminal SNR divides by
    # sqrt(alpha_bar) = 0); an infinite clamp bound is fine.
    if np.isnan(table[start:]).any() or not np.isfinite(np.delete(table[start:], [LO, HI], axis=1)).all():
        raise UnsupportedSchedule(
            f"steps={steps} with scheduler {name} gives a degenerate schedule on this model (repeated timesteps?)"
        )
    return Schedule(
        name=name,
        steps=len(table),
        coefficients=table,
        init_noise_sigma=float(scheduler.init_noise_sigma),
        stochastic=name == "euler_a",
        start=start,
        # A picture noised to the first step run, as add_noise makes it; at full strength too
        # (diffusers' img2img keeps the picture's share of timesteps[0]).
        start_a=float(state[start, 0]),
        start_b=float(state[start, 1]),
    )


def _state(scheduler: SchedulerMixin, name: str) -> np.ndarray:
    """(steps + 1, 2): the state entering step k that clean latent x0 and noise make,
    a * x0 + b * noise, as the scheduler's `add_noise` gives it; row `steps` is x0."""
    n = len(scheduler.timesteps)
    out = np.zeros((n + 1, 2))
    if name in ("euler", "euler_a"):
        sigmas = scheduler.sigmas.double().numpy()
        out[:n, 0], out[:n, 1] = 1.0, sigmas[:n]
    elif name == "dpmpp_2m":
        sigmas = scheduler.sigmas.double().numpy()[:n]
        alpha = 1.0 / np.sqrt(sigmas**2 + 1)
        out[:n, 0], out[:n, 1] = alpha, sigmas * alpha
    else:  # DDIM adds noise at its timesteps' alphas
        cumprod = scheduler.alphas_cumprod.double().numpy()
        t = scheduler.timesteps.numpy().astype(np.int64)
        out[:n, 0], out[:n, 1] = np.sqrt(cumprod[t]), np.sqrt(1 - cumprod[t])
    out[n] = (1.0, 0.0)
    return out


def _blank(steps: int) -> np.ndarray:
    table = np.zeros((steps, NUM_COEFFICIENTS), dtype=np.float64)
    table[:, C_IN] = 1.0
    table[:, LO] = -np.inf
    table[:, HI] = np.inf
    table[:, PREVIEW] = 1.0
    return table


def _ddim(scheduler: DDIMScheduler, prediction: str, ancestral: bool = False, start: int = 0) -> np.ndarray:
    """DDIMScheduler.step with eta = 0 (what the stock pipeline runs)."""
    timesteps = scheduler.timesteps.numpy()
    n = scheduler.num_inference_steps
    cumprod = scheduler.alphas_cumprod.double().numpy()
    final = float(scheduler.final_alpha_cumprod)
    table = _blank(len(timesteps))
    for k, t in enumerate(timesteps):
        prev = int(t) - scheduler.config.num_train_timesteps // n
        a_t = cumprod[int(t)]
        a_prev = cumprod[prev] if prev >= 0 else final
        b_t = 1.0 - a_t
        with np.errstate(divide="ignore", invalid="ignore"):
            if prediction == "epsilon":
                x0 = (1.0 / np.sqrt(a_t), -np.sqrt(b_t) / np.sqrt(a_t))
                eps = (0.0, 1.0)
            elif prediction == "sample":
                x0 = (0.0, 1.0)
                eps = (1.0 / np.sqrt(b_t), -np.sqrt(a_t) / np.sqrt(b_t))
            else:  # v_prediction
                x0 = (np.sqrt(a_t), -np.sqrt(b_t))
                eps = (np.sqrt(b_t), np.sqrt(a_t))
        table[k, T] = t
        table[k, A], table[k, B] = x0
        if scheduler.config.clip_sample:
            table[k, LO], table[k, HI] = -scheduler.config.clip_sample_range, scheduler.config.clip_sample_range
        direction = np.sqrt(1.0 - a_prev)
        table[k, C] = direction * eps[0]
        table[k, D] = np.sqrt(a_prev)
        table[k, F] = direction * eps[1]
    return table


def _euler(scheduler: SchedulerMixin, prediction: str, ancestral: bool, start: int = 0) -> np.ndarray:
    """EulerDiscreteScheduler.step (s_churn = 0) or EulerAncestralDiscreteScheduler.step."""
    if prediction == "sample" and ancestral:
        raise UnsupportedSchedule("euler_a: prediction_type 'sample' is not supported (nor by diffusers)")
    sigmas = scheduler.sigmas.double().numpy()
    timesteps = scheduler.timesteps.double().numpy()
    table = _blank(len(timesteps))
    for k, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        table[k, T] = t
        table[k, C_IN] = 1.0 / np.sqrt(sigma**2 + 1)
        if prediction == "epsilon":
            table[k, A], table[k, B] = 1.0, -sigma
        elif prediction == "v_prediction":
            table[k, A], table[k, B] = 1.0 / (sigma**2 + 1), -sigma / np.sqrt(sigma**2 + 1)
        else:
            table[k, A], table[k, B] = 0.0, 1.0
        if ancestral:
            # In float32, in diffusers' order: sigma_down is a difference of near-equal
            # squares at large sigma, and a seed must give the stock pipeline's image.
            s_from, s_to = scheduler.sigmas[k], scheduler.sigmas[k + 1]
            sigma_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
            dt = float((s_to**2 - sigma_up**2) ** 0.5 - s_from)
            table[k, G] = float(sigma_up)
        else:
            dt = sigma_next - sigma
        # x + (x - x0) / sigma * dt
        table[k, C] = 1.0
        table[k, Q] = dt / sigma
        if k + 1 < len(timesteps):
            table[k, PREVIEW] = 1.0 / np.sqrt(sigma_next**2 + 1)
    return table


def _dpmpp_2m(
    scheduler: DPMSolverMultistepScheduler, prediction: str, ancestral: bool = False, start: int = 0
) -> np.ndarray:
    """DPMSolverMultistepScheduler.step for algorithm_type dpmsolver++, solver_order 2."""
    config = scheduler.config
    if config.algorithm_type != "dpmsolver++" or config.solver_order != 2:
        raise UnsupportedSchedule("dpmpp_2m: only algorithm_type dpmsolver++ with solver_order 2 is supported")
    if config.solver_type not in ("midpoint", "heun"):
        raise UnsupportedSchedule(f"dpmpp_2m: solver_type {config.solver_type!r} is not supported")
    if getattr(config, "use_flow_sigmas", False) or config.variance_type in ("learned", "learned_range"):
        raise UnsupportedSchedule("dpmpp_2m: flow sigmas and learned variance are not supported")
    sigmas = scheduler.sigmas.double().numpy()
    timesteps = scheduler.timesteps.numpy()
    n = len(timesteps)

    def alpha_sigma(sigma: float) -> tuple[float, float]:
        alpha = 1.0 / np.sqrt(sigma**2 + 1)
        return alpha, sigma * alpha

    def lam(sigma: float) -> np.float64:
        alpha, s = alpha_sigma(sigma)
        return np.log(np.float64(alpha)) - np.log(np.float64(s))

    table = _blank(n)
    lower_order_nums = 0
    for k, t in enumerate(timesteps):
        if k < start:  # an img2img start: the solver has no history before it
            continue
        lower_order_final = k == n - 1 and (
            config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
        )
        alpha_s, sigma_s = alpha_sigma(sigmas[k])
        table[k, T] = t
        if prediction == "epsilon":
            table[k, A], table[k, B] = 1.0 / alpha_s, -sigma_s / alpha_s
        elif prediction == "v_prediction":
            table[k, A], table[k, B] = alpha_s, -sigma_s
        else:
            table[k, A], table[k, B] = 0.0, 1.0
        alpha_t, sigma_t = alpha_sigma(sigmas[k + 1])
        h = lam(sigmas[k + 1]) - lam(sigmas[k])
        decay = np.exp(-h) - 1.0  # exp(-inf) - 1 = -1 at a final sigma of 0
        table[k, C] = sigma_t / sigma_s
        if lower_order_nums < 1 or lower_order_final:
            table[k, D] = -alpha_t * decay
        else:
            r0 = (lam(sigmas[k]) - lam(sigmas[k - 1])) / h
            if config.solver_type == "midpoint":
                # D0 = x0, D1 = (x0 - x0_prev) / r0; x_t = c x - a decay D0 - 0.5 a decay D1
                table[k, D] = -alpha_t * decay * (1.0 + 0.5 / r0)
                table[k, E] = 0.5 * alpha_t * decay / r0
            else:  # heun: x_t = c x - a decay D0 + a (decay / h + 1) D1
                heun = alpha_t * (decay / h + 1.0)
                table[k, D] = -alpha_t * decay + heun / r0
                table[k, E] = -heun / r0
        if lower_order_nums < config.solver_order:
            lower_order_nums += 1
    return table


def update(
    x: torch.Tensor, m: torch.Tensor, x0_prev: torch.Tensor, noise: torch.Tensor | None, coefficients: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for every row: returns (x_next, x0). All tensors are float32 with rows
    first; `coefficients` is (rows, NUM_COEFFICIENTS), each row at its own step."""
    col = coefficients.view(coefficients.shape[0], NUM_COEFFICIENTS, *([1] * (x.dim() - 1))).unbind(1)
    x0 = col[A] * x + col[B] * m
    x0 = torch.minimum(torch.maximum(x0, col[LO]), col[HI])
    x_next = col[C] * x + col[Q] * (x - x0) + col[D] * x0 + col[E] * x0_prev + col[F] * m
    if noise is not None:
        x_next = x_next + col[G] * noise
    return x_next, x0

