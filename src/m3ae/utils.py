"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename, so a reader
    (or a run killed mid-write) never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            # mkstemp (and writers that replace the file, like safetensors) leave 0600 whatever the
            # umask; a run on a shared cluster must stay readable to the team
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class MissingExtraError(ImportError):
    pass


def require(module: str, extra: str, feature: str):
    """`module`, imported; or an error that names the optional extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise MissingExtraError(f"{feature} needs the {package!r} package, which is not installed: "
                                f"pip install 'm3ae[{extra}]'") from error


def current_umask() -> int:
    # the only portable way to read it is to set it; put it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DiskFullError(OSError):
    """The device holding an output is full; the message names the file being written."""


def write_bytes(path: str | Path, data: bytes) -> None:
    """`Path.write_bytes` whose ENOSPC/EDQUOT says, in words, what it was writing."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(error.errno, f"no space left on device while writing {path}") from error
        raise


def ensure_free_space(directory: str | Path, needed: int) -> None:
    """Fails before a run writes anything when `directory`'s device cannot take `needed` bytes."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(errno.ENOSPC, f"no space left on device for {directory}: {free / 2**20:.1f} MiB free, "
                                          f"a checkpoint of this run needs about {needed / 2**20:.1f} MiB")


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[Path]:
    """Holds an advisory `fcntl` lock on `<run_dir>/.lock` for the block's life, the holder's pid
    and host written inside; another process fails at once with RunDirBusy naming the holder.
    A POSIX record lock (`lockf`), not `flock`: forked DataLoader workers do not inherit it (so it
    ends with the run's own process, kill -9 included: no stale lock), and NFS honours it."""
    import fcntl  # POSIX only; imported here so that the rest of this module works everywhere

    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirBusy(f"{run_dir} is in use by another run ({holder}); wait for it to end or use "
                             f"another --out-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing releases the lock
