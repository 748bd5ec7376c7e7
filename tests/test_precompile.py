"""Compiled code kept whole on disk (worker.precompile), on real modules on the CPU.

The engine test compiles the tiny model's UNet and VAE decoder ahead of time
(about 40 s on a 2-core CPU), then a fresh process loads them as a restarted
worker does. The fallbacks use a two-layer network, which compiles in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from worker.engine import Engine, GenerationJob
from worker.loader import LoadedModel, load_model
from worker.precompile import Precompiled, artifact_path
from bench.service import DEFERRED, DEFERRED_ENDED
from worker.process import finish_warm_up_in_background
from worker.process import warm_up as worker_warm_up
from worker.runners.sd import RunnerOptions, compile_phases, unet_forward

FIXTURE = Path(__file__).parent / "fixtures" / "precompiled_restart.py"


@pytest.fixture
def inductor_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private inductor cache, so that what a test measures is its own compile."""
    cache = tmp_path / "compile-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    return cache


def run_job(engine: Engine, width: int = 32, height: int = 32) -> GenerationJob:
    """One job of two images (so the VAE decodes two rows: a batch of 1 is never compiled ahead
    of time, and a worker's decodes are padded to 2 or more)."""
    job = GenerationJob(id="j", prompt="a red circle", width=width, height=height, steps=4, guidance_scale=7.5,
                        seed=7, num_images=2)
    engine.submit(job)
    engine.run_until_idle()
    job.future.result(timeout=0)
    return job


def differences(a: GenerationJob, b: GenerationJob) -> tuple[float, int]:
    """The largest difference of two jobs' latents, relative to their scale, and of their images (of 255)."""
    latents = max(((la - lb).abs().max() / la.abs().max()).item() for la, lb in zip(a.latents, b.latents))
    images = max(int(np.abs(ia.astype(int) - ib.astype(int)).max()) for ia, ib in zip(a.images, b.images))
    return latents, images


# Steps at 2, 4 and 8 UNet rows: one compile at the first must serve the others.
BUCKETS = (2, 4, 8)


@dataclass
class FirstStart:
    """The tiny model's first compiled start: its cache, and its job's latents eager and compiled."""

    model: LoadedModel
    cache: Path
    eager: GenerationJob
    compiled: GenerationJob
    sources: tuple[str | None, str | None]
    phases: dict[str, float]


@pytest.fixture(scope="module")
def first_start(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstStart]:
    """One compile of the tiny model's UNet and VAE decoder (tens of seconds) that the tests of
    a later start share."""
    cache = tmp_path_factory.mktemp("first-start") / "compile-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
        eager = run_job(Engine(model, 4, batch_buckets=BUCKETS))
        engine = Engine(model, 4, batch_buckets=BUCKETS,
                        options=RunnerOptions(compile_unet=True, compile_vae=True, compile_cache=cache))
        engine.warm_up()
        compiled = run_job(engine)
        unet, vae = engine.runner._compiled_unet, engine.runner._compiled_vae
        sources = (unet.source if unet else None, vae.source if vae else None)
        yield FirstStart(model, cache, eager, compiled, sources, compile_phases())


def test_a_restarted_worker_loads_the_compiled_unet_and_vae_instead_of_tracing_them(
    tiny_model_dir: Path, first_start: FirstStart
) -> None:
    """Guards the warm start: with only inductor's cache, a restart spends most of its compile
    re-tracing the model's Python. The first engine must save its compiled UNet and VAE decoder
    whole, a fresh process must load both without dynamo tracing anything, and the loaded code
    must read the weights it is called with (a fine-tune of the same architecture must not get
    the old weights' images) and match eager sampling."""
    cache = first_start.cache
    assert first_start.sources == ("compiled", "compiled")
    latents, images = differences(first_start.compiled, first_start.eager)
    assert latents < 1e-3 and images <= 2, (latents, images)
    assert first_start.phases.get("tracing_s", 0) > 0  # what the restart below must not do
    saved = sorted(p.name.split("-")[0] for p in (cache / "precompiled").glob("*.pt2"))
    assert saved == ["unet", "vae"]

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, str(FIXTURE), str(tiny_model_dir), str(cache)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    restart = json.loads(out.stdout.strip().splitlines()[-1])
    assert (restart["unet"], restart["vae"]) == ("loaded", "loaded")
    assert "tracing_s" not in restart["phases"], restart["phases"]
    assert restart["latents"] < 1e-3 and restart["images"] <= 2, restart


