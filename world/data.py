"""Procedural, seeded, captioned shapes: the built-in model's whole world.

Scenes are sampled from a `random.Random` seeded by (seed, batch index), so a
batch depends only on its index: resuming a run reproduces the exact data the
uninterrupted run would have seen, and no dataset is stored anywhere.

Images are rendered from signed distance functions with torch on whatever
device trains, so data generation never starves a GPU and costs little on CPU.
Some colour×shape and shape×position pairs never appear in training; the
benchmark asks for them to measure whether the model composes words it never
saw together.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

RES = 64

SHAPES = ("circle", "square", "triangle", "star", "cross")
# RGB, 0–255; chosen so every pair stays far apart for a nearest-palette classifier.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
BACKGROUNDS = COLOURS
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
CORNERS = POSITIONS[:4]

# Fractions of the image side; large shapes in a corner still leave a margin so
# the border always shows the background (the classifier reads it there).
ANCHORS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
RADIUS: dict[str, float] = {"small": 0.11, "large": 0.2}
JITTER_POS = 0.02
JITTER_SIZE = 0.06

# 5 of 40 colour×shape pairs (12.5 %) and 3 of 25 shape×position pairs (12 %);
# each colour, shape and position still appears in training with other partners.
HELDOUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset(
    {("red", "star"), ("orange", "circle"), ("yellow", "square"), ("green", "cross"), ("blue", "triangle")}
)
HELDOUT_SHAPE_POSITION: frozenset[tuple[str, str]] = frozenset(
    {("circle", "top right"), ("square", "bottom left"), ("triangle", "center")}
)

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left", "top-left"),
    "top right": ("top right", "upper right", "top-right"),
    "bottom left": ("bottom left", "lower left", "bottom-left"),
    "bottom right": ("bottom right", "lower right", "bottom-right"),
    "center": ("center", "middle", "centre"),
}

CAPTION_DROPOUT = 0.1
P_TWO_SHAPES = 0.2
# Partial captions teach the model that an unnamed attribute is free to vary.
P_OMIT_SIZE = 0.1
P_OMIT_POSITION = 0.1
P_OMIT_BACKGROUND = 0.05


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    # Per-shape (dx, dy, radius scale); part of the scene so rendering is pure.
    jitter: tuple[tuple[float, float, float], ...] = ()


def is_heldout(s: Shape) -> bool:
    return (s.colour, s.shape) in HELDOUT_COLOUR_SHAPE or (s.shape, s.position) in HELDOUT_SHAPE_POSITION


def _sample_shape(rng: random.Random, position: str, background: str, split: str) -> Shape:
    # Rejection keeps the marginals of the allowed pairs uniform.
    while True:
        s = Shape(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), position)
        if s.colour == background:
            continue
        if split == "train" and is_heldout(s):
            continue
        if split == "heldout" and not is_heldout(s):
            continue
        return s


def sample_scene(rng: random.Random, split: str = "train", two_shapes: bool | None = None) -> Scene:
    """split: "train" never yields a held-out pair; "heldout" yields only
    single-shape scenes whose shape is a held-out pair; "all" is unrestricted."""
    background = rng.choice(BACKGROUNDS)
    if two_shapes is None:
        two_shapes = split != "heldout" and rng.random() < P_TWO_SHAPES
    if two_shapes:
        # Two distinct corners: shapes never overlap, even when both are large.
        positions = rng.sample(CORNERS, 2)
    else:
        positions = [rng.choice(POSITIONS)]
    shapes = tuple(_sample_shape(rng, p, background, split) for p in positions)
    jitter = tuple(
        (rng.uniform(-JITTER_POS, JITTER_POS), rng.uniform(-JITTER_POS, JITTER_POS), rng.uniform(1 - JITTER_SIZE, 1 + JITTER_SIZE))
        for _ in shapes
    )
    return Scene(background, shapes, jitter)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(rng: random.Random, s: Shape, with_size: bool) -> str:
    words = [rng.choice(SIZE_WORDS[s.size])] if with_size else []
    words += [s.colour, rng.choice(SHAPE_WORDS[s.shape])]
    return " ".join(words)


def _position_phrase(rng: random.Random, position: str) -> str:
    word = rng.choice(POSITION_WORDS[position])
    corner = " corner" if position != "center" and rng.random() < 0.3 else ""
    return rng.choice(("in the ", "at the ", "")) + word + corner


def _background_phrase(rng: random.Random, bg: str) -> str:
    return rng.choice(
        (f"on a {bg} background", f"on {bg}", f"against a {bg} backdrop", f"with a {bg} background", f"{bg} background")
    ).replace("a orange", "an orange")


def caption(rng: random.Random, scene: Scene) -> str:
    """Varied templates and paraphrases; every word is in `vocabulary()`."""
    omit_size = rng.random() < P_OMIT_SIZE
    omit_pos = rng.random() < P_OMIT_POSITION and len(scene.shapes) == 1
    omit_bg = rng.random() < P_OMIT_BACKGROUND
    objs = []
    for s in scene.shapes:
        obj = _object_phrase(rng, s, not omit_size)
        pos = "" if omit_pos else _position_phrase(rng, s.position)
        objs.append((obj, pos))
    bg = scene.background
    if len(objs) == 2:
        (o1, p1), (o2, p2) = objs
        t = rng.randrange(3)
        if t == 0:
            text = f"{_article(o1)} {o1} {p1} and {_article(o2)} {o2} {p2}" + ("" if omit_bg else f" {_background_phrase(rng, bg)}")
        elif t == 1:
            text = ("" if omit_bg else f"{_article(bg)} {bg} background with ") + f"{_article(o1)} {o1} {p1} and {_article(o2)} {o2} {p2}"
        else:
            text = f"{o1}, {p1}; {o2}, {p2}" + ("" if omit_bg else f"; {bg} backdrop")
        return " ".join(text.split())
    (o, p), = objs
    t = rng.randrange(7)
    if t == 0:
        text = f"{_article(o)} {o} {p}" + ("" if omit_bg else f" {_background_phrase(rng, bg)}")
    elif t == 1:
        text = f"{o}, " + ("" if omit_bg else f"{bg} {rng.choice(('backdrop', 'background'))}, ") + p
    elif t == 2:
        text = ("" if omit_bg else f"{_article(bg)} {bg} background with ") + f"{_article(o)} {o} {p}"
    elif t == 3:
        text = f"{o} {p}" + ("" if omit_bg else f", {bg} background")
    elif t == 4:
        text = (f"{p}: " if p else "") + f"{o}" + ("" if omit_bg else f" on {bg}")
    elif t == 5:
        text = f"a picture of {_article(o)} {o} {p}" + ("" if omit_bg else f" against {_article(bg)} {bg} backdrop")
    else:
        text = f"{o} {p}" + ("" if omit_bg else f" {bg} background")
    return " ".join(text.replace(" ,", ",").split()).strip(" ,:")


def canonical_prompt(s: Shape, background: str) -> str:
    """The plain template the benchmark's main prompts use."""
    o = f"{s.size} {s.colour} {s.shape}"
    return f"{_article(o)} {o} in the {s.position} on {_article(background)} {background} background"


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (token ids depend on it)."""
    words: list[str] = []
    chunks = [
        "a an the of in at on with and against picture corner background backdrop",
        " ".join(COLOURS),
        " ".join(w for ws in SHAPE_WORDS.values() for w in ws),
        " ".join(w for ws in SIZE_WORDS.values() for w in ws),
        " ".join(w.replace("-", " ") for ws in POSITION_WORDS.values() for w in ws),
    ]
    for chunk in chunks:
        for w in chunk.split():
            if w not in words:
                words.append(w)
    return words


def batch_rng(seed: int, index: int, stream: int = 0) -> random.Random:
    """Independent of how many batches came before, so resume is exact."""
    return random.Random((seed * 1_000_003 + index) * 7 + stream)


def sample_batch(seed: int, index: int, batch: int, split: str = "train", stream: int = 0) -> tuple[list[Scene], list[str]]:
    rng = batch_rng(seed, index, stream)
    scenes = [sample_scene(rng, split) for _ in range(batch)]
    captions = ["" if rng.random() < CAPTION_DROPOUT else caption(rng, sc) for sc in scenes]
    return scenes, captions


# ---------------------------------------------------------------- rendering

def _sdf(kind: str, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside); x, y relative to the anchor,
    y down. Shapes are placed so that their bounding box is centred on it."""
    if kind == "circle":
        return torch.sqrt(x * x + y * y) - r
    if kind == "square":
        return torch.maximum(x.abs(), y.abs()) - 0.86 * r
    if kind == "triangle":
        R = 1.2 * r
        yl = y - 0.25 * R  # bbox spans [-R, R/2] around the centroid: recentre it
        c, s = math.sqrt(3) / 2, 0.5
        return torch.maximum(torch.maximum(yl - R / 2, c * x - s * yl - R / 2), -c * x - s * yl - R / 2)
    if kind == "star":
        Ro = 1.15 * r
        Ri = 0.45 * Ro
        yl = y - 0.5 * (1 - math.cos(math.radians(36))) * Ro
        theta = torch.atan2(x, -yl)  # 0 at the top tip
        step = 2 * math.pi / 5
        beta = torch.remainder(theta + step / 2, step) - step / 2
        beta = beta.abs()
        dx = Ri * math.cos(step / 2) - Ro
        dy = Ri * math.sin(step / 2)
        rho = Ro * dy / (torch.cos(beta) * dy - torch.sin(beta) * dx)
        return (torch.sqrt(x * x + yl * yl) - rho) * 0.6
    if kind == "cross":
        w = 0.36 * r
        a = torch.maximum(x.abs() - r, y.abs() - w)
        b = torch.maximum(x.abs() - w, y.abs() - r)
        return torch.minimum(a, b)
    raise ValueError(kind)


