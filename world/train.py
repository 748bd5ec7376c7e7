"""Trains the built-in model from scratch: a small VAE first, then the text
encoder and UNet together, and saves a standard diffusers pipeline directory.

The committed weights come from two stages (`make train` runs both):

    python -m world.train --recipe base --out checkpoints/bailan-shapes-base
    python -m world.train --recipe zsnr --init-from checkpoints/bailan-shapes-base --out models/bailan-shapes

`RECIPES` holds both; the same recipe runs on the CPU and on a GPU (only
floating-point rounding differs). Data come from a
seeded procedural generator indexed by step, and each step's noise from a
generator seeded by the step, so `--resume` continues exactly where a killed
run stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from world import data
from world.sd_components import assemble_pipeline, clip_text_encoder, sd_noise_scheduler
from world.wordtok import build_word_tokenizer

MAX_TOKENS = 32  # the longest two-shape caption is 26 tokens with [BOS]/[EOS]


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    res: int = data.RES
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    # The committed run is the first 2,250 steps of a 6,000-step cosine
    # schedule: its H200 time budget cut it there (EMA weights at that step).
    unet_steps: int = 2250
    lr_schedule_steps: int = 6000
    batch: int = 64
    lr: float = 8e-4
    warmup: int = 300
    weight_decay: float = 0.01
    ema: float = 0.999
    # Offset noise: the scaled-linear schedule never reaches pure noise, so
    # without it the model reads the background from the noise's mean instead
    # of from the prompt.
    noise_offset: float = 0.1
    # Optional low-frequency (pyramid) noise at these latent grid sizes; off in
    # the recipe. Tried against the position failure (quadrant-sized structure
    # leaks through the noise down to t≈999, so an unconditional model finds the
    # shape's quadrant from x_t alone: 47 % at t=999, 72 % at t=900). With
    # (2, 4, 8) × 0.5 for 2,000 steps position stayed at chance and shape
    # accuracy fell from 90 % to 28 %.
    pyramid_scales: tuple[int, ...] = ()
    pyramid_weight: float = 0.5
    min_snr_gamma: float = 5.0
    # Zero terminal SNR (Lin et al. 2024) puts t=999 at pure noise, so the
    # shape's quadrant can no longer leak through the noise and only the words
    # can place it; at SNR 0 the model must predict v, and the min-SNR weight is
    # floored at 1 there: min(SNR + 1, γ) / (SNR + 1). The "zsnr" stage turns
    # both on. The VAE head (off in both stages) makes latents linear in colour
    # for the preview factors: from scratch with zero SNR on the 2-core CPU it
    # made previews right (fit RMSE 0.42 → 0.05), but at UNet step 1,500 samples
    # were still textures without shapes (README "Known limits").
    zero_terminal_snr: bool = False
    prediction_type: str = "epsilon"
    vae_rgb_weight: float = 0.0
    ckpt_every: int = 250

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {self.prediction_type!r}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type='v_prediction': noise cannot be predicted from pure noise")


# The committed model: "base" trains the VAE, then an ε-prediction UNet on SD's
# scaled-linear schedule (colours, shape and size follow the words, position
# does not); "zsnr" fine-tunes that UNet and text encoder into zero terminal SNR
# with v-prediction, which makes position follow the words too (README "The
# built-in model"). Fine-tuning is far cheaper than training zero-SNR from
# scratch, which still drew textures after 1,500 CPU steps.
RECIPES: dict[str, Recipe] = {
    "base": Recipe(),
    "zsnr": Recipe(
        zero_terminal_snr=True, prediction_type="v_prediction", lr=3e-4, warmup=100, unet_steps=5000, lr_schedule_steps=5000
    ),
}
# Recipes that only make sense as a fine-tune of another stage's export.
FINE_TUNES = {"zsnr": "base"}


# ---------------------------------------------------------------- the parts

def build_tokenizer() -> Any:
    return build_word_tokenizer(data.vocabulary(), model_max_length=MAX_TOKENS)


def build_text_encoder(tokenizer: Any) -> Any:
    return clip_text_encoder(tokenizer, hidden=128, intermediate=256, layers=2, heads=4)


def build_vae(res: int) -> Any:
    from diffusers import AutoencoderKL

    # Three blocks downsample 4×: 64×64×3 → 16×16×4.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # Narrow full-resolution layers: flat-coloured shapes need little width
        # there, and they dominate the VAE's cost on the CPU.
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=res,
    )


def build_unet(res: int) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=res // 4,
        in_channels=4,
        out_channels=4,
        # Attention at 8×8 and 4×4 only: at 16×16 it doubled the CPU step time,
        # and 8×8 already sees the whole picture (positions are global).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=4,  # diffusers reads this as the number of heads
        norm_num_groups=32,
    )


def build_scheduler(recipe: Recipe) -> Any:
    if not recipe.zero_terminal_snr:
        return sd_noise_scheduler(prediction_type=recipe.prediction_type)
    # "trailing" spacing makes samplers start at t=999, the pure-noise step.
    return sd_noise_scheduler(prediction_type=recipe.prediction_type, rescale_betas_zero_snr=True, timestep_spacing="trailing")


def encode_text(tokenizer: Any, text_encoder: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Exactly the worker's call, so "" here is the worker's unconditional embedding."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device)).last_hidden_state


# ---------------------------------------------------------------- training state

def _with_ema(model: torch.nn.Module, ema: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict (buffers included) with parameters swapped for EMA."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for (name, _), t in zip(model.named_parameters(), ema):
        state[name] = t.detach().cpu()
    return state


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, recipe: Recipe, device: torch.device, ckpt_dir: Path) -> None:
        self.r = recipe
        self.device = device
        self.ckpt_dir = ckpt_dir
        torch.manual_seed(recipe.seed)
        self.tokenizer = build_tokenizer()
        self.vae = build_vae(recipe.res).to(device)
        self.text_encoder = build_text_encoder(self.tokenizer).to(device)
        self.unet = build_unet(recipe.res).to(device)
        self.scheduler = build_scheduler(recipe)
        self.rgb_head = torch.nn.Conv2d(4, 3, 1).to(device)
        self.ema_unet = [p.detach().clone() for p in self.unet.parameters()]
        self.ema_te = [p.detach().clone() for p in self.text_encoder.parameters()]
        # The models are so small that a GPU step is bound by kernel launches, not
        # arithmetic: float32 (TF32) with fused AdamW beats bf16 autocast's extra
        # casts there, and keeps the CPU and GPU recipes numerically alike.
        fused = device.type == "cuda"
        self.vae_opt = torch.optim.AdamW(list(self.vae.parameters()) + list(self.rgb_head.parameters()), lr=recipe.vae_lr, weight_decay=0.0, fused=fused)
        self.opt = torch.optim.AdamW(
            list(self.unet.parameters()) + list(self.text_encoder.parameters()), lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused
        )
        self.phase = "vae"
        self.step = 0
        self.scaling_factor = 1.0
        self.log: list[dict[str, float | int | str]] = []
        self.elapsed = 0.0
        self.vae_source = "trained in this run"
        self.init_source = "random (seed)"
        self.init_train_log: dict[str, Any] | None = None
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "recipe": asdict(self.r),
            "phase": self.phase,
            "step": self.step,
            "scaling_factor": self.scaling_factor,
            "log": self.log,
            "elapsed": self.elapsed,
            "vae_source": self.vae_source,
            "init_source": self.init_source,
            "init_train_log": self.init_train_log,
            "vae": self.vae.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "rgb_head": self.rgb_head.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_unet": self.ema_unet,
            "ema_te": self.ema_te,
            "opt": self.opt.state_dict(),
        }

    def save_checkpoint(self) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self.ckpt_dir / "last.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact
        return path

    def load_checkpoint(self, path: Path) -> None:
        s = torch.load(path, map_location=self.device, weights_only=False)
        if s["recipe"] != asdict(self.r):
            raise SystemExit(f"{path} was written by another recipe: {s['recipe']}")
        self.phase, self.step = s["phase"], s["step"]
        self.scaling_factor, self.log, self.elapsed = s["scaling_factor"], s["log"], s["elapsed"]
        self.vae_source = s.get("vae_source", self.vae_source)
        self.init_source = s.get("init_source", self.init_source)
        self.init_train_log = s.get("init_train_log")
        self.vae.load_state_dict(s["vae"])
        self.vae_opt.load_state_dict(s["vae_opt"])
        self.rgb_head.load_state_dict(s["rgb_head"])
        self.unet.load_state_dict(s["unet"])
        self.text_encoder.load_state_dict(s["text_encoder"])
        self.ema_unet = [t.to(self.device) for t in s["ema_unet"]]
        self.ema_te = [t.to(self.device) for t in s["ema_te"]]
        self.opt.load_state_dict(s["opt"])

    def start_from(self, pipeline_dir: Path, fine_tune: bool) -> None:
        """Skip the VAE phase with `pipeline_dir`'s VAE (and scaling factor); with
        `fine_tune`, also start the UNet and text encoder (and their EMA) from it."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        # A pipeline directory, or (as --vae-from always took) its vae/ folder.
        vae_dir = pipeline_dir / "vae" if (pipeline_dir / "vae").is_dir() else pipeline_dir
        # Checked up front so a wrong path is named, not met as a loader traceback.
        parts = [vae_dir] + ([pipeline_dir / "unet", pipeline_dir / "text_encoder"] if fine_tune else [])
        missing = [str(d) for d in parts if not (d / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{pipeline_dir} is not a trained pipeline directory: no config.json in {', '.join(missing)}")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).float()
        self.vae.load_state_dict(vae.state_dict())
        self.vae.eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_source = f"{pipeline_dir} (VAE phase skipped)"
        if fine_tune:
            unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet", local_files_only=True).float()
            te = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder", local_files_only=True).float()
            self.unet.load_state_dict(unet.state_dict())
            self.text_encoder.load_state_dict(te.state_dict())
            self.ema_unet = [p.detach().clone() for p in self.unet.parameters()]
            self.ema_te = [p.detach().clone() for p in self.text_encoder.parameters()]
            self.init_source = f"{pipeline_dir} (fine-tuned)"
            # The exported model then says how its starting point was made too.
            log = pipeline_dir / "train_log.json"
            self.init_train_log = json.loads(log.read_text()) if log.exists() else None
        self.phase, self.step = "unet", 0

    def _gen(self, stream: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.r.seed * 1_000_003 + self.step * 4 + stream)

    # -- phase 1
    def vae_step(self) -> float:
        scenes, _ = data.sample_batch(self.r.seed, self.step, self.r.vae_batch, split="train", stream=0)
        x = data.render(scenes, self.r.res, self.device)
        post = self.vae.encode(x).latent_dist
        z = post.sample(generator=self._gen(0))
        recon = self.vae.decode(z).sample
        kl = post.kl().mean()
        # L1 keeps edges crisp; MSE keeps colours exact.
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + self.r.kl_weight * kl
        if self.r.vae_rgb_weight:
            rgb = F.mse_loss(self.rgb_head(post.mean), F.avg_pool2d(x, x.shape[-1] // z.shape[-1]))
            loss = loss + self.r.vae_rgb_weight * rgb
        for g in self.vae_opt.param_groups:
            g["lr"] = self.r.vae_lr * _lr_factor(self.step, self.r.vae_steps, 100)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def fit_scaling_factor(self) -> float:
        """SD's convention: scale latents to unit variance for the UNet."""
        zs = []
        for i in range(4):
            scenes, _ = data.sample_batch(self.r.seed, 10_000_000 + i, 64, split="train", stream=2)
            zs.append(self.vae.encode(data.render(scenes, self.r.res, self.device)).latent_dist.mode())
        return float(1.0 / torch.cat(zs).float().std())

    # -- phase 2
    def unet_step(self) -> float:
        scenes, captions = data.sample_batch(self.r.seed, self.step, self.r.batch, split="train", stream=1)
        x = data.render(scenes, self.r.res, self.device)
        g = self._gen(1)
        with torch.no_grad():
            lat = self.vae.encode(x).latent_dist.mode() * self.scaling_factor
        B = lat.shape[0]
        noise = torch.randn(lat.shape, generator=g, device=self.device)
        noise = noise + self.r.noise_offset * torch.randn((B, lat.shape[1], 1, 1), generator=g, device=self.device)
        for size in self.r.pyramid_scales:
            coarse = torch.randn((B, lat.shape[1], size, size), generator=g, device=self.device)
            noise = noise + self.r.pyramid_weight * F.interpolate(coarse, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        if self.r.pyramid_scales:
            # Back to about unit variance, which the samplers assume.
            noise = noise / math.sqrt(1 + len(self.r.pyramid_scales) * self.r.pyramid_weight**2)
        t = torch.randint(0, 1000, (B,), generator=g, device=self.device)
        noisy = self.scheduler.add_noise(lat, noise, t)
        emb = encode_text(self.tokenizer, self.text_encoder, captions, self.device)
        pred = self.unet(noisy, t, emb).sample
        ac = self.alphas_cumprod[t]
        snr = ac / (1 - ac)
        if self.r.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(lat, noise, t)
            w = (snr + 1).clamp(max=self.r.min_snr_gamma) / (snr + 1)
        else:
            target = noise
            w = snr.clamp(max=self.r.min_snr_gamma) / snr
        loss = (w * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        for grp in self.opt.param_groups:
            grp["lr"] = self.r.lr * _lr_factor(self.step, self.r.lr_schedule_steps, self.r.warmup)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text_encoder.parameters()), 1.0)
        self.opt.step()
        decay = min(self.r.ema, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_unet, [p.detach() for p in self.unet.parameters()], 1 - decay)
            torch._foreach_lerp_(self.ema_te, [p.detach() for p in self.text_encoder.parameters()], 1 - decay)
        return float(loss.detach())

    def run(self, max_minutes: float | None) -> bool:
        """→ True when both phases are done; False when stopped by max_minutes
        (a checkpoint is written first, so --resume picks it up)."""
        t0 = time.monotonic() - self.elapsed
        for phase, total, fn in (("vae", self.r.vae_steps, self.vae_step), ("unet", self.r.unet_steps, self.unet_step)):
            if self.phase != phase:
                continue
            self.vae.train(phase == "vae")
            bar = tqdm(total=total, initial=self.step, desc=phase, dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
            smooth = None
            while self.step < total:
                loss = fn()
                smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
                if self.step % 50 == 0 or self.step == total:
                    self.elapsed = time.monotonic() - t0
                    self.log.append({"phase": phase, "step": self.step, "loss": round(smooth, 5), "elapsed_s": round(self.elapsed, 1)})
                if self.step % self.r.ckpt_every == 0 or self.step == total:
                    self.elapsed = time.monotonic() - t0
                    self.save_checkpoint()
                    if max_minutes is not None and self.elapsed > 60 * max_minutes and not (phase == "unet" and self.step == total):
                        bar.close()
                        return False
            bar.close()
            if phase == "vae":
                self.vae.eval()
                self.scaling_factor = self.fit_scaling_factor()
                self.phase, self.step = "unet", 0
                self.save_checkpoint()
        self.elapsed = time.monotonic() - t0
        return True

    # -- export
    @torch.no_grad()
    def fit_latent_rgb(self, vae: Any) -> dict[str, list]:
        """Least squares from scaled latents (as the sampler holds them) to the
        decoded image averaged down to latent resolution, with a bias."""
        zs, rgbs = [], []
        for i in range(4):
            scenes, _ = data.sample_batch(self.r.seed, 20_000_000 + i, 64, split="all", stream=3)
            z = vae.encode(data.render(scenes, self.r.res, self.device)).latent_dist.mode()
            img = vae.decode(z).sample.clamp(-1, 1)
            zs.append(z * vae.config.scaling_factor)
            rgbs.append(F.avg_pool2d(img, img.shape[-1] // z.shape[-1]))
        z = torch.cat(zs).float().permute(0, 2, 3, 1).reshape(-1, zs[0].shape[1]).cpu()
        rgb = torch.cat(rgbs).float().permute(0, 2, 3, 1).reshape(-1, 3).cpu()
        A = torch.cat([z, torch.ones(len(z), 1)], 1)
        sol = torch.linalg.lstsq(A, rgb).solution
        resid = float(((A @ sol - rgb) ** 2).mean().sqrt())
        return {"factors": sol[:-1].tolist(), "bias": sol[-1].tolist(), "rmse": round(resid, 4)}

    def export(self, out: Path) -> None:
        unet = build_unet(self.r.res)
        unet.load_state_dict(_with_ema(self.unet, self.ema_unet))
        te = build_text_encoder(self.tokenizer)
        te.load_state_dict(_with_ema(self.text_encoder, self.ema_te))
        vae = build_vae(self.r.res)
        vae.load_state_dict({k: v.cpu() for k, v in self.vae.state_dict().items()})
        vae.register_to_config(scaling_factor=self.scaling_factor)
        pipe = assemble_pipeline(unet, vae, te, self.tokenizer, self.scheduler)
        # Shipped in fp16: round now so the preview fit sees the shipped weights.
        pipe.to(dtype=torch.float16)
        pipe.to(dtype=torch.float32)
        vae.to(self.device).eval()
        latent_rgb = self.fit_latent_rgb(vae)
        vae.cpu()
        pipe.to(dtype=torch.float16)
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        (out / "latent_rgb.json").write_text(json.dumps(latent_rgb, indent=1) + "\n")
        (out / "train_log.json").write_text(
            json.dumps(
                {
                    "recipe": asdict(self.r),
                    "device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                    "train_seconds": round(self.elapsed, 1),
                    "stopped_at": {"phase": self.phase, "step": self.step},
                    "scaling_factor": self.scaling_factor,
                    "vae_source": self.vae_source,
                    "init_source": self.init_source,
                    "init_train_log": self.init_train_log,
                    "torch": torch.__version__,
                    "log": self.log,
                },
                indent=0,
            )
            + "\n"
        )


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set zero_terminal_snr=true` → {"zero_terminal_snr": True}, typed by the Recipe field's default."""
    defaults = asdict(Recipe())
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(defaults)}")
        kind = type(defaults[key])
        try:
            if kind is bool:
                out[key] = {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
            elif kind is tuple:
                out[key] = tuple(int(v) for v in raw.split(",") if v)
            else:
                out[key] = kind(raw)
        except (KeyError, ValueError):
            raise SystemExit(f"--set {item!r}: {raw!r} is not a {kind.__name__}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="base", help="the stage to run (default: base)")
    p.add_argument("--out", type=Path, default=Path("models/bailan-shapes"))
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda")
    p.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints/bailan-shapes"))
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/last.pt if present")
    p.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop (exit 3) after this long")
    p.add_argument(
        "--vae-from", type=Path, help="skip the VAE phase: use this pipeline directory's trained VAE and its scaling factor"
    )
    p.add_argument(
        "--init-from", type=Path, help="fine-tune: start from this pipeline directory's VAE, UNet and text encoder (implies --vae-from)"
    )
    p.add_argument("--export-only", action="store_true", help="export --ckpt-dir/last.pt as it is (EMA weights), even if unfinished")
    # Overrides for smoke tests only: the defaults are the named recipe's.
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--unet-steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any other Recipe field, for experiments")
    a = p.parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in {"vae_steps": a.vae_steps, "unet_steps": a.unet_steps, "batch": a.batch, "ckpt_every": a.ckpt_every}.items() if v is not None}
    overrides.update(_parse_sets(a.set))
    try:
        recipe = replace(RECIPES[a.recipe], **overrides)
    except ValueError as exc:
        raise SystemExit(f"recipe: {exc}") from None
    ckpt = a.ckpt_dir / "last.pt"
    if a.recipe in FINE_TUNES and not (a.init_from or a.export_only) and not (a.resume and ckpt.exists()):
        raise SystemExit(f"--recipe {a.recipe} fine-tunes the {FINE_TUNES[a.recipe]!r} stage: name its exported pipeline with --init-from")
    device = pick_device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trainer = Trainer(recipe, device, a.ckpt_dir)
    start = a.init_from or a.vae_from
    if start and not (a.resume and ckpt.exists()):
        try:
            trainer.start_from(start, fine_tune=a.init_from is not None)
        except FileNotFoundError as exc:
            raise SystemExit(f"{'--init-from' if a.init_from else '--vae-from'}: {exc}") from None
        print(f"VAE phase skipped; VAE from {start}" + (", UNet and text encoder too (fine-tuning)" if a.init_from else ""), file=sys.stderr)
    if a.resume and ckpt.exists():
        trainer.load_checkpoint(ckpt)
        print(f"resumed from {ckpt}: phase {trainer.phase}, step {trainer.step}", file=sys.stderr)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"device {device}; params: vae {n(trainer.vae)/1e6:.2f}M, text encoder {n(trainer.text_encoder)/1e6:.2f}M, unet {n(trainer.unet)/1e6:.2f}M", file=sys.stderr)
    if a.export_only:
        trainer.load_checkpoint(ckpt)
        if trainer.phase == "vae":
            raise SystemExit("the checkpoint has no UNet training yet")
        print(f"exporting an unfinished run at phase {trainer.phase} step {trainer.step}", file=sys.stderr)
    elif not trainer.run(a.max_minutes):
        print(f"stopped after {a.max_minutes} min at phase {trainer.phase} step {trainer.step}; rerun with --resume", file=sys.stderr)
        return 3
    trainer.export(a.out)
    print(f"saved {a.out} (train time {trainer.elapsed:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
