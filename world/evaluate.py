"""Reads the attributes of a single-shape image from its pixels alone.

The benchmark's judge must not share failure modes with the model, so it uses
no learned parts: the background is the border's median colour, the shape is
every pixel far from it, colours are the nearest palette entry, and shape and
size are the best intersection-over-union among rendered templates aligned on
the foreground's bounding box. Position is the nearest anchor to that box's
centre (the renderer centres every shape's bounding box on its anchor).

`prompt_suite` is what the prompt benchmark (bench/prompt_following.py) asks
the model: seen combinations, held-out pairs and paraphrases, each with the
attributes this judge must read back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from world import data
from world.data import ANCHORS, PALETTE, RADIUS, SHAPES, SIZES, shape_alpha

ATTRIBUTES = ("colour", "background", "shape", "size", "position")


@dataclass(frozen=True)
class Reading:
    colour: str | None
    background: str
    shape: str | None
    size: str | None
    position: str | None
    # The measured shape colour (median of the core pixels, RGB 0–255): how far
    # it lies from the palette entry says how faithful, not just how right, it is.
    colour_rgb: tuple[float, float, float] | None = None

    def get(self, attribute: str) -> str | None:
        return getattr(self, attribute)


_PAL_NAMES = list(PALETTE)
_PAL = torch.tensor([PALETTE[k] for k in _PAL_NAMES], dtype=torch.float32)


def _nearest_colour(rgb: torch.Tensor) -> str:
    return _PAL_NAMES[int(((_PAL - rgb) ** 2).sum(1).argmin())]


@lru_cache(maxsize=4)
def _templates(res: int) -> tuple[torch.Tensor, list[tuple[str, str]], torch.Tensor]:
    """Masks of every (shape, size) drawn at the canvas centre, plus each mask's
    bounding-box centre (in pixels) so it can be moved onto a detected box."""
    masks, labels, centres = [], [], []
    c = torch.tensor([res / 2])
    for shape in SHAPES:
        for size in SIZES:
            m = shape_alpha(shape, c, c, torch.tensor([RADIUS[size] * res]), res, "cpu")[0] > 0.5
            ys, xs = torch.nonzero(m, as_tuple=True)
            centres.append(torch.tensor([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2]))
            masks.append(m)
            labels.append((shape, size))
    return torch.stack(masks), labels, torch.stack(centres)


def to_rgb255(image: object) -> torch.Tensor:
    """PIL image, HxWx3 uint8 array, or 3xHxW tensor in [-1, 1] → HxWx3 float 0–255."""
    if isinstance(image, torch.Tensor):
        return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)[..., :3].copy())


def read_attributes(image: object) -> Reading:
    img = to_rgb255(image)
    res = img.shape[0]
    border = torch.cat([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = border.median(0).values
    background = _nearest_colour(bg_rgb)

    dist = ((img - bg_rgb) ** 2).sum(-1).sqrt()
    # Threshold relative to the strongest contrast present, so dark-on-black
    # and yellow-on-white are segmented alike; a floor rejects pure noise.
    peak = torch.quantile(dist.flatten(), 0.99)
    if peak < 40:
        return Reading(None, background, None, None, None)
    mask = dist > 0.5 * peak
    core = dist > 0.75 * peak
    colour_rgb = img[core].median(0).values
    colour = _nearest_colour(colour_rgb)

    ys, xs = torch.nonzero(mask, as_tuple=True)
    # Robust extent: a few stray pixels must not move the box.
    def span(v: torch.Tensor) -> tuple[float, float]:
        lo, hi = torch.quantile(v.float(), torch.tensor([0.005, 0.995]))
        return float(lo), float(hi) + 1

    x0, x1 = span(xs)
    y0, y1 = span(ys)
    centre = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2])
    anchors = {k: torch.tensor(v) * res for k, v in ANCHORS.items()}
    position = min(anchors, key=lambda k: float(((anchors[k] - centre) ** 2).sum()))

    masks, labels, tcentres = _templates(res)
    best, best_iou = labels[0], -1.0
    for m, label, tc in zip(masks, labels, tcentres):
        dx, dy = (centre - tc).round().int().tolist()
        moved = torch.roll(m, shifts=(dy, dx), dims=(0, 1))
        iou = float((moved & mask).sum()) / max(1.0, float((moved | mask).sum()))
        if iou > best_iou:
            best, best_iou = label, iou
    return Reading(colour, background, best[0], best[1], position, tuple(colour_rgb.tolist()))


def score(reading: Reading, expected: dict[str, str]) -> dict[str, bool]:
    return {a: reading.get(a) == expected[a] for a in ATTRIBUTES if a in expected}


def colour_error(reading: Reading, colour: str) -> float | None:
    """RGB distance (0–441) from the measured shape colour to `colour`'s palette entry."""
    if reading.colour_rgb is None:
        return None
    return float(np.linalg.norm(np.subtract(reading.colour_rgb, PALETTE[colour])))


# ---------------------------------------------------------------- what the benchmark asks


def _paraphrase(rng: random.Random, s: data.Shape, bg: str) -> str:
    """One of three sentence shapes with synonyms, so wording, not the canonical caption, is tested."""
    size = rng.choice(data.SIZE_WORDS[s.size])
    shape = rng.choice(data.SHAPE_WORDS[s.shape])
    pos = rng.choice(data.POSITION_WORDS[s.position])
    t = rng.randrange(3)
    if t == 0:
        return f"{size} {s.colour} {shape}, {bg} backdrop, {pos}"
    if t == 1:
        return f"{'an' if bg[0] in 'aeiou' else 'a'} {bg} background with a {size} {s.colour} {shape} at the {pos}"
    return f"{pos}: {size} {s.colour} {shape} on {bg}"


def prompt_suite(n_seen: int = 20, n_heldout: int = 16, n_para: int = 10) -> list[tuple[str, str, dict[str, str]]]:
    """→ [(group, prompt, expected attributes)], the same on every run."""
    rng = random.Random(2026)
    suite = []

    def add(group: str, scene: data.Scene, prompt: str) -> None:
        s = scene.shapes[0]
        expected = {"colour": s.colour, "background": scene.background, "shape": s.shape, "size": s.size, "position": s.position}
        suite.append((group, prompt, expected))

    for _ in range(n_seen):
        sc = data.sample_scene(rng, "train", two_shapes=False)
        add("seen", sc, data.canonical_prompt(sc.shapes[0], sc.background))
    # Every held-out pair at least twice, with other attributes drawn at random.
    pairs = sorted(data.HELDOUT_COLOUR_SHAPE) + sorted(data.HELDOUT_SHAPE_POSITION)
    for i in range(n_heldout):
        while True:
            sc = data.sample_scene(rng, "heldout", two_shapes=False)
            s = sc.shapes[0]
            want = pairs[i % len(pairs)]
            if want in ((s.colour, s.shape), (s.shape, s.position)):
                break
        add("held-out", sc, data.canonical_prompt(s, sc.background))
    for _ in range(n_para):
        sc = data.sample_scene(rng, "train", two_shapes=False)
        add("paraphrase", sc, _paraphrase(rng, sc.shapes[0], sc.background))
    return suite
