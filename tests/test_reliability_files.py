"""Model and checkpoint files are data: meta.json names stay inside their step directory, and a
model's size is checked against its weights' headers before anything is built."""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest

from m3ae.model.files import (CONFIG_NAME, META_NAME, STATE_NAME, WEIGHTS_NAME, CheckpointError, newest_verified,
                              resolve, sha256, step_dir_name, verify)


def step(run, number: int, files: dict | list | None = None):
    """A checkpoint step directory with three small files and a meta.json listing their digests
    (or `files` as given)."""
    directory = run / "checkpoints" / step_dir_name(number)
    directory.mkdir(parents=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME):
        (directory / name).write_bytes(f"{name} of step {number}".encode())
    listed = {name: sha256(directory / name) for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME)}
    (directory / META_NAME).write_text(json.dumps({"step": number, "files": listed if files is None else files}))
    return directory


@pytest.mark.parametrize("case", ["absolute", "climbing", "symlink_out", "list", "digest_not_text"])
def test_a_hostile_meta_json_falls_back_to_the_previous_checkpoint(tmp_path, case):
    good = step(tmp_path, 10)
    newest = step(tmp_path, 20)
    meta = json.loads((newest / META_NAME).read_text())
    if case == "absolute":
        meta["files"]["/proc/self/pagemap"] = "0" * 64  # hashing it never ends
    elif case == "climbing":
        meta["files"]["../../../secret"] = "0" * 64
    elif case == "symlink_out":
        (newest / "extra").symlink_to("/proc/self/pagemap")
        meta["files"]["extra"] = "0" * 64
    elif case == "list":
        meta["files"] = list(meta["files"])
    else:
        meta["files"][WEIGHTS_NAME] = ["not", "a", "digest"]
    (newest / META_NAME).write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(CheckpointError):
        verify(newest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert newest_verified(tmp_path) == good and resolve(tmp_path) == good
    assert any(f"skipping checkpoint {newest}" in str(w.message) for w in caught)
    assert time.perf_counter() - start < 5


def test_plain_names_still_verify(tmp_path):
    directory = step(tmp_path, 10)
    assert verify(directory) == 10
    os.rename(directory / STATE_NAME, directory / "state.bin")
    (directory / STATE_NAME).symlink_to("state.bin")  # a link inside the directory is its file
    assert verify(directory) == 10
