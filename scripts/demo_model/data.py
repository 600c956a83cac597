"""Synthetic image + question/answer generator for the ``vlmserve-demo`` model.

Every image holds one filled shape near the centre of a light, randomly tinted
background.  Everything is drawn from an explicit ``random.Random`` stream, so a
given seed always yields the same samples.  Training and evaluation use
different streams (see ``train_stream`` / ``heldout_stream`` / ``eval_stream``).

A sample is a dict::

    {
        "kind": "color" | "shape" | "describe" | "color_first" | "color_second",
        "images": [PIL.Image, ...],          # RGB, at their real size
        "messages": [{"role": "user", "content": [...parts...]}],  # OpenAI-style
        "answer": "red",                     # what the assistant must reply
    }
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

# Pure tones; each channel is jittered by up to +-COLOR_JITTER per image.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 210, 30),
    "purple": (130, 50, 170),
    "orange": (245, 135, 25),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "cross"]
COLOR_JITTER = 25

KINDS = ["color", "shape", "describe", "color_first", "color_second"]
QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is this?",
    "describe": "Describe the image.",
    "color_first": "What color is the shape in the first image?",
    "color_second": "What color is the shape in the second image?",
}
NUM_IMAGES = {"color": 1, "shape": 1, "describe": 1, "color_first": 2, "color_second": 2}

# A few optional system prompts seen in training (the template prepends them).
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "Answer the question about the image briefly.",
]


@dataclass
class ImageDist:
    """How images are drawn."""

    min_short: int = 64
    max_long: int = 1024
    max_aspect: float = 1.4
    log_uniform_size: bool = True
    jpeg_prob: float = 0.4
    png_roundtrip: bool = False  # eval: really encode/decode PNG
    blur_prob: float = 0.3
    max_rotation: float = 20.0  # degrees
    max_offset: float = 0.08  # of the short side, per axis
    min_frac: float = 0.30  # shape extent / short side
    max_frac: float = 0.60


# Training: mostly small images (fast), with a tail of larger ones.
TRAIN_DIST = ImageDist(max_long=448)
# Held-out check and final evaluation: the full 64..1024 px range, PNG round trip.
EVAL_DIST = ImageDist(max_long=1024, png_roundtrip=True)


def _sample_size(rng: random.Random, d: ImageDist) -> tuple[int, int]:
    aspect = rng.uniform(1.0, d.max_aspect)
    max_short = max(d.min_short, int(d.max_long / aspect))
    if d.log_uniform_size:
        short = int(round(math.exp(rng.uniform(math.log(d.min_short), math.log(max_short)))))
    else:
        short = rng.randint(d.min_short, max_short)
    short = max(d.min_short, min(short, max_short))
    long = max(short, min(d.max_long, int(round(short * aspect))))
    if rng.random() < 0.5:
        return long, short  # landscape (w, h)
    return short, long  # portrait


def _jitter_color(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)


def _rot(points, cx, cy, angle_deg):
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float,
                angle: float, fill) -> None:
    h = extent / 2.0
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        return
    if shape == "square":
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        # equilateral-ish, pointing up, width == extent, centred on its bbox
        th = extent * math.sqrt(3) / 2.0
        pts = [(0.0, -th / 2.0), (h, th / 2.0), (-h, th / 2.0)]
    elif shape == "cross":
        w = extent / 6.0  # arm half-width (arm width = extent / 3)
        pts = [(-w, -h), (w, -h), (w, -w), (h, -w), (h, w), (w, w), (w, h), (-w, h),
               (-w, w), (-h, w), (-h, -w), (-w, -w)]
    else:
        raise ValueError(shape)
    draw.polygon(_rot(pts, cx, cy, angle), fill=fill)


def make_image(rng: random.Random, color: str, shape: str, dist: ImageDist = TRAIN_DIST) -> Image.Image:
    w, h = _sample_size(rng, dist)
    bg = tuple(rng.randint(185, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    short = min(w, h)
    extent = short * rng.uniform(dist.min_frac, dist.max_frac)
    cx = w / 2.0 + rng.uniform(-dist.max_offset, dist.max_offset) * short
    cy = h / 2.0 + rng.uniform(-dist.max_offset, dist.max_offset) * short
    angle = rng.uniform(-dist.max_rotation, dist.max_rotation)
    _draw_shape(draw, shape, cx, cy, extent, angle, _jitter_color(rng, COLORS[color]))
    if rng.random() < dist.blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 2.0)))
    if rng.random() < dist.jpeg_prob:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(50, 95))
        buf.seek(0)
        img = Image.open(buf)
        img.load()
        img = img.convert("RGB")
    elif dist.png_roundtrip:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        buf.seek(0)
        img = Image.open(buf)
        img.load()
        img = img.convert("RGB")
    return img


def make_sample(rng: random.Random, kind: str, dist: ImageDist = TRAIN_DIST,
                system_prob: float = 0.0) -> dict:
    n = NUM_IMAGES[kind]
    specs = [(rng.choice(COLOR_NAMES), rng.choice(SHAPES)) for _ in range(n)]
    images = [make_image(rng, c, s, dist) for c, s in specs]
    if kind == "color":
        answer = specs[0][0]
    elif kind == "shape":
        answer = specs[0][1]
    elif kind == "describe":
        answer = f"a {specs[0][0]} {specs[0][1]}"
    elif kind == "color_first":
        answer = specs[0][0]
    else:
        answer = specs[1][0]
    image_parts = [{"type": "image"} for _ in range(n)]
    text_part = [{"type": "text", "text": QUESTIONS[kind]}]
    image_first = rng.random() < 0.5
    parts = image_parts + text_part if image_first else text_part + image_parts
    messages = []
    if system_prob > 0 and rng.random() < system_prob:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": parts})
    return {"kind": kind, "images": images, "messages": messages, "answer": answer,
            "specs": specs, "image_first": image_first}


def train_stream(seed: int = 1234) -> random.Random:
    return random.Random(f"vlmserve-demo/train/{seed}")


def heldout_stream(seed: int = 0) -> random.Random:
    """Held-out check used during training (never used for gradient steps)."""
    return random.Random(f"vlmserve-demo/heldout/{seed}")


def eval_stream(seed: int = 0) -> random.Random:
    """Final evaluation stream (eval_hf.py); disjoint from training and the held-out check."""
    return random.Random(f"vlmserve-demo/eval/{seed}")


def make_eval_set(rng: random.Random, per_kind: int, dist: ImageDist = EVAL_DIST) -> list[dict]:
    samples = []
    for i in range(per_kind):
        for kind in KINDS:
            samples.append(make_sample(rng, kind, dist))
    return samples


def tokenizer_corpus() -> list[str]:
    """Text the BPE tokenizer is trained on."""
    lines = []
    lines += list(QUESTIONS.values())
    lines += SYSTEM_PROMPTS
    lines += ["USER: ASSISTANT:", "USER:", " ASSISTANT:", " ASSISTANT: "]
    for c in COLOR_NAMES:
        lines.append(f" {c}")
        for s in SHAPES:
            lines.append(f" a {c} {s}")
    for s in SHAPES:
        lines.append(f" {s}")
    # Some general words so ordinary prompts tokenize reasonably.
    lines.append("the a an is what which color shape image picture photo this that of in on "
                 "first second third describe question answer yes no left right top bottom "
                 "hello please tell me how many there are you and or with")
    return lines
