"""Reconstruction losses, reduced exactly as the official code: per sample, then over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix target: each patch normalised by its own mean and (unbiased=False) variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


def patch_mse_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """pred, target (B, N, P); weight (B, N), 1 where the loss is read. Mean over P, then a weighted
    mean over patches per sample, then the mean over the batch."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    per_sample = (per_patch * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-5)
    return per_sample.mean()


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, K, V), targets (B, K), weight (B, K). Per sample: sum over weighted positions divided
    by max(count, 1e-5), so a sample without such positions adds 0 but still counts in the batch mean.
    Returns (loss, accuracy)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, K)
    correct = (logits.argmax(dim=-1) == targets).float()
    count = weight.sum(dim=1).clamp_min(1e-5)
    loss = ((nll * weight).sum(dim=1) / count).mean()
    accuracy = ((correct * weight).sum(dim=1) / count).mean()
    return loss, accuracy
