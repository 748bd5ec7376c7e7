"""The built-in model through stock diffusers, at the service's defaults.

The prompt benchmark (bench/prompt_following.py), the README figures
(world/figures.py) and the tests sample the model this way: diffusers' own
`StableDiffusionPipeline`, not the worker's engine, so what they measure is
the model, not the engine (the engine's parity with this pipeline is tested
in tests/test_engine.py).
"""

from __future__ import annotations

import torch

# The service's default step count (bailan.jobs.JobRequest.steps).
STEPS = 25


def load_pipeline(model: str) -> object:
    """A CPU float32 pipeline from a model directory, with the service's default sampler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, dtype=torch.float32)
    # The service's "dpmpp_2m": DPM-Solver++ 2M built from the model's own config.
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: object, prompts: list[str], seeds: list[int], guidance: float) -> list[object]:
    """One PIL image per prompt, each from its own CPU generator seeded as the worker seeds a job."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens, output_type="pil")
    return out.images
