"""A procedurally rendered, captioned and rated LAION-style world, deterministic for a seed.

Every sample is a pure function of (seed, index): the server renders image `i` on request and the
metadata parquet is written from the same description, so the source scales to any size without
storing images. Each image gets a ground-truth aesthetic rating (1-10) from the degradations applied
to it, the way SAC/AVA ratings label real photos.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from ldm.config import SyntheticSource
from ldm.io.shards import ImageSet, decode_rgb

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 170, 60),
    "blue": (35, 70, 215),
    "yellow": (245, 215, 30),
    "purple": (135, 45, 175),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "light blue": (170, 205, 240),
    "beige": (225, 210, 175),
    "dark green": (30, 70, 40),
    "striped": (200, 200, 200),
    "checkered": (190, 190, 190),
    "gradient": (120, 120, 160),
}
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.34}  # object radius as a fraction of the short side
POSITIONS = {
    "in the centre": (0.5, 0.5),
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
}
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
ASPECTS = (1.0, 4 / 3, 3 / 2, 3 / 4)

SINGLE_TEMPLATES = (
    "a {size} {colour} {shape}",
    "a photo of a {colour} {shape} on a {bg} background",
    "{colour} {shape} {pos}",
    "an illustration of a {size} {colour} {shape} {pos}",
    "a {colour} {shape} on {bg}",
    "a simple drawing of a {colour} {shape}",
)
PAIR_TEMPLATES = (
    "a {c1} {s1} {rel} a {c2} {s2}",
    "a {c1} {s1} and a {c2} {s2}, the {s1} is {rel} the {s2}",
    "{c1} {s1} {rel} {c2} {s2} on a {bg} background",
    "a picture with a {c1} {s1} {rel} a {c2} {s2}",
)

# Ground-truth rating: a clean image scores about 9; each degradation's severity in [0, 1] costs
# up to its weight. The weights make all five visible at the ingest resolution.
BASE_RATING = 9.0
DEGRADATION_WEIGHTS = {"blur": 4.0, "noise": 3.5, "jpeg": 3.0, "low_contrast": 3.0, "bad_crop": 3.0}
DEGRADATION_PROB = 0.3
# Alt text sometimes says what a picture looks like ("blurry photo of ..."), and that is what lets a
# web-trained CLIP embed quality at all, so the aesthetic MLP on its embeddings can score it. Here a
# share of captions name their image's degradations, or its cleanness when it has none.
QUALITY_CAPTION_PROB = 0.6
QUALITY_WORDS = {
    "blur": "blurry",
    "noise": "noisy",
    "jpeg": "blocky",
    "low_contrast": "faded",
    "bad_crop": "badly cropped",
}
STRONG_SEVERITY = 0.6  # from this severity on a degradation is "very ..."
CLEAN_WORDS = ("sharp and clean", "high quality")


@dataclass(frozen=True)
class SampleSpec:
    """Everything that defines one synthetic sample, before any pixels exist."""

    index: int
    width: int
    height: int
    background: str
    objects: tuple[tuple[str, str, float, float, float], ...]  # (colour, shape, cx, cy, radius), fractions
    caption: str
    degradations: dict[str, float] = field(default_factory=dict)  # name -> severity in [0, 1]
    rater_noise: float = 0.0

    @property
    def rating(self) -> float:
        """Ground-truth aesthetic rating in [1, 10]."""
        r = BASE_RATING + self.rater_noise
        r -= sum(DEGRADATION_WEIGHTS[k] * s for k, s in self.degradations.items())
        return round(float(min(10.0, max(1.0, r))), 2)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def describe(seed: int, index: int, short_side: int) -> SampleSpec:
    """Sample the scene, caption and degradations of sample `index` (no rendering)."""
    rng = _rng(seed, index)
    aspect = _pick(rng, ASPECTS)
    w, h = (round(short_side * aspect), short_side) if aspect >= 1 else (short_side, round(short_side / aspect))
    bg = _pick(rng, list(BACKGROUNDS))
    colours = list(COLOURS)
    if rng.random() < 0.35:  # a two-object scene with a spatial relation
        c1, c2 = (colours[i] for i in rng.choice(len(colours), 2, replace=False))
        s1, s2 = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
        rel = _pick(rng, list(RELATIONS))
        dx, dy = RELATIONS[rel]
        r = 0.15
        jitter = rng.uniform(-0.05, 0.05, 2)
        a = (0.5 + 0.24 * dx + jitter[0], 0.5 + 0.24 * dy + jitter[1])
        b = (0.5 - 0.24 * dx + jitter[0], 0.5 - 0.24 * dy + jitter[1])
        objects = ((c1, s1, *a, r), (c2, s2, *b, r))
        caption = _pick(rng, PAIR_TEMPLATES).format(c1=c1, s1=s1, rel=rel, c2=c2, s2=s2, bg=bg)
    else:
        colour, shape = _pick(rng, colours), _pick(rng, SHAPES)
        size, pos = _pick(rng, list(SIZES)), _pick(rng, list(POSITIONS))
        cx, cy = POSITIONS[pos]
        objects = ((colour, shape, cx, cy, SIZES[size]),)
        caption = _pick(rng, SINGLE_TEMPLATES).format(size=size, colour=colour, shape=shape, pos=pos, bg=bg)
    degradations = {
        name: round(float(rng.uniform(0.25, 1.0)), 3) for name in DEGRADATION_WEIGHTS if rng.random() < DEGRADATION_PROB
    }
    noise = float(np.clip(rng.normal(0, 0.3), -0.8, 0.8))
    if rng.random() < QUALITY_CAPTION_PROB:  # drawn last: scenes and ratings do not depend on it
        caption = f"{caption}, {quality_words(degradations, rng)}"
    caption = re.sub(r"\ba (?=[aeiou])", "an ", caption)
    return SampleSpec(index, w, h, bg, objects, caption, degradations, noise)


def quality_words(degradations: dict[str, float], rng: np.random.Generator) -> str:
    """How a caption describes an image's degradations ("very blurry, noisy"), or a clean one."""
    if not degradations:
        return _pick(rng, CLEAN_WORDS)
    return ", ".join(
        ("very " if sev >= STRONG_SEVERITY else "") + QUALITY_WORDS[name] for name, sev in degradations.items()
    )


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if shape == "square":
        return ring(4, r * 1.2, math.pi / 4)
    if shape == "triangle":
        return ring(3, r * 1.15, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, r, 0)
    if shape == "diamond":
        return [(cx, cy - r * 1.2), (cx + r * 0.8, cy), (cx, cy + r * 1.2), (cx - r * 0.8, cy)]
    if shape == "star":
        outer, inner = ring(5, r * 1.2, -math.pi / 2), ring(5, r * 0.5, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = r * 0.35, r * 1.1
        pts = [
            (a, b),
            (a, a),
            (b, a),
            (b, -a),
            (a, -a),
            (a, -b),
            (-a, -b),
            (-a, -a),
            (-b, -a),
            (-b, a),
            (-a, a),
            (-a, b),
        ]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def _background(name: str, w: int, h: int) -> Image.Image:
    base = BACKGROUNDS[name]
    img = Image.new("RGB", (w, h), base)
    draw = ImageDraw.Draw(img)
    if name == "striped":
        step = max(2, w // 8)
        for x in range(0, w, 2 * step):
            draw.rectangle([x, 0, x + step - 1, h], fill=(150, 150, 150))
    elif name == "checkered":
        step = max(2, min(w, h) // 6)
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=(110, 110, 110))
    elif name == "gradient":
        ramp = np.linspace(60, 200, h, dtype=np.float32)[:, None, None]
        arr = np.broadcast_to(ramp * np.array([0.8, 0.8, 1.1], np.float32), (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def render(spec: SampleSpec, seed: int) -> bytes:
    """Render a spec to JPEG bytes, applying its degradations (deterministic for seed and index)."""
    w, h = spec.width, spec.height
    short = min(w, h)
    img = _background(spec.background, w, h)
    draw = ImageDraw.Draw(img)
    for colour, shape, fx, fy, fr in spec.objects:
        cx, cy, r = fx * w, fy * h, fr * short
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour], outline=(0, 0, 0))
        else:
            draw.polygon(_polygon(shape, cx, cy, r), fill=COLOURS[colour], outline=(0, 0, 0))
    rng = _rng(seed, spec.index + 1_000_000_007)
    d = spec.degradations
    if "bad_crop" in d:  # shift the content so the subject is cut off by the frame
        shift = d["bad_crop"] * 0.45
        dx, dy = (shift * w * rng.choice([-1, 1]), 0) if rng.random() < 0.5 else (0, shift * h * rng.choice([-1, 1]))
        img = img.transform((w, h), Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=(0, 0, 0))
    if "blur" in d:
        img = img.filter(ImageFilter.GaussianBlur(radius=d["blur"] * short / 24))
    if "low_contrast" in d:
        img = ImageEnhance.Contrast(img).enhance(1.0 - 0.8 * d["low_contrast"])
    if "noise" in d:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 60 * d["noise"], (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    quality = int(round(95 - 90 * d["jpeg"])) if "jpeg" in d else 95
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=max(5, quality))
    return buf.getvalue()


def render_index(seed: int, index: int, short_side: int) -> bytes:
    """JPEG bytes of sample `index`."""
    return render(describe(seed, index, short_side), seed)


HELDOUT_START = 10_000_000  # held-out indices: far beyond any source, so never seen in training


def heldout_set(cfg: SyntheticSource, n: int, resolution: int) -> ImageSet:
    """n fresh synthetic samples the pipeline never downloaded, rendered and resized like ingest does.

    The embedded default's component reports (retrieval, Spearman, PSNR) are measured on these.
    """
    specs = [describe(cfg.seed, HELDOUT_START + i, cfg.image_size) for i in range(n)]
    images = np.stack([decode_rgb(render(s, cfg.seed), resolution) for s in specs])
    meta = [{"rating": s.rating, "WIDTH": s.width, "HEIGHT": s.height} for s in specs]
    return ImageSet(images, [s.caption for s in specs], meta, [f"heldout-{s.index}" for s in specs])
