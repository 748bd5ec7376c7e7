"""Previews: the cheap latent -> RGB maps, and what a preview shows (x0 or x_t)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from world.evaluate import read_attributes
from worker.engine import Engine, GenerationJob
from worker.loader import load_model
from worker.previews import PreviewDecoder, load_preview_decoder

BUILTIN = Path(__file__).resolve().parent.parent / "models" / "bailan-shapes"


def test_a_preview_decoder_round_trips_through_its_folder(tmp_path: Path) -> None:
    """Guards against a shipped preview decoder loading with other weights or shape."""
    torch.manual_seed(0)
    decoder = PreviewDecoder(4, width=16, upscale=2)
    decoder.save(tmp_path)
    loaded = load_preview_decoder(tmp_path, torch.device("cpu"), torch.float32)
    assert loaded is not None and loaded.config == decoder.config
    latents = torch.randn(3, 4, 8, 8)
    assert torch.equal(loaded(latents), decoder(latents))
    assert loaded(latents).shape == (3, 3, 16, 16)
    assert load_preview_decoder(tmp_path / "nothing", torch.device("cpu"), torch.float32) is None
    with pytest.raises(ValueError, match="power of two"):
        PreviewDecoder(4, upscale=3)


def test_the_worker_uses_a_models_preview_decoder(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards against a shipped preview decoder being ignored: with one, previews come at
    image size from it; without, at latent size from the linear map."""
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))
    sizes = []
    for with_decoder in (False, True):
        if with_decoder:
            PreviewDecoder(4, width=16, upscale=2).save(copy)
        model = load_model(copy, torch.device("cpu"), torch.float32)
        assert (model.preview_decoder is not None) == with_decoder
        frames: list[np.ndarray] = []
        job = GenerationJob(id="p", prompt="a red circle", width=32, height=32, steps=4, guidance_scale=1.0, seed=1,
                            preview_every=1, on_preview=lambda j, step, rgb: frames.append(rgb))
        engine = Engine(model, 2)
        engine.submit(job)
        engine.run_until_idle()
        sizes.append({frame.shape for frame in frames})
    assert sizes == [{(16, 16, 3)}, {(32, 32, 3)}]


def test_x0_previews_show_the_picture_at_40_percent_of_the_steps() -> None:
    """Guards the default preview: at 40 % of the steps the picture's background and shape
    colour must already read right in x0 previews (the model's estimate of the finished
    picture, through the built-in model's trained decoder), and `preview_kind` must choose
    what is shown (x_t previews are another picture: the sampler's noisy state)."""
    model = load_model(BUILTIN, torch.device("cpu"), torch.float32)
    assert model.preview_decoder is not None, "the built-in model ships a preview decoder"
    prompts = [("a large red circle in the center on a blue background", "blue", "red"),
               ("a large yellow star in the top left on a black background", "black", "yellow"),
               ("a large white triangle in the bottom right on a green background", "green", "white")]
    frames: dict[str, dict[str, np.ndarray]] = {"x0": {}, "xt": {}}
    for kind, shown in frames.items():
        engine = Engine(model, 4)
        for i, (prompt, _, _) in enumerate(prompts):
            engine.submit(GenerationJob(
                id=str(i), prompt=prompt, width=64, height=64, steps=25, guidance_scale=1.0, seed=1000 + i,
                preview_every=10, preview_kind=kind,
                on_preview=lambda j, step, rgb, shown=shown: shown.__setitem__(j.id, rgb) if step == 10 else None))
        engine.run_until_idle()
    for i, (_, background, colour) in enumerate(prompts):
        reading = read_attributes(frames["x0"][str(i)])
        assert (reading.background, reading.colour) == (background, colour), (i, reading)
        difference = np.abs(frames["x0"][str(i)].astype(int) - frames["xt"][str(i)].astype(int)).mean()
        assert difference > 5, f"x0 and x_t previews of job {i} are the same picture ({difference:.1f} levels apart)"

