"""The batch scheduler: which samples run at each engine step. It never touches a tensor.

Like an LLM server's scheduler it works at the granularity of one step
("continuous" or iteration-level batching): jobs are admitted between steps
while there is room, canceled ones leave at the next step, and every step it
picks one group of samples that share a latent size (sizes take turns) and
says which rows the model runner should run, padded to which batch shape.

Samples live in *slots*: one per image, in a pool per latent size. A slot's
number is also its row in the runner's persistent buffers (latents, text
embeddings, coefficient tables), so a plan names rows by slot and the runner
gathers and scatters by those numbers. Per-slot state is kept in numpy arrays,
so building a plan is a few vectorised operations whatever the batch size.
"""

from __future__ import annotations

import queue
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from worker.generation import GenerationJob, JobCanceled

Size = tuple[int, int]  # latent (height, width)


@dataclass
class StepPlan:
    """One engine step for one group of samples of one latent size."""

    size: Size
    slots: np.ndarray  # (n,) slot of each sample, ascending
    steps: np.ndarray  # (n,) the step index each sample takes now
    guided: np.ndarray  # (n,) bool: two UNet rows (negative, positive) instead of one
    bucket: int  # UNet rows after padding (>= rows): the batch shape the runner runs
    previews: np.ndarray  # (k,) positions into `slots` whose cheap preview is due after this step
    full_previews: np.ndarray  # positions whose full-decode preview is due after this step
    preview_x0: np.ndarray  # (n,) bool: that sample's previews show x0 (else x_t)
    first: np.ndarray  # (n,) where each sample's schedule starts: steps[i] - first[i] steps are done
    finishing: np.ndarray  # positions for which this is the last step

    @property
    def rows(self) -> int:
        return int(len(self.slots) + self.guided.sum())

    def __len__(self) -> int:
        return len(self.slots)


@dataclass
class Admission:
    """Jobs that got slots this step, for the runner to set up (prompts, noise, schedules)."""

    size: Size
    jobs: list[GenerationJob]
    slots: list[list[int]]  # per job, the slot of each of its images


@dataclass(eq=False)
class Pool:
    """The samples of one latent size."""

    size: Size
    capacity: int
    jobs: list[GenerationJob | None] = field(init=False)
    image: np.ndarray = field(init=False)  # index of the slot's image within its job
    step: np.ndarray = field(init=False)  # index of the next step in the slot's schedule
    first: np.ndarray = field(init=False)  # where the schedule starts (image to image starts part-way)
    total: np.ndarray = field(init=False)
    guided: np.ndarray = field(init=False)
    preview_every: np.ndarray = field(init=False)
    full_decode: np.ndarray = field(init=False)
    preview_x0: np.ndarray = field(init=False)  # previews show the clean-picture estimate, not x_t
    active: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = self.capacity
        self.jobs = [None] * n
        self.image = np.zeros(n, dtype=np.int64)
        self.step = np.zeros(n, dtype=np.int64)
        self.first = np.zeros(n, dtype=np.int64)
        self.total = np.zeros(n, dtype=np.int64)
        self.guided = np.zeros(n, dtype=bool)
        self.preview_every = np.zeros(n, dtype=np.int64)
        self.full_decode = np.zeros(n, dtype=bool)
        self.preview_x0 = np.zeros(n, dtype=bool)
        self.active = np.zeros(n, dtype=bool)

    @property
    def used(self) -> int:
        return int(self.active.sum())

    def take(self, job: GenerationJob) -> list[int]:
        """Slots for the job's images; all or none: a value its arrays cannot hold (an integer
        past int64) raises with no slot left taken."""
        free = np.flatnonzero(~self.active)[: job.num_images]
        try:
            for image, slot in enumerate(free):
                self.jobs[slot] = job
                self.image[slot] = image
                self.first[slot] = self.step[slot] = job.start_step
                self.total[slot] = job.steps
                self.guided[slot] = job.guided
                # Previews show the job's first image only.
                self.preview_every[slot] = job.preview_every if image == 0 else 0
                self.full_decode[slot] = job.preview_full_decode
                self.preview_x0[slot] = job.preview_kind == "x0"
                self.active[slot] = True
        except Exception:
            self.release(free)
            raise
        return [int(s) for s in free]

    def release(self, slots: np.ndarray | list[int]) -> None:
        for slot in slots:
            self.active[slot] = False
            self.jobs[slot] = None


