"""What one worker takes: caps on a job's size and steps that follow its device.

A CPU worker would spend minutes on each step of a large picture (a 1024x1024
step of the built-in model takes 7-16 s on a 2-core CPU) while small jobs wait
behind it. Each worker resolves its caps from its settings and its device
(worker.settings.WorkerSettings.device_caps), publishes them with its presence
(bailan.jobs.Keys.worker, field "caps"), and fails a job over them with
ErrorCode.exceeds_device_limits; the API refuses a job no live worker would
take with a 422 naming the field (app.routes.jobs). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceCaps:
    """A worker's caps; None = none beyond the API's own."""

    max_pixels: int | None = None
    max_steps: int | None = None

    def refusal(self, width: int, height: int, steps: int) -> tuple[str, str] | None:
        """(field, reason) when a job of this size and steps is over these caps, else None."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            return "width", (
                f"width × height = {width} × {height} = {width * height} pixels exceeds {self.max_pixels}"
            )
        if self.max_steps is not None and steps > self.max_steps:
            return "steps", f"steps = {steps} exceeds {self.max_steps}"
        return None

    def to_json(self) -> dict[str, int | None]:
        return {"max_pixels": self.max_pixels, "max_steps": self.max_steps}

    @classmethod
    def from_json(cls, raw: Any) -> "DeviceCaps":
        """Caps as a worker published them; anything malformed or absent (an older worker) = no caps."""
        if not isinstance(raw, dict):
            return cls()

        def cap(value: Any) -> int | None:
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        return cls(max_pixels=cap(raw.get("max_pixels")), max_steps=cap(raw.get("max_steps")))
