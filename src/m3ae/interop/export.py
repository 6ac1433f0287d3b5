"""The M3AE image encoder in the formats other tools load: Hugging Face `ViTModel` and timm's ViT.

Both expect one learned position table with a row for CLS; ours are fixed sin-cos plus a learned
image type embedding, and CLS has no position. We fold sin-cos + type into the table and give CLS a
zero row, so the exported encoders compute exactly our unmasked image-only `encode`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model import M3AE
from ..utils import atomic_path


def folded_position_table(model: M3AE) -> torch.Tensor:
    """(1, 1 + N, D): zero for CLS, sin-cos position (+ image type embedding) for each patch."""
    table = model.encoder_image_pos.detach().clone()
    if model.config.use_type_embedding:
        table = table + model.encoder_image_type_embedding.detach()
    return torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)


def patch_conv_weight(model: M3AE) -> torch.Tensor:
    """Our Linear over (py, px, c)-flattened patches as the equivalent Conv2d kernel (D, C, p, p)."""
    c = model.config
    weight = model.image_embedding.weight.detach()  # (D, p·p·C)
    return weight.reshape(c.emb_dim, c.patch_size, c.patch_size, c.in_chans).permute(0, 3, 1, 2).contiguous()


def timm_state_dict(model: M3AE) -> dict[str, torch.Tensor]:
    """State dict of timm's `VisionTransformer(img_size, patch_size, embed_dim, depth, num_heads,
    mlp_ratio, qkv_bias=True, class_token=True, global_pool='token', num_classes=0,
    norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=partial(nn.GELU, approximate='tanh'))`."""
    state = {
        "cls_token": model.cls_token.detach(),
        "pos_embed": folded_position_table(model),
        "patch_embed.proj.weight": patch_conv_weight(model),
        "patch_embed.proj.bias": model.image_embedding.bias.detach(),
    }
    # our encoder's block and norm names are timm's
    for name, tensor in model.encoder.state_dict().items():
        state[name] = tensor.detach()
    return {name: tensor.contiguous().clone() for name, tensor in state.items()}


def hf_vit_config(model: M3AE) -> dict:
    c = model.config
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": c.emb_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "intermediate_size": int(c.emb_dim * c.mlp_ratio),
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": c.layer_norm_eps,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "num_channels": c.in_chans,
        "qkv_bias": True,
        "encoder_stride": c.patch_size,
        # the pooler is an identity (weights below, no tanh): AutoModel builds one and would warn that
        # it is randomly initialised; this way pooler_output is the CLS feature, `encode(...).cls`
        "pooler_act": "linear",
    }


def hf_vit_state_dict(model: M3AE) -> dict[str, torch.Tensor]:
    """Weights of transformers' `ViTModel(config)`, its pooler an identity."""
    D = model.config.emb_dim
    state = {
        "pooler.dense.weight": torch.eye(D),
        "pooler.dense.bias": torch.zeros(D),
        "embeddings.cls_token": model.cls_token.detach(),
        "embeddings.position_embeddings": folded_position_table(model),
        "embeddings.patch_embeddings.projection.weight": patch_conv_weight(model),
        "embeddings.patch_embeddings.projection.bias": model.image_embedding.bias.detach(),
        "layernorm.weight": model.encoder.norm.weight.detach(),
        "layernorm.bias": model.encoder.norm.bias.detach(),
    }
    for i, block in enumerate(model.encoder.blocks):
        prefix = f"encoder.layer.{i}."
        qkv_w, qkv_b = block.attn.qkv.weight.detach(), block.attn.qkv.bias.detach()
        for j, part in enumerate(("query", "key", "value")):  # qkv rows are [q; k; v]
            state[f"{prefix}attention.attention.{part}.weight"] = qkv_w[j * D : (j + 1) * D]
            state[f"{prefix}attention.attention.{part}.bias"] = qkv_b[j * D : (j + 1) * D]
        pairs = {
            "attention.output.dense": block.attn.proj,
            "layernorm_before": block.norm1,
            "layernorm_after": block.norm2,
            "intermediate.dense": block.mlp.fc1,
            "output.dense": block.mlp.fc2,
        }
        for hf_name, module in pairs.items():
            state[f"{prefix}{hf_name}.weight"] = module.weight.detach()
            state[f"{prefix}{hf_name}.bias"] = module.bias.detach()
    return {name: tensor.contiguous().clone() for name, tensor in state.items()}


def pixel_statistics(model: M3AE, normalization: str | None = None) -> tuple[list[float], list[float]]:
    """(mean, std) of a preset named by `normalization`, else the ones the model's config.json
    records, else cc12m's (the official release's)."""
    from ..data.config import NORMALIZATION_PRESETS

    if normalization is None and model.preprocessing is not None:
        return list(model.preprocessing["image_mean"]), list(model.preprocessing["image_std"])
    normalization = normalization or "cc12m"
    if normalization not in NORMALIZATION_PRESETS:
        raise ValueError(f"normalization={normalization!r}: expected one of {sorted(NORMALIZATION_PRESETS)}")
    mean, std = NORMALIZATION_PRESETS[normalization]
    return list(mean), list(std)


def hf_image_processor_config(model: M3AE, normalization: str | None = None) -> dict:
    """`preprocessor_config.json` of a (slow) CLIPImageProcessor that prepares images exactly as our
    evaluation transform does, non-square ones included: RGB, the shorter side resized to the
    model's size (bicubic, the longer one truncated), a centre crop to a square, scaled to [0, 1]
    and normalised with the pretraining statistics."""
    mean, std = pixel_statistics(model, normalization)
    size = model.config.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean, "image_std": std}


def timm_config(model: M3AE, normalization: str | None = None) -> dict:
    """timm's Hub `config.json`: with it beside model.safetensors, `timm.create_model("local-dir:DIR",
    pretrained=True)` (or "hf-hub:owner/name" once uploaded) builds and loads the encoder in one call."""
    c = model.config
    if c.layer_norm_eps != 1e-6:  # timm's ViT LayerNorm eps, which its config cannot change
        raise ValueError(f"timm export: layer_norm_eps={c.layer_norm_eps} but timm's ViT uses 1e-6")
    processor = hf_image_processor_config(model, normalization)
    return {
        "architecture": "vit_base_patch16_224",  # the registered constructor; model_args set every size
        "num_classes": 0,
        "num_features": c.emb_dim,
        "global_pool": "token",
        "model_args": dict(img_size=c.image_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.emb_dim,
                           depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True,
                           class_token=True, global_pool="token", num_classes=0, act_layer="gelu_tanh"),
        "pretrained_cfg": {"input_size": [c.in_chans, c.image_size, c.image_size], "fixed_input_size": True,
                           "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                           "mean": processor["image_mean"], "std": processor["image_std"], "num_classes": 0,
                           "first_conv": "patch_embed.proj", "classifier": "head"},
    }


def export(model: M3AE, out_dir: str | Path, fmt: str, normalization: str | None = None) -> Path:
    """Writes the image encoder: `hf` -> config.json + model.safetensors loadable by
    `transformers.AutoModel.from_pretrained(out_dir)` (ViTModel), and the
    preprocessor_config.json `transformers.AutoImageProcessor` reads; `timm` -> model.safetensors +
    timm's config.json (`timm.create_model("local-dir:" + out_dir, pretrained=True)`)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        state, meta_name, meta = hf_vit_state_dict(model), "config.json", hf_vit_config(model)
        _write_json(out_dir / "preprocessor_config.json", hf_image_processor_config(model, normalization))
    elif fmt == "timm":
        state, meta_name, meta = timm_state_dict(model), "config.json", timm_config(model, normalization)
    else:
        raise ValueError(f"export format {fmt!r}: choose 'hf' or 'timm'")
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "source": "m3ae image encoder"})
    _write_json(out_dir / meta_name, meta)
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
