"""Makes the README's pictures of the built-in model.

    python -m world.figures --model models/bailan-shapes --out docs/img

- builtin_grid.png: a few prompts (rows) × seeds (columns), service defaults;
- builtin_previews.png: one job's per-step latent→RGB previews (the shipped
  latent_rgb.json factors, as the worker shows them), then the decoded image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from world.stock import STEPS, load_pipeline

GRID_PROMPTS = (
    "a large red circle in the center on a blue background",
    "a small yellow star in the top left on a black background",
    "a large white triangle in the bottom right on a green background",
    "purple cross, orange backdrop, top-right",
    "a big blue box at the bottom left on a white background",
    "a large red star in the center on a yellow background",  # red×star is held out of training
)
SEEDS = (0, 1, 2, 3)
CELL = 128  # native 64 px, doubled with nearest-neighbour so pixels stay honest
LABEL_W = 420


def grid(pipe: object, out: Path) -> None:
    gens = [torch.Generator("cpu").manual_seed(s) for _ in GRID_PROMPTS for s in SEEDS]
    prompts = [p for p in GRID_PROMPTS for _ in SEEDS]
    with torch.no_grad():
        images = pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=7.5, generator=gens).images
    sheet = Image.new("RGB", (LABEL_W + CELL * len(SEEDS), CELL * len(GRID_PROMPTS)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, prompt in enumerate(GRID_PROMPTS):
        draw.text((6, i * CELL + CELL // 2 - 6), prompt, fill="black")
        for j in range(len(SEEDS)):
            sheet.paste(images[i * len(SEEDS) + j].resize((CELL, CELL), Image.NEAREST), (LABEL_W + j * CELL, i * CELL))
    sheet.save(out, optimize=True)


def preview_strip(pipe: object, model: Path, out: Path, prompt: str = GRID_PROMPTS[0], seed: int = 0) -> None:
    rgb = json.loads((model / "latent_rgb.json").read_text())
    factors = torch.tensor(rgb["factors"])
    bias = torch.tensor(rgb["bias"]).view(3, 1, 1)
    frames: list[Image.Image] = []
    keep = {1, 3, 5, 7, 10, 14, 19, STEPS}

    def on_step(_pipe: object, i: int, _t: object, kwargs: dict) -> dict:
        if i + 1 in keep:
            lat = kwargs["latents"][0].float()
            # The worker's preview: a linear map of the sampler's latents.
            img = (torch.einsum("chw,cr->rhw", lat, factors) + bias).clamp(-1, 1)
            arr = ((img + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            frames.append(Image.fromarray(arr).resize((CELL, CELL), Image.NEAREST))
        return kwargs

    with torch.no_grad():
        final = pipe(
            prompt=prompt, num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"],
        ).images[0]
    frames.append(final.resize((CELL, CELL), Image.NEAREST))
    labels = [f"step {k}" for k in sorted(keep)] + ["decoded"]
    strip = Image.new("RGB", (CELL * len(frames), CELL + 16), "white")
    draw = ImageDraw.Draw(strip)
    for j, (f, label) in enumerate(zip(frames, labels)):
        strip.paste(f, (j * CELL, 16))
        draw.text((j * CELL + 4, 2), label, fill="black")
    strip.save(out, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/bailan-shapes"))
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(str(a.model))
    grid(pipe, a.out / "builtin_grid.png")
    preview_strip(pipe, a.model, a.out / "builtin_previews.png")
    print(f"wrote {a.out}/builtin_grid.png, {a.out}/builtin_previews.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
