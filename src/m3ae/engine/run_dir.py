"""The run directory: its name (`runs/<name>-<date-time>` unless given), what a run writes there
before its first step (config.yaml, run_info.json), the lock that keeps a second process out, the
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

from ..utils import DiskFullError


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def ensure_free_space(directory: str | Path, needed: int) -> None:
    """Fails before a run writes anything when `directory`'s device cannot take `needed` bytes."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(errno.ENOSPC, f"no space left on device for {directory}: {free / 2**20:.1f} MiB free, "
                                          f"a checkpoint of this run needs about {needed / 2**20:.1f} MiB")


class RunDirBusy(OSError):
    """Another live process holds the run directory's lock (an OSError: every command reports it in
    one line)."""


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
