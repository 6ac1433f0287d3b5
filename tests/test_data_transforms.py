import io

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae.data.config import NORMALIZATION_PRESETS, DataConfig
from m3ae.data.transforms import (
    ImageTransform,
    SkipSample,
    decode_image,
    normalize_batch,
    random_resized_crop_box,
)

BIG = 10**9


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def test_train_transform_shape_range_and_seed_determinism():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    transform = ImageTransform(32, train=True)
    first = transform(image, np.random.default_rng(7))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, transform(image, np.random.default_rng(7)))
    others = [transform(image, np.random.default_rng(seed)) for seed in range(8)]
    assert any(not np.array_equal(first, other) for other in others)


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(200, 100, rng, (0.2, 1.0))
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 200 and bottom <= 100
        # Rounding of a 200x100 image moves the area by at most a pixel row/column.
        assert 0.2 * 200 * 100 - w - h - 1 <= w * h <= 200 * 100
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 or (w, h) in ((133, 100), (200, 100))


def test_eval_transform_is_resize_then_center_crop():
    # Left third red, middle blue, right third green: the centre crop of a 3:1 image is all blue.
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:40, 2] = 255
    pixels[:, 40:, 1] = 255
    out = ImageTransform(10, train=False)(Image.fromarray(pixels))
    assert out.shape == (10, 10, 3)
    assert (out[:, 1:-1, 2] > 200).all() and (out[:, 1:-1, :2] < 60).all()


def test_flip_is_a_mirror_of_the_same_crop():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    plain, flipped = ImageTransform(16, scale=(1.0, 1.0), flip=False), ImageTransform(16, scale=(1.0, 1.0))
    outputs = {bytes(flipped(image, np.random.default_rng(s))): s for s in range(12)}
    reference = plain(image, np.random.default_rng(0))
    assert bytes(reference) in outputs and bytes(reference[:, ::-1].copy()) in outputs


@pytest.mark.parametrize("preset", sorted(NORMALIZATION_PRESETS))
def test_normalization_presets(preset):
    mean, std = DataConfig(normalization=preset).normalization_stats()
    batch = np.full((2, 4, 4, 3), 255, np.uint8)
    out = normalize_batch(batch, mean, std)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))


def test_custom_normalization_and_config_errors():
    cfg = DataConfig(normalization="custom", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert cfg.normalization_stats() == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="normalization"):
        DataConfig(normalization="custom")
    with pytest.raises(ValueError, match="normalization"):
        DataConfig(normalization="cifar")


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_grayscale_palette_and_cmyk_become_rgb():
    gray = Image.new("L", (20, 20), 77)
    assert (rgb(decode_image(encode(gray), BIG, 1)) == 77).all()
    palette = Image.new("RGB", (20, 20), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert tuple(rgb(decode_image(encode(palette), BIG, 1))[5, 5]) == (10, 200, 30)
    cmyk = Image.new("CMYK", (24, 24), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=95), BIG, 1)
    assert out.mode == "RGB" and out.getpixel((12, 12))[0] > 200 and out.getpixel((12, 12))[1] < 50


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = decode_image(encode(rgba), BIG, 1)
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    la = Image.new("LA", (16, 16), (0, 128))
    assert decode_image(encode(la), BIG, 1).getpixel((3, 3)) == (127, 127, 127)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 9, 9, 9])
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, transparency=0), BIG, 1).getpixel((2, 2)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.full((16, 16), 65535, np.uint16)
    values[:8] = 32896  # 128 * 257
    out = rgb(decode_image(encode(Image.fromarray(values)), BIG, 1))
    assert (out[8:] == 255).all() and (out[:8] == 128).all()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), BIG, 1)
    assert out.size == (20, 40)
    assert out.getpixel((10, 3))[0] > 200  # the red band is now at the top


def test_jpeg_draft_decodes_at_reduced_size():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 1000, 3), dtype=np.uint8))
    data = encode(big, "JPEG")
    assert decode_image(data, BIG, 1).size == (1000, 800)
    assert decode_image(data, BIG, 1, draft_side=200).size == (250, 200)
    assert decode_image(data, BIG, 1, draft_side=60).size == (125, 100)  # draft 1/8, nothing more
    # Other formats are box-reduced by an integer factor keeping the short side >= draft_side.
    assert decode_image(encode(big.convert("RGBA")), BIG, 1, draft_side=200).size == (250, 200)
    assert decode_image(encode(big), BIG, 1, draft_side=300).size == (500, 400)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_image"),
        (b"not an image at all", "undecodable_image"),
        (encode(Image.new("RGB", (64, 64), 5), "JPEG")[:200], "undecodable_image"),
        (encode(Image.new("RGB", (300, 300), 5)), "too_many_pixels"),
        (encode(Image.new("RGB", (6, 40), 5)), "image_too_small"),
    ],
)
def test_bad_images_raise_skip_with_reason(data, reason):
    with pytest.raises(SkipSample) as info:
        decode_image(data, max_pixels=250 * 250, min_side=8)
    assert info.value.reason == reason
