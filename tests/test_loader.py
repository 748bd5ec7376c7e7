"""Loading a model directory: what the worker learns about it once, at load."""

from __future__ import annotations

import shutil
from pathlib import Path

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
