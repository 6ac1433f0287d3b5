"""The figure commands end to end on a tiny model with the paper's vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae import M3AE, M3AEConfig
from m3ae.cli import main
from m3ae.data.factory import label_names


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt")
    M3AE(M3AEConfig(image_size=32, patch_size=8, text_length=12, emb_dim=32, depth=2, num_heads=4, dec_emb_dim=16,
                    dec_depth=1, dec_num_heads=2)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Noise in two colours the figures can be checked for: a green picture (RGB) and a blue one
    (RGBA, mostly opaque): nothing else in a figure is mostly green or blue."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, strong) in enumerate((("RGB", 1), ("RGBA", 2))):
        pixels = rng.integers(0, 80, (40, 50, len(mode)), dtype=np.uint8)
        pixels[..., strong] += 150
        if mode == "RGBA":
            pixels[..., 3] = rng.integers(200, 256, (40, 50))
        path = root / f"p{i}.png"
        Image.fromarray(pixels, mode).save(path)
        paths.append(str(path))
    return paths


def _size(path):
    with Image.open(path) as image:
        return image.size


def _region(path, x: tuple[float, float], y: tuple[float, float]) -> np.ndarray:
    """The RGB pixels (as float) of a figure between fractions `x` of its width and `y` of its height."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = pixels.shape[:2]
    return pixels[int(y[0] * h):int(y[1] * h), int(x[0] * w):int(x[1] * w)]


def _lead(region: np.ndarray, channel: int) -> float:
    """How far `channel` leads the other two on average: > 60 where one of the pictures is drawn."""
    others = np.delete(region, channel, axis=-1).max(-1)
    return float((region[..., channel] - others).mean())


def _around(x: float, y: float, dx: float = 0.03, dy: float = 0.06):
    return (x - dx, x + dx), (y - dy, y + dy)


def test_reconstruct_with_captions(model_dir, pictures, tmp_path, capsys):
    out = tmp_path / "rec.png"
    assert main(["reconstruct", "--checkpoint", str(model_dir), "--image", *pictures, "--caption", "a red dog", "two blue birds",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "->" in printed and f"wrote {out}" in printed  # masked words with guesses
    assert _size(out) == (int((4 * 2.2 + 4.4) * 80), int(2 * 2.2 * 80))  # 4 views + caption column, 2 rows
    # what is drawn, cell by cell (columns of width 1, 1, 1, 1, 2; rows at about 1/3 and 3/4 of the
    # height, below the titles): each row's original is its own picture, the reconstructions are not
    # flat, and each caption cell holds text
    for row, (y, channel) in enumerate(((0.34, 1), (0.77, 2))):
        original = _region(out, *_around(1 / 12, y))
        assert _lead(original, channel) > 60 and _lead(original, 3 - channel) < 0, row
        assert _region(out, *_around(5 / 12, y)).std() > 10, row  # the reconstruction
        caption = _region(out, (0.68, 0.98), (y - 0.15, y + 0.05))
        assert (caption.max(-1) < 100).mean() > 0.002, row  # dark text on white


def test_reconstruct_refuses_mismatched_captions(model_dir, pictures, tmp_path, capsys):
    assert main(["reconstruct", "--checkpoint", str(model_dir), "--image", *pictures, "--caption", "one",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "m3ae reconstruct: config error: --caption: 1 given for 2 images" in capsys.readouterr().err


def test_attention_maps(model_dir, pictures, tmp_path, capsys):
    prefix = tmp_path / "att"
    assert main(["attention", "--checkpoint", str(model_dir), "--image", pictures[0], "--caption", "a red dog on grass",
                 "--words", "red", "dog", "--layer", "mean", "--patch", "0,3", "--out", str(prefix)]) == 0
    words, patch = f"{prefix}_words.png", f"{prefix}_patch.png"
    assert _size(words) == (780, 300) and _size(patch) == (800, 300)
    # the words figure: the picture, then one overlay per word, and the two words' maps differ
    image, red, dog = (_region(words, *_around(x, 0.5)) for x in (0.238, 0.51, 0.785))
    assert _lead(image, 1) > 60
    assert np.abs(red - image).mean() > 30 and np.abs(dog - image).mean() > 30 and np.abs(red - dog).mean() > 10
    # the patch figure: the picture with the chosen patch (row 0, column 3 of 4x4) outlined in red,
    # in the picture's top-right quarter and nowhere else, and the caption's words shaded red
    assert _lead(_region(patch, (0.13, 0.35), (0.25, 0.8)), 1) > 30
    picture = _region(patch, (0.1, 0.38), (0.1, 0.9))
    rows, cols = np.nonzero((picture[..., 0] > 200) & (picture[..., 1:].max(-1) < 60))
    assert len(rows) > 50 and cols.min() > 0.5 * picture.shape[1] and rows.max() < 0.5 * picture.shape[0]
    shaded = _region(patch, (0.4, 0.7), (0.15, 0.4))
    assert ((shaded[..., 0] - shaded[..., 1:].max(-1)) > 40).sum() > 100
    assert main(["attention", "--checkpoint", str(model_dir), "--image", pictures[0], "--caption", "a red dog",
                 "--words", "cat", "--out", str(prefix)]) == 2
    assert "config error: --words: 'cat' is not a token" in capsys.readouterr().err


def test_missing_image_is_named(model_dir, tmp_path, capsys):
    assert main(["reconstruct", "--checkpoint", str(model_dir), "--image", str(tmp_path / "nope.png"),
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]  # beside what it chose (threads)
    assert len(errors) == 1 and "nope.png" in errors[0] and "Traceback" not in err


def test_tsne_of_two_models_on_a_labelled_folder(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        folder = tmp_path / "data" / "val" / label
        folder.mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "tsne.png"
    assert main(["tsne", "--checkpoint", f"M3AE={model_dir}", f"MAE={model_dir}", "--data.source",
                 str(tmp_path / "data"), "--out", str(out)]) == 0
    # what was embedded, in one line: by default every sample of the source, as `m3ae embed`
    assert f"t-SNE of up to 1000 images per panel, every sample of {str(tmp_path / 'data')!r}" in capsys.readouterr().out
    assert _size(out) == (1000, 500)
    # the held-out split of a source without one: refused in one line, as in `m3ae embed` and knn
    flat = tmp_path / "data" / "val" / "red"
    assert main(["tsne", "--checkpoint", str(model_dir), "--data.source", str(flat), "--split", "val"]) == 2
    assert "--val-fraction" in capsys.readouterr().err
    # each panel shows both classes in their colours (tab10's first two), as two separate clusters:
    # red and blue pictures are far apart in any encoder's features
    tab_blue, tab_orange = np.array([31, 119, 180]), np.array([255, 127, 14])
    for x in ((0.02, 0.45), (0.48, 0.91)):
        panel = _region(out, x, (0.08, 0.96))
        points = [np.argwhere(np.abs(panel - colour).max(-1) < 30) for colour in (tab_blue, tab_orange)]
        assert all(len(p) > 50 for p in points), x
        assert np.linalg.norm(points[0].mean(0) - points[1].mean(0)) > 0.3 * panel.shape[1], x
    # the legend names the classes by their folders, in label order
    assert label_names(str(tmp_path / "data"), split="val") == ["blue", "red"]
