"""A compiled module's code kept whole on disk, so that a restarted worker skips torch.compile.

With only inductor's cache filled, a restart still has dynamo read the UNet's
Python again (68-73 % of a warm compile on the CPU, bench/compile_warm.py) and
look up every graph in the cache. torch's ahead-of-time compile
(`torch.compile(fn, fullgraph=True).aot_compile(...)`, experimental) instead
saves the traced and compiled function with its guards as one file, and a
restart loads it in seconds. The module is an argument of the compiled
function, not part of it, so its weights are read at each call and are not in
the file.

`Precompiled` wraps one module's forward (a module-level function taking the
module and tensors). On its first call, at warm-up, it loads the file keyed by
everything the compiled code depends on (`artifact_path`), or compiles ahead
of time and writes it (whole, or not at all). Where torch lacks the feature,
the module does not trace as one graph, the code serves only the first call's
batch size or cannot be saved, or its first call fails, it falls back to plain
`torch.compile` and says why, once; where that failure would repeat (not a
device out of memory, not a process being stopped) it leaves a `.failed` note
beside the file so that later starts do not try again. A file that does not
load, or whose guards refuse the worker's inputs, is removed, so that the next
start compiles a good one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Bump when the way artifacts are made changes in a way their key does not show.
FORMAT = 2


def _guard_filter(entries: Sequence[Any]) -> list[bool]:
    """Keep the guards on the call's inputs (dtype, device, shape, strides, grad mode) and
    drop those on globals and object identities, which cannot be saved. What they checked
    (which code and which module classes ran) is in the artifact's key instead."""
    from torch._dynamo.guards import CheckFunctionManager

    unsaveable = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        not entry.is_global
        and entry.guard_type not in unsaveable
        and not unsaveable.intersection(entry.derived_guard_types or ())
        for entry in entries
    ]


