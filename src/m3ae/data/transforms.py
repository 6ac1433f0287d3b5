"""Image decoding and augmentation on PIL/numpy (torchvision stays optional)."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# The only decoders sample bytes may choose (the image extensions sources read): Pillow otherwise
# picks its decoder from the bytes, and some (EPS) run external programs such as Ghostscript.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK"}  # a palette or 16-bit image is converted first


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is recorded under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def unexpected_skip(error: Exception) -> str:
    """The skip reason of a sample whose decoding raised something other than SkipSample (a Pillow
    or numpy error on crafted data): counted under its exception type, never fatal."""
    return f"sample_error:{type(error).__name__}"


def decode_image(data: bytes, max_pixels: int, min_side: int, draft_side: int = 0) -> Image.Image:
    """Decode encoded image bytes into an upright 8-bit RGB image, or raise SkipSample.

    `draft_side` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while keeping both sides at
    least that long, which is most of the decode cost saved on large photos; other formats (and
    JPEGs still too large) get an integer box reduction before any mode conversion.
    """
    if not data:
        raise SkipSample("empty_image")
    try:
        with warnings.catch_warnings():
            # Pillow warns on odd EXIF/ICC data it can still decode, and on large images that our
            # own cap below judges (its global limit is left alone: other code may rely on it).
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise SkipSample("too_many_pixels", f"{width}x{height}")
            if min(width, height) < min_side:
                raise SkipSample("image_too_small", f"{width}x{height}")
            if draft_side and image.format == "JPEG":
                image.draft(None, (draft_side, draft_side))
            image.load()
    except SkipSample:
        raise
    except Image.DecompressionBombError as error:  # above twice Pillow's own limit
        raise SkipSample("too_many_pixels", str(error)) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise SkipSample("undecodable_image", str(error)) from error
    if draft_side and image.mode in _REDUCIBLE_MODES:
        factor = min(image.size) // draft_side
        if factor >= 2:
            image = image.reduce(factor)
    return to_rgb(_upright(image))


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF never makes the pixels unusable; keep them as stored
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, 16-bit scaled down, CMYK/palette converted."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if image.mode != "F":
            values = values / 257.0  # 0..65535 onto 0..255
        image = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        return background.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


Box = tuple[float, float, float, float]


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """The crop box of torchvision's RandomResizedCrop: area fraction in `scale`, log-uniform ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    # Fallback as torchvision: a central crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def resize_shorter_side(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side `size` and the longer one scaled and truncated, as
    torchvision's Resize(int) and Hugging Face's `shortest_edge` resize compute it: the exported
    image processor then reproduces our evaluation inputs exactly."""
    return (size, int(size * height / width)) if width <= height else (int(size * width / height), size)


@dataclass(frozen=True)
class ImageTransform:
    """Pretraining (RandomResizedCrop + flip) or evaluation (Resize shorter side + CenterCrop) to uint8 HWC."""

    size: int
    train: bool = True
    scale: tuple[float, float] = (0.2, 1.0)
    flip: bool = True

    @property
    def draft_side(self) -> int:
        # Keep enough pixels that the smallest random crop is still downscaled, not upscaled.
        return math.ceil(self.size / math.sqrt(self.scale[0])) if self.train else self.size

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        width, height = image.size
        if self.train:
            if rng is None:
                raise ValueError("ImageTransform(train=True) needs a random generator")
            box = random_resized_crop_box(width, height, rng, self.scale)
            out = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
            if self.flip and rng.random() < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return np.asarray(out, dtype=np.uint8)
        new_width, new_height = resize_shorter_side(width, height, self.size)
        pixels = np.asarray(image.resize((new_width, new_height), Image.Resampling.BICUBIC), dtype=np.uint8)
        top, left = (new_height - self.size) // 2, (new_width - self.size) // 2  # as CenterCrop rounds
        return pixels[top : top + self.size, left : left + self.size]


def normalize_batch(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                    shared: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, 3) to float32 (B, 3, H, W) with `(x / 255 - mean) / std` per channel.

    Transposing the uint8 bytes first and scaling in place is several times faster than
    converting the permuted view. `shared` writes the result straight into shared memory, which
    saves DataLoader workers a copy of every batch when handing it to the main process.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    out = torch.empty(pixels.shape, dtype=torch.float32)
    if shared:
        out.share_memory_()
    out.copy_(pixels)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1)
    return out.mul_(scale).add_(shift)
