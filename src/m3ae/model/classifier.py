"""An image classifier on the M3AE encoder, for linear probing and fine-tuning.

The backbone is an `M3AE` stripped to what `encode(image)` uses (no decoder, no text), so
optimisers and DDP see only parameters that receive gradients, and converted or pretrained weights
load by their usual names.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .config import M3AEConfig
from .m3ae import M3AE

Pool = Literal["cls", "mean"]
# what `encode(image)` does not use
_UNUSED_FOR_IMAGES = ("text_embedding", "text_mask_embedding", "encoder_text_type_embedding", "image_mask_embedding",
                      "decoder_input_projection", "decoder", "decoder_image_type_embedding",
                      "decoder_text_type_embedding", "decoder_image_output", "decoder_text_output")


def image_encoder(model: M3AE) -> M3AE:
    """Removes the decoder and text parameters in place; the result only supports `encode(image)`."""
    for name in _UNUSED_FOR_IMAGES:
        if hasattr(model, name):
            delattr(model, name)
    model.config = model.config.replace(model_type="mae")  # so text inputs are refused with a clear error
    return model


class M3AEClassifier(nn.Module):
    """Pooled encoder features -> [BatchNorm without affine] -> Linear.

    `probe=True` is the linear probe of MAE and M3AE: the encoder is frozen (no gradients, eval mode)
    and a BatchNorm without affine parameters (eps 1e-5) whitens the features before the Linear."""

    def __init__(self, backbone: M3AE, num_classes: int, pool: Pool = "cls", probe: bool = False) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool={pool!r}: choose 'cls' or 'mean'")
        self.backbone = image_encoder(backbone)
        self.pool, self.probe = pool, probe
        dim = backbone.config.emb_dim
        self.head_norm = nn.BatchNorm1d(dim, affine=False, eps=1e-5) if probe else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01 if probe else 2e-5)
        nn.init.zeros_(self.head.bias)
        if probe:
            self.backbone.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, num_classes: int, pool: Pool = "cls", probe: bool = False,
                        **config_overrides) -> "M3AEClassifier":
        return cls(M3AE.from_pretrained(name_or_path, **config_overrides), num_classes, pool, probe)

    @property
    def config(self) -> M3AEConfig:
        return self.backbone.config

    def train(self, mode: bool = True) -> "M3AEClassifier":
        super().train(mode)
        if self.probe:
            self.backbone.eval()  # a frozen encoder keeps inference behaviour (no drop-path)
        return self

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D): the final CLS output, or the mean of the patch outputs."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.probe):
            encoding = self.backbone.encode(image)
        return encoding.cls if self.pool == "cls" else encoding.image_tokens.mean(dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.features(image)))