def test_a_loaded_unet_that_cannot_be_captured_keeps_the_graphs_with_plain_compile(
    first_start: FirstStart, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the worst case of code saved ahead of time (new in torch) on a GPU: if CUDA
    graph capture refuses it, the runner gave up the graphs for every bucket (a lone image's
    step ~3x slower, README Performance) to keep a few seconds of start-up. It must fall back
    to plain torch.compile and capture that instead. The capture (CUDA only) is stood in for
    by one that refuses the saved code and records the rest."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(first_start.cache))
    engine = Engine(first_start.model, 4, batch_buckets=BUCKETS,
                    options=RunnerOptions(compile_unet=True, compile_cache=first_start.cache))
    runner = engine.runner
    runner.options = dataclasses.replace(runner.options, cuda_graphs=True)
    captured: list[int] = []

    def capture(pool: Any, index: torch.Tensor, noise: torch.Tensor, unet: Any) -> Any:
        if unet.source is None:
            # The warm-up run before a capture: it loads the file the first start saved.
            runner._body(pool, index, noise, unet)
        if unet.ahead_of_time:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append(index.shape[1])
        return object()

    monkeypatch.setattr(runner, "_capture", capture)
    with caplog.at_level(logging.INFO, logger="worker.precompile"):
        engine.warm_up()
    assert "loaded its compiled code" in caplog.text
    assert captured == [2, 4, 8]
    unet = runner._compiled_unet
    assert unet is not None and unet.source is not None
    assert unet.source.startswith("plain: capturing the step at 2 rows failed")
    assert "not permitted when stream is capturing" in caplog.text


def test_sdxl_unet_with_its_added_conditioning_is_kept_whole_too(tiny_sdxl_dir: Path, inductor_cache: Path) -> None:
    """Guards SDXL's warm start: its UNet takes the pooled text and time ids as a dict, which
    the saved function cannot take; the runner's SDXL forward must trace as one graph from
    tensors alone, save, and load in the next runner with the eager images."""
    model = load_model(tiny_sdxl_dir, torch.device("cpu"), torch.float32)
    size = {"width": model.native_width, "height": model.native_height}
    eager = run_job(Engine(model, 4, batch_buckets=BUCKETS), **size)
    for source in ("compiled", "loaded"):
        engine = Engine(model, 4, batch_buckets=BUCKETS,
                        options=RunnerOptions(compile_unet=True, compile_cache=inductor_cache))
        engine.warm_up()
        job = run_job(engine, **size)
        assert engine.runner._compiled_unet is not None and engine.runner._compiled_unet.source == source
        latents, images = differences(job, eager)
        assert latents < 1e-3 and images <= 2, (latents, images)


def test_a_first_start_serves_before_it_compiles_the_vae_decoder(
    tiny_model_dir: Path, inductor_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the first start's length: compiling the VAE decoder took 28.9 s of a 138 s first
    start on an H100 (target 120 s) for ~0.15 s per 16-image decode. The worker must be ready
    without it, decode eagerly meanwhile, compile it on a thread of its own, and then use it;
    a later start, whose saved code loads in seconds, must not defer it."""
    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    eager = run_job(Engine(model, 4, batch_buckets=BUCKETS))
    compiled_decodes: list[int] = []
    real_call = Precompiled.__call__

    def counting(self: Precompiled, *tensors: torch.Tensor) -> torch.Tensor:
        compiled_decodes.append(tensors[0].shape[0])
        return real_call(self, *tensors)

    # On the class: the compiled code's file names its forward, which must stay the module's own.
    monkeypatch.setattr(Precompiled, "__call__", counting)
    options = RunnerOptions(compile_vae=True, compile_cache=inductor_cache)
    engine = Engine(model, 4, batch_buckets=BUCKETS, options=options)
    runner = engine.runner
    runner.vae_buckets = (2, 4)  # as on a GPU, where decodes are padded to these sizes
    with caplog.at_level(logging.INFO, logger="bailan.worker"):
        worker_warm_up(engine)  # as the worker warms up: the engine's warm-up, then one job
    # Said before ready: bench/service.py waits for the compile's end before it measures.
    assert DEFERRED in caplog.text
    assert runner.vae_deferred and runner._compiled_vae is not None and runner._compiled_vae.source is None
    before = run_job(engine)
    assert not compiled_decodes and differences(before, eager)[1] == 0
    stopping = threading.Event()
    stopping.set()
    assert engine.finish_warm_up(stopping) == {} and runner.vae_deferred  # a worker stopping gives it up
    with caplog.at_level(logging.INFO, logger="bailan.worker"):
        thread = finish_warm_up_in_background(engine, threading.Event())
        assert thread is not None
        thread.join(timeout=600)
    assert not runner.vae_deferred and runner._compiled_vae.source == "compiled"
    assert compiled_decodes == [2, 4]  # every VAE bucket before decodes use it
    assert "the VAE decoder is compiled" in caplog.text and DEFERRED_ENDED[0] in caplog.text
    compiled_decodes.clear()
    after = run_job(engine)
    assert compiled_decodes == [2] and differences(after, eager)[1] <= 2

    later = Engine(model, 4, batch_buckets=BUCKETS, options=options)
    later.warm_up(defer_vae_compile=True)
    assert not later.runner.vae_deferred and finish_warm_up_in_background(later, threading.Event()) is None
    compiled_decodes.clear()
    run_job(later)
    assert later.runner._compiled_vae is not None and later.runner._compiled_vae.source == "loaded"
    assert compiled_decodes == [2]


def test_a_deferred_compile_that_fails_leaves_decodes_eager_and_says_so(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards the worker against its background compile: an error there (a GPU out of memory
    beside live jobs) must not reach the engine or its jobs. It is logged, and decodes stay
    eager. The failing compile is stood in for; the engine and its decodes are real."""
    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    engine = Engine(model, 4, batch_buckets=BUCKETS, options=RunnerOptions(compile_vae=True))
    engine.warm_up()
    engine.runner.vae_deferred = True  # as warm_up leaves a first start

    def failing(stop: threading.Event | None = None) -> dict[str, float]:
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(engine, "finish_warm_up", failing)
    with caplog.at_level(logging.ERROR, logger="bailan.worker"):
        thread = finish_warm_up_in_background(engine, threading.Event())
        assert thread is not None
        thread.join(timeout=60)
    assert "decodes stay eager" in caplog.text
    assert engine.runner.vae_deferred
    job = run_job(engine)
    assert len(job.images) == 2 and engine.runner._compiled_vae is not None
    assert engine.runner._compiled_vae.source is None  # never called: every decode ran eagerly


class Net(torch.nn.Module):
    """Two layers: a real module that compiles in seconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.silu(self.conv(x)))


def net_forward(net: Net, x: torch.Tensor) -> torch.Tensor:
    return net(x)


def branchy_forward(net: Net, x: torch.Tensor) -> torch.Tensor:
    # Data-dependent control flow: dynamo must break the graph here, so no whole-graph compile.
    if x.sum() > 0:
        return net(x)
    return -net(x)


def net_path(cache: Path, forward: Callable[[Net, torch.Tensor], torch.Tensor] = net_forward) -> tuple[Net, Path]:
    net = Net().eval()
    return net, artifact_path(cache, "net", forward, net)


@torch.inference_mode()
def test_a_corrupt_file_is_compiled_again_and_replaced(inductor_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Guards a worker that cannot start: a truncated or foreign file in the cache (a full disk,
    a torch build that writes another format) must be compiled again, said, and replaced."""
    net, path = net_path(inductor_cache)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a compiled function")
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="worker.precompile"):
        compiled = Precompiled("net", net_forward, net, path)
        assert torch.allclose(compiled(x), net(x), atol=1e-5)
    assert compiled.source == "compiled"
    assert "could not load" in caplog.text
    reloaded = Precompiled("net", net_forward, net, path)
    other_batch = torch.randn(5, 3, 8, 8)
    assert torch.allclose(reloaded(other_batch), net(other_batch), atol=1e-5)
    assert reloaded.source == "loaded"


@torch.inference_mode()
def test_a_module_that_breaks_the_graph_runs_plainly_compiled_and_is_not_retried(
    inductor_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards a model whose forward does not trace as one graph: the worker must still serve it
    (plain torch.compile), say why, and note it, so that every later start does not pay for
    the failed attempt again (also where a file that does not load lay there: it was tried
    first, and the note never read)."""
    net, path = net_path(inductor_cache, branchy_forward)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # and a file cut short beside it: it must not keep the note from being read
    x = torch.randn(2, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="worker.precompile"):
        compiled = Precompiled("net", branchy_forward, net, path)
        assert torch.allclose(compiled(x), branchy_forward(net, x), atol=1e-5)
    assert compiled.source is not None and compiled.source.startswith("plain:")
    assert not path.exists() and path.with_suffix(".failed").exists()
    assert "not ahead of time" in caplog.text
    caplog.clear()
    path.write_bytes(b"")  # a bad file again, now beside the note
    with caplog.at_level(logging.WARNING, logger="worker.precompile"):
        again = Precompiled("net", branchy_forward, net, path)
        assert torch.allclose(again(-x), branchy_forward(net, -x), atol=1e-5)
    assert again.source is not None and "an earlier start could not compile it" in again.source
    assert "earlier start" in caplog.text


@torch.inference_mode()
def test_inputs_outside_the_guards_fall_back_instead_of_failing_the_job(
    inductor_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guards a loaded function called with inputs it was not compiled for (another dtype): it
    cannot recompile itself as torch.compile would, and raising would fail the job. It must
    fall back to plain torch.compile, with the right result, and remove the file: kept, every
    later start would load it and fall back again. The log must name the guard that refused
    (H100 run 5's refusal said only "do not fit", and its cause took a CPU reproduction)."""
    net, path = net_path(inductor_cache)
    Precompiled("net", net_forward, net, path)(torch.randn(2, 3, 8, 8))
    wide = Net().double().eval()
    loaded = Precompiled("net", net_forward, wide, path)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="worker.precompile"):
        assert torch.allclose(loaded(x), wide(x), atol=1e-8)
    assert loaded.source is not None and loaded.source.startswith("plain:")
    assert "do not fit the guards" in caplog.text
    assert "dtype mismatch" in caplog.text, caplog.text
    assert not path.exists()


@torch.inference_mode()
def test_a_first_call_of_one_row_is_not_saved_for_every_batch(inductor_cache: Path) -> None:
    """Guards a file that serves one batch size: dynamo specialises a size of 1, so code
    compiled at a first call of one row (a VAE decoding one image) refused every later
    batch, and every start loaded it and fell back. It must not be saved (nor noted as failed:
    a start whose first call has more rows compiles it)."""
    net, path = net_path(inductor_cache)
    one = Precompiled("net", net_forward, net, path)
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(one(x), net(x), atol=1e-5)
    assert one.source == "plain: its first call has a batch of 1"
    assert not path.exists() and not path.with_suffix(".failed").exists()
    two = Precompiled("net", net_forward, net, path)
    two(torch.randn(2, 3, 8, 8))
    assert two.source == "compiled" and path.exists()


class _Crashing:
    """A loaded function whose guards pass and whose code raises: what torch does not promise
    cannot happen with code saved by another build of the same version."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def guard_check(self, *args: Any) -> bool:
        return True

    def __call__(self, *args: Any) -> Any:
        raise self.error


@torch.inference_mode()
def test_saved_code_whose_first_call_fails_is_removed_and_noted(inductor_cache: Path) -> None:
    """Guards a worker that fails every start: saved code that loads but raises when run made
    the warm-up raise, and the supervisor's restart loaded it again. The call must fall back
    to plain torch.compile, remove the file and note why."""
    net, path = net_path(inductor_cache)
    Precompiled("net", net_forward, net, path)(torch.randn(2, 3, 8, 8))
    loaded = Precompiled("net", net_forward, net, path)
    x = torch.randn(2, 3, 8, 8)
    loaded(x)
    assert loaded.source == "loaded"
    loaded._aot, loaded._proven = _Crashing(RuntimeError("CUDA error: device-side assert triggered")), False
    assert torch.allclose(loaded(x), net(x), atol=1e-5)
    assert loaded.source is not None and "first call failed" in loaded.source
    assert not path.exists() and "device-side assert" in path.with_suffix(".failed").read_text()


@torch.inference_mode()
def test_saved_code_that_runs_out_of_memory_is_kept(inductor_cache: Path) -> None:
    """Guards saved code lost to a busy GPU: running out of memory on a first call (a compile
    beside live jobs) is the batch's fault, not the code's. The error must reach the engine,
    which splits the batch, and the file must stay, with no note against it."""
    net, path = net_path(inductor_cache)
    Precompiled("net", net_forward, net, path)(torch.randn(2, 3, 8, 8))
    loaded = Precompiled("net", net_forward, net, path)
    loaded(torch.randn(2, 3, 8, 8))
    loaded._aot, loaded._proven = _Crashing(torch.OutOfMemoryError("CUDA out of memory")), False
    with pytest.raises(torch.OutOfMemoryError):
        loaded(torch.randn(2, 3, 8, 8))
    assert path.exists() and not path.with_suffix(".failed").exists()


def parity_forward(net: Net, x: torch.Tensor) -> torch.Tensor:
    # A branch on the batch size: dynamo keeps it by specialising the size, with no graph break.
    return net(x) if x.shape[0] == 2 else -net(x)


@torch.inference_mode()
def test_code_that_serves_only_its_first_batch_size_is_not_saved(inductor_cache: Path) -> None:
    """Guards a file that serves one size: code specialised to its first call's batch loaded at
    every start and fell back at the next bucket. It must be refused before it is saved, and
    noted (the same first call would specialise it again)."""
    net, path = net_path(inductor_cache, parity_forward)
    compiled = Precompiled("net", parity_forward, net, path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(compiled(x), parity_forward(net, x), atol=1e-5)
    assert compiled.source is not None and "serves no other batch size" in compiled.source
    assert not path.exists() and path.with_suffix(".failed").exists()


@torch.inference_mode()
def test_a_save_cut_short_leaves_no_file_and_the_code_serves_on(
    inductor_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards a file cut short (a full disk, a kill mid-write) that the next start would load:
    nothing may appear at the file's name, no staging may be left, the compiled code must
    still serve this process, and only a failure that would repeat (code that cannot be
    serialised, not a full disk) may be noted."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    def cut_short(self: Any, target: str, *args: Any, **kwargs: Any) -> None:
        Path(target).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", cut_short)
    net, path = net_path(inductor_cache)
    compiled = Precompiled("net", net_forward, net, path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(compiled(x), net(x), atol=1e-5)
    assert compiled.source == "compiled" and compiled.ahead_of_time
    assert sorted(p.name for p in path.parent.iterdir()) == []

    def unpicklable(self: Any, target: str, *args: Any, **kwargs: Any) -> None:
        raise pickle.PicklingError("Can't pickle <function forward>")

    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", unpicklable)
    other = Precompiled("net", net_forward, net, path)
    other(x)
    assert other.source == "compiled" and not path.exists()
    assert "Can't pickle" in path.with_suffix(".failed").read_text()


def test_the_file_is_keyed_by_what_the_compiled_code_depends_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Guards loading stale code: another module structure (fused attention projections), dtype,
    forward or compile setting must name another file, and the same ones the same file."""
    model = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    unet = model.unet
    base = artifact_path(tmp_path, "unet", unet_forward, unet)
    assert artifact_path(tmp_path, "unet", unet_forward, unet) == base
    assert base.parent == tmp_path / "precompiled" and base.name.startswith("unet-")
    assert artifact_path(tmp_path, "unet", unet_forward, unet, {"sdpa_backend": "math"}) != base
    assert artifact_path(tmp_path, "unet", net_forward, unet) != base
    other = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    other.unet.fuse_qkv_projections()
    assert artifact_path(tmp_path, "unet", unet_forward, other.unet) != base
    half = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    half.unet.to(torch.float16)
    assert artifact_path(tmp_path, "unet", unet_forward, half.unet) != base


@torch.inference_mode()
def test_hosts_with_other_thread_counts_keep_their_own_files(inductor_cache: Path) -> None:
    """Guards a compile cache shared by hosts with different CPU counts: dynamo's saved guards
    check torch's thread count, which the file's name did not show, so each host loaded the
    other's file, found it did not fit, removed it and compiled again, start after start."""
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    net, path = net_path(inductor_cache)
    Precompiled("net", net_forward, net, path)(torch.randn(2, 3, 8, 8))
    try:
        torch.set_num_threads(other)
        theirs = artifact_path(inductor_cache, "net", net_forward, net)
        assert theirs != path
        elsewhere = Precompiled("net", net_forward, net, theirs)
        elsewhere(torch.randn(2, 3, 8, 8))
        assert elsewhere.source == "compiled"
    finally:
        torch.set_num_threads(threads)
    assert path.exists() and theirs.exists()
    back = Precompiled("net", net_forward, net, artifact_path(inductor_cache, "net", net_forward, net))
    back(torch.randn(2, 3, 8, 8))
    assert back.source == "loaded"


def test_the_file_is_named_the_same_by_every_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Guards a cache that never hits: a checkpoint whose config leaves settings to their defaults
    (an older diffusers wrote it) has diffusers list them in `_use_default_values` in a set's
    order, another in every process. Such a name changed with each start, so every restart
    compiled again."""
    config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    for key in ("dropout", "act_fn", "norm_eps", "flip_sin_to_cos", "freq_shift", "center_input_sample",
                "upcast_attention", "resnet_time_scale_shift", "mid_block_scale_factor"):
        config.pop(key, None)
    code = (
        "import json, os, sys; from pathlib import Path; from diffusers import UNet2DConditionModel; "
        "from worker.precompile import artifact_path; from worker.runners.sd import unet_forward; "
        "unet = UNet2DConditionModel.from_config(json.loads(os.environ['UNET_CONFIG'])); "
        "assert len(unet.config._use_default_values) > 3; "
        "print(artifact_path(Path(sys.argv[1]), 'unet', unet_forward, unet))"
    )
    names = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "UNET_CONFIG": json.dumps(config)}
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                             timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0, out.stderr[-2000:]
        names.add(out.stdout.strip().splitlines()[-1])
    assert len(names) == 1, names



class Configured(ModelMixin, ConfigMixin):
    """A diffusers module whose forward reads its config, as the UNet reads `center_input_sample`."""

    @register_to_config
    def __init__(self, channels: int = 3, scale: float = 2.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.config.scale


def configured_forward(module: Configured, x: torch.Tensor) -> torch.Tensor:
    return module(x)


@torch.inference_mode()
def test_code_compiled_for_a_module_built_in_code_serves_the_same_module_loaded_from_disk(
    inductor_cache: Path, tmp_path: Path
) -> None:
    """Guards a warm start that compiled again (H100 run 5: 180 s to ready instead of a load):
    dynamo's saved guards check the order of the keys of a diffusers module's config, and a
    module built in code (bench/throughput.py's) lacks the `_name_or_path`, `_class_name`,
    `_diffusers_version` and `_use_default_values` entries that loading from disk adds, as a
    config.json with its keys in another order reorders them. The file's name ignores both,
    so the worker loaded the file, found that its inputs did not fit, removed it and compiled."""
    built = Configured().eval()
    built.save_pretrained(tmp_path / "module")
    loaded = Configured.from_pretrained(tmp_path / "module").eval()
    assert list(loaded.config) != list(built.config)  # what made the guards refuse
    path = artifact_path(inductor_cache, "m", configured_forward, built)
    assert artifact_path(inductor_cache, "m", configured_forward, loaded) == path
    first = Precompiled("m", configured_forward, built, path)
    first(torch.randn(2, 3, 8, 8))
    assert first.source == "compiled"
    again = Precompiled("m", configured_forward, loaded, path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(again(x), loaded(x), atol=1e-5)
    assert again.source == "loaded" and again.ahead_of_time
    assert path.exists()
