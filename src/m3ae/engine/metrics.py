"""Run observability: metrics as JSON lines (always), TensorBoard when installed (the same scalars, the
flattened config as hparams, the reconstruction figures), W&B on request, and progress for whoever
watches: a bar on a terminal, plain lines in a log file (a Slurm job's), each with the loss terms,
lr, samples/s in total and per process, data-wait share, MFU and ETA."""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import DiskFullError, atomic_path, on_terminal, progress_bar, require

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
    # progress: a bar on stderr when it is a terminal, else one flushed line per logged step on stdout
    # (what a Slurm log can show); false: neither
    progress: bool = True

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


def hparams(config: dict[str, Any]) -> dict[str, float | str | bool]:
    """The config flattened to `section.field` keys with the value types TensorBoard's HParams
    accepts: numbers, strings and booleans as they are, anything else (null, lists) as JSON text."""
    from ..config import flatten

    out: dict[str, float | str | bool] = {}
    for key, value in flatten(config).items():
        out[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


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
        self._hparams = hparams(config)  # written with the first record, whose scalars it names
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
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as error:  # a full disk says which file, like every other write of a run
            if error.errno != errno.ENOSPC:
                raise
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {self.path}") from error
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            if self._hparams is not None:
                self._write_hparams(scalars)
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def _write_hparams(self, scalars: dict[str, float]) -> None:
        """The config in TensorBoard's HParams tab, in this log directory (SummaryWriter.add_hparams
        would open a new one per call), its metrics being the scalars the run logs."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(self._hparams, dict.fromkeys(scalars, 0.0)):
            self._tb.file_writer.add_summary(summary)
        self._hparams = None

    def image(self, tag: str, png: Path, step: int) -> None:
        """A figure already written as PNG (the reconstructions), shown in TensorBoard's Images tab."""
        if not self.enabled or self._tb is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        self._tb.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Throughput:
    """Wall time, data-wait time and samples (of the global batch) between two log points."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes
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
            "samples_per_s_per_process": samples_per_s / self.processes,
            "step_s": elapsed / max(self.steps, 1),
            "flops_per_s": flops_per_s,
            # each process's share of the model FLOP/s over its own device's peak
            "mfu": flops_per_s / self.processes / peak_flops if peak_flops else None,
            "data_wait": self.data_wait / elapsed,
        }


# Shown by `describe` in their own words rather than as `name value`.
_THROUGHPUT = ("lr", "samples_per_s", "samples_per_s_per_process", "step_s", "flops_per_s", "mfu", "data_wait",
               "eta_s")
_COUNTERS = ("skipped_steps", "nonfinite_steps")  # shown only when not zero


def _number(value: Any) -> str:
    if value is None:
        return "n/a"  # a window whose every step was skipped
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def describe(metrics: dict[str, Any]) -> list[str]:
    """A logged record in words: the task's terms (losses, accuracies, epoch) in its order, then lr,
    throughput (total and per process), data-wait share and MFU."""
    parts = [f"{key} {_number(value)}" for key, value in metrics.items()
             if key not in _THROUGHPUT and (key not in _COUNTERS or value)]
    if metrics.get("lr") is not None:
        parts.append(f"lr {metrics['lr']:.3g}")
    if metrics.get("samples_per_s") is not None:
        parts.append(f"{metrics['samples_per_s']:.1f} samples/s ({metrics['samples_per_s_per_process']:.1f} "
                     f"per process)")
    if metrics.get("data_wait") is not None:
        parts.append(f"data wait {100 * metrics['data_wait']:.0f}%")
    if metrics.get("flops_per_s"):
        parts.append(f"{metrics['flops_per_s'] / 1e12:.2f} TFLOP/s")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    return parts


class ProgressBar:
    """Progress for whoever watches the main process: a tqdm bar where stderr is a terminal; elsewhere
    (a Slurm or nohup log, where a bar's carriage returns run every frame into one line) one plain
    line per logged record on stdout, flushed at once: `step N/TOTAL`, `describe`'s words, ETA."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.n = total, initial
        self._bar = None
        self._lines = enabled and not on_terminal()
        self._since, self._since_n = time.perf_counter(), initial  # the ETA where a task gives none
        if enabled and not self._lines:
            self._bar = progress_bar(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, steps: int, metrics: dict[str, Any] | None = None) -> None:
        """`steps` more done; `metrics`, when given, the record just logged."""
        self.n += steps
        if self._bar is not None:
            self._bar.update(steps)
            if metrics:
                self._bar.set_postfix_str(", ".join(describe(metrics)), refresh=False)
        elif self._lines and metrics:
            print("  ".join([f"step {self.n}/{self.total}", *describe(metrics), f"ETA {self._eta(metrics)}"]),
                  flush=True)

    def _eta(self, metrics: dict[str, Any]) -> str:
        eta = metrics.get("eta_s")
        if eta is None:
            done = self.n - self._since_n
            if done <= 0:
                return "n/a"
            eta = (time.perf_counter() - self._since) / done * (self.total - self.n)
        return _duration(eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
