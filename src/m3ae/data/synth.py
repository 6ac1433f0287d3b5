"""The embedded default dataset: procedural scenes whose captions describe them.

Each image holds one main object whose colour is the label (one of twelve) over a background of
another colour, with small distractor objects of yet other colours. The background fills most of
the picture, so the colour that dominates the pixels is not the label; shape, size, position,
tilt, background pattern and distractors vary independently of it. A classifier trained on the
label learns it within a few hundred steps (the object is where the picture's centre is), while
pixel reconstruction alone leaves it only partly linearly readable; the caption names the object's
colour among the words for every other factor, so M3AE's text decoder has to look at the object to
fill it in: the setting where language supervision helps the image representation (the paper's
claim, testable on a laptop CPU in minutes; docs/RESULTS.md).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from m3ae.data.writer import ShardWriter
from m3ae.utils import progress_bar

FORMAT_VERSION = 2
# Ten outlines that stay distinct at 32 px (no pentagon/hexagon next to the circle); every name is
# one WordPiece token, so the label is exactly one masked word.
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "arrow", "diamond", "moon", "house")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
    "pink": (240, 130, 180), "brown": (130, 80, 40), "gray": (128, 128, 128), "cyan": (40, 200, 210),
}
BACKGROUNDS = ("plain", "gradient", "striped", "noisy")
POSITIONS = {(0, 0): "top left", (1, 0): "top", (2, 0): "top right", (0, 1): "left", (1, 1): "center",
             (2, 1): "right", (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right"}
SPLITS = {"train": 0, "val": 1}
BACKGROUND_P = (0.4, 0.4, 0.1, 0.1)  # mostly smooth: the pattern is a nuisance, not a puzzle
SUPERSAMPLE = 2  # drawn at twice the size then box-filtered: anti-aliased edges
MAX_TILT = math.radians(8)
SHIFT = 0.1  # offset of the main object per position word, in image widths
# Words for the nuisances, several per value: the caption is a sentence about the whole picture in
# which the shape is one word among many, never a fixed slot the text alone would give away.
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "normal"), "large": ("large", "big")}
BACKGROUND_WORDS = {"plain": ("plain", "flat"), "gradient": ("gradient", "fading"), "striped": ("striped", "lined"),
                    "noisy": ("noisy", "speckled")}


# Every other word the caption templates use (see _caption): with the words above, the closed
# vocabulary of the captions, shipped as the `m3ae-embedded` tokenizer (caption_vocabulary).
TEMPLATE_WORDS = ("a", "an", "and", "also", "at", "background", "center", "corner", "image", "in", "is", "nearby",
                  "next", "of", "on", "painted", "photo", "picture", "placed", "shows", "side", "the", "there",
                  "this", "tiny", "to", "with")


def caption_vocabulary() -> list[str]:
    """The WordPiece vocabulary of the captions: special tokens first (padding id 0), then every
    word and punctuation mark they can contain, sorted. A vocabulary of ~100 instead of BERT's
    30 522 makes the text head cheap enough for CPU demos."""
    words = {*SHAPES, *COLORS, *TEMPLATE_WORDS, ",", ";"}
    words |= {w for options in (*SIZE_WORDS.values(), *BACKGROUND_WORDS.values()) for o in options for w in o.split()}
    words |= {w for where in POSITIONS.values() for w in where.split()}
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    train: int = 10_000
    val: int = 2_000
    image_size: int = 32
    shard_size: int = 500


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(count: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
        return [(math.cos(phase + 2 * math.pi * i / count) * radius,
                 math.sin(phase + 2 * math.pi * i / count) * radius) for i in range(count)]

    if shape == "square":
        points = ring(4, r, math.pi / 4)
    elif shape == "triangle":
        points = ring(3, r, -math.pi / 2)
    elif shape == "diamond":
        points = [(x * 0.6, y) for x, y in ring(4, r)]
    elif shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.42, -math.pi / 2 + math.pi / 5)
        points = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif shape == "cross":
        a, b = r, r * 0.35
        points = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                  (-a, -b), (-b, -b)]
    elif shape == "arrow":
        points = [(-r, -r * 0.25), (r * 0.2, -r * 0.25), (r * 0.2, -r * 0.7), (r, 0), (r * 0.2, r * 0.7),
                  (r * 0.2, r * 0.25), (-r, r * 0.25)]
    elif shape == "house":
        points = [(-r * 0.75, r), (r * 0.75, r), (r * 0.75, 0), (0, -r), (-r * 0.75, 0)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _shape_mask(size: int, shape: str, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring", "moon"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            inner = r * 0.5
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
        elif shape == "moon":  # a disc with an offset disc cut out, the bite turned by the tilt
            ox, oy = cx + r * 0.55 * math.cos(angle), cy + r * 0.55 * math.sin(angle)
            draw.ellipse((ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return mask


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 25) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)


def _pattern(rng: np.random.Generator, size: int, kind: str, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """An (size, size, 3) float image of a texture made of two colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = float(rng.integers(3, 8)) * size / 32
    if kind == "plain":
        t = np.zeros((size, size), np.float32)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = ((xx * math.cos(theta) + yy * math.sin(theta)) / size + 1.0) / 2.0
    elif kind == "striped":
        theta = rng.uniform(0, math.pi)
        t = (np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == "noisy":
        cell = max(size // 16, 1)
        coarse = rng.random((size // cell + 1, size // cell + 1)).astype(np.float32)
        t = np.kron(coarse, np.ones((cell, cell), np.float32))[:size, :size]
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    first, second = first.astype(np.float32), second.astype(np.float32)
    return np.clip(first + (second - first) * t[..., None], 0, 255)


def render_scene(seed: int, split: str, index: int, image_size: int = 32) -> tuple[Image.Image, str, dict]:
    """One scene, a caption describing it, and its attributes; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    size = image_size * SUPERSAMPLE
    names = list(COLORS)
    label = int(rng.integers(len(COLORS)))
    color = names[label]
    background = str(rng.choice(BACKGROUNDS, p=BACKGROUND_P))
    # One hue in two shades, never the label's: the colour of most of the picture.
    bg_color = str(rng.choice([n for n in names if n != color]))
    bg_first = _jitter(rng, COLORS[bg_color], 30)
    canvas = Image.fromarray(_pattern(rng, size, background, bg_first, _jitter(rng, bg_first, 60)).astype(np.uint8))

    shape = str(rng.choice(SHAPES))
    scale = str(rng.choice(["small", "medium", "large"]))
    radius = {"small": 0.26, "medium": 0.32, "large": 0.38}[scale] * size * rng.uniform(0.95, 1.05)
    cell = (int(rng.integers(3)), int(rng.integers(3)))
    # Moved by about a patch around the centre, as the subject of a photo is.
    cx, cy = (size / 2 + (c - 1 + rng.uniform(-0.3, 0.3)) * SHIFT * size for c in cell)

    distractors = []
    for _ in range(int(rng.integers(0, 3))):
        d_shape, d_color = str(rng.choice(SHAPES)), str(rng.choice([n for n in names if n != color]))
        r = size * rng.uniform(0.07, 0.1)
        dx, dy = rng.uniform(r, size - r, 2)
        mask = _shape_mask(size, d_shape, dx, dy, r, rng.uniform(-MAX_TILT, MAX_TILT))
        canvas.paste(Image.new("RGB", (size, size), tuple(int(v) for v in _jitter(rng, COLORS[d_color]))), mask=mask)
        distractors.append((d_shape, d_color))

    # A tilt, not a free rotation, as for most objects in photos.
    mask = _shape_mask(size, shape, cx, cy, radius, rng.uniform(-MAX_TILT, MAX_TILT))
    canvas.paste(Image.new("RGB", (size, size), tuple(int(v) for v in _jitter(rng, COLORS[color]))), mask=mask)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)

    attributes = {"color": color, "shape": shape, "size": scale, "position": POSITIONS[cell],
                  "background": background, "background_color": bg_color,
                  "distractors": [f"{c} {s}" for s, c in distractors]}
    return image, _caption(rng, attributes), {"label": label, **attributes}


def _caption(rng: np.random.Generator, a: dict) -> str:
    """A web-like sentence: one of several templates and word orders, synonyms for the nuisances, and
    the label (the main object's colour) exactly once among other colour words."""
    def pick(options) -> str:
        return str(options[int(rng.integers(len(options)))])

    size = pick(SIZE_WORDS[a["size"]])
    where = "in the center" if a["position"] == "center" else pick((f"at the {a['position']}",
                                                                     f"in the {a['position']} corner"
                                                                     if " " in a["position"] else
                                                                     f"on the {a['position']} side"))
    background = f"{pick(BACKGROUND_WORDS[a['background']])} {a['background_color']} background"
    shape, color = a["shape"], a["color"]
    others = " and ".join(f"a tiny {d}" for d in a["distractors"])
    extra = pick((f", next to {others}", f" with {others} nearby", f"; also {others}")) if others else ""
    templates = (
        f"a {size} {color} {shape} {where} on a {background}{extra}",
        f"{where} there is a {size} {color} {shape}{extra}, {background}",
        f"photo of a {color} {shape}, {size}, {where}{extra}",
        f"{background} with a {color} {shape} {where}{extra}",
        f"this picture shows a {size} {shape} painted {color} {where}{extra}",
        f"the {shape} is {color} and {size}, placed {where} on a {background}{extra}",
        f"{color} {shape} {where}{extra}",
        f"an image of a {background}; {where} a {size} {color} {shape}{extra}",
    )
    return pick(templates)


def _write_shard(job: tuple[SynthSpec, str, int, Path]) -> int:
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
    return stop - start


def _default_sigterm() -> None:
    """Pool workers die on SIGTERM as usual; only the parent turns it into a clean-up."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def generate(out: str | Path, spec: SynthSpec, processes: int | None = None, progress: bool = True) -> Path:
    """Write the dataset into `out` (created; must not exist)."""
    out = Path(out)
    out.mkdir(parents=True)
    jobs = [(spec, split, shard, out) for split in SPLITS
            for shard in range((getattr(spec, split) + spec.shard_size - 1) // spec.shard_size)]
    processes = min(processes or os.cpu_count() or 1, len(jobs))
    with progress_bar(total=spec.train + spec.val, unit="image", desc="embedded dataset", enabled=progress) as bar:
        if processes > 1:
            with get_context("spawn" if os.name == "nt" else "fork").Pool(processes, _default_sigterm) as pool:
                for count in pool.imap_unordered(_write_shard, jobs, chunksize=1):
                    bar.update(count)
        else:
            for job in jobs:
                bar.update(_write_shard(job))
    manifest = {"format_version": FORMAT_VERSION, **asdict(spec), "classes": list(COLORS),
                "shards": {split: sorted(p.name for p in out.glob(f"{split}-*.tar")) for split in SPLITS}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def format_version(root: str | Path) -> int | None:
    """The format version of the dataset at `root`, None when there is none."""
    manifest = Path(root) / "manifest.json"
    return json.loads(manifest.read_text()).get("format_version") if manifest.is_file() else None


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame) -> None:
    raise _Terminated(f"signal {signum}")


def ensure_embedded_dataset(root: str | Path = "data/embedded", seed: int = 0, train: int = 10_000,
                            val: int = 2_000, image_size: int = 32, shard_size: int = 500,
                            progress: bool = True) -> Path:
    """The embedded dataset at `root`, generated if missing or written by an older version of this
    generator (then replaced). Idempotent and atomic: written into a temporary sibling directory that
    is renamed into place, so concurrent callers (one per rank) never see a half-written dataset,
    and removed again when generation is interrupted (Ctrl-C, SIGTERM)."""
    root = Path(root)
    spec = SynthSpec(seed, train, val, image_size, shard_size)
    manifest = root / "manifest.json"
    if format_version(root) != FORMAT_VERSION:
        old = format_version(root)
        print(f"m3ae: generating the embedded dataset in {root} ({train} + {val} images of {image_size} px"
              + (f", replacing format {old} with format {FORMAT_VERSION}" if old is not None else "")
              + "; once, about a minute)", file=sys.stderr, flush=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        try:
            generate(tmp / "data", spec, progress=progress)
            if format_version(root) not in (None, FORMAT_VERSION):
                os.rename(root, tmp / "old")
            try:
                os.rename(tmp / "data", root)
            except OSError:
                if format_version(root) != FORMAT_VERSION:  # lost a race to a concurrent writer: fine
                    raise
        except _Terminated:
            raise SystemExit(128 + signal.SIGTERM) from None
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
            shutil.rmtree(tmp, ignore_errors=True)
    found = json.loads(manifest.read_text())
    expected = {"format_version": FORMAT_VERSION, **asdict(spec)}
    mismatch = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if mismatch:
        raise ValueError(f"embedded dataset {root}: holds a different dataset (field: (found, wanted)) {mismatch}; "
                         f"delete it or choose another root")
    return root
