"""Makes the README's pictures of the built-in model.

    python -m world.figures --model models/bailan-shapes --out docs/img

- builtin_grid.png: a few prompts (rows) × seeds (columns), service defaults;
- builtin_previews.png: one job's previews as the worker makes them, step by
  step (x0 through the preview decoder, and x_t), then the final image, at the
  model's default guidance.
"""

from __future__ import annotations

import argparse
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


def preview_strip(model_dir: Path, out: Path, prompt: str = GRID_PROMPTS[0], seed: int = 0) -> None:
    """One job's previews as the worker makes them, step by step, then the final image: the
    top row shows x0 (the default: the model's estimate of the finished picture, through
    the model's preview decoder), the bottom row x_t (the sampler's noisy state)."""
    from bailan.jobs import JobRequest
    from worker.engine import Engine, GenerationJob
    from worker.loader import load_model

    model = load_model(model_dir, torch.device("cpu"), torch.float32)
    # What a job that names none gets: the model's default, else the request's.
    guidance = model.defaults.guidance_scale
    if guidance is None:
        guidance = JobRequest.model_fields["guidance_scale"].default
    keep = (1, 3, 5, 7, 10, 14, 19)
    rows: list[list[Image.Image]] = []
    for kind in ("x0", "xt"):
        frames: dict[int, Image.Image] = {}

        def on_preview(job: object, step: int, rgb: object) -> None:
            if step in keep:
                frames[step] = Image.fromarray(rgb).resize((CELL, CELL), Image.NEAREST)  # type: ignore[arg-type]

        engine = Engine(model, 1)
        job = GenerationJob(id=kind, prompt=prompt, width=model.native_width, height=model.native_height,
                            steps=STEPS, guidance_scale=guidance, seed=seed, preview_every=1, preview_kind=kind,
                            on_preview=on_preview)
        engine.submit(job)
        engine.run_until_idle()
        final = Image.fromarray(job.future.result(timeout=0)[0]).resize((CELL, CELL), Image.NEAREST)
        rows.append([frames[k] for k in keep] + [final])
    labels = [f"step {k}" for k in keep] + ["final"]
    strip = Image.new("RGB", (LABEL_W // 4 + CELL * len(labels), 16 + CELL * 2), "white")
    draw = ImageDraw.Draw(strip)
    for r, (row, name) in enumerate(zip(rows, ("x0 (default)", "xt"))):
        draw.text((4, 16 + r * CELL + CELL // 2 - 6), name, fill="black")
        for j, frame in enumerate(row):
            strip.paste(frame, (LABEL_W // 4 + j * CELL, 16 + r * CELL))
    for j, label in enumerate(labels):
        draw.text((LABEL_W // 4 + j * CELL + 4, 2), label, fill="black")
    strip.save(out, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/bailan-shapes"))
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(str(a.model))
    grid(pipe, a.out / "builtin_grid.png")
    preview_strip(a.model, a.out / "builtin_previews.png")
    print(f"wrote {a.out}/builtin_grid.png, {a.out}/builtin_previews.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
