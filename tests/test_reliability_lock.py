"""The run-directory lock: never through a symlink, and not lost with its file name."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m3ae.engine.run_dir import RunDirBusy, run_dir_lock

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's data\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(OSError, match=r"\.lock is a symbolic link; a run's lock file is never followed"):
        with run_dir_lock(run):
            pass
    assert victim.read_text() == "the user's data\n"


def test_a_lock_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / ".lock")
    with pytest.raises(OSError, match=r"\.lock is not a regular file"):
        with run_dir_lock(tmp_path):
            pass


def holder(run: Path) -> subprocess.Popen:
    """Another process holding `run`'s lock until its stdin closes."""
    code = ("import sys\nfrom m3ae.engine.run_dir import run_dir_lock\n"
            f"with run_dir_lock({str(run)!r}):\n    print('locked', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
    first = holder(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=f"pid {first.pid} on host"):
            with run_dir_lock(tmp_path):
                pass
        (tmp_path / ".lock").unlink()  # a clean-up script, or a user "fixing" a stale lock
        with pytest.raises(RunDirBusy, match=f"in use by another run \\(pid {first.pid}; its .lock was deleted"):
            with run_dir_lock(tmp_path):
                pass
    finally:
        first.stdin.close()
        first.wait(timeout=30)
    # the first run gone, the directory is free again, and the lock is ours until the block ends
    with run_dir_lock(tmp_path) as path:
        assert path.read_text().startswith(f"pid {os.getpid()} on host")
    start = time.perf_counter()
    with run_dir_lock(tmp_path):
        pass
    assert time.perf_counter() - start < 1
