"""Exported image encoders compute our unmasked image-only representation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from m3ae import M3AE, M3AEConfig
from m3ae.cli import main
from m3ae.interop.export import timm_state_dict


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    torch.manual_seed(0)
    model = M3AE(M3AEConfig(image_size=32, patch_size=8, text_length=8, vocab_size=50, emb_dim=48, depth=2,
                            num_heads=4, dec_emb_dim=32, dec_depth=1, dec_num_heads=2))
    with torch.no_grad():  # non-trivial type embeddings and biases, as after training
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return model.eval(), directory


def test_hf_vit_export_matches_encode(trained_like, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, directory = trained_like
    assert main(["export", "--checkpoint", str(directory), "--out-dir", str(tmp_path / "hf"), "--format", "hf"]) == 0
    vit = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    image = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = model.encode(image).last_hidden_state
        theirs = vit(pixel_values=image).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_timm_state_dict_layout(trained_like, tmp_path):
    model, directory = trained_like
    assert main(["export", "--checkpoint", str(directory), "--out-dir", str(tmp_path / "timm"), "--format", "timm"]) == 0
    state = load_file(str(tmp_path / "timm" / "model.safetensors"))
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    args = config["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["act_layer"]) == (48, 2, 4, "gelu_tanh")
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["num_classes"] == 0
    assert state["pos_embed"].shape == (1, 17, 48) and state["pos_embed"][0, 0].abs().max() == 0
    assert state["patch_embed.proj.weight"].shape == (48, 3, 8, 8)
    # the conv kernel applied to a patch equals our Linear on the flattened patch
    image = torch.randn(2, 3, 32, 32)
    conv = torch.nn.functional.conv2d(image, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=8)
    linear = model.image_embedding(model.patchify(image))
    torch.testing.assert_close(conv.flatten(2).transpose(1, 2), linear)
    assert set(timm_state_dict(model)) == set(state)
    assert {"blocks.1.attn.qkv.weight", "norm.weight", "cls_token"} <= set(state)


def test_auto_image_processor_and_vit_model_reproduce_encode_on_a_pil_image(trained_like, tmp_path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from m3ae.data.config import NORMALIZATION_PRESETS
    from m3ae.data.transforms import ImageTransform, normalize_batch

    model, directory = trained_like
    assert main(["export", "--checkpoint", str(directory), "--out-dir", str(tmp_path / "hf"), "--format", "hf", "--normalization", "imagenet"]) == 0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 45, 3), dtype=np.uint8))
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    vit = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    ours = normalize_batch(ImageTransform(32, train=False)(image)[None].copy(), *NORMALIZATION_PRESETS["imagenet"])
    with torch.no_grad():
        theirs = vit(pixel_values=pixels).last_hidden_state
        expected = model.encode(ours).last_hidden_state
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=1e-5)


def test_timm_export_loads_with_one_create_model_call(trained_like, tmp_path):
    timm = pytest.importorskip("timm")  # timm needs torchvision; absent here, the call is documented in INTEROP.md
    model, directory = trained_like
    assert main(["export", "--checkpoint", str(directory), "--out-dir", str(tmp_path / "timm"), "--format", "timm"]) == 0
    vit = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(image), model.encode(image).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
