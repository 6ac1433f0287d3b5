"""The one on-disk layout of a model, defined once for `save_pretrained`, the checkpointer and the Hub:

    <dir>/config.json + model.safetensors         a model (save_pretrained, a Hub repo)
    <run>/checkpoints/step_XXXXXXXX/              the same two files, plus meta.json (written last:
                                                  step and the SHA-256 of every file) and the
                                                  trainer's state (train_state.pt, rank_<r>.pt, the
                                                  sharded optimizer/; see m3ae.engine.checkpoint)

`resolve` turns any of the names users give into such a directory. It lives beside the model, not in
the trainer, because `M3AE.from_pretrained` needs it and the model must not depend on the trainer.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.json"
STATE_NAME = "train_state.pt"
OPTIMIZER_DIRNAME = "optimizer"  # the optimizer's shards, one or more files per process (DCP)
CHECKPOINT_DIRNAME = "checkpoints"
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that is damaged, unreadable or cannot be resumed as asked: bad input, so every
    command reports it in one line (exit status 2)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def step_dirs(run_dir: str | Path) -> list[Path]:
    """A run's finished checkpoints, newest first."""
    directory = Path(run_dir) / CHECKPOINT_DIRNAME
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _listed_name(meta_path: Path, name: object) -> str:
    # A manifest's names are data: a relative path below the step directory, nothing else (not
    # `/proc/self/pagemap`, not `../other_run/model.safetensors`).
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or any(part in ("", ".", "..") for part in parts) or "\\" in name or "\0" in name:
        raise CheckpointError(f"{meta_path}: lists {str(name)[:80]!r}, not a file name inside the checkpoint")
    return name


def verify_meta(path: Path, share: tuple[int, int] = (0, 1)) -> dict:
    """meta.json of a complete, uncorrupted checkpoint; raises CheckpointError otherwise. `share`
    (index, count): hash only every count-th listed file from the index-th, so that the processes of
    a run verify a checkpoint together, each reading its share."""
    meta_path = path / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
        listed = meta["files"]
        int(meta["step"]), int(meta.get("world_size", 1))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from e
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in [*listed, *listed.values()]):
        raise CheckpointError(f"{meta_path}: 'files' is not a mapping of file names to SHA-256 digests")
    for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME):
        if name not in listed:
            raise CheckpointError(f"{meta_path}: does not list {name}")
    index, count = share
    inside = path.resolve()
    for name, digest in sorted(listed.items())[index::count]:
        file = path / _listed_name(meta_path, name)
        if not file.is_file() or not file.resolve().is_relative_to(inside):  # symlinks out of it included
            raise CheckpointError(f"{file}: missing, or not a file inside the checkpoint")
        if sha256(file) != digest:
            raise CheckpointError(f"{file}: content does not match its SHA-256 in {META_NAME} (corrupted)")
    return meta


def verify(path: Path) -> int:
    """The step of a complete, uncorrupted checkpoint; raises CheckpointError otherwise."""
    return int(verify_meta(path)["step"])


def newest_verified(run_dir: str | Path) -> Path | None:
    """A run's newest checkpoint that verifies, warning about each newer one skipped."""
    for path in step_dirs(run_dir):
        try:
            verify(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}; falling back to an earlier one", stacklevel=3)
            continue
        return path
    return None


def weights_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a safetensors file, read from its header alone (safetensors checks
    that the header's offsets cover the file exactly, so the shapes are bounded by its size)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                    for name in handle.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def resolve(name_or_path: str | Path, revision: str | None = None, **download) -> Path:
    """The directory holding a model's config.json + model.safetensors, from any of the names users
    give: a `save_pretrained` or checkpoint step directory (as is), a pretraining run directory (its
    newest checkpoint that verifies), or a Hub repo id (downloaded, or read from the local cache,
    which works offline, through huggingface_hub). `download` takes `snapshot_download`'s
    `cache_dir`, `force_download`, `local_files_only` and `token`."""
    path = Path(name_or_path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() or not (path / CHECKPOINT_DIRNAME).is_dir():
            return path
        step_dir = newest_verified(path)
        if step_dir is None:
            raise FileNotFoundError(f"run directory {path}: no checkpoint under {path / CHECKPOINT_DIRNAME} verifies")
        return step_dir
    if not _REPO_ID.match(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path}: neither a directory nor a Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise FileNotFoundError(
            f"{name_or_path} is not a local directory; loading it from the Hub needs huggingface_hub: "
            f"pip install 'm3ae[hub]'"
        ) from error
    return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=HUB_FILES, **download))
