"""Run observability: metrics as JSON lines (always), TensorBoard when installed, W&B on request, and a
progress bar with loss, samples/s, model FLOP/s, MFU, data-wait share and ETA."""

from __future__ import annotations

import importlib.util
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import atomic_path, require

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"  # the W&B run id: drawn once per run directory, reused on resume


@dataclass
class LogConfig:
    every: int = 10  # steps between logged (and host-synchronised) metrics
    figures_every: int = 200  # steps between reconstruction figures; 0 disables
    tensorboard: bool | None = None  # None: when the package is installed
    wandb: bool = False  # log to Weights & Biases (the wandb extra)
    wandb_project: str = "m3ae"  # Weights & Biases project
    wandb_entity: str | None = None  # W&B team or user; null: your default entity
    wandb_name: str | None = None  # W&B display name; null: the run directory's name
    wandb_group: str | None = None  # W&B group (e.g. the runs of one sweep)
    wandb_tags: list[str] = field(default_factory=list)  # W&B tags
    progress: bool = True  # progress bar on stderr

    def __post_init__(self) -> None:
        from ..config import ConfigError

        if self.every < 1:
            raise ConfigError(f"log.every={self.every!r}: must be >= 1")
        if self.figures_every < 0:
            raise ConfigError(f"log.figures_every={self.figures_every!r}: must be >= 0")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut short by a killed run is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def wandb_run_id(run_dir: str | Path) -> str:
    """This run directory's W&B id. Random, not derived from the name: `a/exp1` and `b/exp1` (or
    one directory deleted and reused) must not write into one W&B run; kept in the run so that a
    resume continues the same one."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    with atomic_path(path) as tmp:
        tmp.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    """Only the main process writes; the others hold a disabled logger."""

    def __init__(self, run_dir: Path, cfg: LogConfig, enabled: bool, config: dict[str, Any], resume_step: int | None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = self._wandb = None
        if not enabled:
            return
        if resume_step is not None:
            # Steps after the checkpoint will be run again: drop their old lines.
            kept = [m for m in read_metrics(self.path) if m.get("step", math.inf) <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        use_tb = cfg.tensorboard if cfg.tensorboard is not None else importlib.util.find_spec("tensorboard") is not None
        if use_tb:
            require("tensorboard", "tensorboard", "log.tensorboard=true")
        wandb = require("wandb", "wandb", "log.wandb=true") if cfg.wandb else None
        self._file = open(self.path, "a", buffering=1)
        if use_tb:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb is not None:
            self._wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                                     name=cfg.wandb_name or Path(run_dir).resolve().name, group=cfg.wandb_group,
                                     tags=cfg.wandb_tags or None, dir=str(run_dir), config=config,
                                     resume="allow", id=wandb_run_id(run_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self._file.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Throughput:
    """Wall time, data-wait time and samples between two log points."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self.steps = 0

    def summary(self, flops_per_sample: int, peak_flops: float | None) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        samples_per_s = self.samples / elapsed
        flops_per_s = samples_per_s * flops_per_sample
        return {
            "samples_per_s": samples_per_s,
            "step_s": elapsed / max(self.steps, 1),
            "flops_per_s": flops_per_s,
            "mfu": flops_per_s / peak_flops if peak_flops else None,
            "data_wait": self.data_wait / elapsed,
        }


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, steps: int, metrics: dict[str, float] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update(steps)
        if metrics:
            parts = [f"loss {metrics['loss']:.4f}", f"{metrics['samples_per_s']:.1f} samples/s",
                     f"{metrics['flops_per_s'] / 1e12:.2f} TFLOP/s"]
            if metrics.get("mfu") is not None:
                parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
            parts.append(f"data {100 * metrics['data_wait']:.0f}%")
            self._bar.set_postfix_str(", ".join(parts), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
