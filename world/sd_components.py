"""Building blocks shared by everything that assembles a Stable Diffusion pipeline
in code: the tiny test pipeline, the built-in model's trainer and the GPU benchmark."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedModel


def sd_noise_scheduler(**overrides: Any) -> DDPMScheduler:
    """Stable Diffusion's training noise schedule (scaled-linear betas, 1000 steps)."""
    config: dict[str, Any] = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
        prediction_type="epsilon",
    )
    return DDPMScheduler(**{**config, **overrides})


def clip_text_encoder(
    tokenizer: Any,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    model_class: type[PreTrainedModel] = CLIPTextModel,
    **extra: Any,
) -> PreTrainedModel:
    """A CLIP text encoder sized for `tokenizer` (its vocabulary and special tokens); SDXL's
    second encoder is `model_class=CLIPTextModelWithProjection` with a `projection_dim`."""
    config = CLIPTextConfig(
        vocab_size=extra.pop("vocab_size", len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    return model_class(config)


def assemble_pipeline(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: Any, scheduler: Any
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline without the safety checker (the service has none)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
