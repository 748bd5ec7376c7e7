"""Image encoding: final images and previews as the bytes the API serves.

The API only streams what the worker stored, so encoding happens here, on the
worker's helper threads, never between two denoising steps. The throughput
benchmark encodes its previews with the same function.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bailan.jobs import PREVIEW_FORMAT

# WorkerSettings.preview_max_side's default, for callers without settings (the benchmark).
PREVIEW_MAX_SIDE = 256


def encode_image(array: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """An HxWx3 uint8 array as `fmt` (a bailan.jobs.OutputFormat value)."""
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "png":
        # Level 1: encoding sits between the last denoising step and `succeeded`, and
        # higher levels cost 2-3x the time for files ~10 % smaller.
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_preview(rgb: np.ndarray, max_side: int = PREVIEW_MAX_SIDE) -> bytes:
    """A preview as the worker stores it: its longest side scaled to `max_side`, as a JPEG."""
    image = Image.fromarray(rgb)
    scale = max_side / max(image.size)
    if scale > 1:
        # Latent-resolution previews are tiny; upscale in whole pixels so they stay crisp.
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    elif scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    return encode_image(np.asarray(image), PREVIEW_FORMAT, quality=80)
