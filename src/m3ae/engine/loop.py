"""The loop every task runs on, written once: device, precision and threads, the process group, the
run directory (`RunDir`: its lock taken first, a fresh run refusing another run's directory), resume,
the stop signal, the training step (`engine.step.TrainStep`), checkpoint cadence, metrics, the
progress bar and teardown.

A task (pretraining, linear probe, fine-tuning) subclasses `Trainer`: its constructor calls
`super().__init__` with the run settings of its config, builds its model, optimizer and scheduler,
hands them to `attach` (which builds the one training step), registers any other stateful part with
`self.checkpoints.register`, and calls `resume`. It supplies its loss (`losses(batch, micro)`, run by
`self.train_step`), one unit of work (`advance`: a step, or an epoch with its evaluation), when it
is finished, what a log line holds and its result; the rest has defaults here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as config_io
from .checkpoint import CheckpointManager, ProcessRNG
from .distributed import (
    barrier, broadcast_object, gather_objects, init_distributed, mean_across_ranks, shutdown_distributed,
)
from .metrics import LogConfig, MetricsLogger, ProgressBar, Throughput
from .run_dir import RunDir, StopSignal, default_run_dir, ensure_free_space, run_dir_lock
from .runtime import (
    PrecisionSetting, ThreadsSetting, apply_threads, process_info, resolve_precision, write_run_info,
)
from .step import TrainStep


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
    overwrite: bool = False  # a fresh run moves another run found in out_dir aside instead of refusing


class Trainer:
    model: nn.Module  # the task's model, unwrapped
    wrapped: nn.Module  # the same under DDP / FSDP2 (or the model itself)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_step: TrainStep

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A task's constructor that fails after the lock was taken (a bad config found while the
        # model or the loader are built) releases it, and removes the directory if it made it.
        super().__init_subclass__(**kwargs)
        init = cls.__init__

        @functools.wraps(init)
        def guarded(self, *args: Any, **kw: Any) -> None:
            try:
                init(self, *args, **kw)
            except BaseException:
                if getattr(self, "_lock", None) is not None:
                    self.close()
                raise

        cls.__init__ = guarded

    def __init__(self, cfg: Any, run: RunSettings, resume: str | None = None) -> None:
        self.cfg, self.run, self.resuming = cfg, run, resume
        if resume in ("auto", "latest") and run.out_dir is None:
            raise config_io.ConfigError(f"--resume {resume}: needs --out-dir, the run to continue")
        self.threads = apply_threads(run.threads)
        self.info = init_distributed(run.device)
        self.run_dir = RunDir(broadcast_object(str(run.out_dir or default_run_dir(run.name))))
        self._lock = None
        self._created = not self.run_dir.path.exists()  # removed again if the run never starts
        if self.info.is_main:
            # First, before the model and the loader are built: a second run into the same directory
            # fails at once, and a fresh run never mixes itself into another's files.
            self._lock = run_dir_lock(self.run_dir.path)
            self._lock.__enter__()
            if not resume:
                self.run_dir.prepare_fresh(run.overwrite)
        barrier()
        self.precision = resolve_precision(run.precision, self.info.device)
        self.checkpoints = CheckpointManager(self.run_dir.path, run.keep, self.info)
        self.checkpoints.register("rng", ProcessRNG(self.info.device), per_rank=True)
        self.meter = Throughput(self.info.world_size)
        self.step = 0

    def attach(self, model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               accum: int = 1, clip_grad_norm: float | None = None) -> None:
        """The task's model and optimizer, and the training step built on them."""
        self.model, self.wrapped, self.optimizer, self.scheduler = model, wrapped, optimizer, scheduler
        self.train_step = TrainStep(wrapped, optimizer, scheduler, self.precision, self.info.device, accum,
                                    clip_grad_norm, self.meter)
        self.checkpoints.register("task", self)
        self.checkpoints.register("scheduler", scheduler)
        self.checkpoints.register("train_step", self.train_step)
        if self.train_step.scaler is not None:
            self.checkpoints.register("scaler", self.train_step.scaler)

    def resume(self) -> Path | None:
        """`auto`: the newest checkpoint that verifies and reads (none: a fresh start); else a step directory."""
        if not self.resuming:
            return None
        if self.resuming == "auto":
            path = self.checkpoints.load_latest(self.wrapped, self.optimizer)
        else:
            path = Path(self.resuming)
            self.checkpoints.load(path, self.wrapped, self.optimizer)
        if path is not None and self.info.is_main:  # one line, so that a requeued job's log says where it went on from
            print(f"resumed from {path} at step {self.step}", flush=True)
        return path

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.checkpoint_step(), self.wrapped, self.model_config(), self.optimizer)

    def close(self) -> None:
        """Releases the run directory's lock; a directory this run created and never wrote to (a
        config error found while the model or the data were set up) is removed with it."""
        if self._lock is None:
            return
        self._lock.__exit__(None, None, None)
        self._lock = None
        path = self.run_dir.path
        if self._created and path.is_dir() and {p.name for p in path.iterdir()} <= {RunDir.LOCK}:
            (path / RunDir.LOCK).unlink(missing_ok=True)
            path.rmdir()

    # ------------------------------------------------------------------ what a task supplies
    def total_steps(self) -> int:
        raise NotImplementedError

    def finished(self) -> bool:
        raise NotImplementedError

    def advance(self, bar: ProgressBar) -> None:
        """One unit of work: an optimizer step, or an epoch."""
        raise NotImplementedError

    def log(self, logger: MetricsLogger, bar: ProgressBar) -> dict[str, Any]:
        """A host sync point: the metrics since the last log, written and shown."""
        raise NotImplementedError

    def result(self, interrupted: bool, metrics: dict[str, Any], checkpoint: Path | None) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ what a task may change
    def state_dict(self) -> dict[str, Any]:
        """The task's counters, saved with every checkpoint."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def model_config(self) -> dict[str, Any]:
        """The checkpoint's config.json."""
        return self.model.config.to_dict()

    def checkpoint_step(self) -> int:
        """The number in the checkpoint's directory name."""
        return self.step

    def log_due(self) -> bool:
        return True

    def checkpoint_due(self) -> bool:
        return True

    def after_log(self, logger: MetricsLogger) -> bool:
        """Extra work between units (figures); True when it ran, so that throughput skips it."""
        return False

    def teardown(self) -> None:
        """Releases what the units held between them (a loader's worker processes)."""

    # ------------------------------------------------------------------ the loop
    def _stop_agreed(self, received: bool) -> bool:
        # One process decides alone; several agree at a log step, where they synchronise anyway.
        if not self.info.enabled:
            return received
        return bool(mean_across_ranks(torch.tensor([float(received)], device=self.info.device)).item() > 0)

    def _start_run_dir(self) -> None:
        processes = gather_objects(process_info(self.info.rank, self.info.device))  # every rank takes part
        if self.info.is_main:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self.checkpoints.remove_stale_temporaries()
            ensure_free_space(self.run_dir.path, self.checkpoints.bytes_needed(self.model))
            config_io.save_yaml(self.cfg, self.run_dir.config)
            write_run_info(self.run_dir.path, self.precision, self.threads, processes)
        barrier()

    def fit(self, stop: StopSignal | None = None) -> Any:
        """Runs the task to its end or to a stop signal (`stop`: one that outlives the loop, so that
        a signal during teardown is not fatal; by default the loop's own)."""
        if stop is None:
            with StopSignal() as own:
                return self.fit(own)
        info = self.info
        self._start_run_dir()
        # Whatever the file holds past this step (a run killed before its first checkpoint included)
        # will be logged again.
        logger = MetricsLogger(self.run_dir.path, self.run.log, info.is_main, config_io.to_dict(self.cfg), self.step)
        bar = ProgressBar(self.total_steps(), self.step, self.run.log.progress and info.is_main)
        metrics: dict[str, Any] = {}
        interrupted, checkpoint = False, None
        self.meter.reset()
        try:
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
    """Builds a trainer with `build(*args, **kwargs)` (which takes the run directory's lock first),
    fits it, releases the lock and tears the process group down, all under one stop signal: SIGTERM
    while the model is built, or after the last checkpoint during teardown, ends the run cleanly too.
    Returns the result on the main process, None on the others."""
    trainer = None
    with StopSignal() as stop:
        try:
            trainer = build(*args, **kwargs)
            result = trainer.fit(stop)
            return result if trainer.info.is_main else None
        finally:
            if trainer is not None:
                trainer.close()
            shutdown_distributed()
