"""Image encoding: final images and previews as the bytes the API serves.

The API only streams what the worker stored, so encoding happens here, on the
worker's helper threads, never between two denoising steps. The throughput
benchmark encodes its previews with the same function.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from bailan.jobs import PREVIEW_FORMAT

# WorkerSettings.preview_max_side's default, for callers without settings (the benchmark).
PREVIEW_MAX_SIDE = 256
# Where AUTOMATIC1111 (and the tools that read its files) keep the generation parameters:
# a PNG text chunk with this keyword, and EXIF UserComment in JPEG and WebP.
PARAMETERS_KEYWORD = "parameters"
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
# A1111's sampler names, for the parameters text.
SAMPLER_NAMES = {"dpmpp_2m": "DPM++ 2M", "euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM"}


def parameters_text(
    prompt: str,
    negative_prompt: str,
    steps: int,
    scheduler: str,
    guidance_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None,
) -> str:
    """The generation parameters in the format AUTOMATIC1111 writes, so the file alone
    reproduces the picture (and A1111-aware tools show them)."""
    fields = [
        f"Steps: {steps}",
        f"Sampler: {SAMPLER_NAMES.get(scheduler, scheduler)}",
        f"CFG scale: {guidance_scale:g}",
        f"Seed: {seed}",
        f"Size: {width}x{height}",
    ]
    if model_hash:
        fields.append(f"Model hash: {model_hash}")
    fields.append(f"Model: {model}")
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def read_parameters(data: bytes) -> str | None:
    """The parameters text an image file carries (PNG text chunk or EXIF UserComment)."""
    image = Image.open(io.BytesIO(data))
    text = image.info.get(PARAMETERS_KEYWORD)
    if isinstance(text, str):
        return text
    comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment[:8] == b"UNICODE\0":
        return comment[8:].decode("utf-16-be")
    return None


def encode_image(array: np.ndarray, fmt: str, quality: int = 95, parameters: str | None = None) -> bytes:
    """An HxWx3 uint8 array as `fmt` (a bailan.jobs.OutputFormat value), carrying
    `parameters` (see parameters_text) where each format keeps them."""
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if parameters is not None and fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEYWORD, parameters)
        # Level 1: see below.
        image.save(buf, format="PNG", compress_level=1, pnginfo=info)
        return buf.getvalue()
    extra = {}
    if parameters is not None:
        exif = Image.Exif()
        # EXIF's UserComment: an 8-byte character-code prefix, then the text (as A1111 writes it).
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        extra["exif"] = exif.tobytes()
    if fmt == "png":
        # Level 1: encoding sits between the last denoising step and `succeeded`, and
        # higher levels cost 2-3x the time for files ~10 % smaller.
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, **extra)
    else:
        image.save(buf, format="JPEG", quality=quality, **extra)
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
