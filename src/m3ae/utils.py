"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def on_terminal() -> bool:
    """Whether a person watches stderr live. A progress bar redraws itself with carriage returns:
    in a Slurm or nohup log (not a terminal) every frame would stay, run into one line."""
    return sys.stderr.isatty()


def progress_bar(iterable: Any = None, *, enabled: bool = True, **options: Any):
    """A tqdm bar on stderr where it is a terminal (`on_terminal`), a silent pass-through elsewhere:
    what every command's progress goes through (`engine.metrics.ProgressBar` prints plain lines in
    its place)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and on_terminal()), **options)


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


class RunStopped(RuntimeError):
    """A run stopped on its own for a reason its message states in one line (it diverged): exit
    status 1, not a traceback."""


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
