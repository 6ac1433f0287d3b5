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
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i, mode in enumerate(("RGB", "RGBA")):
        path = root / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50, len(mode)), dtype=np.uint8), mode).save(path)
        paths.append(str(path))
    return paths


def _size(path):
    with Image.open(path) as image:
        return image.size


def test_reconstruct_with_captions(model_dir, pictures, tmp_path, capsys):
    out = tmp_path / "rec.png"
    assert main(["reconstruct", "--checkpoint", str(model_dir), "--images", *pictures, "--captions", "a red dog", "two blue birds",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "->" in printed and f"wrote {out}" in printed  # masked words with guesses
    assert _size(out) == (int((4 * 2.2 + 4.4) * 80), int(2 * 2.2 * 80))  # 4 views + caption column, 2 rows


def test_reconstruct_refuses_mismatched_captions(model_dir, pictures, tmp_path, capsys):
    assert main(["reconstruct", "--checkpoint", str(model_dir), "--images", *pictures, "--captions", "one",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "m3ae reconstruct: config error: --captions: 1 given for 2 images" in capsys.readouterr().err


def test_attention_maps(model_dir, pictures, tmp_path, capsys):
    prefix = tmp_path / "att"
    assert main(["attention", "--checkpoint", str(model_dir), "--image", pictures[0], "--caption", "a red dog on grass",
                 "--words", "red", "dog", "--layer", "mean", "--out-prefix", str(prefix)]) == 0
    assert _size(f"{prefix}_words.png") == (780, 300) and _size(f"{prefix}_patch.png") == (800, 300)
    assert main(["attention", "--checkpoint", str(model_dir), "--image", pictures[0], "--caption", "a red dog",
                 "--words", "cat", "--out-prefix", str(prefix)]) == 2
    assert "config error: --words: 'cat' is not a token" in capsys.readouterr().err


def test_missing_image_is_named(model_dir, tmp_path, capsys):
    assert main(["reconstruct", "--checkpoint", str(model_dir), "--images", str(tmp_path / "nope.png"),
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]  # beside what it chose (threads)
    assert len(errors) == 1 and "nope.png" in errors[0] and "Traceback" not in err


def test_tsne_of_two_models_on_a_labelled_folder(model_dir, tmp_path):
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
    assert _size(out) == (1000, 500)
    # the legend names the classes by their folders, in label order
    assert label_names(str(tmp_path / "data"), split="val") == ["blue", "red"]
