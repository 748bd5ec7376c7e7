"""What the engine is asked to do: one client job, and the ways it can end early."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class JobCanceled(Exception):
    """The client canceled the job; it stopped at a step boundary."""


class InvalidForModel(ValueError):
    """The request is well-formed but this model cannot serve it (e.g. a size it cannot divide)."""


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
    # Steps completed on the device (on a GPU this trails the steps launched by one or two).
    step: int = 0

    @property
    def guided(self) -> bool:
        """Classifier-free guidance costs a second UNet row; at scale <= 1 it changes nothing."""
        return self.guidance_scale > 1.0

    def texts(self) -> list[str]:
        """The prompts this job's samples are conditioned on: negative then positive when guided."""
        return [self.negative_prompt, self.prompt] if self.guided else [self.prompt]
