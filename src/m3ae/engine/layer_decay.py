"""Layer-wise learning-rate decay for fine-tuning a ViT encoder (BEiT / MAE): the deeper a
parameter, the larger its learning rate; the patch embedding is in the lowest group."""

from __future__ import annotations

import re

from torch import nn

# parameters that come before the first block: CLS, the patch embedding and its type embedding
_EMBEDDING = re.compile(r"(^|\.)(cls_token|image_embedding|encoder_image_type_embedding|text_embedding|"
                        r"encoder_text_type_embedding)(\.|$)")
_BLOCK = re.compile(r"(^|\.)encoder\.blocks\.(\d+)\.")


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for encoder block i, depth + 1 for the final norm and the head."""
    block = _BLOCK.search(name)
    if block:
        return int(block.group(2)) + 1
    if _EMBEDDING.search(name):
        return 0
    return depth + 1


def layer_decay_groups(
    model: nn.Module, depth: int, layer_decay: float, weight_decay: float, no_decay: set[str]
) -> list[dict]:
    """Optimizer groups with `lr_scale = layer_decay ** (depth + 1 - layer_id)`; the scheduler
    multiplies each group's lr by its `lr_scale`. `no_decay` names parameters without weight decay."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decayed = layer_id(name, depth), name not in no_decay
        group = groups.setdefault((layer, decayed), {
            "params": [], "names": [], "layer_id": layer, "lr_scale": layer_decay ** (depth + 1 - layer),
            "weight_decay": weight_decay if decayed else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]
