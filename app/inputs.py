"""Images clients send with a job (init_image, mask_image): decoded and checked here.

The API only checks them (format, bytes, pixels, that they decode at all) and
stores them as sent; the worker decodes and resizes them. Every refusal is a
422 that names the field, and no image is decoded past the pixel cap
(Pillow's decompression-bomb guard is set from it).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from PIL import Image

from bailan.jobs import SIZE_MULTIPLE, InputImage

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,", re.IGNORECASE)


@dataclass(frozen=True)
class Decoded:
    """A checked input image: what the job record says about it, and its bytes."""

    info: InputImage
    data: bytes


def refuse(field: str, message: str, value: object = None) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": f"Value error, {message}", "input": value}]
    )


def decode_image(field: str, text: str, max_bytes: int, max_pixels: int) -> tuple[bytes, Image.Image]:
    """base64 or a data: URL -> (bytes as sent, the opened image); 422 naming `field` otherwise."""
    payload = _DATA_URL.sub("", text.strip(), count=1)
    if payload.startswith("data:"):
        raise refuse(field, "a data: URL must be image/png, image/jpeg or image/webp with ;base64,", text[:40])
    # 4 base64 characters per 3 bytes: refuse an oversized image before decoding it.
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise refuse(field, f"the image is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise refuse(field, "not valid base64 (nor a data: URL)") from None
    if len(data) > max_bytes:
        raise refuse(field, f"the image is {len(data)} bytes, more than {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Image.open reads only the header; the size is checked below, before any decoding.
            # (Not through Image.MAX_IMAGE_PIXELS: that is process-wide, and the cap is this call's.)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise refuse(field, f"format {image.format} is not accepted; send PNG, JPEG or WebP")
            if image.width * image.height > max_pixels:
                raise refuse(field, f"{image.width}x{image.height} is more than {max_pixels} pixels")
            image.load()  # decode it all: a truncated or corrupt file fails here, not in the worker
    except RequestValidationError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise refuse(field, f"the image has more than {max_pixels} pixels") from None
    except Exception as exc:  # PIL raises many kinds for a corrupt file
        raise refuse(field, f"not a readable image: {exc}") from None
    return data, image


def job_size(width: int | None, height: int | None, image: Image.Image) -> tuple[int, int]:
    """The job's size: as asked, or the picture's, rounded down to the size multiple."""
    def fit(value: int) -> int:
        return max(SIZE_MULTIPLE, value - value % SIZE_MULTIPLE)

    return (width if width is not None else fit(image.width), height if height is not None else fit(image.height))


def check_inputs(
    init_image: str | None,
    mask_image: str | None,
    width: int | None,
    height: int | None,
    max_bytes: int,
    max_pixels: int,
) -> tuple[Decoded | None, Decoded | None, int | None, int | None]:
    """Decode and check the job's input images; returns them and the job's size."""
    if init_image is None:
        return None, None, width, height
    data, image = decode_image("init_image", init_image, max_bytes, max_pixels)
    width, height = job_size(width, height, image)
    init = Decoded(
        InputImage(width=image.width, height=image.height, format=FORMATS[image.format], bytes=len(data),
                   resized=(image.width, image.height) != (width, height)),
        data,
    )
    mask = None
    if mask_image is not None:
        mdata, mimage = decode_image("mask_image", mask_image, max_bytes, max_pixels)
        mask = Decoded(
            InputImage(width=mimage.width, height=mimage.height, format=FORMATS[mimage.format], bytes=len(mdata),
                       resized=(mimage.width, mimage.height) != (width, height)),
            mdata,
        )
    return init, mask, width, height
