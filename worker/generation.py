"""What the engine is asked to do: one client job, and the ways it can end early."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bailan.jobs import img2img_run_steps


class JobCanceled(Exception):
    """The client canceled the job; it stopped at a step boundary."""


class InvalidForModel(ValueError):
    """The request is well-formed but this model cannot serve it (e.g. a size it cannot divide)."""


class InvalidInput(InvalidForModel):
    """An input image the worker cannot use (e.g. it expired before the job ran)."""


def img2img_start(steps: int, strength: float) -> int:
    """The step an image-to-image job starts at, as diffusers' pipelines choose it: the
    last `int(steps * strength)` steps are run."""
    run = img2img_run_steps(steps, strength)
    if run < 1:
        raise InvalidForModel(f"strength {strength} of {steps} steps leaves no step to run; raise either")
    return steps - run


def _noop(*_: Any) -> None:
    return None


@dataclass(eq=False)
class GenerationJob:
    """One client job as the engine sees it. Image i is sampled from seed + i."""

    id: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str = "dpmpp_2m"
    negative_prompt: str = ""
    num_images: int = 1
    preview_every: int = 0
    preview_kind: str = "x0"  # "x0": the estimate of the finished picture; "xt": the noisy state
    preview_full_decode: bool = False
    # Called from the engine loop: keep them cheap and non-blocking.
    on_progress: Callable[["GenerationJob", int], None] = _noop
    on_preview: Callable[["GenerationJob", int, np.ndarray], None] = _noop
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    unknown_words: list[str] = field(default_factory=list)
    images: list[np.ndarray | None] = field(default_factory=list)
    # The denoised latents of each image, before decoding (kept for tests and benchmarks).
    latents: list[Any] = field(default_factory=list)
    # Image to image: the picture to start from (H, W, 3 uint8, the job's size), how much of
    # the schedule to run, and for inpainting the mask (H, W float, 1 = repaint).
    init_image: np.ndarray | None = None
    strength: float = 0.75
    mask: np.ndarray | None = None
    # Steps completed on the device, counted from the job's first (on a GPU this trails
    # the steps launched by one or two).
    step: int = 0
    # time.perf_counter() when the engine took it, admitted it to a slot, and handed its
    # images back (0: not yet): the job's phases on the worker (bailan_job_phase_seconds).
    submitted_at: float = 0.0
    admitted_at: float = 0.0
    done_at: float = 0.0

    def compose(self, image: np.ndarray) -> np.ndarray:
        """An inpainted image keeps the picture's own pixels outside the mask, as
        AUTOMATIC1111's overlay does: decoding the latents alone lets the new content
        bleed through the VAE's receptive field into the kept region."""
        if self.mask is None or self.init_image is None:
            return image
        return np.where((self.mask >= 0.5)[..., None], image, self.init_image)

    @property
    def start_step(self) -> int:
        """Where in its `steps`-step schedule the job starts (0 unless it starts from a picture)."""
        return img2img_start(self.steps, self.strength) if self.init_image is not None else 0

    @property
    def run_steps(self) -> int:
        """Steps the job actually runs: what its progress counts to."""
        return self.steps - self.start_step

    @property
    def guided(self) -> bool:
        """Classifier-free guidance costs a second UNet row; at scale <= 1 it changes nothing."""
        return self.guidance_scale > 1.0

    def texts(self) -> list[str]:
        """The prompts this job's samples are conditioned on: negative then positive when guided."""
        return [self.negative_prompt, self.prompt] if self.guided else [self.prompt]
