"""Random masking by sorting noise (MAE / official M3AE): the `keep` lowest-noise positions stay visible."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Masking:
    ids_keep: torch.Tensor  # (B, keep) visible positions, in the order they enter the encoder
    ids_removed: torch.Tensor  # (B, L - keep) removed positions, in noise order
    ids_restore: torch.Tensor  # (B, L) inverse permutation, to un-shuffle [visible ++ mask tokens]
    mask: torch.Tensor  # (B, L) float, 1 = removed


def draw_noise(batch: int, length: int, mode: str, device: torch.device) -> torch.Tensor:
    """Per-sample noise (B, L), or one (L,) vector shared by the batch as the official code draws."""
    if mode == "shared":
        return torch.rand(length, device=device)
    return torch.rand(batch, length, device=device)


def random_masking(noise: torch.Tensor, batch: int, length: int, keep: int) -> Masking:
    """noise: (B, L) or (L,) broadcast to the batch; ascending sort, ties resolved by position."""
    if noise.shape not in ((length,), (batch, length)):
        raise ValueError(f"noise must have shape ({length},) or ({batch}, {length}), got {tuple(noise.shape)}")
    noise = noise.expand(batch, length)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # (B, L)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    # position i of the shuffled order is visible iff i < keep; un-shuffling gives the mask per position
    mask = (ids_restore >= keep).float()
    return Masking(ids_shuffle[:, :keep], ids_shuffle[:, keep:], ids_restore, mask)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def unshuffle(visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """[visible ++ mask tokens] (in shuffled order) -> (B, L, D) in the original order."""
    B, keep, D = visible.shape
    fill = mask_token.to(visible.dtype).expand(B, ids_restore.shape[1] - keep, D)
    return gather_tokens(torch.cat([visible, fill], dim=1), ids_restore)


def real_token_masking(noise: torch.Tensor, padding: torch.Tensor, ratio: float) -> Masking:
    """Masking over the real tokens only: each caption keeps int(n_real · (1 - ratio)) of its real
    (not padded) tokens, the lowest-noise ones. The kept block has the batch's largest count; a
    caption with fewer fills it with its own padding tokens, which attention never reads, so the
    encoder sees exactly that many words. noise: (B, L) or (L,); padding: (B, L) bool, True = pad."""
    batch, length = padding.shape
    noise = noise.expand(batch, length)
    real = ~padding
    keep = (real.sum(1).double() * (1 - ratio)).floor().long()  # (B,): int() of a positive double
    rank = torch.argsort(torch.argsort(noise.masked_fill(padding, float("inf")), dim=1, stable=True), dim=1)
    chosen = real & (rank < keep[:, None])
    # sort key: chosen words first, then padding, then the removed words; the noise orders each group
    group = torch.where(chosen, 0, torch.where(padding, 1, 2))
    key = group * length + torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1)
    return random_masking(key, batch, length, int(keep.max()) if batch else 0)
