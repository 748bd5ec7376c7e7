"""The sampling engine on real (tiny, random-weight) diffusers components, on the CPU in fp32."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.fixtures.oom_unet import OOMAboveRows, OOMAtCalls
from worker.loader import LoadedModel, fit_latent_rgb, load_model
from worker.engine import Engine, GenerationJob, InvalidForModel, JobCanceled
from worker.samplers import SCHEDULERS


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, torch.device("cpu"), torch.float32)


@pytest.fixture
def engine(model: LoadedModel) -> Iterator[Engine]:
    yield Engine(model, max_batch=8)


def make_job(job_id: str, **overrides: Any) -> GenerationJob:
    fields: dict[str, Any] = dict(
        id=job_id, prompt="a red circle", width=32, height=32, steps=6, guidance_scale=7.5, seed=7
    )
    fields.update(overrides)
    return GenerationJob(**fields)


def run_alone(engine: Engine, job: GenerationJob) -> GenerationJob:
    engine.submit(job)
    engine.run_until_idle()
    job.future.result(timeout=0)
    return job


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_batch_mates_do_not_change_a_job(engine: Engine, scheduler: str) -> None:
    """Guards against batching leaking between jobs: per-sample timesteps, scheduler
    state, seeds, guidance and prompts must keep each job identical to running alone."""
    specs = [
        dict(prompt="a red circle", seed=1),
        dict(prompt="a blue square on a green background", seed=2, steps=4, guidance_scale=1.0),
        dict(prompt="a small star", seed=3, num_images=2, width=48, negative_prompt="red"),
        dict(prompt="a big yellow ring", seed=4, steps=9, guidance_scale=3.0),
    ]
    alone = [run_alone(engine, make_job(f"a{i}", scheduler=scheduler, **spec)) for i, spec in enumerate(specs)]
    together = [make_job(f"b{i}", scheduler=scheduler, **spec) for i, spec in enumerate(specs)]
    # Staggered joins: two start, the others join while those are mid-flight.
    engine.submit(together[0])
    engine.submit(together[1])
    engine.step_once()
    engine.step_once()
    engine.submit(together[2])
    engine.step_once()
    engine.submit(together[3])
    engine.run_until_idle()
    for a, b in zip(alone, together):
        b.future.result(timeout=0)
        for la, lb in zip(a.latents, b.latents):
            assert torch.allclose(la, lb, atol=1e-4), f"{a.prompt}: max diff {(la - lb).abs().max()}"


def stock_image(model: LoadedModel, scheduler: str, seed: int) -> np.ndarray:
    """diffusers' own StableDiffusionPipeline on `model`, with the service's scheduler `scheduler`."""
    cls, overrides = SCHEDULERS[scheduler]
    stock = StableDiffusionPipeline(**{**model.pipe.components, "scheduler": cls.from_config(model.scheduler_config, **overrides)})
    stock.set_progress_bar_config(disable=True)
    return stock(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]


def test_engine_matches_stock_pipeline(model: LoadedModel, engine: Engine) -> None:
    """Guards against the project's own loop drifting from standard SD sampling
    (guidance formula, noise scaling, scheduler use, VAE scaling)."""
    for name in ("ddim", "dpmpp_2m", "euler_a"):
        expected = stock_image(model, name, seed=11)
        job = run_alone(engine, make_job("s", scheduler=name, seed=11))
        got = job.images[0].astype(np.float32) / 255
        assert np.abs(got - expected).max() < 2 / 255, name


@pytest.fixture(scope="module")
def vpred_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny pipeline with the built-in model's schedule: v-prediction, zero terminal SNR, trailing steps."""
    from world.sd_components import sd_noise_scheduler
    from world.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.scheduler = sd_noise_scheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    path = tmp_path_factory.mktemp("models") / "tiny-vpred"
    pipe.save_pretrained(path, safe_serialization=True)
    return load_model(path, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_engine_follows_a_v_prediction_zero_snr_model(vpred_model: LoadedModel, scheduler: str) -> None:
    """Guards against the engine assuming SD's epsilon prediction or its noise schedule:
    on a v-prediction, zero-terminal-SNR model (the built-in model's kind) every
    scheduler must give the stock pipeline's image, batched with others or not."""
    assert vpred_model.scheduler_config["prediction_type"] == "v_prediction"
    expected = stock_image(vpred_model, scheduler, seed=11)
    engine = Engine(vpred_model, max_batch=8)
    job = make_job("v", scheduler=scheduler, seed=11)
    mate = make_job("m", scheduler=scheduler, seed=12, prompt="a blue star")
    engine.submit(job)
    engine.submit(mate)
    engine.run_until_idle()
    job.future.result(timeout=0)
    mate.future.result(timeout=0)
    got = job.images[0].astype(np.float32) / 255
    assert np.abs(got - expected).max() < 2 / 255, scheduler


def test_same_seed_same_image_different_seed_different_image(engine: Engine) -> None:
    """Guards against unseeded randomness: a seed must reproduce its image."""
    first = run_alone(engine, make_job("x", seed=5, scheduler="euler_a"))
    second = run_alone(engine, make_job("y", seed=5, scheduler="euler_a"))
    other = run_alone(engine, make_job("z", seed=6, scheduler="euler_a"))
    assert np.array_equal(first.images[0], second.images[0])
    assert not np.array_equal(first.images[0], other.images[0])


def test_image_i_uses_seed_plus_i(engine: Engine) -> None:
    """Guards against the images of one job sharing a noise stream: image i must equal
    a one-image job with seed + i."""
    multi = run_alone(engine, make_job("m", seed=20, num_images=3, scheduler="euler_a"))
    third = run_alone(engine, make_job("t", seed=22, scheduler="euler_a"))
    assert torch.allclose(multi.latents[2], third.latents[0], atol=1e-4)
    assert not torch.allclose(multi.latents[0], multi.latents[1], atol=1e-2)


def test_guidance_free_jobs_use_one_row(model: LoadedModel) -> None:
    """Guards against paying for an unconditional pass when guidance is off."""
    counting = OOMAboveRows(model.pipe.unet, max_rows=1000)
    engine = Engine(model, max_batch=8)
    original = model.pipe.unet
    model.pipe.unet = counting
    try:
        run_alone(engine, make_job("g", guidance_scale=1.0, steps=3))
        assert counting.calls == [1, 1, 1]
        counting.calls.clear()
        run_alone(engine, make_job("h", guidance_scale=5.0, steps=2))
        assert counting.calls == [2, 2]
        counting.calls.clear()
        engine.submit(make_job("i", guidance_scale=1.0, steps=2))
        engine.submit(make_job("j", guidance_scale=5.0, steps=2, num_images=2))
        engine.run_until_idle()
        assert counting.calls == [5, 5]  # one UNet call per step for both jobs
    finally:
        model.pipe.unet = original


def test_out_of_memory_fails_only_what_must_fail(model: LoadedModel) -> None:
    """Guards against one oversized batch failing every job, or killing the engine:
    the batch is split; only a job that cannot fit even alone fails."""
    original = model.pipe.unet
    model.pipe.unet = OOMAboveRows(original, max_rows=2)
    engine = Engine(model, max_batch=8)
    try:
        jobs = [make_job(f"o{i}", seed=i, guidance_scale=5.0) for i in range(3)]
        futures = [engine.submit(job) for job in jobs]
        engine.run_until_idle()
        for job, future in zip(jobs, futures):
            assert future.result(timeout=0)
        model.pipe.unet = OOMAboveRows(original, max_rows=1)
        guided = make_job("big", guidance_scale=5.0)
        unguided = make_job("small", guidance_scale=1.0)
        engine.submit(guided)
        engine.submit(unguided)
        engine.run_until_idle()
        with pytest.raises(torch.OutOfMemoryError):
            guided.future.result(timeout=0)
        assert unguided.future.result(timeout=0)
        # The engine keeps serving afterwards.
        model.pipe.unet = original
        assert run_alone(engine, make_job("after")).images[0] is not None
    finally:
        model.pipe.unet = original
    # Split batches still give each job the image it gets alone.
    alone = run_alone(Engine(model, max_batch=8), make_job("o0", seed=0, guidance_scale=5.0))
    assert torch.allclose(alone.latents[0], jobs[0].latents[0], atol=1e-4)


def a_two_image_job_beside_another(model: LoadedModel, other_guidance: float
                                    ) -> tuple[Engine, GenerationJob, GenerationJob]:
    """A two-step, two-image job and a one-image job run to their end in one engine, whose
    UNet or decoder the caller made fail on cue."""
    engine = Engine(model, max_batch=8)
    two = make_job("a", steps=2, guidance_scale=1.0, num_images=2)
    other = make_job("b", steps=2, guidance_scale=other_guidance, seed=2)
    engine.submit(two)
    engine.submit(other)
    engine.run_until_idle()
    return engine, two, other


def test_a_job_failed_in_a_later_half_does_not_take_the_others_down(model: LoadedModel) -> None:
    """Guards against one job's out-of-memory error failing every job on the worker: a
    two-image job whose first image ran in the first half of a split step and whose
    second failed alone in the second half left its first slot counted as stepped; on
    the last step the engine finished a slot with no job (AttributeError), and the
    worker failed everything it held."""
    original = model.pipe.unet
    # Two steps. Step 2: the whole batch fails (call 2); [a0] runs (3); [a1, b] fails (4);
    # [a1] fails alone (5): job a is out of memory; [b] runs (6).
    model.pipe.unet = OOMAtCalls(original, failing={2, 4, 5})
    try:
        engine, two, other = a_two_image_job_beside_another(model, other_guidance=5.0)
        assert model.pipe.unet.calls == [4, 4, 1, 3, 1, 2]
        with pytest.raises(torch.OutOfMemoryError):
            two.future.result(timeout=0)
        assert other.future.result(timeout=0)
        model.pipe.unet = original
        assert run_alone(engine, make_job("after", steps=2)).images[0] is not None
    finally:
        model.pipe.unet = original


def test_a_job_failed_at_its_decode_in_one_half_does_not_take_the_others_down(model: LoadedModel) -> None:
    """Guards against one job's out-of-memory error failing every job on the worker: a
    two-image job's last step split in halves ([a0] | [a1, b]), and the first half's decode
    failed the job, freeing a1's slot too; the second half then finished a slot with no job
    (AttributeError), and the worker failed everything it held."""
    original_unet, original_decode = model.pipe.unet, model.pipe.vae.decode
    model.pipe.unet = OOMAtCalls(original_unet, failing={2})  # the last step: split, both halves run
    decodes: list[int] = []

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        decodes.append(latents.shape[0])
        if len(decodes) <= 2:  # the first half's decode, and its one-by-one retry
            raise torch.OutOfMemoryError("injected: decode of the first half")
        return original_decode(latents, *args, **kwargs)

    model.pipe.vae.decode = decode
    try:
        _, two, other = a_two_image_job_beside_another(model, other_guidance=1.0)
        assert model.pipe.unet.calls == [3, 3, 1, 2]
        with pytest.raises(torch.OutOfMemoryError):
            two.future.result(timeout=0)
        assert other.future.result(timeout=0)
        assert decodes == [1, 1, 1]  # a0, a0 alone, then b; a1 never decoded
    finally:
        model.pipe.unet, model.pipe.vae.decode = original_unet, original_decode


def test_an_error_as_jobs_finish_fails_them_instead_of_hanging_them(engine: Engine) -> None:
    """Guards against a job that waited for ever: an error in the end of its last step
    (after its decode freed its slots: a CUDA error as the device caught up, or here its
    picture's compositing) reached the engine loop, whose answer, failing every job it
    holds, no longer saw the finishing ones."""
    broken = make_job("broken", steps=3)

    def compose(image: np.ndarray) -> np.ndarray:
        raise RuntimeError("injected: compositing failed")

    broken.compose = compose  # type: ignore[method-assign]
    fails_all_it_holds_then_serves_on(engine, broken, "compositing")


def fails_all_it_holds_then_serves_on(engine: Engine, broken: GenerationJob, error: str) -> None:
    """With the engine loop on a thread, as the worker runs it: `broken` and a longer
    bystander both end with the error (matching `error`), and a job after them succeeds."""
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()
    try:
        bystander = make_job("by", steps=30)
        engine.submit(broken)
        engine.submit(bystander)
        with pytest.raises(RuntimeError, match=error):
            broken.future.result(timeout=60)
        with pytest.raises(RuntimeError, match=error):  # the engine's answer: fail all it holds
            bystander.future.result(timeout=60)
        after = make_job("after", steps=2)  # the engine thread survived and serves on
        engine.submit(after)
        assert after.future.result(timeout=60)
    finally:
        stop.set()
        thread.join(10)


def test_a_canceled_job_waiting_behind_one_that_does_not_fit_ends_at_once(model: LoadedModel) -> None:
    """Guards against a canceled job kept waiting (its client told it was stopping, its RQ
    slot held) for as long as the running jobs took: only the head of the waiting line was
    checked for cancels, and a head that did not fit yet held the line."""
    engine = Engine(model, max_batch=2)
    running = make_job("running", steps=40)
    engine.submit(running)
    engine.step_once()
    head = make_job("head", steps=4, num_images=2)  # needs both slots: waits for `running`
    behind = make_job("behind", steps=4, seed=3)
    engine.submit(head)
    engine.submit(behind)
    engine.step_once()
    behind.cancel_requested.set()
    engine.step_once()
    with pytest.raises(JobCanceled):
        behind.future.result(timeout=0)
    assert not running.future.done() and not head.future.done()
    assert engine.has_room() is False  # `head` still waits; `behind` no longer counts
    engine.run_until_idle()
    assert running.future.result(timeout=0) and head.future.result(timeout=0)


def test_a_job_the_batch_cannot_hold_fails_alone(engine: Engine) -> None:
    """Guards against one job's admission failing its batch: a preview_every past int64 (the
    API once took any size) raised OverflowError out of the scheduler's admission, which failed
    every running job and left that job's own future unresolved, its slot waiting for ever.
    It fails by itself, leaves no slot taken, and the others run on."""
    running = make_job("running", steps=8, num_images=2)
    engine.submit(running)
    engine.step_once()
    bad = make_job("bad", preview_every=2**63, num_images=2)
    engine.submit(bad)
    engine.step_once()
    with pytest.raises(OverflowError):
        bad.future.result(timeout=0)
    assert engine.scheduler.active_samples() == 2  # `running`'s
    # Nor held by a slot it half took (its images, its future, until the slot's next job).
    assert all(held is not bad for pool in engine.scheduler.pools.values() for held in pool.jobs)
    after = make_job("after", seed=3)
    engine.submit(after)
    engine.run_until_idle()
    assert running.future.result(timeout=0) and after.future.result(timeout=0)


def test_slots_waiting_for_room_hear_of_a_canceled_job_dropped_at_admission(model: LoadedModel) -> None:
    """Guards against room freed unheard: a job canceled while it waited, dropped when its turn
    came, woke no slot waiting for room (only ends and the cancel sweep did), so the worker
    took its next job up to half a second late."""
    engine = Engine(model, max_batch=2)
    running = make_job("running", steps=40)
    engine.submit(running)
    engine.step_once()
    head = make_job("head", steps=4)
    engine.submit(head)
    assert not engine.has_room()
    head.cancel_requested.set()
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(engine.wait_for_room(60)))
    waiter.start()
    time.sleep(0.2)  # the waiter is asleep on the condition
    engine.step_once()
    waiter.join(timeout=10)
    assert not waiter.is_alive() and woke == [True]
    with pytest.raises(JobCanceled):
        head.future.result(timeout=0)
    running.cancel_requested.set()
    engine.run_until_idle()