def shape_alpha(kind: str, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, res: int, device: torch.device | str) -> torch.Tensor:
    """(B,) centres/radii in pixels → (B, res, res) antialiased coverage."""
    coords = torch.arange(res, device=device, dtype=torch.float32) + 0.5
    x = coords.view(1, 1, res) - cx.view(-1, 1, 1)
    y = coords.view(1, res, 1) - cy.view(-1, 1, 1)
    return (0.5 - _sdf(kind, x, y, r.view(-1, 1, 1))).clamp(0, 1)


def render(scenes: list[Scene], res: int = RES, device: torch.device | str = "cpu") -> torch.Tensor:
    """→ (B, 3, res, res) float in [-1, 1], the VAE's input range."""
    B = len(scenes)
    pal = {k: torch.tensor(v, dtype=torch.float32) / 127.5 - 1 for k, v in PALETTE.items()}
    bg = torch.stack([pal[s.background] for s in scenes]).to(device)
    img = bg.view(B, 3, 1, 1).expand(B, 3, res, res).clone()
    max_shapes = max(len(s.shapes) for s in scenes)
    for slot in range(max_shapes):
        for kind in SHAPES:
            idx = [i for i, s in enumerate(scenes) if len(s.shapes) > slot and s.shapes[slot].shape == kind]
            if not idx:
                continue
            cx, cy, rr, col = [], [], [], []
            for i in idx:
                sh = scenes[i].shapes[slot]
                jx, jy, js = scenes[i].jitter[slot] if scenes[i].jitter else (0.0, 0.0, 1.0)
                ax, ay = ANCHORS[sh.position]
                cx.append((ax + jx) * res)
                cy.append((ay + jy) * res)
                rr.append(RADIUS[sh.size] * js * res)
                col.append(pal[sh.colour])
            t = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
            a = shape_alpha(kind, t(cx), t(cy), t(rr), res, device).unsqueeze(1)
            colour = torch.stack(col).to(device).view(-1, 3, 1, 1)
            ii = torch.tensor(idx, device=device)
            img[ii] = img[ii] * (1 - a) + colour * a
    return img
