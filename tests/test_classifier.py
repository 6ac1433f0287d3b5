"""The transfer classifier: frozen linear probe, fine-tuning groups with layer-wise lr decay."""

from __future__ import annotations

import pytest
import torch

from m3ae import M3AE, M3AEConfig
from m3ae.model.classifier import M3AEClassifier
from m3ae.engine.optim import layer_decay_groups, layer_id

TINY = dict(image_size=32, patch_size=8, text_length=8, vocab_size=50, emb_dim=32, depth=3, num_heads=4,
            dec_emb_dim=16, dec_depth=1, dec_num_heads=2)


def test_probe_trains_only_the_head_and_has_no_affine_batchnorm():
    torch.manual_seed(0)
    probe = M3AEClassifier(M3AE(M3AEConfig(**TINY)), num_classes=5, probe=True).train()
    assert not probe.backbone.training and probe.head_norm.training
    assert probe.head_norm.weight is None and probe.head_norm.bias is None and probe.head_norm.eps == 1e-5
    assert not hasattr(probe.backbone, "decoder") and not hasattr(probe.backbone, "text_embedding")
    before = {n: p.clone() for n, p in probe.backbone.named_parameters()}
    loss = torch.nn.functional.cross_entropy(probe(torch.randn(6, 3, 32, 32)), torch.randint(0, 5, (6,)))
    loss.backward()
    assert all(p.grad is None for p in probe.backbone.parameters())
    assert probe.head.weight.grad is not None
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert all(torch.equal(p, before[n]) for n, p in probe.backbone.named_parameters())


def test_features_equal_the_unmasked_encoder_outputs():
    torch.manual_seed(0)
    model = M3AE(M3AEConfig(**TINY)).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.encode(image)
    cls_pool = M3AEClassifier(model, 3, pool="cls").eval()
    torch.testing.assert_close(cls_pool.features(image), reference.cls)
    cls_pool.pool = "mean"
    torch.testing.assert_close(cls_pool.features(image), reference.image_tokens.mean(1))
    with pytest.raises(ValueError, match="image-only"):
        cls_pool.backbone.encode(image, torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("preset, depth", [("small", 12), ("base", 12), ("large", 24)])
def test_layer_ids_cover_every_depth(preset, depth):
    config = M3AEConfig.from_preset(preset, image_size=32, patch_size=16, dec_depth=1, dec_emb_dim=16,
                                    dec_num_heads=2, vocab_size=10)
    assert config.depth == depth
    model = M3AEClassifier(M3AE(config), num_classes=4)
    ids = {name: layer_id(name, depth) for name, _ in model.named_parameters()}
    assert ids["backbone.image_embedding.weight"] == 0 and ids["backbone.cls_token"] == 0
    assert ids["backbone.encoder.blocks.0.attn.qkv.weight"] == 1
    assert ids[f"backbone.encoder.blocks.{depth - 1}.mlp.fc2.bias"] == depth
    assert ids["backbone.encoder.norm.weight"] == depth + 1 and ids["head.weight"] == depth + 1
    assert sorted(set(ids.values())) == list(range(depth + 2))


def test_layer_decay_scales_and_weight_decay_split():
    model = M3AEClassifier(M3AE(M3AEConfig(**TINY)), num_classes=4)
    groups = layer_decay_groups(model, depth=3, layer_decay=0.75, weight_decay=0.05,
                                no_decay={"head.bias", "backbone.cls_token"})
    scale = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scale == pytest.approx({0: 0.75**4, 1: 0.75**3, 2: 0.75**2, 3: 0.75, 4: 1.0})
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.bias"]["weight_decay"] == 0.0 and by_name["head.weight"]["weight_decay"] == 0.05
    assert by_name["backbone.cls_token"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
