"""How the worker process turns its settings into the engine's use of the device (pure logic)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from worker.process import batch_buckets, runner_options
from worker.runners.sd import RunnerOptions, default_batch_buckets
from worker.settings import WorkerSettings

BUILTIN = Path(__file__).resolve().parent.parent / "models" / "bailan-shapes"


def test_cuda_machinery_is_switched_on_by_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against CUDA graphs or torch.compile needing a flag to be used on a GPU, or
    being attempted on the CPU, and against a compile cache that does not outlive the process:
    importing torch._dynamo (diffusers does) sets TORCHINDUCTOR_CACHE_DIR to a /tmp directory,
    which a setdefault kept, so BAILAN_COMPILE_CACHE_DIR held only Triton's part."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, f"/tmp/{name.lower()}_as_torch_sets_it")
    settings = WorkerSettings(model=BUILTIN, compile_cache_dir=tmp_path / "compile", max_steps=80)

    cpu = runner_options(settings, torch.device("cpu"))
    assert not cpu.cuda_graphs and not cpu.compile_unet and not cpu.compile_vae
    assert cpu.max_steps == 80

    cuda = runner_options(settings, torch.device("cuda"))
    assert cuda.cuda_graphs and cuda.compile_unet and cuda.compile_vae
    assert cuda.channels_last and cuda.fuse_qkv  # they pay only under compile
    assert cuda.compile_cache == (tmp_path / "compile").resolve() and cpu.compile_cache is None
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == (tmp_path / "compile").resolve()
    assert Path(os.environ["TRITON_CACHE_DIR"]) == (tmp_path / "compile" / "triton").resolve()
    assert (tmp_path / "compile").is_dir()

    off = runner_options(WorkerSettings(model=BUILTIN, compile=False, cuda_graphs=False), torch.device("cuda"))
    assert not off.cuda_graphs and not off.compile_unet and not off.channels_last
    forced = runner_options(WorkerSettings(model=BUILTIN, compile=True, cuda_graphs=True), torch.device("cpu"))
    assert not forced.cuda_graphs and not forced.compile_unet


def test_cudnn_benchmark_is_off_unless_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards BAILAN_CUDNN_BENCHMARK reaching the runner, off unless set: cuDNN timing its
    algorithms at every bucket of every start (likely most of the 1.4 s each bucket took on an
    H100, for no step seen faster) was on with no way to turn it off."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # runner_options sets them: restored after the test
    settings = WorkerSettings(model=BUILTIN, compile_cache_dir=tmp_path / "compile")
    assert not runner_options(settings, torch.device("cuda")).cudnn_benchmark
    monkeypatch.setenv("BAILAN_CUDNN_BENCHMARK", "true")
    settings = WorkerSettings(model=BUILTIN, compile_cache_dir=tmp_path / "compile")
    assert runner_options(settings, torch.device("cuda")).cudnn_benchmark
    assert RunnerOptions(cudnn_benchmark=True).resolve(torch.device("cuda")).cudnn_benchmark


def test_batch_buckets_are_read_checked_and_used_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards BAILAN_BATCH_BUCKETS: read comma-separated (pydantic-settings reads lists as JSON),
    a non-positive bucket refused naming the variable, buckets that cannot hold a full batch
    refused before the model loads (steps beyond them would run uncaptured), as are buckets
    above a full batch (padded to, never captured) and, with compile, a bucket of 1 or an odd
    one (the compiled UNet's code then never saved, or dropped at every start); buckets set
    on the CPU, where padding is only wasted work, ignored."""
    from pydantic import ValidationError

    monkeypatch.setenv("BAILAN_BATCH_BUCKETS", "32, 8,2,8")
    settings = WorkerSettings(model=BUILTIN)
    assert settings.batch_buckets == [2, 8, 32]
    assert batch_buckets(settings, torch.device("cuda"), 16) == (2, 8, 32)
    assert batch_buckets(settings, torch.device("cpu"), 16) is None
    with pytest.raises(ValueError, match="BAILAN_BATCH_BUCKETS=2,8,32: the largest bucket must be .* 40 rows"):
        batch_buckets(settings, torch.device("cuda"), 20)
    # Beyond a full batch: warm-up never captures it, yet steps would be padded to it.
    with pytest.raises(ValueError, match="the largest bucket must be .* 16 rows"):
        batch_buckets(settings, torch.device("cuda"), 8)
    monkeypatch.setenv("BAILAN_BATCH_BUCKETS", "1,2,32")
    ones = WorkerSettings(model=BUILTIN)
    assert batch_buckets(ones, torch.device("cuda"), 16) == (1, 2, 32)
    with pytest.raises(ValueError, match="a bucket of 1 row has a compiled UNet compile twice"):
        batch_buckets(ones, torch.device("cuda"), 16, compiled=True)
    monkeypatch.setenv("BAILAN_BATCH_BUCKETS", "2,6,9,16")
    odd = WorkerSettings(model=BUILTIN)
    assert batch_buckets(odd, torch.device("cuda"), 8) == (2, 6, 9, 16)
    with pytest.raises(ValueError, match="with a compiled UNet every bucket must be even"):
        batch_buckets(odd, torch.device("cuda"), 8, compiled=True)
    monkeypatch.setenv("BAILAN_BATCH_BUCKETS", "0,8")
    with pytest.raises(ValidationError, match="BAILAN_BATCH_BUCKETS"):
        WorkerSettings(model=BUILTIN)
    monkeypatch.delenv("BAILAN_BATCH_BUCKETS")
    assert batch_buckets(WorkerSettings(model=BUILTIN), torch.device("cuda"), 16) is None  # the engine's own

