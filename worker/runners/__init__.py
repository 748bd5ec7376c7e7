"""Model runners: one per model family, each owning its model's tensors.

`sd.SDRunner` samples Stable Diffusion 1.x/2.x; `sdxl.SDXLRunner` is the same
runner with SDXL's conditioning. A new family is a module here and a line in
`make_runner`.
"""

from __future__ import annotations

from worker.loader import LoadedModel
from worker.runners.sd import RunnerOptions, SDRunner
from worker.runners.sdxl import SDXLRunner

RUNNERS: dict[str, type[SDRunner]] = {"sd": SDRunner, "sdxl": SDXLRunner}


def make_runner(model: LoadedModel, max_batch: int, options: RunnerOptions | None = None) -> SDRunner:
    """The runner for `model`'s family (LoadedModel.family)."""
    return RUNNERS[model.family](model, max_batch, options)