def test_cancel_stops_a_running_job_at_the_next_step(engine: Engine) -> None:
    """Guards against cancel being ignored until the job ends, or stopping its batch-mates."""
    victim = make_job("v", steps=50)
    bystander = make_job("b", steps=8)
    engine.submit(victim)
    engine.submit(bystander)
    engine.step_once()
    engine.step_once()
    victim.cancel_requested.set()
    engine.step_once()
    with pytest.raises(JobCanceled):
        victim.future.result(timeout=0)
    assert victim.step == 2
    engine.run_until_idle()
    assert bystander.future.result(timeout=0)


def test_cancel_before_admission_never_runs(engine: Engine) -> None:
    """Guards against a canceled queued job still taking a batch slot."""
    job = make_job("q")
    job.cancel_requested.set()
    engine.submit(job)
    engine.run_until_idle()
    with pytest.raises(JobCanceled):
        job.future.result(timeout=0)
    assert job.step == 0


def test_previews_arrive_every_n_steps_and_vary(engine: Engine) -> None:
    """Guards against previews at the wrong steps or stuck on one frame."""
    frames: list[tuple[int, np.ndarray]] = []
    job = make_job("p", steps=10, preview_every=3, on_preview=lambda j, step, rgb: frames.append((step, rgb)))
    run_alone(engine, job)
    assert [step for step, _ in frames] == [3, 6, 9]
    assert all(rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8 for _, rgb in frames)
    assert len({rgb.tobytes() for _, rgb in frames}) == 3


