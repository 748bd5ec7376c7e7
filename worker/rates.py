"""The engine's measured speed, published with the heartbeat for the API's wait estimate (bailan.eta)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

# Weight of the newest measurement: about the last ten iterations dominate, so the
# figure follows a change of load within seconds yet one slow step barely moves it.
EMA_ALPHA = 0.2


@dataclass
class StepMeter:
    """Exponential moving averages of the seconds per engine iteration and of sample-steps per second."""

    alpha: float = EMA_ALPHA
    step_s: float | None = None
    samples_per_s: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, seconds: float, samples: int) -> None:
        """One engine iteration that advanced `samples` samples by one step in `seconds`."""
        if seconds <= 0 or samples <= 0:
            return
        rate = samples / seconds
        with self._lock:
            if self.step_s is None or self.samples_per_s is None:
                self.step_s, self.samples_per_s = seconds, rate
            else:
                self.step_s += self.alpha * (seconds - self.step_s)
                self.samples_per_s += self.alpha * (rate - self.samples_per_s)

    def snapshot(self) -> dict[str, Any]:
        """The fields a worker key carries (None until the first iteration)."""
        with self._lock:
            return {
                "step_s": round(self.step_s, 6) if self.step_s is not None else None,
                "samples_per_s": round(self.samples_per_s, 3) if self.samples_per_s is not None else None,
            }
