"""Resumable checkpoints: `<run>/checkpoints/step_XXXXXXXX/` holding

    model.safetensors + config.json   the weights, loadable with `M3AE.from_pretrained(dir)`
    train_state.pt                    optimizer, lr scheduler, grad scaler, trainer counters
    rank_<r>.pt                       per process: RNG states and the data loader's position
    meta.json                         written last: step and the SHA-256 of every file

A checkpoint is written in a hidden temporary directory and renamed into place, so a killed run never
leaves a partial one. Loading verifies the hashes; `latest_good` walks back past corrupted ones with
a warning. Files are read with `torch.load(weights_only=True)` and safetensors only: no pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils import write_bytes
from .distributed import DistInfo, barrier, broadcast_object

CHECKPOINT_DIRNAME = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL_FILE, CONFIG_FILE, STATE_FILE, META_FILE = "model.safetensors", "config.json", "train_state.pt", "meta.json"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    # Serialised in memory and written by `write_bytes`: torch.save's own writer reports a full
    # disk as "[enforce fail at inline_container.cc] unexpected pos", without a word of disk space.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, seq, *rest = state["python"]
    random.setstate((version, tuple(seq), *rest))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int, info: DistInfo) -> None:
        self.directory = Path(run_dir) / CHECKPOINT_DIRNAME
        self.keep = keep
        self.info = info

    def step_dirs(self) -> list[Path]:
        """Finished checkpoints, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        model: nn.Module,
        model_config: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        train_state: dict[str, Any],
        rank_state: dict[str, Any],
    ) -> Path:
        """Collective: every rank calls it. `train_state` (scheduler, scaler, counters) is rank 0's;
        `rank_state` (RNG, data position) is each rank's own."""
        from safetensors.torch import save
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp_step_{step:08d}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            # Gathering full (unsharded) state is collective under FSDP2; only rank 0 receives it.
            options = _state_options(cpu_offload=True)
            model_state = get_model_state_dict(model, options=options)
            optim_state = get_optimizer_state_dict(model, optimizer, options=options)
            write_bytes(tmp / f"rank_{self.info.rank}.pt", _torch_bytes(rank_state))
            barrier()
            if self.info.is_main:
                tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
                write_bytes(tmp / MODEL_FILE, save(tensors, metadata={"format": "pt"}))
                write_bytes(tmp / CONFIG_FILE, (json.dumps(model_config, indent=2, sort_keys=True) + "\n").encode())
                write_bytes(tmp / STATE_FILE, _torch_bytes({**train_state, "optimizer": optim_state}))
                files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
                meta = {"step": step, "world_size": self.info.world_size, "files": files}
                write_bytes(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                for old in self.step_dirs()[self.keep :]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            # A full disk (or a second signal) must not leave a half-written directory eating space;
            # the previous checkpoint is untouched and still the newest that verifies.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier()
        return final

    def remove_stale_temporaries(self) -> None:
        """Deletes `.tmp_step_*` left by a run killed while saving (call while holding the run lock)."""
        for stale in self.directory.glob(".tmp_step_*") if self.directory.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)

    def bytes_needed(self, model: nn.Module) -> int:
        """What the next checkpoint takes on disk: the newest one's size, else weights + AdamW's two
        moments + margin estimated from the parameters."""
        newest = self.step_dirs()
        if newest:
            return sum(p.stat().st_size for p in newest[0].iterdir())
        return 4 * sum(p.numel() * p.element_size() for p in model.parameters())

    # ------------------------------------------------------------------ find and verify
    def verify(self, path: Path) -> int:
        """The step of a complete, uncorrupted checkpoint; raises CheckpointError otherwise."""
        meta_path = path / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            files = meta["files"]
            step = int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{meta_path}: unreadable ({e})") from e
        for name in (MODEL_FILE, CONFIG_FILE, STATE_FILE):
            if name not in files:
                raise CheckpointError(f"{meta_path}: does not list {name}")
        for name, digest in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing")
            if _sha256(file) != digest:
                raise CheckpointError(f"{file}: content does not match its SHA-256 in {META_FILE} (corrupted)")
        return step

    def newest_verified(self) -> Path | None:
        """Newest checkpoint that verifies, warning about each newer one skipped; this process only."""
        for path in self.step_dirs():
            try:
                self.verify(path)
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint {path}: {e}; falling back to an earlier one", stacklevel=3)
                continue
            return path
        return None

    def latest_good(self) -> Path | None:
        """`newest_verified` as rank 0 finds it, on every rank."""
        chosen = self.newest_verified() if self.info.is_main else None
        chosen = broadcast_object(None if chosen is None else str(chosen))
        return Path(chosen) if chosen else None

    # ------------------------------------------------------------------ load
    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Restores model and optimizer in place; returns (train_state without the optimizer, this
        rank's rank_state). Every rank reads the full state and keeps its shard."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        path = Path(path)
        if self.info.is_main:
            self.verify(path)
        written_by = json.loads((path / META_FILE).read_text())["world_size"]
        if written_by != self.info.world_size:
            raise CheckpointError(
                f"{path}: written by {written_by} processes, resumed with {self.info.world_size}; the data "
                f"position is per process, so resume with the same number"
            )
        rank_file = path / f"rank_{self.info.rank}.pt"
        model_state = load_file(str(path / MODEL_FILE))
        set_model_state_dict(model, model_state, options=_state_options(strict=True))
        train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, train_state.pop("optimizer"), options=_state_options())
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return train_state, rank_state
