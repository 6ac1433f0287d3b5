"""The embedded default dataset: procedural scenes whose captions describe them.

Each image holds one main object (the label is its shape, one of ten) over a random background
with smaller distractor objects of other shapes. Colour, texture, size, position, rotation,
background and distractors all vary independently of the label, so pixels are dominated by
nuisances while the caption names the main shape: the setting where language supervision helps
the image representation (the paper's claim, testable on CPU in minutes).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from m3ae.data.writer import ShardWriter

FORMAT_VERSION = 1
SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "diamond", "cross", "ring", "arrow")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (240, 130, 180), "brown": (130, 80, 40), "gray": (128, 128, 128), "cyan": (40, 200, 210),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "noisy")
POSITIONS = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right", (0, 1): "left", (1, 1): "center",
             (2, 1): "right", (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
SPLITS = {"train": 0, "val": 1}
SUPERSAMPLE = 2  # drawn at twice the size then box-filtered: anti-aliased edges
MAX_TILT = math.radians(20)


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    train: int = 20_000
    val: int = 2_000
    image_size: int = 64
    shard_size: int = 500


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(count: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
        return [(math.cos(phase + 2 * math.pi * i / count) * radius,
                 math.sin(phase + 2 * math.pi * i / count) * radius) for i in range(count)]

    if shape == "square":
        points = ring(4, r, math.pi / 4)
    elif shape == "triangle":
        points = ring(3, r)
    elif shape == "pentagon":
        points = ring(5, r)
    elif shape == "hexagon":
        points = ring(6, r)
    elif shape == "diamond":
        points = [(x * 0.6, y) for x, y in ring(4, r)]
    elif shape == "star":
        outer, inner = ring(5, r), ring(5, r * 0.42, math.pi / 5)
        points = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif shape == "cross":
        a, b = r, r * 0.35
        points = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                  (-a, -b), (-b, -b)]
    elif shape == "arrow":
        points = [(-r, -r * 0.25), (r * 0.2, -r * 0.25), (r * 0.2, -r * 0.7), (r, 0), (r * 0.2, r * 0.7),
                  (r * 0.2, r * 0.25), (-r, r * 0.25)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _shape_mask(size: int, shape: str, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            inner = r * 0.55
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return mask


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 25) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)


def _pattern(rng: np.random.Generator, size: int, kind: str, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """An (size, size, 3) float image of a texture made of two colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = float(rng.integers(6, 16)) * SUPERSAMPLE
    if kind == "plain":
        t = np.zeros((size, size), np.float32)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = ((xx * math.cos(theta) + yy * math.sin(theta)) / size + 1.0) / 2.0
    elif kind == "striped":
        theta = rng.uniform(0, math.pi)
        t = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == "checkered":
        t = ((xx // (period / 2) + yy // (period / 2)) % 2).astype(np.float32)
    elif kind == "dotted":
        t = ((((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2) < (period / 4) ** 2)
        t = t.astype(np.float32)
    elif kind == "noisy":
        coarse = rng.random((size // 8 + 1, size // 8 + 1)).astype(np.float32)
        t = np.kron(coarse, np.ones((8, 8), np.float32))[:size, :size]
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    first, second = first.astype(np.float32), second.astype(np.float32)
    return np.clip(first + (second - first) * t[..., None], 0, 255)


def render_scene(seed: int, split: str, index: int, image_size: int = 64) -> tuple[Image.Image, str, dict]:
    """One scene, a caption describing it, and its attributes; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    size = image_size * SUPERSAMPLE
    names = list(COLORS)
    background = str(rng.choice(BACKGROUNDS))
    # The background pattern is one hue in two shades: a strong nuisance that still lets the
    # main object stand out, so that a tiny model can learn shapes within minutes.
    bg_color = str(rng.choice(names))
    bg_first = _jitter(rng, COLORS[bg_color], 30)
    canvas = Image.fromarray(_pattern(rng, size, background, bg_first, _jitter(rng, bg_first, 70)).astype(np.uint8))

    label = int(rng.integers(len(SHAPES)))
    color, other_color = (str(c) for c in rng.choice([n for n in names if n != bg_color], 2, replace=False))
    texture = str(rng.choice(TEXTURES, p=[0.7, 0.1, 0.1, 0.1]))
    scale = str(rng.choice(["small", "medium", "large"]))
    radius = {"small": 0.22, "medium": 0.28, "large": 0.34}[scale] * size * rng.uniform(0.94, 1.06)
    cell = (int(rng.integers(3)), int(rng.integers(3)))
    span = size - 2 * radius
    cx = radius + span * (cell[0] + rng.uniform(0.15, 0.85)) / 3
    cy = radius + span * (cell[1] + rng.uniform(0.15, 0.85)) / 3

    distractors = []
    for _ in range(int(rng.integers(0, 3))):
        shape = str(rng.choice([s for s in SHAPES if s != SHAPES[label]]))
        d_color = str(rng.choice(names))
        r = size * rng.uniform(0.05, 0.08)
        dx, dy = rng.uniform(r, size - r, 2)
        mask = _shape_mask(size, shape, dx, dy, r, rng.uniform(0, 2 * math.pi))
        canvas.paste(Image.new("RGB", (size, size), tuple(int(v) for v in _jitter(rng, COLORS[d_color]))), mask=mask)
        distractors.append((shape, d_color))

    fill = _pattern(rng, size, texture, _jitter(rng, COLORS[color]), _jitter(rng, COLORS[other_color]))
    # A tilt, not a free rotation: orientation stays a cue, as for most objects in photos.
    mask = _shape_mask(size, SHAPES[label], cx, cy, radius, rng.uniform(-MAX_TILT, MAX_TILT))
    canvas.paste(Image.fromarray(fill.astype(np.uint8)), mask=mask)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)

    attributes = {"shape": SHAPES[label], "color": color, "texture": texture, "size": scale,
                  "position": POSITIONS[cell], "background": background,
                  "distractors": [f"{c} {s}" for s, c in distractors]}
    return image, _caption(rng, attributes, other_color), {"label": label, **attributes}


def _caption(rng: np.random.Generator, a: dict, other_color: str) -> str:
    texture = {"plain": "", "striped": f"{other_color} striped ", "dotted": f"{other_color} dotted ",
               "checkered": f"{other_color} checkered "}[a["texture"]]
    obj = f"{a['size']} {texture}{a['color']} {a['shape']}"
    where = "in the center" if a["position"] == "center" else f"at the {a['position']}"
    templates = [f"a {obj} {where}", f"a {obj} {where} on a {a['background']} background"]
    if a["distractors"]:
        others = " and ".join(f"a small {d}" for d in a["distractors"])
        templates += [f"a {obj} {where}, with {others}", f"{where} there is a {obj} next to {others}",
                      f"a picture of a {a['color']} {a['shape']} and {others} on a {a['background']} background"]
    else:
        templates += [f"{where} there is a {obj}", f"a picture of a {a['color']} {a['shape']}"]
    return templates[int(rng.integers(len(templates)))]


def _write_shard(job: tuple[SynthSpec, str, int, Path]) -> None:
    spec, split, shard, out_dir = job
    start = shard * spec.shard_size
    stop = min(start + spec.shard_size, getattr(spec, split))
    offset = 0 if split == "train" else 10**8  # keys never collide across splits
    with ShardWriter(out_dir, split, spec.shard_size, first_shard=shard) as writer:
        for index in range(start, stop):
            image, caption, attributes = render_scene(spec.seed, split, index, spec.image_size)
            encoded = io.BytesIO()
            image.save(encoded, format="JPEG", quality=90)
            writer.write(f"{offset + index:09d}", encoded.getvalue(), caption, attributes["label"], attributes)


def generate(out: str | Path, spec: SynthSpec, processes: int | None = None) -> Path:
    """Write the dataset into `out` (created; must not exist)."""
    out = Path(out)
    out.mkdir(parents=True)
    jobs = [(spec, split, shard, out) for split in SPLITS
            for shard in range((getattr(spec, split) + spec.shard_size - 1) // spec.shard_size)]
    processes = processes or os.cpu_count() or 1
    if processes > 1 and len(jobs) > 1:
        with get_context("spawn" if os.name == "nt" else "fork").Pool(min(processes, len(jobs))) as pool:
            pool.map(_write_shard, jobs, chunksize=1)
    else:
        for job in jobs:
            _write_shard(job)
    manifest = {"format_version": FORMAT_VERSION, **asdict(spec), "classes": list(SHAPES),
                "shards": {split: sorted(p.name for p in out.glob(f"{split}-*.tar")) for split in SPLITS}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def ensure_embedded_dataset(root: str | Path = "data/embedded", seed: int = 0, train: int = 20_000,
                            val: int = 2_000, image_size: int = 64, shard_size: int = 500) -> Path:
    """The embedded dataset at `root`, generated if missing. Idempotent and atomic: written into a
    temporary sibling directory that is renamed into place, so concurrent callers (one per rank)
    never see a half-written dataset."""
    root = Path(root)
    spec = SynthSpec(seed, train, val, image_size, shard_size)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            generate(tmp / "data", spec)
            try:
                os.rename(tmp / "data", root)
            except OSError:
                if not manifest.is_file():  # lost a race to a concurrent writer: fine; else a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = json.loads(manifest.read_text())
    expected = {"format_version": FORMAT_VERSION, **asdict(spec)}
    mismatch = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if mismatch:
        raise ValueError(f"embedded dataset {root}: holds a different dataset (field: (found, wanted)) {mismatch}; "
                         f"delete it or choose another root")
    return root
