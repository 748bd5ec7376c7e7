"""Does the built-in model do what the prompt says? Measured, not eyeballed.

    python bench/prompt_following.py --model models/bailan-shapes [--k 4] [--json out.json]

For a fixed prompt suite — seen combinations, held-out combinations (colour×shape
and shape×position pairs that never appear in training) and paraphrases of seen
ones — it generates K images per prompt with different seeds at the service's
defaults (25 steps, DPM-Solver++ 2M) with guidance 7.5, 3.0 and 1.0
(none), reads every attribute back with the pixel/geometry classifier of
world/evaluate.py (no learned parts), and prints per-attribute accuracy
and the mean "colour error": the RGB distance (0–441) from the measured shape
colour to the palette colour asked for, which shows over-saturation that a
right-or-wrong colour reading hides. It also times one image at the defaults,
batch 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from world.evaluate import ATTRIBUTES, colour_error, prompt_suite, read_attributes, score
from world.stock import STEPS, generate, load_pipeline

# The service default, a little, and none (the unconditional branch unused).
GUIDANCES = (7.5, 3.0, 1.0)
TARGETS = {"seen": {"colour": 0.95, "background": 0.95, "shape": 0.85, "size": 0.85, "position": 0.85}, "held-out": dict.fromkeys(ATTRIBUTES, 0.80)}


def run(model: str, k: int, chunk: int = 16) -> dict[str, object]:
    pipe = load_pipeline(model)
    suite = prompt_suite()
    jobs = [(g, p, e, seed) for g, p, e in suite for seed in range(k)]
    results: dict[str, dict[str, list[bool]]] = {}
    for guidance in GUIDANCES:
        for i in range(0, len(jobs), chunk):
            part = jobs[i : i + chunk]
            images = generate(pipe, [p for _, p, _, _ in part], [1000 + s for *_, s in part], guidance)
            for (group, _, expected, _), img in zip(part, images):
                reading = read_attributes(img)
                row = results.setdefault(f"{group}@{guidance}", {})
                for attr, ok in score(reading, expected).items():
                    row.setdefault(attr, []).append(ok)
                err = colour_error(reading, expected["colour"])
                if err is not None:
                    row.setdefault("colour_error", []).append(err)
            print(f"guidance {guidance}: {min(i + chunk, len(jobs))}/{len(jobs)} images", file=sys.stderr, flush=True)
    # colour_error is a mean distance, the rest are fractions right.
    table = {key: {a: sum(v) / len(v) for a, v in attrs.items()} | {"n": len(attrs["colour"])} for key, attrs in results.items()}
    # Default settings, batch 1, after a warm-up: what one job costs on this machine.
    generate(pipe, ["a red circle"], [0], 7.5)
    t0 = time.perf_counter()
    for s in range(3):
        generate(pipe, [suite[s][1]], [s], 7.5)
    sec = (time.perf_counter() - t0) / 3
    return {
        "model": model,
        "k": k,
        "steps": STEPS,
        "scheduler": "dpmpp_2m",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "seconds_per_image": round(sec, 3),
        "prompts": [{"group": g, "prompt": p, "expected": e} for g, p, e in suite],
        "accuracy": table,
    }


def markdown(report: dict[str, object]) -> str:
    rows = [
        "| prompts | guidance | n | shape colour | background | shape | size | position | colour error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group in ("seen", "held-out", "paraphrase"):
        for g in GUIDANCES:
            row = report["accuracy"].get(f"{group}@{g}")
            if row:
                accuracy = " | ".join(f"{100 * row[a]:.0f} %" for a in ATTRIBUTES)
                rows.append(f"| {group} | {g} | {row['n']} | {accuracy} | {row.get('colour_error', float('nan')):.1f} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/bailan-shapes")
    ap.add_argument("--k", type=int, default=4, help="images (seeds) per prompt")
    ap.add_argument("--json", type=Path, help="also write the full report here")
    a = ap.parse_args()
    report = run(a.model, a.k)
    print(markdown(report))
    print(f"\none image, {STEPS} steps, guidance 7.5, batch 1: {report['seconds_per_image']} s ({report['machine']})")
    misses = []
    for group, targets in TARGETS.items():
        row = report["accuracy"][f"{group}@7.5"]
        misses += [f"{group} {attr} {100 * row[attr]:.0f} % < {100 * t:.0f} %" for attr, t in targets.items() if row[attr] < t]
    print("targets met" if not misses else "targets missed: " + "; ".join(misses))
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
