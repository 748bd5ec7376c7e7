"""Cheap previews: latents -> RGB without the VAE.

A preview must cost next to nothing per step, so the VAE decoder is out. Two
maps, both from latents in the sampler's space (the VAE's latents times its
scaling factor):

* a linear map (latent channel x RGB factors plus a bias), fitted by least
  squares from the VAE or shipped as `latent_rgb.json` (ComfyUI's factors for
  the SD 1.x/2.x VAE): one einsum, at latent resolution;
* a tiny convolutional decoder (`PreviewDecoder`, in the spirit of TAESD),
  trained by this repository's own code (world/preview_train.py) to imitate
  the model's VAE decoder, shipped in the model directory as
  `preview_decoder/`. Used when present: a VAE whose latents are not linear in
  colour (the built-in model's) makes the linear map's colours wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

DECODER_DIR = "preview_decoder"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class PreviewDecoder(nn.Module):
    """(n, C, h, w) latents -> (n, 3, h * upscale, w * upscale) RGB in [-1, 1]."""

    def __init__(self, latent_channels: int = 4, width: int = 64, upscale: int = 4) -> None:
        super().__init__()
        if upscale < 1 or upscale & (upscale - 1):
            raise ValueError("upscale must be a power of two")
        self.config = {"latent_channels": latent_channels, "width": width, "upscale": upscale}
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        channels = width
        for _ in range(upscale.bit_length() - 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels // 2, 3, padding=1),
                       nn.SiLU()]
            channels //= 2
        layers.append(nn.Conv2d(channels, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(latents))

    def save(self, model_dir: Path) -> Path:
        out = Path(model_dir) / DECODER_DIR
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).write_text(json.dumps(self.config, indent=1) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        return out


def load_preview_decoder(model_dir: Path, device: torch.device, dtype: torch.dtype) -> PreviewDecoder | None:
    """The model directory's preview decoder, or None when it ships none."""
    folder = Path(model_dir) / DECODER_DIR
    if not (folder / CONFIG).is_file():
        return None
    config: dict[str, Any] = json.loads((folder / CONFIG).read_text())
    decoder = PreviewDecoder(**config)
    decoder.load_state_dict(load_file(str(folder / WEIGHTS)))
    return decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def linear_to_rgb(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) -> (n, 3, h, w) in [-1, 1] by the linear map."""
    return (torch.einsum("nchw,cr->nrhw", latents.float(), factors) + bias.view(1, 3, 1, 1)).clamp(-1, 1)


def to_uint8_hwc(rgb: torch.Tensor) -> torch.Tensor:
    """(n, 3, h, w) in [-1, 1] -> (n, h, w, 3) uint8, on the same device."""
    return ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