def test_full_decode_previews_have_image_size(engine: Engine) -> None:
    """Guards against preview_full_decode silently using the cheap path."""
    frames: list[np.ndarray] = []
    run_alone(engine, make_job("f", steps=4, preview_every=2, preview_full_decode=True,
                               on_preview=lambda j, step, rgb: frames.append(rgb)))
    assert [f.shape for f in frames] == [(32, 32, 3)]


def test_unknown_words_are_reported_and_ignored(engine: Engine) -> None:
    """Guards against out-of-vocabulary words reaching the text encoder as [UNK] noise."""
    plain = run_alone(engine, make_job("u1", prompt="a red circle"))
    noisy = run_alone(engine, make_job("u2", prompt="a red zebra circle, xylophone!"))
    assert noisy.unknown_words == ["zebra", "xylophone"]
    assert plain.unknown_words == []
    assert np.array_equal(plain.images[0], noisy.images[0])


def test_sizes_the_model_cannot_divide_are_rejected(engine: Engine) -> None:
    """Guards against a shape error deep in the UNet instead of a clear message."""
    with pytest.raises(InvalidForModel, match="width must be a multiple of 2"):
        engine.submit(make_job("w", width=33))
    with pytest.raises(InvalidForModel, match="scheduler"):
        engine.submit(make_job("s", scheduler="lms"))


