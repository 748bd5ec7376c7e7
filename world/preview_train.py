"""Trains a model's preview decoder: latents -> RGB, imitating its VAE decoder.

    python -m world.preview_train --model models/bailan-shapes [--steps 3000] [--device auto]

The worker shows a preview of the picture at a step by mapping the model's
clean-picture estimate x0 to RGB without the VAE (worker/previews.py). A
linear map is what most services use; the built-in model's VAE is not linear
in colour (the fitted map's error is 0.42 on a [-1, 1] scale), so previews
came out in the wrong colours. This trains a tiny convolutional decoder on
the latents previews actually show: the x0 estimates of real sampling runs at
every step (DPM-Solver++ 2M, 25 steps, guidance 1, 3 and 7.5, captions from
the training distribution) and clean latents of rendered scenes; the teacher
is the model's own VAE decoding those same latents, so a preview is a cheap
stand-in for a full decode. It writes `preview_decoder/` into the model
directory (config and safetensors), which the worker loads when present.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from world import data
from worker.engine import Engine, GenerationJob
from worker.loader import LoadedModel, load_model
from worker.previews import PreviewDecoder

GUIDANCES = (1.0, 3.0, 7.5)


def sampled_x0(model: LoadedModel, jobs: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """The engine's x0 estimate of every sample after every step of `jobs` real jobs."""
    engine = Engine(model, batch)
    captured: list[torch.Tensor] = []
    step = engine.runner.step

    def recording_step(plan: object) -> None:
        step(plan)  # type: ignore[arg-type]
        pool = engine.runner.pools[plan.size]  # type: ignore[attr-defined]
        captured.append(pool.x0.index_select(0, torch.from_numpy(plan.slots).to(model.device)).cpu())  # type: ignore[attr-defined]

    engine.runner.step = recording_step  # type: ignore[method-assign]
    for b in range(jobs // batch):
        _, captions = data.sample_batch(seed, b, batch)
        for i, caption in enumerate(captions):
            n = b * batch + i
            engine.submit(GenerationJob(id=f"x0-{n}", prompt=caption, width=model.native_width,
                                        height=model.native_height, steps=steps,
                                        guidance_scale=GUIDANCES[n % len(GUIDANCES)], seed=seed * 100_000 + n))
        engine.run_until_idle()
    return torch.cat(captured)


@torch.no_grad()
def clean_latents(model: LoadedModel, count: int, seed: int, batch: int = 256) -> torch.Tensor:
    vae = model.vae
    out = []
    for b in range(math.ceil(count / batch)):
        scenes, _ = data.sample_batch(seed + 1, b, batch)
        images = data.render(scenes, model.native_width, model.device)
        out.append((vae.encode(images).latent_dist.mode() * vae.config.scaling_factor).cpu())
    return torch.cat(out)[:count]


@torch.no_grad()
def teacher(model: LoadedModel, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The VAE's own decode of each latent (what a full-decode preview would show)."""
    vae = model.vae
    out = [vae.decode(latents[i : i + batch].to(model.device) / vae.config.scaling_factor).sample.clamp(-1, 1).cpu()
           for i in range(0, len(latents), batch)]
    return torch.cat(out)


def train(latents: torch.Tensor, targets: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
          upscale: int) -> tuple[PreviewDecoder, dict[str, float]]:
    """Fit the decoder; 1/16 of the pairs are held out for the reported error."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(latents), generator=gen)
    held = order[: len(order) // 16]
    fit = order[len(order) // 16 :]
    decoder = PreviewDecoder(latents.shape[1], upscale=upscale)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        idx = fit[torch.randint(len(fit), (batch,), generator=gen)]
        loss = F.l1_loss(decoder(latents[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"  step {step:5d}  L1 {float(loss.detach()):.4f}", flush=True)
    decoder.eval()
    with torch.no_grad():
        held_l1 = float(F.l1_loss(decoder(latents[held]), targets[held]))
    return decoder, {"held_out_l1": round(held_l1, 4), "pairs": len(latents)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/bailan-shapes"))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=256, help="sampling runs whose x0 estimates are training data")
    p.add_argument("--clean", type=int, default=4096, help="clean latents of rendered scenes")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.model / "model_index.json").is_file():
        raise SystemExit(f"--model {args.model}: no model_index.json there")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = load_model(args.model, device, torch.float32)
    print(f"collecting x0 estimates of {args.jobs} sampling runs on {device}", flush=True)
    latents = torch.cat([sampled_x0(model, args.jobs, 16, 25, args.seed), clean_latents(model, args.clean, args.seed)])
    print(f"{len(latents)} latents; decoding them with the VAE", flush=True)
    targets = teacher(model, latents)
    scale = model.vae_scale_factor
    decoder, figures = train(latents, targets, args.steps, args.batch, args.lr, args.seed, scale)
    out = decoder.save(args.model)
    figures["train_s"] = round(time.perf_counter() - started, 1)
    figures.update({"steps": args.steps, "jobs": args.jobs, "clean": args.clean, "device": str(device)})
    (out / "train_log.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {out}: {figures}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
