"""SDXL through the same engine: a tiny random-weight SDXL-layout directory (two text
encoders, pooled embeddings, size "time ids"), on the CPU in fp32, against diffusers'
own StableDiffusionXLPipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from tests.fixtures.oom_unet import OOMAboveRows
from worker.engine import Engine, GenerationJob, JobCanceled
from worker.loader import LoadedModel, load_model
from worker.runners.sdxl import SDXLRunner
from worker.samplers import SCHEDULERS


@pytest.fixture(scope="module")
def model(tiny_sdxl_dir: Path) -> LoadedModel:
    return load_model(tiny_sdxl_dir, torch.device("cpu"), torch.float32)


@pytest.fixture
def engine(model: LoadedModel) -> Iterator[Engine]:
    yield Engine(model, max_batch=8)


def make_job(job_id: str, **overrides: Any) -> GenerationJob:
    fields: dict[str, Any] = dict(
        id=job_id, prompt="a red circle", width=32, height=32, steps=5, guidance_scale=5.0, seed=7
    )
    fields.update(overrides)
    return GenerationJob(**fields)


def run_alone(engine: Engine, job: GenerationJob) -> GenerationJob:
    engine.submit(job)
    engine.run_until_idle()
    job.future.result(timeout=0)
    return job


def test_an_sdxl_directory_loads_as_sdxl(model: LoadedModel, engine: Engine) -> None:
    """Guards: an SDXL directory loaded with SD's pipeline (no second encoder) or run by SD's runner."""
    assert model.family == "sdxl" and model.info()["family"] == "sdxl"
    assert isinstance(engine.runner, SDXLRunner)


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("negative", ["", "blue"])
def test_sdxl_matches_the_stock_pipeline(model: LoadedModel, engine: Engine, scheduler: str, negative: str) -> None:
    """Guards against our SDXL conditioning drifting from diffusers' (both encoders' penultimate
    states side by side, the pooled projection, the size time ids, zeros for an empty negative)."""
    cls, overrides = SCHEDULERS[scheduler]
    stock = StableDiffusionXLPipeline(
        **{**model.pipe.components, "scheduler": cls.from_config(model.scheduler_config, **overrides)}
    )
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        "a red circle", negative_prompt=negative or None, height=32, width=32, num_inference_steps=5,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(11), output_type="np",
    ).images[0]
    job = run_alone(engine, make_job("s", scheduler=scheduler, seed=11, negative_prompt=negative))
    got = job.images[0].astype(np.float32) / 255
    assert np.abs(got - expected).max() < 2 / 255


def test_sdxl_batch_mates_do_not_change_a_job(engine: Engine) -> None:
    """Guards: pooled embeddings or time ids of one job leaking into another's rows (other
    prompts, guidance, sizes and join times in one batch must leave each job as it is alone)."""
    specs = [
        dict(prompt="a red circle", seed=1),
        dict(prompt="a blue square on a green background", seed=2, steps=4, guidance_scale=1.0),
        dict(prompt="a small star", seed=3, num_images=2, width=48, negative_prompt="red"),
    ]
    alone = [run_alone(engine, make_job(f"a{i}", **spec)) for i, spec in enumerate(specs)]
    together = [make_job(f"b{i}", **spec) for i, spec in enumerate(specs)]
    engine.submit(together[0])
    engine.step_once()
    engine.submit(together[1])
    engine.submit(together[2])
    engine.run_until_idle()
    for a, b in zip(alone, together):
        b.future.result(timeout=0)
        for la, lb in zip(a.latents, b.latents):
            assert torch.allclose(la, lb, atol=1e-4), f"{a.prompt}: max diff {(la - lb).abs().max()}"


def test_sdxl_previews_cancel_and_out_of_memory_split(model: LoadedModel) -> None:
    """Guards: the engine's features (previews, cancel at the next step, splitting a batch
    the device cannot hold) working for SD only."""
    engine = Engine(model, max_batch=8)
    frames: list[int] = []
    previewed = make_job("p", preview_every=2, on_preview=lambda job, step, rgb: frames.append(step))
    canceled = make_job("c", steps=50)
    engine.submit(previewed)
    engine.submit(canceled)
    engine.step_once()
    canceled.cancel_requested.set()
    engine.step_once()
    with pytest.raises(JobCanceled):
        canceled.future.result(timeout=0)
    assert canceled.step == 1
    engine.run_until_idle()
    assert previewed.future.result(timeout=0) and frames == [2, 4]

    original = model.pipe.unet
    model.pipe.unet = OOMAboveRows(original, max_rows=2)
    try:
        split = Engine(model, max_batch=8)
        jobs = [make_job(f"o{i}", seed=i) for i in range(3)]
        for job in jobs:
            split.submit(job)
        split.run_until_idle()
        assert all(job.future.result(timeout=0) for job in jobs)
        # Six rows failed, and the split batches of at most two ran.
        calls = model.pipe.unet.calls
        assert 6 in calls and calls[-1] <= 2
    finally:
        model.pipe.unet = original
    alone = run_alone(Engine(model, max_batch=8), make_job("o0", seed=0))
    assert torch.allclose(alone.latents[0], jobs[0].latents[0], atol=1e-4)


def test_a_worker_serves_an_sdxl_directory(redis_url: str, tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    """Guards: the worker process failing to start on an SDXL directory (loader, runner, warm-up),
    or its jobs failing through the service."""
    from tests.test_e2e import Service

    svc = Service(redis_url, tiny_sdxl_dir, tmp_path, queue="sdxl")
    try:
        svc.add_worker()
        svc.wait_ready()
        [model] = svc.http.get("/v1/models").json()["models"]
        assert (model["model"], model["width"]) == ("tiny-sdxl", 32)
        job = svc.submit(prompt="a red circle", steps=3, guidance_scale=5.0, preview_every=1)
        view = svc.wait_status(job["id"], {"succeeded", "failed"}, timeout=120)
        assert (view["status"], view["model"]) == ("succeeded", "tiny-sdxl"), view
        assert svc.http.get(f"/v1/jobs/{job['id']}/images/0").content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        svc.close()