def test_fitted_preview_factors_track_the_vae(model: LoadedModel) -> None:
    """Guards against previews that ignore the latent: fitted factors must explain
    decoded colour better than a constant."""
    factors, bias = fit_latent_rgb(model.pipe, model.device)
    assert factors.shape == (4, 3) and bias.shape == (3,)
    assert factors.abs().sum() > 0


def test_padded_batches_give_the_unpadded_result(model: LoadedModel) -> None:
    """Guards against bucket padding (used on GPUs to keep batch shapes few) leaking
    into real rows: padded and unpadded engines must agree."""
    specs = [dict(seed=1), dict(seed=2, guidance_scale=1.0), dict(seed=3, prompt="a blue star")]
    plain = Engine(model, max_batch=8, batch_buckets=())
    padded = Engine(model, max_batch=8, batch_buckets=(4, 8, 16))
    results = []
    for engine in (plain, padded):
        jobs = [make_job(f"p{i}", **spec) for i, spec in enumerate(specs)]
        for job in jobs:
            engine.submit(job)
        engine.run_until_idle()
        results.append(jobs)
    for a, b in zip(*results):
        assert torch.allclose(a.latents[0], b.latents[0], atol=1e-4)


def test_shared_dpm_step_equals_separate_steps(engine: Engine) -> None:
    """Guards against the shared DPM-Solver++ step (samples in the same state step
    together) mixing up samples' solver history: image i of a multi-image job must
    equal a one-image job with seed + i, which steps alone."""
    multi = run_alone(engine, make_job("dm", seed=30, num_images=3, scheduler="dpmpp_2m", steps=8))
    for i in range(3):
        single = run_alone(engine, make_job(f"ds{i}", seed=30 + i, scheduler="dpmpp_2m", steps=8))
        assert torch.allclose(multi.latents[i], single.latents[0], atol=1e-4)


