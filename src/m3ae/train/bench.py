"""Training-step throughput: forward, backward and optimiser step on synthetic batches, with model
FLOP/s and MFU against the matmul peak of the precision in effect (flops.measure_peak_flops),
measured in the same process."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..model import M3AE, M3AEConfig
from ..engine.distributed import apply_activation_checkpointing, apply_compile
from ..engine.flops import measure_peak_flops, training_flops
from ..engine.optim import OptimConfig, build_optimizer, no_decay_names
from ..engine.runtime import PrecisionSetting, ThreadsSetting, apply_threads, resolve_device, resolve_precision, sync
from ..model.config import AttentionImpl, ModelType
from .synthetic import synthetic_batch


@dataclass
class BenchConfig:
    preset: str = "base"  # model size preset (M3AEConfig.from_preset)
    batch_size: int = 8  # samples per training step
    image_size: int = 256  # side of the random images, in pixels
    text_length: int = 64  # tokens per random caption
    vocab_size: int = 30522  # token ids drawn below this
    image_mask_ratio: float = 0.75  # fraction of patches removed
    text_mask_ratio: float = 0.75  # fraction of tokens removed
    model_type: ModelType = "m3ae"  # "mae": the image-only baseline
    dtype: PrecisionSetting = "auto"  # fp16/bf16 by autocast; auto: train.precision's rule
    attn_impl: AttentionImpl = "auto"  # the model picks: explicit attention on CPU, SDPA on accelerators
    steps: int = 5  # timed steps
    warmup: int = 2  # untimed steps first
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute block activations in the backward pass
    device: str = "auto"  # auto: CUDA when available
    threads: ThreadsSetting = "auto"  # CPU threads; auto: the free physical cores


def run_bench(b: BenchConfig) -> dict[str, Any]:
    threads = apply_threads(b.threads)
    device = resolve_device(b.device)
    cfg = M3AEConfig.from_preset(
        b.preset, image_size=b.image_size, text_length=b.text_length, vocab_size=b.vocab_size,
        image_mask_ratio=b.image_mask_ratio, text_mask_ratio=b.text_mask_ratio, model_type=b.model_type,
        attn_impl=b.attn_impl,
    )
    torch.manual_seed(0)
    model = M3AE(cfg).to(device)
    optim_cfg = OptimConfig()
    exclude = no_decay_names(model, optim_cfg.no_decay)
    if b.activation_checkpointing:
        apply_activation_checkpointing(model)
    if b.compile:
        apply_compile(model)
    optimizer = build_optimizer(model, optim_cfg, optim_cfg.peak_lr(b.batch_size), exclude)
    precision = resolve_precision(b.dtype, device)
    scaler = precision.grad_scaler()
    batch = {k: v.to(device) for k, v in synthetic_batch(cfg, b.batch_size, text_length=b.text_length).items()}
    text = batch.get("text")
    pad = batch.get("text_padding_mask")

    def step() -> None:
        with precision.autocast():
            loss = model(image=batch["image"], text=text, text_padding_mask=pad, compute_logits=False).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(b.warmup):
        step()
    # The matmul peak is sampled between the timed steps: on a shared host the machine's speed drifts,
    # and the best sample (the conservative denominator) is taken beside the steps it divides.
    times, peaks = [], [measure_peak_flops(device, precision.name)]
    for _ in range(b.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        peaks.append(measure_peak_flops(device, precision.name, repeats=1))
    step_s = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    flops = training_flops(cfg, True, b.text_length if cfg.has_text else None).per_step(b.batch_size)
    peak = max(peaks)
    return {
        "preset": b.preset, "model_type": b.model_type, "batch_size": b.batch_size, "image_size": b.image_size,
        "text_length": b.text_length, "vocab_size": b.vocab_size, "image_mask_ratio": b.image_mask_ratio,
        "text_mask_ratio": b.text_mask_ratio, "dtype": precision.name, "precision_reason": precision.reason,
        "attn_impl": b.attn_impl, "compile": b.compile,
        "activation_checkpointing": b.activation_checkpointing, "device": str(device),
        "threads": torch.get_num_threads(), "threads_reason": threads.reason, "steps": b.steps,
        "step_s": step_s, "step_s_min": min(times), "samples_per_s": b.batch_size / step_s,
        "flops_per_step": flops, "flops_per_s": flops / step_s, "peak_flops_per_s": peak,
        "peak_flops_per_s_min": min(peaks),
        "mfu": flops / step_s / peak,
    }
