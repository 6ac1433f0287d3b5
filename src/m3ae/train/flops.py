"""Analytic model FLOPs of a training step, from the model config and the mask ratios.

Convention (as PaLM's MFU): 2 FLOPs per multiply-accumulate of every matmul the step runs, attention
scores and weighted values included; backward = 2 × forward, so a step costs 3 × forward. Layer norms,
softmax, GELU and the optimiser are left out (a few % at these widths). The text head counts only the
removed positions, where the loss reads it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def _block_flops(seq: int, dim: int, mlp_ratio: float) -> int:
    hidden = int(dim * mlp_ratio)
    qkv_proj = 2 * seq * dim * 4 * dim
    attention = 2 * 2 * seq * seq * dim
    mlp = 2 * 2 * seq * dim * hidden
    return qkv_proj + attention + mlp


def _head_flops(positions: int, dim: int, out_dim: int, depth: int) -> int:
    return 2 * positions * (depth * dim * dim + dim * out_dim)


def forward_flops(cfg, batch_size: int, image: bool = True, text_length: int | None = None) -> int:
    """Forward FLOPs of one masked-autoencoding call over `batch_size` samples; `text_length=None`
    means no text (image-only), `image=False` a text-only call."""
    D, Dd = cfg.emb_dim, cfg.dec_emb_dim
    enc_seq, dec_seq, flops = 1, 1, 0
    if image:
        n, keep = cfg.num_patches, cfg.image_keep
        flops += 2 * n * cfg.patch_dim * D  # every patch is embedded, then the visible ones kept
        flops += _head_flops(n, Dd, cfg.patch_dim, cfg.output_head_depth)
        enc_seq += keep
        dec_seq += n
    if text_length:
        keep = int(text_length * (1 - cfg.text_mask_ratio))
        flops += _head_flops(text_length - keep, Dd, cfg.vocab_size, cfg.output_head_depth)
        enc_seq += keep
        dec_seq += text_length
    flops += cfg.depth * _block_flops(enc_seq, D, cfg.mlp_ratio)
    flops += 2 * enc_seq * D * Dd  # decoder input projection
    flops += cfg.dec_depth * _block_flops(dec_seq, Dd, cfg.mlp_ratio)
    return batch_size * flops


@dataclass(frozen=True)
class StepFlops:
    per_sample: int  # forward + backward model FLOPs of one training sample

    def per_step(self, global_batch_size: int) -> int:
        return self.per_sample * global_batch_size


def training_flops(cfg, image: bool, text_length: int | None, unpaired_text_length: int | None = None) -> StepFlops:
    """Forward + backward FLOPs per sample of the step the trainer runs: the paired (or image-only,
    or text-only) call plus, when unpaired text is used, a text-only call."""
    fwd = forward_flops(cfg, 1, image=image, text_length=text_length if cfg.has_text else None)
    if unpaired_text_length:
        fwd += forward_flops(cfg, 1, image=False, text_length=unpaired_text_length)
    return StepFlops(per_sample=3 * fwd)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Best matmul throughput (FLOP/s) of this device and dtype, measured now in this process: the
    denominator of MFU. Square matmuls big enough to saturate the units, the best of `repeats`."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:  # the first call warms up kernels and caches
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
