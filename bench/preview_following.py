"""Do previews show the picture emerging? Measured with the project's own judge.

    python bench/preview_following.py [--model models/bailan-shapes] [--k 2] [--json out.json]

For the prompt benchmark's suite (seen, held-out and paraphrased prompts; see
world/evaluate.py) it runs the engine with a preview after every step at the
service's defaults (25 steps, DPM-Solver++ 2M, the model's default guidance unless
--guidance says otherwise) and reads every
preview back with the same pixel judge as bench/prompt_following.py. It prints
the fraction of previews whose background colour and shape colour read right,
step by step, for what a preview shows:

  x0, preview decoder   the model's clean-picture estimate through the model's
                        trained preview decoder (the default when the model has one);
  x0, linear map        the same estimate through the linear latent->RGB map;
  xt, linear map        the sampler's noisy state through the linear map (the old default).

Targets at 40 % of the steps: background >= 90 %, shape colour >= 80 %.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from world.evaluate import prompt_suite, read_attributes
from bailan.jobs import JobRequest
from worker.engine import Engine, GenerationJob
from worker.loader import LoadedModel, load_model

STEPS = 25
TARGETS = {"background": 0.90, "colour": 0.80}
CHECK_AT = 0.4


def run(model: LoadedModel, suite: list[tuple[str, str, dict[str, str]]], k: int, kind: str, batch: int,
        guidance: float) -> dict:
    """Per set, per step: fractions of previews whose background and shape colour read right."""
    hits: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    engine = Engine(model, batch)
    work = [(group, prompt, expected, seed) for group, prompt, expected in suite for seed in range(1000, 1000 + k)]
    side = model.native_width
    for start in range(0, len(work), batch):
        chunk = work[start : start + batch]
        frames: dict[int, dict[int, np.ndarray]] = {}

        def keep(i: int) -> Any:
            return lambda job, step, rgb: frames.setdefault(i, {}).__setitem__(step, rgb)

        for i, (_, prompt, _, seed) in enumerate(chunk):
            engine.submit(GenerationJob(id=f"p{start + i}", prompt=prompt, width=side, height=side, steps=STEPS,
                                        guidance_scale=guidance, seed=seed, preview_every=1, preview_kind=kind,
                                        on_preview=keep(i)))
        engine.run_until_idle()
        for i, (group, _, expected, _) in enumerate(chunk):
            table = hits.setdefault(group, np.zeros((STEPS - 1, 2)))
            counts[group] = counts.get(group, 0) + 1
            for step, rgb in frames.get(i, {}).items():
                if rgb.shape[0] != side:  # latent-resolution previews, read at image size
                    rgb = np.asarray(Image.fromarray(rgb).resize((side, side), Image.NEAREST))
                reading = read_attributes(rgb)
                table[step - 1, 0] += reading.background == expected["background"]
                table[step - 1, 1] += reading.colour == expected["colour"]
    return {group: (hits[group] / counts[group]).round(3).tolist() for group in hits}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/bailan-shapes"))
    p.add_argument("--k", type=int, default=2, help="seeds per prompt")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--guidance", type=float, help="default: the model's own default (bailan_defaults.json), else 7.5")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    started = time.perf_counter()
    model = load_model(args.model, torch.device("cpu"), torch.float32)
    decoder = model.preview_decoder
    guidance = next(g for g in (args.guidance, model.defaults.guidance_scale,
                                JobRequest.model_fields["guidance_scale"].default) if g is not None)
    suite = prompt_suite()
    variants = [("x0, preview decoder", "x0", decoder)] if decoder is not None else []
    variants += [("x0, linear map", "x0", None), ("xt, linear map", "xt", None)]
    check = round(CHECK_AT * STEPS)
    results: dict[str, Any] = {"model": str(args.model), "steps": STEPS, "guidance": guidance, "k": args.k,
                               "check_step": check,
                               "targets": TARGETS, "variants": {}}
    for name, kind, dec in variants:
        model.preview_decoder = dec
        curves = run(model, suite, args.k, kind, args.batch, guidance)
        results["variants"][name] = curves
        print(f"\n{name}, guidance {guidance}: fraction right at step {check} of {STEPS} (background / shape colour)")
        met = True
        for group, curve in curves.items():
            bg, colour = curve[check - 1]
            met &= bg >= TARGETS["background"] and colour >= TARGETS["colour"]
            print(f"  {group:<11} {bg:6.0%} / {colour:6.0%}")
        results["variants"][name + " (targets met)"] = met
        print("  targets " + ("met" if met else "missed"))
    model.preview_decoder = decoder
    print("\ncurves, all sets together (step: background / shape colour):")
    for name in [v[0] for v in variants]:
        curves = results["variants"][name]
        sizes = {g: sum(1 for s in suite if s[0] == g) for g in curves}
        total = sum(sizes.values())
        merged = np.sum([np.array(c) * sizes[g] for g, c in curves.items()], axis=0) / total
        line = "  ".join(f"{s + 1}:{bg:.0%}/{c:.0%}" for s, (bg, c) in enumerate(merged) if (s + 1) % 4 == 0 or s + 1 == check)
        print(f"  {name:<20} {line}")
    results["total_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