def test_an_unexpected_engine_error_fails_jobs_instead_of_hanging_them(engine: Engine) -> None:
    """Guards against an exception escaping a step killing the engine thread and
    leaving every job on the worker waiting for ever."""

    def explode(job: GenerationJob, step: int) -> None:
        raise RuntimeError("boom")

    fails_all_it_holds_then_serves_on(engine, make_job("boom", on_progress=explode), "boom")


def test_decode_failure_of_one_image_fails_only_its_job(model: LoadedModel) -> None:
    """Guards against a VAE failure in the one-by-one fallback escaping the engine."""
    engine = Engine(model, max_batch=8)
    original = model.pipe.vae.decode
    calls: list[int] = []

    def flaky(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("injected: decode batch too big")
        if len(calls) == 2:
            raise RuntimeError("injected: cuDNN failure")
        return original(latents, *args, **kwargs)

    model.pipe.vae.decode = flaky
    try:
        first, second = make_job("d1", seed=1), make_job("d2", seed=2)
        engine.submit(first)
        engine.submit(second)
        engine.run_until_idle()
    finally:
        model.pipe.vae.decode = original
    with pytest.raises(RuntimeError, match="cuDNN"):
        first.future.result(timeout=0)
    assert second.future.result(timeout=0)


class _Replay:
    """Stands in for torch.cuda.CUDAGraph on the CPU: replaying re-runs the captured body
    on the same static tensors, which is what a graph replay does on the GPU."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.body()


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_graph_replay_protocol_matches_the_direct_step(model: LoadedModel, scheduler: str) -> None:
    """Guards against the CUDA-graph path reading stale inputs: a captured step only sees
    its static index and noise buffers, so every replay must refill them (slots, steps,
    padding, Euler a's per-step noise) and give what the direct step gives."""
    from worker.runners import sd

    def capturing(runner: sd.SDRunner) -> list[_Replay]:
        made: list[_Replay] = []

        def capture(pool: Any, index: torch.Tensor, noise: torch.Tensor, unet: Any) -> Any:
            replay = _Replay(lambda: runner._body(pool, index, noise, runner._eager_unet()))
            made.append(replay)
            return sd._Graph(replay, index, noise)  # type: ignore[arg-type]

        runner._capture = capture  # type: ignore[method-assign]
        runner.options = sd.RunnerOptions(cuda_graphs=True, max_steps=runner.options.max_steps)
        return made

    specs = [dict(seed=1), dict(seed=2, guidance_scale=1.0, steps=4), dict(seed=3, num_images=2, prompt="a blue star")]
    results = []
    for graphs in (False, True):
        engine = Engine(model, max_batch=4, batch_buckets=(2, 4, 8))
        replays = capturing(engine.runner) if graphs else []
        engine.warm_up()
        jobs = [make_job(f"g{i}", scheduler=scheduler, **spec) for i, spec in enumerate(specs)]
        engine.submit(jobs[0])
        engine.step_once()
        engine.submit(jobs[1])
        engine.submit(jobs[2])
        engine.run_until_idle()
        results.append(jobs)
        if graphs:
            assert len(replays) == 3 and sum(r.replays for r in replays) > 6
    for a, b in zip(*results):
        for la, lb in zip(a.latents, b.latents):
            assert torch.allclose(la, lb, atol=1e-5), f"{a.id}: max diff {(la - lb).abs().max()}"


def test_a_slot_waiting_for_room_wakes_when_a_job_leaves(model: LoadedModel) -> None:
    """Guards against RQ slots polling for room on a timer (a delay before every queued
    job starts): a job leaving the batch must wake a waiter at once."""
    import threading
    import time

    engine = Engine(model, max_batch=1)
    engine.submit(make_job("full", steps=3))
    engine.step_once()
    assert not engine.has_room()
    woke: list[tuple[bool, float]] = []

    def waiter() -> None:
        started = time.monotonic()
        woke.append((engine.wait_for_room(20.0), time.monotonic() - started))

    thread = threading.Thread(target=waiter)
    thread.start()
    engine.run_until_idle()
    thread.join(30)
    assert woke and woke[0][0] is True
    assert woke[0][1] < 15, "woke only when the wait timed out"



def test_buffers_of_sizes_no_job_uses_are_freed(model: LoadedModel) -> None:
    """Guards against an engine that kept the buffers of every latent size it ever ran (with
    the Euler a noise bank, hundreds of MB each at 1024² on a GPU): any multiple of 8 is a
    size, so device memory grew until jobs ran out of it. Beyond KEEP_IDLE_SIZES idle sizes
    the oldest go, never the native size nor one a job holds; a size run again gives the
    same image."""
    from worker.engine import KEEP_IDLE_SIZES

    engine = Engine(model, max_batch=8)
    native = (model.native_height // model.vae_scale_factor, model.native_width // model.vae_scale_factor)
    first = run_alone(engine, make_job("s16", width=16, height=16, scheduler="euler_a"))
    run_alone(engine, make_job("native", width=model.native_width, height=model.native_height, steps=2))
    held = make_job("held", width=24, height=24, steps=150, scheduler="euler")
    engine.submit(held)
    engine.step_once()  # admitted: its size is in use from now on
    for side in (40, 48, 56, 64):
        job = make_job(f"s{side}", width=side, height=side, steps=2)
        engine.submit(job)
        while not job.future.done():  # not run_until_idle: the held job must go on running
            engine.step_once()
        job.future.result(timeout=0)
    assert not held.future.done()
    def latent(side: int) -> tuple[int, int]:
        return (side // model.vae_scale_factor, side // model.vae_scale_factor)

    sizes = set(engine.runner.pools)
    assert native in sizes and latent(24) in sizes  # the native size and the size a job holds
    assert sizes - {native, latent(24)} == {latent(56), latent(64)}, sizes  # the newest idle ones
    assert len(sizes) == 2 + KEEP_IDLE_SIZES and set(engine.scheduler.pools) == sizes
    again = run_alone(engine, make_job("s16", width=16, height=16, scheduler="euler_a"))
    assert torch.equal(again.latents[0], first.latents[0])
    held.cancel_requested.set()
    engine.run_until_idle()


def test_the_compiled_vae_decodes_only_the_size_it_was_warmed_at(model: LoadedModel) -> None:
    """Guards against the compiled VAE decoding every size: a job of another size than the one
    warmed up made torch.compile compile again mid-request (tens of seconds on a GPU), with
    every job on the worker held up meanwhile; the UNet already ran such sizes eagerly. The
    compiled decoder (CUDA only) is stood in for by a recorder around the real one."""
    from worker.runners import sd

    engine = Engine(model, max_batch=8)
    runner = engine.runner
    seen: list[tuple[int, ...]] = []

    def compiled(batch: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(batch.shape[-2:]))
        return sd.vae_decode(model.vae, batch)

    runner._compiled_vae = compiled  # noqa: SLF001 - what torch.compile would have set on CUDA
    native = (model.native_height // model.vae_scale_factor, model.native_width // model.vae_scale_factor)
    runner.warm_size = native
    channels = model.latent_channels
    assert runner.decode(torch.zeros((1, channels, *native)))[0].shape[:2] == (model.native_height,
                                                                               model.native_width)
    other = (native[0] // 2, native[1] // 2)
    assert runner.decode(torch.zeros((1, channels, *other)))[0].shape[:2] == (
        other[0] * model.vae_scale_factor, other[1] * model.vae_scale_factor)
    assert seen == [native]


def test_without_graphs_the_compiled_unet_runs_the_size_it_was_warmed_at(model: LoadedModel) -> None:
    """Guards against BAILAN_CUDA_GRAPHS=false dropping torch.compile too: with no captured
    graph, every step ran the eager UNet, though warm-up had compiled it for the native
    size; other sizes stay eager (a compile there would hold up every job). The compiled
    UNet (CUDA only) is stood in for by a recorder around the real one."""
    from worker.runners import sd

    engine = Engine(model, max_batch=8)
    runner = engine.runner
    sizes: list[tuple[int, ...]] = []

    def compiled(sample: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(sample.shape[-2:]))
        return sd.unet_forward(model.unet, sample, *args)

    runner._compiled_unet = compiled  # noqa: SLF001 - what torch.compile would have set on CUDA
    native = (model.native_height // model.vae_scale_factor, model.native_width // model.vae_scale_factor)
    runner.warm_size = native
    run_alone(engine, make_job("native", width=model.native_width, height=model.native_height, steps=3))
    run_alone(engine, make_job("small", width=model.native_width // 2, height=model.native_height // 2, steps=3))
    assert sizes == [native] * 3


def test_an_idle_engine_starts_the_jobs_its_slots_took_in_one_step(engine: Engine) -> None:
    """Guards against a burst of jobs starting over several steps: RQ slots hand their jobs over
    one after another (Redis round trips each), and an idle engine that stepped the first at once
    finished the burst over several steps and decodes (H100: 16 jobs over ~250 ms). Jobs a slot
    has taken (`expect`) are waited for; a job never announced is not."""
    engine.gather_s = 30.0  # the cap is not what this test measures
    took = threading.Event()
    late = make_job("late")

    def slot() -> None:
        engine.expect()
        took.set()
        time.sleep(0.2)  # its set-up: longer than the early job's whole run
        engine.submit(late)

    thread = threading.Thread(target=slot)
    thread.start()
    assert took.wait(5)
    early = make_job("early", seed=8)
    engine.submit(early)
    engine.run_until_idle()
    thread.join(5)
    assert early.future.result(timeout=0) is not None and late.future.result(timeout=0) is not None
    assert engine.iterations == early.steps  # both ran every step together


def test_a_job_handed_over_while_a_burst_is_admitted_joins_its_first_step(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards a burst split over two steps and two decodes: a job handed over while an idle
    engine encoded the burst's first prompts (tens of milliseconds; the H100's 16-job bursts
    reached the worker over 64-110 ms) waited for the whole first step, and its burst ended
    over two decodes. It joins the first step, within the gather's cap."""
    engine.gather_s = 30.0  # the cap is not what this test measures
    late = make_job("late")
    start = engine.runner.start

    def encoding(admission: Any) -> None:
        if admission.jobs[0].id == "early":
            # A slot hands its job over meanwhile, from its own thread.
            slot = threading.Thread(target=engine.submit, args=(late,))
            slot.start()
            slot.join(5)
        start(admission)

    monkeypatch.setattr(engine.runner, "start", encoding)
    early = make_job("early", seed=8)
    engine.submit(early)
    engine.run_until_idle()
    assert early.future.result(timeout=0) is not None and late.future.result(timeout=0) is not None
    assert engine.iterations == early.steps  # both ran every step together


def test_a_lone_job_starts_at_once(engine: Engine) -> None:
    """Guards a lone job's latency against the burst gathering: with no other job handed over
    or being handed over, its first step comes right after its own admission."""
    engine.gather_s = 30.0
    job = make_job("lone")
    started = time.monotonic()
    engine.submit(job)
    assert engine.step_once()
    assert time.monotonic() - started < 10  # not the 30 s cap
    assert engine.iterations == 1
    engine.run_until_idle()


def run_beside_a_slot(engine: Engine, hold: Callable[[], None]) -> tuple[float, threading.Thread]:
    """Run one job on an idle engine while another thread has taken a job (`expect`) and then
    does `hold`; returns the seconds the run took, and that thread."""
    took = threading.Event()

    def slot() -> None:
        engine.expect()
        took.set()
        hold()

    thread = threading.Thread(target=slot)
    thread.start()
    assert took.wait(5)
    job = make_job("alone")
    started = time.monotonic()
    engine.submit(job)
    engine.run_until_idle()
    assert job.future.result(timeout=0) is not None
    return time.monotonic() - started, thread


def test_a_slot_that_gives_up_its_job_releases_the_wait(engine: Engine) -> None:
    """Guards against an idle engine held for its whole cap by a slot whose job never came (RQ
    failed it first, or it was deleted): `unexpect` ends the wait at once."""
    engine.gather_s = 30.0

    def give_up() -> None:
        time.sleep(0.1)
        engine.unexpect()

    took_s, thread = run_beside_a_slot(engine, give_up)
    thread.join(5)
    assert took_s < 20  # not the 30 s cap


def test_a_wait_for_a_job_that_never_comes_ends_at_the_cap(engine: Engine) -> None:
    """Guards against an engine stalled for ever by a slot that announced a job and then hung
    (a Redis outage in its set-up): the first step waits `gather_s` at most."""
    engine.gather_s = 0.2
    release = threading.Event()
    took_s, thread = run_beside_a_slot(engine, lambda: release.wait(30))
    assert took_s < 20  # not until the slot gave up after 30 s
    release.set()
    thread.join(5)


def test_a_refused_job_releases_the_wait(engine: Engine) -> None:
    """Guards against an idle engine held for its cap by a slot whose job the engine refused
    (InvalidForModel at submit): the slot's mark went only when the job ended, after its failure
    was written (through any Redis outage)."""
    engine.gather_s = 30.0
    refused: list[BaseException] = []

    def refuse() -> None:
        try:
            engine.submit(make_job("odd", width=33))
        except InvalidForModel as exc:
            refused.append(exc)

    took_s, thread = run_beside_a_slot(engine, refuse)
    thread.join(5)
    assert refused and took_s < 20  # not the 30 s cap


def test_compile_phases_name_what_torch_compile_spent() -> None:
    """Guards the warm-up log's split of torch.compile's time (what a warm start with a
    filled cache still spends, measured on the GPU from that line): its phases are
    torch's private timer names, and a torch that renamed them would log nothing, so a
    compile here must show up under them."""
    from worker.runners.sd import compile_phases

    before = compile_phases()
    traced = torch.compile(lambda x: torch.sin(x) * 2 + x, backend="eager")
    traced(torch.ones(3))
    after = compile_phases()
    assert {"compile_s", "tracing_s", "backend_s", "guards_s"} <= after.keys()
    assert after["compile_s"] > before.get("compile_s", 0.0)
    assert after["tracing_s"] > 0
