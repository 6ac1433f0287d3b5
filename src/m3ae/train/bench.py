"""Training-step throughput: the step pretraining runs (the engine's `TrainStep` over
`Pretrainer.losses`, built by `Pretrainer` itself) on a synthetic batch, with model FLOP/s and MFU
against the matmul peak of the precision in effect (flops.measure_peak_flops), measured in the same
process. What it times is what `m3ae pretrain` runs, minus the data pipeline."""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.flops import measure_peak_flops, training_flops
from ..engine.metrics import LogConfig
from ..engine.runtime import PrecisionSetting, ThreadsSetting, cpu_heap, sync
from ..model import M3AEConfig
from ..model.config import AttentionImpl, ModelType
from .pretrain import PretrainConfig, Pretrainer, TrainConfig
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
    # fp16/bf16 by autocast; auto: train.precision's rule (--dtype: the spelling before 0.2)
    precision: PrecisionSetting = field(default="auto", metadata={"aliases": ("--dtype",)})
    attn_impl: AttentionImpl = "auto"  # the model picks: explicit attention on CPU, SDPA on accelerators
    steps: int = 5  # timed steps
    warmup: int = 2  # untimed steps first
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute block activations in the backward pass
    device: str = "auto"  # auto: CUDA when available
    threads: ThreadsSetting = "auto"  # CPU threads; auto: the free physical cores


def _pretrain_config(b: BenchConfig, out_dir: str, model: M3AEConfig | None) -> PretrainConfig:
    model = (M3AEConfig.from_preset(b.preset) if model is None else model).replace(
        image_size=b.image_size, text_length=b.text_length, vocab_size=b.vocab_size,
        image_mask_ratio=b.image_mask_ratio, text_mask_ratio=b.text_mask_ratio, model_type=b.model_type,
        attn_impl=b.attn_impl,
    )
    train = TrainConfig(batch_size=b.batch_size, total_steps=b.warmup + b.steps, precision=b.precision,
                        threads=b.threads, compile=b.compile, activation_checkpointing=b.activation_checkpointing,
                        device=b.device, seed=0)
    return PretrainConfig(model=model, train=train, log=LogConfig(progress=False, figures_every=0), out_dir=out_dir)


def run_bench(b: BenchConfig, model: M3AEConfig | None = None) -> dict[str, Any]:
    """`model`: widths and depths other than `b.preset`'s (a recipe's model); the batch's shapes,
    vocabulary, masking and attention still come from `b`."""
    with tempfile.TemporaryDirectory(prefix="m3ae-bench-") as out_dir:
        cfg = _pretrain_config(b, out_dir, model)
        batch = synthetic_batch(cfg.model, b.batch_size, text_length=b.text_length)
        trainer = Pretrainer(cfg, loader=[batch])
        try:
            return _time_steps(b, trainer, batch)
        finally:
            trainer.close()


def _time_steps(b: BenchConfig, trainer: Pretrainer, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    cfg, device, precision = trainer.cfg.model, trainer.info.device, trainer.precision
    batches = iter(lambda: batch, None)  # the same batch forever: no data pipeline in the timing
    trainer.wrapped.train()

    def step() -> None:
        trainer.train_step(batches, trainer.losses)

    # Untimed steps are timed apart: with `compile` the first ones hold the compilation.
    warmup_times = []
    for _ in range(b.warmup):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        warmup_times.append(time.perf_counter() - start)
    # The matmul peak is sampled between the timed steps: on a shared host the machine's speed drifts,
    # and the best sample (the conservative denominator) is taken beside the steps it divides.
    times, cpu_times, peaks = [], [], [measure_peak_flops(device, precision.name)]
    for _ in range(b.steps):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        # CPU seconds of this process (all its threads): on a shared host, the work a step costs
        # whatever share of the cores the scheduler gave it
        cpu_times.append(time.process_time() - cpu_start)
        peaks.append(measure_peak_flops(device, precision.name, repeats=1))
    step_s = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    flops = training_flops(cfg, True, b.text_length if cfg.has_text else None).per_step(b.batch_size)
    peak = max(peaks)
    return {
        "preset": cfg.preset, "model_type": b.model_type, "batch_size": b.batch_size, "image_size": b.image_size,
        "text_length": b.text_length, "vocab_size": b.vocab_size, "image_mask_ratio": b.image_mask_ratio,
        "text_mask_ratio": b.text_mask_ratio, "precision": precision.name, "precision_reason": precision.reason,
        "attn_impl": b.attn_impl, "compile": b.compile,
        "activation_checkpointing": b.activation_checkpointing, "device": str(device),
        "threads": torch.get_num_threads(), "threads_reason": trainer.threads.reason, "cpu_heap": cpu_heap(),
        "steps": b.steps,
        "timed": "the pretraining step: engine.step.TrainStep over train.pretrain.Pretrainer.losses "
                 "(accumulation, autocast, grad scaler, clipping, non-finite skip, optimizer and lr schedule), "
                 "synthetic batch, no data pipeline",
        "step_s": step_s, "step_s_min": min(times), "step_times": times, "warmup_times": warmup_times,
        "step_cpu_s": sorted(cpu_times)[len(cpu_times) // 2], "samples_per_s": b.batch_size / step_s,
        "flops_per_step": flops, "flops_per_s": flops / step_s, "peak_flops_per_s": peak,
        "peak_flops_per_s_min": min(peaks),
        "mfu": flops / step_s / peak,
        "max_rss_mb": _max_rss_mb(),
    }


def _max_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MiB (None where `resource` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