class BatchScheduler:
    """Admission, cancellation, grouping and padding; `submit` from any thread, the rest on the engine's."""

    def __init__(self, max_batch: int, buckets: tuple[int, ...] = ()) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        # UNet row counts the runner has warmed (captured graphs, compiled kernels); a
        # step pads up to the next one. () pads nothing.
        self.buckets = tuple(sorted(buckets))
        self.pools: dict[Size, Pool] = {}
        self._incoming: queue.SimpleQueue[tuple[GenerationJob, Size]] = queue.SimpleQueue()
        self._waiting: deque[tuple[GenerationJob, Size]] = deque()
        self._last_size: Size | None = None
        self._left_unadmitted = 0

    # ---- from any thread ------------------------------------------------------

    def submit(self, job: GenerationJob, size: Size) -> None:
        self._incoming.put((job, size))

    def has_room(self) -> bool:
        """Whether a new job could start now (read from other threads: approximate)."""
        waiting = sum(job.num_images for job, _ in list(self._waiting))
        return self.active_samples() + waiting + self._incoming.qsize() < self.max_batch

    def active_samples(self) -> int:
        return sum(pool.used for pool in list(self.pools.values()))

    @property
    def busy(self) -> bool:
        return bool(self.active_samples() or self._waiting or not self._incoming.empty())

    @property
    def waiting(self) -> bool:
        return bool(self._waiting or not self._incoming.empty())

    # ---- on the engine thread -------------------------------------------------------

    def admit(self) -> list[Admission]:
        """Move waiting jobs into free slots, oldest first, while the batch has room.
        A job canceled before it started never takes a slot."""
        while True:
            try:
                self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        used = self.active_samples()
        admitted: dict[Size, Admission] = {}
        while self._waiting:
            job, size = self._waiting[0]
            if job.cancel_requested.is_set():
                self._waiting.popleft()
                job.future.set_exception(JobCanceled())
                self._left_unadmitted += 1
                continue
            if used + job.num_images > self.max_batch:
                break
            self._waiting.popleft()
            pool = self.pools.get(size)
            if pool is None:
                pool = self.pools[size] = Pool(size, self.max_batch)
            try:
                slots = pool.take(job)
            except Exception as exc:  # noqa: BLE001 - this job's own failure, not its batch-mates'
                # Raised out of here, it failed every running job and left this one's future
                # unresolved: its slot thread waited for ever.
                job.future.set_exception(exc)
                self._left_unadmitted += 1
                continue
            entry = admitted.setdefault(size, Admission(size, [], []))
            entry.jobs.append(job)
            entry.slots.append(slots)
            used += job.num_images
        return list(admitted.values())

    def left_unadmitted(self) -> int:
        """Jobs admission ended without a slot (canceled first, or failed) since the last call:
        room freed that slots waiting for it must hear of."""
        count, self._left_unadmitted = self._left_unadmitted, 0
        return count

    def idle_sizes(self) -> list[Size]:
        """Sizes whose pool no job holds a slot in, oldest pool first."""
        return [size for size, pool in self.pools.items() if pool.used == 0]

    def forget(self, size: Size) -> None:
        """Drop an idle size's pool; a later job of that size makes a new one."""
        if self.pools[size].used:
            raise ValueError(f"size {size} still has jobs")
        del self.pools[size]

    def drain(self) -> list[GenerationJob]:
        """Every job not yet admitted (the engine fails them when it must give up)."""
        jobs = [job for job, _ in self._waiting]
        self._waiting.clear()
        while True:
            try:
                jobs.append(self._incoming.get_nowait()[0])
            except queue.Empty:
                return jobs

    def active_jobs(self) -> list[GenerationJob]:
        seen: dict[int, GenerationJob] = {}
        for pool in self.pools.values():
            for slot in np.flatnonzero(pool.active):
                job = pool.jobs[slot]
                if job is not None:
                    seen[id(job)] = job
        return list(seen.values())

    def remove(self, jobs: list[GenerationJob]) -> None:
        """Free every slot of `jobs` (finished, canceled or failed)."""
        ids = {id(job) for job in jobs}
        for pool in self.pools.values():
            pool.release([s for s in np.flatnonzero(pool.active) if id(pool.jobs[s]) in ids])

    def canceled(self) -> list[GenerationJob]:
        """Jobs whose client asked to stop: running ones, whose slots are freed now, and waiting
        ones, taken out of the line (admit drops only its head, and a head that does not fit
        yet would hold them there for as long as the running jobs take)."""
        jobs = [job for job in self.active_jobs() if job.cancel_requested.is_set()]
        self.remove(jobs)
        kept: deque[tuple[GenerationJob, Size]] = deque()
        for job, size in self._waiting:
            if job.cancel_requested.is_set():  # read once: a flag set meanwhile waits for the next call
                jobs.append(job)
            else:
                kept.append((job, size))
        if len(kept) < len(self._waiting):
            self._waiting = kept
        return jobs

    def plan(self) -> StepPlan | None:
        """The next step: every active sample of one latent size (sizes take turns)."""
        # Finished samples keep their slots until decoded, but take no more steps.
        sizes = sorted(size for size, pool in self.pools.items() if (pool.active & (pool.step < pool.total)).any())
        if not sizes:
            return None
        if self._last_size in sizes and len(sizes) > 1:
            size = sizes[(sizes.index(self._last_size) + 1) % len(sizes)]
        else:
            size = sizes[0]
        self._last_size = size
        pool = self.pools[size]
        return self._plan(pool, np.flatnonzero(pool.active & (pool.step < pool.total)))

    def split(self, plan: StepPlan) -> list[StepPlan]:
        """Two halves of a plan (after the device ran out of memory on the whole)."""
        pool = self.pools[plan.size]
        half = len(plan) // 2
        return [self._plan(pool, plan.slots[:half]), self._plan(pool, plan.slots[half:])]

    def restrict(self, plan: StepPlan, keep: np.ndarray) -> StepPlan | None:
        """The plan for the slots of `plan` still active (others failed meanwhile)."""
        pool = self.pools[plan.size]
        slots = plan.slots[pool.active[plan.slots] & keep]
        return self._plan(pool, slots) if len(slots) else None

    def advance(self, plan: StepPlan) -> list[tuple[GenerationJob, int, int]]:
        """Count the plan's step as launched; returns (job, image, slot) of each finished sample.
        Finished slots stay taken until the engine releases them after decoding."""
        pool = self.pools[plan.size]
        pool.step[plan.slots] += 1
        return [(pool.jobs[s], int(pool.image[s]), int(s)) for s in plan.slots[plan.finishing]]  # type: ignore[misc]

    def job_of(self, size: Size, slot: int) -> GenerationJob | None:
        return self.pools[size].jobs[slot]

    def bucket(self, rows: int) -> int:
        for size in self.buckets:
            if size >= rows:
                return size
        return rows

    def _plan(self, pool: Pool, slots: np.ndarray) -> StepPlan:
        steps = pool.step[slots].copy()
        done_after = steps + 1
        every = pool.preview_every[slots]
        first = pool.first[slots].copy()
        # Previews are counted in the steps the job runs, from its start.
        due = (every > 0) & (done_after < pool.total[slots]) & ((done_after - first) % np.maximum(every, 1) == 0)
        full = pool.full_decode[slots]
        guided = pool.guided[slots].copy()
        rows = int(len(slots) + guided.sum())
        return StepPlan(
            size=pool.size,
            slots=slots.copy(),
            steps=steps,
            guided=guided,
            bucket=self.bucket(rows),
            previews=np.flatnonzero(due & ~full),
            full_previews=np.flatnonzero(due & full),
            preview_x0=pool.preview_x0[slots].copy(),
            first=first,
            finishing=np.flatnonzero(done_after >= pool.total[slots]),
        )