def artifact_path(cache_dir: Path, name: str, forward: Callable[..., Any], module: torch.nn.Module,
                  extra: dict[str, Any] | None = None) -> Path:
    """Where `forward` compiled for `module` is kept: a hash of what the compiled code depends
    on (torch, its CUDA and Triton, diffusers and the libraries its modules consult, Python,
    the GPU, the module's structure, dtype and layout, the forward's source and the compile
    settings), so that a change anywhere compiles afresh."""
    import torch._inductor.config as inductor

    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    gpu = None
    if device.type == "cuda":
        gpu = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # no source on disk (a frozen or generated function): its bytecode
        source = f"{forward.__module__}.{forward.__qualname__}:{forward.__code__.co_code.hex()}"
    facts = {
        "format": FORMAT,
        "versions": {dist: _version(dist) for dist in ("torch", "triton", "diffusers", "transformers", "peft")},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version,
        # The index too: the saved guards check each tensor's device, so cuda:1 cannot load cuda:0's.
        "device": str(device),
        "gpu": gpu,
        "dtype": str(param.dtype) if param is not None else None,
        "channels_last": param is not None and param.dim() == 4
        and param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous(),
        "module": repr(module),
        # Not diffusers' own "_" entries: `_use_default_values` is a set's order, another each run.
        "config": {k: v for k, v in dict(getattr(module, "config", {}) or {}).items() if not k.startswith("_")},
        "processors": sorted({type(p).__name__ for p in getattr(module, "attn_processors", {}).values()}),
        "forward": source,
        "conv_1x1_as_mm": inductor.conv_1x1_as_mm,
        # dynamo's global-state guard checks torch's thread count: a cache shared by hosts with
        # other CPU counts had each discard the other's file as not fitting, and compile again.
        "threads": torch.get_num_threads(),
        "extra": extra or {},
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir / "precompiled" / f"{name}-{digest}.pt2"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def aot_available() -> bool:
    """Whether this torch has ahead-of-time compile (torch._dynamo.config.enable_aot_compile)."""
    return hasattr(torch._dynamo.config, "enable_aot_compile") and hasattr(torch.compiler, "load_compiled_function")


class Precompiled:
    """`forward(module, *tensors)` compiled once per artifact and loaded from it afterwards.

    Call it with the tensors; their first dimension (the batch) stays symbolic, so one
    compile serves every batch size. `path=None` means plain torch.compile, never saved.
    """

    def __init__(self, name: str, forward: Callable[..., torch.Tensor], module: torch.nn.Module,
                 path: Path | None) -> None:
        self.name = name
        self.forward = forward
        self.module = module
        self.path = path
        self._aot: Any = None  # the ahead-of-time compiled function, loaded or made here
        self._proven = False  # whether the ahead-of-time function has run once
        self._plain: Any = None  # torch.compile(forward): the fallback
        # How the first call got its code: "loaded", "compiled", or "plain: <why>".
        self.source: str | None = None
        self.seconds = 0.0  # spent loading or compiling ahead of time (plain compiles lazily)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.source is None:
            self._prepare(tensors)
        aot = self._aot
        if aot is not None:
            if not aot.guard_check(self.module, *tensors):
                self._discard(f"inputs {_shapes(tensors)} do not fit the guards of {self.path}"
                              f"{_failed_guard(aot, self.module, *tensors)}")
            elif self._proven:
                return aot(self.module, *tensors)
            else:
                try:
                    out = aot(self.module, *tensors)
                except torch.OutOfMemoryError:
                    raise  # the batch's fault, not the code's: the engine splits it
                except Exception as exc:  # noqa: BLE001 - code that cannot run once must not fail every start
                    self._discard(f"its first call failed ({_describe(exc)})",
                                  note=_repeats(exc))
                else:
                    self._proven = True
                    return out
        if self._plain is None:
            self._plain = torch.compile(self.forward)
        for tensor in tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self._plain(self.module, *tensors)

    @property
    def will_load(self) -> bool:
        """Whether the first call would load saved code (seconds), not compile (tens of seconds or more)."""
        return self.source is None and self.path is not None and aot_available() and self.path.exists()

    @property
    def ahead_of_time(self) -> bool:
        """Whether calls run the code compiled ahead of time (loaded or made here)."""
        return self._aot is not None

    def fall_back(self, why: str) -> None:
        """From now on plain torch.compile (where the saved code cannot serve: `why`, logged)."""
        log.warning("%s: compiling with plain torch.compile, not ahead of time: %s", self.name, why)
        self._aot = None
        self.source = f"plain: {why}"

    def _discard(self, why: str, note: bool = False) -> None:
        """Fall back, and remove the file that cannot serve, so that the next start compiles a
        good one instead of loading this one and falling back every time; with `note`, the
        failure would repeat, and later starts are told not to try."""
        if self.path is not None:
            _remove(self.path)
            if note:
                self._note_failure(why)
        self.fall_back(why)

    def _note_failure(self, why: str) -> None:
        """A `.failed` note beside the file: later starts compile plainly at once."""
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.with_suffix(".failed").write_text(why + "\n")
        except OSError:
            pass

    def _prepare(self, tensors: Sequence[torch.Tensor]) -> None:
        path = self.path
        if path is None:
            self.source = "plain: no compile cache"
            return
        _canonical_config(self.module)
        if not aot_available():
            self.fall_back(f"torch {torch.__version__} has no ahead-of-time compile")
            return
        started = time.perf_counter()
        if path.exists():
            try:
                with path.open("rb") as file:
                    aot = _checked(torch.compiler.load_compiled_function(file))
            except Exception as exc:  # noqa: BLE001 - whatever the file holds, compiling again fixes it
                log.warning("%s: could not load %s (%s); compiling it again", self.name, path, _describe(exc))
                _remove(path)
            else:
                self._aot, self.source = aot, "loaded"
                self.seconds = time.perf_counter() - started
                log.info("%s: loaded its compiled code from %s in %.1f s", self.name, path, self.seconds)
                return
        failed = path.with_suffix(".failed")
        if failed.exists():
            try:
                why = failed.read_text().strip()
            except OSError as exc:
                why = str(exc)
            self.fall_back(f"an earlier start could not compile it ahead of time ({why})")
            return
        if any(t.shape[0] == 1 for t in tensors):
            # dynamo specialises a size of 1: the saved code would serve batch 1 alone.
            self.fall_back("its first call has a batch of 1")
            return
        for tensor in tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        try:
            with torch._dynamo.config.patch(enable_aot_compile=True):
                compiled = torch.compile(self.forward, fullgraph=True, options={"guard_filter_fn": _guard_filter})
                aot = _checked(compiled.aot_compile(((self.module, *tensors), {})))
            # Twice the rows: the worker's buckets are all even, so a guard on parity stays theirs.
            if not aot.guard_check(self.module, *_rows(tensors, 2 * tensors[0].shape[0])):
                raise TypeError(f"the code compiled for {_shapes(tensors)} serves no other batch size")
        except Exception as exc:  # noqa: BLE001 - a graph break, an unsaveable guard: all fall back
            why = _describe(exc)
            if _repeats(exc):
                self._note_failure(why)
            self.fall_back(why)
            return
        self._aot, self.source = aot, "compiled"
        self.seconds = time.perf_counter() - started
        self._save(aot, path)

    def _save(self, aot: Any, path: Path) -> None:
        """`aot` to `path`, whole or not at all: a file cut short (a full disk, a kill) would be
        loaded next time. Written in a folder of its own (torch adds temporary files beside
        what it writes), moved into place, the folder removed."""
        staging = path.parent / f".partial-{uuid.uuid4().hex}"
        try:
            _sweep_stale_staging(path.parent)
            staging.mkdir(parents=True)
            aot.save_compiled_function(str(staging / path.name))
            os.replace(staging / path.name, path)
        except Exception as exc:  # noqa: BLE001 - the code compiled is still good for this process
            why = _describe(exc)
            if not isinstance(exc, OSError) and _repeats(exc):  # it cannot be serialised: every start would fail so
                self._note_failure(f"saving failed: {why}")
            log.warning("%s: compiled ahead of time in %.1f s but could not save it to %s (%s)",
                        self.name, self.seconds, path, why)
            return
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("%s: compiled ahead of time in %.1f s and saved to %s", self.name, self.seconds, path)


# Staging folders older than this were left by a process killed while saving.
STALE_STAGING_S = 3600.0


def _sweep_stale_staging(folder: Path) -> None:
    now = time.time()
    for staging in folder.glob(".partial-*"):
        try:
            if now - staging.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:
            pass


def _canonical_config(module: torch.nn.Module) -> None:
    """Give a diffusers module's config one layout, however the module was made.

    The forward reads entries of it (the UNet's `center_input_sample`), so dynamo's saved guards
    check the order of its keys. Loading from disk adds `_name_or_path`, `_class_name`,
    `_diffusers_version` and `_use_default_values`, which a module built in code lacks, and a
    config.json's own order carries over; the file's name (artifact_path) rightly ignores both.
    Code compiled by one (bench/throughput.py's model built in code) then refused the other (the
    worker's, loaded from the directory it was saved to). The compiled code sees the public
    entries alone, sorted by name; the module's weights and structure are untouched."""
    config = getattr(module, "_internal_dict", None)
    if not isinstance(config, dict):
        return
    public = sorted(((k, v) for k, v in config.items() if not k.startswith("_")), key=lambda item: item[0])
    if list(config) != [k for k, _ in public]:
        module._internal_dict = type(config)(public)


def _remove(path: Path) -> None:
    """Remove `path` if it can be (a read-only cache leaves it, and the worker goes on)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def _repeats(exc: BaseException) -> bool:
    """Whether a failure to compile or run saved code would happen again at the next start:
    not where the device ran out of memory (a busy GPU) or the process was being stopped."""
    seen: BaseException | None = exc
    chain: set[int] = set()  # a chain may loop back on itself
    while seen is not None and id(seen) not in chain:
        chain.add(id(seen))
        text = str(seen).lower()
        if isinstance(seen, (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt, SystemExit)) \
                or "out of memory" in text or "alloc_failed" in text or "shutdown" in text:
            return False
        seen = seen.__cause__ or seen.__context__
    return True


def _checked(aot: Any) -> Any:
    """`aot`, its guards left to __call__ (which falls back where they fail, instead of
    raising); an error where this torch's compiled function lacks the methods used here."""
    if not (hasattr(aot, "guard_check") and hasattr(aot, "disable_guard_check")):
        raise TypeError(f"{type(aot).__name__} has no guard_check in torch {torch.__version__}")
    aot.disable_guard_check()
    return aot


def _failed_guard(aot: Any, *args: Any) -> str:
    """Which guard refused `args` (": <its check>"), as far as this torch tells it, else "":
    the one line that says why a start compiles again instead of loading (H100 run 5's was the
    order of the config's keys). Read through torch's private guard manager, so any failure
    to read it only leaves the reason out."""
    try:
        info = aot._artifacts.guard_manager.check_verbose(aot.prepare_f_locals(*args))
        parts = [str(part).split("  #", 1)[0].strip() for part in info.verbose_code_parts]
    except Exception:  # noqa: BLE001 - a diagnosis, never a reason to fail
        return ""
    return f": {'; '.join(parts)[:300]}" if parts else ""


def _shapes(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in tensors)


def _describe(exc: BaseException) -> str:
    """`Type: first line of the message`, for a log line or a note."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _rows(tensors: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """Tensors like the inputs with `rows` rows, each with the input's strides (the guards
    check them: channels_last, a column of a table, expanded rows), to ask the compiled
    code's guards whether it serves another batch size. Their values are never read."""
    return [torch.empty_strided((rows, *t.shape[1:]), t.stride(), dtype=t.dtype, device=t.device) for t in tensors]

