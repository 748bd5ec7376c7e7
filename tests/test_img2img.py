"""Image to image and inpainting in the engine, on the committed built-in model (CPU, fp32)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from world import data
from world.evaluate import read_attributes
from worker.engine import Engine, GenerationJob, InvalidForModel
from worker.loader import LoadedModel, load_model

BUILTIN = Path(__file__).resolve().parent.parent / "models" / "bailan-shapes"
PROMPT = "a large red circle in the center on a blue background"


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(BUILTIN, torch.device("cpu"), torch.float32)


@pytest.fixture
def engine(model: LoadedModel) -> Iterator[Engine]:
    yield Engine(model, max_batch=8)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """A small black triangle in the top right on green: nothing like PROMPT."""
    scene = data.sample_scene(random.Random(3), "train")
    assert scene.background == "green" and scene.shapes[0].colour == "black"
    return ((data.render([scene], 64)[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()


def run(engine: Engine, picture: np.ndarray, **fields: Any) -> GenerationJob:
    job = GenerationJob(id="i", prompt=PROMPT, width=64, height=64, steps=25, guidance_scale=1.0, seed=1,
                        init_image=picture, **fields)
    engine.submit(job)
    engine.run_until_idle()
    job.future.result(timeout=0)
    return job


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_low_strength_stays_close_and_full_strength_follows_the_prompt(engine: Engine, picture: np.ndarray) -> None:
    """Guards against img2img ignoring its picture (low strength must keep it) or its prompt
    (strength 1 must paint what the words say), and against counting the skipped steps."""
    low = run(engine, picture, strength=0.2)
    assert low.run_steps == 5 and low.step == 5
    assert mad(low.images[0], picture) < 8, mad(low.images[0], picture)
    full = run(engine, picture, strength=1.0)
    reading = read_attributes(full.images[0])
    assert (reading.colour, reading.background, reading.shape) == ("red", "blue", "circle")
    assert mad(full.images[0], picture) > 40


def test_inpainting_changes_the_mask_and_keeps_the_rest(engine: Engine, picture: np.ndarray) -> None:
    """Guards against inpainting repainting outside its mask, or not repainting inside it."""
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1.0  # repaint the left half
    job = run(engine, picture, strength=1.0, mask=mask)
    out = job.images[0]
    assert np.array_equal(out[:, 32:], picture[:, 32:])
    assert mad(out[:, :32], picture[:, :32]) > 20


def test_pictures_of_the_wrong_size_are_refused(engine: Engine, picture: np.ndarray) -> None:
    """Guards against a picture that does not match the job reaching the VAE as a shape error."""
    with pytest.raises(InvalidForModel, match="init_image is 64x64"):
        engine.submit(GenerationJob(id="w", prompt=PROMPT, width=32, height=64, steps=5, guidance_scale=1.0,
                                    seed=1, init_image=picture))
    with pytest.raises(InvalidForModel, match="no step to run"):
        engine.submit(GenerationJob(id="s", prompt=PROMPT, width=64, height=64, steps=5, guidance_scale=1.0,
                                    seed=1, init_image=picture, strength=0.1))


def test_img2img_jobs_batch_with_text_to_image_jobs(engine: Engine, picture: np.ndarray) -> None:
    """Guards against image-to-image jobs needing a batch of their own: one joins text-to-image
    jobs in the same UNet calls and each gives what it gives alone."""
    alone_i2i = run(engine, picture, strength=0.6)
    alone_t2i = GenerationJob(id="t", prompt="a small blue star", width=64, height=64, steps=25,
                              guidance_scale=1.0, seed=4)
    engine.submit(alone_t2i)
    engine.run_until_idle()
    together = [GenerationJob(id="i2", prompt=PROMPT, width=64, height=64, steps=25, guidance_scale=1.0, seed=1,
                              init_image=picture, strength=0.6),
                GenerationJob(id="t2", prompt="a small blue star", width=64, height=64, steps=25,
                              guidance_scale=1.0, seed=4)]
    calls: list[int] = []
    unet = engine.model.pipe.unet
    original = unet.forward

    def counting(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    unet.forward = counting  # type: ignore[method-assign]
    try:
        for job in together:
            engine.submit(job)
        engine.run_until_idle()
    finally:
        unet.forward = original  # type: ignore[method-assign]
    assert 2 in calls  # both rows in one UNet call while both run
    assert torch.allclose(together[0].latents[0], alone_i2i.latents[0], atol=1e-4)
    assert torch.allclose(together[1].latents[0], alone_t2i.latents[0], atol=1e-4)


def spied_inpainting_engine(tmp_path: Path, max_batch: int) -> tuple[Engine, list[torch.Tensor]]:
    """An engine on a tiny 9-channel inpainting model, and the list its UNet's inputs go to."""
    from world.tiny import build_tiny_pipeline

    build_tiny_pipeline(inpainting=True).save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    model = load_model(tmp_path / "inpaint", torch.device("cpu"), torch.float32)
    engine = Engine(model, max_batch=max_batch)
    seen: list[torch.Tensor] = []
    original = model.pipe.unet.forward

    def spying(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(sample.detach().clone())
        return original(sample, *args, **kwargs)

    model.pipe.unet.forward = spying  # type: ignore[method-assign]
    return engine, seen


def test_an_inpainting_unet_gets_the_mask_and_the_masked_picture(tmp_path: Path) -> None:
    """Guards against a 9-channel inpainting UNet being fed 4 channels (a shape error) or a
    mask it cannot see: it receives latents, the mask and the masked picture's latents."""
    engine, seen = spied_inpainting_engine(tmp_path, max_batch=4)
    assert engine.model.latent_channels == 4
    assert engine.runner.inpainting_unet
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[:, :, 0] = 200
    mask = np.zeros((32, 32), np.float32)
    mask[:16] = 1.0  # repaint the top half
    job = GenerationJob(id="p", prompt="a red circle", width=32, height=32, steps=4, guidance_scale=1.0, seed=2,
                        init_image=picture, strength=1.0, mask=mask)
    engine.submit(job)
    engine.run_until_idle()
    job.future.result(timeout=0)
    assert seen and all(s.shape[1] == 9 for s in seen)
    unet_mask = seen[0][0, 4]
    assert torch.equal(unet_mask[:8], torch.ones(8, 16)) and torch.equal(unet_mask[8:], torch.zeros(8, 16))
    assert seen[0][0, 5:].abs().sum() > 0  # the kept half of the picture, encoded
    assert job.images[0].shape == (32, 32, 3)


def test_an_inpainting_unet_sees_a_grey_picture_where_a_job_repaints_everything(tmp_path: Path) -> None:
    """Guards against a 9-channel inpainting UNet being shown a zero latent as the masked picture
    of a text-to-image job: diffusers' inpaint pipeline (and AUTOMATIC1111) show it the latent of
    a picture masked out throughout, i.e. mid-grey, and a zero latent is another picture. It must
    also not keep an inpainting job's picture for the next job in its slot."""
    engine, seen = spied_inpainting_engine(tmp_path, max_batch=1)
    vae = engine.model.pipe.vae
    with torch.no_grad():
        grey = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode() * vae.config.scaling_factor
    assert grey.abs().max() > 0.01  # else the check below could not tell grey from zeros

    picture = np.full((32, 32, 3), 200, np.uint8)
    mask = np.zeros((32, 32), np.float32)
    mask[:16] = 1.0
    jobs = [
        GenerationJob(id="paint", prompt="a red circle", width=32, height=32, steps=2, guidance_scale=1.0, seed=2,
                      init_image=picture, strength=1.0, mask=mask),
        GenerationJob(id="text", prompt="a red circle", width=32, height=32, steps=2, guidance_scale=1.0, seed=2),
    ]
    for job in jobs:  # one slot: the text job takes the slot the inpainting job left
        seen.clear()
        engine.submit(job)
        engine.run_until_idle()
        job.future.result(timeout=0)
    assert seen and all(s.shape[1] == 9 for s in seen)
    for sample in seen:
        assert torch.equal(sample[0, 4], torch.ones_like(sample[0, 4]))
        torch.testing.assert_close(sample[0, 5:], grey[0], rtol=0, atol=1e-5)


def test_image_i_of_a_job_is_the_one_image_job_with_seed_plus_i(engine: Engine) -> None:
    """Guards the README's seed promise: image i of a multi-image job is what a one-image job
    with seed + i gives, up to the rounding of batched arithmetic: on the CPU at most one
    level in under 1 % of the pixels (byte equality would need batch-invariant kernels)."""
    many = GenerationJob(id="m", prompt=PROMPT, width=64, height=64, steps=25, guidance_scale=7.5, seed=40,
                         num_images=3)
    engine.submit(many)
    engine.run_until_idle()
    for i in range(3):
        one = GenerationJob(id=f"o{i}", prompt=PROMPT, width=64, height=64, steps=25, guidance_scale=7.5, seed=40 + i)
        engine.submit(one)
        engine.run_until_idle()
        diff = np.abs(many.images[i].astype(np.int16) - one.images[0].astype(np.int16))
        assert diff.max() <= 1, f"image {i}: a pixel differs by {diff.max()} levels"
        assert (diff > 0).mean() < 0.01, f"image {i}: {(diff > 0).mean():.2%} of pixels differ"
    assert not np.array_equal(many.images[0], many.images[1])
