"""The open_clip-style API: `m3ae.create_model_and_transforms` and `m3ae.get_tokenizer` give what the
data pipeline gives, from config.json's preprocessing record; the HF export's processor reproduces
the evaluation transform exactly, non-square images included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import m3ae
from m3ae import M3AE, M3AEConfig
from m3ae.cli import main
from m3ae.data.config import DataConfig
from m3ae.data.tokenizer import Tokenizer
from m3ae.data.transforms import ImageTransform, normalize_batch


def _image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small model saved with the preprocessing record of a run that used the imagenet statistics,
    the shipped embedded vocabulary and its own crop scale."""
    torch.manual_seed(0)
    model = M3AE(M3AEConfig(image_size=32, patch_size=8, text_length=12, vocab_size=200, emb_dim=48, depth=2,
                            num_heads=4, dec_emb_dim=32, dec_depth=1, dec_num_heads=2, tokenizer="m3ae-embedded"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = DataConfig(normalization="imagenet", tokenizer="m3ae-embedded", crop_scale=(0.5, 0.9), horizontal_flip=False)
    model.preprocessing = data.preprocessing()
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return model.eval(), directory, data


def test_config_json_records_the_tokenizer_and_the_normalisation_and_reads_back(saved):
    model, directory, data = saved
    config = json.loads((directory / "config.json").read_text())
    stored = config["preprocessing"]
    # the tokenizer once, as the model's field (issue 18: it was also in the record)
    assert config["tokenizer"] == "m3ae-embedded"
    assert stored == {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                      "crop_scale": [0.5, 0.9], "horizontal_flip": False}
    assert M3AE.from_pretrained(directory).preprocessing == stored
    assert M3AE.from_pretrained(directory).config == model.config  # the record is not a model field


def test_transforms_give_the_pipelines_tensors_for_any_pil_image(saved):
    model, directory, data = saved
    loaded, train, evaluate = m3ae.create_model_and_transforms(str(directory), seed=3)
    assert not loaded.training
    for image in (_image(50, 30), _image(30, 50, 1), _image(40, 40, 2, "RGBA"), _image(41, 29, 3, "L")):
        expected = normalize_batch(np.stack([ImageTransform(32, train=False)(image.convert("RGB"))]), *data.normalization_stats())
        torch.testing.assert_close(evaluate(image), expected[0], rtol=0, atol=0)
    # training: the pipeline's random resized crop with the recorded scale and no flip, from its own seed
    image = _image(64, 48)
    rng = np.random.default_rng(3)
    expected = [ImageTransform(32, True, (0.5, 0.9), False)(image, rng) for _ in range(2)]
    got = train([image, image])
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, normalize_batch(np.stack(expected), *data.normalization_stats()), rtol=0, atol=0)
    assert not torch.equal(got[0], got[1])  # two draws, two crops
    with torch.no_grad():
        features = loaded.encode(evaluate([image]), *m3ae.get_tokenizer(str(directory))(["a red circle"])).cls
    assert features.shape == (1, 48) and torch.isfinite(features).all()


def test_the_tokenizer_is_the_recorded_one_at_the_models_caption_length(saved):
    _, directory, _ = saved
    tokenizer = m3ae.get_tokenizer(str(directory))
    ids, padding = tokenizer(["a red circle", "a blue square on a striped background"])
    expected = Tokenizer.from_name("m3ae-embedded", 12)(["a red circle", "a blue square on a striped background"])
    assert torch.equal(ids, expected[0]) and torch.equal(padding, expected[1]) and ids.shape == (2, 12)
    assert tokenizer.name == "m3ae-embedded"


def test_a_config_json_with_the_tokenizer_in_the_record_still_reads(saved, tmp_path):
    """Files written before the tokenizer was recorded once: in the record only, or in both."""
    import shutil

    _, directory, _ = saved
    for field in (None, "m3ae-embedded"):
        old = tmp_path / f"old-{field}"
        shutil.copytree(directory, old)
        config = json.loads((old / "config.json").read_text())
        config["tokenizer"] = field
        config["preprocessing"]["tokenizer"] = "m3ae-embedded"
        (old / "config.json").write_text(json.dumps(config))
        assert m3ae.get_tokenizer(str(old)).name == "m3ae-embedded"
        assert M3AE.from_pretrained(old).config.tokenizer == field
        m3ae.create_model_and_transforms(str(old))


def test_a_model_without_a_record_gets_the_defaults_with_a_warning_and_a_preset_builds_one(tmp_path):
    model = M3AE(M3AEConfig(image_size=32, patch_size=8, text_length=8, vocab_size=50, emb_dim=32, depth=1,
                            num_heads=2, dec_emb_dim=32, dec_depth=1, dec_num_heads=2))
    model.save_pretrained(tmp_path / "old")
    with pytest.warns(UserWarning, match="records no preprocessing"):
        _, _, evaluate = m3ae.create_model_and_transforms(str(tmp_path / "old"))
    assert evaluate.mean == DataConfig().normalization_stats()[0]
    built, _, evaluate = m3ae.create_model_and_transforms("tiny")
    assert built.config.preset == "tiny" and evaluate(_image(90, 70)).shape == (3, 64, 64)


def test_hf_export_processor_reproduces_the_eval_transform_on_non_square_images(saved, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, directory, _ = saved
    assert main(["export", "--checkpoint", str(directory), "--out-dir", str(tmp_path / "hf"), "--format", "hf"]) == 0
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf", use_fast=False)
    vit, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no randomly initialised pooler
    _, _, evaluate = m3ae.create_model_and_transforms(str(directory))
    for image in (_image(45, 45), _image(77, 40, 1), _image(33, 90, 2)):  # squashed where we centre-crop, once
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixels[0], evaluate(image), rtol=0, atol=2e-6)
        with torch.no_grad():
            out = vit.eval()(pixel_values=pixels)
            ours = model.encode(evaluate([image]))
        torch.testing.assert_close(out.last_hidden_state, ours.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooler_output, ours.cls, atol=1e-5, rtol=1e-5)
