"""The pretraining loop: masked multimodal autoencoding with gradient accumulation, DDP / FSDP2,
mixed precision, resumable checkpoints, metrics and figures.

Masking noise comes from one generator seeded identically on every process: each step draws the
noise of the whole global batch and each process takes its rows. The same global batch is therefore
the same computation whatever the number of processes or micro-batches.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DataConfig
from ..engine.checkpoint import GeneratorState, ProcessRNG
from ..engine.distributed import (
    ParallelName, apply_activation_checkpointing, apply_compile, broadcast_object, resolve_parallel, wrap_model,
)
from ..engine.flops import measure_peak_flops, training_flops
from ..engine.loop import RunSettings, Trainer, run_task
from ..engine.metrics import LogConfig, MetricsLogger, ProgressBar
from ..engine.run_dir import RunDir
from ..engine.optim import OptimConfig, build_optimizer, no_decay_names
from ..engine.runtime import PrecisionSetting, ThreadsSetting
from ..engine.schedule import LRScheduler, WarmupCosine
from ..engine.step import StatsWindow
from ..model import ConfigError, M3AE, M3AEConfig
from ..utils import RunStopped, atomic_path
from .vocabulary import resumed_checkpoint, settle_vocabulary

FIGURE_SAMPLES = 8  # samples shown in the reconstruction figures


@dataclass
class TrainConfig:
    # global: samples per optimizer step, whatever the number of processes
    batch_size: int = field(default=64, metadata={"flag": "--batch-size"})
    micro_batch_size: int | None = None  # per process and forward; null: batch_size / processes
    total_steps: int = 1000  # length of the lr schedule (derived instead when epochs is set)
    # stop after this step (resume later); null: total_steps
    max_steps: int | None = field(default=None, metadata={"flag": "--max-steps"})
    # Passes over the data; with samples_per_epoch it sets total_steps to
    # ceil(epochs × samples_per_epoch / batch_size) (printed at start). null: total_steps as given.
    epochs: float | None = None
    samples_per_epoch: int | None = None  # samples in one pass over data.source (your copy's count)
    unpaired_text_weight: float = 0.0  # w_u: weight of the text-only loss on unpaired text
    seed: int = field(default=0, metadata={"flag": "--seed"})  # seed of initialisation and masking
    # auto: bf16 where the device computes it natively and faster
    precision: PrecisionSetting = field(default="auto", metadata={"flag": "--precision"})
    # CPU threads per process; auto: the free physical cores
    threads: ThreadsSetting = field(default="auto", metadata={"flag": "--threads"})
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute block activations in the backward pass (less memory)
    parallel: ParallelName = "auto"  # auto: FSDP2 for large and huge, DDP otherwise
    device: str = field(default="auto", metadata={"flag": "--device"})  # auto: CUDA when available
    deterministic: bool = False  # deterministic kernels: bit-identical resumes on CPU
    max_nonfinite_steps: int = 20  # stop when this many consecutive steps have a NaN/Inf loss or gradient

    def __post_init__(self) -> None:
        for name in ("batch_size", "total_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("micro_batch_size", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)!r}: must be >= 1 or null")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size={self.micro_batch_size}: must divide train.batch_size={self.batch_size}"
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device={self.device!r}: must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not self.unpaired_text_weight >= 0:  # NaN included
            raise ConfigError(f"train.unpaired_text_weight={self.unpaired_text_weight!r}: must be >= 0")
        if self.epochs is not None:
            if not (self.epochs > 0 and self.samples_per_epoch is not None and self.samples_per_epoch >= 1):
                raise ConfigError(f"train.epochs={self.epochs:g}: needs epochs > 0 and train.samples_per_epoch >= 1 "
                                  f"(the number of samples in your data), got {self.samples_per_epoch!r}")
            # a --max-steps past the derived end stretches the schedule, as for a given total_steps
            self.total_steps = max(math.ceil(self.epochs * self.samples_per_epoch / self.batch_size),
                                   self.max_steps or 0)

    def describe_schedule(self) -> str | None:
        if self.epochs is None:
            return None
        return (f"schedule: {self.epochs:g} epochs x {self.samples_per_epoch} samples / batch {self.batch_size} "
                f"= {self.total_steps} steps")

    @property
    def last_step(self) -> int:
        return min(self.max_steps, self.total_steps) if self.max_steps is not None else self.total_steps


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (one is always written at the end)
    keep: int = 3  # most recent checkpoints kept

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"checkpoint.every={self.every!r}: must be >= 1")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep={self.keep!r}: must be >= 1")


def _tiny_model() -> M3AEConfig:
    return M3AEConfig.from_preset("tiny")


@dataclass
class PretrainConfig:
    model: M3AEConfig = field(default_factory=_tiny_model)
    data: DataConfig = field(default_factory=DataConfig)  # image_size and text_length: the model's
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    out_dir: str | None = None  # run directory; null: runs/<preset>-<date-time>
    # 'auto': continue the run in out_dir from its newest good checkpoint, or start it; 'latest': the
    # same, but a checkpoint must exist; or a checkpoint directory. The run's config.yaml is reloaded
    # and only the flags given now apply. null: a fresh run, refused where out_dir holds another run
    resume: str | None = None
    overwrite: bool = False  # a fresh run into an out_dir holding another run moves that run aside (never deletes)

    def __post_init__(self) -> None:
        # The model is the source of truth for shapes: `--preset base` alone must give 256 px
        # images and 64-token captions, so the data section follows it.
        self.data.follow_model(self.model.image_size)
        self.data.text_length = self.model.text_length


class NonFiniteLossError(RunStopped):
    pass


@dataclass
class RunResult:
    run_dir: Path
    step: int
    interrupted: bool
    last_metrics: dict[str, float]
    checkpoint: Path | None
    figures: list[Path]

    def describe(self) -> str:
        state = "interrupted; continue with --resume auto" if self.interrupted else "finished"
        lines = [f"run {state} at step {self.step}: {self.run_dir}"]
        if "loss" in self.last_metrics:
            lines.append(f"  last loss       {self.last_metrics['loss']:.4f}")
        lines.append(f"  metrics         {self.run_dir / RunDir.METRICS}")
        if self.checkpoint is not None:
            lines.append(f"  checkpoint      {self.checkpoint}  (M3AE.from_pretrained loads it)")
        if self.figures:
            lines.append(f"  figures         {self.figures[0].parent}  (loss curves, reconstructions, captions)")
        return "\n".join(lines)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Pretrainer(Trainer):
    """Pretraining as a task on the engine: one `advance` is one optimizer step."""

    def __init__(self, cfg: PretrainConfig, loader: Iterable[dict[str, torch.Tensor]] | None = None) -> None:
        super().__init__(cfg, RunSettings(
            name=cfg.model.preset or cfg.model.model_type, out_dir=cfg.out_dir, device=cfg.train.device,
            precision=cfg.train.precision, threads=cfg.train.threads, keep=cfg.checkpoint.keep, log=cfg.log,
            overwrite=cfg.overwrite), resume="auto" if cfg.resume == "latest" else cfg.resume)
        t, world = cfg.train, self.info.world_size
        self.micro_batch = t.micro_batch_size or t.batch_size // world
        if t.batch_size % (self.micro_batch * world):
            raise ConfigError(
                f"train.batch_size={t.batch_size}: must be a multiple of micro_batch_size ({self.micro_batch}) "
                f"× processes ({world})"
            )
        self.accum = t.batch_size // (self.micro_batch * world)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)

        if loader is None:  # a loader the caller gives brings its own token ids
            checkpoint = resumed_checkpoint(self.run_dir.path, self.resuming)
            cfg.model = broadcast_object(settle_vocabulary(cfg.model, cfg.data, checkpoint) if self.info.is_main else None)
        torch.manual_seed(t.seed)  # same initial weights on every process
        model = M3AE(cfg.model).to(self.info.device)
        exclude = no_decay_names(model, cfg.optim.no_decay)
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        if t.compile:
            apply_compile(model)
        param_dtype = self.precision.dtype if self.precision.name != "fp32" else None
        wrapped = wrap_model(model, self.info, resolve_parallel(t.parallel, cfg.model.preset), param_dtype)
        self.peak_lr = cfg.optim.peak_lr(t.batch_size)
        optimizer = build_optimizer(wrapped, cfg.optim, self.peak_lr, exclude)
        scheduler = LRScheduler(
            optimizer,
            WarmupCosine(self.peak_lr, t.total_steps, cfg.optim.warmup_steps, cfg.optim.lr_init, cfg.optim.lr_end),
        )
        self.attach(model, wrapped, optimizer, scheduler, self.accum, cfg.optim.clip_grad_norm)
        self.noise = torch.Generator().manual_seed(t.seed + 1)
        # Every process draws the whole global batch's noise: the same state everywhere, so it carries
        # over to another number of processes. The process RNG feeds only stochastic depth here.
        self.checkpoints.register("noise", GeneratorState(self.noise, replicated=True), per_rank=True)
        drawn_by = f"model.drop_path={cfg.model.drop_path}" if cfg.model.drop_path > 0 else None
        self.checkpoints.register("rng", ProcessRNG(self.info.device, drawn_by), per_rank=True)
        self.loader = loader if loader is not None else self._build_loader()
        if hasattr(self.loader, "state_dict"):
            self.checkpoints.register("data", self.loader, per_rank=True)
        # Figures are on by default: a core install trains without them rather than failing. The config
        # keeps the setting, so a resume on a machine with matplotlib draws them again.
        self.figures_every = cfg.log.figures_every
        if self.figures_every and importlib.util.find_spec("matplotlib") is None:
            logging.getLogger("m3ae.train").warning(
                "log.figures_every=%d: figures need matplotlib, which is not installed (pip install 'm3ae[viz]'); "
                "training without figures", cfg.log.figures_every)
            self.figures_every = 0
        if self.info.is_main and t.describe_schedule():
            print(t.describe_schedule(), flush=True)
        self.sample_batch: dict[str, torch.Tensor] = {}  # the figures' samples (`_figure_samples`); FLOPs
        self.flops = None  # per sample; known after the first step, which says which losses ran
        self.window = StatsWindow()  # the steps since the last log
        self.figures: list[Path] = []
        self.peak_flops: float | None = None  # measured when training starts
        self.batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.noise_of_step: dict[str, torch.Tensor] = {}
        self.resumed_from = self.resume()

    # ------------------------------------------------------------------ set-up
    def _build_loader(self):
        from ..data import build_pretrain_loader
        from ..data.loader import caption_coverage

        if self.cfg.model.has_text and self.cfg.data.paired_fraction > 0 and self.info.is_main:
            captioned, read = caption_coverage(self.cfg.data)
            if read and not captioned:
                logging.getLogger("m3ae.train").warning(
                    "%d of %d samples have a caption: training is image-only (data source %r; a caption is x.txt "
                    "beside x.jpg, a .txt shard member or a caption column)", captioned, read, self.cfg.data.source)
        return build_pretrain_loader(self.cfg.data, batch_size=self.micro_batch, rank=self.info.rank,
                                     world_size=self.info.world_size, pin_memory=self.info.device.type == "cuda",
                                     vocabulary=self.cfg.model.vocabulary)

    def model_config(self) -> dict[str, Any]:
        return {**self.model.config.to_dict(), "preprocessing": self.cfg.data.preprocessing()}

    # ------------------------------------------------------------------ one step
    def _draw_noise(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Noise of the whole global batch, so that every process draws the same numbers. Keyed by
        the batch entry it masks; unpaired text may come in batches of another size."""
        c, copies = self.cfg.model, self.accum * self.info.world_size
        sources = {"image": c.num_patches} if "image" in batch else {}
        if "text" in batch and c.has_text:
            sources["text"] = batch["text"].shape[1]
        if "unpaired_text" in batch and self.cfg.train.unpaired_text_weight > 0:
            sources["unpaired_text"] = batch["unpaired_text"].shape[1]
        noise = {
            key: torch.rand((L,) if c.masking == "shared" else (copies * batch[key].shape[0], L), generator=self.noise)
            for key, L in sources.items()
        }
        if self.info.device.type == "cuda":  # page-locked, so the copies below are truly asynchronous
            noise = {k: v.pin_memory() for k, v in noise.items()}
        return noise

    def _rows(self, noise: torch.Tensor, micro: int) -> torch.Tensor:
        """This process's rows of the global noise for micro-batch `micro`."""
        if noise.ndim == 1:
            return noise.to(self.info.device, non_blocking=True)
        size = noise.shape[0] // (self.accum * self.info.world_size)
        start = (micro * self.info.world_size + self.info.rank) * size
        return noise[start : start + size].to(self.info.device, non_blocking=True)

    def losses(self, batch: dict[str, torch.Tensor], micro: int) -> dict[str, torch.Tensor | None]:
        """The micro-batch's losses by name (None where the run has no such term), "loss" being the
        weighted total that the engine's step back-propagates."""
        size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        if size != self.micro_batch:
            raise ValueError(
                f"the loader yielded a batch of {size} samples; each process expects micro-batches of "
                f"{self.micro_batch} (train.micro_batch_size, or train.batch_size / processes)"
            )
        batch = _to_device(batch, self.info.device)
        if micro == 0:
            self.noise_of_step = self._draw_noise(batch)
        noise = self.noise_of_step
        has_image, has_text = "image" in noise, "text" in noise
        out = self.wrapped(
            image=batch["image"] if has_image else None,
            text=batch["text"] if has_text else None,
            text_padding_mask=batch.get("text_padding_mask") if has_text else None,
            image_noise=self._rows(noise["image"], micro) if has_image else None,
            text_noise=self._rows(noise["text"], micro) if has_text else None,
            compute_logits=False,
        )
        losses = {"loss": out.loss, "image_loss": out.image_loss, "text_loss": out.text_loss,
                  "text_accuracy": out.text_accuracy, "unpaired_text_loss": None}
        if "unpaired_text" in noise:
            unpaired = self.wrapped(
                text=batch["unpaired_text"], text_padding_mask=batch.get("unpaired_text_padding_mask"),
                text_noise=self._rows(noise["unpaired_text"], micro), compute_logits=False,
            )
            losses["loss"] = out.loss + self.cfg.train.unpaired_text_weight * unpaired.text_loss
            losses["unpaired_text_loss"] = unpaired.text_loss
        return losses

    # ------------------------------------------------------------------ the loop
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless: the loader is iterated again at each epoch's end."""
        empty_passes = 0
        while empty_passes < 2:  # a resumed loader may be at its epoch's end: one empty pass is fine
            empty_passes += 1
            for batch in self.loader:
                empty_passes = 0
                yield batch
        raise RuntimeError("the data loader yielded no batch")

    def _start(self) -> None:
        """Opens the batch stream; the first batch also gives the samples the figures are drawn from."""
        self.peak_flops = measure_peak_flops(self.info.device, self.precision.name)
        batches = self._batches()
        first = next(batches)
        self.sample_batch = self._figure_samples(first)
        self.batches = itertools.chain([first], batches)
        self._stream = batches  # closed at teardown: its DataLoader workers end with it

    def _figure_samples(self, first: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The samples every figure of the run shows: the first FIGURE_SAMPLES of the run's first batch,
        kept in the run directory with their keys, because a resumed run's first batch holds other
        samples and the figures over training must compare the same images."""
        from safetensors.torch import load_file, save_file

        path = self.run_dir.figure_samples
        if path.is_file():
            return load_file(path)
        samples = {k: v[:FIGURE_SAMPLES].clone().cpu().contiguous() for k, v in first.items()
                   if isinstance(v, torch.Tensor)}
        if self.info.is_main and self.figures_every:
            keys = [str(k) for k in first.get("key", [])[:FIGURE_SAMPLES]]
            with atomic_path(path) as tmp:
                save_file(samples, tmp, metadata={"keys": json.dumps(keys)})
        return samples

    # ------------------------------------------------------------------ the engine's hooks
    def total_steps(self) -> int:
        return self.cfg.train.last_step

    def finished(self) -> bool:
        return self.step >= self.cfg.train.last_step

    def advance(self, bar: ProgressBar) -> None:
        if self.batches is None:
            self._start()
            self.wrapped.train()
        stats = self.train_step(self.batches, self.losses)
        if self.flops is None:
            self.flops = self._flops(stats.present)
        self.window.append(stats)
        self.meter.samples += self.cfg.train.batch_size
        self.step += 1

    def _due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.train.last_step

    def log_due(self) -> bool:
        return self._due(self.cfg.log.every)

    def checkpoint_due(self) -> bool:
        return self._due(self.cfg.checkpoint.every)

    def after_log(self, logger: MetricsLogger) -> bool:
        every = self.figures_every
        if not ("image" in self.sample_batch and every and self._due(every)):
            return False
        self.figures += self._figures(logger)
        return True

    def teardown(self) -> None:
        if self.batches is not None:
            # its DataLoader workers end with it, not at interpreter exit (where a worker already
            # stopped by the job's SIGTERM makes the shutdown hang)
            self._stream.close()
            self.batches = None

    def result(self, interrupted: bool, metrics: dict[str, float], checkpoint: Path | None) -> RunResult:
        return RunResult(self.run_dir.path, self.step, interrupted, metrics, checkpoint, self.figures)

    def _flops(self, present: tuple[str, ...]):
        text = self.sample_batch.get("text")
        unpaired = self.sample_batch.get("unpaired_text")
        return training_flops(
            self.cfg.model,
            "image_loss" in present,
            text.shape[1] if text is not None and "text_loss" in present else None,
            unpaired.shape[1] if unpaired is not None and "unpaired_text_loss" in present else None,
        )

    def log(self, logger: MetricsLogger, bar: ProgressBar) -> dict[str, Any]:
        """Averages the window's statistics over its finite steps and over processes."""
        step = self.train_step
        steps = len(self.window)
        metrics, (nonfinite_total, nonfinite_run) = self.window.summary([step.nonfinite_total, step.nonfinite_run])
        metrics.update(lr=self.scheduler.schedule(self.step - 1), nonfinite_steps=int(round(nonfinite_total)))
        metrics.update(self.meter.summary(self.flops.per_sample if self.flops else 0, self.peak_flops))
        metrics["eta_s"] = metrics["step_s"] * (self.cfg.train.last_step - self.step)
        logger.log(self.step, metrics)
        bar.update(steps, metrics)
        if nonfinite_run >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss or gradient was NaN/Inf for {int(nonfinite_run)} consecutive steps (up to step "
                f"{self.step}; train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}): lower optim.lr "
                f"or use train.precision=bf16/fp32"
            )
        return metrics

    def _figures(self, logger) -> list[Path]:
        from .figures import plot_loss_curves, reconstruction_figures

        batch, c = self.sample_batch, self.cfg.model
        generator = torch.Generator().manual_seed(self.cfg.train.seed + 2)  # the same masks every time
        n = batch["image"].shape[0]
        noise = {"image_noise": torch.rand(n, c.num_patches, generator=generator)}
        if "text" in batch and c.has_text:
            noise["text_noise"] = torch.rand(n, batch["text"].shape[1], generator=generator)
        out_dir = self.run_dir.figures
        with self.precision.autocast():
            written = reconstruction_figures(self.wrapped, self.model, _to_device(batch, self.info.device),
                                             _to_device(noise, self.info.device), out_dir, self.step,
                                             self.info.is_main, self.cfg.data.normalization_stats())
        if self.info.is_main:
            logger.image("reconstructions", written[0], self.step)
            curves = plot_loss_curves(logger.path, out_dir / "loss_curves.png")
            written += [curves] if curves else []
        return written


def run_pretraining(cfg: PretrainConfig, loader: Iterable[dict[str, torch.Tensor]] | None = None,
                    resume: str | None = None) -> RunResult | None:
    """Builds everything, trains, and tears the process group down (`resume`, when given, replaces
    `cfg.resume`). Returns the result on the main process, None on the others."""
    if resume is not None:
        cfg.resume = resume
    return run_task(Pretrainer, cfg, loader=loader)
