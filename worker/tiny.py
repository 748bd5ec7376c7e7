"""A tiny random-weight Stable Diffusion pipeline, built locally.

Tests (and benchmarks on a laptop) need real diffusers components without a
download, the way diffusers' own tests build `get_dummy_components`. The result
is saved in the standard pipeline layout and loaded through the same code path
as a real Stable Diffusion directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from worker.wordtok import build_word_tokenizer

TINY_WORDS = (
    "a an the of on in at with and small large big tiny red green blue yellow white black orange purple "
    "circle square triangle star cross ring shape picture image photo background backdrop top bottom left right "
    "center middle corner cat dog house tree sky sea"
).split()


def build_tiny_pipeline(seed: int = 0, sample_size: int = 16) -> StableDiffusionPipeline:
    """Native size is `sample_size` × 2 pixels (a 2-block VAE halves once)."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size * 2,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
    )
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


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    print(save_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "models/tiny-random"))
