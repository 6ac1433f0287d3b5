"""The run directory: `RunDir` owns the name of every file a run writes (config.yaml, run_info.json,
metrics.jsonl, checkpoints/step_*, results.json, figures/, the lock) and the rules for reusing one (a
fresh run refuses a directory that holds another run; `--resume` reloads the run's config and refuses
changed keys; `overwrite` moves the old run aside). Every other module finds a run's files through it.
Also here: the default name (`runs/<name>-<date-time>`), the lock that keeps a second process out, the
free-space check, and the stop signal that ends a run with a checkpoint."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..model import files as model_files
from ..utils import DiskFullError
from .metrics import METRICS_FILE, WANDB_ID_FILE


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """A run's directory and the names of everything in it."""

    CONFIG = "config.yaml"  # the command's resolved config, as --print-config writes it
    RUN_INFO = "run_info.json"  # what the run resolved (device, precision, threads, processes)
    METRICS = METRICS_FILE  # one JSON record per log step (named where the logger writes it)
    WANDB_ID = WANDB_ID_FILE  # the W&B run id, drawn once per run directory
    RESULTS = "results.json"  # an evaluation's final scores
    FIGURES = "figures"
    FIGURE_SAMPLES = "figures/samples.safetensors"  # the samples every training figure shows, kept for resumes
    LOCK = ".lock"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def run_info(self) -> Path:
        return self.path / self.RUN_INFO

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def results(self) -> Path:
        return self.path / self.RESULTS

    @property
    def figures(self) -> Path:
        return self.path / self.FIGURES

    @property
    def figure_samples(self) -> Path:
        return self.path / self.FIGURE_SAMPLES

    @property
    def checkpoints(self) -> Path:
        return self.path / model_files.CHECKPOINT_DIRNAME

    def features(self, split: str) -> Path:
        """Features a linear probe extracted once (`cached`), kept for resumes and kNN."""
        return self.path / f"features_{split}.safetensors"

    def step_dirs(self) -> list[Path]:
        """Finished checkpoints, newest first."""
        return model_files.step_dirs(self.path)

    @classmethod
    def containing(cls, path: str | Path) -> "RunDir | None":
        """The run a model directory belongs to: the directory itself when it is a run, or the run of
        a checkpoint step directory (`<run>/checkpoints/step_N`); None for a plain model directory."""
        path = Path(path)
        if (path / cls.CONFIG).is_file():
            return cls(path)
        if path.parent.name == model_files.CHECKPOINT_DIRNAME and (path.parent.parent / cls.CONFIG).is_file():
            return cls(path.parent.parent)
        return None

    def read_config(self) -> dict[str, Any]:
        """config.yaml as a plain mapping ({} when absent), read like every config: a run directory
        from someone else gets no aliases and no duplicate keys."""
        from .. import config as config_io

        if not self.config.is_file():
            return {}
        loaded = config_io.read_yaml(self.config)
        return loaded if isinstance(loaded, dict) else {}

    def holds_run(self) -> bool:
        """Whether a run already wrote here (checkpoints, or metrics from a run killed before its first
        checkpoint): what a fresh run must not mix itself into."""
        return bool(self.step_dirs()) or (self.metrics.is_file() and self.metrics.stat().st_size > 0)

    def prepare_fresh(self, overwrite: bool) -> Path | None:
        """For a run that does not resume: refuses a directory holding another run (one line: continue
        it, pick another directory, or move it aside), or with `overwrite` moves that run aside,
        never deleting it. Returns where the old run went."""
        if not self.holds_run():
            return None
        if not overwrite:
            raise RunDirExists(f"{self.path} holds another run ({self._what_is_there()}); continue it with --resume "
                               f"auto, start over in another --out-dir, or pass --overwrite true to move it aside")
        aside = self.path.with_name(f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        self.path.mkdir(parents=True, exist_ok=True)
        aside.mkdir()
        for entry in self.path.iterdir():
            if entry.name != self.LOCK:  # the lock stays: this process holds it
                entry.rename(aside / entry.name)
        return aside

    def _what_is_there(self) -> str:
        steps = self.step_dirs()
        if steps:
            return f"checkpoints up to {steps[0].name}"
        return f"{self.METRICS} with records"

    def load_config(self, cls: type, overrides: dict[str, Any], frozen: tuple[str, ...]) -> Any:
        """The run's saved config with the flags given now applied; refuses a change to any key that
        starts with one of `frozen` (the parameters' shapes, the data order: what a resumed run cannot
        change) in one line naming the flag."""
        from .. import config as config_io

        before = config_io.load(cls, self.config)
        after = config_io.load(cls, self.config, overrides)
        old, new = config_io.flatten(config_io.to_dict(before)), config_io.flatten(config_io.to_dict(after))
        for key in sorted(old.keys() | new.keys()):
            if key.startswith(frozen) and old.get(key) != new.get(key):
                raise ConfigError(f"{config_io.flag_name(key, cls)}: {old.get(key)!r} -> {new.get(key)!r} would change "
                                  f"the shapes or the data order of the run being resumed ({self.config}); start a "
                                  f"new --out-dir instead")
        return after


def ensure_free_space(directory: str | Path, needed: int) -> None:
    """Fails before a run writes anything when `directory`'s device cannot take `needed` bytes."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(errno.ENOSPC, f"no space left on device for {directory}: {free / 2**20:.1f} MiB free, "
                                          f"a checkpoint of this run needs about {needed / 2**20:.1f} MiB")


class RunDirBusy(OSError):
    """Another live process holds the run directory's lock (an OSError: every command reports it in
    one line, exit status 2)."""


class RunDirExists(ConfigError):
    """A fresh run was pointed at a directory that holds another run."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[Path]:
    """Holds an advisory `fcntl` lock on `<run_dir>/.lock` for the block's life, the holder's pid
    and host written inside; another process fails at once with RunDirBusy naming the holder.
    A POSIX record lock (`lockf`), not `flock`: forked DataLoader workers do not inherit it (so it
    ends with the run's own process, kill -9 included: no stale lock), and NFS honours it."""
    import fcntl  # POSIX only; imported here so that the rest of this module works everywhere
    import stat
    import struct
    import sys

    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # never through a symlink: whoever can write into a shared run directory could otherwise make
        # the run truncate any file its user can write; O_NONBLOCK: a FIFO planted there cannot hang us
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise OSError(errno.ELOOP, f"{path} is a symbolic link; a run's lock file is never followed (remove "
                                   f"it)") from None
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file (remove it)")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusy(f"{run_dir} is in use by another run ({holder[:200]}); wait for it to end or use "
                             f"another --out-dir") from None
        # The name `.lock` can be deleted under a live run, and a new one locked beside it. The directory
        # cannot: every run also holds a shared lock on it, and asking whether an exclusive lock could be
        # taken (F_GETLK) reports any other process's shared lock, so a second run sees the first.
        layout = {"linux": "hhqqi4x", "darwin": "qqihh"}.get(sys.platform)
        fcntl.lockf(directory, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if layout is not None:
            query = (fcntl.F_WRLCK, 0, 0, 0, 0) if layout[0] == "h" else (0, 0, 0, fcntl.F_WRLCK, 0)
            fields = struct.unpack(layout, fcntl.fcntl(directory, fcntl.F_GETLK, struct.pack(layout, *query)))
            kind, pid = (fields[0], fields[4]) if layout[0] == "h" else (fields[3], fields[2])
            if kind != fcntl.F_UNLCK:
                raise RunDirBusy(f"{run_dir} is in use by another run (pid {pid}; its {path.name} was deleted); "
                                 f"wait for it to end or use another --out-dir")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the locks
        os.close(directory)


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the step and returns. A second
    signal ends the process at once, unless it comes within `echo_s` of the first: a signal to the
    process group under torchrun reaches each rank twice (directly, then forwarded by the agent)."""

    echo_s = 2.0

    def __init__(self) -> None:
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.echo_s:
            # A second request means "now": no checkpoint, the conventional 128 + signal status.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
