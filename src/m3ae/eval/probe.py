"""Linear probing and fine-tuning of a pretrained encoder on labelled images.

Linear probe (MAE / M3AE): frozen encoder, image-only input, final CLS (or mean pool), BatchNorm
without affine + Linear, LARS (or SGD) with warm-up + cosine; RandomResizedCrop + flip for
training, Resize + CenterCrop for evaluation. Without augmentation (`augment=False`) the probe is
cached by default: the features are extracted once (evaluation transform) and the head trains on
them, the same protocol in seconds.

Fine-tuning: the whole encoder with layer-wise lr decay, drop-path, mixup / CutMix, label smoothing
and AdamW. Both are tasks on `m3ae.engine` (`TransferTrainer` supplies an epoch as the unit of
work): run directory with config.yaml and metrics.jsonl, checkpoints every epoch (resume auto; they
load with `M3AE.from_pretrained` as the fine-tuned encoder), progress bar, stop signal, torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .. import config as config_io
from ..data import DataConfig
from ..engine.distributed import wrap_model
from ..engine.loop import RunSettings, Trainer, run_task
from ..engine.metrics import LogConfig, MetricsLogger, ProgressBar
from ..engine.optim import LARS, layer_decay_groups
from ..engine.runtime import PrecisionSetting, ThreadsSetting
from ..engine.schedule import LRScheduler, WarmupCosine
from ..engine.step import StatsWindow
from ..model import M3AE, ConfigError
from ..model.classifier import M3AEClassifier
from ..utils import atomic_path
from .features import FeatureSpec, Pool, require_labels

OptimizerName = Literal["lars", "sgd", "adamw"]
RecipeName = Literal["auto", "mae", "sgd"]
# Fewer optimizer steps than this (or a warm-up that never ends) is a run that cannot have trained:
# said in one line rather than reported as a result.
MIN_USEFUL_STEPS = 50

# MAE's linear probe (LARS, base lr 0.1, trust coefficient 0.001) was tuned for a 16,384 batch: its
# update moves the head by about lr x 1e-3 of its norm per step, so with the linearly scaled lr of a
# smaller batch the head hardly leaves its initialisation (docs/RESULTS.md, "Probe recipes").
MAE_PROBE_BATCH = 16384
PROBE_RECIPES: dict[str, dict] = {
    "mae": dict(optimizer="lars", base_lr=0.1, warmup_epochs=10.0),
    # plain SGD with momentum and the same linear scaling reaches a logistic regression's accuracy at
    # any batch (bench/probe_recipes.py)
    "sgd": dict(optimizer="sgd", base_lr=0.1, warmup_epochs=5.0),
}


@dataclass
class LinearProbeConfig:
    checkpoint: str = ""  # model dir, checkpoint step dir or pretraining run dir
    data: DataConfig = field(default_factory=lambda: DataConfig(normalization="cc12m"))
    num_classes: int = 0  # 0: inferred from the training labels (largest + 1)
    pool: Pool = "cls"  # the image feature: the [CLS] token, or the mean of the patch tokens
    # RandomResizedCrop + flip of the training images, redrawn every epoch (MAE's protocol); false:
    # the evaluation transform (Resize + CenterCrop). null: true unless cached
    augment: bool | None = None
    # Features of the training images extracted once, then only the head trains: the uncached probe
    # without augmentation, in seconds instead of minutes. null: true when augment is false (the same
    # protocol, so the fast way), false otherwise: augmented images cannot be cached
    cached: bool | None = None
    image_size: int | None = None  # null: the pretraining size; another size recomputes the sin-cos grid
    epochs: int = 90  # training epochs
    batch_size: int = 256  # global
    # Linear probe: fills optimizer, base_lr and warmup_epochs left null. auto: "mae" (MAE's LARS
    # protocol) from a batch of MAE_PROBE_BATCH, else "sgd". Replaced by the recipe used.
    recipe: RecipeName = "auto"
    optimizer: OptimizerName | None = None  # lars, sgd or adamw; null: the recipe's
    base_lr: float | None = None  # peak lr = base_lr × batch_size / 256 ...
    lr: float | None = None  # ... unless given directly
    warmup_epochs: float | None = None  # linear warm-up epochs; null: the recipe's
    weight_decay: float = 0.0  # of the trained weights (the head; all but norms and biases in fine-tuning)
    momentum: float = 0.9  # LARS and SGD
    precision: PrecisionSetting = "auto"  # auto: bf16 where the device computes it natively and faster
    threads: ThreadsSetting = "auto"  # CPU threads per process; auto: the free physical cores
    device: str = "auto"  # auto: CUDA when available
    seed: int = 0  # seed of the head's initialisation and of the data order
    keep: int = 2  # most recent checkpoints kept (one per epoch)
    log: LogConfig = field(default_factory=lambda: LogConfig(every=20, figures_every=0))
    out_dir: str | None = None  # null: runs/<command>-<date-time>
    resume: str | None = None  # 'auto': continue the run in out_dir from its newest good checkpoint, if any; or a checkpoint
    overwrite: bool = False  # a fresh run into an out_dir holding another run moves that run aside (never deletes)

    @property
    def finetune(self) -> bool:
        return False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.cached and self.augment:
            raise ConfigError("cached=true with augment=true: cached features are of unaugmented images; "
                              "choose one")
        if self.augment is None:
            self.augment = not self.cached
        if self.cached is None:
            self.cached = not self.augment and not self.finetune
        if self.finetune:
            if self.recipe != "auto":
                raise ConfigError(f"recipe={self.recipe!r}: recipes are the linear probe's; fine-tuning is "
                                  f"configured by its own fields")
        else:
            if self.recipe == "auto":
                self.recipe = "mae" if self.batch_size >= MAE_PROBE_BATCH else "sgd"
            for name, value in PROBE_RECIPES[self.recipe].items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        for name in ("base_lr", "warmup_epochs", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr={self.lr!r}: must be > 0 (or null to scale base_lr)")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes={self.num_classes!r}: must be >= 0 (0 infers it)")

    def validate_ready(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (a model directory, checkpoint directory, run directory or Hub repo id)")

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256


@dataclass
class FinetuneConfig(LinearProbeConfig):
    """MAE's fine-tuning recipe (ViT-B): AdamW, layer decay 0.65 to 0.75, drop-path 0.1, mixup 0.8,
    CutMix 1.0, label smoothing 0.1."""

    epochs: int = 100  # training epochs
    batch_size: int = 1024
    optimizer: OptimizerName = "adamw"  # lars, sgd or adamw
    base_lr: float = 5e-4
    warmup_epochs: float = 5.0  # linear warm-up epochs
    weight_decay: float = 0.05  # of the trained weights (the head; all but norms and biases in fine-tuning)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    layer_decay: float = 0.75  # lr scale per block down from the head (MAE's layer-wise decay)
    drop_path: float = 0.1  # stochastic depth of the encoder
    mixup: float = 0.8  # Beta(α, α) of mixup; 0 disables
    cutmix: float = 1.0  # Beta(α, α) of CutMix; 0 disables
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # CutMix rather than mixup when both are on
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy

    @property
    def finetune(self) -> bool:
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cached:
            raise ConfigError("cached=true: fine-tuning trains the encoder, so features cannot be cached")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay={self.layer_decay!r}: must be in (0, 1]")
        for name in ("mixup", "cutmix", "mix_prob", "switch_prob", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")


def count_labelled(data: DataConfig, split: str) -> tuple[int, int]:
    """(samples, classes) of a labelled split, read without decoding images (random-access
    sources know their length; the classes then need one pass over the labels)."""
    from ..data.splits import open_eval_split

    source = open_eval_split(data, split)
    labels = torch.tensor([record.label for unit in source.units() for record in source.read_unit(unit)],
                          dtype=torch.long)
    require_labels(labels, f"data source {source.name!r} ({split} split)")
    return labels.numel(), int(labels.max()) + 1 if labels.numel() else 0


def build_optimizer(model: M3AEClassifier, cfg: LinearProbeConfig, peak_lr: float) -> torch.optim.Optimizer:
    """Probe: the head only (BatchNorm has no parameters). Fine-tuning: layer-decay groups (lr_scale,
    which the scheduler applies), without weight decay on biases, norms and tokens, as in MAE."""
    if cfg.finetune:
        no_decay = {n for n, p in model.named_parameters() if p.ndim <= 1}
        no_decay |= {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
        groups = layer_decay_groups(model, model.config.depth, cfg.layer_decay, cfg.weight_decay, no_decay)
        for group in groups:
            del group["names"]  # optimizers keep group entries in their state; names are not needed
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": trainable, "weight_decay": cfg.weight_decay}]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=peak_lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(getattr(cfg, "betas", (0.9, 0.999))))


@dataclass
class ProbeResult:
    run_dir: Path
    epoch: int
    top1: float
    top5: float
    best_top1: float
    best_epoch: int

    def describe(self) -> str:
        # The last epoch is the result; the best epoch was picked on the split it is scored on, so it
        # is an optimistic number and is labelled as such.
        return (f"epoch {self.epoch}: top-1 {self.top1:.2f}%  top-5 {self.top5:.2f}%\n"
                f"  best epoch on the evaluation split (chosen on that split, optimistic): top-1 "
                f"{self.best_top1:.2f}% at epoch {self.best_epoch}\n  run {self.run_dir}")


class TransferTrainer(Trainer):
    """One run of `linear-probe` or `finetune`, a task on the engine: one `advance` is one epoch,
    evaluated and checkpointed."""

    def __init__(self, cfg: LinearProbeConfig) -> None:
        from ..data.splits import check_eval_split

        cfg.validate_ready()
        super().__init__(cfg, RunSettings(
            name="finetune" if cfg.finetune else "linear-probe", out_dir=cfg.out_dir, device=cfg.device,
            precision=cfg.precision, threads=cfg.threads, keep=cfg.keep, log=cfg.log, overwrite=cfg.overwrite),
            resume=cfg.resume)
        if cfg.batch_size % self.info.world_size:
            raise ConfigError(f"batch_size={cfg.batch_size}: must be a multiple of the {self.info.world_size} processes")
        self.local_batch = cfg.batch_size // self.info.world_size
        overrides = {"drop_path": cfg.drop_path} if cfg.finetune else {}
        if cfg.image_size is not None:
            overrides["image_size"] = cfg.image_size
        torch.manual_seed(cfg.seed)
        backbone = M3AE.from_pretrained(cfg.checkpoint, **overrides)
        model_field = "image_size" if cfg.image_size else "the checkpoint's image_size"
        cfg.data.follow_model(backbone.config.image_size, model_field)
        self.split = check_eval_split(cfg.data)
        if self.info.is_main:
            print(self.split.describe(), file=sys.stderr)
        self.features = self._cached_features(backbone) if cfg.cached else None
        if self.features is not None:
            for split, part in self.features.items():
                require_labels(part["labels"], f"data source {cfg.data.source!r} ({split} split)")
            self.train_size = self.features["train"]["labels"].numel()
            labels_classes = int(self.features["train"]["labels"].max()) + 1
        else:
            self.train_size, labels_classes = count_labelled(cfg.data, "train")
        self.num_classes = cfg.num_classes or labels_classes
        model = M3AEClassifier(backbone, self.num_classes, cfg.pool, probe=not cfg.finetune).to(self.info.device)
        # Cached features: every process trains the same head on the same data, so no wrapper.
        wrapped = model if cfg.cached else wrap_model(model, self.info, "ddp", None)
        self.steps_per_epoch = math.ceil(self.train_size / cfg.batch_size)
        self.peak_lr = cfg.peak_lr()
        optimizer = build_optimizer(model, cfg, self.peak_lr)
        total = cfg.epochs * self.steps_per_epoch
        warmup = min(round(cfg.warmup_epochs * self.steps_per_epoch), total)
        if self.info.is_main and (total < MIN_USEFUL_STEPS or warmup >= total):
            print(f"warning: {self.train_size} training samples at batch_size {cfg.batch_size} make "
                  f"{self.steps_per_epoch} step(s) per epoch, {total} in all ({warmup} of warm-up): too few to train; "
                  f"lower --batch-size or raise --epochs", file=sys.stderr)
        scheduler = LRScheduler(optimizer, WarmupCosine(
            self.peak_lr, total, warmup))
        self.attach(model, wrapped, optimizer, scheduler, clip_grad_norm=getattr(cfg, "clip_grad_norm", None))
        self.mixup = None
        if cfg.finetune and (cfg.mixup > 0 or cfg.cutmix > 0):
            from .mixup import Mixup

            self.mixup = Mixup(self.num_classes, cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.switch_prob,
                               cfg.label_smoothing, seed=cfg.seed + self.info.rank)
        self.epoch, self.best = 0, {"top1": -1.0, "epoch": 0}
        self.last: dict[str, float] = {}  # the last evaluation, kept in checkpoints for finished runs
        self.metrics: dict[str, float] = {}  # the last epoch's
        self.resume()

    # ------------------------------------------------------------------ data
    def _cached_features(self, backbone) -> dict[str, dict]:
        """Train and val features, extracted once and kept in the run directory (so resumes and kNN
        reuse them). Every process extracts all of them: the head is tiny."""
        from .features import extract_features, load_features, save_features

        out = {}
        for split in ("train", "val"):
            path = self.run_dir.features(split)
            if path.is_file():
                out[split] = load_features(path)
                continue
            out[split] = extract_features(backbone, self._loader(split, augment=False, epoch=0),
                                          FeatureSpec("image", self.cfg.pool), self.info.device,
                                          self.cfg.precision, self.cfg.log.progress and self.info.is_main)
            if self.info.is_main:
                save_features(out[split], path)
        return out

    def _loader(self, split: str, augment: bool, epoch: int):
        from ..data import build_eval_loader

        # A seed per epoch: the random crops of build_eval_loader differ from one epoch to the next.
        data = dataclasses.replace(self.cfg.data, seed=self.cfg.data.seed + epoch)
        # Every rank sees every val sample (simple exact metrics); training data are split by rank.
        rank, world = (self.info.rank, self.info.world_size) if split == "train" else (0, 1)
        return build_eval_loader(data, self.local_batch, split=split, train_transform=augment, rank=rank,
                                 world_size=world)

    def _train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.features is not None:
            train = self.features["train"]
            order = torch.randperm(self.train_size, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            for start in range(0, self.train_size, self.cfg.batch_size):
                index = order[start : start + self.cfg.batch_size]
                if index.numel() > 1:  # BatchNorm needs two samples
                    yield train["features"][index], train["labels"][index]
            return
        for batch in self._loader("train", augment=self.cfg.augment, epoch=epoch):
            if batch["label"].numel() > 1:
                yield batch["image"], batch["label"]

    # ------------------------------------------------------------------ train and evaluate
    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.features is not None:  # cached features skip the encoder: the same head
            return self.model.head(self.model.head_norm(inputs))
        return self.wrapped(inputs)

    def losses(self, batch: tuple[torch.Tensor, torch.Tensor], micro: int) -> dict[str, torch.Tensor]:
        inputs, labels = (t.to(self.info.device) for t in batch)
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, labels)
        else:
            targets = labels
        smoothing = getattr(self.cfg, "label_smoothing", 0.0) if self.mixup is None else 0.0
        return {"loss": F.cross_entropy(self._logits(inputs).float(), targets, label_smoothing=smoothing)}

    def train_epoch(self, bar) -> dict[str, float]:
        self.wrapped.train()
        window = StatsWindow()
        for batch in self._train_batches(self.epoch):
            window.append(self.train_step(iter((batch,)), self.losses))
            self.step += 1
            bar.update(1)
        if not len(window):
            raise ValueError("the training split yielded no batch of two or more samples")
        stats, _ = window.summary()
        return {"train_loss": stats["loss"], "skipped_steps": stats["skipped_steps"], "lr": self.scheduler.last_lr()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        from .knn import topk_accuracy

        self.wrapped.eval()
        if self.features is not None:
            val = self.features["val"]
            batches = [(val["features"][i : i + 4096], val["labels"][i : i + 4096])
                       for i in range(0, val["labels"].numel(), 4096)]
        else:
            batches = ((b["image"], b["label"]) for b in self._loader("val", augment=False, epoch=0))
        scores, labels = [], []
        for inputs, target in batches:
            with self.precision.autocast():
                scores.append(self._logits(inputs.to(self.info.device)).float().cpu())
            labels.append(target)
        if not scores:
            raise ValueError("the validation split is empty")
        labels = torch.cat(labels)
        require_labels(labels, f"data source {self.cfg.data.source!r} (val split)")
        return topk_accuracy(torch.cat(scores), labels)

    # ------------------------------------------------------------------ the engine's hooks
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def finished(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def advance(self, bar: ProgressBar) -> None:
        self.metrics = self.train_epoch(bar)
        self.epoch += 1
        self.metrics.update(self.evaluate(), epoch=self.epoch)
        if self.metrics["top1"] > self.best["top1"]:
            self.best = {"top1": self.metrics["top1"], "top5": self.metrics["top5"], "epoch": self.epoch}
        self.last = {"top1": self.metrics["top1"], "top5": self.metrics["top5"]}

    def log_due(self) -> bool:
        return True

    def log(self, logger: MetricsLogger, bar: ProgressBar) -> dict[str, float]:
        logger.log(self.step, self.metrics)
        bar.update(0, self.metrics)
        return self.metrics

    def checkpoint_due(self) -> bool:
        return True

    def checkpoint_step(self) -> int:
        return self.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best": self.best, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best, self.last = dict(state["best"]), dict(state["last"])

    def model_config(self) -> dict[str, Any]:
        # `backbone` is what M3AE.from_pretrained reads from a transfer checkpoint
        return {"transfer": config_io.to_dict(self.cfg), "num_classes": self.num_classes,
                "backbone": self.model.config.to_dict()}

    def result(self, interrupted: bool, metrics: dict[str, float], checkpoint: Path | None) -> ProbeResult:
        cfg = self.cfg
        result = ProbeResult(self.run_dir.path, self.epoch, self.last.get("top1", float("nan")),
                             self.last.get("top5", float("nan")), self.best["top1"], self.best["epoch"])
        if self.info.is_main:
            summary = {"last": {"epoch": result.epoch, "top1": result.top1, "top5": result.top5},
                       "best": self.best, "num_classes": self.num_classes, "train_samples": self.train_size,
                       "split": self.split.to_dict(),
                       "optimizer": {"name": cfg.optimizer, "peak_lr": self.peak_lr,
                                     **({} if cfg.finetune else {"recipe": cfg.recipe})}}
            with atomic_path(self.run_dir.results) as tmp:
                tmp.write_text(json.dumps(summary, indent=2) + "\n")
        return result


def run_transfer(cfg: LinearProbeConfig) -> ProbeResult | None:
    """Trains and evaluates; returns the result on the main process, None on the others."""
    return run_task(TransferTrainer, cfg)
