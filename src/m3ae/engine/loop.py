"""The loop skeleton every task runs on, written once: device, precision and threads, the process
group, the run directory and its lock, resume, the stop signal, checkpoint cadence, metrics, the
progress bar and teardown.

A task (pretraining, linear probe, fine-tuning) subclasses `Trainer`: its constructor calls
`super().__init__` with the run settings of its config, builds its model, optimizer and scheduler,
hands them to `attach`, registers any other stateful part with `self.checkpoints.register`, and calls
`resume`. It supplies one unit of work (`advance`: a step, or an epoch), when to log and checkpoint,
its counters (`state_dict`), the config.json of its checkpoints and its result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as config_io
from .checkpoint import CheckpointManager, ProcessRNG
from .distributed import barrier, broadcast_object, init_distributed, mean_across_ranks, shutdown_distributed
from .metrics import LogConfig, MetricsLogger, ProgressBar, Throughput
from .run_dir import StopSignal, default_run_dir, ensure_free_space, run_dir_lock
from .runtime import PrecisionSetting, ThreadsSetting, apply_threads, resolve_precision, write_run_info


@dataclass
class RunSettings:
    """What the engine needs from a task's config."""

    name: str  # the run directory's default name: runs/<name>-<date-time>
    out_dir: str | None
    device: str
    precision: PrecisionSetting
    threads: ThreadsSetting
    keep: int  # most recent checkpoints kept
    log: LogConfig


class Trainer:
    model: nn.Module  # the task's model, unwrapped
    wrapped: nn.Module  # the same under DDP / FSDP2 (or the model itself)
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def __init__(self, cfg: Any, run: RunSettings) -> None:
        self.cfg, self.run = cfg, run
        self.threads = apply_threads(run.threads)
        self.info = init_distributed(run.device)
        self.run_dir = Path(broadcast_object(str(run.out_dir or default_run_dir(run.name))))
        self.precision = resolve_precision(run.precision, self.info.device)
        self.checkpoints = CheckpointManager(self.run_dir, run.keep, self.info)
        self.checkpoints.register("rng", ProcessRNG(self.info.device), per_rank=True)
        self.meter = Throughput()
        self.step = 0

    def attach(self, model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.model, self.wrapped, self.optimizer, self.scheduler = model, wrapped, optimizer, scheduler
        self.checkpoints.register("task", self)
        self.checkpoints.register("scheduler", scheduler)

    def resume(self, resume: str | None) -> Path | None:
        """`auto`: the newest checkpoint that verifies (none: a fresh start); else a step directory."""
        if not resume:
            return None
        path = self.checkpoints.latest_good() if resume == "auto" else Path(resume)
        if path is not None:
            self.checkpoints.load(path, self.wrapped, self.optimizer)
        return path

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.checkpoint_step(), self.wrapped, self.model_config(), self.optimizer)

    @contextlib.contextmanager
    def claim_run_dir(self) -> Iterator[None]:
        """Rank 0 holds the run directory's lock for the block, clears temporaries a killed run left
        and checks there is room for a checkpoint before anything is written."""
        if not self.info.is_main:
            yield
            return
        with run_dir_lock(self.run_dir):
            self.checkpoints.remove_stale_temporaries()
            ensure_free_space(self.run_dir, self.checkpoints.bytes_needed(self.model))
            yield

    # ------------------------------------------------------------------ what a task supplies
    def state_dict(self) -> dict[str, Any]:
        """The task's counters, saved with every checkpoint."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def model_config(self) -> dict[str, Any]:
        """The checkpoint's config.json."""
        raise NotImplementedError

    def checkpoint_step(self) -> int:
        """The number in the checkpoint's directory name."""
        return self.step

    def total_steps(self) -> int:
        raise NotImplementedError

    def finished(self) -> bool:
        raise NotImplementedError

    def advance(self, bar: ProgressBar) -> None:
        """One unit of work: an optimizer step, or an epoch."""
        raise NotImplementedError

    def log_due(self) -> bool:
        raise NotImplementedError

    def log(self, logger: MetricsLogger, bar: ProgressBar) -> dict[str, float]:
        """A host sync point: the metrics since the last log, written and shown."""
        raise NotImplementedError

    def checkpoint_due(self) -> bool:
        raise NotImplementedError

    def after_log(self, logger: MetricsLogger) -> bool:
        """Extra work between units (figures); True when it ran, so that throughput skips it."""
        return False

    def teardown(self) -> None:
        """Releases what the units held between them (a loader's worker processes)."""

    def result(self, interrupted: bool, metrics: dict[str, float], checkpoint: Path | None) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop
    def _stop_agreed(self, received: bool) -> bool:
        # One process decides alone; several agree at a log step, where they synchronise anyway.
        if not self.info.enabled:
            return received
        return bool(mean_across_ranks(torch.tensor([float(received)], device=self.info.device)).item() > 0)

    def fit(self) -> Any:
        info = self.info
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config_io.save_yaml(self.cfg, self.run_dir / "config.yaml")
            write_run_info(self.run_dir, self.precision, self.threads)
        barrier()
        # Whatever the file holds past this step (a run killed before its first checkpoint included)
        # will be logged again.
        logger = MetricsLogger(self.run_dir, self.run.log, info.is_main, config_io.to_dict(self.cfg), self.step)
        bar = ProgressBar(self.total_steps(), self.step, self.run.log.progress and info.is_main)
        metrics: dict[str, float] = {}
        interrupted, checkpoint = False, None
        self.meter.reset()
        try:
            with StopSignal() as stop:
                while not self.finished():
                    self.advance(bar)
                    stop_now = stop.received is not None and not info.enabled
                    if self.log_due() or stop_now:
                        metrics = self.log(logger, bar)
                        stop_now = self._stop_agreed(stop.received is not None)
                        self.meter.reset()
                    if self.after_log(logger):
                        self.meter.reset()
                    if self.checkpoint_due() or stop_now:
                        checkpoint = self.save_checkpoint()
                        self.meter.reset()  # throughput measures training, not checkpoint writes
                    if stop_now:
                        interrupted = True
                        break
        finally:
            self.teardown()
            bar.close()
            logger.close()
        return self.result(interrupted, metrics, checkpoint)


def run_task(build: Any, *args: Any, **kwargs: Any) -> Any:
    """Builds a trainer with `build(*args, **kwargs)`, fits it holding its run directory, and tears
    the process group down. Returns the result on the main process, None on the others."""
    try:
        trainer = build(*args, **kwargs)
        with trainer.claim_run_dir():
            result = trainer.fit()
        return result if trainer.info.is_main else None
    finally:
        shutdown_distributed()
