"""The SDXL runner: SD's runner with SDXL's conditioning.

Everything that makes Bailan's engine fast and safe (continuous batching,
buckets, CUDA graphs, previews, cancel, out-of-memory splits) lives in
worker.runners.sd.SDRunner and the engine; an SDXL base model differs only in
what the UNet is conditioned on, as diffusers' StableDiffusionXLPipeline does it:

- two text encoders, whose penultimate hidden states are concatenated (2048
  features for SDXL base), and the second's projected pooled output;
- "time ids": original size, crop corner and target size, six numbers per
  row that the UNet embeds beside the pooled text (`text_time` conditioning);
- an empty negative prompt is zeros, not the encoding of "" (the model's
  `force_zeros_for_empty_prompt`, true for SDXL base);
- its VAE overflows in float16, so it decodes in float32 unless its config
  says otherwise (`force_upcast`).
"""

from __future__ import annotations

from typing import Any

import torch

from worker.loader import LoadedModel
from worker.runners.sd import RunnerOptions, SDRunner, _Pool, token_ids

POOLED = "text_embeds"


def sdxl_unet_forward(unet: Any, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                      pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's UNet call: the pooled text and the time ids as its added conditioning."""
    added = {POOLED: pooled, "time_ids": time_ids}
    return unet(sample, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


class SDXLRunner(SDRunner):
    unet_forward = staticmethod(sdxl_unet_forward)

    def __init__(self, model: LoadedModel, max_batch: int, options: RunnerOptions | None = None) -> None:
        vae = model.vae
        if model.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)
        # diffusers registers it in the pipeline's config (True when the checkpoint does not say).
        self.zero_negative = bool(model.pipe.config.get("force_zeros_for_empty_prompt", True))
        super().__init__(model, max_batch, options)

    def _extend_pool(self, pool: _Pool) -> None:
        rows, (h, w) = pool.embeds.shape[0], pool.size
        width = self.model.pipe.text_encoder_2.config.projection_dim
        pool.extra[POOLED] = torch.zeros((rows, width), device=self.device, dtype=self.model.dtype)
        # (original size, crop top-left, target size) in pixels: the picture as asked, uncropped.
        scale = self.model.vae_scale_factor
        ids = [h * scale, w * scale, 0, 0, h * scale, w * scale]
        pool.extra["time_ids"] = torch.tensor([ids], device=self.device, dtype=self.model.dtype)

    def encode(self, texts: list[str], negative: list[bool]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
        pipe = self.model.pipe
        hidden: list[torch.Tensor] = []
        missing: list[list[list[str]]] = []
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids, lacked = token_ids(tokenizer, texts, self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            missing.append(lacked)
        # out[0] of the second encoder (with projection) is its pooled, projected text embedding.
        pooled = out[0].to(self.model.dtype)
        embeds = torch.cat(hidden, dim=-1).to(self.model.dtype)
        # A word either vocabulary lacks is reported, once.
        unknown = [list(dict.fromkeys(first + second)) for first, second in zip(*missing)]
        if self.zero_negative:
            zero = torch.tensor([n and not text for n, text in zip(negative, texts)], device=self.device)
            if zero.any():
                embeds = torch.where(zero.view(-1, 1, 1), torch.zeros_like(embeds), embeds)
                pooled = torch.where(zero.view(-1, 1), torch.zeros_like(pooled), pooled)
        return {"embeds": embeds, POOLED: pooled}, unknown

    def _unet_inputs(self, pool: _Pool, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return pool.extra[POOLED].index_select(0, rows), pool.extra["time_ids"].expand(rows.shape[0], -1)
