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
    B, K = targets.shape
    rows = torch.arange(B, device=targets.device).repeat_interleave(K)
    return cross_entropy_by_sample(logits.flatten(0, 1), targets.flatten(), weight.flatten(), rows, B)


def cross_entropy_by_sample(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same reduction over a flat list of positions: logits (M, V), targets, weight and the
    sample index `rows` of each, all (M,). Returns (loss, accuracy)."""
    nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (M,)
    correct = (logits.argmax(dim=-1) == targets).float()
    weight = weight.float()

    def per_sample_mean(values: torch.Tensor) -> torch.Tensor:
        totals = values.new_zeros(batch).index_add(0, rows, values * weight)
        counts = values.new_zeros(batch).index_add(0, rows, weight)
        return (totals / counts.clamp_min(1e-5)).mean()

    return per_sample_mean(nll), per_sample_mean(correct)
