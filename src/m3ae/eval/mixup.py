"""Mixup and CutMix for fine-tuning, with label smoothing: the batch is mixed with its own reverse."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None].long(), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box covering about (1 - lam) of the image, centred uniformly, clipped to the borders."""
    ratio = np.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.integers(height), rng.integers(width)
    top, bottom = np.clip(cy - box_h // 2, 0, height), np.clip(cy + box_h // 2, 0, height)
    left, right = np.clip(cx - box_w // 2, 0, width), np.clip(cx + box_w // 2, 0, width)
    return int(top), int(bottom), int(left), int(right)


@dataclass
class Mixup:
    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0  # chance that a batch is mixed at all
    switch_prob: float = 0.5  # chance of CutMix rather than Mixup when both are on
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mixed images, soft targets (B, num_classes) whose rows sum to one)."""
        lam = 1.0
        use_mixup, use_cutmix = self.mixup_alpha > 0, self.cutmix_alpha > 0
        if (use_mixup or use_cutmix) and self.rng.random() < self.prob:
            cutmix = use_cutmix and (not use_mixup or self.rng.random() < self.switch_prob)
            lam = float(self.rng.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha])))
            if cutmix:
                top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, self.rng)
                images = images.clone()
                images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
                # the box was clipped: the label weight follows the area actually pasted
                lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
            else:
                images = images * lam + images.flip(0) * (1.0 - lam)
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)