def test_default_buckets_are_four_rows_apart_up_to_32() -> None:
    """Guards the padding of a staggered batch: with buckets 8 rows apart above 8, a step of
    18 rows ran at 24, and H100 run 5's staggered mode kept 0.72 of the all-at-once rate
    (0.79 replayed with buckets 4 apart, bench/bucket_padding.py). Buckets are even and end
    at a full batch, as a compiled UNet needs; none on the CPU."""
    cuda = torch.device("cuda")
    assert default_batch_buckets(cuda, 16, compiled=True) == (2, 4, 8, 12, 16, 20, 24, 28, 32)
    assert default_batch_buckets(cuda, 16) == (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
    assert default_batch_buckets(cuda, 32, compiled=True)[-5:] == (32, 40, 48, 56, 64)
    for max_batch in range(1, 40):
        buckets = default_batch_buckets(cuda, max_batch, compiled=True)
        assert buckets[-1] == 2 * max_batch and all(b % 2 == 0 for b in buckets), (max_batch, buckets)
        assert all(later - earlier <= (4 if later <= 32 else 8) for earlier, later in zip(buckets, buckets[1:])), buckets
    assert default_batch_buckets(torch.device("cpu"), 16) == ()


@pytest.mark.parametrize("setting", ["dtype", "cache"])
def test_a_setting_the_device_refuses_stops_the_worker_before_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, setting: str
) -> None:
    """Guards against a worker that took tens of seconds to load its model, then died with a
    traceback (exit 1, which supervisors restart in a loop) on a setting it could have judged
    at once: BAILAN_DTYPE=float16 on the CPU, or a BAILAN_COMPILE_CACHE_DIR that is a file
    (checked on CUDA only, where the worker compiles). It exits 2 with one line naming it."""
    from worker import process

    loads: list[Path] = []
    monkeypatch.setattr(process, "load_model", lambda *args, **kwargs: loads.append(args[0]))
    if setting == "dtype":
        settings = WorkerSettings(model=BUILTIN, dtype="float16")
        named = "BAILAN_DTYPE=float16"
    else:
        (tmp_path / "a-file").write_text("")
        settings = WorkerSettings(model=BUILTIN, compile_cache_dir=tmp_path / "a-file")
        monkeypatch.setattr(process, "pick_device", lambda name: torch.device("cuda"))
        monkeypatch.setattr(process, "pick_dtype", lambda name, device: torch.float16)
        monkeypatch.setattr(torch.cuda, "init", lambda: None)
        monkeypatch.setattr(process, "default_max_batch", lambda device: 16)
        named = "BAILAN_COMPILE_CACHE_DIR="
    with caplog.at_level("ERROR", logger="bailan.worker"):
        assert process.serve(settings) == 2
    assert loads == []
    assert any(named in record.getMessage() for record in caplog.records), caplog.text


def test_a_first_compile_says_it_will_take_minutes(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against a worker that sits unready for minutes on its first start (compiling, SDXL
    over 4 minutes on an H100) with nothing in its log to say why, or how to skip it; and against
    telling a restart with a filled cache the same."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # runner_options sets them: restored after the test
    settings = WorkerSettings(model=BUILTIN, compile_cache_dir=tmp_path / "compile")
    with caplog.at_level("INFO", logger="bailan.worker"):
        runner_options(settings, torch.device("cuda"))
    assert "is empty" in caplog.text and "BAILAN_COMPILE=false" in caplog.text
    (tmp_path / "compile" / "fxgraph").mkdir()
    caplog.clear()
    with caplog.at_level("INFO", logger="bailan.worker"):
        runner_options(settings, torch.device("cuda"))
    assert "may reuse the compiled kernels" in caplog.text and "is empty" not in caplog.text
