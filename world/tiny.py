"""Tiny random-weight Stable Diffusion and SDXL pipelines, built locally.

Tests (and benchmarks on a laptop) need real diffusers components without a
download, the way diffusers' own tests build `get_dummy_components`. The result
is saved in the standard pipeline layout and loaded through the same code path
as a real Stable Diffusion directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection

from world.sd_components import assemble_pipeline, clip_text_encoder, sd_noise_scheduler
from world.wordtok import build_word_tokenizer

TINY_WORDS = (
    "a an the of on in at with and small large big tiny red green blue yellow white black orange purple "
    "circle square triangle star cross ring shape picture image photo background backdrop top bottom left right "
    "center middle corner cat dog house tree sky sea"
).split()


def tiny_vae(sample_size: int, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A 2-block VAE (it halves once) for latents of `sample_size`."""
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size * 2,
        scaling_factor=scaling_factor,
    )


def build_tiny_pipeline(seed: int = 0, sample_size: int = 16, inpainting: bool = False) -> StableDiffusionPipeline:
    """Native size is `sample_size` × 2 pixels (a 2-block VAE halves once). `inpainting`
    gives the UNet SD-inpainting's 9 input channels (latent, mask, masked picture)."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    text_encoder = clip_text_encoder(tokenizer, hidden=32, intermediate=37, layers=2, heads=4)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = tiny_vae(sample_size)
    return assemble_pipeline(unet, vae, text_encoder, tokenizer, sd_noise_scheduler())


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 16) -> StableDiffusionXLPipeline:
    """SDXL's layout at toy size, as diffusers' own SDXL tests build it: two text encoders
    (the second with a projection, whose pooled output conditions the UNet with the
    size and crop "time ids"), a UNet with `text_time` added conditioning."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    tokenizer_2 = build_word_tokenizer(TINY_WORDS, model_max_length=16)
    text_encoder = clip_text_encoder(tokenizer, hidden=32, intermediate=37, layers=2, heads=4)
    text_encoder_2 = clip_text_encoder(tokenizer_2, hidden=32, intermediate=37, layers=2, heads=4,
                                       model_class=CLIPTextModelWithProjection, projection_dim=32)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # The pooled text embedding (32) and six size/crop numbers of 8 features each.
        projection_class_embeddings_input_dim=32 + 6 * 8,
        cross_attention_dim=64,  # both encoders' hidden states side by side
        norm_num_groups=32,
    )
    vae = tiny_vae(sample_size, scaling_factor=0.13025)  # SDXL's VAE scaling
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=sd_noise_scheduler(), force_zeros_for_empty_prompt=True,
    )


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    build_tiny_sdxl_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    print(save_tiny_pipeline(sys.argv[1] if len(sys.argv) > 1 else "models/tiny-random"))
