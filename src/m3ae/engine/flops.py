"""Analytic model FLOPs of a training step, from the model config and the mask ratios.

Convention (as PaLM's MFU): 2 FLOPs per multiply-accumulate of every matmul the step runs, attention
scores and weighted values included; backward = 2 × forward, so a step costs 3 × forward. Layer norms,
softmax, GELU and the optimiser are left out (a few % at these widths). The text head counts only the
removed positions, where the loss reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .runtime import PrecisionName, matmul_rate


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


def measure_peak_flops(device: torch.device, precision: PrecisionName, sizes: tuple[int, ...] | None = None,
                       repeats: int = 5) -> float:
    """The denominator of MFU: the best matmul throughput (FLOP/s) of `precision`, measured now in
    this process through the path the model's matmuls take (`F.linear` under its autocast), at
    square sizes big enough to saturate the units. Autocast keeps part of a step in fp32, and where
    the precision is emulated fp32 is the faster path, so the fp32 rate is a floor: the peak is that
    of the precision in effect where the hardware has it, the machine's best where it does not, and
    a step's model FLOP/s cannot exceed it."""
    sizes = sizes or ((8192,) if device.type == "cuda" else (512, 1024))
    names = dict.fromkeys([precision, "fp32"])
    return max(matmul_rate(device, name, size, repeats) for name in names for size in sizes)
