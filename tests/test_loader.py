"""Loading a model directory: what the worker learns about it once, at load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from worker.loader import load_model, model_hash


def test_the_model_hash_follows_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards against a `Model hash` in image files that does not identify the weights:
    the same files give the same hash (also through load_model), other weights another."""
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert model_hash(copy) == model_hash(tiny_model_dir)
    assert len(model_hash(copy)) == 10
    assert load_model(copy, torch.device("cpu"), torch.float32).hash == model_hash(copy)
    weights = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of one weight
    weights.write_bytes(bytes(data))
    assert model_hash(copy) != model_hash(tiny_model_dir)


def test_a_model_directory_states_its_defaults(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards: a model's bailan_defaults.json not reaching the worker's published info, and a
    malformed one served anyway (silently falling back to settings nobody chose)."""
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))
    plain = load_model(copy, torch.device("cpu"), torch.float32)
    assert plain.info()["defaults"] == {}
    assert "dpmpp_2m" in plain.info()["samplers"]

    (copy / "bailan_defaults.json").write_text('{"guidance_scale": 2.5, "scheduler": "euler"}')
    stated = load_model(copy, torch.device("cpu"), torch.float32)
    assert stated.info()["defaults"] == {"guidance_scale": 2.5, "scheduler": "euler"}

    (copy / "bailan_defaults.json").write_text('{"guidance_scale": -1}')
    with pytest.raises(ValueError, match=r"bailan_defaults.json: guidance_scale: Input should be greater"):
        load_model(copy, torch.device("cpu"), torch.float32)
    (copy / "bailan_defaults.json").write_text('{"steps": 10, "sampler": "euler"}')
    with pytest.raises(ValueError, match=r"sampler: Extra inputs are not permitted"):
        load_model(copy, torch.device("cpu"), torch.float32)


def test_the_built_in_model_defaults_to_the_guidance_its_benchmark_found_best() -> None:
    """Guards: the built-in model shipping without its defaults file, so clients get guidance
    7.5, which over-saturates it and halves its speed (README, The built-in model)."""
    from worker.loader import load_defaults

    builtin = Path(__file__).resolve().parent.parent / "models" / "bailan-shapes"
    assert load_defaults(builtin).guidance_scale == 1.0
