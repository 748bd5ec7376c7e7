"""Load a Stable Diffusion directory once, onto the worker's device.

The built-in model, the tiny test pipelines and a real SD 1.x/2.x directory all
go through `load_model`, so what the tests exercise is what production runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from pydantic import ValidationError

from bailan.jobs import MODEL_DEFAULTS_FILE, ModelDefaults, SchedulerName

from worker.previews import load_preview_decoder

log = logging.getLogger(__name__)

# ComfyUI's latent->RGB factors for the SD 1.x/2.x VAE (latent channel x RGB).
SD_LATENT_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]


@dataclass
class LoadedModel:
    name: str
    path: Path
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    device: torch.device
    dtype: torch.dtype
    vae_scale_factor: int
    native_width: int
    native_height: int
    latent_channels: int
    scheduler_config: dict[str, Any]
    # (C, 3) factors and (3,) bias mapping sampler latents to RGB in [-1, 1].
    latent_rgb: torch.Tensor
    latent_rgb_bias: torch.Tensor
    # A trained latents -> RGB decoder for previews, when the model directory ships one.
    preview_decoder: torch.nn.Module | None = None
    # First 10 hex digits of the sha256 of the weight files (see model_hash); None when built in memory.
    hash: str | None = None
    # What a request that omits steps, guidance or scheduler gets (MODEL_DEFAULTS_FILE).
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    @property
    def family(self) -> str:
        """Which runner samples it (worker.runners): "sdxl" or "sd" (1.x/2.x)."""
        return "sdxl" if isinstance(self.pipe, StableDiffusionXLPipeline) else "sd"

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    def info(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "width": self.native_width,
            "height": self.native_height,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "size_multiple": self.vae_scale_factor,
            "family": self.family,
            "hash": self.hash,
            "defaults": self.defaults.model_dump(mode="json", exclude_none=True),
            # Every runner samples with each of these (worker.samplers.make_scheduler).
            "samplers": [name.value for name in SchedulerName],
        }


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("BAILAN_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and name != "float32":
        raise ValueError(f"BAILAN_DTYPE={name} is not supported on the CPU; use float32")
    return getattr(torch, name)


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    with ThreadPoolExecutor(1, thread_name_prefix="bailan-model-hash") as hashing:
        # Beside the load, not after it: hashlib lets go of Python's lock over each block, and
        # hashing gigabytes of weights took seconds of every start (~2 s for SD1.5 in fp16).
        digest = hashing.submit(model_hash, path)
        model = from_pipeline(read_pipeline(path, dtype), path, device, dtype)
        model.hash = digest.result()
    model.defaults = load_defaults(path)
    return model


def read_pipeline(path: Path, dtype: torch.dtype) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The pipeline in a local directory, on the CPU: its family's class, no safety checker, no download."""
    cls = pipeline_class(path)
    extra = {} if cls is StableDiffusionXLPipeline else {"safety_checker": None, "requires_safety_checker": False}
    return cls.from_pretrained(path, local_files_only=True, dtype=dtype, **extra)


def pipeline_class(path: Path) -> type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline]:
    """The pipeline family model_index.json names: SDXL's layout (two text encoders) or SD's."""
    try:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path / 'model_index.json'}: not readable JSON ({exc})") from exc
    if "XL" in str(name):
        if "Img2Img" in name or "Inpaint" in name or "Refiner" in name:
            raise ValueError(f"{path}: {name} is not served; give an SDXL base (StableDiffusionXLPipeline) directory")
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def load_defaults(path: Path) -> ModelDefaults:
    """The model directory's defaults file, or none; a malformed one stops start-up
    rather than serving jobs with settings nobody chose."""
    file = path / MODEL_DEFAULTS_FILE
    if not file.is_file():
        return ModelDefaults()
    try:
        return ModelDefaults.model_validate_json(file.read_bytes())
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise ValueError(f"{file}: {where}: {first['msg']}") from exc


def model_hash(path: Path) -> str:
    """sha256 over the directory's weight files (UNet, text encoder, VAE; sorted by path),
    first 10 hex digits: what images carry as `Model hash`, computed once at load."""
    digest = hashlib.sha256()
    for folder in ("unet", "text_encoder", "text_encoder_2", "vae"):
        for file in sorted((path / folder).glob("*.safetensors")) + sorted((path / folder).glob("*.bin")):
            with open(file, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:10]


def from_pipeline(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, path: str | Path, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """Wrap a pipeline already in memory (`load_model`'s second half; benchmarks build
    models in code). `path` names the model and is where `latent_rgb.json` is looked for.
    How the device runs it (CUDA graphs, torch.compile, memory layout) is the model
    runner's business (worker.runners.sd.RunnerOptions)."""
    path = Path(path)
    pipe.to(device=device, dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.eval().requires_grad_(False)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    sample = pipe.unet.config.sample_size
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
    # The VAE's: an inpainting UNet takes more input channels (mask, masked picture) than it denoises.
    latent_channels = pipe.vae.config.latent_channels
    factors, bias = _latent_rgb(path, pipe, latent_channels, device)
    return LoadedModel(
        name=path.resolve().name,  # "." or "models/x/" name the directory too
        path=path,
        pipe=pipe,
        device=device,
        dtype=dtype,
        vae_scale_factor=vae_scale,
        native_width=sample_w * vae_scale,
        native_height=sample_h * vae_scale,
        latent_channels=latent_channels,
        scheduler_config=dict(pipe.scheduler.config),
        latent_rgb=factors.to(device=device, dtype=torch.float32),
        latent_rgb_bias=bias.to(device=device, dtype=torch.float32),
        preview_decoder=load_preview_decoder(path, device, torch.float32),
    )


def _latent_rgb(
    path: Path, pipe: StableDiffusionPipeline, channels: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    shipped = path / "latent_rgb.json"
    if shipped.is_file():
        data = json.loads(shipped.read_text())
        return torch.tensor(data["factors"], dtype=torch.float32), torch.tensor(
            data.get("bias", [0.0, 0.0, 0.0]), dtype=torch.float32
        )
    if channels == 4 and abs(pipe.vae.config.scaling_factor - 0.18215) < 1e-6:
        return torch.tensor(SD_LATENT_RGB), torch.zeros(3)
    log.info("no latent_rgb.json in %s: fitting preview factors from the VAE", path)
    return fit_latent_rgb(pipe, device)


@torch.no_grad()
def fit_latent_rgb(pipe: StableDiffusionPipeline, device: torch.device, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares from (latent, image) pairs: encode random blocky colour
    images, pool each image to latent resolution, solve [latent, 1] @ W = rgb."""
    vae = pipe.vae
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    side = 8 * scale
    gen = torch.Generator().manual_seed(0)
    blocks = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(blocks, size=(side, side), mode="nearest")
    latents = vae.encode(images.to(device=device, dtype=vae.dtype)).latent_dist.mean.float()
    latents = latents * vae.config.scaling_factor
    target = torch.nn.functional.avg_pool2d(images, scale).to(device)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1, device=device)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.cpu(), y.cpu()).solution
    return solution[:-1], solution[-1]
