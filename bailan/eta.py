"""Estimated wait: how long a queued job has left, from the workers' measured rates.

Each worker measures its engine (worker.rates.StepMeter) and publishes, with
its presence every tick in its worker key (Keys.worker):

- `samples_per_s`: sample-steps per second while busy (one image of one job
  advancing one denoising step is one sample-step), an exponential moving average;
- `step_s`: seconds per engine iteration (one batched denoising step), same average;
- `backlog`: sample-steps still to run of the jobs it holds now.

The API turns those into a job view's `eta_s` (`estimate_eta`). The estimate is
deliberately simple, and these are its assumptions:

1. Every job ahead costs what this one does (steps x images): the API does not read
   the parameters of the jobs ahead, only how many there are.
2. Jobs ahead: the ones before it in its key's queue, plus, for every other queue
   those workers serve, as many as it holds up to this job's position (round robin gives each
   non-empty queue one turn per round; bailan.queues).
3. The job's workers (its model's, when it names one) drain work at the sum of
   the throughputs they measured; workers that have not run a step yet add their
   backlog but no speed, and with none measured the estimate is unknown (None).
4. Once started, the job runs its own steps at the workers' mean seconds per step.
   Throughput measured at low batch occupancy underestimates what a fuller batch
   does, so under load the estimate errs long.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerRate:
    """What one live worker measured (None: not measured yet)."""

    samples_per_s: float | None = None
    step_s: float | None = None
    backlog: int = 0


def jobs_ahead(position: int, other_queue_lengths: list[int]) -> int:
    """Jobs served before the one at 1-based `position` of its own queue (assumption 2)."""
    return max(position - 1, 0) + sum(min(max(n, 0), position) for n in other_queue_lengths)


def estimate_eta(
    ahead: int, steps: int, num_images: int, workers: list[WorkerRate]
) -> float | None:
    """Seconds until a queued job is expected to finish, or None when no live worker has
    measured a rate. `ahead`: jobs served before it (jobs_ahead); `steps`: the steps it runs."""
    measured = [w for w in workers if w.samples_per_s and w.samples_per_s > 0 and w.step_s and w.step_s > 0]
    if not measured or steps < 1 or num_images < 1:
        return None
    throughput = sum(w.samples_per_s for w in measured)  # type: ignore[misc]
    backlog = sum(max(w.backlog, 0) for w in workers)
    wait_s = (backlog + max(ahead, 0) * steps * num_images) / throughput
    run_s = steps * sum(w.step_s for w in measured) / len(measured)  # type: ignore[misc]
    return round(wait_s + run_s, 1)
